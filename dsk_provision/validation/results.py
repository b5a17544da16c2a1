"""The result of one validation check: pass, fail or skip, naming the node."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

PASS, FAIL, SKIP = "pass", "fail", "skip"
CLUSTER = "cluster"  # the node name of results that belong to all nodes together


@dataclass
class CheckResult:
    node: str
    check: str
    status: str  # pass | fail | skip
    value: Any
    threshold: Any
    message: str

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
