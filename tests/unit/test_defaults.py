"""The cluster-wide defaults have one home, read by Ansible and by the control node."""

from __future__ import annotations

import pytest
import yaml

from dsk_provision import defaults


def test_defaults_file_is_the_dsk_defaults_role():
    data = yaml.safe_load(defaults.DEFAULTS_FILE.read_text())
    assert data == defaults.cluster_defaults()
    assert defaults.DEFAULTS_FILE.parts[-4:] == ("roles", "dsk_defaults", "defaults", "main.yml")


def test_resolve_follows_references_and_inventory_values():
    root = defaults.cluster_defaults()["dsk_root"]
    assert defaults.resolve("dsk_python") == f"{root}/venv/bin/python"
    assert defaults.resolve("dsk_python", {"dsk_root": "/srv/x"}) == "/srv/x/venv/bin/python"
    assert defaults.resolve("dsk_python", {"dsk_python": "/usr/bin/python3"}) == "/usr/bin/python3"
    assert defaults.resolve("dsk_rdzv_port", {"dsk_rdzv_port": None}) == \
        defaults.cluster_defaults()["dsk_rdzv_port"]


def test_unknown_setting_and_self_reference_are_errors():
    with pytest.raises(KeyError):
        defaults.resolve("dsk_no_such_setting")
    with pytest.raises(ValueError, match="refers to itself"):
        defaults.resolve("dsk_root", {"dsk_root": "{{ dsk_root }}/x"})


def test_role_defaults_are_read_from_the_role():
    version = defaults.role_defaults("nccl_tests")["nccl_tests_version"]
    assert defaults.resolve("nccl_tests_version", role="nccl_tests") == version
    assert defaults.resolve("nccl_tests_version", {"nccl_tests_version": "9.9"},
                            role="nccl_tests") == "9.9"
    # A role's own lookups fall back to the cluster-wide defaults.
    assert defaults.resolve("dsk_rdzv_port", role="nccl_tests") == \
        defaults.cluster_defaults()["dsk_rdzv_port"]
