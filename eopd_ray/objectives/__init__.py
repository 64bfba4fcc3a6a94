"""The objectives: a registry (`registry.py`), the shared core (`core.eopd_loss`) and one module per family of
built-in objectives (opd.py, fkl.py, grpo.py, kd.py), registered on import in that order."""

from eopd_ray.objectives import opd, fkl, grpo, kd  # noqa: F401,I001  (registers the built-ins, in this order)
from eopd_ray.objectives.core import eopd_loss, eopd_loss_from_hidden, objective_gate, resolve_logits_chunk
from eopd_ray.objectives.grpo import group_normalized_advantages
from eopd_ray.objectives.registry import LossInputs, Objective, get_objective, objective_names, register, unregister

__all__ = ["LossInputs", "Objective", "eopd_loss", "eopd_loss_from_hidden", "get_objective", "group_normalized_advantages",
           "objective_gate", "objective_names", "register", "resolve_logits_chunk", "unregister"]
