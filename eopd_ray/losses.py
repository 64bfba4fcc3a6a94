"""The public loss API in one import (paper eq. 6-11): the teacher statistics (`token_stats*`, `TokenStats`),
the per-token terms (`forward_kl_topk`, `clipped_surrogate`, `clipped_mask`), the objectives' shared core
`eopd_loss` (and `eopd_loss_from_hidden`, its chunked form) and GRPO's `group_normalized_advantages`. They live in `eopd_ray/stats.py` and
`eopd_ray/objectives/`; this module only gathers them (nothing in the library imports it)."""

from eopd_ray.objectives import eopd_loss, eopd_loss_from_hidden, group_normalized_advantages
from eopd_ray.objectives.terms import clipped_mask, clipped_surrogate, forward_kl_topk
from eopd_ray.stats import TokenStats, token_stats, token_stats_chunked, token_stats_from_hidden

__all__ = ["TokenStats", "clipped_mask", "clipped_surrogate", "eopd_loss", "eopd_loss_from_hidden", "forward_kl_topk",
           "group_normalized_advantages", "token_stats", "token_stats_chunked", "token_stats_from_hidden"]
