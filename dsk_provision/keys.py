"""`dsk-provision keys rotate`: a new cluster key pair, without ever losing access.

The cluster key (dsk_provision.trust: ``<key dir>/id_ed25519`` and its ``.pub``) is what
the nodes use to reach each other, and what the tool uses wherever the inventory points
``ansible_ssh_private_key_file`` at it. A rotation replaces it in four steps, each of
which leaves every node reachable with the key file the tool reads at that moment:

1. the next key pair is made beside the current one, as ``id_ed25519.next`` (0600);
2. every node authorizes it beside the current one (playbooks/keys_rotate.yml, tag
   ``authorize``), then the control node logs in to every node with it;
3. on the control node the current key becomes ``id_ed25519.old`` and the next one
   ``id_ed25519`` (renames: each file is whole before and after);
4. every node gets the new key (the ssh_trust role) and drops the old one from
   authorized_keys (tag ``retire``); then ``id_ed25519.old`` is deleted.

The files in the key directory say how far a rotation got, so an interrupted one (a
signal, a dead node, a crash) resumes where it stopped when ``keys rotate`` runs again:
``.next`` present: step 2 again (idempotent); ``.old`` present without ``.next``: step 4.
Nothing is revoked until every node has accepted the next key: a node that cannot be
reached in step 2 stops the rotation with the current key still in force everywhere.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dsk_provision import trust
from dsk_provision.errors import EnvironmentProblem, InputError, RunFailed
from dsk_provision.files import write_private
from dsk_provision.trust import KeyFiles, key_files, pending_step

PLAYBOOK = "keys_rotate.yml"
# Seconds to wait for one node to accept a login with the next key.
LOGIN_TIMEOUT_S = 60.0


def public_line(private: Path) -> str:
    """The public key line of a private key file, as ssh-keygen derives it."""
    try:
        proc = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise EnvironmentProblem("ssh-keygen is not installed on the control node",
                                 hint="install openssh-client") from None
    if proc.returncode != 0:
        raise EnvironmentProblem(f"cannot read the key {private}: "
                                 f"{(proc.stderr.strip() or 'ssh-keygen failed')}")
    return proc.stdout.strip()


def make_next_key(keys: KeyFiles, comment: str) -> None:
    """Make the next key pair beside the current one: generated in a private temporary
    directory, then renamed into place, so ``.next`` is either absent or whole."""
    with tempfile.TemporaryDirectory(dir=keys.directory, prefix=".rotate-") as tmp:
        draft = Path(tmp) / "key"
        try:
            proc = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                                   "-f", str(draft)], capture_output=True, text=True,
                                  timeout=60, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise EnvironmentProblem("ssh-keygen is not installed on the control node",
                                     hint="install openssh-client") from None
        if proc.returncode != 0:
            raise EnvironmentProblem(f"ssh-keygen could not make a key: {proc.stderr.strip()}")
        os.chmod(draft, 0o600)
        write_private(keys.public(keys.next), keys.public(draft).read_text(encoding="utf-8"))
        os.replace(draft, keys.next)


def promote_next_key(keys: KeyFiles) -> None:
    """Step 3: the current key becomes ``.old``, the next one the current. Every
    intermediate state is one that pending_step reads and this function finishes."""
    old_pub = keys.public(keys.old)
    if keys.current.exists():
        write_private(old_pub, public_line(keys.current) + "\n")
        os.replace(keys.current, keys.old)
    write_private(keys.public(keys.current), public_line(keys.next) + "\n")
    os.replace(keys.next, keys.current)
    keys.public(keys.next).unlink(missing_ok=True)


def finish(keys: KeyFiles) -> None:
    """After step 4 everywhere: the old key's files go."""
    keys.old.unlink(missing_ok=True)
    keys.public(keys.old).unlink(missing_ok=True)


def login_failures(inventory, private_key: Path, *, timeout: float = LOGIN_TIMEOUT_S,
                   run: Callable[[list[str], float], tuple[int, str]] | None = None,
                   ) -> dict[str, str]:
    """Log in to every node with ``private_key`` alone (no agent, no master connection)
    and return {node: why} for those that did not accept it. ``ssh -v`` must report that
    the server accepted that very key: another key the inventory offers does not count."""
    from dsk_provision.remote import SshTransport

    run = run or _run_argv
    transport = SshTransport(inventory)

    def one(node) -> tuple[str, str | None]:
        probe = replace(node, vars={**(node.vars or {}),
                                    "ansible_ssh_private_key_file": str(private_key)})
        # Options given first win in ssh: no master connection may answer for the key.
        argv = ["ssh", "-v", "-o", "ControlMaster=no", "-o", "ControlPath=none",
                "-o", "IdentityAgent=none", *transport.options(probe)[:],
                str(node.address), "true"]
        rc, out = run(argv, timeout)
        accepted = f"Server accepts key: {private_key}" in out
        if rc == 0 and accepted:
            return node.name, None
        lines = [ln for ln in out.splitlines() if not ln.startswith("debug")]
        why = lines[-1] if lines else f"ssh exited {rc}"
        if rc == 0:
            why = "logged in, but not with the next key"
        return node.name, why

    with ThreadPoolExecutor(max_workers=min(32, max(1, len(inventory.nodes)))) as pool:
        results = list(pool.map(one, inventory.nodes))
    return {name: why for name, why in results if why is not None}


def _run_argv(argv: list[str], timeout: float) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, errors="replace")
    except subprocess.TimeoutExpired:
        return 124, f"no answer within {timeout:g} s"
    return proc.returncode, proc.stdout + proc.stderr


@dataclass
class RotationResult:
    key_dir: Path
    resumed: str | None                 # the step an earlier rotation had stopped at
    nodes: list[str] = field(default_factory=list)
    old_public: str = ""
    new_public: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"key_dir": str(self.key_dir), "resumed": self.resumed, "nodes": self.nodes,
                "old_key": _fingerprint_text(self.old_public),
                "new_key": _fingerprint_text(self.new_public)}


def _fingerprint_text(line: str) -> str:
    """A public key line shortened for people: type and the end of its body."""
    parts = line.split()
    return f"{parts[0]} ...{parts[1][-12:]}" if len(parts) >= 2 else ""


def _unreachable_hint(nodes: list[str], step: str) -> str:
    names = ", ".join(nodes)
    if step == "authorize":
        return (f"nothing was revoked: every node still accepts the current key. Bring "
                f"{names} back and run `dsk-provision keys rotate` again (it resumes), or "
                f"take {names} out of the inventory first if it is gone for good")
    return (f"the new key is in force everywhere; the old one is still accepted on {names}. "
            f"When it answers again, run `dsk-provision keys rotate` again: it resumes with "
            f"the removal")


def rotate(inventory, *, runs_dir: Path | None = None, console=None,
           say: Callable[[str], None] = print) -> RotationResult:
    """Rotate the cluster key of ``inventory`` (or finish an interrupted rotation).
    Holds the cluster's lock throughout. Raises RunFailed naming the nodes that did not
    take a step, with what to do."""
    from dsk_provision.lock import cluster_lock
    from dsk_provision.runner import run_playbook

    with cluster_lock(inventory.cluster_name, "keys-rotate"):
        # The state directory claimed for this inventory, an old key moved into it.
        trust.playbook_vars(inventory, check=False, say=say)
        keys = key_files(inventory)
        step = pending_step(keys)
        if step is None and not keys.current.exists():
            raise InputError(f"no cluster key in {keys.directory} yet: nothing to rotate",
                             file=str(inventory.hosts_file), field=trust.KEY_DIR_VAR,
                             hint="run `dsk-provision bootstrap` first: it makes the key")
        result = RotationResult(key_dir=keys.directory, resumed=step,
                                nodes=[n.name for n in inventory.nodes])
        if step is not None:
            say(f"keys rotate: resuming an unfinished rotation at its {step} step")

        def playbook(tag: str, extra: dict[str, str]) -> None:
            try:
                run_playbook(PLAYBOOK, inventory, command="keys-rotate", runs_dir=runs_dir,
                             tags=[tag], extra_vars=extra, console=console)
            except RunFailed as exc:
                raise RunFailed(f"keys rotate: the {tag} step failed: {exc}",
                                nodes=exc.nodes, hint=_unreachable_hint(exc.nodes, tag)) \
                    from None

        if step in (None, "authorize"):
            if not keys.next.exists():
                make_next_key(keys, comment=_comment(keys))
            next_line = public_line(keys.next)
            playbook("authorize", {"ssh_trust_next_public_key": next_line})
            failures = login_failures(inventory, keys.next)
            if failures:
                bad = sorted(failures)
                raise RunFailed(
                    "keys rotate: the next key was authorized but a login with it failed on "
                    + "; ".join(f"{n}: {failures[n]}" for n in bad), nodes=bad,
                    hint=_unreachable_hint(bad, "authorize"))
            say(f"keys rotate: every node ({len(inventory.nodes)}) accepts the next key")
            promote_next_key(keys)
        if not keys.public(keys.old).exists() and keys.old.exists():
            write_private(keys.public(keys.old), public_line(keys.old) + "\n")
        old_line = keys.public(keys.old).read_text(encoding="utf-8").strip()
        result.old_public = old_line
        result.new_public = public_line(keys.current)
        playbook("retire", {"ssh_trust_retired_public_key": old_line})
        finish(keys)
        return result


def _comment(keys: KeyFiles) -> str:
    """The new key keeps the current key's comment (the ssh_trust role's)."""
    source = keys.public(keys.current)
    try:
        parts = source.read_text(encoding="utf-8").split(maxsplit=2)
    except FileNotFoundError:
        return ""
    return parts[2].strip() if len(parts) == 3 else ""
