"""The local sandbox cluster: Debian 12 nodes in systemd-nspawn containers, each in its
own network namespace on a private bridge, with an apt mirror served on the bridge.

See docs/sandbox.md. The CLI calls up (with spare nodes for `nodes add`), down, status,
set_link_rate and reimage_node (for `nodes replace`); the fault drills
(tests/integration) stop a node with stop_node and start it again with up.
"""

from .core import (
    MIRROR_PACKAGES,
    SandboxInfo,
    down,
    reimage_node,
    set_link_rate,
    status,
    stop_node,
    up,
)

__all__ = ["MIRROR_PACKAGES", "SandboxInfo", "down", "reimage_node", "set_link_rate", "status",
           "stop_node", "up"]
