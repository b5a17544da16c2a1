"""Slurm's view of the cluster, for `validate` where dsk_slurm_enabled is set: slurmctld
on the controller and slurmd on every node are running, and Slurm has no node down,
drained or failing (with the reason Slurm gives)."""

from __future__ import annotations

from dsk_provision.remote import TransportChoice, on_nodes
from dsk_provision.slurmctl import controller
from dsk_provision.validation.results import FAIL, PASS, SKIP, CheckResult

# Seconds each node has to answer.
ANSWER_TIMEOUT_S = 60
# The line between the controller's own slurmd answer and its slurmctld and sinfo ones.
_CONTROLLER = "--slurmctld--"
# sinfo's %N|%T|%E: node name, state in long form (with its flag suffix), reason.
SINFO_COMMAND = "sinfo --noheader --Node --format='%N|%T|%E'"
# States (without sinfo's suffix) that put a node out of service.
_BAD_STATES = ("down", "drain", "fail", "maint", "reboot", "unknown", "inval", "future",
               "power")
# sinfo's suffixes: * not responding, ~ powered off, # powering up, % powering down,
# ! pending power down, $ reservation, @ pending reboot, ^ rebooting, - planned.
_FLAGS = "*~#%!$@^-"


def parse_sinfo(text: str) -> dict[str, tuple[str, str]]:
    """sinfo's node lines -> {node: (state, reason)}; a node in two partitions once."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3 and parts[0]:
            out.setdefault(parts[0], (parts[1], parts[2]))
    return out


def node_state_problem(state: str) -> str | None:
    """Why a node in this sinfo state is out of service, or None when it serves jobs."""
    base = state.rstrip(_FLAGS).lower()
    if state.endswith("*"):
        return f"{state}: not responding"
    if any(base.startswith(bad) for bad in _BAD_STATES):
        return state
    return None


def slurm_results(controller: str, nodes: list[str], cordoned: dict[str, str],
                  slurmctld: str, slurmd: dict[str, str], sinfo: str | None) -> list[CheckResult]:
    """The checks from what the nodes answered: `systemctl is-active` of slurmctld on the
    controller and of slurmd on every node, sinfo's node lines (None: sinfo failed)."""
    results = [CheckResult(controller, "slurmctld", PASS if slurmctld == "active" else FAIL,
                           slurmctld, "active", f"slurmctld on {controller}: {slurmctld}")]
    states = parse_sinfo(sinfo or "")
    for node in nodes:
        active = slurmd.get(node, "no answer")
        results.append(CheckResult(node, "slurmd", PASS if active == "active" else FAIL,
                                   active, "active", f"slurmd: {active}"))
        if sinfo is None:
            results.append(CheckResult(node, "slurm_state", SKIP, None, None,
                                       f"sinfo on {controller} failed"))
            continue
        if node not in states:
            results.append(CheckResult(node, "slurm_state", FAIL, None, None,
                                       "not in Slurm's node list (slurm.conf is out of date: "
                                       "run bootstrap)"))
            continue
        state, reason = states[node]
        problem = node_state_problem(state)
        why = f" (reason: {reason})" if reason and reason != "none" else ""
        if problem is None:
            results.append(CheckResult(node, "slurm_state", PASS, state, None,
                                       f"Slurm: {state}"))
        elif node in cordoned:
            results.append(CheckResult(node, "slurm_state", SKIP, state, None,
                                       f"Slurm: {problem}{why}; cordoned ({cordoned[node]})"))
        else:
            results.append(CheckResult(node, "slurm_state", FAIL, state, None,
                                       f"Slurm marks it {problem}{why}"))
    return results


def run_slurm_checks(inventory, *, transport: TransportChoice = None) -> list[CheckResult]:
    """Ask every node at once whether slurmd runs, and the controller also whether
    slurmctld runs and what sinfo says; judge what they answer."""
    ctld = controller(inventory)

    def command(node) -> str:
        slurmd = "systemctl is-active slurmd"
        if node.name != ctld.name:
            return slurmd
        return (f"{slurmd}; echo {_CONTROLLER}; systemctl is-active slurmctld; echo '--'; "
                f"{SINFO_COMMAND}")

    answers = on_nodes(inventory, inventory.nodes, command, timeout=ANSWER_TIMEOUT_S,
                       transport=transport)
    rc, out = answers.get(ctld.name, (255, ""))
    own, _, ctld_out = out.partition(f"{_CONTROLLER}\n")
    answers[ctld.name] = (rc, own)
    head, sep, sinfo = ctld_out.partition("--\n")
    slurmctld = head.strip().splitlines()[0] if head.strip() else "no answer"
    slurmd = {name: (text.strip().splitlines() or ["no answer"])[0]
              for name, (_, text) in answers.items()}
    return slurm_results(ctld.name, [n.name for n in inventory.nodes],
                         {n.name: str(n.cordoned) for n in inventory.nodes if n.cordoned},
                         slurmctld, slurmd, sinfo if sep and rc == 0 else None)
