"""Weight sync in buckets: student rank 0 -> every engine worker, over NCCL or CUDA IPC (gloo on CPU).

Three layers, each usable without the next:
1. Ray-free primitives: parameter metadata, bucket planning, flatten / unflatten, a bucketed broadcast over
   any communicator with `broadcast(tensor, src)` (NCCL on GPUs, `GlooComm` on CPU), CUDA IPC handles;
   `actors/sync_selftest.py` runs them between plain processes (no Ray) for tests and benchmarks.
2. Mixins for the Ray shells (`actors/remote.py`): `StudentWeightSender` (ZeRO-3 parameters are gathered
   bucket by bucket with `deepspeed.zero.GatheredParameters`, every rank joining) and `RolloutWeightReceiver`
   (forwards to the vLLM engine, which loads each bucket in its workers through `collective_rpc`).
3. `NcclWeightSync` (disaggregated: one dedicated NCCL group, student rank 0 = rank 0, engine worker j of
   engine i = rank 1 + i * tp + j) and `IpcWeightSync` (colocated: engine i opens the bucket that student rank
   i built on the same GPU), both implementing `WeightSync.sync() -> timing metrics`.

Why buckets: one remote call or one NCCL launch per parameter costs minutes for a 1.7B model (hundreds of
tensors); a few 512 MiB buckets keep the link busy and the number of calls small.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

try:  # the Ray-level classes need Ray; the primitives below also run on a GPU machine without it
    import ray

    from actors.weight_sync import WeightSync
except ImportError:  # pragma: no cover - only on machines without Ray
    ray, WeightSync = None, object

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
    """Receiver side of the bucketed broadcast: for each bucket allocate, receive from rank 0, then call
    `load(list of (name, tensor))`. Returns the bytes received."""
    total = 0
    for idx in plan_buckets(metas, bucket_bytes):
        bucket = [metas[i] for i in idx]
        flat = torch.empty(sum(m.numel for m in bucket), dtype=DTYPES[bucket[0].dtype], device=device)
        comm.broadcast(flat, 0)
        load(unflatten(flat, bucket))
        total += flat.numel() * flat.element_size()
    return total


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


def weight_group(addr: str, port: int, rank: int, world_size: int, device: torch.device):
    """The dedicated weight-sync group: NCCL through vLLM's communicator on GPUs (the engines use it too),
    gloo on CPU."""
    if device.type == "cuda":
        from actors.vllm_engine import stateless_nccl_group

        return stateless_nccl_group(addr, port, rank, world_size, device.index)
    return GlooComm(addr, port, rank, world_size)


# ---- CUDA IPC (colocated: the sender and the receiver hold the same GPU) -------------------------------


def ipc_handle(tensor: torch.Tensor):
    """A picklable handle to a CUDA tensor; the sender must keep `tensor` alive until the receiver is done.
    It is (rebuild function, args): plain pickle and Ray carry it, vLLM's collective_rpc does not (the engine
    pickles it to bytes first, see actors/vllm_engine.py)."""
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


# ---- Mixins for the Ray shells ----------------------------------------------------------------------


class StudentWeightSender:
    """Sending side, mixed into StudentActor. Uses the StudentTrainer's DeepSpeed engine (`self.engine`),
    `self.trainer.zero_stage`, `self.rank` and `self.dtype` (the wire dtype: the engines' compute dtype)."""

    _weight_comm = None
    _ipc_keep = None

    def weight_metas(self) -> list[ParamMeta]:
        return param_metas(self.engine.module, self.dtype)

    def init_weight_group(self, addr: str, port: int, world_size: int) -> bool:
        """Rank 0 joins the dedicated group as its rank 0; the other ranks have nothing to do."""
        if self.rank == 0:
            # the trainer's device: CUDA with the NCCL backend (NCCL group), else CPU (gloo group)
            self._weight_comm = weight_group(addr, port, 0, world_size, self.device)
        return True

    def broadcast_weights(self, bucket_mb: int) -> float:
        """Every rank calls this (ZeRO-3 gathers are collective); rank 0 broadcasts each bucket. Seconds."""
        t0 = time.perf_counter()
        metas = self.weight_metas()
        device = self.device
        for _, flat in iter_student_buckets(self.engine.module, metas, bucket_mb * MIB, self.trainer.zero_stage,
                                            self.rank, device):
            if flat is not None:
                self._weight_comm.broadcast(flat, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def sync_check_logprobs(self, prompt_ids, response_ids) -> list | None:
        """The student's side of the post-sync check: teacher-forced log-probs of the given rows, from rank 0.
        Every rank runs the forward (under ZeRO-3 the parameters are gathered collectively)."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            out = [teacher_forced_logprobs(module, p, r, self.vocab_size) for p, r in zip(prompt_ids, response_ids)]
        finally:
            module.train(was_training)
        return out if self.rank == 0 else None

    def ipc_bucket(self, index: int, bucket_mb: int) -> dict:
        """Colocated: build bucket `index` on this rank's GPU and return {GPU uuid: handle}. Under ZeRO-3 every
        rank gathers the bucket, so every rank can serve the engine on its own GPU."""
        metas = self.weight_metas()
        idx = plan_buckets(metas, bucket_mb * MIB)[index]
        bucket = [metas[i] for i in idx]
        params = dict(self.engine.module.named_parameters())
        tensors = [params[m.name] for m in bucket]
        device = torch.device("cuda", torch.cuda.current_device())
        if self.trainer.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(tensors, modifier_rank=None):
                flat = flatten([t.detach() for t in tensors], DTYPES[bucket[0].dtype], device)
        else:
            flat = flatten([t.detach() for t in tensors], DTYPES[bucket[0].dtype], device)
        torch.cuda.synchronize()
        self._ipc_keep = flat  # alive until the engines have copied it (release_ipc)
        return {device_uuid(): ipc_handle(flat)}

    def release_ipc(self) -> bool:
        self._ipc_keep = None
        return True


class RolloutWeightReceiver:
    """Receiving side, mixed into RolloutActor: forwards to the engine (`self.engine`: a VLLMEngine, or the
    transformers engine on CPU, which receives over gloo)."""

    def init_weight_group(self, addr: str, port: int, rank_offset: int, world_size: int) -> bool:
        self.engine.init_weight_group(addr, port, rank_offset, world_size)
        return True

    def weight_mismatches(self, metas: list[ParamMeta]) -> list[str]:
        return self.engine.weight_mismatches(metas)

    def receive_weights(self, metas: list[ParamMeta], bucket_mb: int) -> float:
        t0 = time.perf_counter()
        self.engine.receive_weights(metas, bucket_mb * MIB)
        return time.perf_counter() - t0

    def receive_ipc_bucket(self, metas: list[ParamMeta], handles: dict) -> float:
        t0 = time.perf_counter()
        self.engine.receive_ipc_bucket(metas, handles)
        return time.perf_counter() - t0

    def score_tokens(self, prompt_ids, response_ids) -> list:
        """The engine's teacher-forced log-probs of given tokens (for `check_synced_logprobs`)."""
        return self.engine.score_tokens(prompt_ids, response_ids)

    def weight_sync_begin(self) -> bool:
        self.engine.weight_sync_begin()
        return True

    def weight_sync_end(self) -> bool:
        self.engine.weight_sync_end()
        return True


# ---- The WeightSync implementations (Ray) ------------------------------------------------------------


class NcclWeightSync(WeightSync):
    """Disaggregated: one NCCL group of student rank 0 and every engine worker; buckets broadcast from rank 0."""

    def __init__(self, students, rollouts, bucket_mb: int, tensor_parallel_size: int):
        self.students, self.rollouts, self.bucket_mb = students, rollouts, bucket_mb
        self.tp = tensor_parallel_size
        self.metas = ray.get(students.actors[0].weight_metas.remote())
        self._connect()

    def _connect(self) -> None:
        """(Re)build the group over the engines present now. An NCCL group cannot gain or lose members, so
        when rollout workers left or joined (elastic runs) every member builds a new one on a fresh port."""
        # Checked before any bucket moves: a receiver failing halfway would leave the sender blocked.
        problems = sorted({p for ps in ray.get(self.rollouts.call("weight_mismatches", self.metas)) for p in ps})
        if problems:
            raise RuntimeError(f"weight sync: the rollout engines' model does not match the student's: "
                               f"{'; '.join(problems[:5])}. Start the engines from the same model.student.")
        world = 1 + len(self.rollouts) * self.tp
        addr, port = ray.get(self.students.actors[0].master_address.remote())
        # All members create the group together (rank 0 hosts its store), so submit everything, then wait.
        ray.get(self.students.call("init_weight_group", addr, port, world)
                + [a.init_weight_group.remote(addr, port, 1 + i * self.tp, world)
                   for i, a in enumerate(self.rollouts.actors)])
        self._members = [a._actor_id for a in self.rollouts.actors]

    def sync(self) -> dict[str, float]:
        t0 = time.perf_counter()
        if [a._actor_id for a in self.rollouts.actors] != self._members:
            self._connect()
        ray.get(self.rollouts.call("weight_sync_begin"))
        send = self.students.call("broadcast_weights", self.bucket_mb)
        recv = self.rollouts.call("receive_weights", self.metas, self.bucket_mb)
        times = ray.get(send + recv)
        ray.get(self.rollouts.call("weight_sync_end"))
        return {"time/sync": time.perf_counter() - t0, "time/sync_send": times[0],
                "time/sync_load": max(times[len(send):])}


class IpcWeightSync(WeightSync):
    """Colocated: per bucket, every student rank builds it on its GPU, engine i opens the one on its GPU."""

    def __init__(self, students, rollouts, bucket_mb: int):
        self.students, self.rollouts, self.bucket_mb = students, rollouts, bucket_mb
        self.metas = ray.get(students.actors[0].weight_metas.remote())
        self.buckets = plan_buckets(self.metas, bucket_mb * MIB)

    def sync(self) -> dict[str, float]:
        t0 = time.perf_counter()
        load = 0.0
        ray.get(self.rollouts.call("weight_sync_begin"))  # a full wake-up (weights and KV cache) of sleeping engines
        for b, idx in enumerate(self.buckets):
            handles: dict = {}
            for part in self.students.run("ipc_bucket", b, self.bucket_mb):
                handles.update(part)
            load += max(self.rollouts.run("receive_ipc_bucket", [self.metas[i] for i in idx], handles))
            self.students.run("release_ipc")
        ray.get(self.rollouts.call("weight_sync_end"))
        return {"time/sync": time.perf_counter() - t0, "time/sync_load": load}


# ---- The post-sync check -------------------------------------------------------------------------------


@torch.no_grad()
def teacher_forced_logprobs(model: torch.nn.Module, prompt_ids, response_ids, vocab_size: int | None = None):
    """log p(response_t | prompt, response_<t) under `model`, float32 numpy of shape (len(response),)."""
    device = next(model.parameters()).device
    ids = torch.tensor(list(prompt_ids) + list(response_ids), dtype=torch.long, device=device)[None]
    p = len(prompt_ids)
    logits = model(input_ids=ids).logits[0, p - 1:p + len(response_ids) - 1].float()
    if vocab_size:
        logits = logits[:, :vocab_size]
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, ids[0, p:, None])[:, 0].cpu().numpy()


# bf16 weights give per-token log-prob differences of a few 1e-2 between two implementations (different
# kernels and reduction orders); a stale or wrong weight moves them by far more.
SYNC_MAX_ABS, SYNC_MEAN_ABS = 0.3, 0.05
# float32 on both sides: only summation order differs (batch shapes, ZeRO gathers), ~1e-6 per token.
SYNC_MAX_ABS_FP32, SYNC_MEAN_ABS_FP32 = 1e-3, 1e-4


class SyncCheckError(AssertionError):
    """The engine's log-probs after a weight sync are not the student's: the engines hold other weights."""


def check_synced_logprobs(engine_logprobs: list, student_logprobs: list, max_abs: float = SYNC_MAX_ABS,
                          mean_abs: float = SYNC_MEAN_ABS) -> dict:
    """Compare the engine's log-probs of given tokens with the student's after a sync; raise AssertionError
    naming the worst position if they differ by more than bf16 noise. Returns {max_abs, mean_abs}."""
    import numpy as np

    diffs = [np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) for a, b in zip(engine_logprobs, student_logprobs)]
    flat = np.concatenate(diffs)
    stats = {"max_abs": float(flat.max()), "mean_abs": float(flat.mean())}
    if stats["max_abs"] > max_abs or stats["mean_abs"] > mean_abs:
        row = int(np.argmax([d.max() for d in diffs]))
        raise SyncCheckError(f"engine and student log-probs differ after the weight sync: {stats} (allowed "
                             f"max {max_abs}, mean {mean_abs}); worst in row {row} at position {int(diffs[row].argmax())}")
    return stats
