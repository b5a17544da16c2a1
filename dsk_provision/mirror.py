"""Offline package mirror for air-gapped clusters: apt repositories and Python wheels.

Two entry points share one mechanism:

- ``build_apt_mirror`` (the sandbox): a flat repository holding exactly what a node image
  lacks, cached by a hash of the inputs.
- ``plan_mirror`` + ``build_mirror`` (``dsk-provision mirror build``): every apt package the
  inventory's roles install, with its dependencies, per target OS, plus the trainer
  environment's wheels, and ``manifest.json`` (written last: an interrupted build never
  looks complete).

Resolution uses the control node's apt-get with a private state directory (sources,
lists, status, archives), so the host's own apt configuration is neither read nor
changed. Against an empty dpkg status apt downloads the whole dependency closure, which
is what a node with nothing but its base system needs. The result is a directory any
HTTP server can serve. Every Release is signed with the mirror's own key
(dsk_provision.mirror_sign); nodes use it as ``deb [signed-by=KEYRING] URL ./``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsk_provision.errors import EnvironmentProblem, InputError
from dsk_provision.files import write_file
from dsk_provision.mirror_sign import SIGNING_DIR, SigningKey, ensure_key, public_key_name
from dsk_provision.sandbox.host import file_lock, require_tools, run

Progress = Callable[[str], None] | None

RECIPE_VERSION = 1
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
UBUNTU_KEYRING = "/usr/share/keyrings/ubuntu-archive-keyring.gpg"
BOOKWORM_SOURCES = (
    "http://deb.debian.org/debian bookworm main",
    "http://deb.debian.org/debian bookworm-updates main",
    "http://deb.debian.org/debian-security bookworm-security main",
)
APT_TIMEOUT_S = 1800
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# A Debian package name, optionally pinned: name or name=version.
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?")


@dataclass(frozen=True)
class TargetOS:
    """An OS the nodes may run, and what a mirror for it needs."""

    id: str                      # debian-12, as `--os` spells it
    role_vars: str               # Debian-12: roles/<role>/vars/<role_vars>.yml
    python: str                  # the distribution's python3, for the trainer's wheels
    glibc: tuple[int, int]       # newest manylinux tag its wheels may carry
    keyring: str                 # signs its default sources
    sources: tuple[str, ...]     # default sources: "URL SUITE COMPONENTS"


TARGETS = {t.id: t for t in (
    TargetOS("debian-12", "Debian-12", "3.11", (2, 36), DEBIAN_KEYRING, BOOKWORM_SOURCES),
    TargetOS("ubuntu-22.04", "Ubuntu-22.04", "3.10", (2, 35), UBUNTU_KEYRING, (
        "http://archive.ubuntu.com/ubuntu jammy main restricted universe",
        "http://archive.ubuntu.com/ubuntu jammy-updates main restricted universe",
        "http://security.ubuntu.com/ubuntu jammy-security main restricted universe")),
    TargetOS("ubuntu-24.04", "Ubuntu-24.04", "3.12", (2, 39), UBUNTU_KEYRING, (
        "http://archive.ubuntu.com/ubuntu noble main restricted universe",
        "http://archive.ubuntu.com/ubuntu noble-updates main restricted universe",
        "http://security.ubuntu.com/ubuntu noble-security main restricted universe")),
)}


# ---------------------------------------------------------------------------------------
# The sandbox's mirror: what a node image lacks, cached by a hash of the inputs.

def mirror_key(packages: Sequence[str], dpkg_status: Path,
               sources: Sequence[str] = BOOKWORM_SOURCES) -> str:
    status_hash = hashlib.sha256(dpkg_status.read_bytes()).hexdigest()
    recipe = {"recipe": RECIPE_VERSION, "packages": sorted(set(packages)),
              "sources": list(sources), "status": status_hash}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _validate_packages(packages: Sequence[str]) -> list[str]:
    pkgs = sorted(set(packages))
    if not pkgs:
        raise InputError("the mirror's package list is empty", field="packages")
    bad = [p for p in pkgs if not _PACKAGE_RE.fullmatch(p)]
    if bad:
        raise InputError(f"invalid Debian package names: {', '.join(bad)}", field="packages")
    return pkgs


def build_apt_mirror(packages: Sequence[str], dpkg_status: Path, cache_dir: Path, *,
                     sources: Sequence[str] = BOOKWORM_SOURCES,
                     progress: Progress = None) -> tuple[Path, str]:
    """Return a directory holding a flat apt repository with `packages` and whatever of
    their dependencies `dpkg_status` lacks, cached in cache_dir by a hash of the inputs,
    and the fingerprint of the key that signs it (kept in cache_dir/mirror-signing, which
    is not served)."""
    say = progress or (lambda _msg: None)
    pkgs = _validate_packages(packages)
    require_tools(["apt-get", "dpkg-scanpackages"])
    key = ensure_key(cache_dir / SIGNING_DIR, label="sandbox")
    final = cache_dir / f"mirror-{mirror_key(pkgs, dpkg_status, sources)}"
    if (final / "Release").exists() and key.signed(final):
        return final, key.fingerprint
    with file_lock(cache_dir / f".{final.name}.lock"):
        if (final / "Release").exists():  # built meanwhile, or before signing existed
            if not key.signed(final):
                key.sign_repo(final)
            return final, key.fingerprint
        for stale in cache_dir.glob(f".building-{final.name}-*"):  # from a killed build
            shutil.rmtree(stale, ignore_errors=True)
        lines = [f"deb [signed-by={DEBIAN_KEYRING}] {s}" for s in sources]
        say(f"building the apt mirror ({len(pkgs)} packages: {' '.join(pkgs)})")
        started = time.monotonic()
        debs = _build_flat_repo(final, pkgs, dpkg_status.read_bytes(), lines, key,
                                where=", ".join(sources))
        size = sum(f.stat().st_size for f in debs) / 2**20
        say(f"apt mirror ready in {time.monotonic() - started:.0f} s: {len(debs)} packages, "
            f"{size:.1f} MiB")
        return final, key.fingerprint


def _build_flat_repo(final: Path, pkgs: Sequence[str], dpkg_status: bytes,
                     source_lines: Sequence[str], key: SigningKey, *,
                     where: str) -> list[Path]:
    """Download `pkgs` and what `dpkg_status` lacks of their dependencies, index them, sign
    the index with `key` and rename the finished repository to `final` (which must not
    exist). Returns the .debs.

    Everything happens in a sibling temp directory; `final` appears whole or not at all.
    """
    tmp = final.parent / f".building-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    work, repo = tmp / "apt", tmp / "repo"
    for d in ("state/lists/partial", "cache", "sources.list.d", "preferences.d", "apt.conf.d"):
        (work / d).mkdir(parents=True)
    (repo / "partial").mkdir(parents=True)
    status = work / "status"
    status.write_bytes(dpkg_status)
    write_file(work / "sources.list", "".join(f"{line}\n" for line in source_lines))
    apt = ["apt-get", "-q",
           "-o", f"Dir::Etc::SourceList={work / 'sources.list'}",
           "-o", f"Dir::Etc::SourceParts={work / 'sources.list.d'}",
           "-o", f"Dir::Etc::Preferences={work / 'preferences'}",
           "-o", f"Dir::Etc::PreferencesParts={work / 'preferences.d'}",
           "-o", f"Dir::State={work / 'state'}",
           "-o", f"Dir::State::status={status}",
           "-o", f"Dir::Cache={work / 'cache'}",
           "-o", f"Dir::Cache::archives={repo}",
           "-o", "Acquire::Languages=none",
           "-o", "APT::Install-Recommends=false"]
    try:
        proc = run([*apt, "update"], check=False, timeout=APT_TIMEOUT_S)
        if proc.returncode != 0 or "Err:" in proc.stdout:
            detail = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                      if ln.startswith(("Err:", "E:", "W:"))][-6:]
            raise EnvironmentProblem(f"apt-get update failed for {where}:\n  "
                                     + "\n  ".join(detail),
                                     hint="check that the sources are reachable from here "
                                          "and that their signing keyrings exist")
        proc = run([*apt, "install", "--download-only", "-y", *pkgs], check=False,
                   timeout=APT_TIMEOUT_S)
        if proc.returncode != 0:
            missing = [line.split()[-1] for line in proc.stderr.splitlines()
                       if "Unable to locate package" in line]
            missing += [m.group(1) for m in re.finditer(
                r"Version '[^']+' for '([^']+)' was not found", proc.stderr)]
            if missing:
                raise InputError(f"packages not found in {where}: {', '.join(missing)}",
                                 field="packages")
            raise EnvironmentProblem("apt-get could not download the mirror's packages:\n  "
                                     + "\n  ".join(proc.stderr.strip().splitlines()[-5:]))
        shutil.rmtree(repo / "partial")
        (repo / "lock").unlink(missing_ok=True)
        debs = sorted(repo.glob("*.deb"))
        index = run(["dpkg-scanpackages", "-m", "."], cwd=repo).stdout
        write_file(repo / "Packages", index)
        write_file(repo / "Packages.gz", gzip.compress(index.encode(), mtime=0))
        write_file(repo / "Release", _release(repo))
        key.sign_repo(repo)
        os.rename(repo, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [final / d.name for d in debs]


def _release(repo: Path) -> str:
    lines = ["Origin: dsk-provision", "Label: dsk-provision mirror", "Suite: mirror",
             "Codename: mirror",
             "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime()),
             "SHA256:"]
    for name in ("Packages", "Packages.gz"):
        data = (repo / name).read_bytes()
        lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {name}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# What the roles install: their own package-list variables, rendered by Ansible.

# Each role exposes what it installs as `<role>_apt_packages` or `<role>_<part>_apt_packages`
# in its defaults or vars (names, or {name, version, ...} items as the GPU roles' pinned
# installs take them), empty where the role installs nothing on a node; its install
# task reads the same variable. `<same prefix>_apt_origin` says where they come from.
APT_LIST_SUFFIX = "_apt_packages"
ORIGIN_SUFFIX = "_apt_origin"
PIP_PACKAGES_VAR = "trainer_env_pip_packages"
# A full Debian version (upstream-revision): pinned in the mirror as name=version. An
# upstream version alone ("580.159.04") is resolved by the node against what the mirror
# carries (its newest).
_FULL_VERSION_RE = re.compile(r"[A-Za-z0-9.+~:]+-[A-Za-z0-9.+~]+")


def mirror_facts(target: TargetOS, gpus: int) -> dict[str, Any]:
    """The facts the roles' package lists read, for a node of `target` with `gpus` GPUs,
    before any node is reached: the hardware a node of the inventory may have (NVSwitches
    where there are GPUs, an RDMA device everywhere)."""
    distribution, version = target.role_vars.split("-", 1)
    facts = {"distribution": distribution, "distribution_version": version,
             "distribution_major_version": version.split(".")[0],
             "distribution_release": "", "os_family": "Debian",
             "architecture": platform.machine()}
    return {"ansible_facts": facts, **{f"ansible_{k}": v for k, v in facts.items()},
            "cuda_hw_gpu_count": gpus, "cuda_hw_nvswitch": gpus > 0,
            "cuda_hw_rdma_devices": ["any"], "cuda_hw_driver_loaded": "",
            "cuda_hw_modprobe": ""}


def _trusted(value: Any) -> Any:
    """Role files are templates Ansible renders: mark their strings so (ansible-core 2.19)."""
    from ansible.template import trust_as_template

    if isinstance(value, str):
        return trust_as_template(value)
    if isinstance(value, list):
        return [_trusted(v) for v in value]
    if isinstance(value, dict):
        return {k: _trusted(v) for k, v in value.items()}
    return value


def _read_role_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EnvironmentProblem(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML: {exc}", file=str(path)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError("must be a mapping of variable names to values", file=str(path))
    return {str(k): v for k, v in data.items()}


def read_role_vars(roles_dir: Path, target: TargetOS) -> dict[str, dict[str, Any]]:
    """Per role: {'defaults': {...}, 'vars': {...}} with vars/main.yml and
    vars/<OS>.yml merged (both rank above the inventory, as in Ansible)."""
    roles: dict[str, dict[str, Any]] = {}
    for role_dir in sorted(p for p in roles_dir.iterdir() if p.is_dir()):
        defaults, role_vars = {}, {}
        for name in ("main.yml", "main.yaml"):
            if (role_dir / "defaults" / name).is_file():
                defaults.update(_read_role_file(role_dir / "defaults" / name))
        for name in ("main.yml", f"{target.role_vars}.yml"):
            if (role_dir / "vars" / name).is_file():
                role_vars.update(_read_role_file(role_dir / "vars" / name))
        roles[role_dir.name] = {"defaults": defaults, "vars": role_vars}
    return roles


def package_lists(roles: Mapping[str, Mapping[str, dict]]) -> list[tuple[str, str]]:
    """(role, variable) of every package list the roles expose, in role order."""
    found = []
    for role, files in roles.items():
        names = {**files["defaults"], **files["vars"]}
        found += [(role, var) for var in names
                  if var.startswith(role + "_") and var.endswith(APT_LIST_SUFFIX)]
    return found


class RoleValues:
    """The roles' variables for one node of one OS, layered as Ansible layers them (every
    role's defaults, the inventory, every role's vars, the facts) and rendered by Ansible's
    own templar, so the mirror reads exactly what the roles' tasks read."""

    def __init__(self, roles: Mapping[str, Mapping[str, dict]], node_vars: Mapping[str, Any],
                 facts: Mapping[str, Any]):
        from ansible.parsing.dataloader import DataLoader
        from ansible.template import Templar

        layers: dict[str, Any] = {}
        for files in roles.values():
            layers.update(files["defaults"])
        layers.update(node_vars)
        for files in roles.values():
            layers.update(files["vars"])
        layers.update(facts)
        self.defined = set(layers)
        self.templar = Templar(loader=DataLoader(), variables=_trusted(layers))

    def get(self, name: str) -> Any:
        """The rendered value; LookupError (with Ansible's message) where it cannot be known
        before the nodes are reached (a fact the mirror does not set, a missing variable)."""
        from ansible.errors import AnsibleError
        from ansible.template import trust_as_template

        try:
            return self.templar.template(trust_as_template("{{ " + name + " }}"))
        except AnsibleError as exc:
            message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise LookupError(message) from exc


def package_specs(value: Any, where: str) -> list[str]:
    """A rendered package list -> apt specs (name, or name=version for a full version)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise LookupError(f"{where} is not a list of package names")
    specs = []
    for item in value:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            version = str(item.get("version") or "")
            pinned = _FULL_VERSION_RE.fullmatch(version)
            specs.append(f"{item['name']}={version}" if pinned else item["name"])
        elif isinstance(item, str):
            specs.append(item)
        else:
            raise LookupError(f"{where}: {item!r} is neither a package name nor {{name, ...}}")
    return [spec.strip() for spec in specs if spec.strip()]


@dataclass
class PackageRequest:
    """One apt package the mirror must hold, and which role variables asked for it."""

    spec: str                               # name or name=version
    origin: str = "distribution"
    sources: list[str] = field(default_factory=list)   # "role:variable"

    @property
    def name(self) -> str:
        return self.spec.split("=", 1)[0]

    def to_dict(self) -> dict:
        return {"package": self.spec, "origin": self.origin, "requested_by": self.sources}


@dataclass
class MirrorPlan:
    """What `build_mirror` downloads: apt packages per OS, pinned pip requirements."""

    oses: list[str]
    apt: dict[str, list[PackageRequest]]
    pip: list[str]
    inventory: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"inventory": self.inventory, "oses": self.oses,
                "apt": {o: [r.to_dict() for r in reqs] for o, reqs in self.apt.items()},
                "pip": self.pip, "notes": self.notes}


def plan_mirror(inventory, oses: Sequence[str] | None = None, *,
                roles_dir: Path | None = None, extra_packages: Sequence[str] = (),
                gpu_stack: bool = True) -> MirrorPlan:
    """Every apt package (per target OS) and pinned pip requirement the inventory's nodes
    install: each role's `*_apt_packages` variables, rendered by Ansible for every node
    with the inventory's variables and the facts of the target OS. `gpu_stack=False`
    renders them as for nodes without GPUs."""
    from dsk_provision.inventory import REPO_ROLES_DIR

    roles_dir = roles_dir or REPO_ROLES_DIR
    targets = [target_os(o) for o in (oses or [host_os_id()])]
    extras = _validate_extra(extra_packages)
    plan = MirrorPlan(oses=[t.id for t in targets], apt={}, pip=[],
                      inventory=str(getattr(inventory, "path", "")))
    pip: dict[str, None] = {}
    for target in targets:
        roles = read_role_vars(roles_dir, target)
        lists = package_lists(roles)
        requests: dict[str, PackageRequest] = {}
        seen: set[str] = set()
        for node in inventory.nodes:
            gpus = int(node.gpus or 0) if gpu_stack else 0
            key = json.dumps([node.vars, gpus], sort_keys=True, default=str)
            if key in seen:  # nodes alike install alike
                continue
            seen.add(key)
            values = RoleValues(roles, node.vars, mirror_facts(target, gpus))
            for role, var in lists:
                _request(values, role, var, requests, plan.notes, target)
            if PIP_PACKAGES_VAR in values.defined:
                try:
                    for req in package_specs(values.get(PIP_PACKAGES_VAR), PIP_PACKAGES_VAR):
                        pip.setdefault(req, None)
                except LookupError as exc:
                    raise InputError(f"cannot read the trainer's Python packages: {exc}",
                                     file=str(inventory.path), field=PIP_PACKAGES_VAR) from exc
        for spec in extras:
            requests.setdefault(spec, PackageRequest(spec)).sources.append("--package")
        plan.apt[target.id] = sorted(requests.values(), key=lambda r: r.spec)
    plan.pip = list(pip)
    if not any(plan.apt.values()):
        raise InputError(f"no role under {roles_dir} names apt packages for these nodes",
                         field="packages")
    return plan


def _request(values: RoleValues, role: str, var: str, requests: dict[str, PackageRequest],
             notes: list[str], target: TargetOS) -> None:
    origin_var = var.removesuffix(APT_LIST_SUFFIX) + ORIGIN_SUFFIX
    try:
        specs = package_specs(values.get(var), var)
        origin = str(values.get(origin_var)) if origin_var in values.defined else "distribution"
    except LookupError as exc:
        note = f"{role} ({var}) on {target.id}: left out, {exc}"
        if note not in notes:
            notes.append(note)
        return
    for spec in specs:
        if not _PACKAGE_RE.fullmatch(spec):
            raise InputError(f"{spec!r} is not a Debian package name (name or name=version)",
                             file=f"roles/{role} or the inventory", field=var)
        req = requests.setdefault(spec, PackageRequest(spec, origin))
        tag = f"{role}:{var}"
        if tag not in req.sources:
            req.sources.append(tag)


def _validate_extra(packages: Sequence[str]) -> list[str]:
    bad = [p for p in packages if not _PACKAGE_RE.fullmatch(p)]
    if bad:
        raise InputError(f"invalid Debian package names: {', '.join(bad)} "
                         "(name or name=version)", field="--package")
    return list(dict.fromkeys(packages))


def host_os_id() -> str:
    """This control node's OS as `--os` spells it (debian-12, ubuntu-22.04 ...)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            info[key] = value.strip().strip('"')
    except OSError:
        return "unknown"
    os_id, version = info.get("ID", "unknown"), info.get("VERSION_ID", "")
    if os_id == "debian":
        version = version.split(".")[0]
    return f"{os_id}-{version}" if version else os_id


def target_os(os_id: str) -> TargetOS:
    if os_id not in TARGETS:
        raise InputError(f"unknown OS {os_id!r}: use one of {', '.join(TARGETS)}",
                         field="--os")
    return TARGETS[os_id]


# ---------------------------------------------------------------------------------------
# `dsk-provision mirror build`: apt repositories per OS, wheels, manifest.

def read_apt_sources(path: Path) -> list[str]:
    """One-line apt sources (`deb [options] URL SUITE [COMPONENTS]`); comments allowed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the apt sources: {exc.strerror}", file=str(path),
                         field="--apt-sources") from exc
    lines = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = re.sub(r"\[[^\]]*\]", "", line).split()
        if words[0] != "deb" or len(words) < 3 or not re.match(r"(https?|file)://", words[1]):
            raise InputError("expected a one-line apt source: deb [signed-by=KEYRING] URL "
                             "SUITE [COMPONENTS] (deb822 .sources files are not read)",
                             file=str(path), field=f"line {n}")
        lines.append(line)
    if not lines:
        raise InputError("no `deb` line in the apt sources", file=str(path),
                         field="--apt-sources")
    return lines


def sources_for(target: TargetOS, apt_sources: Mapping[str, Path]) -> list[str]:
    """The apt source lines used to resolve packages for `target`."""
    if target.id in apt_sources:
        return read_apt_sources(apt_sources[target.id])
    host = host_os_id()
    if host != target.id:
        raise InputError(
            f"this control node runs {host}, so packages for {target.id} cannot be resolved "
            "with its defaults", field="--os",
            hint=f"give --apt-sources {target.id}=FILE with one-line `deb` sources of "
                 f"{target.id} (and their keyring on this machine), or build on a "
                 f"{target.id} control node")
    if not Path(target.keyring).is_file():
        raise EnvironmentProblem(f"the keyring {target.keyring} that signs {target.id}'s "
                                 "repositories is missing",
                                 hint="apt-get install debian-archive-keyring ubuntu-keyring")
    return [f"deb [signed-by={target.keyring}] {s}" for s in target.sources]


def parse_apt_sources_options(values: Sequence[str], oses: Sequence[str]) -> dict[str, Path]:
    """`--apt-sources [OS=]FILE`: a bare FILE applies to the only `--os` given."""
    result: dict[str, Path] = {}
    for value in values:
        os_id, sep, file = value.partition("=")
        if not sep:
            if len(oses) != 1:
                raise InputError(f"{value}: name the OS it is for (OS=FILE) when building "
                                 "for several OSes", field="--apt-sources")
            os_id, file = oses[0], value
        target_os(os_id)
        if os_id not in oses:
            raise InputError(f"{value}: {os_id} is not one of the --os targets "
                             f"({', '.join(oses)})", field="--apt-sources")
        path = Path(file).expanduser()
        if not path.is_file():
            raise InputError("no such file", file=str(path), field="--apt-sources")
        result[os_id] = path
    return result


def wheel_platforms(target: TargetOS, machine: str | None = None) -> list[str]:
    """pip --platform tags a node of `target` accepts (manylinux up to its glibc)."""
    arch = machine or platform.machine()
    major, minor = target.glibc
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for m, name in legacy.items() if m <= minor]
    return tags


def download_wheels(requirements: Sequence[str], dest: Path, targets: Sequence[TargetOS], *,
                    pip_args: Sequence[str] = (), progress: Progress = None,
                    machine: str | None = None) -> None:
    """pip download every requirement (binary wheels only) for each target's Python into
    `dest` (a fresh directory). Extra `pip_args` reach pip (an index, --no-index ...)."""
    say = progress or (lambda _msg: None)
    dest.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for target in targets:
        platforms = wheel_platforms(target, machine)
        key = (target.python, tuple(platforms))
        if key in seen:
            continue
        seen.add(key)
        say(f"wheels for Python {target.python} ({target.id}): {' '.join(requirements)}")
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
               "--no-input", "--progress-bar", "off", "--only-binary=:all:",
               "--python-version", target.python, "--implementation", "cp",
               *[a for p in platforms for a in ("--platform", p)],
               "--dest", str(dest), *pip_args, *requirements]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            detail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-4:]
            if any("No matching distribution" in ln or "Could not find a version" in ln
                   for ln in detail):
                raise InputError(f"no wheel for Python {target.python} on {target.id}:\n  "
                                 + "\n  ".join(detail), field=PIP_PACKAGES_VAR)
            raise EnvironmentProblem("pip download failed:\n  " + "\n  ".join(detail),
                                     hint="check that the package index is reachable "
                                          "(PIP_INDEX_URL, --pip-index-url)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_packages_index(text: str) -> list[dict[str, Any]]:
    """Stanzas of a Packages index -> name, version, architecture, file, size."""
    out = []
    for stanza in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            out.append({"name": fields["Package"], "version": fields.get("Version", ""),
                        "architecture": fields.get("Architecture", ""),
                        "file": fields.get("Filename", "").removeprefix("./"),
                        "size": int(fields.get("Size", "0") or 0)})
    return sorted(out, key=lambda p: p["name"])


def _wheel_entry(path: Path) -> dict[str, Any]:
    parts = path.name[:-len(".whl")].split("-")
    return {"name": parts[0], "version": parts[1] if len(parts) > 1 else "",
            "file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


REQUIREMENTS = "requirements-hashes.txt"


def _python_tuple(digits: str) -> tuple[int, int] | None:
    """"311" -> (3, 11), "3" -> (3, -1): the version in a wheel's Python tag."""
    if not digits.isdigit():
        return None
    return (int(digits[0]), int(digits[1:]) if len(digits) > 1 else -1)


def wheel_pythons(filename: str, pythons: Sequence[str]) -> list[str]:
    """Which of `pythons` ("3.11" ...) a wheel installs on, read from the Python and ABI
    tags of its file name (PEP 427): py3 / py2.py3 on any, cp311 on 3.11 only, cp39-abi3
    on 3.9 and later."""
    parts = filename[:-len(".whl")].split("-")
    if len(parts) < 5:
        return []
    python_tags, abi_tags = parts[-3].split("."), parts[-2].split(".")
    fits = []
    for python in pythons:
        major, minor = (int(x) for x in python.split(".")[:2])
        for tag in python_tags:
            version = _python_tuple(tag[2:]) if tag[:2] in ("py", "cp") else None
            if version is None or version[0] != major:
                continue
            if version[1] == -1 and tag.startswith("py") \
                    or version[1] == minor \
                    or (version[1] <= minor and "abi3" in abi_tags):
                fits.append(python)
                break
    return fits


def hashed_requirements(wheels: Mapping[str, Any]) -> str:
    """A pip requirements file pinning every wheel of the mirror (the whole dependency
    closure) by version and sha256, from the manifest's wheel entries, for
    `pip install --require-hashes -r`. A wheel that only some of the target Pythons can
    install carries a python_version marker."""
    pythons = list(wheels["python_versions"])
    grouped: dict[tuple[str, str], dict[str, list[str]]] = {}
    for entry in wheels["files"]:
        for python in wheel_pythons(entry["file"], pythons):
            by_python = grouped.setdefault((entry["name"], entry["version"]), {})
            by_python.setdefault(python, []).append(entry["sha256"])
    lines = ["# Every wheel of the mirror, pinned by version and sha256 (written by",
             "# dsk-provision mirror build from the manifest): pip install --require-hashes -r"]
    for (name, version), by_python in sorted(grouped.items()):
        fits = [p for p in pythons if p in by_python]
        marker = "" if fits == pythons else " ; " + " or ".join(
            f'python_version == "{p}"' for p in fits)
        hashes = sorted({h for p in fits for h in by_python[p]})
        lines.append(f"{name}=={version}{marker} " + " ".join(f"--hash=sha256:{h}"
                                                             for h in hashes))
    return "\n".join(lines) + "\n"


def write_manifest(out: Path, plan: MirrorPlan, apt: Mapping[str, dict],
                   wheels: dict | None, *, signing_key: dict | None = None,
                   created: str | None = None) -> dict:
    """Hash every file under `out` (but the manifest and hidden files) and write
    manifest.json whole; it is the last file a build writes. `signing_key`: the
    fingerprint (and public key file) of the key that signs every Release."""
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if path.is_file() and rel.as_posix() != MANIFEST \
                and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = sha256_file(path)
    from dsk_provision import __version__

    manifest = {
        "format": MANIFEST_FORMAT, "tool": f"dsk-provision {__version__}",
        "created": created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inventory": plan.inventory, "signing_key": signing_key, "apt": dict(apt),
        "wheels": wheels, "notes": plan.notes, "files": files,
    }
    write_file(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(out: Path) -> dict:
    """A finished mirror's manifest; a directory without one is not a finished mirror."""
    path = out / MANIFEST
    if not path.is_file():
        raise InputError(f"no {MANIFEST}: not a finished mirror (an interrupted build "
                         "leaves none)", file=str(out), field="--dir",
                         hint=f"build it: dsk-provision mirror build -i INVENTORY --out {out}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable manifest: {exc}", file=str(path)) from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise InputError(f"manifest format {data.get('format') if isinstance(data, dict) else '?'}"
                         f" is not {MANIFEST_FORMAT}", file=str(path), field="format")
    return data


def apt_dir(os_id: str) -> str:
    """Path of an OS's flat repository inside a mirror (and in its URL)."""
    return f"apt/{os_id}"


def build_mirror(plan: MirrorPlan, out: Path, *, signing_home: Path,
                 apt_sources: Mapping[str, Path] | None = None,
                 dpkg_status: Path | None = None, wheels: bool = True,
                 pip_args: Sequence[str] = (), progress: Progress = None) -> dict:
    """Download the plan into `out`: apt/<os>/ (flat repositories, each Release signed by
    the key kept in `signing_home`, made there on first use; never inside `out`), wheels/
    with a hash-pinned requirements file, and last manifest.json. Returns the manifest.

    `dpkg_status`: a node's /var/lib/dpkg/status to leave out what it already has; by
    default the whole dependency closure is downloaded (a minimal node installs from it).
    """
    say = progress or (lambda _msg: None)
    apt_sources = dict(apt_sources or {})
    targets = [target_os(o) for o in plan.oses]
    sources = {t.id: sources_for(t, apt_sources) for t in targets}  # checked before changes
    status = b""
    if dpkg_status is not None:
        try:
            status = dpkg_status.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror}", file=str(dpkg_status),
                             field="--dpkg-status") from exc
    require_tools(["apt-get", "dpkg-scanpackages"])
    out.mkdir(parents=True, exist_ok=True)
    if signing_home.resolve().is_relative_to(out.resolve()):
        raise InputError(f"the signing key's home {signing_home} is inside the mirror {out}, "
                         "which is served", field="signing_home")
    key = ensure_key(signing_home, label=plan.inventory or str(out))
    started = time.monotonic()
    with file_lock(out / ".build.lock"):
        # From here on the directory is not a finished mirror until the manifest returns.
        (out / MANIFEST).unlink(missing_ok=True)
        for stale in out.glob(".building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        apt: dict[str, dict] = {}
        for n, target in enumerate(targets, 1):
            reqs = plan.apt.get(target.id, [])
            if not reqs:
                continue
            say(f"[{n}/{len(targets)}] apt packages for {target.id}: resolving "
                f"{len(reqs)} packages with their dependencies")
            t0 = time.monotonic()
            final = out / apt_dir(target.id)
            final.parent.mkdir(parents=True, exist_ok=True)
            fresh = final.parent / f".new-{target.id}"
            shutil.rmtree(fresh, ignore_errors=True)
            debs = _build_flat_repo(fresh, [r.spec for r in reqs], status, sources[target.id],
                                    key,
                                    where=f"the {target.id} sources")
            _replace_dir(fresh, final)
            debs = [final / d.name for d in debs]
            index = parse_packages_index((final / "Packages").read_text())
            for entry in index:
                entry["sha256"] = sha256_file(final / entry["file"])
            size = sum(d.stat().st_size for d in debs) / 2**20
            say(f"    {len(debs)} .deb files, {size:.1f} MiB in {time.monotonic() - t0:.0f} s")
            apt[target.id] = {"path": apt_dir(target.id) + "/", "sources": sources[target.id],
                              "architecture": _host_deb_arch(),
                              "resolved_against": str(dpkg_status) if dpkg_status
                              else "empty dpkg status (full dependency closure)",
                              "requested": [r.to_dict() for r in reqs], "packages": index}
        for old in (out / "apt").glob("*") if (out / "apt").is_dir() else []:
            if old.is_dir() and not old.name.startswith(".") and old.name not in apt:
                shutil.rmtree(old)  # an OS this build no longer targets
        wheel_info = None
        if wheels and plan.pip:
            say(f"[wheels] {len(plan.pip)} pinned Python packages with their dependencies")
            fresh = out / ".new-wheels"
            shutil.rmtree(fresh, ignore_errors=True)
            try:
                download_wheels(plan.pip, fresh, targets, pip_args=pip_args, progress=say)
                _replace_dir(fresh, out / "wheels")
            finally:
                shutil.rmtree(fresh, ignore_errors=True)
            files = [_wheel_entry(p) for p in sorted((out / "wheels").glob("*.whl"))]
            say(f"    {len(files)} wheels, "
                f"{sum(f['size'] for f in files) / 2**20:.1f} MiB")
            wheel_info = {"path": "wheels/", "requirements": plan.pip,
                          "python_versions": sorted({t.python for t in targets}),
                          "platforms": sorted({p for t in targets for p in wheel_platforms(t)}),
                          "files": files}
            write_file(out / REQUIREMENTS, hashed_requirements(wheel_info))
        else:
            if (out / "wheels").is_dir():
                shutil.rmtree(out / "wheels")
            (out / REQUIREMENTS).unlink(missing_ok=True)
        signing = {"fingerprint": key.fingerprint,
                   "public_key": [f"{a['path']}{public_key_name()}" for a in apt.values()]}
        manifest = write_manifest(out, plan, apt, wheel_info, signing_key=signing)
    say(f"mirror ready in {out} ({time.monotonic() - started:.0f} s): "
        f"{len(manifest['files'])} files; manifest {out / MANIFEST}")
    return manifest


def _replace_dir(fresh: Path, final: Path) -> None:
    """Put `fresh` where `final` is, with no moment where `final` holds a mix."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(fresh, final)
    shutil.rmtree(old, ignore_errors=True)


def _host_deb_arch() -> str:
    try:
        return run(["dpkg", "--print-architecture"]).stdout.strip()
    except EnvironmentProblem:
        return platform.machine()
