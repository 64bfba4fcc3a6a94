"""The teacher's own context (teacher.prompt_template / system_prompt / eos_remap) and the alignment check.

A "chat teacher" is the tiny teacher with its `<eos>` and `<unk>` rows exchanged in the (tied) embedding and
output head, and `<unk>` as its tokenizer's EOS: a teacher that ends its turn with another token, as an
instruct teacher ends with `<|im_end|>` where a Base student ends with `<|endoftext|>`. Read through the remap
`<eos> -> <unk>` it is exactly the original teacher, so the remap's effect can be checked to rounding.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.rollout.engine import SamplingParams
from actors.rollout.worker import RolloutWorker
from actors.teacher.scorer import TeacherScorer
from eopd_ray.batch import list_rows, make_rollout_table, make_teacher_table
from eopd_ray.config import ConfigError, load_config
from eopd_ray.models import load_tokenizer
from eopd_ray.run_setup import load_data
from eopd_ray.teacher_context import (alignment_report, alignment_warning, first_difference, resolve_end_swap,
                                      swap_ids, teacher_prompts)

K = 8
# the tiny tokenizer's template with a marker the student's lacks: the two renderings differ at token 1
TEACHER_TEMPLATE = ("{{ bos_token }}#{% for message in messages %}{% if message['role'] == 'assistant' %}"
                    "{{ message['content'] + eos_token }}{% else %}{{ message['content'] }}{% endif %}{% endfor %}")


def make_chat_teacher(teacher_dir, dst, template: str | None = None):
    """A copy of the teacher that ends its turn with `<unk>` (rows exchanged), optionally with another template."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(teacher_dir)
    eos, unk = tok.eos_token_id, tok.convert_tokens_to_ids("<unk>")
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        for weight in {id(p): p for p in (model.get_input_embeddings().weight,
                                          model.get_output_embeddings().weight)}.values():
            weight[[eos, unk]] = weight[[unk, eos]].clone()
    model.save_pretrained(dst)
    tok.eos_token = "<unk>"
    if template:
        tok.chat_template = template
    tok.save_pretrained(dst)
    return str(dst)


@pytest.fixture(scope="module")
def ctx(tiny_models, tmp_path_factory):
    teacher, student = tiny_models
    root = tmp_path_factory.mktemp("teacher-context")
    chat = make_chat_teacher(teacher, root / "chat")
    tok = load_tokenizer(student)
    cfg = load_config(None, ["data.num_train_problems=16", "trainer.batch_size=8", "trainer.mini_batch_size=4"])
    sampler, _ = load_data(cfg, tok)
    recs = sampler.records
    worker = RolloutWorker(teacher, vocab_size=len(tok), num_threads=2)  # the teacher's own samples end often
    table, _ = worker.rollout([r.id for r in recs], [r.prompt_ids for r in recs], [r.answer for r in recs],
                              SamplingParams(1.0, 1.0, 24, seed=1))
    return dict(teacher=teacher, student=student, chat=chat, tok=tok, recs=recs, table=table, root=root,
                eos=tok.eos_token_id, unk=tok.convert_tokens_to_ids("<unk>"))


def _score(path, ctx, table=None, end_swap=None) -> pa.Table:
    scorer = TeacherScorer(path, K, len(ctx["tok"]), ctx["tok"].pad_token_id, num_threads=2, end_swap=end_swap)
    return scorer.score(ctx["table"] if table is None else table)[0]


def _columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {c: np.concatenate(list_rows(table.column(c))) for c in table.column_names if c != "sample_id"}


def test_swap_ids_exchanges_two_ids_and_is_its_own_inverse():
    ids = np.array([[5, 2, 3], [2, 9, 5]], dtype=np.int32)
    out = swap_ids(ids, (2, 5))
    assert out.tolist() == [[2, 5, 3], [5, 9, 2]] and ids.tolist() == [[5, 2, 3], [2, 9, 5]]
    assert np.array_equal(swap_ids(out, (2, 5)), ids)
    assert swap_ids(ids, None) is ids


def test_end_swap_resolution_and_bad_values(ctx):
    tok, chat_tok = ctx["tok"], load_tokenizer(ctx["chat"])
    assert resolve_end_swap("", tok, chat_tok) is None
    assert resolve_end_swap("auto", tok, chat_tok) == (ctx["eos"], ctx["unk"])
    assert resolve_end_swap("auto", tok, tok) is None  # one EOS on both sides: nothing to exchange
    assert resolve_end_swap("<eos> -> <unk>", tok, chat_tok) == (ctx["eos"], ctx["unk"])
    with pytest.raises(ConfigError, match=r"'<end>' is not a token of the student's tokenizer"):
        resolve_end_swap("<end>-><unk>", tok, chat_tok)
    with pytest.raises(ConfigError, match="both sides are one token"):
        resolve_end_swap("<eos>-><eos>", tok, chat_tok)
    for bad in ("teacher.eos_remap=<eos>", "teacher.prompt_template=chat", "teacher.alignment_rows=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(None, [bad])


def test_remap_turns_the_chat_teacher_back_into_the_original_exactly(ctx):
    original = _columns(_score(ctx["teacher"], ctx))
    remapped = _columns(_score(ctx["chat"], ctx, end_swap=(ctx["eos"], ctx["unk"])))
    plain = _columns(_score(ctx["chat"], ctx))
    assert np.array_equal(remapped["topk_ids"], original["topk_ids"])  # pulled back into the student's ids
    for key in ("teacher_logprobs", "teacher_entropy", "topk_logprobs"):
        np.testing.assert_allclose(remapped[key], original[key], atol=2e-6, rtol=0)
    # without the remap the chat teacher reads the end token as a token it never ends with
    ends = np.array([len(r) and r[-1] == ctx["eos"] for r in list_rows(ctx["table"].column("response_ids"))])
    assert ends.sum() >= 4
    last = np.cumsum([len(r) for r in list_rows(ctx["table"].column("response_ids"))]) - 1
    assert np.all(plain["teacher_logprobs"][last[ends]] < original["teacher_logprobs"][last[ends]] - 1.0)
    # everywhere else the chat teacher differs from the original only where <eos>/<unk> are involved
    not_last = np.setdiff1d(np.arange(len(original["teacher_logprobs"])), last[ends])
    np.testing.assert_allclose(plain["teacher_logprobs"][not_last], original["teacher_logprobs"][not_last], atol=2e-6)


def _report_reference(rollout, teacher, end_id, other_id):
    """Row-by-row loops over Python lists: the alignment numbers computed independently."""
    resp = rollout.column("response_ids").to_pylist()
    lps = teacher.column("teacher_logprobs").to_pylist()
    ids, tlp = teacher.column("topk_ids").to_pylist(), teacher.column("topk_logprobs").to_pylist()
    tokens = [x for row in lps for x in row]
    final, other = [], []
    for r, lp, i, t in zip(resp, lps, ids, tlp):
        if r and r[-1] == end_id:
            final.append(lp[-1])
            row_ids, row_lp = i[-K:], t[-K:]
            other.append(row_lp[row_ids.index(other_id)] if other_id in row_ids else min(row_lp))
    return sum(tokens) / len(tokens), sum(final) / len(final), sum(other) / len(other), len(final) / len(resp)


def test_alignment_report_against_loops_and_the_warning(ctx):
    table = ctx["table"]
    for scored, remapped in ((_score(ctx["chat"], ctx), False),
                             (_score(ctx["chat"], ctx, end_swap=(ctx["eos"], ctx["unk"])), True)):
        report = alignment_report(table, scored, ctx["eos"], ctx["unk"], K)
        mean, final, other, ended = _report_reference(table, scored, ctx["eos"], ctx["unk"])
        assert report["align/teacher_logprob_mean"] == pytest.approx(mean, abs=1e-9)
        assert report["align/final_logprob"] == pytest.approx(final, abs=1e-9)
        assert report["align/other_end_logprob"] == pytest.approx(other, abs=1e-9)
        assert report["align/ended_fraction"] == pytest.approx(ended) and report["align/rows"] == table.num_rows
        assert report["align/prompt_diff_position"] == -1
        if remapped:
            assert report["align/final_logprob"] > report["align/other_end_logprob"]
            assert alignment_warning(report, "<eos>", "<unk>", remapped=True) is None
    # the warning fires at a gap of END_GAP_NATS and names both tokens, the numbers and the fix
    report = {"align/final_logprob": -9.5, "align/other_end_logprob": -0.25, "align/ended_fraction": 0.75}
    text = alignment_warning(report, "<|endoftext|>", "<|im_end|>", remapped=False)
    assert "-9.50" in text and "-0.25" in text and "75%" in text
    assert "teacher.eos_remap='<|endoftext|>-><|im_end|>'" in text
    assert alignment_warning({**report, "align/final_logprob": -2.0}, "a", "b", remapped=False) is None
    assert alignment_warning({**report, "align/other_end_logprob": float("nan")}, "a", "b", False) is None


def test_system_prompt_changes_the_teachers_scores_not_the_students_prompt(ctx):
    tok = ctx["tok"]
    base = ["data.num_train_problems=16", "trainer.batch_size=8", "trainer.mini_batch_size=4"]
    plain = load_data(load_config(None, base), tok)[0].records
    system = load_data(load_config(None, base + ["teacher.system_prompt=note;"]), tok)[0].records
    note = tok("note;", add_special_tokens=False)["input_ids"]
    for p, s in zip(plain, system):
        assert np.array_equal(p.prompt_ids, s.prompt_ids) and p.teacher_prompt_ids is None
        # the tiny template renders a system message's text right after <bos>, before the question
        assert s.teacher_prompt_ids.tolist() == [p.prompt_ids[0], *note, *p.prompt_ids[1:].tolist()]
        assert first_difference(s.prompt_ids, s.teacher_prompt_ids) == 1
    t = ctx["table"]
    rows = {r.id: r.teacher_prompt_ids for r in system}
    cols = [t.column(c).to_pylist() for c in ("sample_id", "prompt_ids", "response_ids", "logprobs", "entropy")]
    with_system = make_rollout_table(*[[np.asarray(x) for x in c] for c in cols], t.column("correct").to_pylist(),
                                     [rows[i] for i in cols[0]])
    scored = _columns(_score(ctx["teacher"], ctx, with_system))
    # the same as scoring the teacher's prompt given as the prompt itself: the column is what the teacher reads
    direct = make_rollout_table(*[[np.asarray(x) for x in c] for c in ([cols[0], [rows[i] for i in cols[0]]]
                                                                        + cols[2:])], t.column("correct").to_pylist())
    np.testing.assert_array_equal(scored["teacher_logprobs"], _columns(_score(ctx["teacher"], ctx, direct))["teacher_logprobs"])
    unchanged = _columns(_score(ctx["teacher"], ctx))
    assert np.abs(scored["teacher_logprobs"] - unchanged["teacher_logprobs"]).max() > 1e-2
    assert list_rows(with_system.column("response_ids"))[0].tolist() == cols[2][0]
    report = alignment_report(with_system, _score(ctx["teacher"], ctx, with_system), ctx["eos"], ctx["eos"], K)
    assert report["align/prompt_diff_position"] == 1


def test_teacher_template_renders_the_teachers_prompt(ctx, capsys):
    chat_tok = load_tokenizer(make_chat_teacher(ctx["teacher"], ctx["root"] / "templated", TEACHER_TEMPLATE))
    base = ["data.num_train_problems=16", "trainer.batch_size=8", "trainer.mini_batch_size=4"]
    recs = load_data(load_config(None, base + ["teacher.prompt_template=teacher"]), ctx["tok"], chat_tok)[0].records
    hash_id = ctx["tok"].convert_tokens_to_ids("#")
    for r in recs:
        assert r.teacher_prompt_ids.tolist() == [r.prompt_ids[0], hash_id, *r.prompt_ids[1:].tolist()]
    assert "differs from the student's from token 1 on" in capsys.readouterr().out
    # the student's template for the teacher: nothing to carry
    same = load_data(load_config(None, base), ctx["tok"], chat_tok)[0].records
    assert all(r.teacher_prompt_ids is None for r in same)


def test_rollout_worker_carries_the_teachers_prompt_per_sample(ctx):
    recs = ctx["recs"][:3]
    teacher_ids = [None, np.array([1, 7, 7], np.int32), None]
    worker = RolloutWorker(ctx["student"], vocab_size=len(ctx["tok"]), num_threads=2)
    table, _ = worker.rollout([r.id for r in recs], [r.prompt_ids for r in recs], [r.answer for r in recs],
                              SamplingParams(1.0, 1.0, 4, seed=2), 2, teacher_ids)
    assert [len(x) for x in table.column("teacher_prompt_ids").to_pylist()] == [0, 0, 3, 3, 0, 0]
    assert table.column("teacher_prompt_ids").to_pylist()[2] == [1, 7, 7]


def test_empty_teacher_table_rows_do_not_break_the_report():
    rollout = make_rollout_table([0], [np.array([1], np.int32)], [np.zeros(0, np.int32)], [np.zeros(0)],
                                 [np.zeros(0)], [False])
    teacher = make_teacher_table([0], [np.zeros(0)], [np.zeros(0)], [np.zeros((0, K))], [np.zeros((0, K))])
    report = alignment_report(rollout, teacher, 2, 3, K)
    assert report["align/ended_fraction"] == 0 and np.isnan(report["align/final_logprob"])
    assert np.isnan(report["align/teacher_logprob_mean"])


# ---- the teacher's context beyond scoring: kd's samples, the final evaluation and its fidelity ----------------

SYSTEM = ["data.num_train_problems=16", "trainer.batch_size=8", "trainer.mini_batch_size=4",
          "data.num_eval_problems=3", "eval.k=2", "teacher.system_prompt=note;"]


def _with_note(tok, prompt_ids) -> list[int]:
    """The tiny template's rendering of a system message: its text right after <bos>, before the question."""
    return [int(prompt_ids[0]), *tok("note;", add_special_tokens=False)["input_ids"], *prompt_ids[1:].tolist()]


def test_held_out_records_carry_the_teachers_prompt_too(ctx):
    tok = ctx["tok"]
    suffix = ["data.eval_prompt_suffix= end"]  # the held-out suffix is in both renderings
    _, held = load_data(load_config(None, SYSTEM + suffix), tok)
    _, plain = load_data(load_config(None, SYSTEM[:-1] + suffix), tok)
    assert len(held) == 3 and all(r.teacher_prompt_ids is None for r in plain)
    for h, p in zip(held, plain):
        assert np.array_equal(h.prompt_ids, p.prompt_ids)  # the student's prompt is unchanged
        assert h.teacher_prompt_ids.tolist() == _with_note(tok, p.prompt_ids)
    assert [x.tolist() for x in teacher_prompts(held)] == [_with_note(tok, p.prompt_ids) for p in plain]
    assert all(a is r.prompt_ids for a, r in zip(teacher_prompts(plain), plain))  # defaults: the same arrays


def test_a_teachers_prompt_over_the_limit_is_refused_naming_the_row(ctx):
    from eopd_ray.data import DataError

    tok = ctx["tok"]
    longest = max(len(r.prompt_ids) for r in load_data(load_config(None, SYSTEM[:-1]), tok)[0].records)
    # the student's prompts fit exactly; the teacher's, a system message longer, do not
    limit = [f"data.max_prompt_tokens={longest}"]
    load_data(load_config(None, SYSTEM[:-1] + limit), tok)
    with pytest.raises(DataError, match=rf"over data.max_prompt_tokens={longest}; raise") as err:
        load_data(load_config(None, SYSTEM + limit), tok)
    m = re.match(r"row id (\d+): the teacher's prompt has (\d+) tokens \((\d+) as the student reads it", str(err.value))
    n_note = len(tok("note;", add_special_tokens=False)["input_ids"])
    assert m and int(m[2]) == int(m[3]) + n_note > longest, str(err.value)


def test_kd_rollouts_are_sampled_from_the_teachers_prompt(ctx):
    """Off-policy KD's workers hold the teacher: it samples after its own prompt, the table keeps the student's
    prompt (what the student trains after) and the teacher's (what the scorer reads)."""
    recs = load_data(load_config(None, SYSTEM), ctx["tok"])[0].records[:3]
    worker = RolloutWorker(ctx["teacher"], vocab_size=len(ctx["tok"]), num_threads=2)
    params = SamplingParams(1.0, 1.0, 16, seed=4)
    args = ([r.id for r in recs], [r.prompt_ids for r in recs], [r.answer for r in recs], params, 2,
            [r.teacher_prompt_ids for r in recs])
    table, _ = worker.rollout(*args, from_teacher_prompt=True)
    by_hand = worker.engine.generate([t for t in teacher_prompts(recs) for _ in range(2)], params)
    responses = [r.tolist() for r in list_rows(table.column("response_ids"))]
    assert responses == [r.tolist() for r in by_hand.response_ids]
    np.testing.assert_array_equal(np.concatenate(list_rows(table.column("logprobs"))),
                                  np.concatenate(by_hand.logprobs))
    assert table.column("prompt_ids").to_pylist() == [r.prompt_ids.tolist() for r in recs for _ in range(2)]
    assert table.column("teacher_prompt_ids").to_pylist() == [_with_note(ctx["tok"], r.prompt_ids)
                                                              for r in recs for _ in range(2)]
    # on-policy workers (the flag off) sample after the student's prompt, as before: other samples
    student_side, _ = worker.rollout(*args)
    plain = worker.engine.generate([r.prompt_ids for r in recs for _ in range(2)], params)
    assert student_side.column("response_ids").to_pylist() == [r.tolist() for r in plain.response_ids]
    assert student_side.column("response_ids").to_pylist() != responses


@torch.no_grad()
def _by_hand(model, prompt, response, vocab: int) -> torch.Tensor:
    """(R, vocab) float64 log-probs over the shared vocabulary from one unpadded forward of prompt + response."""
    ids = torch.as_tensor(np.concatenate([prompt, response]).astype(np.int64))[None]
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:len(prompt) + len(response) - 1]
    return torch.log_softmax(logits[:, :vocab].double(), -1)


def test_final_evaluation_fidelity_reads_each_sample_in_its_models_context(ctx, tmp_path):
    """`add_fidelity`, the driver's own code, on real samples of both models (the teacher's drawn after its
    prompt, as `evaluate(..., as_teacher=True)` draws them): the teacher's log-probs are those of the teacher
    after the teacher's prompt, the student's after the student's, each from one unpadded forward by hand."""
    from actors.driver.evaluation import add_fidelity
    from actors.driver.session import Session
    from eopd_ray.models import load_causal_lm
    from eopd_ray.run_setup import resolve_models

    cfg = load_config(None, SYSTEM + [f"model.teacher={ctx['teacher']}", f"model.student={ctx['student']}",
                                      f"out_dir={tmp_path}"])
    models, tok = resolve_models(cfg)
    _, held = load_data(cfg, tok)
    answers, k, params = [r.answer for r in held], cfg.eval.k, SamplingParams(1.0, 1.0, 12, seed=5)
    student = RolloutWorker(ctx["student"], vocab_size=models.vocab_size, num_threads=2)
    teacher = RolloutWorker(ctx["teacher"], vocab_size=models.vocab_size, num_threads=2)
    results = {"student": student.evaluate([r.prompt_ids for r in held], answers, k, params),
               "teacher": teacher.evaluate(teacher_prompts(held), answers, k, params)}
    for r in results.values():  # per problem, its k samples (evaluate_on_workers' layout)
        r["response_ids"] = [r["response_ids"][i * k:(i + 1) * k] for i in range(len(held))]
    results["student_initial"] = dict(results["student"])  # no step ran: the trained student is the initial one
    add_fidelity(Session(cfg, models, None, None, None, None), held, results)

    t_model, s_model = (load_causal_lm(p).eval() for p in (ctx["teacher"], ctx["student"]))
    v = models.vocab_size
    student_p = [r.prompt_ids for r in held for _ in range(k)]
    teacher_p = [t for t in teacher_prompts(held) for _ in range(k)]

    def pairs(name):
        return list(zip(student_p, teacher_p, [x for row in results[name]["response_ids"] for x in row]))

    def nll(prompt, resp):
        return -_by_hand(t_model, prompt, resp, v).gather(-1, torch.as_tensor(resp.astype(np.int64))[:, None])[:, 0]

    def kl(a, prompt_a, b, prompt_b, resp):  # KL(a || b) per position, each model after its own prompt
        lp_a, lp_b = _by_hand(a, prompt_a, resp, v), _by_hand(b, prompt_b, resp, v)
        return (lp_a.exp() * (lp_a - lp_b)).sum(-1)

    def mean(parts):
        return float(torch.cat(parts).mean())

    own = pairs("student")
    got = results["student"]["fidelity"]
    assert got["response_tokens"] == sum(len(r) for *_, r in own) > 0
    assert got["teacher_nll"] == pytest.approx(mean([nll(t, r) for _, t, r in own]), abs=1e-5)
    wrong = mean([nll(s, r) for s, _, r in own])  # the teacher read after the student's prompt
    assert abs(got["teacher_nll"] - wrong) > 1e-2
    assert got["reverse_kl"] == pytest.approx(mean([kl(s_model, s, t_model, t, r) for s, t, r in own]), abs=1e-5)
    fkl = mean([kl(t_model, t, s_model, s, r) for s, t, r in pairs("teacher")])
    assert got["forward_kl"] == pytest.approx(fkl, abs=1e-5)
    # the teacher's own samples, read by the teacher after its own prompt
    assert results["teacher"]["fidelity"]["teacher_nll"] == pytest.approx(
        mean([nll(t, r) for _, t, r in pairs("teacher")]), abs=1e-5)


# ---- end to end through Ray: the check in a real run ------------------------------------------------------

@pytest.fixture(scope="module")
def trained_models():
    """The embedded default pair (trained: the teacher ends its turn with near certainty)."""
    from eopd_ray.tiny_models import ensure_tiny_models

    teacher, student = ensure_tiny_models(progress=False)
    return str(teacher), str(student)


@pytest.mark.e2e
def test_run_warns_of_a_mismatched_end_token_and_the_remap_fixes_it(trained_models, tmp_path):
    from test_e2e_ray import run_job

    teacher, student = trained_models
    chat = make_chat_teacher(teacher, tmp_path / "chat")
    args = ["trainer.max_steps=1", "eval.enabled=false", "trainer.save_every=0"]
    rows = {}
    for name, extra in (("plain", []), ("remap", ["teacher.eos_remap=auto"])):
        proc = run_job(tmp_path / name, (chat, student), *args, *extra)
        rows[name] = (proc, json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0]))
    proc, row = rows["plain"]
    assert "warning: alignment: the teacher gives the responses' end token '<eos>'" in proc.stderr
    assert "teacher.eos_remap='<eos>-><unk>'" in proc.stderr and "alignment check:" in proc.stdout
    assert row["align/ended_fraction"] > 0.2 and row["align/other_end_logprob"] - row["align/final_logprob"] > 2
    proc, fixed = rows["remap"]
    assert "warning: alignment" not in proc.stderr
    assert fixed["align/final_logprob"] > row["align/final_logprob"] + 2
    assert fixed["align/final_logprob"] > fixed["align/other_end_logprob"]


@pytest.mark.e2e
def test_kd_run_samples_and_is_evaluated_in_the_teachers_context(tiny_models, tmp_path):
    """Through the job, under a teacher-only system prompt: kd's first rollouts and the teacher's final
    evaluation are what the teacher samples after its own prompt, drawn again here by hand with the run's
    seeds (and not what it samples after the student's)."""
    from test_e2e_ray import SMALL, run_job

    from eopd_ray.fidelity import Samples, fidelity
    from eopd_ray.models import load_causal_lm
    from eopd_ray.run_setup import resolve_models
    from eopd_ray.seeds import eval_seed, rollout_seed

    teacher, student = tiny_models
    extra = ["loss.objective=kd", "teacher.system_prompt=note;", "trainer.max_steps=1", "trainer.save_every=0",
             "placement.actor_threads=2"]  # the by-hand worker below runs with as many threads
    run_job(tmp_path / "run", tiny_models, *extra)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    results = json.loads((tmp_path / "run" / "results.json").read_text())["eval"]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]

    cfg = load_config(None, [*SMALL, *extra, f"model.teacher={teacher}", f"model.student={student}"])
    models, tok = resolve_models(cfg)
    sampler, held = load_data(cfg, tok)
    worker = RolloutWorker(teacher, vocab_size=models.vocab_size, num_threads=2)
    batch = sampler.next_batch()
    r = cfg.rollout
    args = ([x.id for x in batch], [x.prompt_ids for x in batch], [x.answer for x in batch],
            SamplingParams(r.temperature, r.top_p, r.max_new_tokens, seed=rollout_seed(cfg.trainer.seed, 0, 0)),
            r.n_samples_per_prompt, [x.teacher_prompt_ids for x in batch])
    stats = {side: worker.rollout(*args, from_teacher_prompt=side == "teacher")[1] for side in ("teacher", "student")}
    assert row["rollout/tokens"] == stats["teacher"]["rollout/tokens"] == row["teacher/tokens"]
    assert row["rollout/entropy"] == pytest.approx(stats["teacher"]["rollout/entropy"], rel=1e-6)
    assert row["rollout/entropy"] != pytest.approx(stats["student"]["rollout/entropy"], rel=1e-3)

    k, e = cfg.eval.k, cfg.eval
    params = SamplingParams(e.temperature, e.top_p, r.max_new_tokens, eval_seed(cfg.trainer.seed))
    answers = [x.answer for x in held]
    by_hand = worker.evaluate(teacher_prompts(held), answers, k, params)
    student_side = worker.evaluate([x.prompt_ids for x in held], answers, k, params)
    got = [s["response"] for s in samples if s["model"] == "teacher"]
    assert got == by_hand["texts"] != student_side["texts"]
    assert results["teacher"]["correct"] == by_hand["correct"].tolist()
    # its fidelity figures read those samples after the teacher's prompt too
    model = load_causal_lm(teacher).eval()
    own = Samples([x.prompt_ids for x in held for _ in range(k)], by_hand["response_ids"],
                  [t for t in teacher_prompts(held) for _ in range(k)])
    want = fidelity(model, model, own, None, models.vocab_size, cfg.loss.tau)
    assert results["teacher"]["fidelity"]["teacher_nll"] == pytest.approx(want["teacher_nll"], abs=1e-5)
