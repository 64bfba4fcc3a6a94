"""Student training state that does not depend on the world size or the ZeRO stage.

A DeepSpeed checkpoint is sharded by rank and can only be loaded by the same number of ranks, which rules
out elastic runs (KubeRay scaling a worker group between a failure and the retry). Instead every rank takes
part in gathering the FULL fp32 master weights and the FULL AdamW moments of each parameter (DeepSpeed's
documented `safe_get_full_*` API under ZeRO 1-3 and its bf16 optimizer; the torch optimizer itself under
ZeRO-0), and rank 0 writes them as safetensors keyed by parameter name:

    student/model.safetensors       fp32 master weights            {name: tensor}
    student/optimizer.safetensors   AdamW moments                  {"exp_avg/<name>": ..., "exp_avg_sq/<name>": ...}
    student/trainer_state.json      Adam step, scheduler position, world size and stage at save time

Any number of ranks at any stage loads it back (every rank reads the files, so the checkpoint directory
must be on storage all ranks see: a shared volume on a cluster). No pickle is involved.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")
STATE_DIR = "student"


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW that holds the moments (ZeRO and bf16 wrappers keep it as `.optimizer`)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _managed(param) -> bool:
    """True if DeepSpeed keeps this parameter's fp32 master and moments in its own (partitioned) buffers. Under
    ZeRO 1/2 a parameter held wholly by another rank has `_hp_mapping` None here: it is still managed (this
    rank contributes zeros to the all-reduce that assembles it)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _adam_step(opt: torch.optim.Optimizer) -> int:
    steps = {int(s["step"]) for s in opt.state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters are at different Adam steps {sorted(steps)}; cannot save one step")
    return steps.pop() if steps else 0


def _full(param, key: str | None, opt: torch.optim.Optimizer) -> torch.Tensor:
    """Full fp32 master weight (key None) or moment of one parameter; a collective under ZeRO."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _managed(param):
        value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    else:
        value = param.detach() if key is None else opt.state[param][key]
    return value.detach().to(torch.float32).cpu().reshape(param.ds_shape if hasattr(param, "ds_shape")
                                                           else param.shape).contiguous()


def save_state(engine, rank: int, world_size: int, zero_stage: int, out_dir: str | Path) -> None:
    """Every rank calls this (the gathers are collectives); rank 0 writes `out_dir/student/*`."""
    from safetensors.torch import save_file

    opt = _base_optimizer(engine)
    step = _adam_step(opt)
    weights, moments = {}, {}
    for name, param in engine.module.named_parameters():
        # Every rank takes part in each gather; only rank 0 keeps the result (host memory: 12 bytes/param).
        full = _full(param, None, opt)
        moment = {key: _full(param, key, opt) if step > 0 else torch.zeros_like(full) for key in MOMENTS}
        if rank == 0:
            weights[name] = full
            moments.update({f"{key}/{name}": value for key, value in moment.items()})
    if rank != 0:
        return
    sched = engine.lr_scheduler
    state = {"adam_step": step, "scheduler_last_epoch": int(sched.last_epoch) if sched is not None else 0,
             "global_steps": int(engine.global_steps), "saved_world_size": world_size,
             "saved_zero_stage": zero_stage}
    out = Path(out_dir) / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    save_file(moments, str(out / "optimizer.safetensors"))
    (out / "trainer_state.json").write_text(json.dumps(state, indent=2))


def _materialise_optimizer_state(engine, pad_id: int) -> None:
    """AdamW creates its moments lazily on the first step, and DeepSpeed links its per-parameter views of
    them only then; take one step with learning rate 0 on a one-token batch so that there is state to
    overwrite. With lr 0 AdamW changes no weight (the decoupled decay is lr * wd)."""
    opt = _base_optimizer(engine)
    saved = [g["lr"] for g in opt.param_groups]
    sched_state = (engine.lr_scheduler.last_epoch, engine.lr_scheduler._step_count) if engine.lr_scheduler else None
    for g in opt.param_groups:
        g["lr"] = 0.0
    device = next(engine.module.parameters()).device
    out = engine(input_ids=torch.full((1, 1), pad_id, dtype=torch.long, device=device))
    engine.backward(out.logits.float().sum() * 0.0)
    engine.step()
    for g, lr in zip(opt.param_groups, saved):
        g["lr"] = lr
    if sched_state is not None:
        engine.lr_scheduler.last_epoch, engine.lr_scheduler._step_count = sched_state


def load_state(engine, zero_stage: int, in_dir: str | Path, pad_id: int) -> dict:
    """Every rank calls this; returns the saved trainer_state.json. Restores master weights, the model's
    working copy (bf16 under mixed precision), AdamW moments and step, and the LR schedule position."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors import safe_open

    src = Path(in_dir) / STATE_DIR
    if not (src / "trainer_state.json").exists():
        raise FileNotFoundError(f"no portable student state in {src} (expected model.safetensors, "
                                "optimizer.safetensors and trainer_state.json)")
    state = json.loads((src / "trainer_state.json").read_text())
    # Tensors are read one at a time (safe_open maps the file), so no rank holds a second full copy.
    weights = safe_open(str(src / "model.safetensors"), framework="pt")
    moments = safe_open(str(src / "optimizer.safetensors"), framework="pt")
    params = dict(engine.module.named_parameters())
    if set(params) != set(weights.keys()):
        missing, extra = sorted(set(params) - set(weights.keys())), sorted(set(weights.keys()) - set(params))
        raise RuntimeError(f"checkpoint {src} does not match the student: missing {missing[:5]}, extra {extra[:5]}")
    opt = _base_optimizer(engine)
    if state["adam_step"] > 0 and not opt.state:
        _materialise_optimizer_state(engine, pad_id)
    # The working copy: full parameters on every rank under ZeRO 0-2; gathered and re-partitioned under 3.
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0, enabled=zero_stage == 3):
        with torch.no_grad():
            for name, param in params.items():
                param.data.copy_(weights.get_tensor(name).to(param.dtype).view_as(param.data))
    keys = (None, *MOMENTS) if state["adam_step"] > 0 else (None,)
    for name, param in params.items():
        for key in keys:
            value = weights.get_tensor(name) if key is None else moments.get_tensor(f"{key}/{name}")
            if hasattr(param, "ds_id"):
                _set_zero3_partition(param, value, key)
            elif _managed(param):
                value = value.to(param.device)  # ZeRO 1/2: full local parameter, never on meta
                if key is None:
                    safe_set_full_fp32_param(param, value)
                else:
                    safe_set_full_optimizer_state(param, value, key)
            elif key is not None:
                opt.state[param][key].copy_(value.view_as(opt.state[param][key]))
    for s in opt.state.values():
        if "step" in s:
            s["step"] = torch.tensor(float(state["adam_step"])) if torch.is_tensor(s["step"]) else state["adam_step"]
    sched = engine.lr_scheduler
    if sched is not None:  # a LambdaLR (the trainer's cosine): lr = base_lr * factor(update)
        sched.last_epoch = state["scheduler_last_epoch"]
        sched._step_count = sched.last_epoch + 1
        for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
    engine.global_steps = state["global_steps"]
    return state


def _set_zero3_partition(param, value: torch.Tensor, key: str | None) -> None:
    """This rank's slice of a full value into its ZeRO-3 fp32 partition. DeepSpeed's own setter slices a
    padded partition out of the unpadded value, which overruns on the last rank whenever the parameter's size
    does not divide by the world size (e.g. a 2048-wide Qwen3 on 3 ranks); here the tail stays padding."""
    zopt = param._z3_optimizer
    part, _ = zopt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    flat = value.flatten().to(part.device, part.dtype)
    start = part.numel() * zopt._get_param_partition_rank(param)
    n = max(0, min(part.numel(), flat.numel() - start))
    part.data[:n].copy_(flat[start:start + n])
