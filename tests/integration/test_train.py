"""train across the 3-node sandbox: the loss falls; a rank that dies stops the run by name."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from dsk_provision.errors import RunFailed
from dsk_provision.inventory import load_inventory
from dsk_provision.joblaunch import train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "trainer" / "configs" / "tiny.toml"


def test_train_across_nodes_lowers_the_loss(sandbox_cluster, tmp_path, capsys):
    inventory = load_inventory(sandbox_cluster.inventory_path)
    result = train(inventory, TINY, runs_dir=tmp_path, timeout_s=600)
    assert result.world_size == 3
    assert result.last_loss < result.first_loss
    lines = [json.loads(x) for x in result.metrics_path.read_text().splitlines() if x.strip()]
    assert lines[0]["loss"] == pytest.approx(result.first_loss)
    assert json.loads(result.summary_path.read_text())
    for name in ("node1", "node2", "node3"):
        assert (result.run_dir / "logs" / f"{name}.log").stat().st_size > 0
    out = capsys.readouterr().out
    assert "[node1]" in out and "[node3]" in out


def test_a_dying_rank_fails_fast_naming_its_node(sandbox_cluster, node_ssh, tmp_path):
    # node2's ranks are given a network interface that does not exist: its rank dies in
    # init_process_group while node1 and node3 wait for it.
    data = yaml.safe_load(Path(sandbox_cluster.inventory_path).read_text())
    data["all"]["children"]["nodes"]["hosts"]["node2"]["dsk_socket_ifname"] = "nosuch0"
    bad = tmp_path / "inventory" / "hosts.yml"
    bad.parent.mkdir()
    bad.write_text(yaml.safe_dump(data))
    inventory = load_inventory(bad)
    started = time.monotonic()
    with pytest.raises(RunFailed) as err:
        train(inventory, TINY, runs_dir=tmp_path / "runs", timeout_s=300)
    elapsed = time.monotonic() - started
    assert err.value.nodes == ["node2"]
    assert "on node2" in str(err.value)
    assert "stopped node1, node3" in str(err.value)
    assert elapsed < 120
    (run_dir,) = (tmp_path / "runs").glob("*-train")
    assert "nosuch0" in (run_dir / "logs" / "node2.log").read_text()
    # Nothing of the job is left on any node. (Bracketed first letters keep the pattern
    # from matching the shell that runs pgrep.)
    for name, ip in sandbox_cluster.nodes:
        proc = node_ssh(ip, "pgrep -af '[t]orch[.]distributed[.]run|[t]rainer[.]train'",
                        check=False)
        assert proc.stdout.strip() == "", f"left running on {name}:\n{proc.stdout}"
