"""Node-side probes that ``dsk-provision validate`` runs on every node (under torchrun,
or one process per node): the all-reduce benchmark and the per-device matmul and memory
copy. They write their results as JSON for the control node to fetch and check.
Development benchmarks of the trainer itself live in trainer/bench."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_whole(path: Path, data: dict) -> None:
    """Write ``data`` as JSON so that a reader never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
