"""Package trust: the mirror's signing key and signatures, pinned key fingerprints
(library/dsk_apt_key.py and the roles that use it), the pinned sha256 of the CUDA keyring
package, and wheels installed with --require-hashes."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import BIN, REPO, ROLES, node_module

from dsk_provision import mirror, mirror_serve, mirror_sign
from dsk_provision.errors import InputError


@pytest.fixture(scope="module")
def apt_key():
    """library/dsk_apt_key.py, imported when a test needs it (importing Ansible's module
    code at collection would patch sys.intern before torch is imported elsewhere)."""
    return node_module(REPO / "library/dsk_apt_key.py")


def _gpg(home: Path, *args: str) -> bytes:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--quiet", "--yes",
                           "--pinentry-mode", "loopback", "--passphrase", "", *args],
                          check=True, capture_output=True, timeout=120).stdout


@pytest.fixture(scope="module")
def gpg_keys():
    """Two throw-away keys (ed25519 and RSA) in a short GnuPG home: fingerprint -> armored
    and fingerprint -> binary."""
    short = Path("/tmp") / f"dsk-test-gpg-{os.getpid()}"
    shutil.rmtree(short, ignore_errors=True)
    short.mkdir(mode=0o700)
    try:
        _gpg(short, "--quick-gen-key", "test one <one@invalid>", "ed25519", "sign", "never")
        _gpg(short, "--quick-gen-key", "test two <two@invalid>", "rsa2048", "sign", "never")
        colons = _gpg(short, "--with-colons", "--list-keys").decode().splitlines()
        fprs = [line.split(":")[9] for i, line in enumerate(colons)
                if line.startswith("fpr:") and colons[i - 1].startswith("pub:")]
        keys = {f: _gpg(short, "--armor", "--export", f) for f in fprs}
        binary = {f: _gpg(short, "--export", f) for f in fprs}
    finally:
        subprocess.run(["gpgconf", "--homedir", str(short), "--kill", "gpg-agent"],
                       capture_output=True, check=False)
        shutil.rmtree(short, ignore_errors=True)
    assert len(keys) == 2
    return keys, binary


@pytest.fixture
def http_dir(tmp_path):
    """A directory served on loopback: (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------
# The mirror's signing key and its signatures.

def test_signing_key_is_private_made_once_and_not_the_users(tmp_path, monkeypatch):
    users = tmp_path / "users-gnupg"
    users.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(users))
    home = tmp_path / ("long-" * 12) / mirror_sign.SIGNING_DIR  # longer than a socket path
    key = mirror_sign.ensure_key(home, label="test")
    assert len(key.fingerprint) == 40
    assert mirror_sign.ensure_key(home, label="test") == key  # kept, not made again
    assert home.stat().st_mode & 0o777 == 0o700
    secrets = list((home / "private-keys-v1.d").iterdir())
    assert secrets and all(p.stat().st_mode & 0o777 == 0o600 for p in secrets)
    assert list(users.iterdir()) == []  # the user's keyring is never touched
    assert b"PUBLIC KEY BLOCK" in key.public_key() and b"PRIVATE" not in key.public_key()


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "Packages").write_text("Package: jq\nVersion: 1.6\n")
    (repo / "Release").write_text("Origin: dsk-provision\nSuite: mirror\nSHA256:\n")
    return repo


def test_release_signed_as_apt_checks_it_and_tampering_shows(tmp_path, apt_key):
    key = mirror_sign.ensure_key(tmp_path / "k", label="test")
    repo = _repo(tmp_path)
    assert not key.signed(repo)
    key.sign_repo(repo)
    assert key.signed(repo)
    public = repo / mirror_sign.public_key_name()
    _binary, found = apt_key.primary_fingerprints(public.read_bytes())
    assert found == [key.fingerprint]
    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(apt_key.dearmor(public.read_bytes()))
    gpgv = ["gpgv", "--keyring", str(keyring)]
    assert subprocess.run([*gpgv, str(repo / "InRelease")], capture_output=True).returncode == 0
    (repo / "Release").write_text("Origin: someone else\nSHA256:\n")
    assert not key.signed(repo)
    assert subprocess.run([*gpgv, str(repo / "Release.gpg"), str(repo / "Release")],
                          capture_output=True).returncode != 0
    tampered = (repo / "InRelease").read_text().replace("Suite: mirror", "Suite: evil")
    (repo / "InRelease").write_text(tampered)
    assert subprocess.run([*gpgv, str(repo / "InRelease")], capture_output=True).returncode != 0


def test_sandbox_mirror_cached_unsigned_gets_signed(tmp_path):
    """A mirror cached before signing existed is signed in place, not downloaded again."""
    status = tmp_path / "status"
    status.write_text("")
    cache = tmp_path / "cache"
    final = cache / f"mirror-{mirror.mirror_key(['jq'], status)}"
    final.mkdir(parents=True)
    (final / "Packages").write_text("")
    (final / "Release").write_text("Origin: dsk-provision\nSHA256:\n")
    path, fingerprint = mirror.build_apt_mirror(["jq"], status, cache)
    assert path == final and (final / "InRelease").is_file()
    key = mirror_sign.ensure_key(cache / mirror_sign.SIGNING_DIR, label="sandbox")
    assert key.fingerprint == fingerprint and key.signed(final)
    assert not (final / mirror_sign.SIGNING_DIR).exists()  # the secret is not served


def test_build_refuses_a_signing_home_inside_the_served_tree(tmp_path, monkeypatch):
    monkeypatch.setattr(mirror, "require_tools", lambda tools: None)
    plan = mirror.MirrorPlan(oses=["debian-12"], apt={"debian-12": [mirror.PackageRequest("jq")]},
                             pip=[])
    sources = tmp_path / "s.list"
    sources.write_text("deb [signed-by=/k.gpg] http://127.0.0.1:9/ ./\n")
    out = tmp_path / "m"
    with pytest.raises(InputError, match="inside the mirror"):
        mirror.build_mirror(plan, out, signing_home=out / ".key",
                            apt_sources={"debian-12": sources}, wheels=False)
    assert not (out / ".key").exists()


def test_manifest_fingerprint_is_what_serve_tells_the_inventory(tmp_path):
    out = tmp_path / "m"
    (out / "apt/debian-12").mkdir(parents=True)
    (out / mirror.REQUIREMENTS).write_text("a==1 --hash=sha256:" + "0" * 64 + "\n")
    plan = mirror.MirrorPlan(oses=["debian-12"], apt={}, pip=[])
    manifest = mirror.write_manifest(
        out, plan, {"debian-12": {"path": "apt/debian-12/"}}, {"path": "wheels/"},
        signing_key={"fingerprint": "AB" * 20, "public_key": ["apt/debian-12/signing-key.asc"]})
    settings = dict(s[:2] for s in mirror_serve.inventory_settings(manifest, "http://h/", out))
    assert settings["dsk_mirror_key_fingerprint"] == "AB" * 20
    assert settings["trainer_env_pip_requirements_file"] == str(out / mirror.REQUIREMENTS)


# ---------------------------------------------------------------------------------------
# Pinned fingerprints: library/dsk_apt_key.py.

def test_fingerprints_computed_as_gpg_computes_them(gpg_keys, apt_key):
    armored, binary = gpg_keys
    for fpr in armored:
        assert apt_key.primary_fingerprints(armored[fpr])[1] == [fpr]
        assert apt_key.primary_fingerprints(binary[fpr]) == (binary[fpr], [fpr])
        assert apt_key.dearmor(armored[fpr]) == binary[fpr]
    both = b"".join(armored.values())
    assert sorted(apt_key.primary_fingerprints(both)[1]) == sorted(armored)


def test_a_key_is_judged_by_every_primary_key_in_it(gpg_keys, apt_key):
    armored, _ = gpg_keys
    one, two = list(armored)
    assert apt_key.judge([one], [one]) is None
    assert "not pinned" in apt_key.judge([two], [one])
    assert "not pinned" in apt_key.judge([one, two], [one])  # a second key rides along
    assert apt_key.normalize(" eb69 3b30 ") == "EB693B30"
    for junk in (b"", b"hello", b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n!!!\n"
                 b"-----END PGP PUBLIC KEY BLOCK-----\n", b"\x99\x00\x05abc"):
        with pytest.raises(apt_key.BadKey):
            apt_key.primary_fingerprints(junk)


def _play(tmp_path: Path, tasks: list, hosts: dict[str, dict], *, check: bool = False,
          extra: dict | None = None) -> subprocess.CompletedProcess:
    """One ansible-playbook run of `tasks` on local-connection hosts, each with its own
    variables; the hosts run side by side."""
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{"name": "Package trust", "hosts": "all",
                                     "gather_facts": True, "tasks": tasks}]))
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": {
        name: {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
               **host_vars} for name, host_vars in hosts.items()}}}))
    (tmp_path / "extra.yml").write_text(yaml.safe_dump(extra or {}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_ROLES_PATH=str(ROLES), ANSIBLE_LIBRARY=str(REPO / "library"),
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "lt"), ANSIBLE_REMOTE_TEMP=str(tmp_path / "rt"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_CALLBACK_RESULT_FORMAT="json")
    return subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(play),
                           "-e", f"@{tmp_path / 'extra.yml'}"] + (["--check"] if check else []),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _failures(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """host -> the message of its failed task (hosts that did not fail are absent)."""
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("fatal: [") and "=> " in line:
            host = line[len("fatal: ["):line.index("]")]
            body = proc.stdout[proc.stdout.index(line) + line.index("=> ") + 3:]
            out[host] = json.JSONDecoder().raw_decode(body)[0].get("msg", "")
    return out


def test_module_installs_only_a_key_with_the_pinned_fingerprint(tmp_path, gpg_keys, http_dir):
    armored, binary = gpg_keys
    one, two = list(armored)
    root, url = http_dir
    (root / "key.asc").write_bytes(armored[one])
    (root / "both.asc").write_bytes(armored[one] + armored[two])
    dest = tmp_path / "keyrings/test.gpg"
    key = {"src": url + "key.asc", "dest": str(dest)}
    cases = [
        ("refused", {**key, "fingerprints": [two]}, False),
        ("smuggled", {"src": url + "both.asc", "dest": str(dest), "fingerprints": [one]}, False),
        ("unpinned", {**key, "fingerprints": [""]}, False),
        ("checked", {**key, "fingerprints": [one]}, True),
        ("first", {**key, "fingerprints": [one.lower()]}, False),
        ("again", {**key, "fingerprints": [one]}, False),
        ("verify_ok", {"src": str(dest), "fingerprints": [one]}, False),  # a package's keyring
        ("verify_bad", {"src": str(dest), "fingerprints": [two]}, False),
    ]
    tasks = [{"name": name, "dsk_apt_key": args, "register": name, "ignore_errors": True,
              "check_mode": check} for name, args, check in cases]
    tasks.append({"name": "Results", "ansible.builtin.copy": {
        "dest": str(tmp_path / "results.json"), "mode": "0600",
        "content": "{{ {" + ", ".join(f"'{n}': {n}" for n, _, _ in cases) + "} | to_json }}"}})
    proc = _play(tmp_path, tasks, {"localhost": {}})
    assert proc.returncode == 0, proc.stdout[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["refused"]["failed"] and "not pinned" in r["refused"]["msg"]
    assert r["smuggled"]["failed"] and two in r["smuggled"]["msg"]  # a second key rode along
    assert r["unpinned"]["failed"] and "no fingerprint" in r["unpinned"]["msg"]
    assert r["checked"]["changed"] and not r["checked"].get("failed")  # check mode: no write
    assert r["first"]["changed"] and r["first"]["found"] == [one]
    assert dest.read_bytes() == binary[one]  # the bytes that were checked, dearmored
    assert dest.stat().st_mode & 0o777 == 0o644
    assert not r["again"]["changed"] and not r["again"].get("failed")
    assert not r["verify_ok"].get("failed") and not r["verify_ok"]["changed"]
    assert r["verify_bad"]["failed"]


# ---------------------------------------------------------------------------------------
# The roles: common (the mirror's key), cuda (keyring package and key), keyed repositories.

def _role_values(node_vars: dict, os_id: str = "debian-12") -> mirror.RoleValues:
    target = mirror.target_os(os_id)
    return mirror.RoleValues(mirror.read_role_vars(ROLES, target), node_vars,
                             mirror.mirror_facts(target, 0))


def test_common_writes_signed_by_from_the_pinned_fingerprint():
    fpr = "AB" * 20
    values = _role_values({"dsk_mirror_url": "http://10.0.0.5:8080/apt/debian-12",
                           "dsk_mirror_key_fingerprint": fpr})
    content = values.get("common_mirror_list_content")
    keyring = "/etc/apt/keyrings/dsk-mirror.gpg"
    assert f"deb [signed-by={keyring}] http://10.0.0.5:8080/apt/debian-12 ./" in content
    assert "trusted=yes" not in content and fpr in content  # a new key is drift
    assert values.get("common_mirror_key_src") == \
        "http://10.0.0.5:8080/apt/debian-12/signing-key.asc"
    unsigned = _role_values({"dsk_mirror_url": "http://10.0.0.5:8080/",
                             "common_apt_mirror_trusted": True})
    assert "deb [trusted=yes] http://10.0.0.5:8080/ ./" in \
        unsigned.get("common_mirror_list_content")


def test_roles_trust_a_key_only_by_its_pinned_fingerprint(tmp_path, gpg_keys, http_dir):
    """In check mode on this machine (nothing is written): the common role's mirror key,
    the cuda role's keyring package and keyed repositories (the container toolkit)."""
    armored, _ = gpg_keys
    one, two = list(armored)
    root, url = http_dir
    (root / "signing-key.asc").write_bytes(armored[one])
    (root / "gpgkey").write_bytes(armored[one])
    mirror_vars = {"dsk_mirror_url": url, "common_manage_etc_hosts": False}
    keyed = {"name": "dsk-test-keyed", "url": url + "repo/", "key_url": url + "gpgkey",
             "suite": "/"}
    hosts = {
        "mirror_unsigned": {"part": "common", **mirror_vars},
        "mirror_other_key": {"part": "common", **mirror_vars, "dsk_mirror_key_fingerprint": two},
        "mirror_pinned": {"part": "common", **mirror_vars, "dsk_mirror_key_fingerprint": one},
        "cuda_no_sha256": {"part": "repo_cuda.yml", "cuda_repo_url": "http://127.0.0.1:9/r/",
                           "cuda_repo_keyring_sha256": {}},
        "keyed_unpinned": {"part": "repo_keyed.yml",
                           "cuda_pkgs_keyed_repo": {**keyed, "fingerprints": []}},
        "keyed_other_key": {"part": "repo_keyed.yml",
                            "cuda_pkgs_keyed_repo": {**keyed, "fingerprints": [two]}},
        "keyed_pinned": {"part": "repo_keyed.yml",
                         "cuda_pkgs_keyed_repo": {**keyed, "fingerprints": [one]}},
    }
    tasks = [{"name": f"Include {part}", "ansible.builtin.include_role": (
        {"name": "common"} if part == "common" else {"name": "cuda", "tasks_from": part}),
        "when": f"part == '{part}'"} for part in ("common", "repo_cuda.yml", "repo_keyed.yml")]
    play = tmp_path / "check"
    play.mkdir()
    proc = _play(play, tasks, hosts, check=True)
    failed = _failures(proc)
    assert set(failed) == {"mirror_unsigned", "mirror_other_key", "cuda_no_sha256",
                           "keyed_unpinned", "keyed_other_key"}, proc.stdout[-4000:]
    assert "dsk_mirror_key_fingerprint" in failed["mirror_unsigned"]
    assert "not pinned" in failed["mirror_other_key"]
    assert "No sha256 of cuda-keyring" in failed["cuda_no_sha256"]
    assert "No fingerprint is pinned" in failed["keyed_unpinned"]
    assert "not pinned" in failed["keyed_other_key"]


def test_gpu_repository_pins_have_one_home():
    cuda = yaml.safe_load((ROLES / "cuda/defaults/main.yml").read_text())
    assert cuda["cuda_repo_keyring_sha256"] and all(
        len(v) == 64 and int(v, 16) >= 0 for v in cuda["cuda_repo_keyring_sha256"].values())
    assert cuda["cuda_repo_key_fingerprints"] == ["EB693B3035CD5710E231E123A4B469963BF863CC"]
    task = (ROLES / "cuda/tasks/repo_cuda.yml").read_text()
    assert 'checksum: "sha256:{{ cuda_repo_keyring_sha256[cuda_repo_dir]' in task
    containers = yaml.safe_load((ROLES / "containers/defaults/main.yml").read_text())
    assert containers["containers_toolkit_key_fingerprints"] == [
        "C95B321B61E88C1809C4F759DDCAE044F796ECB0"]

# ---------------------------------------------------------------------------------------
# Wheels pinned by sha256.

def _wheel(directory: Path, name: str, version: str, tag: str = "py3-none-any",
           requires: str = "") -> Path:
    path = directory / f"{name}-{version}-{tag}.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\n"
                                       f"Version: {version}\n"
                                       + (f"Requires-Dist: {requires}\n" if requires else ""))
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\n"
                                    f"Tag: {tag}\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_wheel_tags_decide_which_pythons_install_it():
    pythons = ["3.10", "3.11", "3.12"]
    assert mirror.wheel_pythons("a-1-py3-none-any.whl", pythons) == pythons
    assert mirror.wheel_pythons("a-1-py2.py3-none-any.whl", pythons) == pythons
    assert mirror.wheel_pythons("a-1-cp311-cp311-manylinux_2_28_x86_64.whl", pythons) == ["3.11"]
    assert mirror.wheel_pythons("a-1-cp311-abi3-manylinux_2_28_x86_64.whl", pythons) == \
        ["3.11", "3.12"]
    assert mirror.wheel_pythons("a-1+cpu-cp312-cp312-linux_x86_64.whl", pythons) == ["3.12"]


def test_requirements_pin_every_wheel_and_pip_refuses_other_bytes(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "dskapp", "1.0", requires="dskdep==2.0")
    _wheel(wheels, "dskdep", "2.0")
    _wheel(wheels, "dskonly", "3.0", tag="cp30-cp30-any")  # a Python no target runs
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    info = {"python_versions": [python, "3.99"],
            "files": [mirror._wheel_entry(p) for p in sorted(wheels.glob("*.whl"))]}
    text = mirror.hashed_requirements(info)
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(lines) == 2 and all("--hash=sha256:" in line for line in lines)
    assert lines[0].startswith("dskapp==1.0 ") and lines[1].startswith("dskdep==2.0 ")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text(text)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install",
           "--disable-pip-version-check", "--no-index", "--find-links", str(wheels),
           "--require-hashes", "-r", str(reqs)]
    ok = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    # The mirror now serves other bytes under the same name: refused.
    subprocess.run([*pip[:5], "uninstall", "-y", "dskapp", "dskdep"], check=True,
                   capture_output=True)
    _wheel(wheels, "dskdep", "2.0", requires="dskevil")
    bad = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "HASH" in bad.stderr.upper(), bad.stderr


def test_trainer_env_installs_with_require_hashes_and_checks_the_pins(tmp_path):
    from ansible.plugins.loader import init_plugin_loader

    init_plugin_loader()  # the role reads the file with a lookup
    reqs = tmp_path / "requirements-hashes.txt"
    h = "--hash=sha256:" + "0" * 64
    reqs.write_text(f"torch==2.13.0+cpu ; python_version == \"3.11\" {h}\nnumpy==2.4.6 {h}\n")
    values = _role_values({"trainer_env_pip_requirements_file": str(reqs),
                           "trainer_env_pip_packages": ["torch==2.13.0", "numpy==2.4.6",
                                                        "jsonschema==4.26.0"]})
    assert values.get("trainer_env_pip_extra_args").split()[0] == "--require-hashes"
    assert values.get("trainer_env_pins_unhashed") == ["jsonschema==4.26.0"]
    plain = _role_values({})
    assert "--require-hashes" not in plain.get("trainer_env_pip_extra_args")
    task = yaml.safe_load((ROLES / "trainer_env/tasks/venv.yml").read_text())
    install = next(t for t in task if t["name"] == "Install the pinned Python packages")
    assert "trainer_env_pip_requirements_node" in install["ansible.builtin.pip"]["requirements"]
