"""The vLLM rollout engine behind `RolloutEngine`, and the code that runs inside vLLM's workers.

This is the only module that imports vLLM (always inside functions, so importing this file needs no vLLM).
Written against vLLM's public offline API (v0.10 and later, V1 engine): `LLM(...)`, `LLM.generate` with token
prompts (`{"prompt_token_ids": [...]}`) and one `SamplingParams` per request, `SamplingParams(logprobs=0)` for
the log-prob of the sampled token, `prompt_logprobs=0` for teacher-forced log-probs, `LLM.sleep` /
`LLM.wake_up` (sleep mode) and `LLM.collective_rpc` into a worker extension class (`worker_extension_cls`)
whose methods receive weights and call the model's `load_weights`.

What vLLM does not give: the sampler's full-vocabulary entropy. vLLM returns log-probs of the sampled token
and of at most `logprobs` top tokens, never the whole distribution, so `Generation.entropy` holds NaN for
every token of this engine. Downstream code must treat rollout entropy as absent (NaN) with this engine;
the teacher's entropy, which EOPD's gate uses, is computed by the teacher worker and is unaffected.

Behaviour log-probs: vLLM's default `logprobs_mode="raw_logprobs"` is log_softmax of the model's logits
before temperature and top-p, which is the student's pi_old at the paper's sampling temperature 1.0 (the
student's training forward uses the same full-vocabulary softmax). For another temperature the engine asks
for `processed_logprobs` (after temperature and top-k/top-p), the distribution actually sampled from.
Checked against vllm/v1/sample/sampler.py and ops/topk_topp_sampler.py: the sampled token's log-prob is always
gathered first (`gather_logprobs` concatenates it before the top-k, so `logprobs=0` gives exactly
{sampled id: Logprob} per position); `logprobs_mode` appeared in v0.10.0, and `processed_logprobs` has meant
"after temperature and top-k/top-p" only since vllm-project/vllm#22387 (in v0.10.2; earlier releases returned
pre-temperature values under that name), so a temperature other than 1.0 needs vLLM >= 0.10.2.

Everything passed through `LLM.collective_rpc` is plain builtins or `bytes`: with the V1 engine core in its own
process, arguments cross a msgpack boundary whose untyped decoder turns a torch.Tensor / numpy array into a
bare [dtype, shape, buffer-index] list (vllm/v1/serial_utils.py, vllm/v1/engine/core.py), and functions,
classes and dtypes (inside a CUDA IPC handle) are refused unless VLLM_ALLOW_INSECURE_SERIALIZATION=1. So
tensors and IPC handles are pickled to bytes here and unpickled in the worker.
"""

from __future__ import annotations

import gc
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from actors.rollout import Generation, RolloutEngine, SamplingParams

WORKER_EXTENSION = "actors.vllm_engine.EngineWorkerExtension"
# The object-store weight path sends pickled pairs in pieces of about this size: one msgpack `bin` holds < 4 GiB.
_RPC_CHUNK_BYTES = 512 << 20


def stateless_nccl_group(addr: str, port: int, rank: int, world_size: int, device):
    """An NCCL communicator between processes outside any torch.distributed group (the engine workers
    already have theirs): vLLM's StatelessProcessGroup (a TCP store hosted by rank 0) + PyNcclCommunicator.
    Returns an object with `broadcast(tensor, src)`. Every member must call this at the same time."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=addr, port=port, rank=rank, world_size=world_size)
    comm = PyNcclCommunicator(group, device=device)
    # It disables itself silently (world size 1, NCCL library not found, or VLLM_DISABLE_PYNCCL in recent
    # releases); its broadcast would then be a no-op and the engines would keep stale weights.
    if getattr(comm, "disabled", False) or not getattr(comm, "available", True):
        raise RuntimeError(f"vLLM's PyNcclCommunicator came up disabled (rank {rank} of {world_size}): "
                           "check that libnccl is found and VLLM_DISABLE_PYNCCL is not set")
    return _PyNcclComm(comm)


class _PyNcclComm:
    def __init__(self, comm):
        self.comm = comm

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.comm.broadcast(tensor, src=src, stream=torch.cuda.current_stream())


def _vllm_at_least(version: str) -> bool:
    import vllm
    from packaging.version import Version

    return Version(vllm.__version__.split("+")[0]) >= Version(version)


def _request_seed(seed: int, i: int) -> int:
    """A per-request seed so that a batch's samples depend only on (seed, position), as in the CPU engine."""
    return (seed * 1_000_003 + i * 7_919) % (2**31 - 1)


class VLLMEngine(RolloutEngine):
    """One vLLM `LLM` with `tensor_parallel_size` GPUs. `sleep_between_calls` (colocated placement): the
    engine sleeps (level 1: weights to CPU, KV cache dropped) after each generate, so the teacher and the
    student can use the GPU, and wakes up for the next weight sync or generate."""

    def __init__(self, model_path: str, dtype: str = "bfloat16", trust_remote_code: bool = False,
                 vocab_size: int | None = None, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 max_model_len: int = 0, sleep_between_calls: bool = False, seed: int = 0, temperature: float = 1.0):
        self.dtype, self.trust_remote_code, self.vocab_size = dtype, trust_remote_code, vocab_size
        self.tp, self.gpu_memory_utilization = tensor_parallel_size, gpu_memory_utilization
        self.max_model_len, self.sleep_between_calls, self.seed = max_model_len, sleep_between_calls, seed
        self.logprobs_mode = "raw_logprobs" if temperature == 1.0 else "processed_logprobs"
        self.asleep = False
        self._build(model_path)

    # -- life cycle ---------------------------------------------------------------------------------------
    def _build(self, path: str) -> None:
        from vllm import LLM

        if self.logprobs_mode != "raw_logprobs" and not _vllm_at_least("0.10.2"):
            import vllm

            raise RuntimeError(f"rollout temperature != 1.0 needs vLLM >= 0.10.2 (logprobs_mode="
                               f"'processed_logprobs' after temperature and top-p); installed {vllm.__version__}")
        # Workers of a TP engine are processes started by vLLM; inside a Ray actor they must be spawned (vLLM
        # also forces spawn itself once CUDA is initialised or it detects a Ray actor).
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        kwargs = dict(model=path, tokenizer=path, dtype=self.dtype, tensor_parallel_size=self.tp,
                      gpu_memory_utilization=self.gpu_memory_utilization, seed=self.seed,
                      trust_remote_code=self.trust_remote_code, enable_sleep_mode=self.sleep_between_calls,
                      worker_extension_cls=WORKER_EXTENSION,
                      # Ignore generation_config.json: its sampling defaults, and its eos_token_id list, which
                      # vLLM would add as stop tokens; with "vllm" only the tokenizer's EOS stops a response, as
                      # in the transformers engine.
                      generation_config="vllm")
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        if self.tp > 1:
            # The actor holds all tp GPUs itself (CUDA_VISIBLE_DEVICES set by Ray), so vLLM's local
            # multiprocessing executor places one worker per visible GPU. Left unset, ParallelConfig picks "ray"
            # whenever it runs inside a Ray placement group (checked: vllm/config/parallel.py, v0.10-v0.2x) and
            # would try to schedule tp more GPU workers into our placement group, whose GPUs this actor has.
            kwargs["distributed_executor_backend"] = "mp"
        if self.logprobs_mode != "raw_logprobs":
            kwargs["logprobs_mode"] = self.logprobs_mode
        self.llm = LLM(**kwargs)
        self.model_path = path
        self.asleep = False
        if self.sleep_between_calls:
            self.sleep()

    def sleep(self) -> None:
        if self.sleep_between_calls and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def shutdown(self) -> None:
        """Free the engine's GPUs (before building another model in this process)."""
        engine = getattr(self.llm, "llm_engine", None)
        # V1: the engine core (and its workers) run in child processes owned by `engine_core`, a client whose
        # shutdown() terminates them; some releases also expose LLMEngine.shutdown(). Deleting the LLM runs the
        # same finaliser, so these calls only make the release immediate.
        for target in (engine, getattr(engine, "engine_core", None)):
            if target is not None and callable(getattr(target, "shutdown", None)):
                target.shutdown()
                break
        del self.llm
        gc.collect()
        torch.cuda.empty_cache()

    # -- RolloutEngine -----------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[np.ndarray], params: SamplingParams) -> Generation:
        """prompt_ids: P arrays of token ids -> per prompt the sampled ids (T_i,) int32 up to and including
        EOS, their behaviour log-probs (T_i,) float32, and entropy (T_i,) all NaN (see the module doc)."""
        from vllm import SamplingParams as VllmSamplingParams

        self.wake_up()
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids]
        sampling = [VllmSamplingParams(n=1, temperature=params.temperature, top_p=params.top_p,
                                       max_tokens=params.max_new_tokens, logprobs=0, detokenize=False,
                                       seed=_request_seed(params.seed, i)) for i in range(len(requests))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        out = Generation([], [], [])
        for request in outputs:  # vLLM returns the outputs in request order
            completion = request.outputs[0]
            ids = np.asarray(completion.token_ids, dtype=np.int32)
            # One small dict per position is vLLM's format; it is turned into one array right here.
            logprobs = np.fromiter((pos[int(t)].logprob for pos, t in zip(completion.logprobs, ids)),
                                   dtype=np.float32, count=len(ids))
            out.response_ids.append(ids)
            out.logprobs.append(logprobs)
            out.entropy.append(np.full(len(ids), np.nan, dtype=np.float32))
        self.sleep()
        return out

    def score_tokens(self, prompt_ids: list[np.ndarray], response_ids: list[np.ndarray]) -> list[np.ndarray]:
        """Teacher-forced log p(response_t | prompt, response_<t) under the engine's current weights, one
        float32 array (T_i,) per row: the engine side of the post-sync check (`nccl_sync.check_synced_logprobs`)."""
        from vllm import SamplingParams as VllmSamplingParams

        self.wake_up()
        full = [[int(t) for t in p] + [int(t) for t in r] for p, r in zip(prompt_ids, response_ids)]
        sampling = VllmSamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in full], sampling, use_tqdm=False)
        scores = []
        for request, ids, p in zip(outputs, full, prompt_ids):
            plp = request.prompt_logprobs  # position j: {ids[j]: Logprob} (None at j = 0)
            scores.append(np.array([plp[j][ids[j]].logprob for j in range(len(p), len(ids))], dtype=np.float32))
        self.sleep()
        return scores

    def load_weights(self, state: dict[str, np.ndarray]) -> None:
        """The object-store path (CPU arrays, pickled to every worker): kept for compatibility; on GPU the
        NCCL / CUDA IPC sync in actors/nccl_sync.py is the fast path. Sent as pickled bytes in pieces of
        about _RPC_CHUNK_BYTES (see the module doc: tensors do not survive collective_rpc's msgpack)."""
        self.weight_sync_begin()
        piece, size = [], 0
        for name, value in state.items():
            array = np.ascontiguousarray(value)
            piece.append((name, array))
            size += array.nbytes
            if size >= _RPC_CHUNK_BYTES:
                self.llm.collective_rpc("eopd_load_pairs", args=(pickle.dumps(piece, protocol=5),))
                piece, size = [], 0
        if piece:
            self.llm.collective_rpc("eopd_load_pairs", args=(pickle.dumps(piece, protocol=5),))
        self.weight_sync_end()

    def load_model(self, path: str) -> None:
        """Same architecture: stream the safetensors files into the running engine; otherwise (the teacher,
        at evaluation) rebuild the engine on `path`."""
        from eopd_ray.models import architecture_mismatch

        if architecture_mismatch(path, self.model_path, self.trust_remote_code):
            self.shutdown()
            self._build(path)
            return
        self.weight_sync_begin()
        self.llm.collective_rpc("eopd_load_from_path", args=(str(path),))
        self.model_path = path
        self.weight_sync_end()

    # -- weight sync (called through RolloutWeightReceiver) ------------------------------------------------
    def weight_sync_begin(self) -> None:
        # A full wake-up: waking only the weights and putting them back to sleep leaves the KV cache pool in a
        # state sleep mode was not written for; the engine sleeps again after its next generate.
        self.wake_up()

    def weight_sync_end(self) -> None:
        self._weights_changed()

    def _weights_changed(self) -> None:
        # Prefix caching is on by default in V1: blocks cached for a prompt under the old weights would be
        # reused for the same prompt (the k samples of a problem, the next epoch, score_tokens) after the
        # update. LLM.sleep() resets the cache itself in recent releases, but the disaggregated engines never
        # sleep, so reset it here after every weight change (LLM.reset_prefix_cache exists since v0.6).
        if self.llm.reset_prefix_cache() is False:  # a bool in v0.10+, None in some engine clients
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update (requests running?)")

    def init_weight_group(self, addr: str, port: int, rank_offset: int, world_size: int) -> None:
        self.llm.collective_rpc("eopd_init_weight_group", args=(addr, port, rank_offset, world_size))

    def receive_weights(self, metas: list, bucket_bytes: int) -> None:
        from actors.nccl_sync import metas_to_wire

        self.llm.collective_rpc("eopd_receive_buckets", args=(metas_to_wire(metas), bucket_bytes))
        self._weights_changed()  # also here: callers (and tests) may generate without weight_sync_end

    def receive_ipc_bucket(self, metas: list, handles: dict) -> None:
        """handles: {GPU uuid: torch.multiprocessing.reductions.reduce_tensor(...)}; pickled to bytes here,
        since a handle holds a function, classes and a dtype that collective_rpc's msgpack refuses."""
        from actors.nccl_sync import metas_to_wire

        self.llm.collective_rpc("eopd_receive_ipc", args=(metas_to_wire(metas), pickle.dumps(handles)))
        self._weights_changed()  # a hash-table clear: cheap enough per bucket


class EngineWorkerExtension:
    """Methods vLLM adds to each of its GPU workers (`worker_extension_cls`: vLLM appends this class to the
    worker class's bases and asserts that no name clashes, vllm/v1/worker/worker_base.py); `self` is the vLLM
    worker, with `self.device` (cuda:local_rank, set in init_device) and the model (whose `load_weights` takes
    (HF name, full tensor) pairs and shards them for tensor parallelism itself). Called through
    `LLM.collective_rpc` on every worker."""

    def _eopd_model(self):
        # Worker.get_model() returns the model unwrapped from the CUDA-graph wrapper that recent V1 runners put
        # around `model_runner.model`; older workers only have the attribute (vllm/v1/worker/gpu_worker.py).
        get_model = getattr(self, "get_model", None)
        if callable(get_model):
            try:
                return get_model()
            except NotImplementedError:
                pass
        return self.model_runner.model

    def _eopd_load(self, pairs) -> None:
        self._eopd_model().load_weights(weights=pairs)

    def eopd_init_weight_group(self, addr: str, port: int, rank_offset: int, world_size: int) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = rank_offset + get_tensor_model_parallel_rank()
        self._eopd_comm = stateless_nccl_group(addr, port, rank, world_size, self.device)

    def eopd_receive_buckets(self, metas: list, bucket_bytes: int) -> None:
        from actors.nccl_sync import metas_from_wire, receive_buckets

        receive_buckets(self._eopd_comm, metas_from_wire(metas), bucket_bytes, self.device, self._eopd_load)
        torch.cuda.synchronize()

    def eopd_receive_ipc(self, metas: list, handles: bytes) -> None:
        from actors.nccl_sync import device_uuid, metas_from_wire, open_ipc_handle, unflatten

        handles = pickle.loads(handles)  # bytes from VLLMEngine.receive_ipc_bucket
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        uuid = device_uuid(index)
        if uuid not in handles:
            raise RuntimeError(f"colocated weight sync: no student rank shares this engine's GPU {uuid}; "
                               f"handles came from {sorted(handles)}")
        flat = open_ipc_handle(handles[uuid], index)
        self._eopd_load(unflatten(flat, metas_from_wire(metas)))
        torch.cuda.synchronize()  # the sender frees its bucket after this call returns
        del flat

    def eopd_load_pairs(self, pairs: bytes) -> None:
        self._eopd_load([(n, torch.from_numpy(a).to(self.device)) for n, a in pickle.loads(pairs)])

    def eopd_load_from_path(self, path: str) -> None:
        from safetensors import safe_open

        folder = Path(path)
        if not folder.is_dir():  # a hub name: the files are in (or go to) the local hub cache
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt", device=str(self.device)) as fh:
                self._eopd_load([(k, fh.get_tensor(k)) for k in fh.keys()])
