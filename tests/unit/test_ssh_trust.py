"""The cluster key and the pinned host keys: where the key lives on the control node, who
owns a cluster's state directory, the old key beside the inventory, the git warning of
`check`, the ssh_trust role's known_hosts and ssh config blocks, and the role in check
mode before the first run."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import BIN, REPO, ROLES, run_role
from typer.testing import CliRunner

from dsk_provision import state, trust
from dsk_provision.cli import app
from dsk_provision.errors import InputError
from dsk_provision.inventory import load_inventory

ROLE = ROLES / "ssh_trust"


def _inventory(directory: Path, name: str = "prod-a", **extra: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    all_vars = {"dsk_cluster_name": name, "dsk_gpus_per_node": 0, **extra}
    (directory / "hosts.yml").write_text(yaml.safe_dump({"all": {
        "vars": all_vars,
        "children": {"nodes": {"hosts": {"node1": {"ansible_host": "10.0.0.1"}}}}}}))
    return directory / "hosts.yml"


def _says() -> tuple[list[str], object]:
    said: list[str] = []
    return said, said.append


# --- where the key lives --------------------------------------------------------------

def test_key_dir_is_the_cluster_state_dir_outside_the_inventory(tmp_path):
    inv = load_inventory(_inventory(tmp_path / "repo" / "inv"))
    assert trust.key_dir(inv) == state.cluster_state_dir("prod-a")
    assert Path(os.environ["DSK_STATE_DIR"]) in trust.key_dir(inv).parents
    assert tmp_path / "repo" not in trust.key_dir(inv).parents


def test_key_dir_set_in_the_inventory_wins(tmp_path):
    inv = load_inventory(_inventory(tmp_path / "inv", ssh_trust_key_dir=str(tmp_path / "k")))
    assert trust.key_dir(inv) == tmp_path / "k"


def test_relative_key_dir_is_refused(tmp_path):
    inv = load_inventory(_inventory(tmp_path / "inv", ssh_trust_key_dir="keys"))
    with pytest.raises(InputError, match="relative path") as err:
        trust.key_dir(inv)
    assert err.value.field == "ssh_trust_key_dir"


def test_templated_key_dir_is_refused_by_check(tmp_path):
    with pytest.raises(InputError, match="ssh_trust_key_dir.*Jinja2 template"):
        load_inventory(_inventory(tmp_path / "inv",
                                  ssh_trust_key_dir="{{ inventory_dir }}/.ssh_trust"))


def test_the_role_default_is_the_state_dir_the_runner_passes():
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert defaults["ssh_trust_key_dir"] == "{{ dsk_cluster_state_dir }}"



def test_the_role_writes_the_host_keys_where_the_tool_reads_them(tmp_path):
    """host_keys.json is named once, in dsk_provision.provisioned: the role's file is that
    name in the state directory, and both of the tool's readers read it and say which file
    and what to do when it is not JSON."""
    from dsk_provision import hostkeys, provisioned

    role_vars = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    assert role_vars["ssh_trust_host_keys_file"] == \
        "{{ dsk_cluster_state_dir }}/" + provisioned.HOST_KEYS_FILE
    inv = load_inventory(_inventory(tmp_path / "inv", "hk-one"))
    directory = state.cluster_state_dir("hk-one", create=True)
    assert hostkeys.host_keys_json_path(inv) == directory / provisioned.HOST_KEYS_FILE
    (directory / provisioned.HOST_KEYS_FILE).write_text("{not json")
    for read in (lambda: hostkeys.host_keys_json(inv),
                 lambda: provisioned.read_host_keys(directory)):
        with pytest.raises(InputError) as err:
            read()
        assert err.value.file == str(directory / provisioned.HOST_KEYS_FILE)
        assert "the next bootstrap of every node records the keys again" in err.value.hint

# --- one state directory, one inventory -----------------------------------------------

def test_a_run_claims_the_state_dir_for_its_inventory(tmp_path):
    inv = load_inventory(_inventory(tmp_path / "a"))
    said, say = _says()
    extra = trust.playbook_vars(inv, check=False, say=say)
    directory = Path(extra["dsk_cluster_state_dir"])
    assert directory == state.cluster_state_dir("prod-a")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert (directory / state.OWNER_FILE).read_text().strip() == str(inv.hosts_file.resolve())
    assert trust.playbook_vars(inv, check=False, say=say) == extra  # the same inventory again
    assert said == []


def test_another_inventory_with_the_same_cluster_name_is_refused(tmp_path):
    first = load_inventory(_inventory(tmp_path / "a"))
    second = load_inventory(_inventory(tmp_path / "b"))
    trust.playbook_vars(first, check=False, say=print)
    for check in (False, True):
        with pytest.raises(InputError) as err:
            trust.playbook_vars(second, check=check, say=print)
        message = str(err.value)
        assert err.value.field == "dsk_cluster_name"
        assert str(first.hosts_file.resolve()) in message
        assert str(second.hosts_file.resolve()) in message
    result = CliRunner().invoke(app, ["check", "-i", str(tmp_path / "b")])
    assert result.exit_code == 2 and "dsk_cluster_name" in result.output, result.output


def test_check_mode_and_check_write_nothing(tmp_path):
    inv = load_inventory(_inventory(tmp_path / "a"))
    trust.playbook_vars(inv, check=True, say=print)
    assert CliRunner().invoke(app, ["check", "-i", str(tmp_path / "a")]).exit_code == 0
    assert not state.cluster_state_dir("prod-a").exists()


def test_bootstrap_is_refused_before_any_run(tmp_path, monkeypatch):
    trust.playbook_vars(load_inventory(_inventory(tmp_path / "a")), check=False, say=print)
    import ansible_runner

    monkeypatch.setattr(ansible_runner, "run", lambda **kw: pytest.fail("ran"))
    result = CliRunner().invoke(app, ["--runs-dir", str(tmp_path / "runs"), "bootstrap",
                                      "-i", str(_inventory(tmp_path / "b"))])
    assert result.exit_code == 2 and "is already used by the inventory" in result.output
    assert not (tmp_path / "runs").exists()


def test_only_the_owning_inventory_forgets_a_state_dir(tmp_path):
    first = _inventory(tmp_path / "a")
    state.claim_cluster_state_dir("prod-a", first)
    assert not state.forget_cluster_state_dir("prod-a", _inventory(tmp_path / "b"))
    assert state.cluster_state_dir("prod-a").is_dir()
    assert state.forget_cluster_state_dir("prod-a", first)
    assert not state.cluster_state_dir("prod-a").exists()


# --- the key of a cluster made before, beside its inventory ---------------------------

def _legacy_key(inventory_dir: Path, content: str = "PRIVATE") -> Path:
    legacy = inventory_dir / ".ssh_trust"
    legacy.mkdir(mode=0o700, parents=True)
    (legacy / "id_ed25519").write_text(content)
    os.chmod(legacy / "id_ed25519", 0o600)
    (legacy / "id_ed25519.pub").write_text("ssh-ed25519 AAAA dsk-prod-a\n")
    return legacy


def test_an_old_key_beside_the_inventory_moves_to_the_state_dir(tmp_path):
    legacy = _legacy_key(tmp_path / "a")
    inv = load_inventory(_inventory(tmp_path / "a"))
    said, say = _says()
    extra = trust.playbook_vars(inv, check=False, say=say)
    target = Path(extra["dsk_cluster_state_dir"])
    assert "ssh_trust_key_dir" not in extra
    assert (target / "id_ed25519").read_text() == "PRIVATE"
    assert stat.S_IMODE((target / "id_ed25519").stat().st_mode) == 0o600
    assert (target / "id_ed25519.pub").is_file()
    assert not legacy.exists()
    assert said and f"moved the cluster key from {legacy} to {target}" in said[0]


def test_check_mode_uses_the_old_key_where_it_is(tmp_path):
    legacy = _legacy_key(tmp_path / "a")
    inv = load_inventory(_inventory(tmp_path / "a"))
    said, say = _says()
    extra = trust.playbook_vars(inv, check=True, say=say)
    assert extra["ssh_trust_key_dir"] == str(legacy)
    assert (legacy / "id_ed25519").is_file()
    assert not state.cluster_state_dir("prod-a").exists()
    assert "would move" in said[0]


def test_two_different_keys_are_refused(tmp_path):
    _legacy_key(tmp_path / "a", "OLD")
    inv = load_inventory(_inventory(tmp_path / "a"))
    target = state.cluster_state_dir("prod-a", create=True)
    (target / "id_ed25519").write_text("NEW")
    with pytest.raises(InputError, match="two different cluster keys"):
        trust.playbook_vars(inv, check=False, say=print)
    assert (target / "id_ed25519").read_text() == "NEW"


def test_an_explicit_key_dir_leaves_the_old_directory_alone(tmp_path):
    legacy = _legacy_key(tmp_path / "a")
    inv = load_inventory(_inventory(tmp_path / "a", ssh_trust_key_dir=str(legacy)))
    assert trust.playbook_vars(inv, check=False, say=print).get("ssh_trust_key_dir") is None
    assert (legacy / "id_ed25519").is_file()


def test_ssh_trust_dirs_are_ignored_by_git():
    assert ".ssh_trust/" in (REPO / ".gitignore").read_text().splitlines()


# --- check warns about a key directory inside a git work tree -------------------------

def _check(inventory: Path) -> tuple[int, str, dict]:
    text = CliRunner().invoke(app, ["check", "-i", str(inventory)])
    data = CliRunner().invoke(app, ["check", "-i", str(inventory), "--json"])
    return text.exit_code, text.output, json.loads(data.stdout)


def test_check_warns_about_a_key_dir_inside_a_git_work_tree(tmp_path):
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    inventory = _inventory(tmp_path / "repo" / "inv",
                           ssh_trust_key_dir=str(tmp_path / "repo" / "inv" / "keys"))
    code, out, data = _check(inventory)
    assert code == 0
    assert "warning: the cluster key directory" in out
    assert f"inside the git work tree {tmp_path / 'repo'}" in " ".join(out.split())
    assert len(data["warnings"]) == 1 and "ssh_trust_key_dir is set" in data["warnings"][0]


def test_check_warns_when_the_state_dir_is_inside_a_git_work_tree(tmp_path, monkeypatch):
    (tmp_path / "dotfiles" / ".git").mkdir(parents=True)
    monkeypatch.setenv("DSK_STATE_DIR", str(tmp_path / "dotfiles" / "state"))
    _code, _out, data = _check(_inventory(tmp_path / "inv"))
    assert data["warnings"] and "state directory root" in data["warnings"][0]


def test_check_does_not_warn_about_the_default_outside_any_repository(tmp_path):
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    code, out, data = _check(_inventory(tmp_path / "repo" / "inv"))
    assert code == 0 and "warning" not in out and data["warnings"] == []


def test_check_warns_about_an_old_key_beside_the_inventory(tmp_path):
    _legacy_key(tmp_path / "inv")
    _code, _out, data = _check(_inventory(tmp_path / "inv"))
    assert any("still in" in w for w in data["warnings"]), data


# --- the known_hosts and ssh config blocks --------------------------------------------

_PLUGINS_LOADED: list[bool] = []


def _render(tmp_path: Path, hostvars: dict[str, dict], recorded: dict | None = None,
            removed: list[str] | None = None) -> dict:
    """The role's templates rendered by Ansible's templar with the role's defaults and
    vars, the given hosts' variables and facts, and a host-key record in the state dir."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import init_plugin_loader
    from ansible.template import Templar, trust_as_template

    if not _PLUGINS_LOADED:
        init_plugin_loader()
        _PLUGINS_LOADED.append(True)

    def trusted(value):
        if isinstance(value, str):
            return trust_as_template(value)
        if isinstance(value, list):
            return [trusted(v) for v in value]
        if isinstance(value, dict):
            return {k: trusted(v) for k, v in value.items()}
        return value

    state_dir = tmp_path / "state"
    state_dir.mkdir(exist_ok=True)
    if recorded is not None:
        (state_dir / "host_keys.json").write_text(json.dumps(recorded))
    layers = {}
    for path in (ROLES / "dsk_defaults" / "defaults" / "main.yml",
                 ROLE / "defaults" / "main.yml", ROLE / "vars" / "main.yml"):
        layers.update(yaml.safe_load(path.read_text()))
    layers.update(trusted(layers), dsk_cluster_state_dir=str(state_dir),
                  groups={"nodes": list(hostvars)}, hostvars=hostvars)
    if removed is not None:
        layers["dsk_removed_nodes"] = removed
    templar = Templar(loader=DataLoader(), variables=layers)
    out = {name: templar.template(trust_as_template((ROLE / "templates" / name).read_text()))
           for name in ("known_hosts_block.j2", "ssh_config_block.j2")}
    out["record"] = json.loads(templar.template(trust_as_template("{{ ssh_trust_host_keys }}")))
    return out


def _facts(*keys: tuple[str, str]) -> dict:
    facts = {}
    for kind, key in keys:
        keytype = {"ed25519": "ssh-ed25519", "ecdsa": "ecdsa-sha2-nistp256"}[kind]
        facts[f"ssh_host_key_{kind}_public"] = key
        facts[f"ssh_host_key_{kind}_public_keytype"] = keytype
    return {"ansible_facts": facts}


def test_known_hosts_from_facts_is_unchanged_on_port_22(tmp_path):
    out = _render(tmp_path, {
        "node1": {"ansible_host": "10.0.0.1", **_facts(("ecdsa", "E1"), ("ed25519", "K1"))},
        "node2": {"ansible_host": "10.0.0.2", **_facts(("ed25519", "K2"))}})
    assert out["known_hosts_block.j2"].splitlines() == [
        "node1,10.0.0.1 ecdsa-sha2-nistp256 E1",
        "node1,10.0.0.1 ssh-ed25519 K1",
        "node2,10.0.0.2 ssh-ed25519 K2"]
    assert "Port" not in out["ssh_config_block.j2"]
    assert out["ssh_config_block.j2"].splitlines()[0] == "Host node1 node2 10.0.0.1 10.0.0.2"


def test_a_node_without_facts_keeps_its_recorded_keys(tmp_path):
    recorded = {"node1": ["ssh-ed25519 OLD1"], "node3": ["ssh-ed25519 K3"],
                "gone": ["ssh-ed25519 G"]}
    out = _render(tmp_path, {
        "node1": {"ansible_host": "10.0.0.1", **_facts(("ed25519", "K1"))},
        "node2": {"ansible_host": "10.0.0.2"},   # unreachable, never recorded
        "node3": {"ansible_host": "10.0.0.3"}},  # unreachable this time
        recorded)
    assert out["known_hosts_block.j2"].splitlines() == [
        "node1,10.0.0.1 ssh-ed25519 K1",          # fresh facts replace the record
        "node3,10.0.0.3 ssh-ed25519 K3"]
    # What the run records: nodes no longer in the inventory drop out.
    assert out["record"] == {"node1": ["ssh-ed25519 K1"], "node3": ["ssh-ed25519 K3"]}


def test_ansible_port_in_known_hosts_and_ssh_config(tmp_path):
    out = _render(tmp_path, {
        "node1": {"ansible_host": "10.0.0.1", **_facts(("ed25519", "K1"))},
        "node2": {"ansible_host": "10.0.0.2", "ansible_port": 2222, **_facts(("ed25519", "K2"))},
        "node3": {"ansible_host": "2001:db8::3", "ansible_ssh_port": 2200,
                  **_facts(("ed25519", "K3"))}})
    assert out["known_hosts_block.j2"].splitlines() == [
        "node1,10.0.0.1 ssh-ed25519 K1",
        "[node2]:2222,[10.0.0.2]:2222 ssh-ed25519 K2",
        "[node3]:2200,[2001:db8::3]:2200 ssh-ed25519 K3"]
    config = out["ssh_config_block.j2"].splitlines()
    assert config[:4] == ["Host node2 10.0.0.2", "    Port 2222",
                          "Host node3 2001:db8::3", "    Port 2200"]
    assert config[4].startswith("Host node1 node2 node3 ")


def test_an_address_two_nodes_share_gets_no_port_of_its_own(tmp_path):
    out = _render(tmp_path, {
        "node1": {"ansible_host": "10.0.0.1", "ansible_port": 2201},
        "node2": {"ansible_host": "10.0.0.1", "ansible_port": 2202}})
    assert out["ssh_config_block.j2"].splitlines()[:4] == [
        "Host node1", "    Port 2201", "Host node2", "    Port 2202"]


def test_a_node_being_removed_is_trusted_nowhere_and_drops_out_of_the_record(tmp_path):
    nodes = {
        "node1": {"ansible_host": "10.0.0.1", **_facts(("ed25519", "K1"))},
        "node2": {"ansible_host": "10.0.0.2", "ansible_port": 2222},  # dead, recorded
        "node3": {"ansible_host": "10.0.0.3", **_facts(("ed25519", "K3"))}}
    recorded = {"node2": ["ssh-ed25519 K2"]}
    kept = _render(tmp_path, nodes, recorded)
    assert "node2" in kept["known_hosts_block.j2"] and "node2" in kept["record"]
    out = _render(tmp_path, nodes, recorded, removed=["node2"])
    assert out["known_hosts_block.j2"].splitlines() == [
        "node1,10.0.0.1 ssh-ed25519 K1", "node3,10.0.0.3 ssh-ed25519 K3"]
    assert "node2" not in out["ssh_config_block.j2"]
    assert "10.0.0.2" not in out["ssh_config_block.j2"]
    assert out["record"] == {"node1": ["ssh-ed25519 K1"], "node3": ["ssh-ed25519 K3"]}


# --- the role on this machine ---------------------------------------------------------

def _role_vars(tmp_path: Path) -> dict:
    return {"ssh_trust_user": subprocess.run(["id", "-un"], capture_output=True, text=True,
                                             check=True).stdout.strip(),
            "ssh_trust_user_home": str(tmp_path / "home"),
            "ssh_trust_known_hosts_file": str(tmp_path / "known_hosts")}


def test_check_mode_before_the_first_run_reports_and_makes_nothing(tmp_path):
    """A fresh inventory: no key, no state directory, no ~/.ssh on the node."""
    (tmp_path / "home").mkdir()
    proc = run_role(tmp_path, "ssh_trust", _role_vars(tmp_path),
                    host_vars={"dsk_gpus_per_node": 0})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # The directory came from the dsk_cluster_state_dir lookup (a plain ansible-playbook).
    assert f"check mode: no cluster key in {os.environ['DSK_STATE_DIR']}/cluster yet" \
        in " ".join(out.split())
    assert "changed=0" not in out
    assert not Path(os.environ["DSK_STATE_DIR"], "cluster").exists()
    assert list((tmp_path / "home").iterdir()) == []
    assert not (tmp_path / "known_hosts").exists()


def _task_result(out: str, task: str) -> str:
    """The first word of the result line that follows ``TASK [ssh_trust : <task>]``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"TASK [ssh_trust : {task}]"))
    return next(line.split(":")[0] for line in lines[start + 1:] if line.strip())


def test_recorded_nodes_keep_their_recorded_host_keys_without_gathering(tmp_path):
    """What a trust refresh of the existing nodes relies on: no facts gathered there."""
    (tmp_path / "home").mkdir()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "host_keys.json").write_text('{"localnode": ["ssh-ed25519 RECORDED"]}')
    gather = "Gather the SSH host keys (only when run without preflight)"
    extra = {**_role_vars(tmp_path), "dsk_cluster_state_dir": str(state_dir)}
    asked = run_role(tmp_path, "ssh_trust", extra, host_vars={"dsk_gpus_per_node": 0})
    assert asked.returncode == 0, (asked.stdout + asked.stderr)[-4000:]
    assert _task_result(asked.stdout, gather) == "ok"
    told = run_role(tmp_path, "ssh_trust", {**extra, "ssh_trust_recorded_nodes": ["localnode"]},
                    host_vars={"dsk_gpus_per_node": 0})
    assert told.returncode == 0, (told.stdout + told.stderr)[-4000:]
    assert _task_result(told.stdout, gather) == "skipping"


def _run_play(tmp_path: Path, extra: dict, check: bool) -> subprocess.CompletedProcess:
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{"name": "SSH trust", "hosts": "nodes",
                                     "gather_facts": False, "roles": [{"role": "ssh_trust"}]}]))
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"nodes": {"hosts": {
        "localnode": {"ansible_connection": "local", "ansible_host": "127.0.0.1",
                      "ansible_python_interpreter": sys.executable,
                      "dsk_gpus_per_node": 0}}}}}}))
    (tmp_path / "extra.yml").write_text(yaml.safe_dump(extra))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_ROLES_PATH=str(ROLES), ANSIBLE_LOCAL_TEMP=str(tmp_path / "ltmp"),
               ANSIBLE_REMOTE_TEMP=str(tmp_path / "rtmp"), ANSIBLE_NOCOLOR="1")
    return subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(play),
                           "-e", f"@{tmp_path / 'extra.yml'}", *(["--check"] if check else [])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(os.geteuid() != 0, reason="the role writes a root-owned known_hosts")
def test_first_run_makes_ssh_dir_key_and_record_then_check_mode_changes_nothing(tmp_path):
    (tmp_path / "home").mkdir()
    extra = _role_vars(tmp_path)
    first = _run_play(tmp_path, extra, check=False)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    ssh_dir = tmp_path / "home" / ".ssh"
    assert stat.S_IMODE(ssh_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ssh_dir / "id_ed25519_dsk").stat().st_mode) == 0o600
    state_dir = Path(os.environ["DSK_STATE_DIR"]) / "cluster"
    assert (state_dir / "id_ed25519").read_bytes() == (ssh_dir / "id_ed25519_dsk").read_bytes()
    assert (state_dir / state.OWNER_FILE).read_text().strip() == str(tmp_path / "hosts.yml")
    # This machine's host keys (if it has any) are recorded and pinned.
    host_keys = sorted(" ".join(p.read_text().split()[:2])
                       for p in Path("/etc/ssh").glob("ssh_host_*_key.pub"))
    record = json.loads((state_dir / "host_keys.json").read_text())
    assert sorted(record.get("localnode", [])) == host_keys
    known = (tmp_path / "known_hosts").read_text() if host_keys else ""
    for key in host_keys:
        assert f"localnode,127.0.0.1 {key}" in known
    again = _run_play(tmp_path, extra, check=True)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "changed=0" in again.stdout, again.stdout[-4000:]
    # Only a block drifted (what a trust refresh finds on an existing node): the key, the
    # directory and authorized_keys are not written again, the blocks are.
    (ssh_dir / "config").write_text("")
    refresh = _run_play(tmp_path, extra, check=False)
    assert refresh.returncode == 0, (refresh.stdout + refresh.stderr)[-4000:]
    for task in ("Make ~/.ssh (0700)", "Install the cluster private key",
                 "Authorize the cluster key"):
        assert _task_result(refresh.stdout, task) == "skipping", task
    blocks = "TASK [ssh_trust : Use the cluster key with pinned host keys, and pin every node's"
    section = refresh.stdout[refresh.stdout.index(blocks):].split("\nTASK [")[0]
    assert "changed: [localnode]" in section, refresh.stdout[-4000:]


# --- nodes outside the run (--limit) ----------------------------------------------------

def test_a_dead_node_outside_the_run_is_named_and_the_run_goes_on(tmp_path):
    """`--limit node1,node2` while node4, outside the run, is dead: its recorded keys stay,
    it is named, node3 (outside and alive) is gathered, and every later task still runs
    on both hosts of the run (a run_once gathering ended the play there)."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "host_keys.json").write_text('{"node4": ["ssh-ed25519 RECORDED"]}')
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"nodes": {"hosts": {
        "node1": local, "node2": local, "node3": local,
        # Nothing listens on port 1: the connection is refused at once.
        "node4": {"ansible_host": "127.0.0.1", "ansible_port": 1}}}}}}))
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{
        "name": "Outside keys", "hosts": "nodes", "gather_facts": False,
        "tasks": [
            {"name": "The role's gathering of nodes outside the run",
             "ansible.builtin.include_role": {"name": "ssh_trust",
                                              "tasks_from": "outside_keys"}},
            {"name": "What was gathered", "ansible.builtin.debug": {
                "msg": "after: node3 {{ hostvars['node3'].ansible_facts.gather_subset "
                       "is defined }}, node4 {{ hostvars['node4'].ansible_facts "
                       "| default({}) | length }}"}}]}]))
    (tmp_path / "extra.yml").write_text(yaml.safe_dump({
        "dsk_cluster_state_dir": str(state_dir), "dsk_removed_nodes": [],
        "ssh_trust_outside_timeout_s": 2}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_ROLES_PATH=str(ROLES), ANSIBLE_LOCAL_TEMP=str(tmp_path / "ltmp"),
               ANSIBLE_REMOTE_TEMP=str(tmp_path / "rtmp"), ANSIBLE_NOCOLOR="1")
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(play),
                           "-e", f"@{tmp_path / 'extra.yml'}", "--limit", "node1,node2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = " ".join((proc.stdout + proc.stderr).split())  # the display's wrapping undone
    assert proc.returncode == 0, out[-4000:]
    assert out.count("after: node3 True, node4 0") == 2, out[-4000:]
    assert re.search(r"node4 did not answer \(.*Connection refused\): the host keys recorded "
                     "for it stay pinned; run the bootstrap again", out), out[-4000:]
    assert "node3 did not answer" not in out
    assert "UNREACHABLE" not in out
