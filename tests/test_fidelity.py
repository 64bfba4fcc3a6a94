"""eopd_ray/fidelity.py: exact full-vocabulary KLs to the teacher and n-gram diversity, on tiny random models.

The references run one unpadded forward per sequence and sum over the vocabulary in Python float64 loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eopd_ray.fidelity import Samples, distinct_ngrams, diversity, entropy_R, fidelity, kl_R, response_logprobs

VOCAB = 90  # the shared real vocabulary: both models have padded rows past it (97 and 101)


def llama(seed: int, vocab: int = 97):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=vocab, tie_word_embeddings=True, initializer_range=0.2,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def qwen3(seed: int, vocab: int = 101):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, vocab_size=vocab, tie_word_embeddings=False,
                      initializer_range=0.2, max_position_embeddings=64)
    return Qwen3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models():
    """(model, teacher): different families and padded vocab sizes, in float64 so that a batched, padded forward
    and the unpadded references agree to ~1e-13 and the tolerances below can be tight (float32 differs by
    ~4e-6 from one sequence length to another: other matmul shapes; checked separately)."""
    return llama(0).double(), qwen3(1).double()


def sequences(prompt_lens, response_lens, seed):
    rng = np.random.default_rng(seed)
    return ([rng.integers(0, VOCAB, n).astype(np.int64) for n in prompt_lens],
            [rng.integers(0, VOCAB, n).astype(np.int64) for n in response_lens])


OWN = sequences([3, 7, 1, 5, 2, 6, 4], [4, 1, 6, 0, 3, 5, 2], seed=0)  # one empty response
TEACHER_SAMPLES = sequences([2, 5, 8, 1, 4], [5, 3, 1, 6, 2], seed=1)


@torch.no_grad()
def ref_logprobs(model, prompt, response, vocab=VOCAB):
    """(R, vocab) float64 log-probs from one unpadded forward of prompt + response."""
    ids = torch.as_tensor(np.concatenate([prompt, response]))[None]
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:len(prompt) + len(response) - 1]
    return torch.log_softmax(logits[:, :vocab].double(), dim=-1)


def test_response_logprobs_match_unpadded_forwards(models):
    for model in models:
        prompts, responses = OWN
        got = list(response_logprobs(model, prompts, responses, VOCAB, batch_size=3))
        assert len(got) == len(prompts)
        for lp, p, r in zip(got, prompts, responses):
            assert lp.dtype == torch.float64 and lp.shape == (len(r), VOCAB)
            torch.testing.assert_close(lp, ref_logprobs(model, p, r), atol=1e-10, rtol=0)
            # normalised over the first `vocab` ids only
            torch.testing.assert_close(lp.exp().sum(-1), torch.ones(len(r), dtype=torch.float64),
                                       atol=1e-12, rtol=0)
        # one batch holding every pair gives the same
        for a, b in zip(got, response_logprobs(model, prompts, responses, VOCAB, batch_size=16)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_response_logprobs_float32_model():
    """A float32 model: the log-softmax is still taken in float64, equal to the references to float32 rounding."""
    model = llama(0)
    prompts, responses = OWN
    for lp, p, r in zip(response_logprobs(model, prompts, responses, VOCAB, batch_size=3), prompts, responses):
        assert lp.dtype == torch.float64
        torch.testing.assert_close(lp, ref_logprobs(model, p, r), atol=2e-5, rtol=0)
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(len(r), dtype=torch.float64), atol=1e-12, rtol=0)


def test_response_logprobs_are_the_models_own_conditionals(models):
    """Not only self-consistent: a response position's log-probs are those of the next token after the prefix."""
    model = models[0]
    prompt, response = np.array([5, 8, 13]), np.array([21, 34, 55])
    (lp,) = response_logprobs(model, [prompt], [response], VOCAB)
    with torch.no_grad():
        for t in range(3):
            prefix = torch.as_tensor(np.concatenate([prompt, response[:t]]))[None]
            want = torch.log_softmax(model(input_ids=prefix).logits[0, -1, :VOCAB].double(), -1)
            torch.testing.assert_close(lp[t], want, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------- fidelity
def _lists(lp):
    return [[float(v) for v in row] for row in lp.tolist()]


def ref_fidelity(model, teacher, own, teacher_samples, tau, own_tp=None, teacher_tp=None):
    """Python loops over sequences, positions and the vocabulary, float64; token means over all responses.
    own_tp / teacher_tp: the prompts the teacher reads each sample after (None: the samples' own prompts)."""
    rkl, nll, ent = [], [], []
    for p, r, tp in zip(*own, own_tp or own[0]):
        lm, lt = _lists(ref_logprobs(model, p, r)), _lists(ref_logprobs(teacher, tp, r))
        for t in range(len(r)):
            rkl.append(sum(math.exp(a) * (a - b) for a, b in zip(lm[t], lt[t])))
            nll.append(-lt[t][int(r[t])])
            ent.append(-sum(math.exp(b) * b for b in lt[t]))
    fkl, t_ent = [], []
    for p, r, tp in zip(*teacher_samples, teacher_tp or teacher_samples[0]):
        lm, lt = _lists(ref_logprobs(model, p, r)), _lists(ref_logprobs(teacher, tp, r))
        for t in range(len(r)):
            fkl.append(sum(math.exp(b) * (b - a) for a, b in zip(lm[t], lt[t])))
            t_ent.append(-sum(math.exp(b) * b for b in lt[t]))
    gated = [f for f, e in zip(fkl, t_ent) if e >= tau]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"reverse_kl": mean(rkl), "teacher_nll": mean(nll), "teacher_entropy_on_samples": mean(ent),
            "forward_kl": mean(fkl), "forward_kl_high_entropy": mean(gated),
            "teacher_high_entropy_positions": len(gated), "per_position": (rkl, fkl, t_ent)}


@pytest.fixture(scope="module")
def reference(models):
    return ref_fidelity(*models, OWN, TEACHER_SAMPLES, tau=0.0)


def _close(got, want, tol=1e-10):
    return (got is None and want is None) or (got is not None and want is not None and abs(got - want) < tol)


def test_fidelity_equals_slow_reference(models, reference):
    model, teacher = models
    rkl, fkl, t_ent = reference["per_position"]
    assert min(rkl) > 0 and min(fkl) > 0  # two different models: every per-position KL is positive
    # tau between two teacher entropies: the gate selects some positions, not all
    ents = sorted(set(t_ent))
    tau = 0.5 * (ents[len(ents) // 2 - 1] + ents[len(ents) // 2])
    want = ref_fidelity(model, teacher, OWN, TEACHER_SAMPLES, tau)
    assert 0 < want["teacher_high_entropy_positions"] < len(fkl)
    got = fidelity(model, teacher, OWN, TEACHER_SAMPLES, VOCAB, tau, batch_size=3)
    for key in ("reverse_kl", "teacher_nll", "teacher_entropy_on_samples", "forward_kl", "forward_kl_high_entropy"):
        assert _close(got[key], want[key]), (key, got[key], want[key])
    assert got["teacher_high_entropy_positions"] == want["teacher_high_entropy_positions"]
    assert got["response_tokens"] == sum(len(r) for r in OWN[1]) == len(rkl)
    assert got["teacher_sample_tokens"] == sum(len(r) for r in TEACHER_SAMPLES[1]) == len(fkl)
    assert got["forward_kl_high_entropy"] != pytest.approx(got["forward_kl"], abs=1e-6)
    # the reverse and forward KLs are different quantities at these sizes
    assert abs(got["reverse_kl"] - got["forward_kl"]) > 1e-3


def test_fidelity_tau_gate_extremes(models, reference):
    got0 = fidelity(*models, OWN, TEACHER_SAMPLES, VOCAB, 0.0)
    assert got0["forward_kl_high_entropy"] == got0["forward_kl"]
    assert got0["teacher_high_entropy_positions"] == got0["teacher_sample_tokens"]
    assert _close(got0["forward_kl"], reference["forward_kl"])
    inf = fidelity(*models, OWN, TEACHER_SAMPLES, VOCAB, float("inf"))
    assert inf["forward_kl_high_entropy"] is None and inf["teacher_high_entropy_positions"] == 0
    assert _close(inf["forward_kl"], reference["forward_kl"])
    # no teacher samples: only the own-sample keys
    own_only = fidelity(*models, OWN, None, VOCAB, 0.0)
    assert set(own_only) == {"reverse_kl", "teacher_nll", "teacher_entropy_on_samples", "response_tokens"}
    assert _close(own_only["reverse_kl"], reference["reverse_kl"])


def test_fidelity_tau_gate_is_inclusive(models):
    """tau equal to a teacher entropy (the module's own value, bit for bit): that position is gated in (>=)."""
    model, teacher = models
    ents = torch.cat([entropy_R(lp) for lp in response_logprobs(teacher, *TEACHER_SAMPLES, VOCAB, batch_size=3)])
    tau = float(ents.sort().values[len(ents) // 2])
    got = fidelity(model, teacher, OWN, TEACHER_SAMPLES, VOCAB, tau, batch_size=3)
    assert got["teacher_high_entropy_positions"] == int((ents >= tau).sum()) == int((ents > tau).sum()) + 1


def test_fidelity_reads_the_teacher_after_its_own_prompts(models):
    """Samples with a teacher's context of its own (teacher.system_prompt / prompt_template): the teacher's
    log-probs follow the teacher's prompts, the model's its own, on both kinds of samples; a plain pair (or
    teacher prompts equal to the model's) gives exactly the default figures."""
    model, teacher = models
    own_tp = sequences([4, 2, 6, 3, 5, 1, 7], [0] * 7, seed=2)[0]  # other prompts, of other lengths
    teacher_tp = sequences([3, 6, 2, 5, 4], [0] * 5, seed=3)[0]
    want = ref_fidelity(model, teacher, OWN, TEACHER_SAMPLES, 0.0, own_tp, teacher_tp)
    got = fidelity(model, teacher, Samples(*OWN, own_tp), Samples(*TEACHER_SAMPLES, teacher_tp), VOCAB, 0.0,
                   batch_size=3)
    default = fidelity(model, teacher, OWN, TEACHER_SAMPLES, VOCAB, 0.0, batch_size=3)
    for key in ("reverse_kl", "teacher_nll", "teacher_entropy_on_samples", "forward_kl"):
        assert _close(got[key], want[key]), (key, got[key], want[key])
        assert abs(got[key] - default[key]) > 1e-3, key  # the context matters at these sizes
    assert fidelity(model, teacher, Samples(*OWN, OWN[0]), Samples(*TEACHER_SAMPLES, TEACHER_SAMPLES[0]), VOCAB,
                    0.0, batch_size=3) == default
    # the teacher against itself reads its samples after its own prompts on both sides: KLs exactly 0
    self_ = fidelity(teacher, teacher, Samples(*OWN, own_tp), Samples(*TEACHER_SAMPLES, teacher_tp), VOCAB, 0.0)
    assert self_["reverse_kl"] == 0.0 and abs(self_["forward_kl"]) < 1e-12
    assert _close(self_["teacher_nll"], want["teacher_nll"])


def test_fidelity_of_a_model_to_itself(models):
    for model in models:
        got = fidelity(model, model, OWN, TEACHER_SAMPLES, VOCAB, 0.0, batch_size=3)
        assert abs(got["reverse_kl"]) < 1e-12 and abs(got["forward_kl"]) < 1e-12
        assert abs(got["forward_kl_high_entropy"]) < 1e-12
        # with the model as its own teacher, its NLL and entropy are still the real (positive) ones
        assert got["teacher_nll"] > 1.0 and got["teacher_entropy_on_samples"] > 1.0


def test_kl_and_entropy_helpers():
    torch.manual_seed(0)
    a = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64) * 3, -1)
    b = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64) * 3, -1)
    # a distribution with exact zeros: 0 * log 0 counts as 0, not NaN
    z = torch.log_softmax(torch.tensor([[0.0, 1.0, -math.inf, 2.0, -math.inf, 0.5, 0.0]], dtype=torch.float64), -1)
    for x, y in [(a, b), (b, a), (z, b[:1])]:
        want = [sum(math.exp(u) * (u - v) for u, v in zip(xr, yr) if u > -math.inf)
                for xr, yr in zip(x.tolist(), y.tolist())]
        got = kl_R(x, y)
        assert torch.isfinite(got).all() and (got >= 0).all()
        assert max(abs(g - w) for g, w in zip(got.tolist(), want)) < 1e-12
    assert (kl_R(a, a).abs() < 1e-15).all()
    for x in (a, z):
        want = [-sum(math.exp(u) * u for u in row if u > -math.inf) for row in x.tolist()]
        assert max(abs(g - w) for g, w in zip(entropy_R(x).tolist(), want)) < 1e-12
    uniform = torch.full((2, 7), -math.log(7), dtype=torch.float64)
    torch.testing.assert_close(entropy_R(uniform), torch.full((2,), math.log(7), dtype=torch.float64))


# ----------------------------------------------------------------------------------- diversity
def test_distinct_ngrams():
    assert distinct_ngrams([[1, 2, 3], [4, 5, 6]]) == 1.0
    assert distinct_ngrams([[1, 2, 3], [1, 2, 3]]) == 0.5  # identical samples: 2 distinct of 4
    assert distinct_ngrams([[7, 7, 7, 7]]) == pytest.approx(1 / 3)  # one token repeated
    assert distinct_ngrams([[1, 2, 1, 2]]) == pytest.approx(2 / 3)  # repeats within a sample count
    assert distinct_ngrams([[1, 2], [1, 2, 3]]) == pytest.approx(2 / 3)  # and across samples
    assert distinct_ngrams([[1, 2], [2, 1]]) == 1.0  # order matters
    assert distinct_ngrams([[1, 2, 3], [3, 2, 1]], n=1) == 0.5
    assert distinct_ngrams([[1, 2, 3], [2, 3, 4]], n=3) == 1.0
    assert distinct_ngrams([[1, 2, 3], [1, 2, 3, 4]], n=3) == pytest.approx(2 / 3)
    assert distinct_ngrams([[1], [2], []]) is None  # too short for a bigram
    assert distinct_ngrams([]) is None
    assert distinct_ngrams([[1, 2]], n=3) is None
    assert distinct_ngrams([np.array([1, 2, 3]), np.array([1, 2, 3])]) == 0.5  # numpy ids as ints


def test_diversity():
    assert diversity([[[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [1, 2, 3]]]) == pytest.approx(0.75)
    # a prompt with no bigram is left out of the mean, not counted as 0
    assert diversity([[[1, 2, 1, 2]], [[1], [2]]]) == pytest.approx(2 / 3)
    assert diversity([[[1], [2]], [[]]]) is None
    assert diversity([]) is None
    assert diversity([[np.array([9, 9, 9])]], n=1) == pytest.approx(1 / 3)


def test_cross_fidelity_against_per_sample_loops(models):
    """Over whole responses, per teacher token: the teacher reads other ids (its own tokenisation, other
    lengths) of a vocabulary of its own; each sum is checked against one unpadded forward per sequence."""
    from eopd_ray.fidelity import cross_fidelity

    model, teacher = models
    prompts, responses = OWN
    t_vocab = 95  # the teacher's own real vocabulary (its 101 rows are padded past it)
    rng = np.random.default_rng(2)
    t_prompts = [rng.integers(0, t_vocab, len(p) + 1).astype(np.int64) for p in prompts]
    t_responses = [rng.integers(0, t_vocab, max(0, len(r) + int(rng.integers(-1, 3)))).astype(np.int64)
                   for r in responses]
    got = cross_fidelity(model, teacher, Samples(prompts, responses, t_prompts), t_responses, VOCAB, t_vocab,
                         batch_size=3)
    d, n, nll = [], [], 0.0
    for p, r, tp, tr in zip(prompts, responses, t_prompts, t_responses):
        lp_m = float(sum(ref_logprobs(model, p, r)[i, int(x)] for i, x in enumerate(r)))
        lp_t = float(sum(ref_logprobs(teacher, tp, tr, t_vocab)[i, int(x)] for i, x in enumerate(tr)))
        d.append(lp_m - lp_t)
        n.append(len(tr))
        nll -= lp_t
    tokens = sum(n)
    rkl = sum(d) / tokens
    resid_var = sum((di - rkl * ni) ** 2 for di, ni in zip(d, n)) / (len(d) - 1)
    stderr = math.sqrt(resid_var / len(d)) / (tokens / len(d))  # delta method for a ratio of means
    assert got["estimator"] == "sequence" and got["teacher_tokens"] == tokens
    assert got["response_tokens"] == sum(len(r) for r in responses)
    assert got["reverse_kl"] == pytest.approx(rkl, abs=1e-9)
    assert got["teacher_nll"] == pytest.approx(nll / tokens, abs=1e-9)
    assert got["reverse_kl_stderr"] == pytest.approx(stderr, rel=1e-9)
    # the model against itself, in the same tokens: exactly 0
    same = cross_fidelity(model, model, Samples(prompts, responses), responses, VOCAB, VOCAB)
    assert same["reverse_kl"] == 0.0 and same["reverse_kl_stderr"] == 0.0
