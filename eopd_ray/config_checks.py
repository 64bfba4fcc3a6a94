"""Value checks behind `eopd_ray.config`: the error that names a field, its value, what is allowed and the fix;
number ranges; and the conversion of a YAML or command-line value to a field's declared type."""

from __future__ import annotations

import math
from typing import Any

from eopd_ray.errors import ConfigError


def fail(path: str, value: Any, allowed: str, fix: str = "") -> None:
    msg = f"config value {path}={value!r} is invalid: allowed {allowed}."
    if fix:
        msg += f" Fix: {fix}"
    raise ConfigError(msg)


def check_range(path: str, value: Any, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> None:
    """Raise ConfigError unless `value` is a number (an int if `integer`) inside the given bounds."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        fail(path, value, kind, f"set {path} to {kind}")
    if not integer and math.isnan(value):
        fail(path, value, f"{kind}, not NaN")
    bounds = []
    if lo is not None:
        bad = value <= lo if lo_open else value < lo
        bounds.append(f"{'>' if lo_open else '>='} {lo}")
        if bad:
            fail(path, value, f"{kind} {' and '.join(bounds)}" + (f" and {'<' if hi_open else '<='} {hi}" if hi is not None else ""))
    if hi is not None:
        bad = value >= hi if hi_open else value > hi
        if bad:
            fail(path, value, f"{kind} {'<' if hi_open else '<='} {hi}" + (f" and {bounds[0]}" if bounds else ""))


def coerce(path: str, raw: Any, annotation: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or fail naming the field."""
    if annotation == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
        fail(path, raw, "true or false")
    if annotation == "int":
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            fail(path, raw, "an integer")
        try:
            return int(raw)
        except ValueError:
            fail(path, raw, "an integer")
    if annotation == "float":
        if isinstance(raw, bool):
            fail(path, raw, "a number")
        try:
            return float(raw)  # accepts "inf" and "1e-4", which YAML 1.1 reads as strings
        except (TypeError, ValueError):
            fail(path, raw, "a number")
    if annotation == "str":
        if isinstance(raw, (dict, list)):
            fail(path, raw, "a string")
        return "" if raw is None else str(raw)
    return raw


def check_placement(cfg) -> None:
    """Cross-section checks of a RunConfig's GPU layout (the plan itself is computed, and
    checked against the GPUs, by eopd_ray/placement.py, which RunConfig.validate calls after this)."""
    mode = cfg.placement.mode
    if cfg.rollout.engine == "vllm" and mode == "cpu" and cfg.rollout.tensor_parallel_size > 1:
        # vLLM's CPU backend runs one engine per rollout worker; tensor parallelism (and sleep mode,
        # NCCL and CUDA IPC, which placement.mode=cpu never selects) need CUDA.
        fail("rollout.tensor_parallel_size", cfg.rollout.tensor_parallel_size,
             "1 with rollout.engine=vllm and placement.mode=cpu (tensor parallelism needs GPUs)",
             "set rollout.tensor_parallel_size=1, or placement.mode=disaggregated on GPUs")
    if cfg.rollout.tensor_parallel_size > 1 and cfg.rollout.engine != "vllm":
        fail("rollout.tensor_parallel_size", cfg.rollout.tensor_parallel_size,
             "1 with rollout.engine=transformers", "set rollout.engine=vllm for tensor parallelism")
    sync = cfg.placement.weight_sync
    if sync == "broadcast" and cfg.rollout.engine == "transformers" and mode != "cpu":
        fail("placement.weight_sync", sync, "auto or object_store with rollout.engine=transformers on GPUs "
             "(its broadcast receiver runs on CPU)", "set placement.weight_sync=auto")
    if sync == "broadcast" and cfg.rollout.engine == "vllm" and mode == "colocated":
        fail("placement.weight_sync", sync, "auto with placement.mode=colocated (CUDA IPC)",
             "set placement.weight_sync=auto, or placement.mode=disaggregated for the NCCL broadcast")
    if cfg.rollout.overlap and mode == "colocated":
        # colocated engines sleep while the student trains on the same GPU: nothing to overlap with
        fail("rollout.overlap", True, "false with placement.mode=colocated (the engines and the student "
             "take turns on each GPU)", "set placement.mode=disaggregated to overlap, or rollout.overlap=false")


def check_cross_tokenizer(cfg, prefix: str = "teacher") -> None:
    """What `teacher.tokenizer=cross` needs: the teacher reads its own prompt ids (its chat template), and the
    paths that pass token ids between the two models unchanged stay off."""
    if cfg.teacher.tokenizer != "cross":
        return
    what = f"with {prefix}.tokenizer=cross"
    if cfg.teacher.prompt_template != "teacher":
        fail(f"{prefix}.prompt_template", cfg.teacher.prompt_template, f"teacher {what} (the teacher reads its own "
             "tokens, prompt included)", f"set {prefix}.prompt_template=teacher")
    if cfg.teacher.eos_remap:
        fail(f"{prefix}.eos_remap", cfg.teacher.eos_remap, f"'' {what} (the student's end token is paired with the "
             "teacher's EOS by the alignment)", f"set {prefix}.eos_remap=''")
    if cfg.teacher.zero_stage != 0:
        fail(f"{prefix}.zero_stage", cfg.teacher.zero_stage, f"0 {what}", f"set {prefix}.zero_stage=0")
    if cfg.loss.spec.samples_from_teacher:
        fail("loss.objective", cfg.loss.objective, f"an on-policy objective {what} (off-policy objectives train "
             "on the teacher's own token ids)", "pick an on-policy objective such as eopd or opd")
    if cfg.eval.enabled and cfg.eval.teacher:
        fail("eval.teacher", True, f"false {what} (the rollout workers evaluate in the student's vocabulary)",
             "set eval.teacher=false; fidelity to the teacher is still measured, in the teacher's tokens")
