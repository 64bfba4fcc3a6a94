"""Data loading errors name the file and line; prompts are checked; the sampler resumes exactly."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eopd_ray.data import DataError, PromptRecord, PromptSampler, load_rows, tokenize_rows


def test_jsonl_rows_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+2=", "answer": "3"}\n\n{"prompt": "2+2=", "answer": 4}\n')
    rows = load_rows(good)
    assert [r["answer"] for r in rows] == ["3", "4"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        load_rows(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "1+2=", "answer": "3"}\n')
    with pytest.raises(DataError, match=r"missing.jsonl:1: field 'prompt' is missing"):
        load_rows(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "   ", "answer": "3"}\n')
    with pytest.raises(DataError, match=r"empty.jsonl:1: the prompt is empty"):
        load_rows(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:1: not valid UTF-8"):
        load_rows(latin)
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")


def test_parquet_rows(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"problem": ["a", "b"], "solution": ["1", "2"]}), path)
    rows = load_rows(path, prompt_key="problem", answer_key="solution")
    assert [r["prompt"] for r in rows] == ["a", "b"]
    with pytest.raises(DataError, match="column 'prompt' is missing"):
        load_rows(path)


class CharTokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_prompt_length_limit_names_the_row():
    rows = [{"id": 0, "prompt": "short", "answer": "1"}, {"id": 1, "prompt": "x" * 50, "answer": "2"}]
    with pytest.raises(DataError, match=r"src row 1: prompt has 50 tokens"):
        tokenize_rows(rows, CharTokenizer(), 10, "src")
    recs = tokenize_rows(rows[:1], CharTokenizer(), 10, "src")
    assert recs[0].prompt_ids.tolist() == [ord(c) for c in "short"]


def _records(n):
    return [PromptRecord(i, str(i), str(i), np.array([i], np.int32)) for i in range(n)]


def test_sampler_too_small_and_resume():
    with pytest.raises(DataError, match="fewer than one batch"):
        PromptSampler(_records(3), 4, seed=0)
    a = PromptSampler(_records(10), 4, seed=7)
    seq = [[r.id for r in a.next_batch()] for _ in range(5)]
    assert all(len(b) == 4 and len(set(b)) == 4 for b in seq)
    assert not set(seq[0]) & set(seq[1])  # one epoch of 10 prompts: its two batches never repeat a prompt
    assert seq[2:4] != seq[:2]  # the second epoch is shuffled anew (per-epoch seed)
    b = PromptSampler(_records(10), 4, seed=7)
    b.next_batch(); b.next_batch()
    c = PromptSampler(_records(10), 4, seed=7)
    c.load_state_dict(b.state_dict())
    assert [[r.id for r in c.next_batch()] for _ in range(3)] == seq[2:]


def test_nested_fields_of_verl_style_parquet(tmp_path):
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "What is 2+2?"}]],
                             "reward_model": [{"ground_truth": "4", "style": "rule"}]}), path)
    rows = load_rows(path, prompt_key="prompt.0.content", answer_key="reward_model.ground_truth")
    assert rows[0]["prompt"] == "What is 2+2?" and rows[0]["answer"] == "4"
    with pytest.raises(DataError, match="field 'reward_model.answer' is missing"):
        load_rows(path, prompt_key="prompt.0.content", answer_key="reward_model.answer")


def test_held_out_set_has_its_own_fields_and_suffix(tmp_path):
    """The driver reads eval_path with data.eval_prompt_key / eval_answer_key (empty: the training ones) and
    appends data.eval_prompt_suffix to held-out prompts only."""
    import json

    from eopd_ray.config import load_config
    from eopd_ray.tiny_models import build_tokenizer
    from eopd_ray.run_setup import load_data

    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps({"problem": f"{i}+1=", "solution": str(i + 1)}) + "\n" for i in range(8)))
    held.write_text("".join(json.dumps({"q": f"{i}+2=", "gold": str(i + 2)}) + "\n" for i in range(4)))
    base = [f"data.train_path={train}", f"data.eval_path={held}", "data.prompt_key=problem",
            "data.answer_key=solution", "data.eval_prompt_key=q", "data.eval_answer_key=gold",
            "trainer.batch_size=4", "trainer.mini_batch_size=4", "data.num_eval_problems=4"]
    tok = build_tokenizer()
    sampler, plain = load_data(load_config(None, base), tok)
    sampler2, suffixed = load_data(load_config(None, base + ["data.eval_prompt_suffix=+3="]), tok)
    ids = lambda recs: [list(r.prompt_ids) for r in recs]  # noqa: E731
    assert [r.answer for r in plain] == ["2", "3", "4", "5"]
    assert ids(suffixed) == ids(tokenize_rows([{"prompt": f"{i}+2=+3=", "answer": str(i + 2)} for i in range(4)],
                                              tok, 64, "ref"))
    assert ids(suffixed) != ids(plain)
    assert ids(sampler2.next_batch()) == ids(sampler.next_batch())  # training prompts are untouched


def _jsonl(path, rows):
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad", ["abc", 3.5, True, [1], "1_000", float("nan"), 2**63])
def test_a_bad_row_id_names_the_file_line_value_and_fix(tmp_path, bad):
    path = _jsonl(tmp_path / "ids.jsonl", [{"id": 0, "prompt": "1+1=", "answer": "2"}, "",
                                           {"id": bad, "prompt": "2+2=", "answer": "4"}])
    with pytest.raises(DataError) as err:
        load_rows(path)
    msg = str(err.value)
    assert "ids.jsonl:3: field 'id' must be an integer" in msg and repr(bad) in msg
    assert "unique integer id" in msg and "drop the field" in msg  # the fix


def test_integral_row_ids_are_read_as_ints(tmp_path):
    path = _jsonl(tmp_path / "ids.jsonl", [{"id": 7, "prompt": "a", "answer": "1"},
                                           {"id": "8", "prompt": "b", "answer": "2"},
                                           {"id": 9.0, "prompt": "c", "answer": "3"},
                                           {"id": -2, "prompt": "d", "answer": "4"},
                                           {"prompt": "e", "answer": "5"}])  # no id: numbered by position, 4
    rows = load_rows(path)
    assert [r["id"] for r in rows] == [7, 8, 9, -2, None]
    assert all(type(r["id"]) is int for r in rows[:4])
    assert [r.id for r in tokenize_rows(rows, CharTokenizer(), 10, str(path))] == [7, 8, 9, -2, 4]


def test_duplicate_row_ids_name_both_rows(tmp_path):
    path = _jsonl(tmp_path / "dup.jsonl", [{"id": 5, "prompt": "a", "answer": "1"},
                                           {"id": 6, "prompt": "b", "answer": "2"}, "",
                                           {"id": 5, "prompt": "c", "answer": "3"}])
    with pytest.raises(DataError, match=r"dup.jsonl:4 has id 5, as \S*dup.jsonl:1 does; ids must be unique"):
        load_rows(path)
    # A row without an id is numbered by its position (here 1), which another row's explicit id takes.
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"id": 1, "prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}])
    with pytest.raises(DataError, match=r"mixed.jsonl:2 has id 1 \(it has no id field: its position\), "
                                        r"as \S*mixed.jsonl:1 does"):
        load_rows(mixed)
    parquet = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"id": [3, 4, 3], "prompt": ["a", "b", "c"], "answer": ["1", "2", "3"]}), parquet)
    with pytest.raises(DataError, match=r"dup.parquet row 2 has id 3, as \S*dup.parquet row 0 does"):
        load_rows(parquet)
    pq.write_table(pa.table({"id": ["x", "4"], "prompt": ["a", "b"], "answer": ["1", "2"]}), parquet)
    with pytest.raises(DataError, match=r"dup.parquet row 0: field 'id' must be an integer, got 'x'"):
        load_rows(parquet)


def test_rows_built_in_code_have_their_ids_checked_too():
    rows = [{"id": 0, "prompt": "a", "answer": "1"}, {"id": "b", "prompt": "b", "answer": "2"}]
    with pytest.raises(DataError, match=r"src row 1: field 'id' must be an integer, got 'b'"):
        tokenize_rows(rows, CharTokenizer(), 10, "src")
    rows = [{"id": 2, "prompt": "a", "answer": "1"}, {"id": 3, "prompt": "b", "answer": "2"},
            {"id": 2, "prompt": "c", "answer": "3"}]
    with pytest.raises(DataError, match=r"src row 2 has id 2, as src row 0 does"):
        tokenize_rows(rows, CharTokenizer(), 10, "src")
