"""The mirror's signing key, and the signatures on every Release the mirror writes.

The key is made once, at the first build, with gpg in a private GnuPG home on the control
node, never the user's keyring: ``<cluster state dir>/mirror-signing/`` for
``dsk-provision mirror build``, ``<image cache>/mirror-signing/`` for the sandbox's mirror.
The home is 0700 and gpg keeps the secret key in it 0600; it is never inside the served
tree. Each repository gets ``InRelease`` (clear-signed Release) and ``Release.gpg``
(detached signature), and the public key as ``common_apt_mirror_key_file`` beside them.

Nodes do not trust that served copy as such: the common role installs it only when its
fingerprint is the one the control node recorded (the manifest's ``signing_key``, which
``mirror serve`` prints as the inventory's ``dsk_mirror_key_fingerprint``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dsk_provision.errors import EnvironmentProblem
from dsk_provision.files import make_private_dir, write_file

SIGNING_DIR = "mirror-signing"
KEY_UID = "dsk-provision mirror signing key"
GPG_TIMEOUT_S = 120


def public_key_name() -> str:
    """File name of the public key beside each Release (one home: roles/common defaults)."""
    from dsk_provision.defaults import resolve

    return str(resolve("common_apt_mirror_key_file", role="common"))


@contextmanager
def _gpg_home(home: Path) -> Iterator[Path]:
    """`home` under a short path: gpg-agent's socket lives in the home, and a socket path
    may not be longer than about 100 bytes (pytest's and the state directory's may be).
    The agent is stopped afterwards."""
    link_dir = Path(tempfile.mkdtemp(prefix="dsk-gpg-", dir="/tmp"))
    link = link_dir / "h"
    link.symlink_to(home.resolve())
    try:
        yield link
    finally:
        subprocess.run(["gpgconf", "--homedir", str(link), "--kill", "gpg-agent"],
                       capture_output=True, check=False, timeout=GPG_TIMEOUT_S)
        shutil.rmtree(link_dir, ignore_errors=True)


def _gpg(home: Path, *args: str) -> bytes:
    proc = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--no-tty", "--quiet",
                           "--yes", "--pinentry-mode", "loopback", "--passphrase", "", *args],
                          capture_output=True, timeout=GPG_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise EnvironmentProblem(f"gpg {args[0]} failed:\n  " + "\n  ".join(detail),
                                 hint="the mirror's signing key needs gpg (apt-get install gpg)")
    return proc.stdout


def _secret_fingerprints(home: Path) -> list[str]:
    colons = _gpg(home, "--with-colons", "--list-secret-keys").decode()
    fingerprints, primary = [], False
    for line in colons.splitlines():
        fields = line.split(":")
        if fields[0] in ("sec", "ssb"):
            primary = fields[0] == "sec"
        elif fields[0] == "fpr" and primary:
            fingerprints.append(fields[9])
            primary = False
    return fingerprints


@dataclass(frozen=True)
class SigningKey:
    """A mirror's signing key in its private GnuPG home."""

    home: Path
    fingerprint: str

    def public_key(self) -> bytes:
        """The public key, ASCII-armored."""
        with _gpg_home(self.home) as home:
            return _gpg(home, "--armor", "--export", self.fingerprint)

    def sign_repo(self, repo: Path) -> None:
        """Sign repo/Release (InRelease, Release.gpg) and put the public key beside it."""
        with _gpg_home(self.home) as home:
            release = str(repo / "Release")
            signer = ("--local-user", self.fingerprint + "!", "--digest-algo", "SHA512")
            inline = _gpg(home, *signer, "--clearsign", "--output", "-", release)
            detached = _gpg(home, *signer, "--armor", "--detach-sign", "--output", "-", release)
            public = _gpg(home, "--armor", "--export", self.fingerprint)
        write_file(repo / "InRelease", inline)
        write_file(repo / "Release.gpg", detached)
        write_file(repo / public_key_name(), public)

    def signed(self, repo: Path) -> bool:
        """Whether repo's InRelease and Release.gpg carry good signatures by this key over
        its current Release (gpgv, as apt checks them), and its public key is beside it."""
        if not all((repo / name).is_file() for name in
                   ("Release", "InRelease", "Release.gpg", public_key_name())):
            return False
        with tempfile.TemporaryDirectory(prefix="dsk-gpgv-") as tmp:
            keyring = Path(tmp) / "key.gpg"
            with _gpg_home(self.home) as home:
                keyring.write_bytes(_gpg(home, "--export", self.fingerprint))
            checks = (["gpgv", "--keyring", str(keyring), str(repo / "InRelease")],
                      ["gpgv", "--keyring", str(keyring), str(repo / "Release.gpg"),
                       str(repo / "Release")])
            if any(subprocess.run(argv, capture_output=True, timeout=GPG_TIMEOUT_S,
                                  check=False).returncode != 0 for argv in checks):
                return False
        inline = (repo / "InRelease").read_text(errors="replace")
        return (repo / "Release").read_text(errors="replace") in inline


def ensure_key(home: Path, *, label: str) -> SigningKey:
    """The signing key kept in `home` (a private GnuPG home), made on first use."""
    from dsk_provision.sandbox.host import file_lock, require_tools

    require_tools(["gpg", "gpgv", "gpgconf"])
    make_private_dir(home)
    with file_lock(home / ".lock"):
        with _gpg_home(home) as short:
            found = _secret_fingerprints(short)
            if not found:
                _gpg(short, "--quick-gen-key",
                     f"{KEY_UID} ({label}) <mirror@dsk-provision.invalid>",
                     "ed25519", "sign", "never")
                found = _secret_fingerprints(short)
    if len(found) != 1:
        raise EnvironmentProblem(f"{home} holds {len(found)} secret keys, not one",
                                 hint="it is the mirror's private GnuPG home: remove the "
                                      "extra keys, or the directory to make a new key")
    return SigningKey(home=home, fingerprint=found[0])
