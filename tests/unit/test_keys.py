"""`keys rotate` on the control node: the key files through every step and every
interruption between them, the login test with the next key, and the order of the
steps (nothing retired before every node accepted the next key). The nodes' side runs in
tests/integration/test_keys_rotate.py."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dsk_provision import keys, state, trust
from dsk_provision.cli import app
from dsk_provision.errors import InputError, RunFailed
from dsk_provision.inventory import load_inventory


def _inventory(directory: Path, nodes: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    hosts = {f"node{i}": {"ansible_host": f"10.0.0.{i}"} for i in range(1, nodes + 1)}
    (directory / "hosts.yml").write_text(yaml.safe_dump({"all": {
        "vars": {"dsk_cluster_name": "rot", "dsk_gpus_per_node": 0},
        "children": {"nodes": {"hosts": hosts}}}}))
    return directory / "hosts.yml"


def _keygen(path: Path, comment: str = "dsk-rot") -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True)


@pytest.fixture
def cluster(tmp_path):
    """An inventory whose cluster key exists, as after a bootstrap."""
    inv = load_inventory(_inventory(tmp_path / "inv"))
    state.claim_cluster_state_dir(inv.cluster_name, inv.hosts_file)
    files = keys.key_files(inv)
    _keygen(files.current)
    return inv, files


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_key_file_name_is_the_roles():
    assert trust.cluster_key_name() == "id_ed25519"


def test_next_key_then_promotion_then_finish(cluster):
    _inv, files = cluster
    first = keys.public_line(files.current)
    assert keys.pending_step(files) is None
    keys.make_next_key(files, comment="dsk-rot")
    assert keys.pending_step(files) == "authorize"
    assert _mode(files.next) == 0o600 and _mode(files.public(files.next)) == 0o600
    second = keys.public_line(files.next)
    assert second != first and second.endswith("dsk-rot")
    assert not [p for p in files.directory.iterdir() if p.name.startswith(".rotate-")]

    keys.promote_next_key(files)
    assert keys.pending_step(files) == "retire"
    assert keys.public_line(files.current) == second
    assert files.public(files.current).read_text().strip() == second
    assert files.public(files.old).read_text().strip() == first
    assert _mode(files.current) == 0o600 and _mode(files.old) == 0o600
    assert not files.next.exists() and not files.public(files.next).exists()

    keys.finish(files)
    assert keys.pending_step(files) is None
    assert sorted(p.name for p in files.directory.iterdir() if "id_ed25519" in p.name) == \
        ["id_ed25519", "id_ed25519.pub"]


def test_a_promotion_cut_between_its_renames_is_finished_by_the_next(cluster):
    _inv, files = cluster
    first = keys.public_line(files.current)
    keys.make_next_key(files, comment="c")
    second = keys.public_line(files.next)
    # Cut after the current key moved aside: no current key, the next one still waiting.
    files.public(files.old).write_text(first + "\n")
    os.replace(files.current, files.old)
    assert keys.pending_step(files) == "authorize"
    keys.promote_next_key(files)
    assert keys.public_line(files.current) == second
    assert files.public(files.old).read_text().strip() == first
    assert keys.pending_step(files) == "retire"


def _fake_playbooks(monkeypatch, fail: dict[str, list[str]] | None = None) -> list[tuple]:
    """run_playbook recorded instead of run; ``fail``: tag -> nodes that fail it."""
    calls: list[tuple] = []

    def run_playbook(playbook, inventory, *, tags, extra_vars, **_):
        calls.append((playbook, tags[0], dict(extra_vars)))
        bad = (fail or {}).get(tags[0])
        if bad:
            raise RunFailed(f"keys-rotate failed on {len(bad)} host(s): {', '.join(bad)}",
                            nodes=bad)

    monkeypatch.setattr("dsk_provision.runner.run_playbook", run_playbook)
    return calls


def test_rotate_authorizes_tests_promotes_then_retires(cluster, monkeypatch):
    inv, files = cluster
    first = keys.public_line(files.current)
    calls = _fake_playbooks(monkeypatch)
    tried: list[Path] = []

    def logins(inventory, key, **_):
        tried.append(key)
        assert keys.pending_step(files) == "authorize"  # nothing promoted before the test
        return {}

    monkeypatch.setattr(keys, "login_failures", logins)
    result = keys.rotate(inv, say=lambda _m: None)
    new = keys.public_line(files.current)
    assert new != first
    assert [c[1] for c in calls] == ["authorize", "retire"]
    assert calls[0][2] == {"ssh_trust_next_public_key": new}
    assert calls[1][2] == {"ssh_trust_retired_public_key": first}
    assert tried == [files.next]
    assert keys.pending_step(files) is None and not files.old.exists()
    assert result.resumed is None and result.nodes == ["node1", "node2", "node3"]
    assert "PRIVATE" not in str(result.to_dict())


def test_an_unreachable_node_stops_the_rotation_before_anything_is_retired(cluster,
                                                                        monkeypatch):
    inv, files = cluster
    first = keys.public_line(files.current)
    calls = _fake_playbooks(monkeypatch, fail={"authorize": ["node2"]})
    monkeypatch.setattr(keys, "login_failures", lambda *a, **k: {})
    with pytest.raises(RunFailed) as err:
        keys.rotate(inv, say=lambda _m: None)
    assert err.value.nodes == ["node2"]
    assert "node2" in str(err.value) and "nothing was revoked" in (err.value.hint or "")
    assert [c[1] for c in calls] == ["authorize"]
    assert keys.public_line(files.current) == first  # still the key in force
    assert keys.pending_step(files) == "authorize"

    # node2 is back: the re-run resumes with the same next key, then finishes.
    pending = keys.public_line(files.next)
    calls = _fake_playbooks(monkeypatch)
    said: list[str] = []
    result = keys.rotate(inv, say=said.append)
    assert result.resumed == "authorize" and any("resuming" in m for m in said)
    assert keys.public_line(files.current) == pending
    assert [c[1] for c in calls] == ["authorize", "retire"]
    assert calls[1][2] == {"ssh_trust_retired_public_key": first}


def test_a_failed_login_with_the_next_key_stops_before_promotion(cluster, monkeypatch):
    inv, files = cluster
    first = keys.public_line(files.current)
    calls = _fake_playbooks(monkeypatch)
    monkeypatch.setattr(keys, "login_failures",
                        lambda *a, **k: {"node3": "Permission denied (publickey)."})
    with pytest.raises(RunFailed, match="node3: Permission denied") as err:
        keys.rotate(inv, say=lambda _m: None)
    assert err.value.nodes == ["node3"]
    assert [c[1] for c in calls] == ["authorize"]
    assert keys.public_line(files.current) == first


def test_a_failed_retirement_resumes_with_the_retirement(cluster, monkeypatch):
    inv, files = cluster
    first = keys.public_line(files.current)
    _fake_playbooks(monkeypatch, fail={"retire": ["node1"]})
    monkeypatch.setattr(keys, "login_failures", lambda *a, **k: {})
    with pytest.raises(RunFailed) as err:
        keys.rotate(inv, say=lambda _m: None)
    assert "still accepted on node1" in (err.value.hint or "")
    new = keys.public_line(files.current)
    assert keys.pending_step(files) == "retire" and new != first
    warnings = trust.key_dir_warnings(inv)
    assert any("stopped at its retire step" in w for w in warnings)

    calls = _fake_playbooks(monkeypatch)
    result = keys.rotate(inv, say=lambda _m: None)
    assert result.resumed == "retire"
    assert [c[1] for c in calls] == ["retire"]  # the new key is not replaced again
    assert calls[0][2] == {"ssh_trust_retired_public_key": first}
    assert keys.public_line(files.current) == new
    assert keys.pending_step(files) is None


def test_nothing_to_rotate_before_the_first_bootstrap(tmp_path, monkeypatch):
    inv = load_inventory(_inventory(tmp_path / "fresh"))
    calls = _fake_playbooks(monkeypatch)
    with pytest.raises(InputError, match="nothing to rotate"):
        keys.rotate(inv, say=lambda _m: None)
    assert calls == []


def test_login_test_requires_the_server_to_accept_that_very_key(cluster):
    inv, files = cluster
    keys.make_next_key(files, comment="c")
    seen: list[list[str]] = []

    def run(argv, timeout):
        seen.append(argv)
        host = argv[-2]
        if host == "10.0.0.1":
            return 0, f"debug1: Server accepts key: {files.next} ED25519 SHA256:x explicit\n"
        if host == "10.0.0.2":
            return 0, "debug1: Server accepts key: /root/.ssh/other ED25519\n"
        return 255, "debug1: Next authentication method\nroot@10.0.0.3: Permission denied"

    failures = keys.login_failures(inv, files.next, run=run)
    assert sorted(failures) == ["node2", "node3"]
    assert "not with the next key" in failures["node2"]
    assert "Permission denied" in failures["node3"]
    for argv in seen:
        # No master connection or agent key can answer for the key under test; pinned.
        assert argv.index("ControlPath=none") < argv.index("-i")
        assert "IdentityAgent=none" in argv and "IdentitiesOnly=yes" in argv
        assert argv[argv.index("-i") + 1] == str(files.next)
        assert "StrictHostKeyChecking=yes" in argv


def test_cli_keys_rotate_reports_the_new_key(cluster, monkeypatch):
    inv, files = cluster
    _fake_playbooks(monkeypatch)
    monkeypatch.setattr(keys, "login_failures", lambda *a, **k: {})
    out = CliRunner().invoke(app, ["keys", "rotate", "-i", str(inv.hosts_file)])
    assert out.exit_code == 0, out.output
    assert "cluster key rotated on 3 node(s)" in out.output
    assert keys.public_line(files.current).split()[1][-12:] in out.output
