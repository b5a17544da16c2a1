"""The local sandbox cluster: Debian 12 nodes in systemd-nspawn containers, each in its
own network namespace on a private bridge, with an apt mirror served on the bridge.

See docs/sandbox.md. The CLI calls up (with spare nodes for `nodes add`), down, status,
set_link_rate and reimage_node (for `nodes replace`); the fault drills
(tests/integration) stop a node with stop_node and start it again with up.

The names below load .core on first use, so that the CLI can read .naming's rules for
its help text without loading the rest (`dsk-provision --help` stays quick).
"""

from __future__ import annotations

__all__ = ["MIRROR_PACKAGES", "SandboxInfo", "down", "reimage_node", "set_link_rate", "status",
           "stop_node", "up"]


def __getattr__(name: str):
    if name in __all__:
        from . import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
