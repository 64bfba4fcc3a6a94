"""The sync transports between plain processes (no Ray), for tests and benchmarks: a bucketed broadcast of a
synthetic bf16 state dict between two processes (NCCL on two GPUs, gloo on CPU) and CUDA IPC buckets opened
by a second process on the same GPU. Each checks that every tensor arrived bit for bit and times the transfer.
"""

from __future__ import annotations

import os
import time

import torch

from actors.sync.buckets import (DTYPES, MIB, ParamMeta, TorchComm, flatten, ipc_handle, open_ipc_handle,
                                 plan_buckets, receive_buckets, unflatten)


def synthetic_state(total_mb: int, dtype: str = "bfloat16", seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """A deterministic state dict of about `total_mb` MiB shaped like a transformer's (matrices and vectors)."""
    gen = torch.Generator().manual_seed(seed)
    state, left, i = {}, total_mb * MIB, 0
    while left > 0:
        rows = 1024 if i % 3 else 1  # mix large matrices with small vectors, as real models do
        cols = max(1, min(4096, left // (rows * DTYPES[dtype].itemsize)))
        state[f"layer{i}.weight"] = torch.randn(rows, cols, generator=gen).to(DTYPES[dtype]).to(device)
        left -= rows * cols * DTYPES[dtype].itemsize
        i += 1
    return state


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _broadcast_worker(rank: int, world: int, port: int, total_mb: int, bucket_mb: int, backend: str,
                      out: dict) -> None:
    if backend == "nccl":
        os.environ.setdefault("NCCL_DEBUG", "WARN")
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world)
    expected = synthetic_state(total_mb)
    metas = [ParamMeta(n, tuple(t.shape), "bfloat16") for n, t in expected.items()]
    comm = TorchComm()
    received: dict[str, torch.Tensor] = {}
    for _ in range(2):  # the first round warms NCCL up; the second is timed
        _sync(device)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            gpu_state = [t.to(device) for t in expected.values()]
            for idx in plan_buckets(metas, bucket_mb * MIB):
                comm.broadcast(flatten([gpu_state[i] for i in idx], torch.bfloat16, device), 0)
        else:
            receive_buckets(comm, metas, bucket_mb * MIB, device,
                            lambda pairs: received.update({n: t.clone() for n, t in pairs}))
        _sync(device)
        seconds = time.perf_counter() - t0
    if rank == 1:
        out["equal"] = all(torch.equal(received[n].cpu(), t) for n, t in expected.items())
        out["seconds"] = seconds
        out["bytes"] = sum(m.nbytes for m in metas)
        out["buckets"] = len(plan_buckets(metas, bucket_mb * MIB))
    torch.distributed.destroy_process_group()


def run_two_process_broadcast(total_mb: int = 256, bucket_mb: int = 64, backend: str = "nccl") -> dict:
    """Spawn 2 processes (nccl: on GPUs 0 and 1, as NCCL refuses two ranks on one GPU; gloo: on CPU),
    broadcast a bucketed state dict from rank 0 and check it arrived bit for bit.
    Returns {equal, seconds, bytes, buckets, gbps}."""
    import socket

    import torch.multiprocessing as mp

    if backend == "nccl" and torch.cuda.device_count() < 2:
        raise RuntimeError("the two-process NCCL broadcast needs 2 GPUs: NCCL refuses two ranks on one GPU")
    with mp.Manager() as manager:
        out = manager.dict()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_broadcast_worker, args=(2, port, total_mb, bucket_mb, backend, out), nprocs=2, join=True)
        res = dict(out)
    res["gbps"] = res["bytes"] / res["seconds"] / 1e9
    return res


def _ipc_child(rank: int, handles: list, metas_per_bucket: list, queue) -> None:
    torch.cuda.set_device(0)
    sums = []
    for handle, metas in zip(handles, metas_per_bucket):
        flat = open_ipc_handle(handle, 0)
        sums.extend(float(t.float().sum()) for _, t in unflatten(flat, metas))
    torch.cuda.synchronize()
    queue.put(sums)


def run_ipc_roundtrip(total_mb: int = 256, bucket_mb: int = 64) -> dict:
    """One GPU, two processes: this process builds the buckets, a spawned child opens them through CUDA
    IPC handles (the colocated path) and returns a checksum per tensor. Returns {equal, seconds, buckets}."""
    import torch.multiprocessing as mp

    state = synthetic_state(total_mb, device="cuda")
    metas = [ParamMeta(n, tuple(t.shape), "bfloat16") for n, t in state.items()]
    tensors = list(state.values())
    plan = plan_buckets(metas, bucket_mb * MIB)
    t0 = time.perf_counter()
    flats = [flatten([tensors[i] for i in idx], torch.bfloat16, "cuda") for idx in plan]
    torch.cuda.synchronize()
    handles = [ipc_handle(f) for f in flats]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_ipc_child, args=(0, handles, [[metas[i] for i in idx] for idx in plan], queue))
    child.start()
    sums = queue.get(timeout=300)
    child.join(timeout=60)
    seconds = time.perf_counter() - t0
    expected = [float(t.float().sum()) for t in tensors]
    return {"equal": sums == expected and child.exitcode == 0, "seconds": seconds, "buckets": len(plan),
            "bytes": sum(m.nbytes for m in metas)}
