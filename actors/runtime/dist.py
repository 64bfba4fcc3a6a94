"""Joining a torch.distributed group from inside an actor: shared by the DeepSpeed student and ZeRO-3 teacher.

Rank 0 publishes an address (`free_port` on its node); then every rank calls `join_process_group` at once.
"""

from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def master_address() -> tuple[str, int]:
    """Where rank 0 hosts the group when run without Ray (the Ray shells answer with the node's address)."""
    return os.environ.get("EOPD_NODE_IP", "127.0.0.1"), free_port()


def join_process_group(rank: int, world_size: int, master_addr: str, master_port: int,
                       backend: str) -> torch.device:
    """Initialise the default process group (once per process) and return this rank's device: `cuda:0`
    with NCCL (Ray makes the actor's own GPU the only visible one), else the CPU (gloo)."""
    import deepspeed
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    if not torch.cuda.is_available():
        # DeepSpeed JIT-compiles a shared-memory all-reduce (45-90 s on 2 cores) that only its inference
        # kernels use; our collectives go through gloo, so mark the op unavailable.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                init_method=f"tcp://{master_addr}:{master_port}")
    if torch.cuda.is_available() and backend == "nccl":
        torch.cuda.set_device(0)
        return torch.device("cuda:0")
    return torch.device("cpu")
