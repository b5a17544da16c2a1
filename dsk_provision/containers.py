"""Training jobs inside a container image: the runtime's command line on each node, and
the check that the image is there.

The runtime of a node is the containers role's setting (``containers_runtime``: docker or
podman, read from roles/containers/defaults/main.yml or the inventory). On every node the
job's torchrun runs as

    <runtime> run --rm --name dsk-job-<name> --network host --ipc host
        [--device nvidia.com/gpu=all] -v <job dir>:<job dir> [-v <checkpoints>:<checkpoints>]
        -w <job dir> -e VAR=... IMAGE <torchrun argv>

Host networking keeps the c10d rendezvous and NCCL's sockets on the node's own
addresses, the host's IPC namespace gives NCCL its shared memory, and the GPUs come
through the NVIDIA container toolkit's CDI specification (the containers role writes it on
GPU nodes; Docker reads it once CDI is enabled, which the role does). The directories are
bound at the same paths, so every path the launcher computes holds inside the container,
and the environment is the one torchrun gets on the host (the job's marker too: the
node-side stop finds the ranks by it, seen from the host).
"""

from __future__ import annotations

import re
import shlex
from pathlib import PurePosixPath

from dsk_provision import defaults
from dsk_provision.errors import InputError

ROLE = "containers"
# Every GPU of the node, as the NVIDIA container toolkit's CDI specification names them.
CDI_ALL_GPUS = "nvidia.com/gpu=all"
# An image reference: [registry/]name[:tag][@digest], nothing a shell would read.
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")


def check_image(image: str) -> str:
    image = (image or "").strip()
    if not _IMAGE_RE.match(image):
        raise InputError(f"{image!r} is not an image reference (name[:tag] or "
                         "name@sha256:...)", field="--container")
    return image


def runtime(node) -> str:
    """The container runtime the containers role installed on ``node``."""
    values = node.vars or {}
    if not defaults.resolve("containers_enabled", values, role=ROLE):
        raise InputError(f"{node.name} has no container runtime (containers_enabled is "
                         "false)", field="--container",
                         hint="set containers_enabled: true and run dsk-provision bootstrap "
                              "-i INVENTORY --tags containers, or train without --container")
    return str(defaults.resolve("containers_runtime", values, role=ROLE))


def container_name(job: str) -> str:
    """The container of a job on a node (one per node, so the same name everywhere)."""
    return f"dsk-job-{job}"


def run_argv(node, image: str, command: list[str], *, name: str,
             workdir: PurePosixPath | str, binds: list[PurePosixPath | str],
             env: dict[str, str]) -> list[str]:
    """The runtime's argv that runs ``command`` in ``image`` on ``node``: host network and
    IPC, the node's GPUs through CDI (none on a CPU node), each of ``binds`` at its own
    path, ``env`` passed in."""
    argv = [runtime(node), "run", "--rm", "--name", name, "--network", "host",
            "--ipc", "host"]
    if int(node.gpus or 0) > 0:
        argv += ["--device", CDI_ALL_GPUS]
    for path in dict.fromkeys(str(b) for b in binds):
        argv += ["-v", f"{path}:{path}"]
    argv += ["-w", str(workdir)]
    for key, value in env.items():
        argv += ["-e", f"{key}={value}"]
    return [*argv, image, *command]


def remove_command(node, name: str) -> str:
    """A shell line that removes a container of ``name`` left by an earlier launch (a
    supervisor killed with its runtime client); nothing when there is none."""
    return (f"{{ {shlex.quote(runtime(node))} rm -f {shlex.quote(name)} </dev/null "
            ">/dev/null 2>&1 || true; }")


def image_command(node, image: str) -> str:
    """A shell line that succeeds when ``image`` is on the node, pulling it when it is
    not; it says what went wrong otherwise."""
    rt, ref = shlex.quote(runtime(node)), shlex.quote(image)
    return (f"command -v {rt} >/dev/null 2>&1 || {{ echo 'dsk-image: no {runtime(node)} "
            f"on this node'; exit 3; }}; "
            f"{rt} image inspect {ref} </dev/null >/dev/null 2>&1 || "
            f"{{ out=$({rt} pull -q {ref} </dev/null 2>&1) || "
            f"{{ echo \"dsk-image: not on this node and cannot be pulled: "
            f"$(printf '%s' \"$out\" | tail -n 1)\"; exit 4; }}; }}")


__all__ = ["CDI_ALL_GPUS", "check_image", "container_name", "image_command",
           "remove_command", "run_argv", "runtime"]
