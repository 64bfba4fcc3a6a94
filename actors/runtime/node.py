"""Where rank 0 of an actor group's process group listens: the node address Ray knows."""

from __future__ import annotations

import ray

from actors.runtime.dist import free_port


class NodeAddress:
    """Mixed into the Ray shells of actors whose rank 0 hosts a process group (student, ZeRO-3 teacher)."""

    def master_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()
