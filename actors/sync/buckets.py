"""The weight sync's Ray-free primitives: parameter metadata, bucket planning, flatten / unflatten, the receiving
side of the bucketed broadcast, the communicators that carry it and CUDA IPC handles.

Imported by both ends of every sync path and by the code that runs inside vLLM's workers
(`actors/rollout/vllm_worker.py`), so it imports nothing of this project but torch: the same `receive_buckets`
loads buckets into the transformers engine and into vLLM, over gloo on CPU or NCCL on GPUs.

Why buckets: one remote call or one collective launch per parameter costs minutes for a 1.7B model (hundreds
of tensors); a few 512 MiB buckets keep the link busy and the number of calls small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MIB = 1 << 20


@dataclass(frozen=True)
class ParamMeta:
    """Name, full (un-partitioned) shape and wire dtype of one parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


def metas_to_wire(metas: list[ParamMeta]) -> list[tuple]:
    """Plain tuples for transports that serialise only builtins (vLLM's collective_rpc)."""
    return [(m.name, list(m.shape), m.dtype) for m in metas]


def metas_from_wire(wire: list) -> list[ParamMeta]:
    return [m if isinstance(m, ParamMeta) else ParamMeta(m[0], tuple(m[1]), m[2]) for m in wire]


def param_metas(module: torch.nn.Module, dtype: str) -> list[ParamMeta]:
    """Every parameter once (tied weights once: named_parameters de-duplicates them). Under ZeRO-3 a
    parameter's local shape is empty; DeepSpeed keeps the full shape in `ds_shape`."""
    return [ParamMeta(n, tuple(getattr(p, "ds_shape", p.shape)), dtype) for n, p in module.named_parameters()]


def with_aliases(pairs, aliases: dict[str, str]) -> list[tuple[str, torch.Tensor]]:
    """`pairs` plus (alias, same tensor) for every alias whose source is among them (`aliases` from
    `eopd_ray.models.tied_aliases`: the sync sends a tied tensor once; a receiver that holds the alias as a
    layer of its own, as vLLM holds the output head, loads it under both names)."""
    by_source: dict[str, list[str]] = {}
    for alias, source in aliases.items():
        by_source.setdefault(source, []).append(alias)
    out = []
    for name, tensor in pairs:
        out.append((name, tensor))
        out.extend((alias, tensor) for alias in by_source.get(name, ()))
    return out


def plan_buckets(metas: list[ParamMeta], bucket_bytes: int) -> list[list[int]]:
    """Consecutive indices into `metas` grouped so that each bucket has one dtype and at most `bucket_bytes`
    (a single larger parameter forms a bucket of its own). Sender and receivers compute the same plan."""
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for i, m in enumerate(metas):
        if buckets and m.dtype == dtype and size + m.nbytes <= bucket_bytes:
            buckets[-1].append(i)
            size += m.nbytes
        else:
            buckets.append([i])
            size, dtype = m.nbytes, m.dtype
    return buckets


def flatten(tensors: list[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    """Concatenate the tensors (any shapes) into one 1-D tensor of `dtype` on `device`: (sum numel,)."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    offset = 0
    for t in tensors:
        flat[offset:offset + t.numel()].copy_(t.reshape(-1))
        offset += t.numel()
    return flat


def unflatten(flat: torch.Tensor, metas: list[ParamMeta]) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` (no copy), shaped as `metas`, in order: the (name, tensor) list vLLM's load_weights takes."""
    out, offset = [], 0
    for m in metas:
        out.append((m.name, flat[offset:offset + m.numel].view(m.shape)))
        offset += m.numel
    return out


def iter_student_buckets(module: torch.nn.Module, metas: list[ParamMeta], bucket_bytes: int, zero_stage: int,
                         rank: int, device):
    """Yield (bucket metas, flat tensor on `device` or None off rank 0) for each bucket of the student.

    Every rank must iterate: under ZeRO-3 each bucket's parameters are gathered collectively (only that
    bucket is ever whole, so the peak extra memory is one bucket, not the model)."""
    params = dict(module.named_parameters())
    for idx in plan_buckets(metas, bucket_bytes):
        bucket = [metas[i] for i in idx]
        tensors = [params[m.name] for m in bucket]
        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(tensors, modifier_rank=None):
                flat = flatten([t.detach() for t in tensors], DTYPES[bucket[0].dtype], device) if rank == 0 else None
        else:
            flat = flatten([t.detach() for t in tensors], DTYPES[bucket[0].dtype], device) if rank == 0 else None
        yield bucket, flat


def receive_buckets(comm, metas: list[ParamMeta], bucket_bytes: int, device, load) -> int:
    """Receiver side of the bucketed broadcast, the same for every engine and transport: for each bucket
    allocate, receive from rank 0, then call `load(list of (name, tensor))`. Returns the bytes received."""
    total = 0
    for idx in plan_buckets(metas, bucket_bytes):
        bucket = [metas[i] for i in idx]
        flat = torch.empty(sum(m.numel for m in bucket), dtype=DTYPES[bucket[0].dtype], device=device)
        comm.broadcast(flat, 0)
        load(unflatten(flat, bucket))
        total += flat.numel() * flat.element_size()
    return total


# ---- communicators: `broadcast(tensor, src)` ----------------------------------------------------------


class TorchComm:
    """`broadcast(tensor, src)` over torch.distributed (the default group unless one is given)."""

    def __init__(self, group=None):
        self.group = group

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        torch.distributed.broadcast(tensor, src, group=self.group)


class GlooComm:
    """A process group of its own over TCP (gloo), outside torch.distributed's default group: the CPU
    counterpart of vLLM's StatelessProcessGroup + PyNcclCommunicator, so the bucketed broadcast of the
    disaggregated sync runs (and is tested) on machines without GPUs. Rank 0 hosts the rendezvous store."""

    def __init__(self, addr: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0):
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(addr, port, world_size, is_master=(rank == 0), timeout=timeout)
        self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.group.broadcast(tensor, src).wait()


class PyNcclComm:
    """An NCCL communicator between processes outside any torch.distributed group (vLLM's engine workers
    already have theirs): vLLM's StatelessProcessGroup (a TCP store hosted by rank 0) + PyNcclCommunicator.
    Every member must build it at the same time. CUDA only (written from vLLM's API, not run on CPU)."""

    def __init__(self, addr: str, port: int, rank: int, world_size: int, device):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=addr, port=port, rank=rank, world_size=world_size)
        self.comm = PyNcclCommunicator(group, device=device)
        # It disables itself silently (world size 1, NCCL library not found, or VLLM_DISABLE_PYNCCL in recent
        # releases); its broadcast would then be a no-op and the engines would keep stale weights.
        if getattr(self.comm, "disabled", False) or not getattr(self.comm, "available", True):
            raise RuntimeError(f"vLLM's PyNcclCommunicator came up disabled (rank {rank} of {world_size}): "
                               "check that libnccl is found and VLLM_DISABLE_PYNCCL is not set")

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.comm.broadcast(tensor, src=src, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()  # the receiver loads the bucket right after this returns


def weight_group(addr: str, port: int, rank: int, world_size: int, device: torch.device):
    """The dedicated weight-sync group, one per sync group: NCCL through vLLM's communicator on GPUs,
    gloo on CPU. Only the communicator differs between the two; what is sent and received is the same."""
    if torch.device(device).type == "cuda":
        return PyNcclComm(addr, port, rank, world_size, torch.device(device))
    return GlooComm(addr, port, rank, world_size)


# ---- CUDA IPC (colocated: the sender and the receiver hold the same GPU) -------------------------------


def ipc_handle(tensor: torch.Tensor):
    """A picklable handle to a CUDA tensor; the sender must keep `tensor` alive until the receiver is done.
    It is (rebuild function, args): plain pickle and Ray carry it, vLLM's collective_rpc does not (the engine
    pickles it to bytes first, see actors/rollout/vllm_engine.py)."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(tensor)


def open_ipc_handle(handle, device_index: int) -> torch.Tensor:
    """The tensor behind `handle`, mapped into this process. The handle records the sender's device index,
    which differs from ours when each process sees its GPU under another CUDA_VISIBLE_DEVICES numbering."""
    rebuild, args = handle
    args = list(args)
    # rebuild_cuda_tensor's storage_device argument (torch/multiprocessing/reductions.py; vLLM's RLHF examples
    # patch the same index)
    args[6] = device_index
    return rebuild(*args)


def device_uuid(device_index: int | None = None) -> str:
    """A GPU's UUID: how a receiver finds the handle built on its own GPU among all student ranks'."""
    index = torch.cuda.current_device() if device_index is None else device_index
    return str(torch.cuda.get_device_properties(index).uuid)
