"""The console of a playbook run (dsk_provision.runview), fed ansible-runner job events.

fixtures/bootstrap_events_3nodes.jsonl.gz: the job events of a real first bootstrap of
the 3-node sandbox (site.yml), cut down to the fields the console reads. Larger clusters
are made from it by giving more nodes node2's results (node1 also runs the control-node
tasks), so the stream keeps the shape of a real run at any node count.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from dsk_provision.runner import PlaybookResult, render_recap
from dsk_provision.runview import FEW_HOSTS, RunConsole

RECORDED = Path(__file__).parent / "fixtures" / "bootstrap_events_3nodes.jsonl.gz"
NOTE = "Skipping the NCCL libraries: no NVIDIA GPU on this node"
QUIET_TASK = "Check that the operating system is supported"  # ok on every node
CHANGED_TASK = "common : Point apt at the mirror"  # changed on every node


def recorded() -> list[dict]:
    with gzip.open(RECORDED, "rt") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def widen(events: list[dict], nodes: int) -> list[dict]:
    """The recorded run on ``nodes`` nodes: node4.. get node2's results."""
    extra = [f"node{i}" for i in range(4, nodes + 1)]
    out = []
    for event in events:
        out.append(event)
        data = event["event_data"]
        if data.get("host") == "node2":
            for host in extra:
                twin = copy.deepcopy(event)
                twin["event_data"]["host"] = host
                out.append(twin)
        if event["event"] == "playbook_on_stats":
            for counts in data.values():
                if isinstance(counts, dict) and "node2" in counts:
                    counts.update(dict.fromkeys(extra, counts["node2"]))
    return out


def hosts_of(events: list[dict]) -> list[str]:
    return sorted({e["event_data"]["host"] for e in events if e["event_data"].get("host")},
                  key=lambda h: (len(h), h))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def view(events: list[dict], *, per_host: bool = False,
         clock=None) -> tuple[RunConsole, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    screen = RunConsole(console, hosts_of(events), live=False, per_host=per_host,
                        clock=clock or Clock())
    return screen, out


def play(events: list[dict], **kw) -> str:
    screen, out = view(events, **kw)
    with screen:
        for event in events:
            screen.handle(event)
    return out.getvalue()


def result_event(kind: str, host: str, task: str, res: dict | None = None, **data) -> dict:
    return {"event": kind, "event_data": {"host": host, "task": task, "res": res or {},
                                          **data}}


def test_recorded_bootstrap_shows_changes_notes_and_play_totals():
    events = recorded()
    text = play(events)
    lines = text.splitlines()

    assert sum(ln.startswith("PLAY ") for ln in lines) == 6
    assert f"  changed     {CHANGED_TASK}: changed 3 (node1, node2, node3) [0.0 s]" in lines
    # A task ok or skipped everywhere has no line of its own ...
    assert QUIET_TASK not in text
    # ... a role's reason for a skip prints once for all the hosts that gave it.
    notes = [ln for ln in lines if NOTE in ln]
    assert len(notes) == 1 and notes[0].startswith("  note (node1, node2, node3): ")
    # The plays' totals add up to the results in the stream, and to Ansible's own recap
    # (which counts a change as ok too).
    totals = {"ok": 0, "changed": 0, "skipped": 0}
    for ln in lines:
        if ln.startswith("  done: "):
            for part in ln.split(": ", 2)[2].split(", "):
                status, count = part.split()
                totals[status] += int(count)
    stats = next(e for e in events if e["event"] == "playbook_on_stats")["event_data"]
    assert totals["ok"] + totals["changed"] == sum(stats["ok"].values())
    assert totals["changed"] == sum(1 for e in events if e["event"] == "runner_on_ok"
                                    and e["event_data"]["res"].get("changed"))
    assert totals["skipped"] == sum(stats["skipped"].values())


@pytest.mark.parametrize("nodes", [8, 64])
def test_line_count_does_not_grow_with_the_node_count(nodes):
    base = play(recorded()).splitlines()
    wide = play(widen(recorded(), nodes)).splitlines()
    assert len(wide) == len(base)
    # every node changed: counted, not named
    assert f"  changed     {CHANGED_TASK}: changed {nodes} (all) [0.0 s]" in wide
    assert not any("node7" in ln for ln in wide)


def test_a_change_on_a_few_nodes_names_them():
    events = widen(recorded(), 64)
    for event in events:
        data = event["event_data"]
        if (event["event"] == "runner_on_ok" and data.get("task") == QUIET_TASK
                and data["host"] in ("node5", "node40")):
            data["res"]["changed"] = True
    lines = play(events).splitlines()
    assert (f"  changed     preflight : {QUIET_TASK}: ok 62, changed 2 (node5, node40) [0.0 s]"
            in lines)
    assert len(lines) == len(play(widen(recorded(), 64)).splitlines()) + 1

    # More than a few: counted only.
    for event in events:
        data = event["event_data"]
        if event["event"] == "runner_on_ok" and data.get("task") == QUIET_TASK:
            data["res"]["changed"] = int(data["host"].removeprefix("node")) <= FEW_HOSTS + 1
    lines = play(events).splitlines()
    assert (f"  changed     preflight : {QUIET_TASK}: ok {64 - FEW_HOSTS - 1}, "
            f"changed {FEW_HOSTS + 1} [0.0 s]") in lines


def test_a_failure_prints_at_once_with_its_message():
    events = widen(recorded(), 8)
    # node6 fails the OS check; Ansible then leaves it out of the rest of the run.
    cut = next(i for i, e in enumerate(events)
               if e["event_data"].get("host") == "node6"
               and e["event_data"].get("task") == QUIET_TASK and e["event"] == "runner_on_ok")
    failed = copy.deepcopy(events[cut])
    failed["event"] = "runner_on_failed"
    failed["event_data"]["res"] = {"msg": "Debian 11 is not supported", "changed": False}
    after = [e for e in events[cut + 1:] if e["event_data"].get("host") != "node6"]

    screen, out = view(events)
    with screen:
        for event in events[:cut] + [failed]:
            screen.handle(event)
        # before the task has ended, the failure is on the console with its message
        assert out.getvalue().splitlines()[-1] == (
            f"  FAILED node6: preflight : {QUIET_TASK}: Debian 11 is not supported")
        for event in after:
            screen.handle(event)
    lines = out.getvalue().splitlines()
    assert f"  failed      preflight : {QUIET_TASK}: ok 7, failed 1 (node6) [0.0 s]" in lines
    # the hosts left carry on: the next task counts 7 of them, not 8
    assert f"  changed     {CHANGED_TASK}: changed 7 (all) [0.0 s]" in lines


def test_unreachable_and_ignored_failures():
    events = [{"event": "playbook_on_play_start", "event_data": {"play": "p"}},
              {"event": "playbook_on_task_start", "event_data": {"task": "t"}},
              result_event("runner_on_ok", "a", "t"),
              result_event("runner_on_unreachable", "b", "t",
                           {"msg": "Failed to connect to the host via ssh: timed out"}),
              result_event("runner_on_failed", "c", "t", {"msg": "nope"}, ignore_errors=True),
              {"event": "playbook_on_stats", "event_data": {}}]
    lines = play(events).splitlines()
    assert "  UNREACHABLE b: t: Failed to connect to the host via ssh: timed out" in lines
    assert not any(ln.startswith("  FAILED c") for ln in lines)  # ignored: not a failure
    assert "  unreachable t: ok 1, unreachable 1 (b), ignored 1 (c) [0.0 s]" in lines


def test_no_log_failures_stay_hidden():
    events = [{"event": "playbook_on_task_start", "event_data": {"task": "secret"}},
              result_event("runner_on_failed", "a", "secret",
                           {"censored": "the output has been hidden", "msg": "password=x",
                            "_ansible_no_log": True})]
    text = play(events)
    assert "FAILED a: secret: output hidden (no_log: true)" in text
    assert "password" not in text


def test_verbose_gives_a_line_per_host_and_task():
    events = widen(recorded(), 8)
    lines = play(events, per_host=True).splitlines()
    results = [e for e in events if e["event"].startswith("runner_on_")
               and e["event"] != "runner_on_start"]
    host_lines = [ln for ln in lines if ln.startswith("    node")]
    assert len(host_lines) == len(results)
    assert f"    node7: ok          {QUIET_TASK}" in lines
    assert any(ln.startswith("    node8: ok          Say why the NCCL libraries are skipped: "
                             + NOTE) for ln in lines)


def test_status_area_shows_task_hosts_done_and_who_is_left():
    clock = Clock()
    screen, _out = view([], clock=clock)
    screen.run_hosts = [f"node{i}" for i in range(1, 9)]  # the inventory's nodes
    screen.handle({"event": "playbook_on_play_start", "event_data": {"play": "Common base"}})
    clock.now += 60
    screen.handle({"event": "playbook_on_task_start",
                   "event_data": {"task": "Install the base packages", "role": "common"}})
    for host in screen.run_hosts:
        screen.handle({"event": "runner_on_start", "event_data": {"host": host}})
    for i, host in enumerate(screen.run_hosts[:6]):
        kind = "runner_on_ok"
        screen.handle(result_event(kind, host, "Install the base packages",
                                   {"changed": i < 2}))
    clock.now += 65
    head, tail = screen.status().plain.splitlines()
    assert head == "Common base | task 1: common : Install the base packages"
    assert tail.startswith("hosts 6/8 done  ok 4  changed 2  skipped 0  failed 0  "
                           "unreachable 0  task 01:05  elapsed 02:05")
    assert tail.endswith("waiting on node7, node8")


def test_recap_table_groups_hosts_with_the_same_counts():
    same = {"ok": 80, "changed": 14, "failed": 0, "unreachable": 0, "skipped": 39,
            "rescued": 0, "ignored": 0}
    recap = {f"node{i}": dict(same) for i in range(1, 65)}
    recap["node1"]["ok"] = 94
    recap["node9"]["failed"] = 1
    result = PlaybookResult(run_dir=Path("/runs/x"), rc=2, recap=recap)
    out = io.StringIO()
    render_recap(result, Console(file=out, width=120))
    rows = [ln for ln in out.getvalue().splitlines() if ln.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == [
        "node1", "62 hosts (node2 ... node64)", "node9"]
    out = io.StringIO()
    render_recap(result, Console(file=out, width=120), per_host=True)
    assert len([ln for ln in out.getvalue().splitlines() if ln.startswith("│")]) == 64


def test_eight_node_bootstrap_fits_the_line_budget():
    """What the runner prints for a bootstrap of 8 nodes, the recap included."""
    events = widen(recorded(), 8)
    screen, out = view(events)
    with screen:
        for event in events:
            screen.handle(event)
    stats = next(e for e in events if e["event"] == "playbook_on_stats")["event_data"]
    recap = {h: {"ok": stats["ok"][h], "changed": stats["changed"][h], "failed": 0,
                 "unreachable": 0, "skipped": stats["skipped"][h], "rescued": 0}
             for h in hosts_of(events)}
    render_recap(PlaybookResult(run_dir=Path("/runs/x"), rc=0, recap=recap), screen.console)
    count = len(out.getvalue().splitlines()) + 1  # and the runner's first line
    assert count <= 150, out.getvalue()


def test_notes_that_name_their_host_do_not_make_a_line_per_host():
    hosts = [f"node{i}" for i in range(1, 65)]
    events = [{"event": "playbook_on_task_start", "event_data": {"task": "Say why"}}]
    events += [result_event("runner_on_ok", h, "Say why", {"msg": f"no widget on {h}"},
                            task_action="ansible.builtin.debug") for h in hosts]
    events += [result_event("runner_on_ok", h, "Say why", {"msg": "no GPU"},
                            task_action="ansible.builtin.debug") for h in ("x1", "x2")]
    lines = play(events).splitlines()
    assert lines[0] == "  note (x1, x2): no GPU"  # the most common message first
    assert len(lines) == FEW_HOSTS + 1
    assert lines[-1] == (f"  note: {64 - FEW_HOSTS + 1} other message(s) from "
                         f"{64 - FEW_HOSTS + 1} host(s) for Say why: see the hosts' logs in "
                         "the run directory")


def test_a_rescued_host_counts_again_in_the_next_tasks():
    events = [{"event": "playbook_on_play_start", "event_data": {"play": "p"}}]
    for task, results in (("one", {"a": "ok", "b": "ok"}), ("two", {"a": "ok", "b": "failed"}),
                          ("rescue", {"b": "ok"}), ("three", {"a": "ok", "b": "ok"})):
        events.append({"event": "playbook_on_task_start", "event_data": {"task": task}})
        events += [result_event(f"runner_on_{r}", h, task, {"changed": True}) for h, r
                   in results.items()]
    screen, _out = view(events)
    with screen:
        for event in events[:-1]:
            screen.handle(event)
        # "three" has begun: a answered; b, back after its rescue, is still expected
        assert screen.status().plain.splitlines()[1].startswith("hosts 1/2 done")
