"""Load and validate an inventory: JSON Schema first, then semantic rules. No connection is made.

An inventory is plain Ansible YAML: a file (``hosts.yml``) or a directory holding one, plus
optional ``group_vars/<group>.yml`` and ``host_vars/<host>.yml`` (or directories of such
files) next to it. Ansible reads those too, so they are validated the same way and merged
into each node's variables in Ansible's order. The cluster's nodes are the hosts of the
group ``nodes``, in file order; that order is the node-rank order.

No string anywhere may hold a control character; dsk_* and connection values may hold no
Jinja2 template (Ansible would evaluate it on the control node); ssh arguments are judged
by dsk_provision.ssh_options.

Every problem found is reported at once, each with its file and dotted field path.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import re
import stat
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from dsk_provision import defaults, ssh_options
from dsk_provision.addresses import host_port
from dsk_provision.errors import InputError

PACKAGE_DIR = Path(__file__).resolve().parent
SCHEMA_PATH = PACKAGE_DIR / "schemas" / "inventory.schema.json"
# The hardware profiles of `validate` (dsk_profile names one of them).
PROFILES_DIR = PACKAGE_DIR / "validation" / "profiles"
REPO_ROLES_DIR = PACKAGE_DIR.parent / "roles"

NODES_GROUP = "nodes"
HOSTS_FILENAMES = ("hosts.yml", "hosts.yaml")
DEFAULT_SSH_PORT = 22
GROUP_KEYS = ("hosts", "vars", "children")

# Variables this tool reads, plus the Ansible connection variables people commonly set.
# Unknown keys are allowed (roles have their own knobs); an unknown key that is a near
# miss of one of these is reported as a typo.
DSK_VARS = (
    "dsk_cluster_name", "dsk_profile", "dsk_gpus_per_node", "dsk_gpus", "dsk_root",
    "dsk_python", "dsk_rdzv_port", "dsk_socket_ifname", "dsk_nccl_env", "dsk_mirror_url",
    "dsk_mirror_key_fingerprint", "dsk_thresholds", "dsk_cordoned", "dsk_launcher",
    "dsk_slurm_enabled", "dsk_slurm_controller", "dsk_checkpoint_dir",
)
ANSIBLE_VARS = (
    "ansible_host", "ansible_port", "ansible_user", "ansible_connection",
    "ansible_ssh_private_key_file", "ansible_private_key_file", "ansible_ssh_common_args",
    "ansible_ssh_extra_args", "ansible_sftp_extra_args", "ansible_scp_extra_args",
    "ansible_ssh_args", "ansible_ssh_executable", "ansible_ssh_pipelining", "ansible_pipelining",
    "ansible_ssh_host", "ansible_ssh_port", "ansible_ssh_user", "ansible_ssh_pass",
    "ansible_password", "ansible_python_interpreter", "ansible_become", "ansible_become_user",
    "ansible_become_method", "ansible_become_password", "ansible_become_pass",
    "ansible_become_exe", "ansible_become_flags", "ansible_shell_type",
    "ansible_shell_executable", "ansible_timeout", "ansible_ssh_timeout",
    "ansible_host_key_checking", "ansible_ssh_host_key_checking", "ansible_control_path_dir",
    "ansible_control_path", "ansible_remote_tmp",
)

# Used with fullmatch: '$' alone would also match before a final newline.
_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_NUMERIC_DOTTED = re.compile(r"[0-9.]+")
# Any C0/C1 control character, DEL included: a newline in a value can add lines to the
# files the roles write from it (a second apt source from dsk_mirror_url).
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TEMPLATE = re.compile(r"\{[{%#]")
# Values Ansible must take literally: the tool reads them itself (dsk_*) or they say how
# to reach a node; a template there would run on the control node under Ansible only.
_LITERAL_VARS = ("ansible_host", "ansible_user", "ansible_port", "ansible_connection",
                 "ansible_private_key_file", "ansible_host_key_checking",
                 "ssh_trust_key_dir")
_LITERAL_PREFIXES = ("dsk_", "ansible_ssh_")
_PATTERN_ADVICE = {
    "dsk_cluster_name": "use lowercase letters, digits and '-', starting with a letter or "
                        "digit, at most 63 characters (e.g. 'prod-a')",
    "dsk_profile": "use the name of a file under dsk_provision/validation/profiles/ without "
                   "'.yml'",
    "dsk_root": "use an absolute path such as /opt/dsk",
    "dsk_python": "use an absolute path to the interpreter, e.g. /opt/dsk/venv/bin/python",
    "dsk_socket_ifname": "use a network interface name such as eth0 or ens1f0",
    "dsk_mirror_url": "use an http://, https:// or file:// URL",
    "dsk_mirror_key_fingerprint": "use the 40 hex digits `dsk-provision mirror serve` prints, "
                                  "without spaces",
    "ansible_user": "use a Unix user name such as root or ubuntu",
}


@dataclass(frozen=True)
class NodeSettings:
    """The settings of a node that the control node acts on, with their defaults applied
    (roles/dsk_defaults, read through dsk_provision.defaults). The schema has checked
    their types; nothing here re-validates."""

    root: PurePosixPath       # dsk_root: the trainer, its configs and runs live under it
    python: str               # dsk_python: the trainer environment's interpreter
    rdzv_port: int            # dsk_rdzv_port: torchrun's c10d rendezvous (first node)
    socket_ifname: str | None  # dsk_socket_ifname; None: let the libraries choose
    # Every NCCL_* variable of every rank, as the nccl role writes /etc/nccl.conf:
    # NCCL_SOCKET_IFNAME from socket_ifname, then dsk_nccl_env over it.
    nccl_env: dict[str, str]
    # dsk_checkpoint_dir: where jobs keep their checkpoints (a file system that every node
    # mounts at this path); None: in each job's directory, on the node's own disk.
    checkpoint_root: PurePosixPath | None = None

    def run_dir(self, run_id: str) -> PurePosixPath:
        """Where a run's files live on the node: {dsk_root}/runs/<run-id>."""
        return self.root / "runs" / run_id

    def job_dir(self, name: str) -> PurePosixPath:
        """A named job's directory on the node: {dsk_root}/jobs/<name>."""
        return self.root / "jobs" / name

    def checkpoint_dir(self, name: str) -> PurePosixPath:
        """Where a named job's checkpoints live on the node: <dsk_checkpoint_dir>/<name>,
        or <job dir>/checkpoints."""
        if self.checkpoint_root is None:
            return self.job_dir(name) / "checkpoints"
        return self.checkpoint_root / name


def full_nccl_env(socket_ifname: str | None, nccl_env: dict | None) -> dict[str, str]:
    """NCCL_SOCKET_IFNAME derived from the socket interface, the explicit settings over it;
    the same rule as dsk_nccl_env_full in roles/dsk_defaults/defaults/main.yml."""
    env = {"NCCL_SOCKET_IFNAME": socket_ifname} if socket_ifname else {}
    env.update({str(k): str(v) for k, v in (nccl_env or {}).items()})
    return env


def node_settings(values: dict[str, Any]) -> NodeSettings:
    """A node's settings from its merged inventory variables and the cluster defaults."""
    ifname = defaults.resolve("dsk_socket_ifname", values)
    ifname = str(ifname) if ifname else None
    return NodeSettings(
        root=PurePosixPath(str(defaults.resolve("dsk_root", values))),
        python=str(defaults.resolve("dsk_python", values)),
        rdzv_port=int(defaults.resolve("dsk_rdzv_port", values)),
        socket_ifname=ifname,
        nccl_env=full_nccl_env(ifname, defaults.resolve("dsk_nccl_env", values)),
        checkpoint_root=PurePosixPath(str(ckpt)) if (
            ckpt := defaults.resolve("dsk_checkpoint_dir", values)) else None)


@dataclass(frozen=True)
class Node:
    """One cluster node. ``vars`` are its host variables merged over group and all vars;
    ``settings`` are the typed settings computed from them once."""

    name: str
    address: str
    port: int
    user: str | None
    gpus: int
    vars: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    settings: NodeSettings = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", node_settings(self.vars or {}))

    @property
    def cordoned(self) -> str | None:
        """Why the node is cordoned (dsk_cordoned), or None when it is in service."""
        value = defaults.resolve("dsk_cordoned", self.vars or {})
        if value is True:
            return "cordoned"
        return str(value) if value else None


@dataclass
class Inventory:
    path: Path
    nodes: list[Node]
    vars: dict[str, Any]
    hosts_file: Path

    @property
    def first_node(self) -> Node:
        """The node of rank 0: it hosts the torchrun rendezvous."""
        return self.nodes[0]

    @property
    def ansible_inventory_path(self) -> Path:
        """What to hand to Ansible (-i): the hosts file; Ansible finds group_vars/ beside it."""
        return self.hosts_file

    @property
    def cluster_name(self) -> str:
        return str(defaults.resolve("dsk_cluster_name", self.vars))

    @property
    def profile(self) -> str | None:
        return self.vars.get("dsk_profile")

    @property
    def total_gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def active_nodes(self) -> list[Node]:
        """The nodes in service, in rank order: every node that is not cordoned."""
        return [n for n in self.nodes if n.cordoned is None]

    def in_service(self) -> Inventory:
        """This inventory without its cordoned nodes: what `train` and the cluster-wide
        benchmarks run on (the first node in service hosts the rendezvous)."""
        active = self.active_nodes
        if not active:
            raise InputError("every node is cordoned: nothing is left to run on",
                             file=str(self.hosts_file), field="dsk_cordoned",
                             hint="uncordon a node: dsk-provision nodes uncordon -i "
                                  f"{self.path} NAME")
        return self if len(active) == len(self.nodes) else dataclasses.replace(
            self, nodes=active)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise InputError(f"no node named {name!r} in the inventory "
                         f"(nodes: {', '.join(n.name for n in self.nodes)})",
                         file=str(self.path), field=f"all.children.{NODES_GROUP}.hosts")


@dataclass
class Problem:
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


class _Problems:
    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, file: Path | str, field_path: str, message: str) -> None:
        self.items.append(Problem(str(file), field_path, message))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            p = self.items[0]
            raise InputError(p.message, file=p.file, field=p.field)
        lines = [f"{len(self.items)} problems in the inventory:"]
        lines += [f"  - {p}" for p in self.items]
        err = InputError("\n".join(lines))
        err.file, err.field = self.items[0].file, self.items[0].field
        err.problems = list(self.items)
        raise err


# --------------------------------------------------------------------------- YAML reading

@dataclass
class _YamlDoc:
    file: Path
    data: Any
    lines: dict[tuple, int]  # dotted path (as a tuple) -> 1-based line of its key


def _dotted(path: tuple | list) -> str:
    return ".".join(str(p) for p in path)


def _walk_nodes(node: yaml.Node, path: tuple, lines: dict, dups: list) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                dups.append((path + (key,), line, seen[key]))
            else:
                seen[key] = line
            lines[path + (key,)] = line
            _walk_nodes(value_node, path + (key,), lines, dups)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk_nodes(item, path + (i,), lines, dups)


def _read_yaml(file: Path, problems: _Problems, *, top_field: str,
               text: str | None = None) -> _YamlDoc | None:
    """Parse one YAML file (or ``text``, as if it were that file's content); syntax errors
    and duplicate keys become problems."""
    try:
        if text is None:
            text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        problems.add(file, top_field, f"is not UTF-8 text ({exc.reason}); save it as UTF-8")
        return None
    except OSError as exc:
        problems.add(file, top_field, f"cannot be read: {exc.strerror}")
        return None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "syntax"
        what = exc.problem or exc.context or "invalid YAML"
        problems.add(file, where, f"YAML syntax error: {what}; fix the indentation or quoting "
                                  "there (values with ':' or '#' need quotes)")
        return None
    except yaml.YAMLError as exc:
        problems.add(file, "syntax", f"YAML error: {exc}")
        return None
    lines: dict[tuple, int] = {}
    dups: list = []
    if root is not None:
        _walk_nodes(root, (), lines, dups)
    for path, line, first in dups:
        problems.add(file, _dotted(path),
                     f"is written twice (lines {first} and {line}); YAML keeps only the last "
                     "one: remove or rename one of them")
    _control_char_problems(file, data, (), lines, problems)
    return _YamlDoc(file, data, lines)


def _control_char_problems(file: Path, value: Any, path: tuple, lines: dict,
                           problems: _Problems) -> None:
    """Every key and string holding a control character (newline, tab, escape ...)."""
    def report(where: tuple, text: str, what: str) -> None:
        line = lines.get(where)
        at = f" (line {line})" if line else ""
        char = _CONTROL_CHAR.search(text).group()
        shown = repr(text) if len(text) <= 60 else repr(text[:57]) + "..."
        problems.add(file, _dotted(where) or "(top level)",
                     f"{what} {shown} holds the control character {char!r}{at}: "
                     "write it on one line, without control characters")

    if isinstance(value, str):
        if _CONTROL_CHAR.search(value):
            report(path, value, "the value")
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _CONTROL_CHAR.search(key):
                report(path + (key,), key, "the name")
            _control_char_problems(file, item, path + (key,), lines, problems)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _control_char_problems(file, item, path + (i,), lines, problems)


# --------------------------------------------------------------------------- schema

@lru_cache(maxsize=1)
def _schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def nccl_name_pattern() -> str:
    """The rule for NCCL setting names (dsk_nccl_env keys), as the schema states it."""
    return _schema()["$defs"]["vars"]["properties"]["dsk_nccl_env"]["propertyNames"]["pattern"]


@lru_cache(maxsize=2)
def _validator(kind: str):
    import jsonschema

    schema = _schema()
    if kind == "vars":
        schema = {"$defs": schema["$defs"], "$ref": "#/$defs/vars"}
    return jsonschema.Draft202012Validator(schema)


_TYPE_WORDS = {"integer": "an integer", "string": "a string", "object": "a mapping",
               "boolean": "true or false", "array": "a list", "number": "a number"}


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _schema_problems(doc: _YamlDoc, kind: str, prefix: tuple, problems: _Problems) -> None:
    errors = sorted(_validator(kind).iter_errors(doc.data), key=lambda e: list(map(str, e.path)))
    for err in errors:
        path = prefix + tuple(err.absolute_path)
        name = str(path[-1]) if path else ""
        v = err.validator
        if v == "required":
            missing = [k for k in err.validator_value if k not in (err.instance or {})]
            for key in missing:
                problems.add(doc.file, _dotted(path + (key,)),
                             f"is missing; an inventory starts with '{key}:' "
                             f"(see inventory/example/hosts.yml)")
            continue
        if v == "additionalProperties":
            allowed = sorted((err.schema.get("properties") or {}).keys())
            for key in err.instance:
                if key in allowed:
                    continue
                msg = f"unknown key {key!r}"
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                if close:
                    msg += f": did you mean {close[0]!r}?"
                else:
                    msg += f"; allowed here: {', '.join(allowed)}"
                if not path:
                    msg += " (groups go under all.children)"
                problems.add(doc.file, _dotted(path + (key,)), msg)
            continue
        if v == "type":
            wanted = err.validator_value if isinstance(err.validator_value, list) \
                else [err.validator_value]
            want = " or ".join(_TYPE_WORDS.get(w, w) for w in wanted if w != "null")
            msg = f"must be {want}, found {_type_name(err.instance)}"
        elif v in ("minimum", "maximum"):
            sch = err.schema
            msg = (f"{err.instance} is out of range: use an integer from "
                   f"{sch.get('minimum')} to {sch.get('maximum')}")
        elif v == "pattern":
            msg = (f"{err.instance!r} is not valid: "
                   f"{_PATTERN_ADVICE.get(name, 'must match ' + err.validator_value)}")
        elif v == "enum":
            msg = (f"{err.instance!r} is not allowed: use one of "
                   f"{', '.join(map(str, err.validator_value))}")
        elif v == "minLength":
            msg = "must not be empty"
        else:
            msg = err.message
        line = doc.lines.get(tuple(err.absolute_path))
        if line:
            msg += f" (line {line})"
        problems.add(doc.file, _dotted(path) or "(top level)", msg)


# --------------------------------------------------------------------------- semantics

@lru_cache(maxsize=1)
def known_profiles() -> tuple[str, ...] | None:
    """Names of hardware profiles, or None while the profiles directory does not exist."""
    if not PROFILES_DIR.is_dir():
        return None
    return tuple(sorted(p.stem for p in PROFILES_DIR.glob("*.yml")))


@lru_cache(maxsize=1)
def known_variables() -> frozenset[str]:
    """Variables this tool knows: its own, Ansible's, and every role's defaults."""
    names = set(DSK_VARS) | set(ANSIBLE_VARS)
    if REPO_ROLES_DIR.is_dir():
        for defaults in REPO_ROLES_DIR.glob("*/defaults/main.y*ml"):
            try:
                data = yaml.safe_load(defaults.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(data, dict):
                names.update(str(k) for k in data)
    return frozenset(names)


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _check_address(address: Any) -> str | None:
    """Return a reason when ``address`` is not an IPv4/IPv6 address or a host name."""
    if not isinstance(address, str) or not address:
        return "must be an IP address or a host name"
    if ":" in address:
        try:
            ipaddress.IPv6Address(address.strip("[]"))
        except ValueError:
            return f"{address!r} is not a valid IPv6 address"
        return None
    if _NUMERIC_DOTTED.fullmatch(address):
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            return f"{address!r} is not a valid IPv4 address (four numbers 0-255)"
        return None
    if len(address) > 253 or not all(_HOSTNAME_LABEL.fullmatch(lbl)
                                     for lbl in address.rstrip(".").split(".")):
        return (f"{address!r} is not a valid host name (letters, digits and '-' between dots) "
                "or IP address")
    return None


def _canonical_address(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        return address.lower().rstrip(".")


def _templates(value: Any) -> list[str]:
    """The strings inside ``value`` that Jinja2 would treat as a template."""
    if isinstance(value, str):
        return [value] if _TEMPLATE.search(value) else []
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _templates(k) + _templates(v)]
    if isinstance(value, list):
        return [t for v in value for t in _templates(v)]
    return []


def _check_vars(file: Path, prefix: str, values: dict, problems: _Problems,
                known_hosts: tuple[str, ...], lines: dict | None = None,
                line_prefix: tuple = ()) -> None:
    """Rules that apply wherever variables are set: typos, profiles, templates, SSH safety,
    key files. ``known_hosts``: the cluster's declared known-hosts file(s)."""
    known = known_variables()

    def where_at(key: Any) -> tuple[str, str]:
        line = (lines or {}).get(line_prefix + (key,))
        return (f"{prefix}.{key}" if prefix else str(key)), (f" (line {line})" if line else "")

    for name, why in ssh_options.node_ssh_problems(values, known_hosts):
        where, at = where_at(name)
        problems.add(file, where, f"{why}{at}")
    for key, value in values.items():
        key_s = str(key)
        where, at = where_at(key)
        if key_s in _LITERAL_VARS or key_s.startswith(_LITERAL_PREFIXES):
            for text in _templates(value)[:1]:
                problems.add(file, where,
                             f"{text!r} is a Jinja2 template{at}: {key_s} must be a plain "
                             "value (Ansible would evaluate the template on the control "
                             "node); write the value itself")
        if key_s not in known:
            close = difflib.get_close_matches(key_s, sorted(known), n=1, cutoff=0.8)
            if close:
                problems.add(file, where, f"unknown key {key_s!r}: did you mean {close[0]!r}?{at}")
            continue
        if key_s == "dsk_profile" and isinstance(value, str):
            profiles = known_profiles()
            if profiles is not None and value not in profiles:
                problems.add(file, where,
                             f"unknown profile {value!r}{at}: use one of "
                             f"{', '.join(profiles) or '(none defined)'} "
                             f"(files in {PROFILES_DIR})")
        if key_s in ("ansible_ssh_private_key_file", "ansible_private_key_file") \
                and isinstance(value, str) and "{{" not in value:
            key_path = Path(value).expanduser()
            if not key_path.is_absolute():
                key_path = file.parent / key_path
            try:
                mode = key_path.stat().st_mode
            except OSError:
                continue
            if stat.S_IMODE(mode) & 0o077:
                problems.add(file, where,
                             f"private key {key_path} is readable by others "
                             f"(mode {stat.S_IMODE(mode):04o}){at}: run chmod 600 {key_path}")


@dataclass
class _HostEntry:
    name: str
    path: tuple          # dotted path to the host's key in hosts.yml
    hostvars: dict
    groups: list[str]    # group chain from `nodes` down to the host's own group


def _collect_hosts(group: dict, path: tuple, chain: list[str], out: list[_HostEntry],
                   depth: int = 0) -> None:
    if depth > 16:
        return
    for name, hostvars in _as_dict(group.get("hosts")).items():
        out.append(_HostEntry(str(name), path + ("hosts", name), _as_dict(hostvars), chain))
    for child, child_group in _as_dict(group.get("children")).items():
        _collect_hosts(_as_dict(child_group), path + ("children", child), chain + [str(child)],
                       out, depth + 1)


def _all_group_hosts(group: dict, path: tuple, out: dict[str, list], depth: int = 0) -> None:
    """Every host entry in the tree, by name: to spot conflicting definitions."""
    if depth > 16:
        return
    for name, hostvars in _as_dict(group.get("hosts")).items():
        out.setdefault(str(name), []).append((path + ("hosts", name), _as_dict(hostvars)))
    for child, child_group in _as_dict(group.get("children")).items():
        _all_group_hosts(_as_dict(child_group), path + ("children", child), out, depth + 1)


def _walk_groups(group: dict, path: tuple, depth: int = 0):
    """Yield (group name, dotted path, group mapping) for all and every child group."""
    yield (path[-1] if path else "all"), path, group
    if depth > 16:
        return
    for child, child_group in _as_dict(group.get("children")).items():
        yield from _walk_groups(_as_dict(child_group), path + ("children", child), depth + 1)


# --------------------------------------------------------------------------- loading

def _find_hosts_file(path: Path) -> Path:
    if not path.exists():
        raise InputError("inventory not found: give a hosts.yml file or a directory holding one",
                         file=str(path), field="-i/--inventory")
    if path.is_dir():
        for name in HOSTS_FILENAMES:
            if (path / name).is_file():
                return path / name
        raise InputError("directory has no hosts.yml: put the inventory in hosts.yml there "
                         "(see inventory/example/)", file=str(path), field="hosts.yml")
    return path


VARS_EXTENSIONS = (".yml", ".yaml", ".json")


def _dir_vars_files(directory: Path) -> list[Path]:
    """Files of a <name>/ directory, as Ansible reads them: sorted, recursive, no hidden or
    backup files, with a YAML/JSON extension or none."""
    found: list[Path] = []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry.name.endswith("~"):
            continue
        if entry.is_dir() and not entry.suffix:
            found += _dir_vars_files(entry)
        elif entry.is_file() and (not entry.suffix or entry.suffix in VARS_EXTENSIONS):
            found.append(entry)
    return found


def _vars_files(vars_dir: Path) -> list[tuple[str, Path]]:
    """(group or host, file) pairs of group_vars/ or host_vars/, as Ansible finds them: for
    each name the first of <name> (file or directory), <name>.yml, .yaml, .json."""
    if not vars_dir.is_dir():
        return []
    names = set()
    for entry in vars_dir.iterdir():
        if entry.name.startswith(".") or entry.name.endswith("~"):
            continue
        if entry.suffix in VARS_EXTENSIONS:
            names.add(entry.name[:-len(entry.suffix)])
        elif not entry.suffix:
            names.add(entry.name)
    found: list[tuple[str, Path]] = []
    for name in sorted(names):
        for ext in ("",) + VARS_EXTENSIONS:
            candidate = vars_dir / f"{name}{ext}"
            if candidate.is_dir():
                found += [(name, f) for f in _dir_vars_files(candidate)]
                break
            if candidate.is_file():
                found.append((name, candidate))
                break
    return found


def _read_vars_dir(vars_dir: Path, problems: _Problems) -> dict[str, list[_YamlDoc]]:
    """group_vars/ or host_vars/: the mappings read, by group or host, schema-checked."""
    docs: dict[str, list[_YamlDoc]] = {}
    for name, file in _vars_files(vars_dir):
        doc = _read_yaml(file, problems, top_field=name)
        if doc is None or doc.data is None:
            continue
        if not isinstance(doc.data, dict):
            problems.add(file, name, f"must be a mapping of variable names to values, "
                                     f"found {_type_name(doc.data)}")
            continue
        _schema_problems(doc, "vars", (), problems)
        docs.setdefault(name, []).append(doc)
    return docs


def _merged(docs: list[_YamlDoc]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for d in docs:
        merged.update(d.data)
    return merged


def load_inventory(path: str | Path, *, hosts_text: str | None = None) -> Inventory:
    """Load ``path`` (a hosts file or a directory), validate it, and return the cluster.

    ``hosts_text`` stands in for the hosts file's content: an edit is checked as the
    inventory it would make before anything is written (dsk_provision.inventory_edit).
    Raises InputError listing every problem found, each with its file and field.
    """
    given = Path(path)
    hosts_file = _find_hosts_file(given)
    problems = _Problems()

    doc = _read_yaml(hosts_file, problems, top_field="all", text=hosts_text)
    group_docs = _read_vars_dir(hosts_file.parent / "group_vars", problems)
    host_docs = _read_vars_dir(hosts_file.parent / "host_vars", problems)
    group_vars = {name: _merged(docs) for name, docs in group_docs.items()}
    host_vars = {name: _merged(docs) for name, docs in host_docs.items()}
    data = doc.data if doc is not None else None
    root = _as_dict(_as_dict(data).get("all"))
    # The cluster-wide variables: all.vars, then group_vars/all over them (Ansible's order).
    all_vars = dict(_as_dict(root.get("vars")))
    all_vars.update(group_vars.get("all", {}))
    known_hosts = ssh_options.declared_known_hosts(all_vars)

    for docs in list(group_docs.values()) + list(host_docs.values()):
        for d in docs:
            _check_vars(d.file, "", d.data, problems, known_hosts, d.lines)
    if doc is None:
        problems.raise_if_any()
        raise AssertionError("unreachable: a failed read always records a problem")

    if data is None:
        problems.add(hosts_file, "all", "the file is empty: an inventory needs "
                                        "all.children.nodes.hosts (see inventory/example/)")
        problems.raise_if_any()
    if not isinstance(data, dict):
        problems.add(hosts_file, "(top level)",
                     f"must be a mapping starting with 'all:', found {_type_name(data)}")
        problems.raise_if_any()

    _schema_problems(doc, "inventory", (), problems)
    every: dict[str, list] = {}
    _all_group_hosts(root, ("all",), every)
    for host, docs in host_docs.items():
        if host not in every:
            problems.add(docs[0].file, host,
                         f"host_vars for {host!r}, which is not a host of the inventory: "
                         "rename the file after the node or remove it")
    specs = _semantic_checks(doc, group_vars, host_vars, known_hosts, problems)
    problems.raise_if_any()
    # Built only now: a node's settings are computed from values that passed every check.
    nodes = [Node(**spec) for spec in specs]
    return Inventory(path=given, nodes=nodes, vars=all_vars, hosts_file=hosts_file)


def _semantic_checks(doc: _YamlDoc, group_vars: dict[str, dict], host_vars: dict[str, dict],
                     known_hosts: tuple[str, ...], problems: _Problems) -> list[dict]:
    file = doc.file
    root = _as_dict(_as_dict(doc.data).get("all"))

    for _name, gpath, group in _walk_groups(root, ("all",)):
        gvars = _as_dict(group.get("vars"))
        _check_vars(file, _dotted(gpath + ("vars",)), gvars, problems, known_hosts, doc.lines,
                    gpath + ("vars",))
        for host, hostvars in _as_dict(group.get("hosts")).items():
            _check_vars(file, _dotted(gpath + ("hosts", host)), _as_dict(hostvars), problems,
                        known_hosts, doc.lines, gpath + ("hosts", host))
    all_inline = _as_dict(root.get("vars"))
    if "dsk_gpus" in all_inline:
        problems.add(file, "all.vars.dsk_gpus",
                     "dsk_gpus is a per-host override; for every node use dsk_gpus_per_node")

    nodes_group = _as_dict(root.get("children")).get(NODES_GROUP, "missing")
    nodes_path = ("all", "children", NODES_GROUP)
    if nodes_group == "missing":
        problems.add(file, _dotted(nodes_path),
                     "no group 'nodes': list the cluster's machines under all.children.nodes.hosts")
        return []
    entries: list[_HostEntry] = []
    _collect_hosts(_as_dict(nodes_group), nodes_path, [NODES_GROUP], entries)
    if not entries:
        problems.add(file, _dotted(nodes_path + ("hosts",)),
                     "group 'nodes' has no hosts: add at least one node with its ansible_host")
        return []

    # A host name may appear in several groups (that is one host to Ansible), but two
    # differing definitions are ambiguous, and a node listed twice under `nodes` has no rank.
    every: dict[str, list] = {}
    _all_group_hosts(root, ("all",), every)
    for name, places in every.items():
        if [e.name for e in entries].count(name) > 1:
            continue  # reported below as listed twice
        defined = [(p, v) for p, v in places if v]
        if len(defined) > 1 and any(v != defined[0][1] for _, v in defined[1:]):
            problems.add(file, _dotted(defined[1][0]),
                         f"host {name!r} is also defined at {_dotted(defined[0][0])} with "
                         "different variables: define its variables in one place only")
    seen_in_nodes: dict[str, tuple] = {}
    unique: list[_HostEntry] = []
    for e in entries:
        if e.name in seen_in_nodes:
            problems.add(file, _dotted(e.path),
                         f"node {e.name!r} is listed twice under 'nodes' (first at "
                         f"{_dotted(seen_in_nodes[e.name])}): each node must appear once")
            continue
        seen_in_nodes[e.name] = e.path
        unique.append(e)

    # Every host must be a cluster node: the playbooks refuse others (boilerplate.yml).
    for name, places in every.items():
        if name not in seen_in_nodes:
            problems.add(file, _dotted(places[0][0]),
                         f"host {name!r} is not in group 'nodes': move it under "
                         "all.children.nodes.hosts or remove it")

    nodes: list[dict] = []  # Node fields, one mapping per node
    by_address: dict[tuple[str, int], str] = {}
    groups_by_name = {name: g for name, _p, g in _walk_groups(root, ("all",))}
    for e in unique:
        # Ansible's precedence: group vars of hosts.yml (all, then each group from the
        # outside in) < group_vars/all < group_vars/<group> < the host's vars in hosts.yml
        # < host_vars/<host>.
        merged: dict[str, Any] = dict(all_inline)
        for g in e.groups:
            merged.update(_as_dict(_as_dict(groups_by_name.get(g)).get("vars")))
        merged.update(group_vars.get("all", {}))
        for g in e.groups:
            merged.update(group_vars.get(g, {}))
        merged.update(e.hostvars)
        merged.update(host_vars.get(e.name, {}))
        hpath = _dotted(e.path)

        if not _NODE_NAME.fullmatch(e.name):
            problems.add(file, hpath, f"node name {e.name!r} is not usable: use letters, digits, "
                                      "'.', '-' or '_' (it names log files and ranks)")
        addr_key = "ansible_host" if "ansible_host" in merged else (
            "ansible_ssh_host" if "ansible_ssh_host" in merged else None)
        address = merged.get(addr_key) if addr_key else e.name
        reason = _check_address(address)
        if reason:
            if addr_key:
                problems.add(file, f"{hpath}.{addr_key}",
                             f"{reason}: set it to the node's IP address or DNS name")
            else:
                problems.add(file, f"{hpath}.ansible_host",
                             f"is missing and the host name is not an address ({reason}): "
                             "set ansible_host to the node's IP address or DNS name")
            address = None
        port = merged.get("ansible_port", merged.get("ansible_ssh_port", DEFAULT_SSH_PORT))
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            port = None  # the schema already reported it
        if address is not None and port is not None:
            key = (_canonical_address(str(address)), port)
            if key in by_address:
                problems.add(file, f"{hpath}.{addr_key or 'ansible_host'}",
                             f"{host_port(address, port)} is also the address of node "
                             f"{by_address[key]!r}: "
                             "every node needs its own address (or its own ansible_port)")
            else:
                by_address[key] = e.name

        gpus = merged.get("dsk_gpus", merged.get("dsk_gpus_per_node"))
        if gpus is None:
            problems.add(file, "all.vars.dsk_gpus_per_node",
                         f"GPU count of node {e.name!r} is unknown: set dsk_gpus_per_node in "
                         "all.vars (0 for CPU-only nodes) or dsk_gpus on the host")
            gpus = 0
        elif not isinstance(gpus, int) or isinstance(gpus, bool) or not 0 <= gpus <= 16:
            gpus = 0  # the schema already reported it
        user = merged.get("ansible_user", merged.get("ansible_ssh_user"))
        nodes.append(dict(name=e.name, address=str(address) if address else "",
                          port=port or DEFAULT_SSH_PORT,
                          user=str(user) if user is not None else None,
                          gpus=int(gpus), vars=merged))
    return nodes
