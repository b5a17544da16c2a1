"""Bringing nodes in and taking them out: the record of provisioned nodes, the plan a
bootstrap makes from it, the runs it asks for (checked with a stand-in for the playbook
runner), and the `nodes add` / `nodes remove` commands on bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import types
from pathlib import Path

import pytest
from helpers import free_port
from typer.testing import CliRunner

import dsk_provision.runner as runner
from dsk_provision import lifecycle, provisioned, state
from dsk_provision.cli import app
from dsk_provision.errors import InputError, RunFailed
from dsk_provision.inventory import load_inventory
from dsk_provision.inventory_edit import NewNode, add_nodes

REPO = Path(__file__).resolve().parents[2]

# A real key and the fingerprint `ssh-keygen -lf` printed for it.
KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINnyUs5jq2zGJ1mLa5N5muxW8fWceXuj0v24PCYr7JxW")
KEY_FINGERPRINT = "SHA256:BxIdTUJqltNZbRy3LJ34A4vV6+aWUD6RLudiTUx/aKQ"

HOSTS = """\
---
# rack 1
all:
  vars:
    dsk_gpus_per_node: 8
    dsk_cluster_name: lc
  children:
    nodes:
      hosts:
        n1: {ansible_host: 10.9.0.1}
        n2: {ansible_host: 10.9.0.2}
        n3: {ansible_host: 10.9.0.3, ansible_port: 2222}
"""


@pytest.fixture
def inv_dir(tmp_path):
    directory = tmp_path / "inv"
    directory.mkdir()
    (directory / "hosts.yml").write_text(HOSTS)
    return directory


def _key(name: str) -> str:
    """A distinct, well-formed ed25519 public key line for ``name``."""
    import base64

    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + name.encode().ljust(32, b".")
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


class StandIn:
    """Stands in for runner.run_playbook: records each call and, like the ssh_trust role,
    records the host keys of the nodes it ran on (all of them when no limit).
    ``fail(call_index, exc)`` makes that call raise."""

    def __init__(self):
        self.calls: list[dict] = []
        self.failures: dict[int, Exception] = {}

    def __call__(self, playbook, inventory, **kw):
        self.calls.append({"playbook": playbook, **kw})
        index = len(self.calls) - 1
        if index in self.failures:
            raise self.failures[index]
        directory = state.claim_cluster_state_dir(inventory.cluster_name,
                                                  inventory.hosts_file)
        path = directory / provisioned.HOST_KEYS_FILE
        keys = json.loads(path.read_text()) if path.exists() else {}
        removed = (kw.get("extra_vars") or {}).get(lifecycle.REMOVED_NODES_VAR, [])
        hosts = kw.get("limit") or [n.name for n in inventory.nodes]
        for name in hosts:
            keys.setdefault(name, [_key(name)])
        keys = {k: v for k, v in keys.items()
                if k in {n.name for n in inventory.nodes} and k not in removed}
        path.write_text(json.dumps(keys))


def _unreachable(*names: str) -> RunFailed:
    exc = RunFailed("trust-refresh failed", nodes=list(names))
    exc.result = types.SimpleNamespace(failed={}, unreachable={n: "timed out" for n in names})
    return exc


def _state(inv) -> Path:
    return state.cluster_state_dir(inv.cluster_name)


def _record(inv) -> dict:
    return json.loads((_state(inv) / provisioned.NODES_FILE).read_text())["nodes"]


def _add(inv_dir, *nodes: NewNode):
    return add_nodes(load_inventory(inv_dir), list(nodes))


# --- the record ------------------------------------------------------------------------

def test_fingerprint_is_ssh_keygens():
    assert provisioned.host_key_fingerprint(KEY + " root@vm") == KEY_FINGERPRINT
    with pytest.raises(ValueError):
        provisioned.host_key_fingerprint("ssh-ed25519 not-base64!")


def test_record_round_trip_private_and_refuses_garbage(tmp_path):
    entry = provisioned.ProvisionedNode("n1", "10.9.0.1", 22, (KEY_FINGERPRINT,),
                                        "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", True)
    assert provisioned.load_record(tmp_path) is None
    path = provisioned.write_record(tmp_path, {"n1": entry})
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert provisioned.load_record(tmp_path) == {"n1": entry}
    path.write_text('{"version": 1, "nodes": {"n1": {"port": 22}}}')
    with pytest.raises(InputError, match="not a record of provisioned nodes"):
        provisioned.load_record(tmp_path)


# --- the plan --------------------------------------------------------------------------

def _recorded(inv, names, **changes):
    when = "2026-01-01T00:00:00Z"
    out = {}
    for node in inv.nodes:
        if node.name in names:
            entry = provisioned.ProvisionedNode(node.name, node.address, node.port, (),
                                                when, when)
            out[node.name] = entry
    for name, fields in changes.items():
        out[name] = provisioned.ProvisionedNode(**{**out[name].__dict__, **fields})
    return out


def test_plan_without_record_is_a_full_bootstrap(inv_dir):
    plan = lifecycle.plan_bootstrap(load_inventory(inv_dir), None, {})
    assert plan.first and plan.full and plan.new == ("n1", "n2", "n3")
    assert plan.summary() == "no record of provisioned nodes: full bootstrap of all 3 nodes"


def test_plan_new_existing_moved_pending_removed(inv_dir):
    inv = load_inventory(inv_dir)
    record = _recorded(inv, ["n1", "n2", "n3"], n2={"trust_pending": True},
                       n3={"port": 22})  # n3 was provisioned on port 22: it moved
    record["gone"] = provisioned.ProvisionedNode("gone", "10.9.0.9", 22, (), "t", "t")
    keys = {"n1": [KEY], "n2": [KEY], "n3": [KEY]}
    plan = lifecycle.plan_bootstrap(inv, record, keys)
    assert (plan.new, plan.existing, plan.moved) == (("n3",), ("n1", "n2"), ("n3",))
    assert plan.pending == ("n2",) and plan.removed == ("gone",) and not plan.full
    assert plan.summary().splitlines() == [
        "1 new node: full bootstrap (n3); 2 existing: trust refresh only",
        "  at a new address or port: n3", "  missed the last trust refresh: n2",
        "  no longer in the inventory: gone"]
    # A recorded node without pinned host keys cannot be trusted without asking it.
    del keys["n1"]
    assert lifecycle.plan_bootstrap(inv, record, keys).new == ("n1", "n3")
    # Everything recorded as it is: nothing new, a full (converging) bootstrap.
    same = lifecycle.plan_bootstrap(inv, _recorded(inv, ["n1", "n2", "n3"]),
                                    {"n1": [KEY], "n2": [KEY], "n3": [KEY]})
    assert same.full and not same.new and same.existing == ("n1", "n2", "n3")


def test_plan_counts_in_the_words_of_the_summary(inv_dir):
    inv = _add(inv_dir, NewNode("n4", "10.9.0.4"))
    plan = lifecycle.plan_bootstrap(inv, _recorded(inv, ["n1", "n2"]),
                                    {"n1": [KEY], "n2": [KEY]})
    assert plan.summary() == ("2 new nodes: full bootstrap (n3, n4); 2 existing: trust "
                              "refresh only")


def test_long_lists_of_names_are_shortened(inv_dir):
    inv = _add(inv_dir, *(NewNode(f"x{i:02}", f"10.9.1.{i}") for i in range(1, 11)))
    plan = lifecycle.plan_bootstrap(inv, _recorded(inv, ["n1", "n2", "n3"]),
                                    {"n1": [KEY], "n2": [KEY], "n3": [KEY]})
    assert plan.summary() == ("10 new nodes: full bootstrap (x01, x02, x03, x04, x05, x06, "
                              "x07, x08 and 2 more); 3 existing: trust refresh only")


# --- the runs a bootstrap asks for -------------------------------------------------------

def test_first_bootstrap_runs_everything_and_records_every_node(inv_dir):
    inv, run = load_inventory(inv_dir), StandIn()
    outcome = lifecycle.bring_in(inv, run=run, say=lambda s: None)
    assert [c.get("limit") for c in run.calls] == [None]
    assert run.calls[0].get("tags") is None and run.calls[0]["playbook"] == "site.yml"
    assert outcome.bootstrapped == ["n1", "n2", "n3"]
    record = _record(inv)
    assert sorted(record) == ["n1", "n2", "n3"]
    assert record["n3"]["port"] == 2222 and record["n3"]["address"] == "10.9.0.3"
    assert record["n1"]["host_key_fingerprints"] == [
        provisioned.host_key_fingerprint(_key("n1"))]


def test_addition_bootstraps_new_nodes_and_refreshes_trust_on_the_others(inv_dir):
    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    first = _record(load_inventory(inv_dir))
    inv = _add(inv_dir, NewNode("n4", "10.9.0.4"), NewNode("n5", "10.9.0.5"))
    run, said = StandIn(), []
    outcome = lifecycle.bring_in(inv, run=run, say=said.append, runs_dir=Path("/r"))
    assert said[0] == "2 new nodes: full bootstrap (n4, n5); 3 existing: trust refresh only"
    new, refresh = run.calls
    assert new["limit"] == ["n4", "n5"] and new.get("tags") is None
    assert new["command"] == "bootstrap"
    # The new nodes' keys are gathered by their own bootstrap; nobody else's are.
    assert new["extra_vars"] == {lifecycle.RECORDED_NODES_VAR: ["n1", "n2", "n3"]}
    assert refresh["limit"] == ["n1", "n2", "n3"]
    assert refresh["tags"] == ["etc_hosts", "ssh_trust", "slurm_conf"]
    # The refresh gathers no host key: the new nodes' were recorded by their bootstrap.
    assert refresh["extra_vars"] == {
        lifecycle.RECORDED_NODES_VAR: ["n1", "n2", "n3", "n4", "n5"]}
    assert refresh["runs_dir"] == Path("/r")
    assert (outcome.bootstrapped, outcome.refreshed) == (["n4", "n5"], ["n1", "n2", "n3"])
    record = _record(inv)
    assert sorted(record) == ["n1", "n2", "n3", "n4", "n5"]
    assert record["n1"]["provisioned_at"] == first["n1"]["provisioned_at"]
    # The next bootstrap finds nothing new: one full (converging) run of everything.
    run = StandIn()
    lifecycle.bring_in(inv, run=run, say=lambda s: None)
    assert [(c.get("limit"), c.get("tags")) for c in run.calls] == [(None, None)]


def test_an_unreachable_existing_node_does_not_block_and_is_refreshed_next_time(inv_dir):
    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    inv = _add(inv_dir, NewNode("n4", "10.9.0.4"))
    run = StandIn()
    run.failures[1] = _unreachable("n2")
    outcome = lifecycle.bring_in(inv, run=run, say=lambda s: None)
    assert outcome.missed == {"n2": "timed out"} and outcome.refreshed == ["n1", "n3"]
    assert "n2 did not answer (timed out)" in outcome.summary()
    record = _record(inv)
    assert record["n2"]["trust_pending"] and not record["n1"]["trust_pending"]
    assert "n4" in record
    # Another addition: n2 is named as behind, and refreshed with the others.
    inv = _add(inv_dir, NewNode("n5", "10.9.0.5"))
    run, said = StandIn(), []
    lifecycle.bring_in(inv, run=run, say=said.append)
    assert "missed the last trust refresh: n2" in said[0]
    assert run.calls[1]["limit"] == ["n1", "n2", "n3", "n4"]
    assert not _record(inv)["n2"]["trust_pending"]


def test_a_node_that_answers_but_fails_the_refresh_fails_the_run(inv_dir):
    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    inv = _add(inv_dir, NewNode("n4", "10.9.0.4"))
    run = StandIn()
    failed = RunFailed("trust-refresh failed on 1 host(s): n2", nodes=["n2"])
    failed.result = types.SimpleNamespace(failed={"n2": "disk full"}, unreachable={})
    run.failures[1] = failed
    with pytest.raises(RunFailed, match="n2"):
        lifecycle.bring_in(inv, run=run, say=lambda s: None)


def test_an_interrupted_trust_refresh_leaves_the_existing_nodes_pending(inv_dir):
    from dsk_provision.errors import Interrupted

    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    inv = _add(inv_dir, NewNode("n4", "10.9.0.4"))
    run = StandIn()
    run.failures[1] = Interrupted(2)
    with pytest.raises(Interrupted):
        lifecycle.bring_in(inv, run=run, say=lambda s: None)
    record = _record(inv)
    assert [n for n, e in record.items() if e["trust_pending"]] == ["n1", "n2", "n3"]
    assert not record["n4"]["trust_pending"]
    said = []
    lifecycle.bring_in(inv, run=StandIn(), say=said.append)
    assert said[0].splitlines() == ["no new node: full bootstrap of all 4 nodes",
                                    "  missed the last trust refresh: n1, n2, n3"]
    assert not any(e["trust_pending"] for e in _record(inv).values())


def test_a_failed_new_node_records_nothing_and_the_next_run_does_it_again(inv_dir):
    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    before = (_state(load_inventory(inv_dir)) / provisioned.NODES_FILE).read_bytes()
    inv = _add(inv_dir, NewNode("n4", "10.9.0.4"))
    run = StandIn()
    run.failures[0] = RunFailed("bootstrap failed on 1 host(s): n4", nodes=["n4"])
    with pytest.raises(RunFailed, match="n4"):
        lifecycle.bring_in(inv, run=run, say=lambda s: None)
    assert len(run.calls) == 1  # the existing nodes were not touched
    assert (_state(inv) / provisioned.NODES_FILE).read_bytes() == before
    run = StandIn()
    lifecycle.bring_in(inv, run=run, say=lambda s: None)
    assert run.calls[0]["limit"] == ["n4"]


def test_check_mode_plans_and_runs_in_check_mode_but_records_nothing(inv_dir):
    inv, run = load_inventory(inv_dir), StandIn()
    lifecycle.bring_in(inv, run=run, check=True, say=lambda s: None)
    assert run.calls[0]["check"] is True
    assert not (_state(inv) / provisioned.NODES_FILE).exists()


def test_first_bootstrap_records_the_nodes_that_completed(inv_dir):
    inv, run = load_inventory(inv_dir), StandIn()
    run.failures[0] = _unreachable("n2")
    with pytest.raises(RunFailed):
        lifecycle.bring_in(inv, run=run, say=lambda s: None)
    # The stand-in failed before recording keys: n1 and n3 are recorded without any.
    assert sorted(_record(inv)) == ["n1", "n3"]


# --- removal ------------------------------------------------------------------------------

def test_remove_refreshes_the_others_then_edits_inventory_and_record(inv_dir):
    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    run = StandIn()
    outcome, smaller = lifecycle.remove(load_inventory(inv_dir), "n2", run=run,
                                        say=lambda s: None)
    (call,) = run.calls
    assert call["limit"] == ["n1", "n3"]
    assert call["tags"] == ["etc_hosts", "ssh_trust", "slurm_conf"]
    assert call["extra_vars"] == {lifecycle.REMOVED_NODES_VAR: ["n2"],
                                  lifecycle.RECORDED_NODES_VAR: ["n1", "n3"]}
    assert [n.name for n in smaller.nodes] == ["n1", "n3"]
    assert [n.name for n in load_inventory(inv_dir).nodes] == ["n1", "n3"]
    assert sorted(_record(smaller)) == ["n1", "n3"] and outcome.refreshed == ["n1", "n3"]
    assert "n2" not in json.loads(
        (_state(smaller) / provisioned.HOST_KEYS_FILE).read_text())


def test_a_dead_node_is_removed_even_when_no_remaining_node_answers(inv_dir):
    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    run = StandIn()
    run.failures[0] = _unreachable("n1", "n3")  # the role's record was not rewritten
    outcome, smaller = lifecycle.remove(load_inventory(inv_dir), "n2", run=run,
                                        say=lambda s: None)
    assert sorted(outcome.missed) == ["n1", "n3"] and outcome.refreshed == []
    keys = json.loads((_state(smaller) / provisioned.HOST_KEYS_FILE).read_text())
    assert sorted(keys) == ["n1", "n3"]
    assert [n.name for n in load_inventory(inv_dir).nodes] == ["n1", "n3"]
    assert all(e["trust_pending"] for e in _record(smaller).values())


def test_remove_with_an_unreachable_remaining_node_names_it(inv_dir):
    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    run = StandIn()
    run.failures[0] = _unreachable("n3")
    outcome, smaller = lifecycle.remove(load_inventory(inv_dir), "n2", run=run,
                                        say=lambda s: None)
    assert outcome.missed == {"n3": "timed out"} and _record(smaller)["n3"]["trust_pending"]


def test_a_failed_removal_leaves_the_inventory_unchanged(inv_dir):
    before = (inv_dir / "hosts.yml").read_bytes()
    run = StandIn()
    failed = RunFailed("nodes-remove failed on 1 host(s): n1", nodes=["n1"])
    failed.result = types.SimpleNamespace(failed={"n1": "read-only file system"},
                                          unreachable={})
    run.failures[0] = failed
    with pytest.raises(RunFailed):
        lifecycle.remove(load_inventory(inv_dir), "n2", run=run, say=lambda s: None)
    assert (inv_dir / "hosts.yml").read_bytes() == before


def test_remove_rotates_the_cluster_key_on_the_remaining_nodes_last(inv_dir, rotation):
    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    _cluster_key(inv_dir)
    run = StandIn()
    outcome, smaller = lifecycle.remove(load_inventory(inv_dir), "n2", run=run,
                                        say=lambda s: None)
    # Once the node is out of the hosts file: the rotation never waits for it.
    ((nodes, hosts_text),) = rotation.calls
    assert nodes == ["n1", "n3"] and "n2" not in hosts_text and len(run.calls) == 1
    assert outcome.key_warning == ""
    assert "cluster key rotated on 2 nodes: ssh-ed25519 ...new in force" in outcome.summary()


def test_remove_with_keep_key_leaves_the_key_and_says_what_stays_trusted(inv_dir, rotation):
    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    _cluster_key(inv_dir)
    outcome, _ = lifecycle.remove(load_inventory(inv_dir), "n2", run=StandIn(),
                                  say=lambda s: None, rotate_key=False)
    assert rotation.calls == [] and outcome.key_rotation is None
    assert "n2's copy of it still logs in as root to every remaining node" in \
        outcome.key_warning and "keys rotate" in outcome.key_warning


def test_remove_defers_the_rotation_when_a_remaining_node_did_not_answer(inv_dir, rotation):
    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    _cluster_key(inv_dir)
    run = StandIn()
    run.failures[0] = _unreachable("n3")
    outcome, _ = lifecycle.remove(load_inventory(inv_dir), "n2", run=run, say=lambda s: None)
    assert rotation.calls == []
    assert "n3 did not answer, and a rotation needs every node" in outcome.key_warning


def test_remove_without_a_cluster_key_has_nothing_to_rotate(inv_dir, rotation):
    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    outcome, _ = lifecycle.remove(load_inventory(inv_dir), "n2", run=StandIn(),
                                  say=lambda s: None)
    assert rotation.calls == [] and outcome.key_warning == ""


def test_a_failed_rotation_after_a_removal_says_the_removal_is_done(inv_dir, rotation):
    lifecycle.bring_in(load_inventory(inv_dir), run=StandIn(), say=lambda s: None)
    _cluster_key(inv_dir)
    rotation.fail = RunFailed("keys rotate: the authorize step failed", nodes=["n3"],
                              hint="nothing was revoked")
    with pytest.raises(RunFailed) as caught:
        lifecycle.remove(load_inventory(inv_dir), "n2", run=StandIn(), say=lambda s: None)
    assert "n2 is removed" in caught.value.message and caught.value.nodes == ["n3"]
    assert "n2's copy of the cluster key is accepted" in caught.value.hint
    assert [n.name for n in load_inventory(inv_dir).nodes] == ["n1", "n3"]


# --- the command line -----------------------------------------------------------------------

def _cli(*args, input=None):
    return CliRunner().invoke(app, list(args), input=input)


def _flat(text: str) -> str:
    """Output with the terminal's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def no_runs(monkeypatch):
    monkeypatch.setattr(runner, "run_playbook", lambda *a, **kw: pytest.fail("ran"))


class Probe:
    """Stands in for lifecycle.probe_nodes: every node answers except those in ``dead``."""

    def __init__(self, dead=()):
        self.dead, self.asked = set(dead), []

    def __call__(self, inventory, names):
        self.asked.append(list(names))
        return {n: "Connection refused" for n in names if n in self.dead}


class Validations:
    """Stands in for validation.flow.validate: records the nodes it was asked to check."""

    def __init__(self):
        self.only: list = []

    def __call__(self, inventory, **kw):
        self.only.append(kw.get("only"))
        return types.SimpleNamespace(passed=True, run_dir=Path("/runs/validate"))


@pytest.fixture(autouse=True)
def probe(monkeypatch):
    """No test reaches out to the new nodes' addresses unless it asks for it."""
    stand_in = Probe()
    monkeypatch.setattr(lifecycle, "probe_nodes", stand_in)
    return stand_in


@pytest.fixture(autouse=True)
def pins(monkeypatch):
    """The host-key step stands in here (tests/unit/test_lifecycle_hostkeys.py runs the
    real one): every new node's key counts as pinned; the calls are recorded."""
    calls: list[tuple[list[str], tuple[str, ...]]] = []
    monkeypatch.setattr(lifecycle, "pin_host_keys",
                        lambda inv, names, policy, replace=(): calls.append((list(names),
                                                                             replace)))
    return calls


class Rotation:
    """Stands in for lifecycle.rotate_cluster_key (tests/unit/test_keys.py tests the
    rotation): records the nodes of each inventory it was given and the hosts file as it
    was then; ``fail`` makes it raise."""

    def __init__(self):
        self.calls: list[tuple[list[str], str]] = []
        self.fail: Exception | None = None

    def __call__(self, inventory, **kw):
        self.calls.append(([n.name for n in inventory.nodes], inventory.hosts_file.read_text()))
        if self.fail is not None:
            raise self.fail
        return types.SimpleNamespace(to_dict=lambda: {
            "nodes": [n.name for n in inventory.nodes], "new_key": "ssh-ed25519 ...new",
            "old_key": "ssh-ed25519 ...old"})


@pytest.fixture(autouse=True)
def rotation(monkeypatch):
    stand_in = Rotation()
    monkeypatch.setattr(lifecycle, "rotate_cluster_key", stand_in)
    return stand_in


def _cluster_key(inv_dir) -> None:
    """A cluster key file in the cluster's state directory, as the first bootstrap leaves."""
    from dsk_provision import keys

    inv = load_inventory(inv_dir)
    directory = state.claim_cluster_state_dir(inv.cluster_name, inv.hosts_file)
    (directory / keys.key_files(inv).current.name).write_text("a private key\n")


@pytest.fixture(autouse=True)
def validations(monkeypatch):
    import dsk_provision.validation.flow as flow

    stand_in = Validations()
    monkeypatch.setattr(flow, "validate", stand_in)
    return stand_in


@pytest.mark.parametrize("args, message", [
    (["n2", "--host", "10.9.0.20"], "already in the inventory"),
    (["n4", "--host", "10.9.0.1"], "10.9.0.1"),
    (["n4", "--host", "10.9.0.300"], "ansible_host"),
    (["n4"], "NAME --host ADDRESS"),
    (["n4", "--host", "10.9.0.4", "--from", "nodes.yml"], "not both"),
])
def test_bad_additions_exit_2_with_the_inventory_unchanged(inv_dir, no_runs, args, message):
    before = (inv_dir / "hosts.yml").read_bytes()
    result = _cli("nodes", "add", "-i", str(inv_dir), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert (inv_dir / "hosts.yml").read_bytes() == before


@pytest.mark.parametrize("content, message", [
    ("- {name: n4}\n", "[0].host: host is required"),
    ("- {name: n4, host: 10.9.0.4, rack: 7}\n", "unknown keys rack"),
    ("- {name: n4, host: 10.9.0.4, port: '22'}\n", "port must be a whole number"),
    ("n4: 10.9.0.4\n", "must be a YAML list"),
    ("- {name: n4, host: 10.9.0.4}\n- {name: n4, host: 10.9.0.5}\n", "already in the inv"),
])
def test_bad_node_files_exit_2_with_the_inventory_unchanged(inv_dir, tmp_path, no_runs,
                                                            content, message):
    before = (inv_dir / "hosts.yml").read_bytes()
    (tmp_path / "nodes.yml").write_text(content)
    result = _cli("nodes", "add", "-i", str(inv_dir), "--from", str(tmp_path / "nodes.yml"))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert (inv_dir / "hosts.yml").read_bytes() == before


def test_nodes_add_writes_the_nodes_and_brings_them_in(inv_dir, tmp_path, monkeypatch,
                                                       probe, validations):
    run = StandIn()
    monkeypatch.setattr(runner, "run_playbook", run)
    assert _cli("bootstrap", "-i", str(inv_dir)).exit_code == 0
    (tmp_path / "nodes.yml").write_text("- {name: n4, host: 10.9.0.4, gpus: 4}\n"
                                        "- {name: n5, host: 10.9.0.5, port: 2200}\n")
    result = _cli("nodes", "add", "-i", str(inv_dir), "--from", str(tmp_path / "nodes.yml"))
    assert result.exit_code == 0, result.output
    assert "2 new nodes: full bootstrap (n4, n5); 3 existing: trust refresh only" in (
        _flat(result.output))
    assert [c.get("limit") for c in run.calls] == [None, ["n4", "n5"], ["n1", "n2", "n3"]]
    assert probe.asked == [["n4", "n5"]]
    # Then validate: the new nodes' checks (the all-reduce spans every node).
    assert validations.only == [["n4", "n5"]]
    assert "validating the new nodes (n4, n5)" in _flat(result.output)
    assert "all-reduce across the 5 nodes in service" in _flat(result.output)
    text = (inv_dir / "hosts.yml").read_text()
    assert text.startswith(HOSTS) and "n5: {ansible_host: 10.9.0.5, ansible_port: 2200}" in text
    result = _cli("nodes", "add", "-i", str(inv_dir), "n6", "--host", "10.9.0.6",
                  "--gpus", "2", "--port", "22", "--no-validate")
    assert result.exit_code == 0, result.output
    assert run.calls[-2]["limit"] == ["n6"]
    assert validations.only == [["n4", "n5"]] and "not validated (--no-validate)" in (
        _flat(result.output))
    # A failed check fails the command after the addition, which stays recorded.
    import dsk_provision.validation.flow as flow

    def failing(inventory, **kw):
        raise RunFailed("validation failed (1 check(s)): n7 copy_bandwidth", nodes=["n7"])

    monkeypatch.setattr(flow, "validate", failing)
    result = _cli("nodes", "add", "-i", str(inv_dir), "n7", "--host", "10.9.0.7")
    assert result.exit_code == 1
    assert "n7 brought in (recorded), but validation failed" in _flat(result.output)
    assert "n7" in _record(load_inventory(inv_dir))
    assert load_inventory(inv_dir).node("n6").gpus == 2


def test_an_unreachable_new_node_leaves_the_inventory_as_it_was(inv_dir, monkeypatch):
    run = StandIn()
    monkeypatch.setattr(runner, "run_playbook", run)
    assert _cli("bootstrap", "-i", str(inv_dir)).exit_code == 0
    before = (inv_dir / "hosts.yml").read_bytes()
    run.failures[1] = _unreachable("n4")
    result = _cli("nodes", "add", "-i", str(inv_dir), "n4", "--host", "10.9.0.4")
    assert result.exit_code == 1, result.output
    assert "not added: n4 did not answer" in result.output
    assert (inv_dir / "hosts.yml").read_bytes() == before
    # A new node that answers but fails stays, for a second bootstrap to finish it.
    failed = RunFailed("bootstrap failed on 1 host(s): n4", nodes=["n4"])
    failed.result = types.SimpleNamespace(failed={"n4": "apt: no space left"},
                                          unreachable={})
    run.failures[2] = failed
    result = _cli("nodes", "add", "-i", str(inv_dir), "n4", "--host", "10.9.0.4")
    assert result.exit_code == 1 and "n4" in result.output
    assert "n4" in [n.name for n in load_inventory(inv_dir).nodes]
    assert "n4" not in _record(load_inventory(inv_dir))
    run.calls.clear()
    assert _cli("bootstrap", "-i", str(inv_dir)).exit_code == 0
    assert [c.get("limit") for c in run.calls] == [["n4"], ["n1", "n2", "n3"]]
    assert "n4" in _record(load_inventory(inv_dir))


def test_bootstrap_with_limit_or_tags_runs_exactly_that(inv_dir, monkeypatch):
    run = StandIn()
    monkeypatch.setattr(runner, "run_playbook", run)
    assert _cli("bootstrap", "-i", str(inv_dir), "--tags", "common").exit_code == 0
    assert [(c.get("limit"), c.get("tags")) for c in run.calls] == [(None, ["common"])]
    assert not (state.cluster_state_dir("lc") / provisioned.NODES_FILE).exists()


@pytest.mark.parametrize("args, message", [
    (["n9", "--yes"], "n9"),
])
def test_removing_an_unknown_node_exits_2(inv_dir, no_runs, args, message):
    before = (inv_dir / "hosts.yml").read_bytes()
    result = _cli("nodes", "remove", "-i", str(inv_dir), *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert (inv_dir / "hosts.yml").read_bytes() == before


def test_removing_the_only_node_exits_2(tmp_path, no_runs):
    (tmp_path / "hosts.yml").write_text(re.sub(r"        n[23].*\n", "", HOSTS))
    before = (tmp_path / "hosts.yml").read_bytes()
    result = _cli("nodes", "remove", "-i", str(tmp_path), "n1", "--yes")
    assert result.exit_code == 2 and "only node" in result.output, result.output
    assert (tmp_path / "hosts.yml").read_bytes() == before


def test_remove_asks_first(inv_dir, monkeypatch):
    run = StandIn()
    monkeypatch.setattr(runner, "run_playbook", run)
    before = (inv_dir / "hosts.yml").read_bytes()
    result = _cli("nodes", "remove", "-i", str(inv_dir), "n2", input="n\n")
    assert result.exit_code == 1 and "remove n2 (10.9.0.2)" in result.output
    assert run.calls == [] and (inv_dir / "hosts.yml").read_bytes() == before
    result = _cli("nodes", "remove", "-i", str(inv_dir), "n2", input="y\n")
    assert result.exit_code == 0, result.output
    assert "n2 removed; 2 node(s)" in result.output
    assert [n.name for n in load_inventory(inv_dir).nodes] == ["n1", "n3"]


def test_remove_keep_key_warns_and_rotates_nothing(inv_dir, monkeypatch, rotation):
    monkeypatch.setattr(runner, "run_playbook", StandIn())
    assert _cli("bootstrap", "-i", str(inv_dir), "--no-validate").exit_code == 0
    _cluster_key(inv_dir)
    result = _cli("nodes", "remove", "-i", str(inv_dir), "n2", "--yes", "--keep-key")
    assert result.exit_code == 0, result.output
    assert rotation.calls == []
    assert "warning: the cluster key is unchanged" in _flat(result.output)
    result = _cli("nodes", "remove", "-i", str(inv_dir), "n3", "--yes")
    assert result.exit_code == 0, result.output
    assert [nodes for nodes, _ in rotation.calls] == [["n1"]]
    assert "cluster key rotated on 1 node" in _flat(result.output)


# --- the playbook tasks a trust refresh selects ----------------------------------------------

def _listed_tasks(inv_dir, tmp_path, *tags: str) -> list[tuple[str, set[str]]]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_ROLES_PATH": str(REPO / "roles"), "ANSIBLE_NOCOLOR": "1"}
    cmd = [str(Path(runner.sys.executable).parent / "ansible-playbook"), "-i",
           str(inv_dir / "hosts.yml"), str(REPO / "playbooks" / "site.yml"), "--list-tasks",
           "-e", f"dsk_cluster_state_dir={tmp_path}"]
    if tags:
        cmd += ["--tags", ",".join(tags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120,
                          check=True)
    tasks = []
    for line in proc.stdout.splitlines():
        match = re.match(r"^ {6}(\S.*?)\tTAGS: \[(.*)\]$", line)
        if match:
            tasks.append((match[1], {t.strip() for t in match[2].split(",")}))
    return tasks


def test_trust_refresh_selects_only_hosts_and_trust_tasks(inv_dir, tmp_path):
    tasks = _listed_tasks(inv_dir, tmp_path, *lifecycle.TRUST_REFRESH_TAGS)
    assert tasks
    changing = [(name, tags) for name, tags in tasks
                if "always" not in tags]  # the inventory check and argument specs
    refresh_only = "common : List every node in /etc/hosts (trust refresh only)"
    assert refresh_only in {name for name, _ in changing}
    # Apart from that one task of the common role, only the ssh_trust play's tasks and
    # Slurm's configuration files (which skip where Slurm is off).
    others = [(name, tags) for name, tags in changing if name != refresh_only]
    assert others and all("ssh_trust" in tags for name, tags in others
                          if name != "slurm : Refresh the Slurm configuration"), others
    assert "slurm : Refresh the Slurm configuration" in {name for name, _ in others}
    # A full bootstrap does not list the refresh-only task (the common role's own
    # converge writes /etc/hosts there).
    full = [name for name, _ in _listed_tasks(inv_dir, tmp_path)]
    assert "common : List every node in /etc/hosts (trust refresh only)" not in full


def test_etc_hosts_block_leaves_out_a_node_being_removed():
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import init_plugin_loader
    from ansible.template import Templar, trust_as_template

    init_plugin_loader()
    template = (REPO / "roles" / "common" / "templates" / "etc_hosts_block.j2").read_text()
    hostvars = {"n1": {"ansible_host": "10.9.0.1"}, "n2": {"ansible_host": "10.9.0.2"},
                "n3": {"ansible_host": "10.9.0.3"}}

    def render(removed):
        variables = {"groups": {"nodes": list(hostvars)}, "hostvars": hostvars,
                     "dsk_removed_nodes": removed}
        return Templar(loader=DataLoader(), variables=variables).template(
            trust_as_template(template)).splitlines()

    assert render([]) == ["10.9.0.1 n1", "10.9.0.2 n2", "10.9.0.3 n3"]
    assert render(["n2"]) == ["10.9.0.1 n1", "10.9.0.3 n3"]


def test_nodes_commands_are_listed():
    out = _cli("nodes", "--help").output
    for command in ("add", "remove", "replace", "cordon", "uncordon"):
        assert re.search(rf"^\W*{command}\s", out, re.MULTILINE), out


# --- additions refused before any change, replacements ---------------------------------------

_REAL_PROBE = lifecycle.probe_nodes  # the autouse fixture replaces it in every test

def test_an_unreachable_new_host_is_refused_before_the_inventory_is_written(
        inv_dir, monkeypatch, probe):

    run = StandIn()
    monkeypatch.setattr(runner, "run_playbook", run)
    assert _cli("bootstrap", "-i", str(inv_dir)).exit_code == 0
    run.calls.clear()
    before = (inv_dir / "hosts.yml").read_bytes()
    probe.dead = {"n5"}
    result = _cli("nodes", "add", "-i", str(inv_dir), "n5", "--host", "10.9.0.5")
    assert result.exit_code == 1, result.output
    assert "not added: n5 did not answer over SSH" in _flat(result.output)
    assert "n5 (10.9.0.5): Connection refused" in _flat(result.output)
    assert (inv_dir / "hosts.yml").read_bytes() == before and run.calls == []
    # The real probe, on a port of this machine where nothing listens.
    monkeypatch.setattr(lifecycle, "probe_nodes", _REAL_PROBE)
    port = free_port()
    result = _cli("nodes", "add", "-i", str(inv_dir), "n4", "--host", "127.0.0.1",
                  "--port", str(port))
    assert result.exit_code == 1, result.output
    out = _flat(result.output)
    assert "n4 did not answer over SSH" in out and "refused" in out
    assert (inv_dir / "hosts.yml").read_bytes() == before and run.calls == []


def test_a_removed_name_still_pinned_somewhere_is_refused_until_that_node_is_updated(
        inv_dir, monkeypatch):
    run = StandIn()
    monkeypatch.setattr(runner, "run_playbook", run)
    assert _cli("bootstrap", "-i", str(inv_dir)).exit_code == 0
    run.failures[1] = _unreachable("n3")
    assert _cli("nodes", "remove", "-i", str(inv_dir), "n2", "--yes").exit_code == 0
    before = (inv_dir / "hosts.yml").read_bytes()
    calls = len(run.calls)
    result = _cli("nodes", "add", "-i", str(inv_dir), "n2", "--host", "10.9.0.22")
    assert result.exit_code == 2, result.output
    assert "'n2' was removed while n3 did not answer" in _flat(result.output)
    assert (inv_dir / "hosts.yml").read_bytes() == before and len(run.calls) == calls
    # Once n3 has been brought up to date, the name is free again.
    assert _cli("bootstrap", "-i", str(inv_dir), "--no-validate").exit_code == 0
    assert provisioned.load_removed(_state(load_inventory(inv_dir))) == {}
    result = _cli("nodes", "add", "-i", str(inv_dir), "n2", "--host", "10.9.0.22",
                  "--no-validate")
    assert result.exit_code == 0, result.output


def test_an_interrupted_addition_is_finished_by_bootstrap(inv_dir, monkeypatch):
    from dsk_provision.errors import Interrupted

    run = StandIn()
    monkeypatch.setattr(runner, "run_playbook", run)
    assert _cli("bootstrap", "-i", str(inv_dir)).exit_code == 0
    run.failures[1] = Interrupted(2)
    result = _cli("nodes", "add", "-i", str(inv_dir), "n4", "--host", "10.9.0.4")
    assert result.exit_code == 130, result.output
    assert "n4" not in _record(load_inventory(inv_dir))
    # The same command again says how to finish it; bootstrap does.
    result = _cli("nodes", "add", "-i", str(inv_dir), "n4", "--host", "10.9.0.4")
    assert result.exit_code == 2 and "dsk-provision bootstrap" in _flat(result.output)
    run.calls.clear()
    run.failures.clear()
    result = _cli("bootstrap", "-i", str(inv_dir))
    assert result.exit_code == 0, result.output
    assert "1 new node: full bootstrap (n4); 3 existing" in _flat(result.output)
    assert [c.get("limit") for c in run.calls] == [["n4"], ["n1", "n2", "n3"]]
    assert "n4" in _record(load_inventory(inv_dir))


def test_replace_forgets_the_host_key_and_brings_the_node_in_again(inv_dir, monkeypatch,
                                                                    probe, validations):
    run = StandIn()
    monkeypatch.setattr(runner, "run_playbook", run)
    assert _cli("bootstrap", "-i", str(inv_dir)).exit_code == 0
    directory = _state(load_inventory(inv_dir))
    keys = json.loads((directory / provisioned.HOST_KEYS_FILE).read_text())
    keys["n2"] = [KEY]  # the old hardware's key
    (directory / provisioned.HOST_KEYS_FILE).write_text(json.dumps(keys))
    run.calls.clear()
    result = _cli("nodes", "replace", "-i", str(inv_dir), "n2", "--yes")
    assert result.exit_code == 0, result.output
    assert "1 new node: full bootstrap (n2); 2 existing: trust refresh only" in _flat(result.output)
    new, refresh = run.calls
    assert new["limit"] == ["n2"] and refresh["limit"] == ["n1", "n3"]
    assert refresh["extra_vars"][lifecycle.RECORDED_NODES_VAR] == ["n1", "n3", "n2"]
    # The new node's bootstrap found no recorded key: it learnt the one it has now.
    keys = json.loads((directory / provisioned.HOST_KEYS_FILE).read_text())
    assert keys["n2"] == [_key("n2")]
    assert _record(load_inventory(inv_dir))["n2"]["host_key_fingerprints"] == [
        provisioned.host_key_fingerprint(_key("n2"))]
    assert validations.only == [["n2"]]


def test_replace_at_a_new_address_that_does_not_answer_changes_nothing(inv_dir, monkeypatch,
                                                                       probe):
    run = StandIn()
    monkeypatch.setattr(runner, "run_playbook", run)
    assert _cli("bootstrap", "-i", str(inv_dir)).exit_code == 0
    run.calls.clear()
    before = (inv_dir / "hosts.yml").read_bytes()
    nodes_before = (_state(load_inventory(inv_dir)) / provisioned.NODES_FILE).read_bytes()
    probe.dead = {"n2"}
    result = _cli("nodes", "replace", "-i", str(inv_dir), "n2", "--host", "10.9.0.42",
                  "--yes")
    assert result.exit_code == 1 and "not replaced: n2 did not answer" in _flat(result.output)
    assert "n2 (10.9.0.42)" in _flat(result.output)
    assert (inv_dir / "hosts.yml").read_bytes() == before and run.calls == []
    assert (_state(load_inventory(inv_dir)) / provisioned.NODES_FILE).read_bytes() == (
        nodes_before)
    probe.dead = set()
    result = _cli("nodes", "replace", "-i", str(inv_dir), "n2", "--host", "10.9.0.42",
                  "--yes", "--no-validate")
    assert result.exit_code == 0, result.output
    assert load_inventory(inv_dir).node("n2").address == "10.9.0.42"
    assert _record(load_inventory(inv_dir))["n2"]["address"] == "10.9.0.42"


@pytest.mark.parametrize("args, message", [
    (["n9", "--yes"], "n9"),
    (["n2", "--host", "10.9.0.1", "--yes"], "10.9.0.1"),
])
def test_bad_replacements_exit_2_with_the_inventory_unchanged(inv_dir, monkeypatch, args,
                                                              message):
    run = StandIn()
    monkeypatch.setattr(runner, "run_playbook", run)
    assert _cli("bootstrap", "-i", str(inv_dir)).exit_code == 0
    before = (inv_dir / "hosts.yml").read_bytes()
    result = _cli("nodes", "replace", "-i", str(inv_dir), *args)
    assert result.exit_code == 2, result.output
    assert message in _flat(result.output)
    assert (inv_dir / "hosts.yml").read_bytes() == before
