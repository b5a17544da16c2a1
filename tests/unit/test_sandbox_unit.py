"""Pure parts of the sandbox: names, addresses, rendered files, image customisation."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
import yaml

from dsk_provision import files
from dsk_provision.errors import EnvironmentProblem, InputError
from dsk_provision.mirror import _release, _validate_packages
from dsk_provision.sandbox import core, host, image, naming, network, render


@pytest.mark.parametrize("name", ["a", "dsk", "itest", "abcdefgh", "n0de2"])
def test_valid_names(name):
    assert naming.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "1abc", "Abc", "abcdefghi", "a-b", "a_b", "a b", None])
def test_invalid_names_name_the_field(name):
    with pytest.raises(InputError) as exc:
        naming.validate_name(name)
    assert exc.value.field == "name"


@pytest.mark.parametrize("count", [0, -1, naming.MAX_NODES + 1, True, 2.0, "3"])
def test_invalid_node_counts(count):
    with pytest.raises(InputError) as exc:
        naming.validate_node_count(count)
    assert exc.value.field == "nodes"


def test_node_count_bounds_accepted():
    assert naming.validate_node_count(1) == 1
    assert naming.validate_node_count(naming.MAX_NODES) == naming.MAX_NODES
    assert naming.validate_node_count(naming.MAX_NODES - 2, spare=2) == naming.MAX_NODES - 2


def test_spare_nodes_past_the_limit_are_named_as_such():
    with pytest.raises(InputError) as exc:
        naming.validate_node_count(naming.MAX_NODES - 2, spare=3)
    assert exc.value.field == "spare"
    assert f"make {naming.MAX_NODES + 1}" in str(exc.value)


def test_mac_addresses_are_stable_unique_and_locally_administered():
    macs = [naming.mac_address("lab", "bridge")]
    macs += [naming.mac_address("lab", role, i)
             for role in ("node", "host") for i in range(1, naming.MAX_NODES + 1)]
    assert len(set(macs)) == len(macs)
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert len(mac.split(":")) == 6 and first & 0b10 and not first & 0b01, mac
    assert naming.mac_address("lab", "node", 3) == naming.mac_address("lab", "node", 3)
    assert naming.mac_address("lab", "node", 3) != naming.mac_address("lab2", "node", 3)


def test_derived_subnet_is_stable_private_and_spread():
    nets = {naming.derive_subnet(n) for n in ["dsk", "itest", "demo", "sbdev", "a", "b"]}
    assert naming.derive_subnet("dsk") == naming.derive_subnet("dsk")
    assert len(nets) > 1
    for net in nets:
        assert net.prefixlen == 24 and net.subnet_of(ipaddress.ip_network("10.213.0.0/16"))
        assert 1 <= int(str(net.network_address).split(".")[2]) <= 254


def test_parse_subnet_accepts_private_24():
    net = naming.parse_subnet("10.213.7.0/24")
    assert naming.bridge_ip(net) == "10.213.7.1"
    assert naming.node_ip(net, 1) == "10.213.7.11"
    assert naming.node_ip(net, 3) == "10.213.7.13"
    assert naming.mirror_url(net) == "http://10.213.7.1:8080/"


@pytest.mark.parametrize("text", ["10.213.7.0/16", "10.213.7.5/24", "8.8.8.0/24", "nonsense",
                                  "fd00::/64", "10.213.7.0"])
def test_parse_subnet_rejects(text):
    with pytest.raises(InputError) as exc:
        naming.parse_subnet(text)
    assert exc.value.field == "subnet"


def test_interface_names_fit_the_kernel_limit():
    longest = "abcdefgh"
    assert len(naming.veth_name(longest, naming.MAX_NODES)) <= 15
    assert len(naming.bridge_name(longest)) <= 15


def test_leftover_patterns_do_not_match_other_sandboxes():
    assert naming.veth_re("ab").fullmatch(naming.veth_name("ab", 12))
    assert not naming.veth_re("ab").fullmatch(naming.veth_name("abh1", 1))
    assert not naming.veth_re("ab").fullmatch(naming.veth_name("abc", 1))
    assert naming.netns_re("ab").fullmatch(naming.netns_name("ab", "node3"))
    assert not naming.netns_re("ab").fullmatch(naming.netns_name("abc", "node3"))
    assert naming.machine_name("ab", "node1") != naming.machine_name("cd", "node1")


def test_paths_follow_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DSK_SANDBOX_ROOT", str(tmp_path / "st"))
    monkeypatch.setenv("DSK_IMAGE_CACHE", str(tmp_path / "img"))
    assert naming.state_dir("x") == tmp_path / "st" / "x"
    assert image.image_dir().parent == tmp_path / "img"
    monkeypatch.delenv("DSK_SANDBOX_ROOT")
    assert naming.state_dir("x") == Path("/var/lib/dsk-provision/sandbox/x")


@pytest.mark.parametrize("rate,bits", [("10mbit", 10_000_000), ("1gbit", 10**9),
                                       ("500kbps", 4_000_000), ("2.5mbit", 2_500_000)])
def test_parse_rate(rate, bits):
    assert naming.parse_rate(rate) == bits


@pytest.mark.parametrize("rate", ["fast", "10", "0mbit", "-1mbit", "10 furlongs"])
def test_parse_rate_rejects(rate):
    with pytest.raises(InputError):
        naming.parse_rate(rate)


def test_subnet_conflicts_ignore_own_bridge_and_loopback():
    net = ipaddress.ip_network("10.213.7.0/24")
    addrs = [("lo", ipaddress.IPv4Interface("127.0.0.1/8")),
             ("eth0", ipaddress.IPv4Interface("192.0.2.2/24")),
             ("dskbr-me", ipaddress.IPv4Interface("10.213.7.1/24"))]
    assert network.subnet_conflicts(net, addrs, "dskbr-me") == []
    assert network.subnet_conflicts(net, addrs, "dskbr-other") == ["dskbr-me (10.213.7.1/24)"]
    wide = [("wg0", ipaddress.IPv4Interface("10.213.0.5/16"))]
    assert network.subnet_conflicts(net, wide, "dskbr-me") == ["wg0 (10.213.0.5/16)"]


def test_inventory_matches_the_contract(tmp_path):
    sd = tmp_path / "sb"
    text = render.render_inventory(
        cluster_name="sb", nodes=[("node1", "10.213.7.11"), ("node2", "10.213.7.12")],
        key_file=sd / "ssh/id_ed25519", known_hosts=sd / "ssh/known_hosts",
        control_dir=sd / "cp", mirror_url="http://10.213.7.1:8080/")
    doc = yaml.safe_load(text)
    v = doc["all"]["vars"]
    assert v["dsk_cluster_name"] == "sb" and v["dsk_profile"] == "cpu-sandbox"
    assert v["dsk_gpus_per_node"] == 0 and v["dsk_root"] == "/opt/dsk"
    assert v["dsk_python"] == "/opt/dsk/venv/bin/python" and v["dsk_rdzv_port"] == 29500
    assert v["dsk_socket_ifname"] == "eth0" and v["dsk_mirror_url"] == "http://10.213.7.1:8080/"
    assert v["ansible_user"] == "root" and v["ansible_python_interpreter"] == "/usr/bin/python3"
    assert v["ansible_ssh_private_key_file"] == str(sd / "ssh/id_ed25519")
    args = v["ansible_ssh_common_args"]
    assert f"-o UserKnownHostsFile={sd}/ssh/known_hosts" in args
    assert "-o StrictHostKeyChecking=yes" in args and "StrictHostKeyChecking=no" not in args
    assert f"-o ControlPath={sd}/cp/%C" in args and "-o ControlPersist=60s" in args
    hosts = doc["all"]["children"]["nodes"]["hosts"]
    assert list(hosts) == ["node1", "node2"]
    assert hosts["node2"] == {"ansible_host": "10.213.7.12"}


def test_inventory_loads_with_the_project_loader(tmp_path):
    inventory = pytest.importorskip("dsk_provision.inventory")
    sd = tmp_path / "sb"
    path = tmp_path / "hosts.yml"
    path.write_text(render.render_inventory(
        cluster_name="sb", nodes=[("node1", "10.213.7.11"), ("node2", "10.213.7.12")],
        key_file=sd / "ssh/id_ed25519", known_hosts=sd / "ssh/known_hosts",
        control_dir=sd / "cp", mirror_url="http://10.213.7.1:8080/"))
    inv = inventory.load_inventory(path)
    assert [(n.name, n.address) for n in inv.nodes] == [("node1", "10.213.7.11"),
                                                         ("node2", "10.213.7.12")]


def test_hosts_and_known_hosts():
    nodes = [("node1", "10.213.7.11"), ("node2", "10.213.7.12")]
    hosts = render.render_etc_hosts("sb", nodes)
    assert "10.213.7.11\tnode1\n" in hosts and "10.213.7.12\tnode2\n" in hosts
    assert hosts.startswith("127.0.0.1\tlocalhost\n")
    kh = render.render_known_hosts([("node1", "10.213.7.11", "ssh-ed25519 AAAA1"),
                                    ("node2", "10.213.7.12", "ssh-ed25519 AAAA2")])
    assert kh == ("node1,10.213.7.11 ssh-ed25519 AAAA1\n"
                  "node2,10.213.7.12 ssh-ed25519 AAAA2\n")


def _venv(tmp_path, home):
    v = tmp_path / "venv"
    (v / "bin").mkdir(parents=True)
    (v / "bin/python").symlink_to("/usr/bin/python3")
    (v / "pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = false\n")
    return v


def test_resolve_venv_accepts_debian_python(tmp_path):
    v = _venv(tmp_path, "/usr/bin")
    assert core.resolve_venv(v) == v.resolve()


def test_resolve_venv_rejects_other_pythons(tmp_path):
    with pytest.raises(InputError) as exc:
        core.resolve_venv(_venv(tmp_path, "/root/.pyenv/versions/3.11.9/bin"))
    assert exc.value.field == "venv" and "/usr/bin/python3" in str(exc.value)
    with pytest.raises(InputError):
        core.resolve_venv(tmp_path / "nothing")


def test_resolve_venv_default_outside_a_venv(monkeypatch, tmp_path):
    monkeypatch.setattr(core.sys, "prefix", str(tmp_path))
    with pytest.raises(EnvironmentProblem):
        core.resolve_venv(None)


def test_up_rejects_bad_input_before_any_change(monkeypatch, tmp_path):
    monkeypatch.setenv("DSK_SANDBOX_ROOT", str(tmp_path / "st"))
    for kwargs, field in [({"name": "Bad"}, "name"), ({"nodes": 0}, "nodes"),
                          ({"subnet": "10.0.0.0/8"}, "subnet")]:
        with pytest.raises(InputError) as exc:
            core.up(**kwargs)
        assert exc.value.field == field
    assert not (tmp_path / "st").exists()


def test_missing_tool_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(host, "which", lambda t: None if t == "mmdebstrap" else "/bin/" + t)
    with pytest.raises(EnvironmentProblem) as exc:
        host.require_tools()
    assert "mmdebstrap" in str(exc.value) and "apt-get install mmdebstrap" in str(exc.value)


def test_customise_image(tmp_path):
    root = tmp_path / "rootfs"
    for d in ("etc/ssh/sshd_config.d", "etc/systemd/system", "etc/apt", "var/lib/apt/lists",
              "lib/systemd/system"):
        (root / d).mkdir(parents=True)
    (root / "etc/ssh/ssh_host_rsa_key").write_text("secret")
    (root / "etc/ssh/ssh_host_rsa_key.pub").write_text("pub")
    (root / "etc/resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
    (root / "etc/apt/sources.list").write_text("deb http://deb.debian.org/debian bookworm main")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    image.customise(root)
    assert not list((root / "etc/ssh").glob("ssh_host_*"))
    assert "HostKey /etc/ssh/ssh_host_ed25519_key" in (
        root / "etc/ssh/sshd_config.d/dsk-sandbox.conf").read_text()
    assert "Storage=volatile" in (root / "etc/systemd/journald.conf.d/dsk-sandbox.conf").read_text()
    resolv = root / "etc/resolv.conf"
    assert not resolv.is_symlink() and "nameserver" not in resolv.read_text()
    for unit in ("console-getty.service", "systemd-udevd.service",
                 "systemd-networkd-wait-online.service", "systemd-user-sessions.service"):
        assert os.readlink(root / "etc/systemd/system" / unit) == "/dev/null"
    assert os.readlink(root / "etc/tmpfiles.d/systemd-nologin.conf") == "/dev/null"
    assert (root / "etc/machine-id").read_text() == ""
    assert not (root / "etc/apt/sources.list").exists()
    assert (root / "var/lib/apt/lists").stat().st_mtime == image.OLD_MTIME
    assert (root / "etc/systemd/system/multi-user.target.wants/ssh.service").is_symlink()


def test_image_key_follows_package_list():
    assert image.image_key(("a", "b")) == image.image_key(("b", "a"))
    assert image.image_key(("a", "b")) != image.image_key(("a", "c"))


def test_mirror_package_names_validated():
    assert _validate_packages(["jq", "pciutils", "jq"]) == ["jq", "pciutils"]
    with pytest.raises(InputError):
        _validate_packages([])
    with pytest.raises(InputError):
        _validate_packages(["jq; rm -rf /"])


def test_mirror_release_hashes_index(tmp_path):
    import hashlib
    (tmp_path / "Packages").write_text("Package: jq\n")
    (tmp_path / "Packages.gz").write_bytes(b"gz")
    rel = _release(tmp_path)
    digest = hashlib.sha256(b"Package: jq\n").hexdigest()
    assert f" {digest} 12 Packages" in rel
    assert rel.startswith("Origin: dsk-provision\n")


def test_write_file_whole_with_mode(tmp_path):
    target = tmp_path / "d" / "key"
    files.write_file(target, "x", 0o600)
    assert target.read_text() == "x" and (target.stat().st_mode & 0o777) == 0o600
    files.write_file(target, "y", 0o600)
    assert target.read_text() == "y" and list(target.parent.iterdir()) == [target]


def test_pid_matches_checks_the_command_line():
    me = os.getpid()
    assert host.pid_matches(me, "python") or host.pid_matches(me, "pytest")
    assert not host.pid_matches(me, "no-such-marker-in-argv")
    assert not host.pid_matches(None, "python")


# ---------------------------------------------------------------------- a node's kept disk

def fake_node_root(tmp_path: Path) -> tuple[Path, Path]:
    """A node root as the image leaves it, and a directory outside it standing for the
    host's own files."""
    root = tmp_path / "nodes" / "node1" / "root"
    for d in ("etc/ssh", "root"):
        (root / d).mkdir(parents=True)
    (root / "etc/machine-id").write_text("")
    outside = tmp_path / "host"
    outside.mkdir()
    outside.chmod(0o755)
    secret = outside / "shadow"
    secret.write_text("root:secret\n")
    secret.chmod(0o640)
    return root, outside


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_write_identity_replaces_links_to_host_files_without_touching_them(tmp_path):
    from dsk_provision.sandbox import nodes

    root, outside = fake_node_root(tmp_path)
    secret = outside / "shadow"
    # Links a node's root user could leave in its kept disk, absolute as the host sees them.
    for name in ("etc/ssh/ssh_host_ed25519_key", "etc/hostname", "etc/machine-id"):
        (root / name).unlink(missing_ok=True)
        (root / name).symlink_to(secret)
    (root / "etc/ssh/ssh_host_ed25519_key.pub").symlink_to(secret)
    public = nodes.write_identity(root, "node1", "10.0.0.11 node1\n", "ssh-ed25519 AAAA test")
    assert public.startswith("ssh-ed25519 ")
    assert mode(secret) == 0o640 and secret.read_text() == "root:secret\n"
    assert sorted(p.name for p in outside.iterdir()) == ["shadow"]
    key = root / "etc/ssh/ssh_host_ed25519_key"
    assert not key.is_symlink() and mode(key) == 0o600
    assert (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[1] == \
        public.split()[1]
    assert (root / "etc/hostname").read_text() == "node1\n"
    assert len((root / "etc/machine-id").read_text().strip()) == 32
    assert mode(root / "root/.ssh") == 0o700
    assert mode(root / "root/.ssh/authorized_keys") == 0o600


@pytest.mark.parametrize("linked", ["root/.ssh", "etc", "etc/ssh"])
def test_write_identity_refuses_a_linked_directory_and_leaves_its_target_alone(tmp_path,
                                                                                linked):
    import shutil

    from dsk_provision.sandbox import nodes

    root, outside = fake_node_root(tmp_path)
    if (root / linked).exists():
        shutil.rmtree(root / linked)
    (root / linked).symlink_to(outside)
    with pytest.raises(EnvironmentProblem) as err:
        nodes.write_identity(root, "node1", "10.0.0.11 node1\n", "ssh-ed25519 AAAA test")
    assert str(root / linked) in str(err.value)
    assert mode(outside) == 0o755
    assert sorted(p.name for p in outside.iterdir()) == ["shadow"]
    assert mode(outside / "shadow") == 0o640


def test_a_node_keeps_its_host_key(tmp_path):
    from dsk_provision.sandbox import nodes

    root, _ = fake_node_root(tmp_path)
    first = nodes.write_identity(root, "node1", "", "ssh-ed25519 AAAA test")
    (root / "etc/ssh/ssh_host_ed25519_key").chmod(0o644)
    assert nodes.write_identity(root, "node1", "", "ssh-ed25519 AAAA test") == first
    assert mode(root / "etc/ssh/ssh_host_ed25519_key") == 0o600


def test_a_venv_deleted_and_made_again_is_stale_for_a_node_that_holds_the_old_one(tmp_path):
    import shutil

    venv = tmp_path / ".venv"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    # What a bind mount does: hold on to the directory itself, not to its path.
    held = os.open(venv, os.O_RDONLY | os.O_DIRECTORY)
    try:
        as_node_sees_it = Path(f"/proc/self/fd/{held}")
        assert not core.venv_is_stale(as_node_sees_it, venv)
        shutil.rmtree(venv)
        venv.mkdir()  # a fresh clone in the same place
        assert core.venv_is_stale(as_node_sees_it, venv)
        assert not core.venv_is_stale(venv, venv)
        assert not core.venv_is_stale(tmp_path / "nothing", venv)  # a node not up yet
    finally:
        os.close(held)
