"""The pre-launch probe: what one node's Python says before torchrun starts there.

dsk_provision.preflight sends this file to every node at once and runs it with the node's
trainer interpreter (``python - ARGS``, the program on stdin), so it must stand alone:
the standard library only, nothing of dsk_provision, and the trainer is not there yet.

    --host H --port P     the rendezvous endpoint, as torchrun will be given it
    --serve               this node hosts the rendezvous: listen on P (all addresses, as
                          c10d's store does) until --peers connections came or time is up
    --peers N             connections to wait for when serving (every node, this one too)
    --wait S              how long to keep trying to reach the endpoint (peers may start
                          their probes later than this one)
    --modules a,b         modules to import, as the trainer will
    --gpus N              devices this node's ranks will use (0: a CPU node)

Prints one line, MARKER followed by JSON: what resolved, the connection's outcome, each
module that failed to import and why, the CUDA devices seen, and (serving) whether
torchrun's c10d rendezvous will host its store here.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import socket
import threading
import time

MARKER = "dsk-preflight: "


def _reason(exc: BaseException) -> str:
    """One line a person can read: the OS's words, else the exception's."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Listener:
    """A listening socket on ``port`` of every address, counting connections."""

    def __init__(self, port: int, peers: int, until: float):
        self.peers, self.until = peers, until
        self.accepted = 0
        self.sock = self._bind(port)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @staticmethod
    def _bind(port: int) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            address: tuple = ("::", port)
        except OSError:  # no IPv6 on this node
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = ("0.0.0.0", port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        sock.settimeout(0.2)
        return sock

    def _accept(self) -> None:
        while self.accepted < self.peers and time.monotonic() < self.until:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            # wait for the peer to close first, so that no TIME_WAIT is left on this port
            # for the rendezvous that binds it next
            conn.settimeout(2.0)
            try:
                conn.recv(1)
            except OSError:
                pass
            conn.close()
            self.accepted += 1

    def close(self) -> None:
        self.thread.join(max(0.0, self.until - time.monotonic()))
        self.sock.close()


def connect(addresses: list[tuple], until: float) -> str | None:
    """Open a TCP connection to any of ``addresses`` before ``until``; None when one
    opened, else why the last attempt failed. A refused connection is tried again: the
    node that hosts the rendezvous may not be listening yet."""
    last = "no address to try"
    while True:
        for family, address in addresses:
            left = until - time.monotonic()
            if left <= 0:
                return last
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(min(3.0, left))
            try:
                sock.connect(address)
                return None
            except TimeoutError:
                last = "no answer (timed out)"
            except OSError as exc:
                last = _reason(exc)
            finally:
                sock.close()
        if time.monotonic() >= until:
            return last
        time.sleep(0.2)


def import_problems(modules: list[str]) -> tuple[dict[str, str], list[str]]:
    """Each module that does not import, with why; and those of them that are not
    installed at all (rather than failing on a dependency of theirs, or while loading)."""
    problems, missing = {}, []
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # a module's own import may fail in any way
            if isinstance(exc, KeyboardInterrupt):
                raise
            problems[name] = _reason(exc)
            if isinstance(exc, ModuleNotFoundError) and exc.name == name.split(".")[0]:
                missing.append(name)
    return problems, missing


def hosts_rendezvous(host: str) -> bool | None:
    """Whether torchrun's c10d rendezvous on this machine hosts its store for ``host``
    (torch's own rule: the name or its addresses are this machine's); None when torch
    does not say."""
    try:
        from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname
    except Exception:  # noqa: BLE001 - an older or broken torch: nothing to tell
        return None
    try:
        return bool(_matches_machine_hostname(host))
    except Exception:  # noqa: BLE001
        return None


def cuda_devices(gpus: int) -> int | None:
    if gpus < 1:
        return None
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - reported by the module check
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--peers", type=int, default=1)
    parser.add_argument("--wait", type=float, default=10.0)
    parser.add_argument("--modules", default="")
    parser.add_argument("--gpus", type=int, default=0)
    args = parser.parse_args()
    until = time.monotonic() + args.wait
    out: dict = {"hostname": socket.gethostname()}
    listener = None
    if args.serve:
        try:
            # a little longer than the peers try, so that a late one still gets in
            listener = Listener(args.port, args.peers, until + 2.0)
        except OSError as exc:
            out["listen_error"] = (f"port {args.port} is in use" if exc.errno == errno.EADDRINUSE
                                   else _reason(exc))
    try:
        infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys((info[0], info[4]) for info in infos))
        out["resolved"] = sorted({str(a[0]) for _, a in addresses})
    except (socket.gaierror, UnicodeError) as exc:
        addresses = []
        out["resolve_error"] = _reason(exc)
    if addresses and "listen_error" not in out:
        error = connect(addresses, until)
        if error:
            out["connect_error"] = error
    modules = [m for m in args.modules.split(",") if m]
    out["import_errors"], out["missing"] = import_problems(modules)
    out["cuda_devices"] = cuda_devices(args.gpus)
    if args.serve and "torch" in modules and "torch" not in out["import_errors"]:
        out["hosts_rendezvous"] = hosts_rendezvous(args.host)
    if listener is not None:
        listener.close()
    print(MARKER + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
