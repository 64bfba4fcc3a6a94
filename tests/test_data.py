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
