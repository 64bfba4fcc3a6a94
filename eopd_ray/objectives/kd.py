"""Off-policy KD (Table 7): the teacher samples, the student learns cross-entropy plus the top-k forward KL
at every position."""

from __future__ import annotations

import torch

from eopd_ray.objectives.fkl import every_position
from eopd_ray.objectives.registry import LossInputs, Objective, register


def cross_entropy(inputs: LossInputs, cfg, pg_BT: torch.Tensor) -> torch.Tensor:
    """Supervised on the teacher's tokens: loss.kd_ce_coef x their mean negative log-likelihood."""
    return -cfg.kd_ce_coef * torch.where(inputs.mask_BT, inputs.logprobs_BT, inputs.zero).sum() / inputs.num_tokens


def kd_fkl_coef(cfg) -> float:
    return cfg.kd_fkl_coef


KD = register(Objective("kd", "off-policy KD on teacher samples: CE + top-k forward KL everywhere (Table 7)",
                        gate=every_position, policy_term=cross_entropy, fkl_coef=kd_fkl_coef,
                        trains_fkl=True, samples_from_teacher=True))
