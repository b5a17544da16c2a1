"""`dsk-provision init`: host lists, ranges and files become an inventory that `check`
accepts, keeps its comments under later edits, and never replaces one unasked."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from test_hostkeys import cluster as keyscan_cluster  # noqa: F401  (the fixture)
from typer.testing import CliRunner

from dsk_provision import inventory_init as ii
from dsk_provision import state
from dsk_provision.cli import app
from dsk_provision.errors import InputError
from dsk_provision.inventory import load_inventory
from dsk_provision.inventory_edit import NewNode, add_nodes
from dsk_provision.remote import LocalTransport

runner = CliRunner()


def init(*args: str, input: str | None = None):
    return runner.invoke(app, ["init", *args], input=input)


# ---------------------------------------------------------------- host lists

@pytest.mark.parametrize("text,want", [
    ("10.0.0.11-10.0.0.13", ["10.0.0.11", "10.0.0.12", "10.0.0.13"]),
    ("10.0.0.254-10.0.1.1", ["10.0.0.254", "10.0.0.255", "10.0.1.0", "10.0.1.1"]),
    ("10.0.0.11-12", ["10.0.0.11", "10.0.0.12"]),
    ("10.0.0.7-7", ["10.0.0.7"]),
])
def test_ranges(text, want):
    assert ii.expand_range(text) == want


@pytest.mark.parametrize("text,words", [
    ("10.0.0.18-10.0.0.11", "ends before it starts"),
    ("10.0.0.11-300", "ends no IPv4 range"),
    ("10.0.0.11-gpu", "ends no IPv4 range"),
    ("10.0.0-10.0.0.3", "starts with an IPv4 address"),
    ("10.0.0.0-10.0.255.255", "more than 4096"),
])
def test_bad_ranges_name_the_option(text, words):
    with pytest.raises(InputError, match=words) as err:
        ii.hosts_from_list(text)
    assert err.value.field == "--hosts"


def test_host_lists_are_named_in_order():
    hosts = ii.hosts_from_list("10.0.0.11-12, node-x.example.org,fd00::5", prefix="n",
                               port=2222)
    assert [(h.name, h.address, h.port) for h in hosts] == [
        ("n01", "10.0.0.11", 2222), ("n02", "10.0.0.12", 2222),
        ("n03", "node-x.example.org", 2222), ("n04", "fd00::5", 2222)]
    assert ii.hosts_from_list("10.0.0.1-100")[-1].name == "gpu100"
    assert ii.hosts_from_list("10.0.0.1-100")[0].name == "gpu001"


@pytest.mark.parametrize("text,option,words", [
    ("10.0.0.1,10.0.0.1", "--hosts", "address 10.0.0.1:22 is given twice"),
    ("10.0.0.999", "--hosts", "neither an IP address"),
    (" , ", "--hosts", "no host given"),
])
def test_bad_host_lists(text, option, words):
    with pytest.raises(InputError, match=words) as err:
        ii.hosts_from_list(text)
    assert err.value.field == option


def test_hosts_files(tmp_path):
    f = tmp_path / "nodes.txt"
    f.write_text("# rack 4\nalpha 10.1.0.1\n\nbeta 10.1.0.2 2200   # spare PSU\n")
    hosts = ii.hosts_from_file(f)
    assert [(h.name, h.address, h.port) for h in hosts] == [("alpha", "10.1.0.1", 22),
                                                            ("beta", "10.1.0.2", 2200)]


@pytest.mark.parametrize("text,words", [
    ("alpha\n", "not 'name address [port]'"),
    ("alpha 10.1.0.1 22 extra\n", "not 'name address [port]'"),
    ("-bad 10.1.0.1\n", "not a node name"),
    ("alpha 10.1.0.1 99999\n", "not a port"),
    ("alpha 10.1.0.1\nalpha 10.1.0.2\n", "name alpha is given twice"),
    ("# nothing\n", "no host in it"),
])
def test_bad_hosts_files(tmp_path, text, words):
    f = tmp_path / "nodes.txt"
    f.write_text(text)
    with pytest.raises(InputError, match=re.escape(words)) as err:
        ii.hosts_from_file(f)
    assert err.value.field == "--hosts-file" and str(f) in str(err.value)


# ---------------------------------------------------------------- written inventories

def test_written_inventory_passes_check(tmp_path):
    inv = tmp_path / "prod-a"
    result = init("-i", str(inv), "--hosts", "10.0.0.11-14", "--profile", "h100-sxm-8",
                  "--port", "2222")
    assert result.exit_code == 0, result.output
    loaded = load_inventory(inv)
    assert loaded.cluster_name == "prod-a" and loaded.profile == "h100-sxm-8"
    assert [(n.name, n.address, n.port, n.gpus) for n in loaded.nodes] == [
        (f"gpu0{i}", f"10.0.0.1{i}", 2222, 8) for i in range(1, 5)]
    assert loaded.vars["ansible_ssh_common_args"].split() == [
        "-o", f"UserKnownHostsFile={inv / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes"]
    checked = runner.invoke(app, ["check", "-i", str(inv)])
    assert checked.exit_code == 0, checked.output
    assert "inventory OK" in checked.output


def test_a_cpu_cluster_gets_the_cpu_profile(tmp_path):
    result = init("-i", str(tmp_path / "c"), "--hosts", "10.0.0.1", "--gpus", "0",
                  "--name", "cpu-lab")
    assert result.exit_code == 0, result.output
    assert load_inventory(tmp_path / "c").profile == "cpu-sandbox"


def test_comments_survive_adding_a_node(tmp_path):
    inv = tmp_path / "lab"
    assert init("-i", str(inv), "--hosts", "10.0.0.11,10.0.0.12").exit_code == 0
    before = (inv / "hosts.yml").read_text()
    comments = [ln for ln in before.splitlines() if ln.lstrip().startswith("#")]
    assert len(comments) >= 5
    add_nodes(load_inventory(inv), [NewNode("gpu03", "10.0.0.13")])
    after = (inv / "hosts.yml").read_text()
    assert [ln for ln in after.splitlines() if ln.lstrip().startswith("#")] == comments
    assert after.startswith(before.rstrip("\n"))
    assert after.rstrip("\n").endswith("gpu03: {ansible_host: 10.0.0.13}")
    assert [n.name for n in load_inventory(inv).nodes] == ["gpu01", "gpu02", "gpu03"]


def test_an_existing_inventory_is_replaced_only_with_force(tmp_path):
    inv = tmp_path / "lab"
    assert init("-i", str(inv), "--hosts", "10.0.0.11").exit_code == 0
    files = [inv / "hosts.yml", inv / "group_vars" / "all.yml"]
    before = [f.read_bytes() for f in files]
    refused = init("-i", str(inv), "--hosts", "10.0.0.21,10.0.0.22")
    assert refused.exit_code == 2 and "--force" in refused.output
    assert [f.read_bytes() for f in files] == before
    forced = init("-i", str(inv), "--hosts", "10.0.0.21,10.0.0.22", "--force")
    assert forced.exit_code == 0, forced.output
    assert [n.address for n in load_inventory(inv).nodes] == ["10.0.0.21", "10.0.0.22"]


def test_a_second_hosts_file_is_not_left_beside_the_new_one(tmp_path):
    inv = tmp_path / "lab"
    inv.mkdir()
    (inv / "hosts.yaml").write_text("all: {}\n")
    result = init("-i", str(inv), "--hosts", "10.0.0.11", "--force")
    assert result.exit_code == 2 and "hosts.yaml" in result.output
    assert not (inv / "hosts.yml").exists()


@pytest.mark.parametrize("args,option", [
    (["--hosts", "10.0.0.11-10.0.0.1"], "--hosts"),
    (["--hosts", "10.0.0.1", "--hosts-file", "x"], "--hosts"),
    ([], "--hosts"),
    (["--hosts", "10.0.0.1", "--name", "Prod_A"], "--name"),
    (["--hosts", "10.0.0.1", "--gpus", "17"], "--gpus"),
    (["--hosts", "10.0.0.1", "--profile", "h900"], "--profile"),
    (["--hosts", "10.0.0.1", "--user", "root; rm"], "--user"),
    (["--hosts", "10.0.0.1", "--known-hosts", "kh"], "--known-hosts"),
    (["--hosts", "10.0.0.1", "--prefix", "-x"], "--prefix"),
    (["--hosts", "10.0.0.1", "--expect", "fp"], "--expect"),
    (["--hosts-file", "missing.txt"], "--hosts-file"),
])
def test_bad_input_names_the_option_and_writes_nothing(tmp_path, args, option):
    inv = tmp_path / "lab"
    result = init("-i", str(inv), *args)
    assert result.exit_code == 2, result.output
    assert option in result.output
    assert not inv.exists()


def test_a_directory_name_that_is_no_cluster_name_asks_for_name(tmp_path):
    result = init("-i", str(tmp_path / "My Cluster"), "--hosts", "10.0.0.1")
    assert result.exit_code == 2 and "--name" in result.output


# ---------------------------------------------------------------- probing

H100_NODE = """\
os=Ubuntu 22.04.4 LTS
""" + "".join(f"gpu=0000:{i:02x}:00.0 0x2330\ngpu_name=NVIDIA H100 80GB HBM3\n"
              for i in range(8)) + """\
if=eth0 ether up
if=ib0 infiniband up
if=eno2 ether down
inet=eth0 10.0.0.11/24
"""


def test_probe_output_is_read():
    facts = ii.parse_probe(H100_NODE)
    assert (facts.os, facts.gpu_count, facts.gpu_model) == (
        "Ubuntu 22.04.4 LTS", 8, "NVIDIA H100 80GB HBM3")
    assert facts.interface_of("10.0.0.11") == "eth0"
    assert facts.summary() == ("8x NVIDIA H100 80GB HBM3; Ubuntu 22.04.4 LTS; eno2 down, "
                               "eth0 10.0.0.11/24, ib0 (infiniband)")
    assert ii.profile_for(facts.gpu_model, 8) == "h100-sxm-8"
    assert ii.profile_for("NVIDIA L40S", 4) is None
    assert ii.profile_for("", 0) == "cpu-sandbox"
    # Without a driver the PCI device id names the GPUs.
    assert ii.parse_probe("gpu=0000:01:00.0 0x2335\n").gpu_model == "NVIDIA device 0x2335"


def test_what_a_node_says_cannot_leave_its_comment():
    facts = ii.parse_probe("os=Evil\nall: {}\ngpu_name=X\" # }\n\n\x1b[2J\n"
                           "if=eth0 ether up\ninet=eth0 10.0.0.1/24\n")
    hosts = [ii.HostSpec("n1", "10.0.0.1")]
    text = ii.render_hosts(hosts, ii.Settings("c", 0, "cpu-sandbox"), Path("/x"),
                           {"n1": facts})
    node_line = [ln for ln in text.splitlines() if ln.strip().startswith("n1:")]
    assert len(node_line) == 1 and node_line[0].count("#") == 1


def test_probe_reads_this_machine(tmp_path):
    """The probe's shell script, run here (a local transport), finds what /etc/os-release
    and /sys/class/net say."""
    assert init("-i", str(tmp_path / "lab"), "--hosts", "127.0.0.1").exit_code == 0
    inv = load_inventory(tmp_path / "lab")
    facts = ii.probe(inv, transport=LocalTransport())["gpu01"]
    os_release = dict(line.split("=", 1) for line in
                      Path("/etc/os-release").read_text().splitlines() if "=" in line)
    assert facts.os == os_release["PRETTY_NAME"].strip('"')
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    names = {ln.split()[1].rstrip(":").split("@")[0] for ln in links}
    assert set(facts.interfaces) == names - {"lo"}
    addresses = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True,
                               text=True, check=True).stdout.splitlines()
    for line in addresses:
        words = line.split()
        if words[1] != "lo":
            assert words[3] in facts.addresses[words[1]]
    gpus = 0
    for dev in Path("/sys/bus/pci/devices").iterdir():
        if (dev / "vendor").read_text().strip() == "0x10de" and \
                (dev / "class").read_text()[:6] in ("0x0300", "0x0302"):
            gpus += 1
    assert facts.gpu_count == gpus


def test_init_probe_pins_keys_then_fills_in_what_nodes_say(keyscan_cluster, tmp_path,  # noqa: F811
                                                            monkeypatch):
    """--probe: the host keys go through hostkeys.trust (here: expected fingerprints), then
    each node's answers fill the inventory in."""
    keys = keyscan_cluster["keys"]
    inv = tmp_path / "probed"
    expect = tmp_path / "fp"
    expect.write_text("".join(f"{n} {k.fingerprint}\n" for n, k in keys.items()))
    hosts = [ii.HostSpec("gpu01", "10.0.0.11"), ii.HostSpec("gpu02", "10.0.0.12"),
             ii.HostSpec("gpu03", "10.0.0.13", 2222)]
    answers = {"gpu01": H100_NODE, "gpu02": H100_NODE.replace("10.0.0.11", "10.0.0.12"),
               "gpu03": H100_NODE.replace("10.0.0.11", "10.0.0.13")}

    class Answers:
        def argv(self, node, command):
            assert "os-release" in command
            return ["printf", "%s", answers[node.name]]

    result = ii.init_inventory(inv, hosts, ii.Settings("probed", gpus_per_node=2),
                               probe_nodes=True, expect=expect, transport=Answers())
    loaded = load_inventory(inv)
    assert loaded.profile == "h100-sxm-8" and [n.gpus for n in loaded.nodes] == [8, 8, 8]
    assert loaded.vars["dsk_socket_ifname"] == "eth0"
    assert "# 8x NVIDIA H100 80GB HBM3; Ubuntu 22.04.4 LTS" in (inv / "hosts.yml").read_text()
    assert result.facts["gpu02"].os == "Ubuntu 22.04.4 LTS"
    known = (inv / "known_hosts").read_text()
    assert all(k.line in known for k in keys.values())
    # Again over the same, now used, inventory (its state directory claimed by it).
    state.claim_cluster_state_dir("probed", inv / "hosts.yml")
    ii.init_inventory(inv, hosts, ii.Settings("probed"), force=True, probe_nodes=True,
                      expect=expect, transport=Answers())
    assert load_inventory(inv).profile == "h100-sxm-8"
    # A key no fingerprint vouches for stops the probe before any node is asked.
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f", str(other)],
                   check=True)
    os.replace(f"{other}.pub", keyscan_cluster["keys_dir"] / "10.0.0.12_22.pub")
    again = init("-i", str(tmp_path / "again"), "--hosts-file", str(_hosts_file(tmp_path)),
                 "--probe", "--expect", str(expect))
    assert again.exit_code == 4, again.output
    assert not (tmp_path / "again").exists()


def _hosts_file(tmp_path: Path) -> Path:
    f = tmp_path / "nodes.txt"
    f.write_text("gpu01 10.0.0.11\ngpu02 10.0.0.12\ngpu03 10.0.0.13 2222\n")
    return f
