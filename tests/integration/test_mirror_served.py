"""A mirror built from the Debian 12 repositories, signed with its own key and served on
the sandbox bridge, used by a node to install a package it lacks with apt checking the
signature; a tampered InRelease is refused. And the bootstrapped sandbox's nodes use their
mirror the same way (signed-by, the key installed by the common role)."""

from __future__ import annotations

import base64
import shlex
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dsk_provision import mirror, mirror_serve, mirror_sign
from dsk_provision.inventory import Node

REPO = Path(__file__).resolve().parents[2]
PORT = 8181  # the sandbox's own apt mirror has 8080
PACKAGE = "tree"  # neither in the node image nor in the sandbox's mirror
KEYRING = "/tmp/dsk-mirror-test.gpg"


def _apt_key_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dsk_apt_key", REPO / "library/dsk_apt_key.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    repo = out / "apt/debian-12"
    assert {"InRelease", "Release.gpg", mirror_sign.public_key_name()} <= \
        {p.name for p in repo.iterdir()}

    # The node trusts the key the control node recorded: the manifest's fingerprint.
    fingerprint = manifest["signing_key"]["fingerprint"]
    binary, found = _apt_key_module().primary_fingerprints(
        (repo / mirror_sign.public_key_name()).read_bytes())
    assert found == [fingerprint]

    bridge = sandbox_cluster.bridge_ip
    server = mirror_serve.make_server(out, bridge, PORT, quiet=True)
    mirror_serve.serve_in_thread(server)
    _, ip = sandbox_cluster.nodes[-1]
    base = mirror_serve.base_url(bridge, PORT)
    settings = dict(s[:2] for s in mirror_serve.inventory_settings(manifest, base, out))
    assert settings["dsk_mirror_key_fingerprint"] == fingerprint
    url = settings["dsk_mirror_url"]
    # Only this mirror as a source, in a private list: the node's own sources stay as they are.
    apt = ("apt-get -q -o Dir::Etc::SourceList=/tmp/dsk-mirror-test.list "
           "-o Dir::Etc::SourceParts=/nonexistent "
           "-o Dir::State::Lists=/tmp/dsk-mirror-test-lists")
    fresh_lists = ("rm -rf /tmp/dsk-mirror-test-lists && "
                   "mkdir -p /tmp/dsk-mirror-test-lists/partial")
    setup = (f"echo {base64.b64encode(binary).decode()} | base64 -d > {KEYRING} && echo "
             f"{shlex.quote(f'deb [signed-by={KEYRING}] {url} ./')} > /tmp/dsk-mirror-test.list")
    inrelease = repo / "InRelease"
    signed = inrelease.read_text()
    try:
        with pytest.raises(urllib.error.HTTPError) as err:  # the served tree hides the lock
            urllib.request.urlopen(base + "%2ebuild.lock", timeout=10)
        assert err.value.code == 404
        node_ssh(ip, "! command -v tree")
        node_ssh(ip, setup)
        # A Release changed after signing: apt refuses the repository.
        inrelease.write_text(signed.replace("Suite: mirror", "Suite: mirror-tampered"))
        bad = node_ssh(ip, f"{fresh_lists} && {apt} update", check=False)
        output = bad.stdout + bad.stderr
        assert "BADSIG" in output or "not signed" in output, output
        node_ssh(ip, f"! {apt} install -y --no-install-recommends {PACKAGE}")
        inrelease.write_text(signed)
        # Signed as built: the node installs from it, signatures checked against the key.
        node_ssh(ip, f"{fresh_lists} && {apt} update && DEBIAN_FRONTEND=noninteractive "
                     f"{apt} install -y --no-install-recommends {PACKAGE}")
        proc = node_ssh(ip, "tree -L 1 /opt")
        assert proc.returncode == 0 and "director" in proc.stdout
    finally:
        inrelease.write_text(signed)
        node_ssh(ip, f"apt-get purge -y -q {PACKAGE}; rm -rf /tmp/dsk-mirror-test.list "
                     f"/tmp/dsk-mirror-test-lists {KEYRING}", check=False)
        server.shutdown()
        server.server_close()


def test_bootstrapped_nodes_check_their_mirror_signature(bootstrapped_cluster, node_ssh):
    """The sandbox's mirror is signed, the inventory pins its key, and bootstrap made every
    node use it with signed-by (never trusted=yes)."""
    bootstrapped_cluster.require_success()
    inventory = yaml.safe_load(bootstrapped_cluster.info.inventory_path.read_text())
    fingerprint = inventory["all"]["vars"]["dsk_mirror_key_fingerprint"]
    for _name, ip in bootstrapped_cluster.info.nodes:
        source = node_ssh(ip, "cat /etc/apt/sources.list.d/dsk-mirror.list").stdout
        assert "signed-by=/etc/apt/keyrings/dsk-mirror.gpg" in source, source
        assert "trusted=yes" not in source and fingerprint in source
        keyring = node_ssh(ip, "base64 -w0 /etc/apt/keyrings/dsk-mirror.gpg").stdout
        found = _apt_key_module().primary_fingerprints(base64.b64decode(keyring))[1]
        assert found == [fingerprint]
    # apt verifies the mirror's InRelease with that keyring on a fresh update.
    _, ip = bootstrapped_cluster.info.nodes[0]
    proc = node_ssh(ip, "apt-get update -q 2>&1")
    assert "GPG error" not in proc.stdout and "not signed" not in proc.stdout, proc.stdout
