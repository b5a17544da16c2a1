"""Defaults read from their one home: the roles' defaults/main.yml files.

roles/dsk_defaults/defaults/main.yml holds the cluster-wide settings that several roles and
the control node share; every other role's defaults/main.yml holds that role's own knobs.
Ansible reads those files as role defaults; the control node reads them here, so a default
such as ``dsk_root`` or ``nccl_tests_version`` is written once for both. Values may refer
to other settings with a plain ``{{ name }}`` (``dsk_python: "{{ dsk_root }}/venv/bin/python"``);
that is the only templating resolved here, against the inventory's values first, then the
defaults.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO_DIR = Path(__file__).resolve().parent.parent
ROLES_DIR = REPO_DIR / "roles"
DEFAULTS_ROLE = "dsk_defaults"
DEFAULTS_FILE = ROLES_DIR / DEFAULTS_ROLE / "defaults" / "main.yml"
# Ansible's settings (the runner points ANSIBLE_CONFIG here); the control node's ssh
# keep-alives and connect timeout are read from it (ansible_setting).
ANSIBLE_CFG = REPO_DIR / "ansible.cfg"
_REFERENCE = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")


@cache
def role_defaults(role: str = DEFAULTS_ROLE) -> dict[str, Any]:
    """A role's defaults as written in its defaults/main.yml (unresolved)."""
    path = ROLES_DIR / role / "defaults" / "main.yml"
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    return data


@cache
def ansible_setting(section: str, key: str) -> str | None:
    """A setting of the repository's ansible.cfg as written (None when absent)."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=None)
    parser.read(ANSIBLE_CFG, encoding="utf-8")
    return parser.get(section, key, fallback=None)


def cluster_defaults() -> dict[str, Any]:
    """The cluster-wide defaults (roles/dsk_defaults), unresolved."""
    return role_defaults(DEFAULTS_ROLE)


def resolve(name: str, values: dict[str, Any] | None = None, *,
            role: str = DEFAULTS_ROLE) -> Any:
    """A setting's value: the inventory's when set (not None), else the default from
    ``role``'s defaults (then the cluster-wide ones), with ``{{ other }}`` references
    replaced by the other setting's resolved value."""
    return _resolve(name, values or {}, role, ())


def _resolve(name: str, values: dict[str, Any], role: str, seen: tuple[str, ...]) -> Any:
    if name in seen:
        raise ValueError(f"roles/{role}: {' -> '.join((*seen, name))} refers to itself")
    value = values.get(name)
    if value is None:
        for source in dict.fromkeys((role, DEFAULTS_ROLE)):
            defaults = role_defaults(source)
            if name in defaults:
                value = defaults[name]
                break
        else:
            raise KeyError(f"{name} has no default in roles/{role} or roles/{DEFAULTS_ROLE}")
    if isinstance(value, str) and "{{" in value:
        def substitute(match: re.Match) -> str:
            return str(_resolve(match.group(1), values, role, (*seen, name)))
        resolved = _REFERENCE.sub(substitute, value)
        if "{{" in resolved or "{%" in resolved:
            raise ValueError(f"roles/{role}: {name}: only plain '{{{{ name }}}}' "
                             f"references are understood, not {value!r}")
        return resolved
    return value
