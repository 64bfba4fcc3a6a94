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


def _nan_entropy_engine(model_dir: str, vocab_size: int):
    """The real transformers engine, its entropies replaced by NaN after sampling, as `VLLMEngine.generate`
    returns them (vLLM gives no full-vocabulary entropy): the cheap engine standing in for vLLM's output."""
    from actors.rollout.engine import Generation
    from actors.rollout.hf_engine import TransformersEngine

    class NaNEntropyEngine(TransformersEngine):
        def generate(self, prompt_ids, params):
            gen = super().generate(prompt_ids, params)
            return Generation(gen.response_ids, gen.logprobs, [np.full(len(e), np.nan, np.float32) for e in gen.entropy])

    return NaNEntropyEngine(model_dir, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def rollout_setup(tiny_models):
    """A real rollout worker on the tiny student and real task prompts (graded by the real tokenizer's text)."""
    from actors.rollout.engine import SamplingParams
    from actors.rollout.worker import RolloutWorker
    from eopd_ray.data import synthetic_rows, tokenize_rows
    from eopd_ray.models import load_tokenizer

    student = tiny_models[1]
    tok = load_tokenizer(student)
    recs = tokenize_rows(synthetic_rows(4, 5, "train"), tok, 64, "synthetic")
    worker = RolloutWorker(student, vocab_size=len(tok), num_threads=1)
    return dict(worker=worker, tok=tok, recs=recs, student=student,
                params=SamplingParams(1.0, 1.0, 16, seed=3))


def _rollout(worker, setup):
    recs = setup["recs"]
    return worker.rollout([r.id for r in recs], [r.prompt_ids for r in recs], [r.answer for r in recs],
                          setup["params"])


def test_rollout_stats_and_evaluate_tolerate_nan_entropy(rollout_setup):
    from actors.rollout.worker import ENTROPY_BINS, ENTROPY_MAX
    from eopd_ray.batch import list_rows

    setup, worker, tok, recs = rollout_setup, rollout_setup["worker"], rollout_setup["tok"], rollout_setup["recs"]
    # finite entropies (the transformers engine): the stats are the table's, the accuracy its texts' grades
    table, fin = _rollout(worker, setup)
    responses, ents = list_rows(table.column("response_ids")), list_rows(table.column("entropy"))
    texts = tok.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
    assert fin["rollout/tokens"] == sum(len(r) for r in responses) > 0
    assert fin["rollout/accuracy"] == pytest.approx(np.mean([grade_response(t, r.answer) for t, r in zip(texts, recs)]))
    assert fin["rollout/entropy"] == pytest.approx(float(np.concatenate(ents).mean()), rel=1e-6)
    assert np.isfinite(fin["rollout/entropy"]) and fin["rollout/entropy"] > 0
    assert fin["rollout/high_entropy_fraction"] == pytest.approx(high_entropy_fraction(ents, 1.0))
    prompts = [r.prompt_ids for r in recs[:2]]
    ev = worker.evaluate(prompts, [r.answer for r in recs[:2]], 3, setup["params"])
    assert ev["num_tokens"] == ev["num_generated_tokens"] == sum(ev["entropy_hist"]) > 0
    assert ev["correct"].shape == (2, 3) and len(ev["entropy_hist"]) == ENTROPY_BINS
    assert ev["entropy_edges"][-1] == ENTROPY_MAX

    # NaN entropies (vLLM): the same samples (same seed), so the same tokens and grades; entropy stats NaN
    worker.engine = _nan_entropy_engine(setup["student"], len(tok))
    nan_table, stats = _rollout(worker, setup)
    assert nan_table.column("response_ids").to_pylist() == table.column("response_ids").to_pylist()
    assert np.isnan(stats["rollout/entropy"]) and np.isnan(stats["rollout/high_entropy_fraction"])
    assert stats["rollout/tokens"] == fin["rollout/tokens"] and stats["rollout/accuracy"] == fin["rollout/accuracy"]
    nan_ev = worker.evaluate(prompts, [r.answer for r in recs[:2]], 3, setup["params"])
    assert nan_ev["num_tokens"] == 0 and sum(nan_ev["entropy_hist"]) == 0
    assert nan_ev["num_generated_tokens"] == ev["num_generated_tokens"]  # tokens were generated, none has an entropy
    assert np.isnan(nan_ev["high_entropy_fraction"])
    assert (nan_ev["correct"] == ev["correct"]).all()


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
