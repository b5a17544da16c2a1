"""The drift logic of library/dsk_state.py: every kind of resource it verifies must report
a difference when the real state differs, and nothing when it matches. A probe that
missed a difference would let a re-run skip a repair."""

from __future__ import annotations

import grp
import hashlib
import importlib.util
import io
import os
import pwd
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("dsk_state", REPO / "library" / "dsk_state.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


state = _load()
ME = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(os.getgid()).gr_name


def test_a_file_is_checked_for_content_checksums_mode_and_owner(tmp_path):
    path = tmp_path / "f.conf"
    path.write_text("a = 1\n")
    path.chmod(0o644)
    spec = {"path": str(path), "content": "a = 1\n", "mode": "0644", "owner": ME,
            "group": MY_GROUP}
    assert state.file_drift(spec) == []
    assert state.file_drift({"path": str(path), "sha256": hashlib.sha256(b"a = 1\n").hexdigest(),
                             "sha1": hashlib.sha1(b"a = 1\n").hexdigest()}) == []

    path.write_text("a = 2\n")
    assert state.file_drift(spec) == [f"{path}: content differs"]
    assert state.file_drift({"path": str(path), "sha1": hashlib.sha1(b"a = 1\n").hexdigest()}) == [
        f"{path}: content differs (sha1)"]
    path.write_text("a = 1\n")
    path.chmod(0o600)
    assert state.file_drift(spec) == [f"{path}: mode 0600, wanted 0644"]
    assert "owner" in state.file_drift(dict(spec, mode="0600", owner="nobody-at-all"))[0]
    path.unlink()
    assert state.file_drift(spec) == [f"{path}: missing"]
    # Attributes alone, of a directory for instance.
    (tmp_path / "d").mkdir(mode=0o700)
    assert state.file_drift({"path": str(tmp_path / "d"), "mode": "0755"}) == [
        f"{tmp_path / 'd'}: mode 0700, wanted 0755"]
    assert state.file_drift({"path": str(tmp_path / "none"), "mode": "0755"}) == [
        f"{tmp_path / 'none'}: missing"]


BLOCK = "10.0.0.11 node1\n10.0.0.12 node2\n"
MARKER = "# {mark} dsk-provision cluster nodes"


def _hosts(tmp_path: Path, inner: str) -> Path:
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost\n# BEGIN dsk-provision cluster nodes\n" + inner
                    + "# END dsk-provision cluster nodes\n::1 localhost\n")
    return path


def test_a_block_must_be_between_its_markers_exactly(tmp_path):
    path = _hosts(tmp_path, BLOCK)
    spec = {"path": str(path), "marker": MARKER, "block": BLOCK}
    assert state.block_drift(spec) == []
    _hosts(tmp_path, "10.0.0.11 node1\n")
    assert state.block_drift(spec) == [
        f"{path}: block '# BEGIN dsk-provision cluster nodes' differs"]
    path.write_text("127.0.0.1 localhost\n")
    assert "missing" in state.block_drift(spec)[0]
    # An empty block means the role removes it: markers left behind are drift.
    assert state.block_drift(dict(spec, block="")) == []
    _hosts(tmp_path, BLOCK)
    assert "wanted absent" in state.block_drift(dict(spec, block=""))[0]


def test_a_line_must_be_present_whole(tmp_path):
    path = tmp_path / "authorized_keys"
    path.write_text("ssh-ed25519 AAAA other\nssh-ed25519 BBBB dsk-demo\n")
    path.chmod(0o600)
    spec = {"path": str(path), "line": "ssh-ed25519 BBBB dsk-demo", "mode": "0600"}
    assert state.line_drift(spec) == []
    path.write_text("ssh-ed25519 AAAA other\nssh-ed25519 BBBB dsk-demo-old\n")
    assert state.line_drift(spec) == [f"{path}: line missing"]
    path.unlink()
    assert state.line_drift(spec) == [f"{path}: missing"]


DPKG_ROWS = ("jq 1.6-2.1 ii \nchrony 4.3-2 rc \nlibnccl2 2.28.3-1+cuda13.0 hi \n"
             "podman 4.3.1+ds1-8+deb12u1 ii \n")


def test_packages_must_be_installed_at_the_pinned_version_and_held():
    assert state.package_drift([{"name": "jq"}], DPKG_ROWS) == []
    assert state.package_drift([{"name": "chrony"}], DPKG_ROWS) == ["package chrony: not installed"]
    assert state.package_drift([{"name": "pciutils"}], DPKG_ROWS) == [
        "package pciutils: not installed"]
    held = {"name": "libnccl2", "version": "2.28.3-1+cuda13.0", "hold": True}
    assert state.package_drift([held], DPKG_ROWS) == []
    assert state.package_drift([dict(held, version="2.27.*")], DPKG_ROWS) == [
        "package libnccl2: version 2.28.3-1+cuda13.0, wanted 2.27.*"]
    assert state.package_drift([dict(held, version="2.28.3*")], DPKG_ROWS) == []
    # An upstream version matches its Debian revisions, as in the GPU roles' pins.
    assert state.package_drift([dict(held, version="2.28.3")], DPKG_ROWS) == []
    assert state.package_drift([dict(held, version="2.28")], DPKG_ROWS) == [
        "package libnccl2: version 2.28.3-1+cuda13.0, wanted 2.28"]
    assert state.package_drift([{"name": "podman", "hold": True}], DPKG_ROWS) == [
        "package podman: not held"]


def test_services_must_be_enabled_and_active_when_asked():
    answers = {("is-enabled", "good"): "enabled", ("is-active", "good"): "active",
               ("is-enabled", "off"): "disabled", ("is-active", "off"): "inactive"}

    def fake_run(argv, **_kw):
        answer = answers.get((argv[1], argv[2]), "")
        return subprocess.CompletedProcess(argv, 0, stdout=answer + "\n")

    specs = [{"name": "good", "enabled": True, "active": True},
             {"name": "off", "enabled": True, "active": True}]
    assert state.service_drift(specs, fake_run) == [
        "service off: disabled, wanted enabled", "service off: inactive, wanted active"]


def test_python_pins_are_read_from_metadata_and_a_missing_interpreter_is_drift(tmp_path):
    from importlib.metadata import version

    have = version("jsonschema").split("+")[0]
    pins = [f"jsonschema=={have}"]
    assert state.python_drift({"python": sys.executable, "pins": pins}) == []
    assert state.python_drift({"python": sys.executable, "pins": ["jsonschema==0.0.1"]}) == [
        f"python package jsonschema==0.0.1: have {have}"]
    assert state.python_drift({"python": sys.executable,
                               "pins": ["no-such-distribution==1.0"]}) == [
        "python package no-such-distribution==1.0: not installed"]
    missing = str(tmp_path / "venv" / "bin" / "python")
    assert state.python_drift({"python": missing, "pins": pins}) == [f"{missing}: missing"]


def test_kernel_modules_that_could_be_loaded_but_are_not_are_drift(tmp_path):
    (tmp_path / "ib_core").mkdir()
    loadable = {"ib_uverbs"}

    def fake_modprobe(argv, **_kw):
        return subprocess.CompletedProcess(argv, 0 if argv[-1] in loadable else 1)

    spec = {"names": ["ib_core", "ib_uverbs", "nvidia_peermem"], "modprobe": "/sbin/modprobe"}
    assert state.module_drift(spec, str(tmp_path), fake_modprobe) == [
        "kernel module ib_uverbs: available, not loaded"]
    # Without modprobe nothing can be loaded now: the modules wait for the next boot.
    assert state.module_drift(dict(spec, modprobe=""), str(tmp_path), fake_modprobe) == []


def _archive(tmp_path: Path) -> Path:
    archive = tmp_path / "trainer.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in {"trainer/__init__.py": b"", "trainer/train.py": b"print(1)\n",
                           "trainer/model/__init__.py": b"X = 1\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "root"
    dest.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(dest)
    return archive


def test_an_unpacked_tree_must_match_its_archive(tmp_path):
    archive = _archive(tmp_path)
    dest = tmp_path / "root"
    assert state.tree_drift(str(archive), str(dest)) == []
    # Bytecode caches are what running the code leaves: not drift.
    (dest / "trainer" / "__pycache__").mkdir()
    (dest / "trainer" / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"x")
    assert state.tree_drift(str(archive), str(dest)) == []

    (dest / "trainer" / "train.py").write_text("print(2)\n")
    (dest / "trainer" / "model" / "__init__.py").unlink()
    (dest / "trainer" / "stale.py").write_text("")
    drift = state.tree_drift(str(archive), str(dest))
    assert f"{dest}/trainer/train.py: content differs from {archive}" in drift
    assert f"{dest}/trainer/model/__init__.py: missing" in drift
    assert f"{dest}/trainer/stale.py: not in {archive}" in drift
    assert len(drift) == 3
    assert "cannot be read" in state.tree_drift(str(tmp_path / "none.tar"), str(dest))[0]


def test_probe_sorts_drift_by_kind_and_reports_absent_paths(tmp_path):
    present = tmp_path / "sources.list"
    present.write_text("deb http://deb.debian.org/debian bookworm main\n")
    by_kind = state.probe({"absent": [str(present), str(tmp_path / "gone")]})
    assert by_kind["absent"] == [f"{present}: present, wanted absent"]
    assert all(by_kind[kind] == [] for kind in by_kind if kind != "absent")


@pytest.mark.parametrize("kind", ["files", "blocks", "lines", "absent", "packages", "services",
                                  "python_packages", "kernel_modules", "archive_trees"])
def test_every_kind_is_an_option_and_documented(kind):
    assert f"\n  {kind}:\n" in state.DOCUMENTATION
    assert f'"{kind}"' in (REPO / "library" / "dsk_state.py").read_text()


def _run_module(tmp_path, args: dict) -> dict:
    import json

    path = tmp_path / "args.json"
    path.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    proc = subprocess.run([sys.executable, str(REPO / "library" / "dsk_state.py"), str(path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_the_module_says_when_to_converge_drift_or_force(tmp_path):
    """The roles' one gate: converge on drift, or when forced (check mode, dsk_force_converge);
    a declared resource may carry the converge task's source (src), which is not read."""
    wanted = tmp_path / "f"
    wanted.write_text("x")
    same = {"files": [{"path": str(wanted), "content": "x", "src": "/control/node/f"}]}
    differs = {"files": [{"path": str(wanted), "content": "y"}]}
    assert _run_module(tmp_path, same)["converge"] is False
    assert _run_module(tmp_path, {**same, "force": True})["converge"] is True
    result = _run_module(tmp_path, differs)
    assert result["converge"] is True and result["changed"] is False
    assert result["drift"] == [f"{wanted}: content differs"]
