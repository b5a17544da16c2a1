"""What an inventory may not contain: ways around host-key pinning, unvalidated host_vars,
templates and control characters. Each case goes through `check` (load_inventory) and,
where it reaches a node, through the launcher's ssh command line too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsk_provision import inventory as inventory_mod
from dsk_provision import launch, remote, ssh_options
from dsk_provision.errors import InputError
from dsk_provision.inventory import Inventory, Node, load_inventory

ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"


def write_inventory(tmp_path: Path, host_vars: dict | None = None, all_vars: dict | None = None,
                    files: dict[str, str] | None = None) -> Path:
    """An inventory directory: all.vars pin host keys in tmp_path/known_hosts; node n1 gets
    ``host_vars`` inline; ``files`` are extra files (relative path -> text)."""
    base = {"dsk_gpus_per_node": 0,
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={tmp_path}/known_hosts "
                                       "-o StrictHostKeyChecking=yes"}
    doc = {"all": {"vars": {**base, **(all_vars or {})},
                   "children": {"nodes": {"hosts": {
                       "n1": {"ansible_host": "10.1.1.1", **(host_vars or {})},
                       "n2": {"ansible_host": "10.1.1.2"}}}}}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    for rel, text in (files or {}).items():
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return tmp_path


def refused(path: Path) -> InputError:
    with pytest.raises(InputError) as info:
        load_inventory(path)
    return info.value


def launcher_node(tmp_path: Path, extra: dict) -> tuple[Inventory, Node]:
    """The launcher's view of n1 with ``extra`` among its variables (no check first)."""
    cluster = {"dsk_gpus_per_node": 0,
               "ansible_ssh_common_args": f"-o UserKnownHostsFile={tmp_path}/known_hosts "
                                          "-o StrictHostKeyChecking=yes"}
    node = Node(name="n1", address="10.1.1.1", port=22, user="root", gpus=0,
                vars={**cluster, **extra})
    hosts = tmp_path / "hosts.yml"
    return Inventory(path=hosts, nodes=[node], vars=cluster, hosts_file=hosts), node


# --------------------------------------------------------------------------- host keys

SSH_BYPASSES = [
    ("ansible_ssh_extra_args", "-o StrictHostKeyChecking='no'"),
    ("ansible_ssh_extra_args", "-o \"StrictHostKeyChecking 'no'\""),
    ("ansible_ssh_extra_args", "-o 'StrictHostKeyChecking = no'"),
    ("ansible_ssh_extra_args", "-o stricthostkeychecking=NO"),
    ("ansible_ssh_extra_args", "-o StrictHostKeyChecking=false"),
    ("ansible_ssh_extra_args", "-o StrictHostKeyChecking=off"),
    ("ansible_ssh_extra_args", "-o StrictHostKeyChecking=accept-new"),
    ("ansible_ssh_extra_args", "-F /tmp/ssh_config"),
    ("ansible_ssh_extra_args", "-F/tmp/ssh_config"),
    ("ansible_ssh_extra_args", "-4F /tmp/ssh_config"),
    ("ansible_ssh_extra_args", "-4o StrictHostKeyChecking=no"),
    ("ansible_ssh_extra_args", "-4oStrictHostKeyChecking=no"),
    ("ansible_ssh_extra_args", "-o UserKnownHostsFile=/dev/null"),
    ("ansible_ssh_extra_args", "-o UserKnownHostsFile=none"),
    ("ansible_ssh_extra_args", "-o 'UserKnownHostsFile /tmp/elsewhere'"),
    ("ansible_ssh_extra_args", "-o GlobalKnownHostsFile=/tmp/elsewhere"),
    ("ansible_ssh_extra_args", "-o 'ProxyCommand sh -c \"nc %h %p\"'"),
    ("ansible_ssh_extra_args", "-o LocalCommand=id -o PermitLocalCommand=yes"),
    ("ansible_ssh_extra_args", "-o KnownHostsCommand=/bin/cat"),
    ("ansible_ssh_extra_args", "-I /tmp/pkcs11.so"),
    ("ansible_ssh_extra_args", "-o StrictHostKeyChecking=yes other-host"),
    ("ansible_ssh_extra_args", "-o 'StrictHostKeyChecking=no"),
    ("ansible_ssh_common_args", "-o StrictHostKeyChecking=no"),
    ("ansible_ssh_args", "-o StrictHostKeyChecking=no"),
    ("ansible_scp_extra_args", "-S /tmp/not-ssh"),
    ("ansible_sftp_extra_args", "-o StrictHostKeyChecking=no"),
    ("ansible_host_key_checking", False),
    ("ansible_host_key_checking", "no"),
    ("ansible_ssh_host_key_checking", False),
]


@pytest.mark.parametrize(("name", "value"), SSH_BYPASSES)
def test_check_refuses_every_way_around_host_key_pinning(tmp_path, name, value):
    err = refused(write_inventory(tmp_path, {name: value}))
    assert err.file == str(tmp_path / "hosts.yml")
    assert err.field == f"all.children.nodes.hosts.n1.{name}"


@pytest.mark.parametrize(("name", "value"), SSH_BYPASSES)
def test_launcher_refuses_every_way_around_host_key_pinning(tmp_path, name, value):
    inv, node = launcher_node(tmp_path, {name: value})
    with pytest.raises(InputError) as info:
        remote.SshTransport(inv).argv(node, "true")
    assert info.value.field == remote.host_field(node, name)
    assert info.value.file == str(inv.path)


def test_accept_new_is_refused_as_weaker_than_pinning():
    problems = ssh_options.args_problems("-o StrictHostKeyChecking=accept-new", "ssh", ())
    assert len(problems) == 1 and "trusts any host's first key" in problems[0]


@pytest.mark.parametrize("args", [
    "-o StrictHostKeyChecking=yes -o ServerAliveInterval=30",
    "-4 -o StrictHostKeyChecking=ask -o ConnectTimeout=5 -J bastion.example",
    "-o 'UserKnownHostsFile {kh}' -o ControlPath=/tmp/%C",
    "-C -oUserKnownHostsFile={kh}",
])
def test_safe_ssh_arguments_pass_check_and_launch(tmp_path, args):
    args = args.format(kh=tmp_path / "known_hosts")
    inv = load_inventory(write_inventory(tmp_path, {"ansible_ssh_extra_args": args}))
    argv = remote.SshTransport(inv).argv(inv.nodes[0], "true")
    assert argv[-2:] == ["10.1.1.1", "true"]


def test_known_hosts_file_is_the_one_declared_cluster_wide(tmp_path):
    declared = tmp_path / "kh"
    inv_dir = write_inventory(tmp_path, all_vars={
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={declared}"}, files={
            "host_vars/n1.yml": f"ansible_ssh_extra_args: -o UserKnownHostsFile={declared}\n"})
    assert load_inventory(inv_dir).nodes[0].vars["ansible_ssh_extra_args"].endswith("kh")
    (tmp_path / "host_vars/n1.yml").write_text(
        f"ansible_ssh_extra_args: -o UserKnownHostsFile={tmp_path}/other\n")
    err = refused(inv_dir)
    assert (err.file, err.field) == (str(tmp_path / "host_vars/n1.yml"), "ansible_ssh_extra_args")
    assert f"not at the file the inventory declares ({declared})" in str(err)


def test_no_known_hosts_file_may_be_named_when_none_is_declared(tmp_path):
    inv_dir = write_inventory(tmp_path, {"ansible_ssh_common_args":
                                         f"-o UserKnownHostsFile={tmp_path}/kh"},
                              all_vars={"ansible_ssh_common_args": "-o ConnectTimeout=5"})
    err = refused(inv_dir)
    assert err.field == "all.children.nodes.hosts.n1.ansible_ssh_common_args"
    assert "declares (none)" in str(err)


def _local_inventory(tmp_path, out_name: str) -> None:
    """tmp_path/inv: this machine as the one node, over a local connection; the play
    writes what it reads into tmp_path/out_name."""
    (tmp_path / "inv").mkdir()
    (tmp_path / "inv/hosts.yml").write_text(yaml.safe_dump({"all": {
        "vars": {"dsk_gpus_per_node": 0, "ansible_connection": "local",
                 "ansible_python_interpreter": sys.executable,
                 "ansible_remote_tmp": f"{tmp_path}/remote-tmp",
                 "ansible_control_path_dir": f"{tmp_path}/cp",
                 "out_file": str(tmp_path / out_name)},
        "children": {"nodes": {"hosts": {"localhost": {"ansible_host": "127.0.0.1"}}}}}}))


def test_runner_pins_host_key_checking_against_the_callers_environment(tmp_path, monkeypatch):
    from rich.console import Console

    from dsk_provision.runner import run_playbook

    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: nodes\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.copy:\n"
        "        content: \"{{ lookup('ansible.builtin.config', 'HOST_KEY_CHECKING') }}\"\n"
        "        dest: \"{{ out_file }}\"\n")
    _local_inventory(tmp_path, "hkc.txt")
    monkeypatch.setenv("ANSIBLE_HOST_KEY_CHECKING", "False")
    console = Console(file=(tmp_path / "console.txt").open("w"), width=120)
    result = run_playbook(str(play), load_inventory(tmp_path / "inv"), command="unit",
                          runs_dir=tmp_path / "runs", console=console)
    console.file.close()
    assert result.ok, (tmp_path / "console.txt").read_text()
    assert (tmp_path / "hkc.txt").read_text() == "True"


def test_runner_hands_ansible_its_own_ssh_arguments_and_program(tmp_path, monkeypatch):
    """The caller's ANSIBLE_SSH_* settings would replace ansible.cfg's ssh arguments (the
    keep-alives) or run another program as ssh: the runner's values win."""
    from rich.console import Console

    from dsk_provision.defaults import ansible_setting
    from dsk_provision.runner import run_playbook

    def conf(name):
        return ("{{ lookup('ansible.builtin.config', '" + name
                + "', plugin_type='connection', plugin_name='ssh') }}")

    play = tmp_path / "play.yml"
    play.write_text(
        "- hosts: nodes\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.copy:\n"
        f"        content: \"{conf('ssh_args')}|{conf('ssh_executable')}|"
        f"{conf('ssh_common_args')}|{conf('ssh_extra_args')}\"\n"
        "        dest: \"{{ out_file }}\"\n")
    _local_inventory(tmp_path, "ssh.txt")
    monkeypatch.setenv("ANSIBLE_SSH_ARGS", "-o StrictHostKeyChecking=no")
    monkeypatch.setenv("ANSIBLE_SSH_EXECUTABLE", str(tmp_path / "not-ssh"))
    monkeypatch.setenv("ANSIBLE_SSH_COMMON_ARGS", "-F /tmp/cfg")
    monkeypatch.setenv("ANSIBLE_SSH_EXTRA_ARGS", "-o UserKnownHostsFile=/dev/null")
    console = Console(file=(tmp_path / "console.txt").open("w"), width=120)
    result = run_playbook(str(play), load_inventory(tmp_path / "inv"), command="unit",
                          runs_dir=tmp_path / "runs", console=console)
    console.file.close()
    assert result.ok, (tmp_path / "console.txt").read_text()
    cfg_args = ansible_setting("ssh_connection", "ssh_args")
    assert "ServerAliveInterval" in cfg_args
    assert (tmp_path / "ssh.txt").read_text() == f"{cfg_args}|ssh||"


@pytest.mark.parametrize("program, ok", [("ssh", True), ("/usr/bin/ssh", True),
                                         ("/usr/local/bin/my-ssh", False), ("sshpass", False)])
def test_only_ssh_itself_may_be_ansibles_ssh_program(tmp_path, program, ok):
    inv_dir = write_inventory(tmp_path, {"ansible_ssh_executable": program})
    if ok:
        load_inventory(inv_dir)
        return
    err = refused(inv_dir)
    assert err.field == "all.children.nodes.hosts.n1.ansible_ssh_executable"
    assert "another program than ssh" in str(err)


# --------------------------------------------------------------------------- host_vars

def test_host_vars_merge_in_ansibles_order(tmp_path):
    inv_dir = write_inventory(tmp_path, files={
        "group_vars/all.yml": "dsk_socket_ifname: e2\ndsk_rdzv_port: 29402\n",
        "group_vars/nodes.yml": "dsk_socket_ifname: e3\n",
        "host_vars/n1.yml": "dsk_socket_ifname: e5\nansible_port: 2222\n",
        "host_vars/n2/10-net.yml": "dsk_root: /srv/dsk\n",
        "host_vars/n2/20-more.yaml": "dsk_root: /srv/dsk2\n",
    })
    doc = yaml.safe_load((inv_dir / "hosts.yml").read_text())
    doc["all"]["vars"]["dsk_socket_ifname"] = "e0"
    nodes = doc["all"]["children"]["nodes"]
    nodes["vars"] = {"dsk_socket_ifname": "e1", "dsk_rdzv_port": 29401}
    nodes["hosts"]["n1"]["dsk_socket_ifname"] = "e4"
    nodes["hosts"]["n2"]["dsk_socket_ifname"] = "e4"
    (inv_dir / "hosts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))

    inv = load_inventory(inv_dir)
    n1, n2 = inv.nodes
    assert n1.vars["dsk_socket_ifname"] == "e5" and n1.port == 2222
    assert n2.vars["dsk_socket_ifname"] == "e4" and n2.vars["dsk_root"] == "/srv/dsk2"
    assert n1.vars["dsk_rdzv_port"] == 29402  # group_vars/all over the group's inline vars
    assert str(n2.settings.root) == "/srv/dsk2"

    # Ansible itself agrees on every variable of every node.
    proc = subprocess.run([str(ANSIBLE_INVENTORY), "-i", str(inv_dir / "hosts.yml"), "--list"],
                          capture_output=True, text=True, timeout=120, check=True)
    hostvars = json.loads(proc.stdout)["_meta"]["hostvars"]
    for node in inv.nodes:
        assert {k: hostvars[node.name][k] for k in node.vars} == node.vars

    # The launcher uses them: the port from host_vars, the root from the directory form.
    argv = remote.SshTransport(inv).argv(n1, "true")
    assert argv[argv.index("-p") + 1] == "2222"
    assert launch.torchrun_argv(inv, 1, "trainer.train", [], run_id="r")[0] \
        == n2.settings.python


@pytest.mark.parametrize("rel", ["host_vars/n1.yml", "host_vars/n1", "host_vars/n1.json",
                                 "host_vars/n1/main.yml", "host_vars/n1/sub/more"])
def test_host_vars_are_validated_in_every_form(tmp_path, rel):
    text = '{"dsk_gpus": 99}\n' if rel.endswith(".json") else "dsk_gpus: 99\n"
    err = refused(write_inventory(tmp_path, files={rel: text}))
    assert (err.file, err.field) == (str(tmp_path / rel), "dsk_gpus")
    assert "out of range" in str(err)


def test_host_vars_are_checked_for_host_key_pinning(tmp_path):
    err = refused(write_inventory(tmp_path, files={
        "host_vars/n2.yml": "ansible_ssh_extra_args: -4o StrictHostKeyChecking=no\n"}))
    assert (err.file, err.field) == (str(tmp_path / "host_vars/n2.yml"), "ansible_ssh_extra_args")


def test_host_vars_of_an_unknown_host_are_refused(tmp_path):
    err = refused(write_inventory(tmp_path, files={"host_vars/n3.yml": "dsk_gpus: 1\n"}))
    assert (err.file, err.field) == (str(tmp_path / "host_vars/n3.yml"), "n3")


# --------------------------------------------------------------------------- templates

@pytest.mark.parametrize(("name", "value"), [
    ("dsk_mirror_url", "{{ lookup('pipe', 'id') }}"),
    ("dsk_root", "/opt/{{ lookup('pipe', 'id') }}"),
    ("dsk_python", "{{ dsk_root }}/venv/bin/python"),
    ("dsk_nccl_env", {"NCCL_DEBUG": "{{ lookup('pipe', 'id') }}"}),
    ("dsk_cluster_name", "{% raw %}x{% endraw %}"),
    ("dsk_profile", "{# comment #}"),
    ("ansible_host", "{{ lookup('pipe', 'id') }}"),
    ("ansible_user", "{{ lookup('env', 'USER') }}"),
    ("ansible_ssh_private_key_file", "{{ lookup('pipe', 'id') }}"),
    ("ansible_ssh_common_args", "-o ControlPath=/tmp/{{ lookup('pipe', 'id') }}"),
])
def test_templates_are_refused_in_dsk_and_connection_values(tmp_path, name, value):
    err = refused(write_inventory(tmp_path, {name: value}))
    problems = getattr(err, "problems", None) or [err]
    assert any(p.field == f"all.children.nodes.hosts.n1.{name}"
               and "Jinja2 template" in (getattr(p, "message", None) or str(p))
               for p in problems), str(err)


def test_templates_stay_allowed_in_role_variables(tmp_path):
    inv = load_inventory(write_inventory(tmp_path, all_vars={
        "nvidia_driver_version": "{{ '580' }}"}))
    assert inv.vars["nvidia_driver_version"] == "{{ '580' }}"


# --------------------------------------------------------------------------- control characters

@pytest.mark.parametrize(("where", "text", "field"), [
    ("host", 'dsk_mirror_url: "http://10.0.0.1/\\ndeb [trusted=yes] http://evil/ ./"',
     "all.children.nodes.hosts.n1.dsk_mirror_url"),
    ("host", 'dsk_cluster_name: "prod\\n"', "all.children.nodes.hosts.n1.dsk_cluster_name"),
    ("host", 'ansible_host: "10.1.1.1\\n"', "all.children.nodes.hosts.n1.ansible_host"),
    ("host", 'ansible_user: "root\\n"', "all.children.nodes.hosts.n1.ansible_user"),
    ("host", 'nvidia_driver_version: "580\\t1"',
     "all.children.nodes.hosts.n1.nvidia_driver_version"),
    ("host", 'dsk_nccl_env: {NCCL_DEBUG: "WARN\\r"}',
     "all.children.nodes.hosts.n1.dsk_nccl_env.NCCL_DEBUG"),
    ("host", 'cuda_packages: ["a", "b\\x1b[2J"]', "all.children.nodes.hosts.n1.cuda_packages.1"),
    ("file", 'dsk_root: "/opt/dsk\\n"', "dsk_root"),
])
def test_control_characters_are_refused_everywhere(tmp_path, where, text, field):
    if where == "host":
        inv_dir = write_inventory(tmp_path)
        hosts = (inv_dir / "hosts.yml").read_text().replace(
            "ansible_host: 10.1.1.1", "ansible_host: 10.1.1.1\n          " + text, 1)
        if text.startswith("ansible_host"):
            hosts = hosts.replace("ansible_host: 10.1.1.1\n", "", 1)
        (inv_dir / "hosts.yml").write_text(hosts)
        file = inv_dir / "hosts.yml"
    else:
        inv_dir = write_inventory(tmp_path, files={"group_vars/all.yml": text + "\n"})
        file = inv_dir / "group_vars/all.yml"
    err = refused(inv_dir)
    problems = getattr(err, "problems", None) or [err]
    assert any(p.file == str(file) and p.field == field
               and "control character" in (getattr(p, "message", None) or str(p))
               for p in problems), str(err)


@pytest.mark.parametrize(("name", "good"), [
    ("dsk_cluster_name", "prod-a"), ("dsk_profile", "h100-sxm-8"), ("dsk_root", "/opt/dsk"),
    ("dsk_python", "/opt/dsk/venv/bin/python"), ("dsk_socket_ifname", "eth0"),
    ("dsk_mirror_url", "http://10.0.0.1:8080/"), ("ansible_user", "ubuntu"),
    ("dsk_mirror_key_fingerprint", "EB693B3035CD5710E231E123A4B469963BF863CC"),
])
def test_schema_patterns_hold_to_the_true_end(name, good):
    validator = inventory_mod._validator("vars")
    assert not list(validator.iter_errors({name: good}))
    assert list(validator.iter_errors({name: good + "\n"})), f"{name}: a final newline passed"
    nccl = {"dsk_nccl_env": {"NCCL_DEBUG\n": "WARN"}}
    assert list(validator.iter_errors(nccl))
