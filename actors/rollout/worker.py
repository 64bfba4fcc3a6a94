"""Rollout workers: sample responses from pi_old and return them, with behaviour log-probs, as Arrow.

`RolloutWorker` is a plain class (testable without Ray) that owns one engine (`actors/rollout/engine.py` is
the contract; transformers in `hf_engine.py`, vLLM in `vllm_engine.py`), formats the Arrow payload and grades
responses; `actors.rollout.actor.RolloutActor` is its Ray shell.
"""

from __future__ import annotations

import time

import numpy as np

from actors.rollout.engine import RolloutEngine, SamplingParams, cut_at_padded_ids
from actors.rollout.hf_engine import TransformersEngine
from actors.runtime.faults import maybe_fail
from eopd_ray.batch import make_rollout_table
from eopd_ray.evaluation import finite_entropies, grade_response, high_entropy_fraction
from eopd_ray.models import load_tokenizer, set_threads


ENTROPY_BINS, ENTROPY_MAX = 40, 4.0  # histogram of generated-token entropies (nats)


def _mean_entropy(entropies: list[np.ndarray]) -> float:
    """Mean over tokens with a finite entropy; NaN if there are tokens but none has one, 0.0 if no tokens."""
    finite, total = finite_entropies(entropies)
    if finite.size:
        return float(finite.mean())
    return float("nan") if total else 0.0


class RolloutWorker:
    """One rollout engine plus payload formatting and grading; runs with or without Ray."""

    def __init__(self, model_path: str, engine: str = "transformers", dtype: str = "float32",
                 trust_remote_code: bool = False, vocab_size: int | None = None, num_threads: int | None = None,
                 engine_kwargs: dict | None = None):
        set_threads(num_threads)
        if engine == "transformers":
            self.engine: RolloutEngine = TransformersEngine(model_path, dtype, trust_remote_code, vocab_size)
        elif engine == "vllm":
            from actors.rollout.vllm_engine import VLLMEngine  # imported only here: vLLM is optional

            self.engine = VLLMEngine(model_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                     vocab_size=vocab_size, **(engine_kwargs or {}))
        else:
            raise ValueError(f"rollout.engine={engine!r} is invalid: allowed transformers or vllm")
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.vocab_size = vocab_size or len(self.tokenizer)

    def ping(self) -> bool:
        return True

    def rollout(self, sample_ids, prompt_ids, answers, params: SamplingParams, n: int = 1, teacher_prompt_ids=None,
                from_teacher_prompt: bool = False):
        """Sample n responses per prompt (rows of one prompt are adjacent and share its sample_id).
        teacher_prompt_ids: per prompt, the teacher's own prompt (None where it is the student's), carried in
        the table for the teacher. from_teacher_prompt: the engine holds the teacher (off-policy KD), so it
        samples after the teacher's prompt where there is one; the table's prompt_ids stay the student's, the
        context the student trains on those responses in. Returns (Arrow table of ROLLOUT_SCHEMA, small stats
        dict)."""
        maybe_fail("rollout")
        t0 = time.perf_counter()
        teacher_prompt_ids = teacher_prompt_ids or [None] * len(sample_ids)
        if n > 1:
            sample_ids, prompt_ids, answers, teacher_prompt_ids = (
                [x for x in xs for _ in range(n)] for xs in (sample_ids, prompt_ids, answers, teacher_prompt_ids))
        source = [t if from_teacher_prompt and t is not None and len(t) else p
                  for p, t in zip(prompt_ids, teacher_prompt_ids)]
        gen, cut = cut_at_padded_ids(self.engine.generate(source, params), self.vocab_size)
        texts = self.tokenizer.batch_decode([r.tolist() for r in gen.response_ids], skip_special_tokens=True)
        correct = [grade_response(t, a) for t, a in zip(texts, answers)]
        table = make_rollout_table(sample_ids, prompt_ids, gen.response_ids, gen.logprobs, gen.entropy, correct,
                                   teacher_prompt_ids)
        lengths = [len(r) for r in gen.response_ids]
        stats = {
            "rollout/accuracy": float(np.mean(correct)) if correct else 0.0,
            "rollout/response_length": float(np.mean(lengths)) if lengths else 0.0,
            "rollout/tokens": int(sum(lengths)),
            # NaN, not 0.0, when the engine gives no entropy (vLLM): nan-aware, over finite entropies only
            "rollout/entropy": _mean_entropy(gen.entropy),
            "rollout/high_entropy_fraction": high_entropy_fraction(gen.entropy, 1.0),
            # share of responses ended before an id beyond the tokenizer (vLLM on padded vocabularies)
            "rollout/cut_at_padded_id": cut / len(lengths) if lengths else 0.0,
            "time/generate": time.perf_counter() - t0,
        }
        return table, stats

    def evaluate(self, prompt_ids, answers, k: int, params: SamplingParams, threshold: float = 1.0,
                 model_path: str | None = None) -> dict:
        """k samples per prompt; returns per-problem correctness (P, k), the generated-token entropies
        summarised as a high-entropy fraction and a histogram (paper Fig. 3), and every sample (P x k texts,
        token counts and ids, prompt-major)."""
        maybe_fail("rollout_eval")
        if model_path:
            self.engine.load_model(model_path)
        repeated = [p for p in prompt_ids for _ in range(k)]
        gen, _ = cut_at_padded_ids(self.engine.generate(repeated, params), self.vocab_size)
        texts = self.tokenizer.batch_decode([r.tolist() for r in gen.response_ids], skip_special_tokens=True)
        correct = np.array([grade_response(t, a) for t, a in zip(texts, [a for a in answers for _ in range(k)])])
        ent, generated = finite_entropies(gen.entropy)  # NaN entropies (vLLM) are not counted
        hist, edges = np.histogram(ent, bins=ENTROPY_BINS, range=(0.0, ENTROPY_MAX))
        return {"correct": correct.reshape(len(prompt_ids), k), "num_tokens": int(ent.size),
                "num_generated_tokens": generated,
                "high_entropy_fraction": high_entropy_fraction(gen.entropy, threshold),
                "entropy_hist": hist.tolist(), "entropy_edges": edges.tolist(),
                "texts": texts, "lengths": [len(r) for r in gen.response_ids],
                # the sampled ids themselves, for fidelity to the teacher (eopd_ray/fidelity.py)
                "response_ids": [np.asarray(r, dtype=np.int32) for r in gen.response_ids]}

    def update_weights(self, state: dict[str, np.ndarray]) -> float:
        t0 = time.perf_counter()
        self.engine.load_weights(state)
        return time.perf_counter() - t0

    def load_model(self, path: str) -> None:
        self.engine.load_model(path)
