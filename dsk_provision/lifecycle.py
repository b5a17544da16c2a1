"""Bringing nodes into a cluster and taking them out, from the inventory.

``bootstrap`` compares the inventory with the record of provisioned nodes
(dsk_provision.provisioned) and plans:

- no record (a first bootstrap): the full bootstrap of every node;
- nothing new: the full bootstrap of every node too (it converges, repairs drift, and
  brings nodes that missed a trust refresh up to date);
- new nodes (not recorded, or recorded under another address or port): the full
  bootstrap limited to them, then a *trust refresh* of the existing nodes only: the
  tasks tagged ``etc_hosts``, ``ssh_trust`` and ``slurm_conf`` (/etc/hosts, known_hosts,
  ~/.ssh/config, authorized keys; with Slurm on, slurm.conf and gres.conf, then
  slurmctld restarted or reconfigured). Their host keys are the ones recorded in host_keys.json
  (``ssh_trust_recorded_nodes``): no facts are gathered there. An existing node that
  does not answer is named, marked pending, and brought up to date next time.

Before a node is brought in (``add``, ``replace``, or a bootstrap that finds new nodes),
its host keys go through dsk_provision.hostkeys.trust, the one path by which a key is
trusted: scanned, compared with what is recorded (a different key is refused with both
fingerprints), and pinned in the inventory's known_hosts only once confirmed or matched
with expected fingerprints (``HostKeyPolicy``); keys already pinned need neither.
``add`` (``nodes add``) then asks each new node over SSH, as the playbooks will reach it,
whether it answers: a node whose key is refused or that does not answer leaves the hosts
file untouched. ``replace``
drops a node's recorded host key and brings it in again as a new node (same name, new
hardware), so that the others pin the key it has now.

``remove`` refreshes the trust of the remaining nodes with the node left out
(``dsk_removed_nodes``), so that none of them knows its name, address or host key any
more, then takes it out of the inventory and the record, then rotates the cluster key
on the remaining nodes (dsk_provision.keys.rotate, ``rotate_cluster_key``): the removed
node held the cluster's private key, and until the rotation every remaining node
accepts it. The node itself is not contacted: a dead node is removed the same way.

The playbook runner is a parameter (``run``, default runner.run_playbook) so that the
plans can be checked without a cluster; the SSH probe and the host-key step are the
module's ``probe_nodes``, ``pin_host_keys`` and ``rotate_cluster_key``, looked up at call
time (tests replace them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsk_provision import provisioned, state
from dsk_provision.errors import InputError, RunFailed

if TYPE_CHECKING:
    from dsk_provision.inventory import Inventory

SITE_PLAYBOOK = "site.yml"
# What a trust refresh runs of site.yml: the node list in /etc/hosts (roles/common), the
# ssh_trust role and, where Slurm is on, Slurm's node list (roles/slurm, tasks/conf.yml).
# Nothing else of the bootstrap is tagged with these.
TRUST_REFRESH_TAGS = ("etc_hosts", "ssh_trust", "slurm_conf")
# Extra variables read by the roles (roles/ssh_trust/defaults, roles/dsk_defaults).
RECORDED_NODES_VAR = "ssh_trust_recorded_nodes"
REMOVED_NODES_VAR = "dsk_removed_nodes"

Say = Callable[[str], None]


def _nodes(n: int) -> str:
    return f"{n} node" if n == 1 else f"{n} nodes"


# Lists of node names longer than this are shortened in summaries.
_MAX_NAMES = 8


def _names(names: Any) -> str:
    """Node names for a summary line: all of them, or the first few and a count."""
    names = list(names)
    if len(names) <= _MAX_NAMES:
        return ", ".join(names)
    return f"{', '.join(names[:_MAX_NAMES])} and {len(names) - _MAX_NAMES} more"


@dataclass(frozen=True)
class Plan:
    """What a bootstrap does, node by node."""

    first: bool                      # no record: everything is bootstrapped
    new: tuple[str, ...]             # full bootstrap
    existing: tuple[str, ...]        # trust refresh only (when there are new nodes)
    removed: tuple[str, ...] = ()    # recorded, no longer in the inventory
    moved: tuple[str, ...] = ()      # among `new`: recorded under another address/port
    pending: tuple[str, ...] = ()    # among `existing`: missed the last trust refresh

    @property
    def full(self) -> bool:
        """Whether this is one full bootstrap of every node."""
        return self.first or not self.new

    def summary(self) -> str:
        if self.first:
            text = (f"no record of provisioned nodes: full bootstrap of all "
                    f"{_nodes(len(self.new))}")
        elif not self.new:
            text = f"no new node: full bootstrap of all {_nodes(len(self.existing))}"
        else:
            new = f"{len(self.new)} new" if len(self.new) != 1 else "1 new"
            text = (f"{new} {'node' if len(self.new) == 1 else 'nodes'}: full bootstrap "
                    f"({_names(self.new)}); {len(self.existing)} existing: trust "
                    "refresh only")
        notes = []
        if self.moved:
            notes.append(f"at a new address or port: {_names(self.moved)}")
        if self.pending:
            notes.append(f"missed the last trust refresh: {_names(self.pending)}")
        if self.removed:
            notes.append(f"no longer in the inventory: {_names(self.removed)}")
        return text + "".join(f"\n  {n}" for n in notes)


def plan_bootstrap(inventory: Inventory,
                   record: dict[str, provisioned.ProvisionedNode] | None,
                   host_keys: dict[str, list[str]]) -> Plan:
    """Which nodes of ``inventory`` are new and which are existing, from the ``record``
    and the pinned ``host_keys``. A recorded node counts as existing only at the address
    and port it was provisioned at, and with its host keys pinned (they are what the
    other nodes will trust without asking it)."""
    names = [n.name for n in inventory.nodes]
    if record is None:
        return Plan(first=True, new=tuple(names), existing=())
    new, existing, moved = [], [], []
    for node in inventory.nodes:
        entry = record.get(node.name)
        if entry is None or node.name not in host_keys:
            new.append(node.name)
        elif (entry.address, entry.port) != (node.address, int(node.port)):
            new.append(node.name)
            moved.append(node.name)
        else:
            existing.append(node.name)
    return Plan(first=False, new=tuple(new), existing=tuple(existing),
                removed=tuple(n for n in record if n not in set(names)),
                moved=tuple(moved),
                pending=tuple(n for n in existing if record[n].trust_pending))


@dataclass
class Outcome:
    """What a bring-in or a removal did."""

    plan: Plan | None
    bootstrapped: list[str] = field(default_factory=list)   # full bootstrap done
    refreshed: list[str] = field(default_factory=list)      # trust refresh done
    missed: dict[str, str] = field(default_factory=dict)    # unreachable: why
    key_rotation: Any = None   # a removal's keys.RotationResult, None when not rotated
    key_warning: str = ""      # a removal that left the cluster key as it was: what stays trusted

    def summary(self) -> str:
        parts = []
        if self.bootstrapped:
            parts.append(f"bootstrapped: {_names(self.bootstrapped)}")
        if self.refreshed:
            parts.append(f"trust refreshed: {_names(self.refreshed)}")
        lines = ["; ".join(parts)] if parts else []
        for name, why in self.missed.items():
            lines.append(f"{name} did not answer ({why}): it keeps the old node list and "
                         "is brought up to date by the next bootstrap once it answers")
        if self.key_rotation is not None:
            data = self.key_rotation.to_dict()
            lines.append(f"cluster key rotated on {_nodes(len(data['nodes']))}: "
                         f"{data['new_key']} in force, {data['old_key']} removed from every "
                         "node's authorized_keys")
        return "\n".join(lines)


@dataclass(frozen=True)
class HostKeyPolicy:
    """How the host keys of nodes being brought in may become trusted
    (dsk_provision.hostkeys.trust): ``expect``, a file of expected fingerprints;
    ``confirm(plan)``, asked when new keys are not vouched for by ``expect`` (None: new
    keys are refused and nothing is written); ``show(plan)``, shown the fingerprints
    first."""

    expect: Path | None = None
    confirm: Callable[[Any], bool] | None = None
    show: Callable[[Any], None] | None = None


def pin_host_keys(inventory: Inventory, names: list[str], policy: HostKeyPolicy, *,
                  replace: tuple[str, ...] = ()) -> None:
    """The nodes' host keys through hostkeys.trust: scanned, compared with the recorded
    ones, pinned in the inventory's known_hosts when confirmed or expected. Raises
    hostkeys.HostKeyMismatch, hostkeys.NotConfirmed or RunFailed (a node gave no key);
    nothing is written then, for that node."""
    from dsk_provision import hostkeys

    hostkeys.trust(inventory, names, expect=policy.expect, confirm=policy.confirm,
                   replace=replace, show=policy.show)


def _default_run() -> Callable[..., Any]:
    from dsk_provision.runner import run_playbook

    return run_playbook


def _unreachable_only(exc: RunFailed) -> dict[str, str] | None:
    """The unreachable hosts of a finished run that failed only because of them."""
    result = getattr(exc, "result", None)
    if result is None or result.failed or not result.unreachable:
        return None
    return dict(result.unreachable)


def _completed(exc: RunFailed, hosts: list[str]) -> list[str]:
    """The hosts of a finished but failed run that completed every play."""
    result = getattr(exc, "result", None)
    if result is None:
        return []
    bad = set(result.failed) | set(result.unreachable)
    return [h for h in hosts if h not in bad]


def bring_in(inventory: Inventory, *, run: Callable[..., Any] | None = None,
             check: bool = False, say: Say = print, host_keys: HostKeyPolicy | None = None,
             pinned: tuple[str, ...] = (), **run_options: Any) -> Outcome:
    """Bootstrap what the inventory has that the record has not, as planned by
    plan_bootstrap, and update the record (not in check mode). New nodes of an addition
    get their host keys trusted first (pin_host_keys with ``host_keys``), except those
    in ``pinned`` (done by the caller just before); in check mode nothing is pinned.
    ``run_options`` go to every run (runs_dir, console, verbosity)."""
    run = run or _default_run()
    # Refused before anything is read when another inventory owns the state directory.
    directory = state.claim_cluster_state_dir(inventory.cluster_name, inventory.hosts_file,
                                              create=False)
    record = provisioned.load_record(directory)
    plan = plan_bootstrap(inventory, record, provisioned.read_host_keys(directory))
    say(plan.summary())
    record = dict(record or {})
    by_name = {n.name: n for n in inventory.nodes}

    def keep(names: list[str]) -> None:
        if check:
            return
        keys = provisioned.read_host_keys(directory)
        when = provisioned.now()
        for name in names:
            record[name] = provisioned.provisioned(by_name[name], keys, when=when,
                                                   before=record.get(name))
        for name in plan.removed:
            record.pop(name, None)
        provisioned.write_record(directory, record)

    if plan.full:
        names = list(plan.new if plan.first else plan.existing)
        try:
            run(SITE_PLAYBOOK, inventory, command="bootstrap", check=check, **run_options)
        except RunFailed as exc:
            keep(_completed(exc, names))
            if not check:
                provisioned.forget_removed(directory, _completed(exc, names))
            raise
        keep(names)
        if not check:
            provisioned.forget_removed(directory, names)
        return Outcome(plan, bootstrapped=names)

    to_pin = [n for n in plan.new if n not in pinned]
    if to_pin and not check:
        pin_host_keys(inventory, to_pin, host_keys or HostKeyPolicy())
    recorded = {RECORDED_NODES_VAR: list(plan.existing)}
    # New nodes first: their host keys are gathered and recorded, so that the existing
    # nodes pin them next. A failure stops here: nothing of the addition is recorded, and
    # the next bootstrap plans (and does) it again.
    run(SITE_PLAYBOOK, inventory, command="bootstrap", limit=list(plan.new),
        extra_vars=recorded, check=check, **run_options)
    keep(list(plan.new))
    outcome = Outcome(plan, bootstrapped=list(plan.new))
    # The new nodes' host keys are recorded now too: the refresh asks no node for them.
    pinned = provisioned.read_host_keys(directory)
    recorded = {RECORDED_NODES_VAR: [*plan.existing, *(n for n in plan.new if n in pinned)]}
    if not check:
        # Pending until refreshed: a refresh that is interrupted or fails is redone.
        _mark_pending(directory, record, plan.existing)
    outcome.refreshed, outcome.missed = _trust_refresh(
        inventory, list(plan.existing), run=run, command="trust-refresh",
        extra_vars=recorded, check=check, run_options=run_options)
    if not check:
        when = provisioned.now()
        for name in plan.existing:
            record[name] = provisioned.refreshed(
                record[name], when=None if name in outcome.missed else when)
        provisioned.write_record(directory, record)
        provisioned.forget_removed(directory, [*plan.new, *outcome.refreshed])
    return outcome


def _mark_pending(directory: Path, record: dict[str, provisioned.ProvisionedNode],
                  names: Any) -> None:
    for name in names:
        if name in record:
            record[name] = provisioned.refreshed(record[name], when=None)
    provisioned.write_record(directory, record)


def _trust_refresh(inventory: Inventory, hosts: list[str], *, run: Callable[..., Any],
                   command: str, extra_vars: dict[str, Any], check: bool,
                   run_options: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The trust refresh of ``hosts``: which were refreshed, and which did not answer. A
    run that fails on a node that answered raises."""
    if not hosts:
        return [], {}
    try:
        run(SITE_PLAYBOOK, inventory, command=command, limit=hosts,
            tags=list(TRUST_REFRESH_TAGS), extra_vars=extra_vars, check=check,
            **run_options)
    except RunFailed as exc:
        missed = _unreachable_only(exc)
        if missed is None:
            raise
        return [h for h in hosts if h not in missed], missed
    return list(hosts), {}


# How long the SSH probe of a node to be added or replaced may take, connection included.
PROBE_TIMEOUT_S = 60.0


def probe_nodes(inventory: Inventory, names: list[str]) -> dict[str, str]:
    """Ask each node of ``names`` over SSH, in parallel, exactly as the launcher reaches
    it (the inventory's user, port, key and pinned host keys): {node: why} for those that
    do not answer."""
    from concurrent.futures import ThreadPoolExecutor

    from dsk_provision import remote

    def one(name: str) -> tuple[str, str | None]:
        node = inventory.node(name)
        rc, out = remote.run_command(remote.transport_for(inventory, node), node, "true",
                                     timeout=PROBE_TIMEOUT_S)
        if rc == 0:
            return name, None
        lines = [x.strip() for x in out.splitlines() if x.strip()]
        why = lines[-1] if lines else f"ssh exited {rc}"
        return name, f"no answer within {PROBE_TIMEOUT_S:g} s" if rc == 124 else why

    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
        return {name: why for name, why in pool.map(one, names) if why is not None}


def _default_probe() -> Callable[[Inventory, list[str]], dict[str, str]]:
    return probe_nodes


def _require_answers(inventory: Inventory, names: list[str], probe: Callable[..., Any],
                     what: str) -> None:
    missed = probe(inventory, names)
    if missed:
        details = "; ".join(f"{name} ({inventory.node(name).address}): {why}"
                            for name, why in missed.items())
        raise RunFailed(f"{what}: {', '.join(missed)} did not answer over SSH: {details}",
                        nodes=list(missed),
                        hint=f"{inventory.hosts_file} is unchanged; check the address, the "
                             "port, that the node accepts the inventory's key, and that "
                             "the control node's known_hosts pins its host key")


def _refuse_names_still_known(inventory: Inventory, names: list[str]) -> None:
    """A new node may not take the name of a removed node that some node still pins."""
    directory = state.claim_cluster_state_dir(inventory.cluster_name, inventory.hosts_file,
                                              create=False)
    removed = provisioned.load_removed(directory)
    for name in names:
        holders = removed.get(name)
        if holders:
            raise InputError(
                f"{name!r} was removed while {', '.join(holders)} did not answer: "
                f"{'they still pin' if len(holders) > 1 else 'it still pins'} the old "
                f"{name}'s host key under that name", field=f"all.children.nodes.hosts.{name}",
                file=str(inventory.hosts_file),
                hint=f"start {', '.join(holders)} and run `dsk-provision bootstrap`, "
                     "which brings them up to date, or give the new node another name")


def _refuse_unfinished(inventory: Inventory, names: list[str]) -> None:
    """A node already written into the inventory whose bring-in did not finish (an
    interrupted or failed addition) is finished by bootstrap, not added again."""
    directory = state.claim_cluster_state_dir(inventory.cluster_name, inventory.hosts_file,
                                              create=False)
    record = provisioned.load_record(directory)
    listed = {n.name for n in inventory.nodes}
    unfinished = [n for n in names if record is not None and n in listed and n not in record]
    if unfinished:
        raise InputError(f"{', '.join(unfinished)} {'is' if len(unfinished) == 1 else 'are'} "
                         "in the inventory already, not yet brought in (an addition that "
                         "did not finish)", file=str(inventory.hosts_file),
                         field=f"all.children.nodes.hosts.{unfinished[0]}",
                         hint=f"`dsk-provision bootstrap -i {inventory.path}` finishes it")


def add(inventory: Inventory, nodes: list[Any], *, run: Callable[..., Any] | None = None,
        say: Say = print, probe: Callable[..., Any] | None = None,
        host_keys: HostKeyPolicy | None = None,
        **run_options: Any) -> tuple[Outcome, Inventory]:
    """Write ``nodes`` (inventory_edit.NewNode) into the hosts file, then bring_in.

    Before the file is written, the new nodes' host keys must be trusted (pin_host_keys
    with ``host_keys``: already pinned, confirmed or expected; a key that differs from
    the recorded one is refused), the nodes must answer over SSH (``probe``, default
    probe_nodes) and their names must not be those of removed nodes still pinned
    somewhere; otherwise the hosts file does not change. When a new node stops answering during its
    bootstrap (which then failed only because new nodes were unreachable), the hosts file
    is put back as it was, byte for byte, and the RunFailed says so; any other failure
    keeps the nodes in the hosts file, for a second `bootstrap` (or the same `nodes add`
    of the nodes not yet written) to finish the addition."""
    import os
    import stat

    from dsk_provision.files import write_file
    from dsk_provision.inventory_edit import add_nodes

    probe = probe or _default_probe()
    hosts_file = inventory.hosts_file
    original = hosts_file.read_bytes()
    _refuse_names_still_known(inventory, [n.name for n in nodes])
    _refuse_unfinished(inventory, [n.name for n in nodes])

    names = [n.name for n in nodes]

    def answers(larger: Inventory) -> None:
        pin_host_keys(larger, names, host_keys or HostKeyPolicy())
        _require_answers(larger, names, probe, "not added")

    larger = add_nodes(inventory, nodes, verify=answers)
    written = hosts_file.read_bytes()
    try:
        return bring_in(larger, run=run, say=say, host_keys=host_keys, pinned=tuple(names),
                        **run_options), larger
    except RunFailed as exc:
        added = {n.name for n in nodes}
        missed = _unreachable_only(exc) or {}
        if not missed or not set(missed) <= added or hosts_file.read_bytes() != written:
            raise
        write_file(hosts_file, original, mode=stat.S_IMODE(os.stat(hosts_file).st_mode))
        raise RunFailed(f"{exc.message}\nnot added: {', '.join(sorted(missed))} did not "
                        f"answer; {hosts_file} is back as it was", nodes=exc.nodes,
                        hint="check the address, the port and that the control node "
                             "trusts its host key, then add it again") from exc


def replace(inventory: Inventory, name: str, *, host: str | None = None,
            port: int | None = None, run: Callable[..., Any] | None = None,
            say: Say = print, probe: Callable[..., Any] | None = None,
            host_keys: HostKeyPolicy | None = None,
            **run_options: Any) -> tuple[Outcome, Inventory]:
    """Node ``name`` on new hardware (a new host key, perhaps a new ``host``/``port``): its
    new host key replaces the recorded one in the control node's known_hosts once
    confirmed or expected (pin_host_keys with ``host_keys``), and it must answer; then
    its recorded host key is dropped and it is brought in again like a new node (its
    full bootstrap learns its new key), and the others' trust refresh pins the new key
    in place of the old one. Interrupted, the next `bootstrap` finishes it (the node has
    no recorded key, so it is planned as new)."""
    from dsk_provision.inventory_edit import set_address

    inventory.node(name)  # an InputError naming the nodes when there is none
    probe = probe or _default_probe()
    directory = state.claim_cluster_state_dir(inventory.cluster_name, inventory.hosts_file,
                                              create=False)
    record = provisioned.load_record(directory)
    if record is None or name not in record:
        raise InputError(f"{name!r} was never brought in by this tool: nothing to replace",
                         file=str(inventory.hosts_file),
                         hint="`dsk-provision bootstrap` brings it in")

    def answers(inv: Inventory) -> None:
        pin_host_keys(inv, [name], host_keys or HostKeyPolicy(), replace=(name,))
        _require_answers(inv, [name], probe, "not replaced")

    node = inventory.node(name)
    if host is not None and (host, port or int(node.port)) != (node.address, int(node.port)):
        inventory = set_address(inventory, name, host, port, verify=answers)
    else:
        answers(inventory)
    say(f"replacing {name}: its recorded host key is dropped; it is bootstrapped as a new "
        "node and the others pin its new key")
    provisioned.forget_host_keys(directory, name)
    record.pop(name, None)
    provisioned.write_record(directory, record)
    return bring_in(inventory, run=run, say=say, host_keys=host_keys, pinned=(name,),
                    **run_options), inventory


def check_removal(inventory: Inventory, name: str) -> list[str]:
    """The nodes that stay when ``name`` goes; an InputError (nothing changed) when it
    cannot go."""
    inventory.node(name)  # an InputError naming the nodes when there is none
    remaining = [n.name for n in inventory.nodes if n.name != name]
    if not remaining:
        raise InputError(f"{name!r} is the inventory's only node: a cluster needs one",
                         file=str(inventory.hosts_file),
                         field=f"all.children.nodes.hosts.{name}")
    return remaining


def rotate_cluster_key(inventory: Inventory, *, say: Say = print, runs_dir: Path | None = None,
                       console: Any = None) -> Any:
    """``keys rotate`` on ``inventory`` (dsk_provision.keys.rotate): a new cluster key
    in force on every node, the old one accepted nowhere. Returns its RotationResult."""
    from dsk_provision import keys

    return keys.rotate(inventory, runs_dir=runs_dir, console=console, say=say)


def _key_kept(name: str, why: str) -> str:
    return (f"the cluster key is unchanged ({why}): {name}'s copy of it still logs in as "
            f"root to every remaining node until `dsk-provision keys rotate` runs")


def _rotate_after_removal(smaller: Inventory, name: str, missed: dict[str, str], *,
                          say: Say, run_options: dict[str, Any]) -> tuple[Any, str]:
    """The cluster key rotated on the nodes that stay, once ``name`` is out of the
    inventory: (the RotationResult, "") or (None, what stays trusted and why). A
    rotation needs every node, so one that missed the removal's refresh defers it."""
    from dsk_provision import keys

    files = keys.key_files(smaller)
    if keys.pending_step(files) is None and not files.current.exists():
        return None, ""  # no cluster key was ever made: no node holds one
    if missed:
        return None, _key_kept(name, f"{_names(missed)} did not answer, and a rotation "
                                     "needs every node; run it once they answer")
    say(f"rotating the cluster key on the {_nodes(len(smaller.nodes))} that stay: {name} "
        "held it")
    try:
        result = rotate_cluster_key(smaller, say=say, runs_dir=run_options.get("runs_dir"),
                                    console=run_options.get("console"))
    except RunFailed as exc:
        raise RunFailed(f"{name} is removed (inventory, record, the others' known_hosts), but "
                        f"the cluster key rotation did not finish: {exc.message}",
                        nodes=exc.nodes,
                        hint=f"{exc.hint + '. ' if exc.hint else ''}Until it finishes, "
                             f"{name}'s copy of the cluster key is accepted wherever the "
                             "old key still is") from exc
    return result, ""


def remove(inventory: Inventory, name: str, *, run: Callable[..., Any] | None = None,
           say: Say = print, rotate_key: bool = True,
           **run_options: Any) -> tuple[Outcome, Inventory]:
    """Take node ``name`` out of the cluster: the remaining nodes forget it (/etc/hosts,
    known_hosts, ~/.ssh/config), then the inventory and the record do, then the cluster
    key is rotated on the remaining nodes (unless ``rotate_key`` is false: the outcome's
    ``key_warning`` then says what stays trusted), so that the copy the removed node
    holds is accepted nowhere. Returns what was done and the inventory without the
    node. The node is never contacted."""
    from dsk_provision.inventory_edit import remove_node

    remaining = check_removal(inventory, name)
    run = run or _default_run()
    directory = state.claim_cluster_state_dir(inventory.cluster_name, inventory.hosts_file,
                                              create=False)
    keys = provisioned.read_host_keys(directory)
    extra_vars = {REMOVED_NODES_VAR: [name],
                  RECORDED_NODES_VAR: [n for n in remaining if n in keys]}
    say(f"removing {name}: trust refresh of the {_nodes(len(remaining))} that stay")
    record = provisioned.load_record(directory)
    if record is not None:
        _mark_pending(directory, record, remaining)
    refreshed, missed = _trust_refresh(inventory, remaining, run=run, command="nodes-remove",
                                       extra_vars=extra_vars, check=False,
                                       run_options=run_options)
    smaller = remove_node(inventory, name)
    # The refresh's record of host keys leaves it out already, unless no node answered.
    provisioned.forget_host_keys(directory, name)
    record = provisioned.load_record(directory)
    removed = provisioned.load_removed(directory)
    # The nodes that missed this refresh still pin the node under its name.
    removed = {n: [h for h in holders if h != name and h not in refreshed]
               for n, holders in removed.items() if n != name}
    if missed:
        removed[name] = sorted(missed)
    if record is not None:
        record.pop(name, None)
        when = provisioned.now()
        for other in remaining:
            if other in record:
                record[other] = provisioned.refreshed(
                    record[other], when=None if other in missed else when)
        provisioned.write_record(directory, record, removed)
    outcome = Outcome(None, refreshed=refreshed, missed=missed)
    if rotate_key:
        outcome.key_rotation, outcome.key_warning = _rotate_after_removal(
            smaller, name, missed, say=say, run_options=run_options)
    else:
        outcome.key_warning = _key_kept(name, "--keep-key")
    return outcome, smaller


def cordon(inventory: Inventory, name: str, reason: str | None, *, say: Say = print,
           drain: Callable[..., Any] | None = None) -> Inventory:
    """Cordon node ``name`` with ``reason`` in the hosts file, or uncordon it (None); with
    Slurm on, then drain it in Slurm with the same reason, or resume it (``drain``,
    default slurm.set_drain). Returns the inventory as written."""
    from dsk_provision import slurm, slurmctl
    from dsk_provision.inventory_edit import set_cordon

    written = set_cordon(inventory, name, reason)
    if not slurmctl.enabled(written):
        return written
    drain = drain or slurm.set_drain
    try:
        drain(written, name, reason)
    except RunFailed as exc:
        raise RunFailed(f"{exc.message}\n{name} is {'un' if reason is None else ''}cordoned in "
                        f"{written.hosts_file}, not yet in Slurm", nodes=exc.nodes,
                        hint=f"run the same `nodes {'un' if reason is None else ''}cordon` "
                             "again once slurmctld answers") from exc
    say(f"{name} {'resumed' if reason is None else 'drained'} in Slurm")
    return written


def read_node_file(path: Path) -> list[Any]:
    """The nodes listed in ``path`` for ``nodes add --from``: a YAML list of mappings with
    ``name`` and ``host`` and optionally ``port`` and ``gpus``."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    from dsk_provision.inventory_edit import NewNode

    try:
        data = YAML(typ="safe").load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YAMLError) as exc:
        raise InputError(f"cannot be read: {exc}", file=str(path)) from exc
    if not isinstance(data, list) or not data:
        raise InputError("must be a YAML list of nodes, e.g. "
                         "'- {name: gpu09, host: 10.0.0.9, gpus: 8}'", file=str(path))
    nodes = []
    for i, entry in enumerate(data):
        where = f"[{i}]"
        if not isinstance(entry, dict):
            raise InputError("each node is a mapping with name and host", file=str(path),
                             field=where)
        unknown = sorted(set(entry) - {"name", "host", "port", "gpus"})
        if unknown:
            raise InputError(f"unknown keys {', '.join(map(str, unknown))} (known: name, "
                             "host, port, gpus)", file=str(path), field=where)
        for key in ("name", "host"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise InputError(f"{key} is required and must be text", file=str(path),
                                 field=f"{where}.{key}")
        for key in ("port", "gpus"):
            value = entry.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise InputError(f"{key} must be a whole number", file=str(path),
                                 field=f"{where}.{key}")
        nodes.append(NewNode(entry["name"].strip(), entry["host"].strip(),
                             port=entry.get("port"), gpus=entry.get("gpus")))
    return nodes
