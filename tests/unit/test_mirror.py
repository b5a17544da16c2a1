"""Mirror planning from role files, manifests, wheels, sources and the HTTP server."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dsk_provision import mirror, mirror_serve
from dsk_provision.errors import EnvironmentProblem, InputError
from dsk_provision.inventory import Node, load_inventory

REPO = Path(__file__).resolve().parents[2]


def _role(root: Path, name: str, defaults: dict, os_vars: dict | None = None,
          role_vars: dict | None = None) -> None:
    (root / name / "defaults").mkdir(parents=True)
    (root / name / "defaults/main.yml").write_text(yaml.safe_dump(defaults))
    if os_vars is not None or role_vars is not None:
        (root / name / "vars").mkdir()
    if os_vars is not None:
        (root / name / "vars/Debian-12.yml").write_text(yaml.safe_dump(os_vars))
    if role_vars is not None:
        (root / name / "vars/main.yml").write_text(yaml.safe_dump(role_vars))


@pytest.fixture
def roles(tmp_path) -> Path:
    """Roles shaped like the real ones: knobs in defaults, the package list a role installs
    (`<role>_apt_packages`, empty where it installs none) computed in vars/main.yml."""
    root = tmp_path / "roles"
    _role(root, "common", {"common_packages": ["jq", "pciutils"], "common_extra_packages": []},
          role_vars={"common_apt_packages": "{{ common_packages + common_extra_packages }}"})
    _role(root, "rdma", {"rdma_enabled": True, "rdma_stack": "distro",
                         "rdma_distro_packages": ["rdma-core", "perftest"],
                         "rdma_package_versions": {"rdma-core": "44.0-2"}},
          role_vars={
              "rdma_stack_packages": (
                  "{%- set out = [] -%}{%- for n in rdma_distro_packages -%}"
                  "{%- set _ = out.append({'name': n, 'version': rdma_package_versions.get(n, '')})"
                  " -%}{%- endfor -%}{{ out | to_json }}"),
              "rdma_apt_packages": "{{ (rdma_stack_packages | from_json) if rdma_enabled "
                                   "and rdma_stack == 'distro' else [] }}"})
    _role(root, "cuda", {"cuda_enabled": True, "cuda_force": False, "cuda_version": "13.0",
                         "cuda_packages": ["cuda-toolkit-{{ cuda_version | replace('.', '-') }}"]},
          role_vars={"cuda_apt_packages": "{{ cuda_packages if cuda_enabled and "
                                          "(cuda_hw_gpu_count | int > 0 or cuda_force) else [] }}",
                     "cuda_apt_origin": "NVIDIA CUDA repository (cuda_repo_url)"})
    _role(root, "extras", {"extras_tool_apt_packages": ["tree"]})
    _role(root, "trainer_env", {
        "trainer_env_system_packages": ["python3-venv"],
        "trainer_env_torch_version": "2.13.0",
        "trainer_env_pip_packages": ["torch=={{ trainer_env_torch_version }}", "numpy==2.4.6"]},
        role_vars={"trainer_env_apt_packages": "{{ trainer_env_system_packages }}"})
    return root


def _inventory(*nodes: tuple[int, dict]) -> SimpleNamespace:
    return SimpleNamespace(path=Path("hosts.yml"), vars={}, nodes=[
        Node(f"node{i}", f"10.0.0.{i}", 22, "root", gpus, dict(v))
        for i, (gpus, v) in enumerate(nodes, 1)])


def _specs(plan: mirror.MirrorPlan, os_id: str = "debian-12") -> list[str]:
    return [r.spec for r in plan.apt[os_id]]


def test_plan_reads_role_package_lists(roles):
    plan = mirror.plan_mirror(_inventory((0, {})), ["debian-12"], roles_dir=roles)
    assert _specs(plan) == ["jq", "pciutils", "perftest", "python3-venv", "rdma-core=44.0-2",
                            "tree"]
    by_spec = {r.spec: r for r in plan.apt["debian-12"]}
    assert by_spec["jq"].sources == ["common:common_apt_packages"]
    assert by_spec["tree"].sources == ["extras:extras_tool_apt_packages"]  # naming convention
    assert by_spec["jq"].origin == "distribution"
    assert plan.pip == ["torch==2.13.0", "numpy==2.4.6"]


def test_gpu_nodes_add_the_gpu_stack_rendered(roles):
    plan = mirror.plan_mirror(_inventory((0, {}), (8, {})), ["debian-12"], roles_dir=roles)
    cuda = [r for r in plan.apt["debian-12"] if r.name.startswith("cuda")]
    assert [r.spec for r in cuda] == ["cuda-toolkit-13-0"]
    assert "NVIDIA CUDA repository" in cuda[0].origin
    no_gpu = mirror.plan_mirror(_inventory((8, {})), ["debian-12"], roles_dir=roles,
                                gpu_stack=False)
    assert not [s for s in _specs(no_gpu) if s.startswith("cuda")]


def test_inventory_overrides_defaults_and_role_vars_override_inventory(roles):
    (roles / "common/vars").mkdir(exist_ok=True)
    (roles / "common/vars/Debian-12.yml").write_text("common_packages: [jq, chrony]\n")
    inv = _inventory((0, {"common_extra_packages": ["htop"], "common_packages": ["ignored"],
                          "rdma_stack": "doca-ofed", "trainer_env_torch_version": "2.12.1"}))
    plan = mirror.plan_mirror(inv, ["debian-12"], roles_dir=roles)
    specs = _specs(plan)
    assert {"jq", "chrony", "htop"} <= set(specs)
    assert "ignored" not in specs and "pciutils" not in specs
    assert not [s for s in specs if s.startswith(("rdma-core", "perftest"))]
    assert plan.pip[0] == "torch==2.12.1"


def test_fact_dependent_values_become_notes(roles):
    _role(roles, "headers", {"headers_apt_packages": ["linux-headers-{{ ansible_kernel }}"]})
    plan = mirror.plan_mirror(_inventory((0, {})), ["debian-12"], roles_dir=roles)
    assert not [s for s in _specs(plan) if s.startswith("linux-headers")]
    assert any("headers_apt_packages" in n and "ansible_kernel" in n for n in plan.notes)


def test_bad_package_names_name_the_variable(roles):
    inv = _inventory((0, {"common_extra_packages": ["jq; rm -rf /"]}))
    with pytest.raises(InputError, match="common_apt_packages"):
        mirror.plan_mirror(inv, ["debian-12"], roles_dir=roles)
    with pytest.raises(InputError, match="--package"):
        mirror.plan_mirror(_inventory((0, {})), ["debian-12"], roles_dir=roles,
                           extra_packages=["Bad Name"])
    with pytest.raises(InputError, match="--os"):
        mirror.plan_mirror(_inventory((0, {})), ["centos-7"], roles_dir=roles)


def test_repository_roles_have_no_unreadable_package_lists():
    """Every `*_packages` variable of the real roles is read by a rule or the convention."""
    inv = load_inventory(REPO / "inventory/example")
    plan = mirror.plan_mirror(inv, ["debian-12", "ubuntu-22.04", "ubuntu-24.04"])
    assert not [n for n in plan.notes if "not a list of package names" in n]
    for os_id in plan.oses:
        assert {"jq", "python3-venv"} <= set(_specs(plan, os_id))
    assert any(p.startswith("torch==") for p in plan.pip)


def test_manifest_hashes_every_file_and_skips_hidden(tmp_path):
    out = tmp_path / "m"
    (out / "apt/debian-12").mkdir(parents=True)
    (out / "apt/debian-12/jq_1.6_amd64.deb").write_bytes(b"deb")
    (out / "wheels").mkdir()
    (out / "wheels/a-1.0-py3-none-any.whl").write_bytes(b"whl")
    (out / ".build.lock").write_text("")
    plan = mirror.MirrorPlan(oses=["debian-12"], apt={}, pip=[], inventory="hosts.yml")
    m = mirror.write_manifest(out, plan, {"debian-12": {"path": "apt/debian-12/"}}, None,
                              created="2026-01-01T00:00:00Z")
    import hashlib
    assert m["files"] == {"apt/debian-12/jq_1.6_amd64.deb": hashlib.sha256(b"deb").hexdigest(),
                          "wheels/a-1.0-py3-none-any.whl": hashlib.sha256(b"whl").hexdigest()}
    assert mirror.read_manifest(out)["created"] == "2026-01-01T00:00:00Z"
    (out / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(InputError, match="format 99"):
        mirror.read_manifest(out)


def test_interrupted_build_never_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": 1}))  # an earlier build
    monkeypatch.setattr(mirror, "require_tools", lambda tools: None)

    def broken(*args, **kwargs):
        raise EnvironmentProblem("network went away")

    monkeypatch.setattr(mirror, "_build_flat_repo", broken)
    plan = mirror.MirrorPlan(oses=["debian-12"], apt={"debian-12": [mirror.PackageRequest("jq")]},
                             pip=[])
    sources = tmp_path / "s.list"
    sources.write_text("deb [trusted=yes] http://127.0.0.1:9/ ./\n")
    with pytest.raises(EnvironmentProblem):
        mirror.build_mirror(plan, out, signing_home=tmp_path / "key", apt_sources={
            "debian-12": sources}, wheels=False)
    assert not (out / "manifest.json").exists()
    with pytest.raises(InputError, match="not a finished mirror"):
        mirror.read_manifest(out)


def test_packages_index_parsed():
    text = ("Package: jq\nVersion: 1.6-2.1+deb12u3\nArchitecture: amd64\n"
            "Filename: ./jq_1.6-2.1+deb12u3_amd64.deb\nSize: 64400\nDescription: x\n more\n\n"
            "Package: libjq1\nVersion: 1.6\nArchitecture: amd64\nFilename: ./libjq1.deb\n"
            "Size: 10\n")
    assert mirror.parse_packages_index(text) == [
        {"name": "jq", "version": "1.6-2.1+deb12u3", "architecture": "amd64",
         "file": "jq_1.6-2.1+deb12u3_amd64.deb", "size": 64400},
        {"name": "libjq1", "version": "1.6", "architecture": "amd64", "file": "libjq1.deb",
         "size": 10}]


def test_apt_sources_checked(tmp_path, monkeypatch):
    good = tmp_path / "ubuntu.list"
    good.write_text("# Ubuntu 22.04\ndeb [signed-by=/k.gpg] http://archive.ubuntu.com/ubuntu "
                    "jammy main\n")
    assert mirror.read_apt_sources(good) == [
        "deb [signed-by=/k.gpg] http://archive.ubuntu.com/ubuntu jammy main"]
    bad = tmp_path / "bad.list"
    bad.write_text("deb http://x/ jammy main\nType: deb\n")
    with pytest.raises(InputError, match=r"bad.list: line 2"):
        mirror.read_apt_sources(bad)
    monkeypatch.setattr(mirror, "host_os_id", lambda: "debian-12")
    with pytest.raises(InputError, match="ubuntu-22.04=FILE"):
        mirror.sources_for(mirror.TARGETS["ubuntu-22.04"], {})
    opts = mirror.parse_apt_sources_options([f"ubuntu-22.04={good}"],
                                            ["debian-12", "ubuntu-22.04"])
    assert mirror.sources_for(mirror.TARGETS["ubuntu-22.04"], opts)[0].endswith("jammy main")
    with pytest.raises(InputError, match="OS=FILE"):
        mirror.parse_apt_sources_options([str(good)], ["debian-12", "ubuntu-22.04"])


def test_wheel_platforms_follow_glibc():
    tags = mirror.wheel_platforms(mirror.TARGETS["ubuntu-22.04"], "x86_64")
    assert tags[0] == "manylinux_2_35_x86_64" and "manylinux2014_x86_64" in tags
    assert "manylinux_2_36_x86_64" not in tags


def _fake_wheel(directory: Path, name: str, version: str) -> Path:
    path = directory / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\n"
                                       f"Version: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_wheels_downloaded_binary_only_for_each_python(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    _fake_wheel(index, "dskfake", "1.0")
    _fake_wheel(index, "dskfake", "2.0")
    (index / "dsksrc-1.0.tar.gz").write_bytes(b"")  # an sdist: never taken
    dest = tmp_path / "wheels"
    mirror.download_wheels(["dskfake==1.0"], dest, [mirror.TARGETS["debian-12"],
                                                    mirror.TARGETS["ubuntu-24.04"]],
                           pip_args=["--no-index", "--find-links", str(index)])
    assert [p.name for p in dest.iterdir()] == ["dskfake-1.0-py3-none-any.whl"]
    with pytest.raises(InputError, match="no wheel"):
        mirror.download_wheels(["dsksrc==1.0"], dest, [mirror.TARGETS["debian-12"]],
                               pip_args=["--no-index", "--find-links", str(index)])


def _finished_mirror(tmp_path: Path) -> Path:
    out = tmp_path / "m"
    (out / "apt/debian-12").mkdir(parents=True)
    (out / "apt/debian-12/Packages").write_text("Package: jq\n")
    (out / ".new-wheels").mkdir()
    (out / ".new-wheels/x").write_text("partial")
    plan = mirror.MirrorPlan(oses=["debian-12"], apt={}, pip=[])
    mirror.write_manifest(out, plan, {"debian-12": {"path": "apt/debian-12/"}},
                          {"path": "wheels/"})
    return out


def test_serve_files_but_not_hidden_paths(tmp_path):
    out = _finished_mirror(tmp_path)
    server = mirror_serve.make_server(out, "127.0.0.1", 0, quiet=True)
    mirror_serve.serve_in_thread(server)
    try:
        url = mirror_serve.base_url("127.0.0.1", server.server_address[1])
        with urllib.request.urlopen(url + "apt/debian-12/Packages", timeout=5) as r:
            assert r.read() == b"Package: jq\n"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + ".new-wheels/x", timeout=5)
        assert err.value.code == 404
        settings = mirror_serve.inventory_settings(mirror.read_manifest(out), url)
        assert ("dsk_mirror_url", url + "apt/debian-12/") == settings[0][:2]
        assert settings[1][:2] == ("trainer_env_pip_find_links", url + "wheels/")
        names = [name for name, _value, _why in settings]
        assert "trainer_env_pip_trusted_host" not in names  # loopback needs no trust
        assert ("trainer_env_pip_no_index", "true") in [s[:2] for s in settings]
        remote = mirror_serve.inventory_settings(mirror.read_manifest(out), "http://10.0.0.5:8080/")
        assert ("trainer_env_pip_trusted_host", "10.0.0.5") in [s[:2] for s in remote]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path", [
    "/%2ebuild.lock", "/%2Ebuild.lock", "/.build.lock", "/apt/%2e%2e/.build.lock",
    "/apt/debian-12/%2e%2e/%2e%2e/.build.lock", "/%2enew-wheels/x", "/apt/..%2f.build.lock",
    "/apt/debian-12/..%2F..%2F.new-wheels/x", "/%2e%2e/", "/apt/%2e%2e/apt/debian-12/Packages",
])
def test_serve_refuses_hidden_paths_however_spelled(tmp_path, path):
    import http.client

    out = _finished_mirror(tmp_path)
    (out / ".build.lock").write_text("lock")
    server = mirror_serve.make_server(out, "127.0.0.1", 0, quiet=True)
    mirror_serve.serve_in_thread(server)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        conn.request("GET", "/apt/debian-12/./Packages")  # apt's flat-repository form
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"Package: jq\n")
        conn.request("GET", path)  # sent as written: http.client does not normalize
        response = conn.getresponse()
        response.read()
        assert response.status == 404
        conn.close()
    finally:
        server.shutdown()
        server.server_close()


def test_serve_refuses_unfinished_mirror_and_bad_bind(tmp_path):
    with pytest.raises(InputError, match="not a finished mirror"):
        mirror_serve.make_server(tmp_path, "127.0.0.1", 0)
    assert mirror_serve.check_bind(None) == "127.0.0.1"
    assert mirror_serve.check_bind(None, inventory_first_address="127.0.0.5") == "127.0.0.1"
    assert mirror_serve.check_bind("0.0.0.0") == "0.0.0.0"
    with pytest.raises(InputError, match="--bind"):
        mirror_serve.check_bind("example.org")


def test_cli_mirror_commands_fail_cleanly(tmp_path):
    exe = [sys.executable, "-m", "dsk_provision"]
    proc = subprocess.run([*exe, "mirror", "serve", "--dir", str(tmp_path), "--port", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a finished mirror" in proc.stderr
    proc = subprocess.run([*exe, "mirror", "build", "-i", str(REPO / "inventory/example"),
                           "--os", "centos-7", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--os" in proc.stderr and "centos-7" in proc.stderr
    assert not (tmp_path / "o").exists()
