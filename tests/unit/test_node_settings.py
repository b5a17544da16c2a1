"""A node's typed settings: defaults from roles/dsk_defaults, and the NCCL environment the
control node gives every rank equal to the one the nccl role writes to /etc/nccl.conf
(the role's own expression, rendered by Ansible's templar)."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
import yaml
from helpers import ROLES

from dsk_provision import defaults
from dsk_provision.inventory import Node, nccl_name_pattern


def node(**node_vars) -> Node:
    return Node("n1", "10.0.0.1", 22, "root", 0, node_vars)


def test_settings_default_to_the_cluster_defaults():
    cluster = defaults.cluster_defaults()
    settings = node().settings
    assert settings.root == PurePosixPath(cluster["dsk_root"])
    assert settings.python == f"{cluster['dsk_root']}/venv/bin/python"
    assert settings.rdzv_port == cluster["dsk_rdzv_port"]
    assert settings.socket_ifname is None and settings.nccl_env == {}
    assert settings.run_dir("r1") == PurePosixPath(cluster["dsk_root"]) / "runs" / "r1"


def test_settings_follow_the_inventory():
    settings = node(dsk_root="/srv/dsk", dsk_rdzv_port=29400, dsk_socket_ifname="ib0").settings
    assert settings.python == "/srv/dsk/venv/bin/python"
    assert settings.rdzv_port == 29400
    assert settings.nccl_env == {"NCCL_SOCKET_IFNAME": "ib0"}


def _templar(variables: dict):
    pytest.importorskip("ansible")
    from ansible.parsing.dataloader import DataLoader
    from ansible.plugins.loader import init_plugin_loader
    from ansible.template import Templar, trust_as_template

    init_plugin_loader()
    # Role defaults and vars are trusted templates inside a play; so they are here.
    trusted = {k: trust_as_template(v) if isinstance(v, str) else v
               for k, v in variables.items()}
    return Templar(loader=DataLoader(), variables=trusted), trust_as_template


CASES = [
    {},
    {"dsk_socket_ifname": "eth0"},
    {"dsk_nccl_env": {"NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_DEBUG": "WARN"}},
    {"dsk_socket_ifname": "eth0", "dsk_nccl_env": {"NCCL_NET_GDR_LEVEL": 5,
                                                   "NCCL_IB_DISABLE": False}},
    {"dsk_socket_ifname": "eth0", "dsk_nccl_env": {"NCCL_SOCKET_IFNAME": "ib0"}},
]


@pytest.mark.parametrize("inventory_vars", CASES)
def test_nccl_environment_is_the_one_the_role_writes(inventory_vars):
    role_defaults = yaml.safe_load((ROLES / "dsk_defaults/defaults/main.yml").read_text())
    templar, trust = _templar({**role_defaults, **inventory_vars})
    # What the nccl role writes: nccl_conf_env (its default) rendered by nccl.conf.j2
    # as KEY={{ value }}.
    nccl_defaults = yaml.safe_load((ROLES / "nccl/defaults/main.yml").read_text())
    rendered = templar.template(trust(nccl_defaults["nccl_conf_env"]))
    from_role = {str(k): str(v) for k, v in rendered.items()}
    assert node(**inventory_vars).settings.nccl_env == from_role


def test_the_role_checks_names_with_the_schemas_rule():
    role_vars = yaml.safe_load((ROLES / "nccl/vars/main.yml").read_text())
    templar, trust = _templar({"role_path": str(ROLES / "nccl")})
    assert templar.template(trust(role_vars["nccl_conf_key_pattern"])) == nccl_name_pattern()
