"""On-policy distillation (eq. 8) and the two OPD variants of the paper's baselines (Section 5.1)."""

from __future__ import annotations

import torch

from eopd_ray.objectives.registry import LossInputs, Objective, register


def entropy_bonus(inputs: LossInputs, cfg) -> torch.Tensor:
    """loss -= loss.entropy_coef x the student's mean entropy (with its gradient)."""
    return -cfg.entropy_coef * torch.where(inputs.mask_BT, inputs.student_entropy_BT, inputs.zero).sum() / inputs.num_tokens


def shaped_advantages(inputs: LossInputs, cfg) -> torch.Tensor:
    """Eq. 11: A_t + min(alpha * H_t (detached), |A_t| / kappa)."""
    adv_BT = inputs.teacher_advantages_BT
    return adv_BT + torch.minimum(cfg.shaping_alpha * inputs.student_entropy_BT.detach(), adv_BT.abs() / cfg.shaping_kappa)


OPD = register(Objective("opd", "reverse-KL on-policy distillation: the clipped surrogate of eq. 8 alone"))
ENTROPY_BONUS = register(Objective("entropy_bonus", "OPD + loss.entropy_coef x the student's entropy",
                                   extra_term=entropy_bonus, trains_entropy=True))
ADVANTAGE_SHAPING = register(Objective("advantage_shaping", "OPD with entropy-shaped advantages (eq. 11)",
                                       advantages=shaped_advantages, reads_entropy=True))
