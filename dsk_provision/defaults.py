"""The cluster-wide defaults, read from their one home: roles/dsk_defaults/defaults/main.yml.

Ansible reads that file as a role's defaults; the control node reads it here, so a default
such as ``dsk_root`` is written once for both. Values may refer to other settings with a
plain ``{{ name }}`` (``dsk_python: "{{ dsk_root }}/venv/bin/python"``); that is the only
templating resolved here, against the inventory's values first, then the defaults.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

REPO_DIR = Path(__file__).resolve().parent.parent
DEFAULTS_FILE = REPO_DIR / "roles" / "dsk_defaults" / "defaults" / "main.yml"
_REFERENCE = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")


@lru_cache(maxsize=1)
def cluster_defaults() -> dict[str, Any]:
    """The defaults as written in the file (unresolved)."""
    with DEFAULTS_FILE.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{DEFAULTS_FILE}: expected a mapping of settings")
    return data


def resolve(name: str, values: dict[str, Any] | None = None) -> Any:
    """A setting's value: the inventory's when set (not None), else the default, with
    ``{{ other }}`` references replaced by the other setting's resolved value."""
    return _resolve(name, values or {}, ())


def _resolve(name: str, values: dict[str, Any], seen: tuple[str, ...]) -> Any:
    if name in seen:
        raise ValueError(f"{DEFAULTS_FILE}: {' -> '.join((*seen, name))} refers to itself")
    value = values.get(name)
    if value is None:
        defaults = cluster_defaults()
        if name not in defaults:
            raise KeyError(f"{name} has no default in {DEFAULTS_FILE}")
        value = defaults[name]
    if isinstance(value, str) and "{{" in value:
        def substitute(match: re.Match) -> str:
            return str(_resolve(match.group(1), values, (*seen, name)))
        resolved = _REFERENCE.sub(substitute, value)
        if "{{" in resolved or "{%" in resolved:
            raise ValueError(f"{DEFAULTS_FILE}: {name}: only plain '{{{{ name }}}}' "
                             f"references are understood, not {value!r}")
        return resolved
    return value
