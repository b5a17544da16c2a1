"""Training jobs inside a container image: the runtime's command line on each node, and
the check that the image is there.

The runtime of a node is the containers role's setting (``containers_runtime``: docker or
podman, read from roles/containers/defaults/main.yml or the inventory). On every node the
job's torchrun runs as

    <runtime> run [--device /dev/infiniband] --rm --name dsk-job-<name> --network host
        --ipc host [--ulimit memlock=V:V --device nvidia.com/gpu=all]
        -v <job dir>:<job dir> [-v <checkpoints>:<checkpoints>] -w <job dir> -e VAR=...
        IMAGE <torchrun argv>

Host networking keeps the c10d rendezvous and NCCL's sockets on the node's own
addresses, the host's IPC namespace gives NCCL its shared memory, and the GPUs come
through the NVIDIA container toolkit's CDI specification (the containers role writes it on
GPU nodes; Docker reads it once CDI is enabled, which the role does). The directories are
bound at the same paths, so every path the launcher computes holds inside the container,
and the environment is the one torchrun gets on the host (the job's marker too: the
node-side stop finds the ranks by it, seen from the host).

On GPU nodes where the rdma role is on (``rdma_enabled``, roles/rdma/defaults/main.yml),
NCCL may use InfiniBand or RoCE from inside the container, which needs two more things:
the memlock limit the role sets on the host (``rdma_memlock``: ``unlimited`` gives
``--ulimit memlock=-1:-1``, a number of KiB that many bytes), since RDMA registers pinned
memory, and the HCAs' device files (:data:`IB_DEVICES`: uverbs, rdma_cm, umad). Only the
node knows whether it has an HCA, so there the command is wrapped in ``sh -c`` that adds
``--device /dev/infiniband`` when the directory exists and ``exec``s the runtime either
way (the same process, so the supervisor's handling of it is unchanged): a GPU node
without an HCA runs as well. CPU nodes, and nodes with ``rdma_enabled: false``, get
neither.
"""

from __future__ import annotations

import re
import shlex
from pathlib import PurePosixPath

from dsk_provision import defaults
from dsk_provision.errors import InputError

ROLE = "containers"
# The role whose settings say whether and how RDMA is used (rdma_enabled, rdma_memlock).
RDMA_ROLE = "rdma"
# The HCAs' device files (uverbs, rdma_cm, umad), passed in where the node has them.
IB_DEVICES = "/dev/infiniband"
# What limits.conf reads as no limit; the runtimes' --ulimit says -1.
_UNLIMITED = ("unlimited", "infinity", "-1")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
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


def _rdma_enabled(node, file: str | None = None) -> bool:
    value = defaults.resolve("rdma_enabled", node.vars or {}, role=RDMA_ROLE)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise InputError(f"{node.name}: {value!r} is not true or false", file=file,
                     field="rdma_enabled")


def memlock_limit(node, file: str | None = None) -> int:
    """The memlock limit for a container on ``node``, as the runtimes' ``--ulimit`` takes
    it: -1 for no limit, else bytes (``rdma_memlock`` is in KiB, as limits.conf reads it).
    ``file``: the inventory, named in the error."""
    value = defaults.resolve("rdma_memlock", node.vars or {}, role=RDMA_ROLE)
    text = str(value).strip().lower()
    if not isinstance(value, bool) and text in _UNLIMITED:
        return -1
    if not isinstance(value, bool) and text.isdigit():
        return int(text) * 1024
    raise InputError(f"{node.name}: {value!r} is not a memlock limit", file=file,
                     field="rdma_memlock",
                     hint="use unlimited or a number of KiB, as limits.conf takes it")


def check_node(node, file: str | None = None) -> None:
    """What :func:`run_argv` reads of ``node``'s settings, checked before any connection:
    its runtime and, on a GPU node with RDMA on, the memlock limit. ``file``: the
    inventory, named in the errors."""
    runtime(node)
    if int(node.gpus or 0) > 0 and _rdma_enabled(node, file):
        memlock_limit(node, file)


def _with_ib_devices(argv: list[str]) -> list[str]:
    """``argv`` (``<runtime> run ...``) run through ``sh -c`` on the node, with
    ``--device`` :data:`IB_DEVICES` added after ``run`` when that directory is there. The
    shell execs the runtime, so it keeps the shell's process."""
    devices = shlex.quote(IB_DEVICES)
    script = (f'if [ -d {devices} ]; then rt=$1; shift 2; '
              f'exec "$rt" run --device {devices} "$@"; fi; exec "$@"')
    return ["sh", "-c", script, "sh", *argv]


def run_argv(node, image: str, command: list[str], *, name: str,
             workdir: PurePosixPath | str, binds: list[PurePosixPath | str],
             env: dict[str, str], stdin: bool = False) -> list[str]:
    """The argv that runs ``command`` in ``image`` on ``node``: host network and IPC, the
    node's GPUs through CDI (none on a CPU node), each of ``binds`` at its own path,
    ``env`` passed in; ``stdin``: the container reads the caller's standard input. On a
    GPU node with ``rdma_enabled``, the memlock limit of ``rdma_memlock`` and, where the
    node has them, the InfiniBand devices (through ``sh -c``, see the module's text)."""
    gpus = int(node.gpus or 0) > 0
    rdma = gpus and _rdma_enabled(node)
    argv = [runtime(node), "run", *(["-i"] if stdin else []), "--rm", "--name", name,
            "--network", "host", "--ipc", "host"]
    if rdma:
        limit = memlock_limit(node)
        argv += ["--ulimit", f"memlock={limit}:{limit}"]
    if gpus:
        argv += ["--device", CDI_ALL_GPUS]
    for path in dict.fromkeys(str(b) for b in binds):
        argv += ["-v", f"{path}:{path}"]
    argv += ["-w", str(workdir)]
    for key, value in env.items():
        argv += ["-e", f"{key}={value}"]
    argv = [*argv, image, *command]
    return _with_ib_devices(argv) if rdma else argv


def remove_command(node, name: str) -> str:
    """A shell line that removes a container of ``name`` left by an earlier launch (a
    supervisor killed with its runtime client); nothing when there is none."""
    return (f"{{ {shlex.quote(runtime(node))} rm -f {shlex.quote(name)} </dev/null "
            ">/dev/null 2>&1 || true; }")


# What image_command prints before saying why the image is not there (read by preflight).
IMAGE_MARKER = "dsk-image: "


def image_command(node, image: str) -> str:
    """A shell line that succeeds when ``image`` is on the node, pulling it when it is
    not; it says what went wrong otherwise."""
    rt, ref = shlex.quote(runtime(node)), shlex.quote(image)
    return (f"command -v {rt} >/dev/null 2>&1 || {{ echo '{IMAGE_MARKER}no {runtime(node)} "
            f"on this node'; exit 3; }}; "
            f"{rt} image inspect {ref} </dev/null >/dev/null 2>&1 || "
            f"{{ out=$({rt} pull -q {ref} </dev/null 2>&1) || "
            f"{{ echo \"{IMAGE_MARKER}not on this node and cannot be pulled: "
            f"$(printf '%s' \"$out\" | tail -n 1)\"; exit 4; }}; }}")


__all__ = ["CDI_ALL_GPUS", "IB_DEVICES", "check_image", "check_node", "container_name",
           "image_command", "memlock_limit", "remove_command", "run_argv", "runtime"]
