"""Pass@k against brute-force subset enumeration; Avg@k; entropy fraction; answer grading."""

import itertools

import numpy as np
import pytest

from eopd_ray.evaluation import grade, grade_response, high_entropy_fraction, pass_at_k, summarize_correct


def brute_pass_at_k(outcomes, k):
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summarize_correct():
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    s = summarize_correct(correct, k=4)
    assert s["avg_at_k"] == pytest.approx(5 / 12)
    assert s["pass_at_k"] == pytest.approx(2 / 3)
    s1 = summarize_correct(correct, k=1)
    assert s1["pass_at_k"] == pytest.approx(s["avg_at_k"])  # Pass@1 estimator equals mean accuracy


def test_high_entropy_fraction():
    assert high_entropy_fraction([np.array([0.1, 1.0, 2.0]), np.array([0.99])], 1.0) == pytest.approx(0.5)
    assert high_entropy_fraction([], 1.0) == 0.0


def test_grade_response_dispatch():
    assert grade_response(r"... \boxed{12}.", "12") and grade(r"\boxed{12.0}", "12")
    assert not grade_response(r"\boxed{13}", "12")
    assert grade_response("3+4=7;7+5=12;#12", "12")  # the synthetic task's answer marker
    assert not grade_response("3+4=7;#7", "12")


# -- NaN entropies (vLLM gives no full-vocabulary entropy) ------------------------------------------------------

def test_high_entropy_fraction_drops_nan_entropies():
    nan = np.nan
    finite = [np.array([0.1, 1.0, 2.0]), np.array([0.99])]
    assert high_entropy_fraction([np.array([0.1, nan, 1.0, 2.0]), np.array([nan, 0.99])], 1.0) == \
        high_entropy_fraction(finite, 1.0) == pytest.approx(0.5)
    assert np.isnan(high_entropy_fraction([np.full(3, nan, np.float32), np.full(2, nan, np.float32)], 1.0))
    assert high_entropy_fraction([np.zeros(0, np.float32)], 1.0) == 0.0  # no tokens at all: unchanged


class _NaNEngine:
    """A rollout engine like vLLM's: sampled tokens and log-probs, NaN entropy."""

    def __init__(self, nan_entropy: bool = True):
        self.nan_entropy = nan_entropy

    def generate(self, prompt_ids, params):
        from actors.rollout.engine import Generation

        responses = [np.array([5, 6, 7][: 1 + i % 3], dtype=np.int64) for i in range(len(prompt_ids))]
        ent = [np.full(len(r), np.nan, np.float32) if self.nan_entropy
               else np.linspace(0.5, 1.5, len(r)).astype(np.float32) for r in responses]
        return Generation(responses, [np.full(len(r), -0.5, np.float32) for r in responses], ent)

    def load_model(self, path):
        pass


def _worker(engine):
    from actors.rollout.worker import RolloutWorker

    class _Tok:
        def batch_decode(self, rows, skip_special_tokens=True):
            return ["#1" for _ in rows]

    w = RolloutWorker.__new__(RolloutWorker)
    w.engine, w.tokenizer, w.vocab_size = engine, _Tok(), 8  # ids 5-7 are real tokens
    return w


def test_rollout_stats_and_evaluate_tolerate_nan_entropy():
    from actors.rollout.engine import SamplingParams

    params = SamplingParams(1.0, 1.0, 4, seed=0)
    prompts = [np.array([1, 2], dtype=np.int64)] * 4
    table, stats = _worker(_NaNEngine()).rollout([0, 1, 2, 3], prompts, ["1"] * 4, params)
    assert np.isnan(stats["rollout/entropy"]) and np.isnan(stats["rollout/high_entropy_fraction"])
    assert stats["rollout/tokens"] > 0 and stats["rollout/accuracy"] == 1.0
    ev = _worker(_NaNEngine()).evaluate(prompts[:2], ["1", "1"], 3, params)
    assert ev["num_tokens"] == 0 and ev["num_generated_tokens"] > 0 and sum(ev["entropy_hist"]) == 0
    assert np.isnan(ev["high_entropy_fraction"])
    # finite entropies: unchanged behaviour
    _, fin = _worker(_NaNEngine(nan_entropy=False)).rollout([0, 1, 2, 3], prompts, ["1"] * 4, params)
    ents = [np.linspace(0.5, 1.5, n).astype(np.float32) for n in (1, 2, 3, 1)]
    assert fin["rollout/entropy"] == pytest.approx(float(np.concatenate(ents).mean()))
    assert fin["rollout/high_entropy_fraction"] == pytest.approx(high_entropy_fraction(ents, 1.0))
    ev = _worker(_NaNEngine(nan_entropy=False)).evaluate(prompts[:2], ["1", "1"], 3, params)
    assert ev["num_tokens"] == ev["num_generated_tokens"] == sum(ev["entropy_hist"]) > 0


def test_eval_runner_combines_fractions_nan_safely():
    from actors.driver.evaluation import combine_fractions

    part = lambda f, n, g=None: {"high_entropy_fraction": f, "num_tokens": n,  # noqa: E731
                                 "num_generated_tokens": n if g is None else g}
    assert combine_fractions([part(0.5, 10), part(0.0, 30)]) == pytest.approx(0.125)  # token-weighted
    assert combine_fractions([part(0.5, 10), part(float("nan"), 0, 30)]) == pytest.approx(0.5)
    assert np.isnan(combine_fractions([part(float("nan"), 0, 12), part(float("nan"), 0, 30)]))
    assert combine_fractions([part(0.0, 0), part(0.0, 0)]) == 0.0  # nothing generated
    assert combine_fractions([{"high_entropy_fraction": 0.25, "num_tokens": 4}]) == 0.25  # older payloads


def test_metrics_and_results_are_strict_json(tmp_path):
    import json

    from eopd_ray.config import config_from_dict, load_config
    from eopd_ray.run_io import MetricsLog, json_safe, save_config, write_results

    nan, inf = float("nan"), float("inf")
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "rollout/entropy": nan, "loss/total": 0.25, "x": np.float32(inf)})
    log.append({"step": 2, "rollout/entropy": np.float64(nan), "loss/total": 0.125, "n": np.int64(3)})
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))  # noqa: E731
    lines = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "rollout/entropy": None, "loss/total": 0.25, "x": None}
    assert lines[1] == {"step": 2, "rollout/entropy": None, "loss/total": 0.125, "n": 3}
    resumed = MetricsLog(tmp_path / "metrics.jsonl", resume_step=1)  # truncates and rewrites
    assert len(resumed.rows) == 1 and np.isnan(resumed.rows[0]["rollout/entropy"])
    assert resumed.rows[0]["loss/total"] == 0.25
    assert [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == lines[:1]

    cfg = load_config(None, ["loss.tau=inf"])
    ev = {"student": {"avg_at_k": 0.5, "high_entropy_fraction": nan, "entropy_hist": np.zeros(3, np.int64)}}
    path = write_results(tmp_path, cfg, log.rows, ev)
    res = strict(path.read_text())
    assert res["eval"]["student"] == {"avg_at_k": 0.5, "high_entropy_fraction": None, "entropy_hist": [0, 0, 0]}
    assert res["train"]["metrics"][0]["rollout/entropy"] is None and res["train"]["metrics"][1]["n"] == 3
    assert res["config"]["loss"]["tau"] == "inf" and config_from_dict(res["config"]).loss.tau == inf
    save_config(cfg, tmp_path)
    assert config_from_dict(strict((tmp_path / "config.json").read_text())).loss.tau == inf
    assert json_safe({"a": [1.0, nan, (2, -inf)]}) == {"a": [1.0, None, [2, None]]}  # finite values unchanged
