"""The cluster's state directory on the control node, for a plain ansible-playbook run.

Under `dsk-provision` the runner passes ``dsk_cluster_state_dir`` as an extra variable and this
lookup is never called. Without it, roles/dsk_defaults computes the same directory here,
with the same code (dsk_provision.trust.playbook_vars): claimed for this inventory, an
old key beside the inventory moved into it (not in check mode).
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase
from ansible.utils.display import Display

DOCUMENTATION = r"""
name: dsk_cluster_state_dir
author: dsk-provision
short_description: The cluster's state directory on the control node
description:
  - Returns the state directory of the inventory's cluster (dsk_provision.state), made
    0700 and recorded as this inventory's, and refuses one that another inventory owns.
options:
  _terms:
    description: The inventory's hosts file (inventory_file).
    required: true
"""

REPO = Path(__file__).resolve().parent.parent
display = Display()


@lru_cache(maxsize=8)
def _state_dir(hosts_file: str, check: bool) -> str:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from dsk_provision.errors import DskError
    from dsk_provision.inventory import load_inventory
    from dsk_provision.trust import playbook_vars

    try:
        return playbook_vars(load_inventory(hosts_file), check=check,
                             say=display.display)["dsk_cluster_state_dir"]
    except DskError as exc:
        raise AnsibleError(str(exc)) from None


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        if len(terms) != 1:
            raise AnsibleError("dsk_cluster_state_dir takes one term: the inventory's hosts file")
        check = bool((variables or {}).get("ansible_check_mode", False))
        return [_state_dir(str(terms[0]), check)]
