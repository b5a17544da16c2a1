"""New nodes' host keys on their way in: `nodes add`, a bootstrap that finds a node written
into hosts.yml by hand, and `nodes replace` trust them only through hostkeys.trust, as
`hostkeys scan` does: already pinned, confirmed (a prompt, or --yes), or vouched for by
--expect; a key that differs from the recorded one is refused with both fingerprints and
the inventory stays as it was. The playbook runs, the SSH probe and validate stand in; the
keys come from a stand-in ssh-keyscan (tests/unit/test_hostkeys.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import types
from pathlib import Path

import pytest
from test_hostkeys import FAKE_KEYSCAN, found_in, keygen
from test_lifecycle import StandIn
from typer.testing import CliRunner

import dsk_provision.runner as runner
from dsk_provision import lifecycle
from dsk_provision.cli import app

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                reason="ssh-keygen is missing (apt-get install openssh-client)")

NODES = {"n1": "10.9.0.1", "n2": "10.9.0.2", "n3": "10.9.0.3"}


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A bootstrapped two-node cluster (n1, n2) whose keys are pinned in the inventory's
    known_hosts, and n3 (10.9.0.3) answering ssh-keyscan with a key nobody pinned yet."""
    bin_dir, keys_dir = tmp_path / "bin", tmp_path / "keys"
    bin_dir.mkdir()
    keys_dir.mkdir()
    (bin_dir / "ssh-keyscan").write_text(FAKE_KEYSCAN)
    os.chmod(bin_dir / "ssh-keyscan", 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_KEYS", str(keys_dir))
    keys = {name: keygen(keys_dir / f"{addr}_22") for name, addr in NODES.items()}
    known = tmp_path / "known_hosts"
    known.write_text("".join(f"{n},{NODES[n]} {keys[n].line}\n" for n in ("n1", "n2")))
    inv = tmp_path / "inv"
    (inv / "group_vars").mkdir(parents=True)
    (inv / "hosts.yml").write_text(
        "all:\n  children:\n    nodes:\n      hosts:\n"
        + "".join(f"        {n}: {{ansible_host: {NODES[n]}}}\n" for n in ("n1", "n2")))
    (inv / "group_vars" / "all.yml").write_text(
        "dsk_cluster_name: lk\ndsk_gpus_per_node: 0\n"
        f"ansible_ssh_common_args: -o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes\n")
    run = StandIn()
    monkeypatch.setattr(runner, "run_playbook", run)
    monkeypatch.setattr(lifecycle, "probe_nodes", lambda inventory, names: {})
    import dsk_provision.validation.flow as flow

    monkeypatch.setattr(flow, "validate", lambda inventory, **kw: types.SimpleNamespace(
        passed=True, run_dir=Path("/runs/validate")))
    assert _cli("bootstrap", "-i", str(inv)).exit_code == 0
    run.calls.clear()
    return types.SimpleNamespace(inv=inv, known=known, keys=keys, keys_dir=keys_dir, run=run)


def _cli(*args: str, input: str = ""):
    return CliRunner().invoke(app, list(args), input=input)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _add_n3(c, *extra: str):
    return _cli("nodes", "add", "-i", str(c.inv), "n3", "--host", NODES["n3"],
                "--no-validate", *extra)


def _unchanged(c, hosts: bytes, known: bytes) -> None:
    assert (c.inv / "hosts.yml").read_bytes() == hosts
    assert c.known.read_bytes() == known
    assert c.run.calls == []


def test_an_unconfirmed_new_key_leaves_everything_as_it_was(cluster):
    hosts, known = (cluster.inv / "hosts.yml").read_bytes(), cluster.known.read_bytes()
    result = _add_n3(cluster)  # no answer: end of input is no
    assert result.exit_code == 1, result.output
    out = _flat(result.output)
    assert cluster.keys["n3"].fingerprint in out
    assert "not confirmed: nothing written" in out
    _unchanged(cluster, hosts, known)


@pytest.mark.parametrize("how", ["answer", "yes", "expect"])
def test_a_confirmed_or_expected_key_is_pinned_then_the_node_brought_in(cluster, tmp_path,
                                                                        how):
    extra, answer = [], ""
    if how == "answer":
        answer = "y\n"
    elif how == "yes":
        extra = ["--yes"]
    else:
        (tmp_path / "fp.txt").write_text(f"n3 {cluster.keys['n3'].fingerprint}\n")
        extra = ["--expect", str(tmp_path / "fp.txt")]
    result = CliRunner().invoke(app, ["nodes", "add", "-i", str(cluster.inv), "n3", "--host",
                                      NODES["n3"], "--no-validate", *extra], input=answer)
    assert result.exit_code == 0, result.output
    assert f"n3,{NODES['n3']} {cluster.keys['n3'].line}" in cluster.known.read_text()
    assert [c.get("limit") for c in cluster.run.calls] == [["n3"], ["n1", "n2"]]
    assert "n3:" in (cluster.inv / "hosts.yml").read_text()


def test_a_key_already_pinned_needs_no_confirmation(cluster):
    """The sandbox's case: its known_hosts pins its spare nodes' keys when they start."""
    with cluster.known.open("a") as fh:
        fh.write(f"n3,{NODES['n3']} {cluster.keys['n3'].line}\n")
    result = _add_n3(cluster)
    assert result.exit_code == 0, result.output
    assert [c.get("limit") for c in cluster.run.calls] == [["n3"], ["n1", "n2"]]


def test_a_key_that_differs_from_the_expected_one_is_refused(cluster, tmp_path):
    hosts, known = (cluster.inv / "hosts.yml").read_bytes(), cluster.known.read_bytes()
    other = keygen(tmp_path / "other")
    (tmp_path / "fp.txt").write_text(f"n3 {other.fingerprint}\n")
    result = _add_n3(cluster, "--expect", str(tmp_path / "fp.txt"), "--yes")
    assert result.exit_code == 4, result.output
    out = _flat(result.output)
    assert other.fingerprint in out and cluster.keys["n3"].fingerprint in out
    _unchanged(cluster, hosts, known)


def test_a_key_that_differs_from_the_recorded_one_is_refused_even_with_yes(cluster,
                                                                            tmp_path):
    """n3's address was pinned with another key (an earlier `hostkeys scan`): what answers
    there now is refused with both fingerprints, --yes or not."""
    recorded = keygen(tmp_path / "recorded")
    with cluster.known.open("a") as fh:
        fh.write(f"n3,{NODES['n3']} {recorded.line}\n")
    hosts, known = (cluster.inv / "hosts.yml").read_bytes(), cluster.known.read_bytes()
    result = _add_n3(cluster, "--yes")
    assert result.exit_code == 4, result.output
    out = _flat(result.output)
    assert "host key changed" in out
    assert recorded.fingerprint in out and cluster.keys["n3"].fingerprint in out
    _unchanged(cluster, hosts, known)


def test_a_hand_written_node_goes_through_the_same_path_at_bootstrap(cluster):
    with (cluster.inv / "hosts.yml").open("a") as fh:
        fh.write(f"        n3: {{ansible_host: {NODES['n3']}}}\n")
    hosts, known = (cluster.inv / "hosts.yml").read_bytes(), cluster.known.read_bytes()
    result = _cli("bootstrap", "-i", str(cluster.inv), "--no-validate")
    assert result.exit_code == 1, result.output
    assert "not confirmed: nothing written" in _flat(result.output)
    _unchanged(cluster, hosts, known)
    result = _cli("bootstrap", "-i", str(cluster.inv), "--no-validate", "--yes")
    assert result.exit_code == 0, result.output
    assert cluster.keys["n3"].fingerprint in _flat(result.output)
    assert f"n3,{NODES['n3']} {cluster.keys['n3'].line}" in cluster.known.read_text()
    assert [c.get("limit") for c in cluster.run.calls] == [["n3"], ["n1", "n2"]]


def test_a_replaced_node_gets_its_new_key_pinned_in_place_of_the_old(cluster):
    old = cluster.keys["n2"]
    (cluster.keys_dir / f"{NODES['n2']}_22").unlink()
    (cluster.keys_dir / f"{NODES['n2']}_22.pub").unlink()
    new = keygen(cluster.keys_dir / f"{NODES['n2']}_22")
    result = _cli("nodes", "replace", "-i", str(cluster.inv), "n2", "--yes", "--no-validate")
    assert result.exit_code == 0, result.output
    assert new.fingerprint in _flat(result.output)
    text = cluster.known.read_text()
    assert new.blob in text and old.blob not in text
    assert [c.get("limit") for c in cluster.run.calls] == [["n2"], ["n1"]]


def _moved_n2(c) -> str:
    """n2 answers at a new address with the host key pinned for it: its new address. The
    recorded host keys are the nodes' own (the stand-in runner records made-up ones)."""
    import json

    from dsk_provision import provisioned, state

    directory = state.cluster_state_dir("lk")
    (directory / provisioned.HOST_KEYS_FILE).write_text(
        json.dumps({n: [c.keys[n].line] for n in ("n1", "n2")}))
    new = "10.9.0.22"
    for suffix in ("", ".pub"):
        shutil.copy(c.keys_dir / f"{NODES['n2']}_22{suffix}", c.keys_dir / f"{new}_22{suffix}")
    return new


def _pinned_at(c, name: str, address: str) -> None:
    lines = [ln for ln in c.known.read_text().splitlines() if c.keys[name].blob in ln]
    assert lines == [f"{name},{address} {c.keys[name].line}"], lines


def _hash(c, hashed: bool) -> list[str]:
    """With ``hashed``, the known_hosts file as ``ssh-keygen -H`` leaves it (each name on a
    line of its own, as a hash; only the record of provisioned nodes says where n2 was):
    the lines of n1, which must stay as they are."""
    if hashed:
        subprocess.run(["ssh-keygen", "-H", "-f", str(c.known)], check=True,
                       capture_output=True)
        Path(f"{c.known}.old").unlink()
        assert NODES["n2"] not in c.known.read_text()
    return [ln for ln in c.known.read_text().splitlines() if c.keys["n1"].blob in ln]


def _moved_away(c, new: str, n1_lines: list[str]) -> None:
    _pinned_at(c, "n2", new)
    assert c.keys["n2"].blob not in found_in(c.known, NODES["n2"])
    assert [ln for ln in c.known.read_text().splitlines() if c.keys["n1"].blob in ln] \
        == n1_lines


@pytest.mark.parametrize("hashed", [False, True])
def test_a_bootstrap_pins_a_node_under_its_new_address_and_drops_the_old(cluster, hashed):
    new = _moved_n2(cluster)
    n1_lines = _hash(cluster, hashed)
    text = (cluster.inv / "hosts.yml").read_text()
    (cluster.inv / "hosts.yml").write_text(text.replace(NODES["n2"] + "}", new + "}"))
    result = _cli("bootstrap", "-i", str(cluster.inv), "--no-validate")  # nothing to confirm
    assert result.exit_code == 0, result.output
    assert "at a new address or port: n2" in _flat(result.output)
    _moved_away(cluster, new, n1_lines)
    assert [c.get("limit") for c in cluster.run.calls] == [["n2"], ["n1"]]


@pytest.mark.parametrize("hashed", [False, True])
def test_replace_with_a_new_address_pins_the_node_there_and_drops_the_old(cluster, hashed):
    new = _moved_n2(cluster)
    n1_lines = _hash(cluster, hashed)
    result = _cli("nodes", "replace", "-i", str(cluster.inv), "n2", "--host", new, "--yes",
                  "--no-validate")
    assert result.exit_code == 0, result.output
    _moved_away(cluster, new, n1_lines)
