"""How an address and a port are written together: ``host:port``, ``[v6]:port``."""

from __future__ import annotations


def host_port(host: object, port: object) -> str:
    """``10.0.0.1:22``, ``node1:22``, ``[2001:db8::1]:22``: an IPv6 address goes in brackets,
    so that its last group is not read as the port."""
    text = str(host)
    if ":" in text and not text.startswith("["):
        text = f"[{text}]"
    return f"{text}:{port}"
