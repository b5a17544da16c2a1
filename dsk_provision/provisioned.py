"""The record of the nodes this tool has provisioned, in the cluster's state directory.

``<state dir>/nodes.json`` (dsk_provision.state) lists every node that a bootstrap has
brought in completely: its address and SSH port as they were then, the fingerprints of
the host keys pinned for it (the keys themselves are in ``host_keys.json``, written by the
ssh_trust role), when it was first provisioned, and when its trust (``/etc/hosts``,
known_hosts, ``~/.ssh/config``, authorized keys) was last brought up to date::

    {"version": 1,
     "nodes": {"gpu01": {"address": "10.0.0.1", "port": 22,
                         "host_key_fingerprints": ["SHA256:..."],
                         "provisioned_at": "2026-12-03T09:40:00Z",
                         "trust_refreshed_at": "2026-12-03T09:40:00Z",
                         "trust_pending": false}},
     "removed": {"gpu07": {"still_known_by": ["gpu03"]}}}

``trust_pending`` marks a node that was unreachable when the others were told about a new
or removed node: the next bootstrap brings it up to date. ``removed`` lists the nodes taken
out while some node did not answer: those nodes still pin the removed node's host key
until they are brought up to date, so its name cannot be given to a new node before then.

The record lives on the control node, beside the cluster key, rather than as a marker on
each node: reading it needs no connection, a dead node is still known, and it stays out
of the inventory (which a person edits and may publish). No record means the cluster was
never bootstrapped by this tool (or before the record existed): the next bootstrap is a
full one of every node, and writes it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dsk_provision.errors import InputError
from dsk_provision.files import write_private

NODES_FILE = "nodes.json"
# Written by the ssh_trust role (ssh_trust_host_keys_file): {node: ["<type> <base64>", ...]}.
HOST_KEYS_FILE = "host_keys.json"
HOST_KEYS_HINT = ("restore it from a backup, or remove it: the next bootstrap of every node "
                  "records the keys again")
RECORD_VERSION = 1


def now() -> str:
    """The time written into the record: UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class ProvisionedNode:
    """One node as the record has it."""

    name: str
    address: str
    port: int
    host_key_fingerprints: tuple[str, ...]
    provisioned_at: str
    trust_refreshed_at: str
    trust_pending: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["name"]
        data["host_key_fingerprints"] = list(self.host_key_fingerprints)
        return data


def host_key_fingerprint(key: str) -> str:
    """The SHA256 fingerprint of a public key line ``<type> <base64> [comment]``, written
    as ``ssh-keygen -l`` writes it."""
    parts = key.split()
    if len(parts) < 2:
        raise ValueError(f"not a public key: {key!r}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a public key: {key!r}") from exc
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def read_host_keys(state_dir: Path) -> dict[str, list[str]]:
    """The host keys pinned so far ({node: [key line, ...]}); empty when none are."""
    path = Path(state_dir) / HOST_KEYS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the pinned host keys: {exc}", file=str(path),
                         hint=HOST_KEYS_HINT) from exc
    if not isinstance(data, dict):
        raise InputError("is not a JSON object of node names", file=str(path),
                         hint=HOST_KEYS_HINT)
    return {str(k): [str(v) for v in keys] for k, keys in data.items()
            if isinstance(keys, list) and keys}


def forget_host_keys(state_dir: Path, name: str) -> bool:
    """Drop node ``name`` from host_keys.json (written as the ssh_trust role writes it,
    so that its next run finds nothing to change); returns whether it was there."""
    keys = read_host_keys(state_dir)
    if keys.pop(name, None) is None:
        return False
    write_private(Path(state_dir) / HOST_KEYS_FILE,
                  json.dumps(keys, indent=4, sort_keys=True, separators=(",", ": "),
                             ensure_ascii=False) + "\n")
    return True


def load_record(state_dir: Path) -> dict[str, ProvisionedNode] | None:
    """The record in ``state_dir``, by node name; None when there is none yet."""
    path = Path(state_dir) / NODES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the record of provisioned nodes: {exc}",
                         file=str(path), hint="move it away: the next bootstrap is then a "
                         "full one of every node, and writes it again") from exc
    try:
        if data.get("version") != RECORD_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {RECORD_VERSION}")
        return {name: ProvisionedNode(
                    name=name, address=str(entry["address"]), port=int(entry["port"]),
                    host_key_fingerprints=tuple(entry.get("host_key_fingerprints") or ()),
                    provisioned_at=str(entry["provisioned_at"]),
                    trust_refreshed_at=str(entry.get("trust_refreshed_at")
                                           or entry["provisioned_at"]),
                    trust_pending=bool(entry.get("trust_pending", False)))
                for name, entry in data["nodes"].items()}
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"is not a record of provisioned nodes ({exc})", file=str(path),
                         hint="move it away: the next bootstrap is then a full one of "
                              "every node, and writes it again") from exc


def load_removed(state_dir: Path) -> dict[str, list[str]]:
    """The removed nodes that some node still knows: {removed: [nodes that still pin it]}."""
    path = Path(state_dir) / NODES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        removed = data.get("removed") or {}
        return {str(name): [str(n) for n in entry.get("still_known_by") or []]
                for name, entry in removed.items() if entry.get("still_known_by")}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise InputError(f"is not a record of provisioned nodes ({exc})", file=str(path),
                         hint="move it away: the next bootstrap is then a full one of "
                              "every node, and writes it again") from exc


def write_record(state_dir: Path, record: dict[str, ProvisionedNode],
                 removed: dict[str, list[str]] | None = None) -> Path:
    """Write the record whole (0600), nodes in name order; ``removed`` (None: as it is
    now) without the entries that no node knows any more."""
    if removed is None:
        removed = load_removed(state_dir)
    data: dict[str, Any] = {"version": RECORD_VERSION,
                            "nodes": {name: record[name].to_json() for name in sorted(record)}}
    removed = {name: sorted(set(nodes)) for name, nodes in removed.items() if nodes}
    if removed:
        data["removed"] = {name: {"still_known_by": removed[name]} for name in sorted(removed)}
    return write_private(Path(state_dir) / NODES_FILE, json.dumps(data, indent=2) + "\n")


def forget_removed(state_dir: Path, up_to_date: Any) -> None:
    """The nodes ``up_to_date`` were told the whole node list: they no longer know any
    removed node."""
    removed = load_removed(state_dir)
    done = set(up_to_date)
    left = {name: [n for n in nodes if n not in done] for name, nodes in removed.items()}
    if left != removed and (Path(state_dir) / NODES_FILE).exists():
        record = load_record(state_dir) or {}
        write_record(state_dir, record, left)


def provisioned(node: Any, host_keys: dict[str, list[str]], *, when: str,
                before: ProvisionedNode | None = None) -> ProvisionedNode:
    """The record entry of inventory node ``node`` after a full bootstrap at ``when``:
    the first provisioning time is kept when the node was already recorded."""
    return ProvisionedNode(
        name=node.name, address=node.address, port=int(node.port),
        host_key_fingerprints=tuple(host_key_fingerprint(k)
                                    for k in host_keys.get(node.name, [])),
        provisioned_at=before.provisioned_at if before else when,
        trust_refreshed_at=when, trust_pending=False)


def refreshed(entry: ProvisionedNode, *, when: str | None) -> ProvisionedNode:
    """``entry`` after a trust refresh at ``when``; None: it missed it (pending)."""
    if when is None:
        return replace(entry, trust_pending=True)
    return replace(entry, trust_refreshed_at=when, trust_pending=False)
