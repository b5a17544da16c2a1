"""host:port as people and tools read it: IPv6 addresses in brackets, everywhere."""

from __future__ import annotations

import pytest

from dsk_provision.addresses import host_port
from dsk_provision.errors import InputError
from dsk_provision.inventory import load_inventory
from dsk_provision.mirror_serve import base_url


@pytest.mark.parametrize(("host", "port", "expected"), [
    ("10.0.0.1", 22, "10.0.0.1:22"),
    ("node1.example", 2222, "node1.example:2222"),
    ("2001:db8::1", 22, "[2001:db8::1]:22"),
    ("fe80::1%eth0", 29500, "[fe80::1%eth0]:29500"),
    ("[2001:db8::1]", 22, "[2001:db8::1]:22"),
])
def test_host_port(host, port, expected):
    assert host_port(host, port) == expected


def test_duplicate_ipv6_address_is_written_with_brackets(tmp_path):
    hosts = tmp_path / "hosts.yml"
    hosts.write_text("all:\n  vars:\n    dsk_gpus_per_node: 0\n  children:\n    nodes:\n"
                     "      hosts:\n        node1: {ansible_host: '2001:db8::1'}\n"
                     "        node2: {ansible_host: '2001:db8::1'}\n")
    with pytest.raises(InputError) as err:
        load_inventory(hosts)
    assert "[2001:db8::1]:22 is also the address of node 'node1'" in str(err.value)


def test_mirror_url_brackets_an_ipv6_bind_address():
    assert base_url("fd00::1", 8080) == "http://[fd00::1]:8080/"
    assert base_url("10.0.0.1", 8080) == "http://10.0.0.1:8080/"
