"""The rollout engine contract: what every backend (transformers in `actors/rollout/hf_engine.py`,
vLLM in `actors/rollout/vllm_engine.py`) takes and returns, and the hooks the weight sync calls on it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 40
    seed: int = 0


@dataclass
class Generation:
    """Per prompt: sampled ids (T_i,) up to and including EOS, their behaviour log-probs (T_i,) under the
    sampling temperature, and the sampler's full-vocabulary entropy (T_i,)."""

    response_ids: list[np.ndarray]
    logprobs: list[np.ndarray]
    entropy: list[np.ndarray]


def cut_at_padded_ids(gen: Generation, vocab_size: int) -> tuple[Generation, int]:
    """End each response before its first id >= vocab_size; returns (generation, number of responses cut).

    Such ids are padded output rows, not tokens (Qwen: 151,669 tokens, 151,936 rows). vLLM samples over every
    row and, once a policy drifts, does emit them (vllm-project/vllm#13175, verl-project/verl#1398); the
    teacher and the student score only real ids, so a padded id would index past their vocabulary. The kept
    prefix and its behaviour log-probs are unchanged; the response just has no EOS, like one cut by length."""
    ends = [int(np.argmax(ids >= vocab_size)) if (ids >= vocab_size).any() else len(ids) for ids in gen.response_ids]
    cut = sum(n < len(ids) for n, ids in zip(ends, gen.response_ids))
    if not cut:
        return gen, 0
    return Generation(*([x[:n] for x, n in zip(xs, ends)] for xs in (gen.response_ids, gen.logprobs, gen.entropy))), cut


class EngineUnusableError(RuntimeError):
    """A weight update into this engine failed part-way: it may hold a mix of old and new weights, so it
    refuses to generate or score until it is rebuilt (replace the worker)."""


class RolloutEngine(ABC):
    """Samples from pi_old and takes new weights. Every sync path calls the same hooks: the object-store
    sync `load_weights(state)`; the broadcast `weight_mismatches` (before any bucket moves), `init_weight_group`,
    then per sync `weight_sync_begin`, `receive_weights` (or `receive_ipc_bucket` per bucket when colocated)
    and `weight_sync_end`; the post-sync check `score_tokens`."""

    @abstractmethod
    def generate(self, prompt_ids: list[np.ndarray], params: SamplingParams) -> Generation: ...

    @abstractmethod
    def score_tokens(self, prompt_ids: list[np.ndarray], response_ids: list[np.ndarray]) -> list[np.ndarray]:
        """Teacher-forced log p(response_t | prompt, response_<t) under the current weights, (T_i,) per row."""

    @abstractmethod
    def load_weights(self, state: dict[str, np.ndarray]) -> None:
        """Replace the policy weights in place (the object-store sync target)."""

    @abstractmethod
    def load_model(self, path: str) -> None:
        """Load another model from disk (evaluation of a checkpoint, the teacher, ...)."""

    def weight_mismatches(self, metas: list) -> list[str]:
        """Parameters the engine cannot take from the student's (name, shape) list; [] if all fit."""
        return []

    def init_weight_group(self, addr: str, port: int, rank_offset: int, world_size: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} takes no bucketed broadcast")

    def weight_sync_begin(self) -> None:
        pass

    def receive_weights(self, metas: list, bucket_bytes: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} takes no bucketed broadcast")

    def weight_sync_end(self) -> None:
        pass
