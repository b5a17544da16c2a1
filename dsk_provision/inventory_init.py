"""`dsk-provision init`: write a new, commented inventory from a list of hosts.

The hosts come from ``--hosts`` (addresses and IPv4 ranges such as ``10.0.0.11-10.0.0.18``
or ``10.0.0.11-18``, comma-separated; nodes are named ``<prefix>01``, ``<prefix>02``...)
or from a file of ``name address [port]`` lines. The result is ``hosts.yml`` and
``group_vars/all.yml`` in the style of inventory/example, checked the way ``check``
checks an inventory before a byte is written; an existing inventory is overwritten only
when asked (``force``).

With ``probe``, the nodes' host keys first go through dsk_provision.hostkeys (confirmed
or expected, never trusted silently), then one pinned SSH command per node reads its GPUs
(PCI bus; names from nvidia-smi or lspci when present), OS and network interfaces, and
the inventory is written with what was found: GPUs per node, the hardware profile whose
``gpu_model`` the GPUs' name holds, the socket interface, and a comment per node.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dsk_provision import hostkeys
from dsk_provision.errors import InputError, RunFailed
from dsk_provision.files import write_file
from dsk_provision.inventory import (
    DEFAULT_SSH_PORT,
    HOSTS_FILENAMES,
    PROFILES_DIR,
    known_profiles,
    load_inventory,
)

# The most hosts one --hosts range may expand to.
MAX_RANGE = 4096
DEFAULT_GPUS = 8
DEFAULT_PREFIX = "gpu"
DEFAULT_USER = "root"
DEFAULT_KEY = "~/.ssh/id_ed25519"
# Seconds one node's probe may take.
PROBE_TIMEOUT_S = 60

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_CLUSTER = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,40}")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


@dataclass(frozen=True)
class HostSpec:
    """A node to write: its name, the address Ansible connects to, its SSH port."""

    name: str
    address: str
    port: int = DEFAULT_SSH_PORT


# --------------------------------------------------------------------------- hosts

def _address(text: str, option: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if _HOSTNAME.fullmatch(text) and not re.fullmatch(r"[0-9.]+", text):
        return text
    raise InputError(f"{text!r} is neither an IP address nor a host name", field=option)


def expand_range(text: str, option: str = "--hosts") -> list[str]:
    """``10.0.0.11-10.0.0.18`` or ``10.0.0.11-18``: every IPv4 address from the first to
    the last, both included."""
    first, _, last = text.partition("-")
    try:
        start = ipaddress.IPv4Address(first)
    except ValueError:
        raise InputError(f"{text!r}: a range starts with an IPv4 address, not {first!r}",
                         field=option) from None
    try:
        if re.fullmatch(r"\d{1,3}", last):
            prefix = first.rsplit(".", 1)[0]
            end = ipaddress.IPv4Address(f"{prefix}.{last}")
        else:
            end = ipaddress.IPv4Address(last)
    except ValueError:
        raise InputError(f"{text!r}: {last!r} ends no IPv4 range (write 10.0.0.11-10.0.0.18 "
                         "or 10.0.0.11-18)", field=option) from None
    count = int(end) - int(start) + 1
    if count < 1:
        raise InputError(f"{text!r}: the range ends before it starts", field=option)
    if count > MAX_RANGE:
        raise InputError(f"{text!r} holds {count} addresses, more than {MAX_RANGE}",
                         field=option)
    return [str(ipaddress.IPv4Address(int(start) + i)) for i in range(count)]


def hosts_from_list(text: str, *, prefix: str = DEFAULT_PREFIX,
                    port: int = DEFAULT_SSH_PORT) -> list[HostSpec]:
    """``--hosts``: comma-separated addresses and ranges, named ``<prefix>NN`` in order."""
    if not _PREFIX.fullmatch(prefix):
        raise InputError(f"{prefix!r} cannot start a node name: use letters, digits, '.', "
                         "'_' or '-', starting with a letter", field="--prefix")
    addresses: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "-" in item and re.match(r"\d", item):
            addresses += expand_range(item)
        else:
            addresses.append(_address(item, "--hosts"))
    if not addresses:
        raise InputError("no host given: write addresses or ranges, e.g. "
                         "10.0.0.11,10.0.0.12 or 10.0.0.11-10.0.0.18", field="--hosts")
    width = max(2, len(str(len(addresses))))
    hosts = [HostSpec(f"{prefix}{i:0{width}d}", a, port)
             for i, a in enumerate(addresses, 1)]
    _no_duplicates(hosts, "--hosts")
    return hosts


def hosts_from_file(path: Path, *, port: int = DEFAULT_SSH_PORT) -> list[HostSpec]:
    """``--hosts-file``: ``name address [port]`` per line; ``#`` comments, blank lines."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read it: {getattr(exc, 'strerror', None) or exc}",
                         file=str(path), field="--hosts-file") from None
    hosts: list[HostSpec] = []
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{path}:{number}"
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) not in (2, 3):
            raise InputError(f"{raw.strip()!r} is not 'name address [port]'", file=where,
                             field="--hosts-file")
        name = words[0]
        if not _NAME.fullmatch(name):
            raise InputError(f"{name!r} is not a node name: letters, digits, '.', '_', '-', "
                             "starting with a letter or digit", file=where,
                             field="--hosts-file")
        node_port = port
        if len(words) == 3:
            if not words[2].isdigit() or not 1 <= int(words[2]) <= 65535:
                raise InputError(f"{words[2]!r} is not a port (1..65535)", file=where,
                                 field="--hosts-file")
            node_port = int(words[2])
        try:
            address = _address(words[1], "--hosts-file")
        except InputError as exc:
            raise InputError(exc.message.split(": ", 1)[-1], file=where,
                             field="--hosts-file") from None
        hosts.append(HostSpec(name, address, node_port))
    if not hosts:
        raise InputError("no host in it: write one 'name address' line per node",
                         file=str(path), field="--hosts-file")
    _no_duplicates(hosts, "--hosts-file", str(path))
    return hosts


def _no_duplicates(hosts: Sequence[HostSpec], option: str, file: str | None = None) -> None:
    for what, values in (("name", [h.name for h in hosts]),
                         ("address", [f"{h.address}:{h.port}" for h in hosts])):
        twice = sorted(v for v, n in Counter(values).items() if n > 1)
        if twice:
            raise InputError(f"the {what} {twice[0]} is given twice", file=file, field=option)


# --------------------------------------------------------------------------- probe

# One POSIX shell command per node; plain `key=value` lines back. No root needed.
PROBE_SCRIPT = r"""
if [ -r /etc/os-release ]; then . /etc/os-release; fi
echo "os=${PRETTY_NAME:-unknown}"
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor" 2>/dev/null)" = 0x10de ] || continue
  case "$(cut -c1-6 "$d/class" 2>/dev/null)" in
    0x0300|0x0302)
      echo "gpu=${d##*/} $(cat "$d/device" 2>/dev/null)"
      if command -v lspci >/dev/null 2>&1; then
        echo "gpu_lspci=$(lspci -s "${d##*/}" 2>/dev/null | cut -d: -f3-)"
      fi;;
  esac
done
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sed 's/^/gpu_name=/'
fi
if command -v ip >/dev/null 2>&1; then
  # The node's own network namespace (a container may see its host's /sys/class/net).
  ip -o link show 2>/dev/null | awk '{n = $2; sub(/:$/, "", n); sub(/@.*/, "", n);
    s = "unknown"; t = "";
    for (i = 3; i < NF; i++) { if ($i == "state") s = tolower($(i + 1));
                               if ($i ~ /^link\//) t = substr($i, 6) }
    if (t != "loopback") print "if=" n " " t " " s }'
  ip -o -4 addr show 2>/dev/null | while read -r _ n _ a _; do echo "inet=$n $a"; done
else
  for d in /sys/class/net/*; do
    n=${d##*/}
    [ "$n" = lo ] && continue
    case "$(cat "$d/type" 2>/dev/null)" in 1) t=ether;; 32) t=infiniband;; *) t=other;; esac
    echo "if=$n $t $(cat "$d/operstate" 2>/dev/null)"
  done
fi
"""

# What a comment may hold of a node's answers: they come from the node, so nothing that
# could end the comment or the line.
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9 .,:;/_()+@\[\]-]")
_LINK_TYPES = {"ether": "ethernet", "infiniband": "infiniband"}


def _clean(text: str, limit: int = 80) -> str:
    return _COMMENT_UNSAFE.sub("", text).strip()[:limit]


@dataclass
class NodeFacts:
    """What a node said about itself."""

    os: str = "unknown"
    gpu_count: int = 0
    gpu_model: str = ""
    # name -> (link type, operstate); name -> IPv4 addresses with prefix length
    interfaces: dict[str, tuple[str, str]] = field(default_factory=dict)
    addresses: dict[str, list[str]] = field(default_factory=dict)

    def interface_of(self, address: str) -> str | None:
        """The interface holding ``address`` (an IPv4 address), if any."""
        for name, cidrs in self.addresses.items():
            if any(c.split("/")[0] == address for c in cidrs):
                return name
        return None

    def summary(self) -> str:
        gpus = f"{self.gpu_count}x {self.gpu_model}" if self.gpu_count and self.gpu_model \
            else f"{self.gpu_count} GPUs"
        nets = []
        for name, (kind, state) in sorted(self.interfaces.items()):
            text = name + (f" {','.join(self.addresses[name])}" if self.addresses.get(name)
                           else "") + (f" ({kind})" if kind == "infiniband" else "")
            nets.append(text + ("" if state in ("up", "unknown") else f" {state}"))
        return _clean(f"{gpus}; {self.os}; {', '.join(nets) or 'no interface'}", 240)


def parse_probe(text: str) -> NodeFacts:
    """The probe's ``key=value`` lines as facts; unknown lines are ignored."""
    facts = NodeFacts()
    names: list[str] = []
    lspci: list[str] = []
    pci_ids: list[str] = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if key == "os":
            facts.os = _clean(value) or "unknown"
        elif key == "gpu":
            facts.gpu_count += 1
            pci_ids.append(value.split()[-1] if value.split() else "")
        elif key == "gpu_name" and value:
            names.append(value)
        elif key == "gpu_lspci" and value:
            lspci.append(value)
        elif key == "if":
            words = value.split()
            if words:
                kind = _LINK_TYPES.get(words[1] if len(words) > 1 else "", "other")
                facts.interfaces[_clean(words[0], 15)] = (kind, words[2] if len(words) > 2
                                                          else "unknown")
        elif key == "inet":
            words = value.split()
            if len(words) == 2:
                facts.addresses.setdefault(_clean(words[0], 15), []).append(_clean(words[1]))
    best = names or lspci
    if best:
        common = Counter(best).most_common(1)[0][0]
        facts.gpu_model = _clean(common)
    elif pci_ids:
        facts.gpu_model = _clean(f"NVIDIA device {Counter(pci_ids).most_common(1)[0][0]}")
    return facts


def probe(inventory, *, transport=None, timeout: int = PROBE_TIMEOUT_S) -> dict[str, NodeFacts]:
    """Every node's facts, read in parallel over the inventory's pinned SSH (or
    ``transport``). Raises RunFailed naming the nodes that did not answer."""
    from dsk_provision.remote import SshTransport

    transport = transport or SshTransport(inventory)

    def one(node):
        try:
            proc = subprocess.run(transport.argv(node, PROBE_SCRIPT), capture_output=True,
                                  text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return node.name, None, f"no answer within {timeout} s"
        if proc.returncode != 0:
            said = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            return node.name, None, said
        return node.name, parse_probe(proc.stdout), None

    with ThreadPoolExecutor(max_workers=min(32, len(inventory.nodes) or 1)) as pool:
        results = list(pool.map(one, inventory.nodes))
    failed = [(name, why) for name, _, why in results if why is not None]
    if failed:
        raise RunFailed("could not read " + "; ".join(f"{n} ({why})" for n, why in failed),
                        nodes=[n for n, _ in failed],
                        hint="check the user, the key and that the node's sshd accepts it "
                             "(the host key is pinned already: `dsk-provision hostkeys scan`)")
    return {name: facts for name, facts, _ in results}


def profile_for(model: str, gpus: int) -> str | None:
    """The hardware profile for nodes with ``gpus`` GPUs named ``model``: the CPU profile
    without GPUs, else the one profile whose ``gpu_model`` threshold ``model`` holds."""
    from dsk_provision.validation.profiles import CPU_PROFILE

    if gpus == 0:
        return CPU_PROFILE
    matches = []
    for name in known_profiles() or ():
        data = yaml.safe_load((PROFILES_DIR / f"{name}.yml").read_text()) or {}
        wanted = str((data.get("thresholds") or {}).get("gpu_model") or "")
        if wanted and wanted.lower() in model.lower():
            matches.append(name)
    return matches[0] if len(matches) == 1 else None


# --------------------------------------------------------------------------- render

@dataclass
class Settings:
    """The cluster-wide values of the new inventory."""

    cluster_name: str
    gpus_per_node: int = DEFAULT_GPUS
    profile: str | None = None
    user: str = DEFAULT_USER
    key: str = DEFAULT_KEY
    known_hosts: str = ""
    socket_ifname: str | None = None


_PLAIN = re.compile(r"[A-Za-z0-9._/~+-]+")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def _scalar(value: str) -> str:
    """A YAML scalar for ``value``: as written when that is safe, else quoted."""
    return value if _PLAIN.fullmatch(value) else yaml.safe_dump(
        value, default_style='"', width=10_000).strip()


def _flow(values: dict) -> str:
    return yaml.safe_dump(values, default_flow_style=True, width=10_000).strip()


def render_hosts(hosts: Sequence[HostSpec], settings: Settings, directory: Path,
                 facts: dict[str, NodeFacts] | None = None) -> str:
    lines = [
        "---",
        f"# Cluster {settings.cluster_name}: {len(hosts)} node(s), written by "
        "`dsk-provision init`" + (" from what the nodes said (--probe)." if facts else "."),
        "# The hosts of the group `nodes` are the cluster; their order is the node-rank order",
        "# and the first one hosts the torchrun rendezvous. Cluster-wide settings live in",
        "# group_vars/all.yml next to this file. A host may override them (ansible_port,",
        "# dsk_gpus, dsk_socket_ifname). Field reference: docs/inventory.md.",
        f"# Check it with:  dsk-provision check -i {directory}",
        f"# Add nodes with:  dsk-provision hostkeys scan -i {directory} NODE  (first contact)",
        "all:",
        "  children:",
        "    nodes:",
        "      hosts:",
    ]
    for h in hosts:
        values: dict = {"ansible_host": h.address}
        if h.port != DEFAULT_SSH_PORT:
            values["ansible_port"] = h.port
        comment = ""
        if facts and h.name in facts:
            f = facts[h.name]
            if f.gpu_count != settings.gpus_per_node:
                values["dsk_gpus"] = f.gpu_count
            ifname = f.interface_of(h.address)
            if ifname and ifname != settings.socket_ifname:
                values["dsk_socket_ifname"] = ifname
            comment = f"  # {f.summary()}"
        lines.append(f"        {h.name}: {_flow(values)}{comment}")
    return "\n".join(lines) + "\n"


def render_group_vars(settings: Settings, *, probed: bool = False) -> str:
    profiles = ", ".join(known_profiles() or ())
    gpus_note = "(read from the nodes)" if probed else "(0..16)"
    if settings.profile:
        profile = f"dsk_profile: {settings.profile}"
    else:
        profile = ("# Not chosen yet: `validate` needs one for GPU nodes. One of:\n"
                   f"# {profiles}.\n# dsk_profile: h100-sxm-8")
    ifname = (f"dsk_socket_ifname: {settings.socket_ifname}" if settings.socket_ifname
              else "# dsk_socket_ifname: eth0")
    return f"""---
# Cluster-wide settings for every node, written by `dsk-provision init`. The commented
# knobs keep their default, whose one home is roles/dsk_defaults/defaults/main.yml.
# Reference: docs/inventory.md.

# Name of the cluster: lowercase letters, digits and '-'. Shown in reports; names the
# cluster's state directory on the control node (its SSH key, the pinned host keys).
dsk_cluster_name: {settings.cluster_name}

# Hardware profile: thresholds used by `dsk-provision validate`
# (a file dsk_provision/validation/profiles/<name>.yml).
{profile}

# GPUs per node {gpus_note}. A host may override it with dsk_gpus.
dsk_gpus_per_node: {settings.gpus_per_node}

# Where the trainer, configs and training runs live on the nodes.
# dsk_root: default, see roles/dsk_defaults

# TCP port of the torchrun c10d rendezvous on the first node.
# dsk_rdzv_port: default, see roles/dsk_defaults

# Interface that carries the bootstrap traffic of torch.distributed
# (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME); unset: the libraries choose.
{ifname}

# Extra NCCL_* variables for every rank (keys must start with NCCL_), e.g.
# dsk_nccl_env:
#   NCCL_IB_HCA: mlx5

# Optional apt mirror for air-gapped clusters (`dsk-provision mirror serve` prints both).
# dsk_mirror_url: http://10.0.0.1:8080/apt/debian-12/
# dsk_mirror_key_fingerprint: 0123456789ABCDEF0123456789ABCDEF01234567

# How Ansible reaches the nodes. Host keys are pinned: `dsk-provision hostkeys scan`
# writes the nodes' keys into the known_hosts file below once you confirmed their
# fingerprints; keep StrictHostKeyChecking=yes.
ansible_user: {settings.user}
ansible_ssh_private_key_file: {_scalar(settings.key)}
ansible_ssh_common_args: >-
  -o UserKnownHostsFile={settings.known_hosts}
  -o StrictHostKeyChecking=yes
"""


# --------------------------------------------------------------------------- write

WRITTEN = ("hosts.yml", "group_vars/all.yml")
# Files Ansible would read beside the ones init writes.
_OTHERS = tuple(f"{n}" for n in HOSTS_FILENAMES if n != "hosts.yml") + (
    "group_vars/all.yaml", "group_vars/all")


def existing_files(directory: Path) -> list[Path]:
    """The inventory files already in ``directory`` (init's own and their variants)."""
    return [directory / n for n in WRITTEN + _OTHERS if (directory / n).exists()]


def _check_target(directory: Path, force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise InputError("is not a directory: init writes hosts.yml and group_vars/all.yml "
                         "into a directory", file=str(directory), field="--inventory")
    there = existing_files(directory)
    if there and not force:
        raise InputError(f"an inventory is already there ({', '.join(map(str, there))})",
                         file=str(directory), field="--inventory",
                         hint="choose another directory, or pass --force to replace it")
    others = [directory / n for n in _OTHERS if (directory / n).exists()]
    if others:
        raise InputError(f"{', '.join(map(str, others))} would stay beside the new files and "
                         "Ansible would read it too", file=str(directory), field="--inventory",
                         hint="move it away first")


@dataclass
class Result:
    directory: Path
    hosts_file: Path
    nodes: int
    settings: Settings
    facts: dict[str, NodeFacts] | None = None
    notes: list[str] = field(default_factory=list)


def _stage(directory: Path, hosts_text: str, vars_text: str, stage: Path):
    """Write the two files into ``stage`` and load them as the inventory they make."""
    (stage / "group_vars").mkdir(parents=True, exist_ok=True)
    (stage / "hosts.yml").write_text(hosts_text)
    (stage / "group_vars" / "all.yml").write_text(vars_text)
    try:
        inv = load_inventory(stage)
    except InputError as exc:
        # Name the file as it will be, not the staging copy.
        raise InputError(str(exc).replace(str(stage), str(directory))) from None
    # The inventory it will be: its state directory (host_keys.json) is the final file's.
    return dataclasses.replace(inv, path=directory, hosts_file=directory / "hosts.yml")


def init_inventory(directory: Path, hosts: Sequence[HostSpec], settings: Settings, *,
                   force: bool = False, probe_nodes: bool = False,
                   expect: Path | None = None,
                   confirm: Callable[[hostkeys.Plan], bool] | None = None,
                   show: Callable[[hostkeys.Plan], None] | None = None,
                   transport=None) -> Result:
    """Write the inventory into ``directory``; with ``probe_nodes`` pin the host keys
    (hostkeys.trust: ``expect`` or ``confirm``) and fill in what the nodes say.
    Nothing is written before every check passed (the known_hosts file excepted, once
    its keys were confirmed)."""
    from dsk_provision.state import claim_cluster_state_dir

    directory = Path(directory).expanduser().absolute()
    _check_target(directory, force)
    if not _CLUSTER.fullmatch(settings.cluster_name):
        raise InputError(f"{settings.cluster_name!r} is not a cluster name: lowercase "
                         "letters, digits and '-', starting with a letter or digit",
                         field="--name")
    if not 0 <= settings.gpus_per_node <= 16:
        raise InputError(f"{settings.gpus_per_node} is not a GPU count (0..16)", field="--gpus")
    if settings.profile is not None and settings.profile not in (known_profiles() or ()):
        raise InputError(f"unknown hardware profile {settings.profile!r}", field="--profile",
                         hint=f"choose one of: {', '.join(known_profiles() or ())}")
    if not _USER.fullmatch(settings.user):
        raise InputError(f"{settings.user!r} is not a Unix user name", field="--user")
    if not settings.known_hosts:
        settings.known_hosts = str(directory / "known_hosts")
    if not Path(settings.known_hosts).expanduser().is_absolute():
        raise InputError(f"{settings.known_hosts!r} is a relative path: ssh would read it "
                         "relative to where it runs", field="--known-hosts")
    if not _PLAIN.fullmatch(settings.known_hosts):
        raise InputError(f"{settings.known_hosts!r}: ssh arguments cannot hold this path "
                         "(spaces or other special characters)", field="--known-hosts",
                         hint="pass --known-hosts with a plain absolute path")
    profile_given = settings.profile
    if settings.profile is None and settings.gpus_per_node == 0:
        settings.profile = profile_for("", 0)
    hosts_file = directory / "hosts.yml"
    claim_cluster_state_dir(settings.cluster_name, hosts_file, create=False)
    result = Result(directory, hosts_file, len(hosts), settings)
    with tempfile.TemporaryDirectory(prefix=".dsk-init-") as stage_dir:
        stage = Path(stage_dir)
        inv = _stage(directory, render_hosts(hosts, settings, directory),
                     render_group_vars(settings), stage)
        facts = None
        if probe_nodes:
            hostkeys.trust(inv, expect=expect, confirm=confirm, show=show)
            facts = probe(inv, transport=transport)
            counts = Counter(f.gpu_count for f in facts.values())
            settings.gpus_per_node = counts.most_common(1)[0][0]
            ifnames = Counter(f.interface_of(h.address) for h in hosts
                              if (f := facts.get(h.name)))
            common_if = ifnames.most_common(1)[0][0] if ifnames else None
            settings.socket_ifname = common_if
            if profile_given is None:
                models = Counter(f.gpu_model for f in facts.values() if f.gpu_count)
                model = models.most_common(1)[0][0] if models else ""
                settings.profile = profile_for(model, settings.gpus_per_node)
                if settings.profile is None:
                    result.notes.append(f"no hardware profile matches {model or 'the GPUs'}: "
                                        "set dsk_profile before `validate`")
            result.facts = facts
        hosts_text = render_hosts(hosts, settings, directory, facts)
        vars_text = render_group_vars(settings, probed=facts is not None)
        shutil.rmtree(stage / "group_vars")
        _stage(directory, hosts_text, vars_text, stage)
    write_file(directory / "group_vars" / "all.yml", vars_text, dir_mode=0o755)
    write_file(hosts_file, hosts_text)
    if settings.profile is None and not probe_nodes and settings.gpus_per_node:
        result.notes.append("no hardware profile chosen: set dsk_profile in "
                            f"{directory / 'group_vars' / 'all.yml'} before `validate`")
    return result
