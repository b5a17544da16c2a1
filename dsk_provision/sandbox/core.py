"""up / down / status / set_link_rate: the sandbox's life cycle and its state file."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dsk_provision import state as cluster_state
from dsk_provision.errors import EnvironmentProblem, InputError
from dsk_provision.files import write_file

from . import naming, network, nodefs, nodes, render
from .host import (
    find_pids,
    kill_containers,
    pid_matches,
    require_root,
    require_tools,
    run,
    spawn_detached,
    stop_pids,
)
from .image import ensure_image

Progress = Callable[[str], None] | None
# Packages nodes lack that the roles install; served by the sandbox's apt mirror.
MIRROR_PACKAGES = ("pciutils", "chrony", "jq", "rdma-core", "ibverbs-utils",
                   "infiniband-diags", "perftest", "podman")
# Opt-in roles the sandbox's inventory can turn on: their package lists, rendered as the
# roles render them with the switch on, so that the mirror carries their pinned versions.
OPT_IN_PACKAGE_LISTS = {"slurm_apt_packages": {"dsk_slurm_enabled": True}}
BOOT_TIMEOUT_S = float(os.environ.get("DSK_SANDBOX_BOOT_TIMEOUT", "90"))


@dataclass
class SandboxInfo:
    name: str
    state_dir: Path
    inventory_path: Path
    subnet: str
    bridge_ip: str
    nodes: list[tuple[str, str]] = field(default_factory=list)
    mirror_url: str = ""
    # Running nodes that `up` left out of the inventory: for `dsk-provision nodes add`.
    spare: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "state_dir": str(self.state_dir),
                "inventory_path": str(self.inventory_path), "subnet": self.subnet,
                "bridge_ip": self.bridge_ip,
                "nodes": [{"name": n, "ip": ip} for n, ip in self.nodes],
                "mirror_url": self.mirror_url,
                **({"spare": [{"name": n, "ip": ip} for n, ip in self.spare]}
                   if self.spare else {})}


def _say(progress: Progress) -> Callable[[str], None]:
    return progress or (lambda _msg: None)


def _load_state(name: str) -> dict | None:
    try:
        return json.loads((naming.state_dir(name) / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _save_state(state: dict) -> None:
    write_file(Path(state["state_dir"]) / "state.json", json.dumps(state, indent=2) + "\n")


def _node_alive(state: dict, node: dict) -> bool:
    machine = naming.machine_name(state["name"], node["name"])
    return pid_matches(node.get("pid"), f"--machine={machine}")


def venv_identity(path: Path) -> tuple[int, int] | None:
    """Device and inode of a directory, or None when it cannot be seen."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def venv_is_stale(seen: Path, host_venv: Path) -> bool:
    """True when ``seen`` (the virtualenv as a node sees it) is no longer the directory
    at ``host_venv``: a bind mount holds on to the directory it was made from, so a venv
    deleted and made again in the same place leaves running nodes with the old one."""
    then, now = venv_identity(seen), venv_identity(host_venv)
    return then is not None and now is not None and then != now


def _node_init_pid(state: dict, node: dict) -> int | None:
    """PID (on the host) of the node's init: the child of its systemd-nspawn that lives
    in another mount namespace."""
    if not _node_alive(state, node):
        return None
    own = os.stat("/proc/self/ns/mnt").st_ino
    try:
        tasks = list(Path(f"/proc/{node['pid']}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                if os.stat(f"/proc/{child}/ns/mnt").st_ino != own:
                    return int(child)
            except OSError:
                continue
    return None


def stale_venv_nodes(state: dict, host_venv: Path) -> list[dict]:
    """Running nodes whose bound virtualenv is not the host's ``host_venv`` any more."""
    stale = []
    for node in state.get("nodes", []):
        init = _node_init_pid(state, node)
        if init is not None and venv_is_stale(
                Path(f"/proc/{init}/root{nodes.node_venv()}"), host_venv):
            stale.append(node)
    return stale


def _mirror_alive(state: dict) -> bool:
    return pid_matches(state.get("mirror_pid"), "http.server", str(_mirror_link(state)))


def _mirror_link(state: dict) -> Path:
    return Path(state["state_dir"]) / "mirror"


def _spare_count(state: dict) -> int:
    return int(state.get("spare", 0))


def _info(state: dict) -> SandboxInfo:
    listed = len(state["nodes"]) - _spare_count(state)
    pairs = [(n["name"], n["ip"]) for n in state["nodes"]]
    return SandboxInfo(name=state["name"], state_dir=Path(state["state_dir"]),
                       inventory_path=Path(state["state_dir"]) / "hosts.yml",
                       subnet=state["subnet"], bridge_ip=state["bridge_ip"],
                       nodes=pairs[:listed], mirror_url=state["mirror_url"],
                       spare=pairs[listed:])


def resolve_venv(venv: Path | None) -> Path:
    """The virtualenv bound into the nodes: it must be made from Debian's /usr/bin/python3,
    because the nodes resolve its interpreter path in their own /usr/bin."""
    path = Path(venv) if venv is not None else Path(sys.prefix)
    cfg = path / "pyvenv.cfg"
    problem = None
    if not cfg.is_file():
        problem = f"{path} is not a virtualenv (no pyvenv.cfg)"
    else:
        values = {k.strip(): v.strip() for k, v in (line.split("=", 1) for line in
                  cfg.read_text().splitlines() if "=" in line)}
        home = values.get("home", "").strip()
        if home != "/usr/bin":
            problem = (f"the virtualenv {path} was made from {home or 'an unknown python'}, "
                       "not Debian's /usr/bin/python3")
        elif not (path / "bin/python").exists():
            problem = f"the virtualenv {path} has no bin/python"
    if problem is None:
        return path.resolve()
    hint = "make one with `/usr/bin/python3 -m venv .venv` (see `make setup`)"
    if venv is not None:
        raise InputError(problem, field="venv", hint=hint)
    raise EnvironmentProblem(problem + f"; nodes run the trainer from it at {nodes.node_venv()}",
                             hint=hint + " and run dsk-provision from it")


def _close_ssh_masters(state_dir: Path) -> None:
    cp = state_dir / "cp"
    if not cp.is_dir():
        return
    for sock in cp.iterdir():
        run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "sandbox-node"], check=False,
            timeout=10)
        sock.unlink(missing_ok=True)


def _teardown_node(state: dict, i: int, *, keep_disk: bool) -> None:
    name, sdir = state["name"], Path(state["state_dir"])
    node = naming.node_name(i)
    machine = naming.machine_name(name, node)
    pids = find_pids(re.compile(re.escape(f"--machine={machine}")))
    stop_pids(pids, f"--machine={machine}")
    paths = nodes.node_paths(sdir, node)
    kill_containers(f"{paths['base']}/")
    nodes.unmount_all(paths["root"])
    network.remove_node_net(name, i)
    shutil.rmtree(network.PROPAGATE_DIR / machine, ignore_errors=True)
    if not keep_disk:
        shutil.rmtree(paths["base"], ignore_errors=True)


def _teardown(name: str, say: Callable[[str], None]) -> None:
    """Remove everything of sandbox `name`, recorded in its state or merely left over."""
    sdir = naming.state_dir(name)
    state = _load_state(name) or {}
    _close_ssh_masters(sdir)
    node_re = re.compile(rf"--machine={re.escape(naming.machine_name(name, 'node'))}\d+")
    pids = find_pids(node_re)
    if pids:
        say(f"stopping {len(pids)} node(s) of sandbox {name}")
        stop_pids(pids, f"--machine={naming.machine_name(name, 'node')}")
    if kill_containers(f"{sdir}/nodes/"):
        say("killed processes left over from nodes whose systemd-nspawn had died")
    mirror_pids = find_pids(re.compile(re.escape(str(sdir / "mirror"))))
    if state.get("mirror_pid"):
        mirror_pids.append(state["mirror_pid"])
    stop_pids(sorted(set(mirror_pids)), "http.server", str(sdir / "mirror"))
    if sdir.exists():
        nodes.unmount_all(sdir)
    network.remove_all(name)
    prop_re = re.compile(rf"{re.escape(naming.machine_name(name, 'node'))}\d+")
    if network.PROPAGATE_DIR.is_dir():
        for d in network.PROPAGATE_DIR.iterdir():
            if prop_re.fullmatch(d.name):
                shutil.rmtree(d, ignore_errors=True)
    if sdir.exists():
        if nodes.mounted_under(sdir):
            raise EnvironmentProblem(f"could not unmount everything under {sdir}",
                                     hint="check `findmnt -R " + str(sdir) + "`")
        shutil.rmtree(sdir)
    # The cluster key and pinned host keys of the sandbox's inventory go with it.
    if cluster_state.forget_cluster_state_dir(name, sdir / "hosts.yml"):
        say(f"removed the cluster state of sandbox {name}")


def _preflight(name: str, count: int | None = None) -> None:
    naming.validate_name(name)
    if count is not None:
        naming.validate_node_count(count)
    require_root()
    require_tools()


def _etc_hosts(state: dict, node: str, listed: list[tuple[str, str]]) -> str:
    """A node's /etc/hosts as the sandbox writes it: the nodes of the inventory, and a
    spare node itself (a spare is not known to the others until it is added)."""
    own = [(n["name"], n["ip"]) for n in state["nodes"] if n["name"] == node]
    return render.render_etc_hosts(state["name"], listed + [p for p in own if p not in listed])


def _write_cluster_files(state: dict, *, layout_changed: bool = True,
                         listed_changed: bool = True) -> None:
    """Files that list the nodes: the control node's known_hosts (every running node,
    spares too, as a person would accept a new server's host key); when the layout
    (nodes and spares) changed or there is no inventory yet, the inventory; and when the
    inventory's nodes changed, every node's /etc/hosts. A restart of nodes in the same
    layout leaves the inventory as it is, with the nodes `dsk-provision nodes add/remove`
    put in or took out, and a change of spares only leaves the nodes' /etc/hosts."""
    sdir = Path(state["state_dir"])
    listed = [(n["name"], n["ip"]) for n in state["nodes"]][:len(state["nodes"])
                                                             - _spare_count(state)]
    write_file(sdir / "ssh/known_hosts", render.render_known_hosts(
        [(n["name"], n["ip"], n["host_key"]) for n in state["nodes"]]))
    if listed_changed:
        for n in state["nodes"]:
            nodefs.write_file(nodes.node_paths(sdir, n["name"])["root"], "etc/hosts",
                              _etc_hosts(state, n["name"], listed))
    if layout_changed or not (sdir / "hosts.yml").exists():
        write_file(sdir / "hosts.yml", render.render_inventory(
            cluster_name=state["name"], nodes=listed, key_file=sdir / "ssh/id_ed25519",
            known_hosts=sdir / "ssh/known_hosts", control_dir=sdir / "cp",
            mirror_url=state["mirror_url"],
            mirror_key_fingerprint=state.get("mirror_key_fingerprint", "")))
    _save_state(state)


def _start_node(state: dict, i: int, listed: list[tuple[str, str]], *,
                keep_disk: bool = True) -> dict:
    name, sdir = state["name"], Path(state["state_dir"])
    net = ipaddress.IPv4Network(state["subnet"])
    node = naming.node_name(i)
    _teardown_node(state, i, keep_disk=keep_disk)
    root = nodes.mount_overlay(Path(state["image"]), sdir, node)
    pub = (sdir / "ssh/id_ed25519.pub").read_text()
    own = [(node, naming.node_ip(net, i))]
    hosts_text = render.render_etc_hosts(name, listed + [p for p in own if p not in listed])
    host_key = nodes.write_identity(root, node, hosts_text, pub)
    network.create_node_net(name, i, net)
    pid = nodes.start(name, node, root, Path(state["venv"]), sdir)
    return {"name": node, "index": i, "ip": naming.node_ip(net, i), "pid": pid,
            "host_key": host_key}


def _start_mirror(state: dict) -> None:
    if _mirror_alive(state):
        return
    link = _mirror_link(state)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(state["mirror_dir"])
    sdir = Path(state["state_dir"])
    state["mirror_pid"] = spawn_detached(
        [sys.executable, "-m", "http.server", str(naming.MIRROR_PORT), "--bind",
         state["bridge_ip"], "--directory", str(link)],
        sdir / "logs/mirror.log", sdir / "logs/.mirror.pid")
    _save_state(state)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((state["bridge_ip"], naming.MIRROR_PORT), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise EnvironmentProblem(f"the apt mirror did not start on {state['mirror_url']}",
                             hint=f"see {sdir / 'logs/mirror.log'}")


def opt_in_packages() -> list[str]:
    """The pinned packages (name=version) of OPT_IN_PACKAGE_LISTS, for Debian 12 nodes."""
    from dsk_provision import mirror
    from dsk_provision.inventory import REPO_ROLES_DIR

    target = mirror.TARGETS["debian-12"]
    roles = mirror.read_role_vars(REPO_ROLES_DIR, target)
    out: list[str] = []
    for var, switches in OPT_IN_PACKAGE_LISTS.items():
        values = mirror.RoleValues(roles, switches, mirror.mirror_facts(target, 0))
        out += mirror.package_specs(values.get(var), var)
    return out


def up(name: str = "dsk", nodes: int = 3, *, spare: int | None = None,
       subnet: str | None = None, venv: Path | None = None,
       progress: Progress = None) -> SandboxInfo:
    """Start (or resize, or repair) sandbox `name` with `nodes` nodes in its inventory and
    `spare` more running beside them, left out of the inventory for `nodes add` (None:
    as many as the running sandbox has, else none); return its facts."""
    from dsk_provision.mirror import build_apt_mirror
    count = nodes
    say = _say(progress)
    naming.validate_name(name)
    naming.validate_node_count(count)
    if spare is not None and (isinstance(spare, bool) or not isinstance(spare, int)
                              or spare < 0):
        raise InputError(f"invalid spare node count {spare!r}: must be 0 or more",
                         field="spare")
    if spare is not None:
        naming.validate_node_count(count, spare)
    net = naming.parse_subnet(subnet) if subnet is not None else None
    _preflight(name, count)
    venv_path = resolve_venv(venv)
    started = time.monotonic()
    state = _load_state(name)
    alive = state is not None and any(_node_alive(state, n) for n in state.get("nodes", []))
    if state is not None and alive:
        if net is not None and str(net) != state["subnet"]:
            raise InputError(f"sandbox {name} runs on {state['subnet']}, not {net}",
                             field="subnet", hint=f"take it down first: sandbox down --name {name}")
        if str(venv_path) != state["venv"]:
            raise InputError(f"sandbox {name} binds {state['venv']}, not {venv_path}",
                             field="venv", hint=f"take it down first: sandbox down --name {name}")
        stale = stale_venv_nodes(state, venv_path)
        if stale:
            say(f"{', '.join(n['name'] for n in stale)} still see {venv_path} as it was "
                "before it was deleted and made again (a bind mount keeps the directory it "
                "was made from): restarting them")
        spare = _spare_count(state) if spare is None else spare
        naming.validate_node_count(count, spare)
        return _reconcile(state, count, say, started, restart=[n["index"] for n in stale],
                          spare=spare)
    net = net or naming.derive_subnet(name)
    network.check_subnet_free(name, net)  # before any change
    if state is not None or naming.state_dir(name).exists():
        say(f"clearing leftovers of sandbox {name}")
    _teardown(name, say)
    image = ensure_image(say)
    mirror_dir, mirror_key = build_apt_mirror([*MIRROR_PACKAGES, *opt_in_packages()],
                                              image / "var/lib/dpkg/status",
                                              naming.image_cache(), progress=say)
    sdir = naming.state_dir(name)
    (sdir / "ssh").mkdir(parents=True, mode=0o700)
    sdir.chmod(0o700)
    (sdir / "cp").mkdir(mode=0o700)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"dsk-sandbox-{name}",
         "-f", str(sdir / "ssh/id_ed25519")])
    os.chmod(sdir / "ssh/id_ed25519", 0o600)
    state = {"name": name, "state_dir": str(sdir), "subnet": str(net),
             "bridge_ip": naming.bridge_ip(net), "mirror_url": naming.mirror_url(net),
             "image": str(image), "mirror_dir": str(mirror_dir), "venv": str(venv_path),
             "mirror_key_fingerprint": mirror_key,
             "mirror_pid": None, "nodes": []}
    _save_state(state)
    network.ensure_bridge(name, net)
    _start_mirror(state)
    return _reconcile(state, count, say, started, spare=spare or 0)


def _reconcile(state: dict, count: int, say: Callable[[str], None],
               started: float, restart: list[int] | tuple[int, ...] = (),
               spare: int = 0) -> SandboxInfo:
    """Make the running set exactly node1..node<count + spare>: start missing or dead
    nodes, restart the nodes in ``restart`` (their disks kept), remove nodes beyond
    them, then rewrite the files that list the nodes (the inventory lists the first
    ``count``; see _write_cluster_files)."""
    name = state["name"]
    net = ipaddress.IPv4Network(state["subnet"])
    total = count + spare
    by_index = {n["index"]: n for n in state["nodes"]}
    extra = sorted(i for i in by_index if i > total)
    to_start = [i for i in range(1, total + 1)
                if i not in by_index or not _node_alive(state, by_index[i]) or i in restart]
    layout_changed = state.get("layout") != [count, spare]
    if not extra and not to_start and not layout_changed and _mirror_alive(state):
        return _info(state)
    for i in extra:
        say(f"removing {naming.node_name(i)}")
    if extra or restart:
        _close_ssh_masters(Path(state["state_dir"]))
    for i in extra:
        _teardown_node(state, i, keep_disk=False)
        del by_index[i]
    state["nodes"] = sorted(by_index.values(), key=lambda n: n["index"])
    _save_state(state)
    network.ensure_bridge(name, net)
    _start_mirror(state)
    listed = [(naming.node_name(i), naming.node_ip(net, i)) for i in range(1, count + 1)]
    if to_start:
        say(f"starting {', '.join(naming.node_name(i) for i in to_start)}")
    state["spare"] = spare
    for i in to_start:
        by_index[i] = _start_node(state, i, listed)
        state["nodes"] = sorted(by_index.values(), key=lambda n: n["index"])
        _save_state(state)
    state["nodes"] = sorted(by_index.values(), key=lambda n: n["index"])
    before = state.get("layout")
    _write_cluster_files(state, layout_changed=layout_changed,
                         listed_changed=not before or before[0] != count)
    state["layout"] = [count, spare]
    _save_state(state)
    nodes.wait_for_ssh([(n["name"], n["ip"]) for n in state["nodes"]], BOOT_TIMEOUT_S,
                       Path(state["state_dir"]))
    spares = f" and {spare} spare" if spare else ""
    say(f"sandbox {name}: {count} node(s){spares} up in {time.monotonic() - started:.1f} s; "
        f"inventory {Path(state['state_dir']) / 'hosts.yml'}")
    return _info(state)


def down(name: str, progress: Progress = None) -> None:
    """Stop and remove sandbox `name` completely (the cached base image stays)."""
    say = _say(progress)
    _preflight(name)
    started = time.monotonic()
    _teardown(name, say)
    say(f"sandbox {name} removed in {time.monotonic() - started:.1f} s")


def status(name: str | None = None) -> list[dict]:
    """Per sandbox: name, subnet, inventory, mirror and nodes with running/stopped."""
    if name is not None:
        naming.validate_name(name)
        names = [name]
    else:
        root = naming.state_root()
        names = sorted(p.parent.name for p in root.glob("*/state.json")) if root.is_dir() else []
    result = []
    for n in names:
        state = _load_state(n)
        if state is None:
            continue
        node_list = [{"name": nd["name"], "ip": nd["ip"],
                      "state": "running" if _node_alive(state, nd) else "stopped"}
                     for nd in state["nodes"]]
        result.append({"name": n, "subnet": state["subnet"], "bridge_ip": state["bridge_ip"],
                       "state_dir": state["state_dir"],
                       "inventory_path": str(Path(state["state_dir"]) / "hosts.yml"),
                       "mirror_url": state["mirror_url"],
                       "mirror": "running" if _mirror_alive(state) else "stopped",
                       "nodes": node_list,
                       **({"spare": _spare_now(state)} if _spare_count(state) else {})})
    return result


def _spare_now(state: dict) -> list[str]:
    """The spare nodes that the inventory does not list (yet): `nodes add` may have
    brought some in."""
    import yaml

    try:
        doc = yaml.safe_load((Path(state["state_dir"]) / "hosts.yml").read_text())
        listed = set(doc["all"]["children"]["nodes"]["hosts"] or {})
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        listed = set()
    return [n for n, _ip in _info(state).spare if n not in listed]


def _node_entry(name: str, node: str) -> tuple[dict, dict]:
    """The running sandbox's state and its entry for ``node``; InputError naming what
    exists when either is missing."""
    _preflight(name)
    state = _load_state(name)
    if state is None:
        raise InputError(f"no sandbox named {name}", field="name")
    match = [n for n in state["nodes"] if n["name"] == node]
    if not match:
        known = ", ".join(n["name"] for n in state["nodes"])
        raise InputError(f"sandbox {name} has no node {node!r} (nodes: {known})", field="node")
    return state, match[0]


def set_link_rate(name: str, node: str, rate: str | None) -> None:
    """Slow node's link to `rate` (tc syntax, e.g. "10mbit") both ways; None removes it."""
    bits = naming.parse_rate(rate) if rate is not None else None
    _state, entry = _node_entry(name, node)
    network.set_rate(name, entry["index"], bits)


def stop_node(name: str, node: str) -> None:
    """Stop one node the way a machine dies (fault drills): its link goes silent first,
    so its peers see no answer rather than a closed connection, then its container
    stops. Its disk is kept; `up` starts it again with the same host key."""
    state, entry = _node_entry(name, node)
    veth = naming.veth_name(name, entry["index"])
    if network.link_exists(veth):
        run(["ip", "link", "set", veth, "down"])
    _teardown_node(state, entry["index"], keep_disk=True)


def reimage_node(name: str, node: str, progress: Progress = None) -> SandboxInfo:
    """Give ``node`` new hardware, as far as the cluster can tell: its disk is wiped and
    it starts again from the base image with a new SSH host key, at the same address.
    The control node's known_hosts gets the new key (as a person would accept a
    replaced server's); the inventory is left as it is. For `dsk-provision nodes
    replace`."""
    say = _say(progress)
    state, entry = _node_entry(name, node)
    net = ipaddress.IPv4Network(state["subnet"])
    listed = _info(state).nodes
    _close_ssh_masters(Path(state["state_dir"]))
    say(f"reimaging {node}: a new disk and a new host key")
    fresh = _start_node(state, entry["index"], listed, keep_disk=False)
    state["nodes"] = sorted([n for n in state["nodes"] if n["index"] != entry["index"]]
                            + [fresh], key=lambda n: n["index"])
    network.ensure_bridge(name, net)
    _write_cluster_files(state, layout_changed=False, listed_changed=False)
    nodes.wait_for_ssh([(fresh["name"], fresh["ip"])], BOOT_TIMEOUT_S,
                       Path(state["state_dir"]))
    return _info(state)
