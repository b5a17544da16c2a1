"""A mirror built from the Debian 12 repositories, served on the sandbox bridge, used by a
node to install a package it lacks."""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import yaml

from dsk_provision import mirror, mirror_serve
from dsk_provision.inventory import Node

PORT = 8181  # the sandbox's own apt mirror has 8080
PACKAGE = "tree"  # neither in the node image nor in the sandbox's mirror


def test_node_installs_from_built_mirror(sandbox_cluster, node_ssh, tmp_path):
    roles = tmp_path / "roles"
    (roles / "tools/defaults").mkdir(parents=True)
    (roles / "tools/defaults/main.yml").write_text(
        yaml.safe_dump({"tools_apt_packages": [PACKAGE]}))
    inv = SimpleNamespace(path=Path("hosts.yml"), vars={},
                          nodes=[Node("node1", "10.0.0.1", 22, "root", 0, {})])
    plan = mirror.plan_mirror(inv, ["debian-12"], roles_dir=roles)
    assert [r.spec for r in plan.apt["debian-12"]] == [PACKAGE]
    out = tmp_path / "mirror"
    manifest = mirror.build_mirror(plan, out, signing_home=tmp_path / "signing", wheels=False)
    names = {p["name"] for p in manifest["apt"]["debian-12"]["packages"]}
    assert PACKAGE in names and "libc6" in names  # the whole dependency closure
    assert (out / "manifest.json").is_file()

    bridge = sandbox_cluster.bridge_ip
    server = mirror_serve.make_server(out, bridge, PORT, quiet=True)
    mirror_serve.serve_in_thread(server)
    _, ip = sandbox_cluster.nodes[-1]
    url = mirror_serve.inventory_settings(manifest, mirror_serve.base_url(bridge, PORT))[0][1]
    # Only this mirror as a source, in a private list: the node's own sources stay as they are.
    apt = ("apt-get -q -o Dir::Etc::SourceList=/tmp/dsk-mirror-test.list "
           "-o Dir::Etc::SourceParts=/nonexistent "
           "-o Dir::State::Lists=/tmp/dsk-mirror-test-lists")
    setup = (f"mkdir -p /tmp/dsk-mirror-test-lists/partial && echo "
             f"{shlex.quote(f'deb [trusted=yes] {url} ./')} > /tmp/dsk-mirror-test.list")
    try:
        node_ssh(ip, "! command -v tree")
        node_ssh(ip, f"{setup} && {apt} update && DEBIAN_FRONTEND=noninteractive "
                     f"{apt} install -y --no-install-recommends {PACKAGE}")
        proc = node_ssh(ip, "tree -L 1 /opt")
        assert proc.returncode == 0 and "director" in proc.stdout
    finally:
        node_ssh(ip, f"apt-get purge -y -q {PACKAGE}; rm -rf /tmp/dsk-mirror-test.list "
                     "/tmp/dsk-mirror-test-lists", check=False)
        server.shutdown()
        server.server_close()
