"""Offline apt mirror: a flat repository holding the packages a set of nodes lacks.

Resolution uses the host's apt-get with a private state directory against the nodes'
dpkg status, so exactly the missing packages (and their missing dependencies) are
downloaded. The result is a directory that any HTTP server can serve; nodes use it as
`deb [trusted=yes] URL ./`. This is the mechanism an air-gapped cluster needs too:
build the mirror where there is a network, serve it where there is none.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dsk_provision.errors import EnvironmentProblem, InputError
from dsk_provision.sandbox.host import file_lock, require_tools, run, write_file

RECIPE_VERSION = 1
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
BOOKWORM_SOURCES = (
    "http://deb.debian.org/debian bookworm main",
    "http://deb.debian.org/debian bookworm-updates main",
    "http://deb.debian.org/debian-security bookworm-security main",
)


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
    bad = [p for p in pkgs if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", p)]
    if bad:
        raise InputError(f"invalid Debian package names: {', '.join(bad)}", field="packages")
    return pkgs


def build_apt_mirror(packages: Sequence[str], dpkg_status: Path, cache_dir: Path, *,
                     sources: Sequence[str] = BOOKWORM_SOURCES,
                     progress: Callable[[str], None] | None = None) -> Path:
    """Return a directory holding a flat apt repository with `packages` and whatever of
    their dependencies `dpkg_status` lacks; cached in cache_dir by a hash of the inputs."""
    say = progress or (lambda _msg: None)
    pkgs = _validate_packages(packages)
    require_tools(["apt-get", "dpkg-scanpackages"])
    final = cache_dir / f"mirror-{mirror_key(pkgs, dpkg_status, sources)}"
    if (final / "Release").exists():
        return final
    with file_lock(cache_dir / f".{final.name}.lock"):
        if (final / "Release").exists():  # built meanwhile by another process
            return final
        return _build(final, pkgs, dpkg_status, sources, say)


def _build(final: Path, pkgs: list[str], dpkg_status: Path, sources: Sequence[str],
           say: Callable[[str], None]) -> Path:
    cache_dir = final.parent
    for stale in cache_dir.glob(f".building-{final.name}-*"):  # from a killed build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = cache_dir / f".building-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    work, repo = tmp / "apt", tmp / "repo"
    for d in ("state/lists/partial", "cache", "sources.list.d", "preferences.d", "apt.conf.d"):
        (work / d).mkdir(parents=True)
    (repo / "partial").mkdir(parents=True)
    status = work / "status"
    shutil.copyfile(dpkg_status, status)
    write_file(work / "sources.list",
               "".join(f"deb [signed-by={DEBIAN_KEYRING}] {s}\n" for s in sources))
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
    say(f"building the apt mirror ({len(pkgs)} packages: {' '.join(pkgs)})")
    started = time.monotonic()
    try:
        run([*apt, "update"], timeout=900)
        proc = run([*apt, "install", "--download-only", "-y", *pkgs], check=False,
                   timeout=900)
        if proc.returncode != 0:
            missing = [line.split()[-1] for line in proc.stderr.splitlines()
                       if "Unable to locate package" in line]
            if missing:
                raise InputError(f"packages not found in {', '.join(sources)}: "
                                 f"{', '.join(missing)}", field="packages")
            raise EnvironmentProblem("apt-get could not download the mirror's packages:\n  "
                                     + "\n  ".join(proc.stderr.strip().splitlines()[-5:]))
        shutil.rmtree(repo / "partial")
        (repo / "lock").unlink(missing_ok=True)
        debs = sorted(repo.glob("*.deb"))
        size = sum(f.stat().st_size for f in debs) / 2**20
        index = run(["dpkg-scanpackages", "-m", "."], cwd=repo).stdout
        write_file(repo / "Packages", index)
        write_file(repo / "Packages.gz", gzip.compress(index.encode(), mtime=0))
        write_file(repo / "Release", _release(repo))
        os.rename(repo, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"apt mirror ready in {time.monotonic() - started:.0f} s: {len(debs)} packages, "
        f"{size:.1f} MiB")
    return final


def _release(repo: Path) -> str:
    lines = ["Origin: dsk-provision", "Label: dsk-provision mirror", "Suite: mirror",
             "Codename: mirror",
             "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime()),
             "SHA256:"]
    for name in ("Packages", "Packages.gz"):
        data = (repo / name).read_bytes()
        lines.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {name}")
    return "\n".join(lines) + "\n"
