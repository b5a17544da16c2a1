"""Message sizes, written the way the node-side benchmarks read them: '1K', '16M', '8G'.

nccl-tests and trainer.bench.allreduce take a whole number with an optional K, M or G
suffix (powers of 1024, either case). A size is checked here on the control node, so
that a typo fails before any connection, and then travels to the nodes as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsk_provision.errors import InputError

_SIZE_RE = re.compile(r"^(\d+)([KMG]?)$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


@dataclass(frozen=True)
class Size:
    text: str  # as written: the benchmarks on the nodes get this
    bytes: int


def read_size(text: str, field: str) -> Size:
    """'16M' -> Size('16M', 16777216); InputError naming ``field`` for anything else."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise InputError(f"{text!r} is not a size: use a number with an optional K, M or G "
                         "suffix, e.g. 1K or 16M", field=field)
    value = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 1:
        raise InputError(f"{text!r} must be at least 1 byte", field=field)
    return Size(str(text), value)


def parse_size(text: str, field: str) -> int:
    """'1K' -> 1024, '16M' -> 16777216."""
    return read_size(text, field).bytes
