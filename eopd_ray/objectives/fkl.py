"""OPD plus the forward KL over the teacher's top-k (eq. 10) at some positions: EOPD's gate (teacher entropy
above tau, eq. 9) and the two baselines that place it everywhere or at random positions."""

from __future__ import annotations

import torch

from eopd_ray.objectives.registry import LossInputs, Objective, register


def entropy_gate(inputs: LossInputs, cfg) -> torch.Tensor:
    """Eq. 9: where the teacher's full-vocabulary entropy exceeds loss.tau."""
    return inputs.mask_BT & (inputs.teacher_entropy_BT > cfg.tau)


def every_position(inputs: LossInputs, cfg) -> torch.Tensor:
    return inputs.mask_BT


def random_positions(inputs: LossInputs, cfg) -> torch.Tensor:
    """A random loss.random_fraction of the positions, drawn from the caller's generator."""
    gen = inputs.generator
    draw = torch.rand(inputs.mask_BT.shape, generator=gen, device=gen.device)
    return inputs.mask_BT & (draw.to(inputs.mask_BT.device) < cfg.random_fraction)


EOPD = register(Objective("eopd", "OPD + top-k forward KL where the teacher's entropy > loss.tau (eq. 9)",
                          gate=entropy_gate, trains_fkl=True))
FULL_FKL = register(Objective("full_fkl", "OPD + top-k forward KL at every position", gate=every_position,
                              trains_fkl=True))
RANDOM_FKL = register(Objective("random_fkl", "OPD + top-k forward KL at a random loss.random_fraction of positions",
                                gate=random_positions, trains_fkl=True))
