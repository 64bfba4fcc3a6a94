"""The teacher's own context (teacher.prompt_template / system_prompt / eos_remap) and the alignment check.

A "chat teacher" is the tiny teacher with its `<eos>` and `<unk>` rows exchanged in the (tied) embedding and
output head, and `<unk>` as its tokenizer's EOS: a teacher that ends its turn with another token, as an
instruct teacher ends with `<|im_end|>` where a Base student ends with `<|endoftext|>`. Read through the remap
`<eos> -> <unk>` it is exactly the original teacher, so the remap's effect can be checked to rounding.
"""

from __future__ import annotations

import json

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
                                      swap_ids)

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
