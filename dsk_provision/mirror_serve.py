"""Serve a finished mirror over HTTP (foreground), and say what the inventory should set.

Plain HTTP, read-only, hidden paths (builds in progress, the build lock) refused, however
they are spelled (percent-encoded included). Binding
every address (0.0.0.0, ::) happens only when asked for explicitly.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dsk_provision.addresses import host_port
from dsk_provision.errors import EnvironmentProblem, InputError
from dsk_provision.mirror import REQUIREMENTS, read_manifest

WILDCARDS = ("0.0.0.0", "::")


def refused_path(request_path: str) -> bool:
    """Whether a request path names something the mirror does not serve: a hidden name
    (a build in progress, the build lock) or a parent directory, in any segment, judged
    after percent-decoding (as the file system will see it). A lone "." is harmless and
    apt sends it for flat repositories (URL/./InRelease)."""
    path = request_path.split("?", 1)[0].split("#", 1)[0]
    decoded = unquote(path, errors="strict")
    return "\0" in decoded or "\\" in decoded or any(
        segment.startswith(".") and segment != "." for segment in decoded.split("/"))


class _Handler(SimpleHTTPRequestHandler):
    def send_head(self):
        try:
            refused = refused_path(self.path)
        except UnicodeDecodeError:
            refused = True
        if refused:
            self.send_error(404, "not found")
            return None
        return super().send_head()

    def do_PUT(self):  # noqa: N802 - http.server's naming
        self.send_error(405, "read-only mirror")

    do_POST = do_DELETE = do_PUT  # noqa: N815

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        if self.server.quiet:  # type: ignore[attr-defined]
            return
        super().log_message(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    quiet = False


def check_bind(bind: str | None, *, inventory_first_address: str | None = None) -> str:
    """The address to bind: --bind as given, else the local address that reaches the
    inventory's first node, else 127.0.0.1. A wildcard needs an explicit --bind."""
    if bind is None:
        return local_address_towards(inventory_first_address) if inventory_first_address \
            else "127.0.0.1"
    try:
        ipaddress.ip_address(bind)
    except ValueError as exc:
        raise InputError(f"{bind!r} is not an IP address", field="--bind") from exc
    return bind


def local_address_towards(address: str) -> str:
    """The source address the kernel picks to reach `address` (a UDP connect sends
    nothing)."""
    try:
        infos = socket.getaddrinfo(address, 9, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise InputError(f"cannot resolve {address}: {exc.strerror}",
                         field="ansible_host") from exc
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect(sockaddr)
        except OSError as exc:
            raise EnvironmentProblem(f"no route from here to {address}: {exc.strerror}",
                                     hint="give --bind ADDRESS") from exc
        return s.getsockname()[0]


def make_server(directory: Path, bind: str, port: int, *, quiet: bool = False) -> _Server:
    """A server for a finished mirror (its manifest must exist); not yet serving."""
    read_manifest(directory)
    handler = functools.partial(_Handler, directory=str(directory.resolve()))
    cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) \
        if ":" in bind else _Server
    try:
        server = cls((bind, port), handler)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot listen on {host_port(bind, port)}: {exc.strerror}",
                                 hint="pick another --port or --bind") from exc
    server.quiet = quiet
    return server


def base_url(bind: str, port: int) -> str:
    return f"http://{host_port(bind, port)}/"


def inventory_settings(manifest: dict, url: str,
                       directory: Path | None = None) -> list[tuple[str, str, str]]:
    """(variable, value, comment) lines for the inventory, from what the mirror holds:
    trust comes from this control node's manifest (the signing key's fingerprint, the
    wheels' hashes in `directory`), never from what the server serves."""
    lines = []
    for os_id, apt in (manifest.get("apt") or {}).items():
        lines.append(("dsk_mirror_url", url + apt["path"], f"apt, nodes running {os_id}"))
    if manifest.get("apt") and (manifest.get("signing_key") or {}).get("fingerprint"):
        lines.append(("dsk_mirror_key_fingerprint", manifest["signing_key"]["fingerprint"],
                      "the key that signs the mirror (from the manifest)"))
    if manifest.get("wheels"):
        if directory is not None and (directory / REQUIREMENTS).is_file():
            lines.append(("trainer_env_pip_requirements_file",
                          str((directory / REQUIREMENTS).resolve()),
                          "on this control node: wheels pinned by sha256"))
        lines.append(("trainer_env_pip_find_links", url + manifest["wheels"]["path"],
                      "pip, with trainer_env_pip_index_url left empty"))
        host = urlsplit(url).hostname or ""
        if url.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
            lines.append(("trainer_env_pip_trusted_host", host, "pip accepts plain HTTP from it"))
        lines.append(("trainer_env_pip_no_index", "true", "pip asks no index"))
    return lines


def serve_in_thread(server: _Server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="dsk-mirror", daemon=True)
    thread.start()
    return thread
