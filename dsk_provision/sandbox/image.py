"""The base image: a Debian 12 root filesystem built once with mmdebstrap and cached.

The cache key is a hash of the package list and the recipe version, so a change to
either builds a new image. The image is built in a temporary directory and renamed
into place only when complete: a half-built image never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from dsk_provision.files import write_file

from . import naming
from .host import file_lock, run

# Bump when the customisation below changes, so cached images are rebuilt.
RECIPE_VERSION = 4
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
PACKAGES = (
    "openssh-server", "python3", "python3-apt", "systemd", "systemd-sysv", "dbus", "sudo",
    "iproute2", "ca-certificates", "procps", "rsync", "openssh-client",
)
# Units that have no job in a container without devices or consoles.
MASKED_UNITS = (
    "console-getty.service", "getty@.service", "serial-getty@.service", "getty.target",
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service",
    "systemd-networkd-wait-online.service",
    # Only removes /run/nologin, which the tmpfiles override below never creates; at
    # boot it sometimes fails with 219/CGROUP on hosts with hybrid cgroups, leaving the
    # node "degraded" and non-root logins refused.
    "systemd-user-sessions.service",
    # Installed with podman by the containers role: a daily update of containers labelled
    # for it, of which the sandbox has none. It also runs at install, and there it
    # sometimes fails to clean up its cgroup ("Input/output error") on such hosts, which
    # leaves the node "degraded".
    "podman-auto-update.service", "podman-auto-update.timer",
)
SSHD_CONFIG = """\
# dsk-provision sandbox: host keys are generated on the host before first boot.
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
"""
RESOLV_CONF = "# dsk-provision sandbox: no DNS; node names resolve through /etc/hosts\n"
# The journal stays in memory: at boot systemd-journal-flush.service would copy it to
# /var/log/journal, and on a loaded machine that copy times out and leaves the node
# "degraded". A sandbox node's journal is not worth keeping across its restarts.
JOURNALD_CONF = "# dsk-provision sandbox: the journal in memory only\n[Journal]\nStorage=volatile\n"
# An old timestamp on the (empty) apt lists dir keeps cache_valid_time from
# believing a fresh, empty cache is valid.
OLD_MTIME = 946684800  # 2000-01-01


def image_key(packages: tuple[str, ...] = PACKAGES) -> str:
    recipe = {"recipe": RECIPE_VERSION, "suite": SUITE, "variant": "minbase",
              "packages": sorted(packages), "mirrors": list(MIRRORS)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def image_dir(packages: tuple[str, ...] = PACKAGES) -> Path:
    return naming.image_cache() / f"base-{image_key(packages)}"


def ensure_image(progress: Callable[[str], None] | None = None,
                 packages: tuple[str, ...] = PACKAGES) -> Path:
    """Return the rootfs of the cached base image, building it first when needed."""
    final = image_dir(packages)
    if (final / "recipe.json").exists():
        return final / "rootfs"
    with file_lock(final.parent / f".{final.name}.lock"):
        if (final / "recipe.json").exists():  # built meanwhile by another process
            return final / "rootfs"
        return _build(final, packages, progress or (lambda _msg: None))


def _build(final: Path, packages: tuple[str, ...], say: Callable[[str], None]) -> Path:
    cache = final.parent
    for stale in cache.glob(f".building-{final.name}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = cache / f".building-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rootfs = tmp / "rootfs"
    tmp.mkdir()
    say(f"building the base image (Debian {SUITE}, {len(packages)} packages; "
        "takes about 30 s, once)")
    started = time.monotonic()
    try:
        run(["mmdebstrap", "--variant=minbase", "--quiet",
             "--include=" + ",".join(packages), SUITE, str(rootfs), *MIRRORS], timeout=1800)
        customise(rootfs)
        write_file(tmp / "recipe.json", json.dumps(
            {"recipe": RECIPE_VERSION, "suite": SUITE, "packages": sorted(packages),
             "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
        if final.exists():  # an incomplete leftover under the final name
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"base image ready in {time.monotonic() - started:.0f} s: {final}")
    return final / "rootfs"


def customise(rootfs: Path) -> None:
    """Make the image fit to boot as a sandbox node (no console, no udev, no DNS)."""
    for key in (rootfs / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    write_file(rootfs / "etc/ssh/sshd_config.d/dsk-sandbox.conf", SSHD_CONFIG)
    write_file(rootfs / "etc/systemd/journald.conf.d/dsk-sandbox.conf", JOURNALD_CONF)
    units = rootfs / "etc/systemd/system"
    for unit in MASKED_UNITS:
        link = units / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    nologin = rootfs / "etc/tmpfiles.d/systemd-nologin.conf"
    nologin.parent.mkdir(parents=True, exist_ok=True)
    if nologin.is_symlink() or nologin.exists():
        nologin.unlink()
    nologin.symlink_to("/dev/null")
    resolv = rootfs / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    write_file(resolv, RESOLV_CONF)
    # Each node gets its own machine-id; the image carries none.
    write_file(rootfs / "etc/machine-id", "")
    # Nodes have no internet: no sources until a mirror is configured.
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    lists = rootfs / "var/lib/apt/lists"
    lists.mkdir(parents=True, exist_ok=True)
    os.utime(lists, (OLD_MTIME, OLD_MTIME))
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    ssh_link = wants / "ssh.service"
    if not (ssh_link.is_symlink() or ssh_link.exists()):
        ssh_link.symlink_to("/lib/systemd/system/ssh.service")
