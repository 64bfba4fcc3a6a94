"""GRPO (the paper's RL baseline): group-normalised verifiable rewards as every token's advantage."""

from __future__ import annotations

import torch

from eopd_ray.objectives.registry import LossInputs, Objective, register


def group_normalized_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: (r - mean of its group) / (std of its group + eps), per response.

    rewards (N,) float; group_ids (N,) int, equal for responses to the same prompt. The std is the
    population std (ddof 0); a group whose rewards are all equal gets zero advantages.
    """
    rewards = rewards.to(torch.float64)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, rewards) / count
    var = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, (rewards - mean[inverse]) ** 2) / count
    return ((rewards - mean[inverse]) / (var.sqrt()[inverse] + eps)).to(torch.float32)


def sequence_advantages(inputs: LossInputs, cfg) -> torch.Tensor:
    return inputs.sequence_advantages_B[:, None].expand_as(inputs.old_BT)


GRPO = register(Objective("grpo", "GRPO: group-normalised rewards of 8 samples per prompt, no teacher",
                          advantages=sequence_advantages, samples_per_prompt=8, needs_rewards=True))
