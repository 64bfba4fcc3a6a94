"""Objectives as registered pure functions over one shared core (`core.eopd_loss`).

The core sanitises every tensor outside the response mask, reads the sampled token and the teacher's top-k
with one gather, builds the per-token terms (the clipped surrogate, the top-k forward KL) and the metrics.
An objective says only what differs, as pure functions of the sanitised inputs and the loss config:
- `advantages`: the per-token advantage of the clipped surrogate (default: eq. 6, teacher minus pi_old);
- `gate`: where the forward KL applies (default: nowhere), from what is known before the student's forward
  (its inputs' student fields are None), so that a trainer can count a split mini-batch's gated tokens
  before any piece runs (`loss.fkl_normalizer=gated_tokens`, `core.objective_gate`);
- `policy_term`: the policy part of the loss (default: the clipped surrogate's token mean);
- `extra_term`: anything else added to the loss (default: nothing);
- `fkl_coef`: the weight of the gated forward KL (default: `loss.fkl_coef`),
and declares what the rest of the system needs to know about it: whether it learns from the teacher's own
samples (`samples_from_teacher`), how many responses per prompt it is run with (`samples_per_prompt`;
above 1 it needs a group of at least 2), whether it needs the grader's rewards (`needs_rewards`), and whether
gradients flow through the forward KL or the student's entropy (otherwise they are computed without one).
`diagnostics=False` makes the core compute only what the loss needs (see `Objective`), which is what a plain
objective costs without this project's per-position diagnostics.

Adding an objective is one module that calls `register(Objective(...))` (plus a config field if it has a
coefficient). Objectives take the loss config as a plain object: nothing here imports eopd_ray.config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from eopd_ray.errors import ConfigError


@dataclass
class LossInputs:
    """What an objective's functions see, every (B, T) tensor zero (or False) outside the mask.

    mask_BT bool; logprobs_BT: the student's log-probs of the sampled tokens (with gradient); old_BT: the
    behaviour log-probs (pi_old); teacher_logprobs_BT, teacher_entropy_BT: the teacher's; student_entropy_BT
    (with gradient only if the objective `trains_entropy`); logprobs_BT and student_entropy_BT are None in
    what `gate` sees; teacher_advantages_BT: teacher minus pi_old (eq. 6);
    sequence_advantages_B: per-response advantages (objectives that `needs_rewards`), else None; generator:
    drives random gates; num_tokens: the loss's normaliser (the mini-batch's response tokens, >= 1)."""

    mask_BT: torch.Tensor
    logprobs_BT: torch.Tensor | None
    old_BT: torch.Tensor
    teacher_logprobs_BT: torch.Tensor
    teacher_entropy_BT: torch.Tensor
    student_entropy_BT: torch.Tensor | None
    teacher_advantages_BT: torch.Tensor
    sequence_advantages_B: torch.Tensor | None
    generator: torch.Generator | None
    num_tokens: torch.Tensor
    zero: torch.Tensor

    def masked_mean(self, x_BT: torch.Tensor) -> torch.Tensor:
        """Sum of x over the mask divided by num_tokens (the token mean of Algorithm 1, line 13)."""
        return torch.where(self.mask_BT, x_BT, self.zero).sum() / self.num_tokens


def teacher_advantages(inputs: LossInputs, cfg: Any) -> torch.Tensor:
    return inputs.teacher_advantages_BT


def no_gate(inputs: LossInputs, cfg: Any) -> torch.Tensor:
    return torch.zeros_like(inputs.mask_BT)


def surrogate_mean(inputs: LossInputs, cfg: Any, pg_BT: torch.Tensor) -> torch.Tensor:
    return inputs.masked_mean(pg_BT)


def nothing(inputs: LossInputs, cfg: Any) -> torch.Tensor:
    return inputs.zero


def fkl_coef(cfg: Any) -> float:
    return cfg.fkl_coef


@dataclass(frozen=True)
class Objective:
    """An objective's functions and declared properties (module doc).

    diagnostics (default True): the core also computes, for every objective, the top-k forward KL at every
    position and the student's entropy, for the `fkl/*` and `student/entropy` metrics (so OPD runs can be
    compared with EOPD). False: the top-k gather and the forward KL only if the objective `trains_fkl`, the
    student's entropy only if it `trains_entropy` or `reads_entropy`, and those metrics are left out; an
    objective that does not train the forward KL then adds no forward-KL term (with diagnostics on it is a
    constant without gradient). `dataclasses.replace(get_objective("opd"), diagnostics=False)` is plain OPD.
    reads_entropy: its functions read `student_entropy_BT` without training through it (advantage shaping)."""

    name: str
    doc: str  # one line, printed with the list of objectives
    advantages: Callable[[LossInputs, Any], torch.Tensor] = teacher_advantages
    gate: Callable[[LossInputs, Any], torch.Tensor] = no_gate
    policy_term: Callable[[LossInputs, Any, torch.Tensor], torch.Tensor] = surrogate_mean
    extra_term: Callable[[LossInputs, Any], torch.Tensor] = nothing
    fkl_coef: Callable[[Any], float] = fkl_coef
    trains_fkl: bool = False
    trains_entropy: bool = False
    reads_entropy: bool = False
    diagnostics: bool = True
    samples_from_teacher: bool = False
    samples_per_prompt: int = 1
    needs_rewards: bool = False


_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Make `objective` selectable as loss.objective=<its name>; registering the same name twice is refused
    (unregister it first), so a typo cannot silently replace a built-in."""
    if not objective.name or not objective.name.replace("_", "").isalnum():
        raise ValueError(f"objective name {objective.name!r} is invalid: use letters, digits and underscores")
    if objective.name in _REGISTRY and _REGISTRY[objective.name] is not objective:
        raise ValueError(f"an objective named {objective.name!r} is registered already; pick another name or "
                         "call unregister() first")
    _REGISTRY[objective.name] = objective
    return objective


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def objective_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_objective(name: str) -> Objective:
    if name not in _REGISTRY:
        raise ConfigError(f"config value loss.objective={name!r} is invalid: allowed "
                          f"{', '.join(_REGISTRY)}. Fix: pick one, or register your own with eopd_ray.objectives.register")
    return _REGISTRY[name]
