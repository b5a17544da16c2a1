"""First contact with a node: collect its SSH host keys and pin them, never on trust alone.

The inventory's known_hosts file (the ``UserKnownHostsFile`` its cluster-wide
``ansible_ssh_common_args`` declares, dsk_provision.ssh_options) is the record of which
host keys the control node trusts: Ansible and the launcher connect with
``StrictHostKeyChecking=yes`` against it. The cluster's ``host_keys.json`` (in its state
directory, written by the ssh_trust role) is what runs learned afterwards, over
connections that file authenticated; the nodes' own ``/etc/ssh/ssh_known_hosts`` is made
from it. The one rule: a key enters the known_hosts file only here, and only when a
person confirmed its fingerprint or it matches a fingerprint given in advance
(``--expect``: a provider's console, a BMC). A key that differs from one recorded in
either place is refused with both fingerprints; nothing is written then.

:func:`scan` collects the keys (``ssh-keyscan`` per node, in parallel, with a timeout);
:func:`plan` compares them with what is recorded and expected; :func:`record` writes the
approved ones; :func:`trust` does the three in order and is what every caller uses
(``hostkeys scan``, ``init --probe``, node additions).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dsk_provision import provisioned, ssh_options, state
from dsk_provision.errors import DskError, EnvironmentProblem, InputError, RunFailed
from dsk_provision.files import write_file

# Seconds ssh-keyscan waits for a node (its -T).
SCAN_TIMEOUT_S = 10
# At most this many ssh-keyscan processes at once.
SCAN_PARALLEL = 32
# Key types ssh-keyscan reports, and how ssh-keygen -l names them.
_KINDS = {
    "ssh-ed25519": "ED25519",
    "ssh-rsa": "RSA",
    "ssh-dss": "DSA",
    "ecdsa-sha2-nistp256": "ECDSA",
    "ecdsa-sha2-nistp384": "ECDSA",
    "ecdsa-sha2-nistp521": "ECDSA",
    "sk-ssh-ed25519@openssh.com": "ED25519-SK",
    "sk-ecdsa-sha2-nistp256@openssh.com": "ECDSA-SK",
}
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


class HostKeyMismatch(DskError):
    """A node offers a key that differs from the recorded or the expected one. Nothing
    was written."""

    exit_code = 4


class NotConfirmed(DskError):
    """New host keys were neither confirmed nor expected. Nothing was written."""

    exit_code = 1


# --------------------------------------------------------------------------- keys

def _wire_fields(blob: bytes) -> Iterable[bytes]:
    """The length-prefixed strings of an SSH public key blob."""
    i = 0
    while i < len(blob):
        if i + 4 > len(blob):
            raise ValueError("truncated key")
        n = int.from_bytes(blob[i:i + 4], "big")
        i += 4
        if i + n > len(blob):
            raise ValueError("truncated key")
        yield blob[i:i + n]
        i += n


@dataclass(frozen=True)
class HostKey:
    """One public host key: its type (``ssh-ed25519``) and base64 blob."""

    type: str
    blob: str

    @classmethod
    def parse(cls, key_type: str, blob: str) -> HostKey:
        """Raises ValueError when the type is unknown or the blob is not a key of it."""
        if key_type not in _KINDS:
            raise ValueError(f"unknown key type {key_type!r}")
        try:
            raw = base64.b64decode(blob, validate=True)
            fields = list(_wire_fields(raw))
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"not a {key_type} key: {exc}") from None
        if not fields or fields[0] != key_type.encode():
            raise ValueError(f"the key's data is not a {key_type} key")
        return cls(key_type, blob)

    @property
    def line(self) -> str:
        """``type base64``, as known_hosts and host_keys.json hold it."""
        return f"{self.type} {self.blob}"

    @property
    def kind(self) -> str:
        """What ``ssh-keygen -l`` prints in parentheses: ED25519, RSA, ECDSA..."""
        return _KINDS[self.type]

    @property
    def fingerprint(self) -> str:
        """``SHA256:`` and the unpadded base64 of the blob's SHA-256, as ssh prints it."""
        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    @property
    def bits(self) -> int:
        fields = list(_wire_fields(base64.b64decode(self.blob)))
        if self.type == "ssh-rsa":
            return int.from_bytes(fields[2], "big").bit_length()
        if self.type == "ssh-dss":
            return int.from_bytes(fields[1], "big").bit_length()
        if "nistp" in self.type:
            return int(fields[1].decode().removeprefix("nistp"))
        return 256

    def fingerprint_line(self, comment: str) -> str:
        """The line ``ssh-keygen -l`` prints for this key with ``comment``."""
        return f"{self.bits} {self.fingerprint} {comment} ({self.kind})"


# --------------------------------------------------------------------------- nodes

@dataclass(frozen=True)
class Target:
    """A node to scan: its name, the address and port ssh connects to."""

    name: str
    address: str
    port: int = 22

    def host_field(self, host: str) -> str:
        """How known_hosts names ``host`` at this node's port."""
        return host if self.port == 22 else f"[{host}]:{self.port}"

    @property
    def known_hosts_names(self) -> list[str]:
        """The names of this node's known_hosts lines: its name and address (what ssh
        looks up is the address, ``[address]:port`` off port 22), as the ssh_trust role
        writes them on the nodes."""
        hosts = [self.name] if self.address == self.name else [self.name, self.address]
        return [self.host_field(h) for h in hosts]


def targets(inventory, names: Sequence[str] | None = None) -> list[Target]:
    """The inventory's nodes (or the named ones, in the order given) as scan targets."""
    chosen = [inventory.node(n) for n in names] if names else list(inventory.nodes)
    return [Target(n.name, str(n.address), int(n.port or 22)) for n in chosen]


@dataclass
class NodeScan:
    """What one node answered: its keys, or why it did not."""

    target: Target
    keys: list[HostKey] = field(default_factory=list)
    error: str | None = None


def parse_keyscan(text: str) -> list[HostKey]:
    """The keys of ``ssh-keyscan`` output (``host type base64`` lines; ``#`` lines are
    its banner comments). Raises ValueError on a line that is not a key."""
    keys: list[HostKey] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 3:
            raise ValueError(f"line {number}: {line!r} is not 'host type key'")
        key = HostKey.parse(parts[1], parts[2])
        if key not in keys:
            keys.append(key)
    return keys


def _keyscan_program() -> str:
    program = shutil.which("ssh-keyscan")
    if program is None:
        raise EnvironmentProblem("ssh-keyscan is missing on this machine",
                                 hint="install the OpenSSH client (apt-get install "
                                      "openssh-client)")
    return program


def _scan_one(program: str, target: Target, timeout: int) -> NodeScan:
    argv = [program, "-T", str(timeout), "-p", str(target.port), target.address]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout * 3 + 5,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return NodeScan(target, error=f"no answer within {timeout * 3 + 5} s")
    try:
        keys = parse_keyscan(proc.stdout)
    except ValueError as exc:
        return NodeScan(target, error=f"ssh-keyscan printed something that is no key: {exc}")
    if not keys:
        said = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("#")]
        why = said[-1].strip() if said else f"no host key within {timeout} s"
        return NodeScan(target, error=f"{target.address} port {target.port}: {why}")
    return NodeScan(target, keys=keys)


def scan(nodes: Sequence[Target], *, timeout: int = SCAN_TIMEOUT_S) -> list[NodeScan]:
    """Every node's host keys, asked in parallel (``ssh-keyscan -T timeout -p port``), in
    the order of ``nodes``. An unreachable node is returned with its error."""
    if not nodes:
        return []
    program = _keyscan_program()
    with ThreadPoolExecutor(max_workers=min(SCAN_PARALLEL, len(nodes))) as pool:
        return list(pool.map(lambda t: _scan_one(program, t, timeout), nodes))


# --------------------------------------------------------------------------- records

def known_hosts_path(inventory) -> Path:
    """The known_hosts file the inventory declares (UserKnownHostsFile in the cluster-wide
    ansible_ssh_common_args). Raises InputError when it declares none."""
    declared = ssh_options.declared_known_hosts(inventory.vars)
    if not declared:
        raise InputError(
            "the inventory declares no known_hosts file, so there is nowhere to pin the "
            "nodes' host keys", file=str(inventory.hosts_file),
            field=ssh_options.KNOWN_HOSTS_VAR,
            hint="add '-o UserKnownHostsFile=/absolute/path/known_hosts -o "
                 "StrictHostKeyChecking=yes' to ansible_ssh_common_args in group_vars/all.yml "
                 "(see inventory/example)")
    return Path(declared[0]).expanduser()


def _hashed_match(pattern: str, host: str) -> bool:
    """Whether a hashed known_hosts name (``|1|salt|hash``) is ``host``."""
    parts = pattern.split("|")
    if len(parts) != 4 or parts[1] != "1":
        return False
    try:
        salt = base64.b64decode(parts[2])
        want = base64.b64decode(parts[3])
    except binascii.Error:
        return False
    return hmac.compare_digest(hmac.new(salt, host.encode(), hashlib.sha1).digest(), want)


def _line_names_host(names_field: str, hosts: Iterable[str]) -> bool:
    hosts = list(hosts)
    for pattern in names_field.split(","):
        if pattern.startswith("|"):
            if any(_hashed_match(pattern, h) for h in hosts):
                return True
        elif pattern in hosts:
            return True
    return False


def _split_known_hosts_line(line: str) -> tuple[str, str, str] | None:
    """(names, type, blob) of a plain known_hosts line; None for comments, blank lines
    and marker lines (@cert-authority, @revoked)."""
    text = line.strip()
    if not text or text.startswith("#") or text.startswith("@"):
        return None
    parts = text.split()
    if len(parts) < 3:
        return None
    return parts[0], parts[1], parts[2]


def known_hosts_keys(path: Path, target: Target) -> list[HostKey]:
    """The keys ``path`` holds for the node (under its name or its address)."""
    return _keys_under(path, target.known_hosts_names)


def _keys_under(path: Path, hosts: Sequence[str]) -> list[HostKey]:
    """The keys of the lines of ``path`` that name any of ``hosts``."""
    if not path.is_file():
        return []
    keys: list[HostKey] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = _split_known_hosts_line(line)
        if parts and _line_names_host(parts[0], hosts):
            try:
                key = HostKey.parse(parts[1], parts[2])
            except ValueError:
                continue  # a line ssh could not use either
            if key not in keys:
                keys.append(key)
    return keys


def host_keys_json_path(inventory) -> Path:
    return state.cluster_state_dir(inventory.cluster_name) / provisioned.HOST_KEYS_FILE


def host_keys_json(inventory) -> dict[str, list[HostKey]]:
    """The cluster's host_keys.json as keys per node; empty when there is none yet.
    A line that is not a public key is passed over."""
    recorded = provisioned.read_host_keys(state.cluster_state_dir(inventory.cluster_name))
    out: dict[str, list[HostKey]] = {}
    for node, lines in recorded.items():
        keys = []
        for text in lines:
            parts = text.split()
            try:
                keys.append(HostKey.parse(parts[0], parts[1]))
            except (ValueError, IndexError):
                continue
        out[node] = keys
    return out


# --------------------------------------------------------------------------- expected

@dataclass(frozen=True)
class Expected:
    """One fingerprint given in advance for a node, and where it was written."""

    node: str
    fingerprint: str
    kind: str | None   # ED25519, RSA... when the line says it
    where: str         # "FILE:LINE"


def _names_in(comment: str) -> set[str]:
    """The host names a fingerprint line's comment holds: ``gpu01,10.0.0.11``,
    ``[10.0.0.11]:2222``, ``root@gpu01``."""
    out: set[str] = set()
    for word in comment.split():
        for part in word.split(","):
            part = part.split("@")[-1]
            m = re.fullmatch(r"\[(.+)\]:\d+", part)
            out.add(m.group(1) if m else part)
    return out


def parse_expected(text: str, nodes: Sequence[Target], source: str) -> dict[str, list[Expected]]:
    """The fingerprints of an expect file, per node name. Lines are ``NODE SHA256:...``
    (NODE: a node's name or address) or what ``ssh-keygen -l`` prints
    (``256 SHA256:... COMMENT (ED25519)``, where the comment names the node: its name or
    address, ``user@name`` or ``[address]:port``). Blank lines and ``#`` comments are
    skipped. Raises InputError naming the line of anything else."""
    by_name: dict[str, str] = {}
    for t in nodes:
        by_name[t.name] = t.name
        by_name.setdefault(t.address, t.name)
    out: dict[str, list[Expected]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{source}:{number}"
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        kind = None
        if len(words) >= 2 and words[1].startswith(("SHA256:", "MD5:")) and words[0].isdigit():
            fingerprint = words[1]
            rest = words[2:]
            if rest and re.fullmatch(r"\(([A-Z0-9-]+)\)", rest[-1]):
                kind = rest[-1][1:-1]
                rest = rest[:-1]
            names = [by_name[n] for n in _names_in(" ".join(rest)) if n in by_name]
            if not names:
                raise InputError(f"{line!r} names no node of the inventory in its comment",
                                 file=where, hint="write it as 'NODE SHA256:...'")
        elif len(words) >= 2 and words[1].startswith(("SHA256:", "MD5:")):
            if words[0] not in by_name:
                # A node outside this scan: its line is not needed now.
                continue
            names = [by_name[words[0]]]
            fingerprint = words[1]
            if len(words) > 2 and re.fullmatch(r"\(([A-Z0-9-]+)\)", words[-1]):
                kind = words[-1][1:-1]
        else:
            raise InputError(f"{line!r} is neither 'NODE SHA256:...' nor a line of "
                             "`ssh-keygen -l`", file=where)
        if not _FINGERPRINT.fullmatch(fingerprint):
            raise InputError(f"{fingerprint!r} is not a SHA256 fingerprint", file=where,
                             hint="MD5 fingerprints are not accepted: ask for "
                                  "`ssh-keygen -l -E sha256 -f KEY`")
        for name in sorted(set(names)):
            out.setdefault(name, []).append(Expected(name, fingerprint, kind, where))
    return out


def read_expected(path: Path, nodes: Sequence[Target]) -> dict[str, list[Expected]]:
    """parse_expected() of a file; every node of ``nodes`` must have a line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read it: {exc.strerror or exc}", file=str(path),
                         field="--expect") from None
    expected = parse_expected(text, nodes, str(path))
    missing = [t.name for t in nodes if t.name not in expected]
    if missing:
        raise InputError(f"no expected fingerprint for {', '.join(missing)}", file=str(path),
                         field="--expect",
                         hint="add a line 'NODE SHA256:...' per node, as its console shows "
                              "`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`")
    return expected


# --------------------------------------------------------------------------- plan

@dataclass
class Refusal:
    """Why a node's keys are refused: the fingerprints on both sides."""

    node: str
    reason: str


@dataclass
class Plan:
    """Scan results against the records: what is already pinned, what may be added."""

    known_hosts: Path
    known: list[tuple[Target, HostKey]] = field(default_factory=list)
    new: list[tuple[Target, HostKey]] = field(default_factory=list)
    # Keys left out because --expect did not vouch for them.
    unvouched: list[tuple[Target, HostKey]] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    unreachable: list[NodeScan] = field(default_factory=list)
    replaced: list[Target] = field(default_factory=list)
    # Pinned keys of nodes at a new address (the same key, pinned under the node's name
    # and its old address only): written again under the name and the new address, the
    # old address's lines dropped. No confirmation: the key itself is already trusted.
    moved: list[tuple[Target, HostKey]] = field(default_factory=list)
    # The known_hosts names of where the record of provisioned nodes has each node
    # (dsk_provision.provisioned): {node: [name, address]}, ``[h]:port`` off port 22. A
    # node that moved was there: its keys' lines naming these go, hashed ones too.
    recorded_names: dict[str, list[str]] = field(default_factory=dict)


def _describe(keys: Iterable[HostKey]) -> str:
    return ", ".join(f"{k.fingerprint} ({k.kind})" for k in keys) or "none"


def compare(offered: list[HostKey], recorded: list[HostKey]) -> str | None:
    """Why ``offered`` contradicts ``recorded`` (None: it does not). A recorded key type
    that the node now offers with another key, or a node that offers none of its
    recorded keys, has changed its host key."""
    if not recorded:
        return None
    for key in offered:
        same_type = [k for k in recorded if k.type == key.type]
        if same_type and key not in same_type:
            return f"recorded {_describe(same_type)}, offered now {key.fingerprint} " \
                   f"({key.kind})"
    if not set(offered) & set(recorded):
        return f"recorded {_describe(recorded)}, offered now {_describe(offered)}"
    return None


def plan(scans: Sequence[NodeScan], known_hosts: Path, *,
         recorded_json: dict[str, list[HostKey]] | None = None,
         recorded_json_file: str = provisioned.HOST_KEYS_FILE,
         expected: dict[str, list[Expected]] | None = None,
         replace: Iterable[str] = (),
         recorded_at: dict[str, Target] | None = None) -> Plan:
    """Compare each node's offered keys with the known_hosts file, host_keys.json and the
    expected fingerprints. ``replace``: nodes whose recorded keys are to be replaced (a
    reinstalled node); their new keys still need confirmation or an expected match.
    ``recorded_at``: where the record of provisioned nodes has them (the address and
    port each was brought in at), kept as ``recorded_names``."""
    replace = set(replace)
    out = Plan(known_hosts=known_hosts)
    for s in scans:
        t = s.target
        if s.error is not None:
            out.unreachable.append(s)
            continue
        if t.name in (recorded_at or {}):
            out.recorded_names[t.name] = recorded_at[t.name].known_hosts_names
        if t.name in replace:
            out.replaced.append(t)
        else:
            sources = ((str(known_hosts), known_hosts_keys(known_hosts, t)),
                       (recorded_json_file, (recorded_json or {}).get(t.name, [])))
            changed = [(where, why) for where, keys in sources
                       if (why := compare(s.keys, keys))]
            if changed:
                where, why = changed[0]
                out.refused.append(Refusal(t.name, f"{t.name} ({t.address} port {t.port}): "
                                                   f"host key changed: {why} [{where}]"))
                continue
        recorded = [] if t.name in replace else known_hosts_keys(known_hosts, t)
        if expected is not None:
            wanted = expected.get(t.name, [])
            offered = {k.fingerprint: k for k in s.keys}
            missing = [e for e in wanted if e.fingerprint not in offered]
            if missing:
                e = missing[0]
                same = [k for k in s.keys if e.kind is None or k.kind == e.kind]
                out.refused.append(Refusal(t.name, f"{t.name} ({t.address} port {t.port}): "
                                                   f"expected {e.fingerprint}"
                                                   f"{f' ({e.kind})' if e.kind else ''} "
                                                   f"[{e.where}], offered "
                                                   f"{_describe(same or s.keys)}"))
                continue
            vouched = {e.fingerprint for e in wanted}
            for key in s.keys:
                if key in recorded:
                    out.known.append((t, key))
                elif key.fingerprint in vouched:
                    out.new.append((t, key))
                else:
                    out.unvouched.append((t, key))
        else:
            for key in s.keys:
                (out.known if key in recorded else out.new).append((t, key))
        if t.name not in replace and t.address != t.name:
            here = _keys_under(known_hosts, [t.host_field(t.address)])
            pinned = [(tt, k) for tt, k in out.known if tt is t]
            if any(k not in here for _, k in pinned):
                out.moved.extend(pinned)
    return out


# --------------------------------------------------------------------------- record

def known_hosts_lines(pairs: Iterable[tuple[Target, HostKey]]) -> list[str]:
    return [f"{','.join(t.known_hosts_names)} {k.line}" for t, k in pairs]


def record(p: Plan, *, state_file: Path | None = None) -> Path:
    """Write the plan's new keys into its known_hosts file (whole, atomically, mode kept,
    0644 for a new file), after dropping the lines of replaced nodes and the old lines of
    moved ones (a moved node's keys, and a replaced node's keys pinned so far, leave its
    old address too, hashed lines included: _without_old_addresses); a replaced node's
    entry also leaves ``state_file`` (host_keys.json), so the next run records the keys
    it then sees over the pinned connection."""
    if p.refused:
        raise AssertionError("a plan with refused keys is never recorded")
    path = p.known_hosts
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    lines = old.splitlines()
    # The keys pinned so far for replaced nodes go from their old addresses too.
    leaving = [(t, k) for t in p.replaced for k in known_hosts_keys(path, t)]
    if p.moved or leaving:
        lines = _without_old_addresses(lines, p.moved + leaving, p.recorded_names)
    if p.replaced:
        names = [n for t in p.replaced for n in t.known_hosts_names]
        lines = [ln for ln in lines
                 if not ((parts := _split_known_hosts_line(ln))
                         and _line_names_host(parts[0], names))]
    lines += known_hosts_lines(p.moved) + known_hosts_lines(p.new)
    mode = (path.stat().st_mode & 0o777) if path.is_file() else 0o644
    write_file(path, "".join(f"{ln}\n" for ln in lines), mode, dir_mode=0o700)
    if p.replaced and state_file is not None and state_file.is_file():
        data = json.loads(state_file.read_text(encoding="utf-8"))
        for t in p.replaced:
            data.pop(t.name, None)
        write_file(state_file, json.dumps(data, indent=4, sort_keys=True) + "\n",
                   state_file.stat().st_mode & 0o777)
    return path


def _without_old_addresses(lines: list[str], moved: list[tuple[Target, HostKey]],
                           recorded_names: dict[str, list[str]]) -> list[str]:
    """``lines`` less those that pin a moved node's keys under its name, under the other
    names its plain lines carry, or under the names ``recorded_names`` has for it (where
    the record of provisioned nodes has it: its old address, ``[address]:port`` off port
    22), for it to be written again under its name and new address. A hashed line
    (``|1|salt|hash``) names its host by a hash: it goes when the hash is of one of those
    names. Lines of other keys, and lines naming other hosts only, stay as they are. (A
    hashed line naming only an old address that neither the record nor a plain line
    gives stays.)"""
    by_name = {t.name: t for t, _ in moved}
    keys = {name: {k for t, k in moved if t.name == name} for name in by_name}
    old_names = {name: {t.host_field(name), *recorded_names.get(name, ())}
                 for name, t in by_name.items()}
    for ln in lines:
        parts = _split_known_hosts_line(ln)
        for name, t in by_name.items():
            if parts and _line_names_host(parts[0], [t.host_field(name)]):
                old_names[name] |= {n for n in parts[0].split(",") if not n.startswith("|")}

    def stale(ln: str) -> bool:
        parts = _split_known_hosts_line(ln)
        try:
            key = parts and HostKey.parse(parts[1], parts[2])
        except ValueError:
            return False
        return bool(key) and any(key in keys[name]
                                 and _line_names_host(parts[0], sorted(old_names[name]))
                                 for name in by_name)

    return [ln for ln in lines if not stale(ln)]


def trust(inventory, names: Sequence[str] | None = None, *, expect: Path | None = None,
          confirm: Callable[[Plan], bool] | None = None, replace: Sequence[str] = (),
          timeout: int = SCAN_TIMEOUT_S, show: Callable[[Plan], None] | None = None) -> Plan:
    """Scan the nodes, compare, and record their new keys when they match ``expect`` or
    ``confirm(plan)`` says yes. The one path by which a host key becomes trusted.

    Raises HostKeyMismatch (a key differs from the recorded or expected one; nothing
    written), NotConfirmed (new keys, no ``expect``, and ``confirm`` missing or no),
    RunFailed (some nodes did not answer; the others' keys were handled first)."""
    nodes = targets(inventory, names)
    unknown = set(replace) - {t.name for t in nodes}
    if unknown:
        raise InputError(f"--replace names {', '.join(sorted(unknown))}, which is not among "
                         "the nodes scanned", field="--replace")
    path = known_hosts_path(inventory)
    # host_keys.json is this inventory's only if the state directory is (as `check` says).
    directory = state.claim_cluster_state_dir(inventory.cluster_name, inventory.hosts_file,
                                              create=False)
    expected = read_expected(expect, nodes) if expect is not None else None
    recorded_at = {name: Target(name, e.address, e.port)
                   for name, e in (provisioned.load_record(directory) or {}).items()}
    scans = scan(nodes, timeout=timeout)
    p = plan(scans, path, recorded_json=host_keys_json(inventory),
             recorded_json_file=str(host_keys_json_path(inventory)), expected=expected,
             replace=replace, recorded_at=recorded_at)
    if show is not None:
        show(p)
    if p.refused:
        raise HostKeyMismatch(
            "refused, nothing written:\n" + "\n".join(f"  {r.reason}" for r in p.refused),
            hint="if the node was reinstalled, check its new fingerprint on its console and "
                 "rerun with --replace NODE (and --expect); otherwise do not connect: "
                 "something else answers at its address")
    if p.new or p.replaced:
        if expect is None and (confirm is None or not confirm(p)):
            raise NotConfirmed(
                f"{len(p.new)} new host key(s) not confirmed: nothing written to {path}",
                hint="compare the fingerprints with the nodes' consoles and answer y, or "
                     "pass --expect FILE with the fingerprints they show")
    if p.new or p.replaced or p.moved:
        record(p, state_file=host_keys_json_path(inventory) if p.replaced else None)
    if p.unreachable:
        raise RunFailed("no host key from " + "; ".join(
            f"{s.target.name} ({s.error})" for s in p.unreachable),
            nodes=[s.target.name for s in p.unreachable],
            hint="check that the node is up and its sshd listens on that address and port")
    return p



__all__ = ["HostKey", "HostKeyMismatch", "NodeScan", "NotConfirmed", "Plan", "Target",
           "known_hosts_path", "parse_expected", "parse_keyscan", "plan", "read_expected",
           "record", "scan", "targets", "trust"]
