"""validate's Slurm checks: slurmctld and slurmd running, nodes Slurm has down, drained or
not responding flagged with Slurm's reason; a cordoned node's drain is expected."""

from __future__ import annotations

from dsk_provision.validation import slurm_checks
from dsk_provision.validation.results import FAIL, PASS, SKIP

NODES = ["node1", "node2", "node3", "node4"]
SINFO = ("node1|idle|none\n"
         "node2|drained|gpu 3 fell off the bus\n"
         "node3|down*|Not responding\n"
         "node4|mixed|none\n"
         "node4|mixed|none\n")   # a node in two partitions is listed twice


def by(results):
    return {(r.node, r.check): r for r in results}


def test_down_drained_and_silent_nodes_fail_with_slurms_reason():
    results = by(slurm_checks.slurm_results(
        "node1", NODES, {}, "active", {n: "active" for n in NODES}, SINFO))
    assert results[("node1", "slurmctld")].status == PASS
    assert results[("node1", "slurm_state")].status == PASS
    assert results[("node4", "slurm_state")].status == PASS
    drained = results[("node2", "slurm_state")]
    assert drained.status == FAIL and "drained" in drained.message
    assert "gpu 3 fell off the bus" in drained.message
    down = results[("node3", "slurm_state")]
    assert down.status == FAIL and "not responding" in down.message
    assert "Not responding" in down.message


def test_dead_daemons_and_unknown_nodes_fail():
    results = by(slurm_checks.slurm_results(
        "node1", NODES, {}, "inactive", {"node1": "active", "node2": "failed"},
        "node1|idle|none\n"))
    assert results[("node1", "slurmctld")].status == FAIL
    assert results[("node2", "slurmd")].status == FAIL
    assert results[("node3", "slurmd")].message == "slurmd: no answer"
    assert results[("node2", "slurm_state")].status == FAIL
    assert "not in Slurm's node list" in results[("node2", "slurm_state")].message


def test_a_cordoned_nodes_drain_is_expected_and_a_failed_sinfo_skips():
    results = by(slurm_checks.slurm_results(
        "node1", NODES, {"node2": "repair"}, "active", {n: "active" for n in NODES}, SINFO))
    assert results[("node2", "slurm_state")].status == SKIP
    assert "cordoned (repair)" in results[("node2", "slurm_state")].message
    results = by(slurm_checks.slurm_results("node1", NODES, {}, "active",
                                            {n: "active" for n in NODES}, None))
    assert all(results[(n, "slurm_state")].status == SKIP for n in NODES)


def test_states_in_service_and_out():
    for state in ("idle", "allocated", "mixed", "completing", "idle$", "planned"):
        assert slurm_checks.node_state_problem(state) is None, state
    for state in ("down", "drained", "draining", "idle*", "fail", "failing", "unknown*",
                  "maint", "reboot^"):
        assert slurm_checks.node_state_problem(state), state


def test_every_node_is_asked_once_and_the_controller_also_for_slurmctld_and_sinfo():
    # each "node" is this machine's shell, with systemctl and sinfo answering as that node
    from types import SimpleNamespace

    from dsk_provision.remote import LocalTransport

    daemons = {"node1": ("active", "active"), "node2": ("failed", ""), "node3": ("active", ""),
               "node4": ("active", "")}
    asked = []

    class Nodes(LocalTransport):
        def popen(self, node, command, *, stdin=None):
            asked.append((node.name, command))
            if node.name == "node3":
                command = "echo 'ssh: connect to host node3: No route to host'; exit 255"
            slurmd, slurmctld = daemons[node.name]
            fake = (f"systemctl() {{ case $2 in slurmd) echo {slurmd};; "
                    f"slurmctld) echo {slurmctld};; esac; }}; "
                    f"sinfo() {{ printf '%s' '{SINFO}'; }}; ")
            return super().popen(node, fake + command, stdin=stdin)

    nodes = [SimpleNamespace(name=n, cordoned=None) for n in NODES]
    inventory = SimpleNamespace(vars={"dsk_slurm_enabled": True}, nodes=nodes, path=None)
    results = by(slurm_checks.run_slurm_checks(inventory, transport=Nodes()))
    assert sorted(name for name, _ in asked) == NODES  # one command a node
    assert "sinfo" in dict(asked)["node1"] and "sinfo" not in dict(asked)["node2"]
    assert results[("node1", "slurmctld")].status == PASS
    assert results[("node1", "slurmd")].status == PASS
    assert results[("node2", "slurmd")].status == FAIL
    assert "No route to host" in results[("node3", "slurmd")].message
    assert results[("node4", "slurmd")].status == PASS
    assert "gpu 3 fell off the bus" in results[("node2", "slurm_state")].message
    assert results[("node4", "slurm_state")].status == PASS
