"""Benchmark loaders against the reference copies in ../shared/data, plus error handling on bad files."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from eopd_ray import benchmarks
from eopd_ray.benchmarks import (BENCHMARKS, PROMPT_SUFFIX, BenchmarkFormatError, default_data_root,
                                 load_benchmark)

DATA_ROOT = default_data_root()
PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "eopd-arxiv-2603.07079.txt"
APPENDIX_C = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def _raw_rows(path: Path) -> list[dict]:
    """The file read independently of the loader: one JSON object per non-blank line."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _last_boxed(text: str) -> str:
    """A deliberately simple, independent extractor: brace matching from the last \\boxed{."""
    i = text.rindex("\\boxed{") + len("\\boxed{")
    depth, j = 1, i
    while depth:
        if text[j] == "\\":
            j += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip()


# name -> (question of a raw row, gold answer of a raw row as the loader should give it, raw gold form)
EXPECTED = {
    "math500": (lambda r: r["problem"], lambda r: r["answer"], lambda r: r["answer"]),
    "aime24": (lambda r: r["problem"], lambda r: str(int(r["answer"])), lambda r: r["answer"]),
    "aime25": (lambda r: r["problem"], lambda r: str(int(r["answer"])), lambda r: r["answer"]),
    "amc23": (lambda r: r["problem"], lambda r: str(int(float(r["answer"])))
              if float(r["answer"]).is_integer() else str(r["answer"]), lambda r: str(r["answer"])),
    "minerva_math": (lambda r: r["problem"], None, lambda r: _last_boxed(r["solution"])),
    "olympiadbench": (lambda r: r["question"], lambda r: ", ".join(a.replace("$", "").strip()
                                                                   for a in r["final_answer"]),
                      lambda r: r["final_answer"]),
    "gsm8k": (lambda r: r["question"], lambda r: r["answer"].split("####")[-1].strip().replace(",", ""),
              lambda r: r["answer"].split("####")[-1].strip()),
}

needs_data = pytest.mark.skipif(not DATA_ROOT.is_dir(),
                                reason=f"reference data directory {DATA_ROOT} not found (set EOPD_DATA_ROOT)")


def _file(name: str) -> Path:
    path = DATA_ROOT / BENCHMARKS[name].path
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


def test_every_benchmark_has_an_expectation():
    assert set(EXPECTED) == set(BENCHMARKS)


def test_prompt_suffix_is_the_papers_appendix_c_template():
    """PROMPT_SUFFIX against the sentence the paper quotes (not a copy of it typed here)."""
    if not PAPER.is_file():
        pytest.skip(f"paper text {PAPER} not found")
    text = PAPER.read_text(encoding="utf-8")
    appendix = text[text.index("Appendix C Evaluation Details"):]
    quoted = re.search(r"the same prompt template was appended at the end: \u2018\u2018(.+?)\u2019\u2019", appendix)
    assert quoted and PROMPT_SUFFIX == quoted.group(1) and APPENDIX_C == "\n" + quoted.group(1)


@needs_data
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_rows_counts_and_gold(name):
    path = _file(name)
    raw = _raw_rows(path)
    rows = load_benchmark(name)
    assert len(rows) == len(raw) > 0
    question, gold, raw_gold = EXPECTED[name]
    for r, row in ((raw[0], rows[0]), (raw[-1], rows[-1])):
        expected = gold(r) if gold is not None else raw_gold(r)
        assert row["answer"] == expected
        assert row["prompt"] == question(r).rstrip() + APPENDIX_C
        # the raw form of the gold answer (zero-padded, float, list with $, digit groups) grades as correct
        assert _grade_raw(raw_gold(r), row["answer"])
    for row in rows:
        assert set(row) == {"id", "prompt", "answer", "benchmark"}
        assert row["benchmark"] == name
        assert row["prompt"].endswith(APPENDIX_C)
        assert isinstance(row["answer"], str) and row["answer"]
    assert len({row["id"] for row in rows}) == len(rows), "ids must be unique"


def _grade_raw(raw_gold, answer: str) -> bool:
    from eopd_ray.grading import grade

    if isinstance(raw_gold, list):
        return grade("\\boxed{" + ", ".join(raw_gold) + "}", answer)
    return grade("\\boxed{" + str(raw_gold) + "}", answer)


@needs_data
@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_gold_answer_grades_as_correct(name):
    """Self-grading validates answer normalisation against the real data."""
    pytest.importorskip("math_verify")
    from eopd_ray.grading import grade, grade_answer

    _file(name)
    rows = load_benchmark(name)
    failures = [(row["id"], row["answer"]) for row in rows
                if not grade("Reasoning...\nThe final answer is \\boxed{" + row["answer"] + "}.", row["answer"])]
    assert not failures, f"{len(failures)} gold answers of {name} do not grade as correct: {failures[:10]}"
    # The same through math-verify itself (no same-string / plain-number shortcut): every gold answer
    # parses within the deadline and is equivalent to itself.
    failures = [(row["id"], row["answer"]) for row in rows
                if not grade_answer(row["answer"], row["answer"], shortcuts=False)]
    assert not failures, f"{len(failures)} gold answers of {name} fail in math-verify: {failures[:10]}"


@needs_data
def test_limit_and_data_root(tmp_path, monkeypatch):
    rows = load_benchmark("aime24", limit=3)
    assert len(rows) == 3
    assert load_benchmark("aime24", limit=0) == []
    assert load_benchmark("AIME24", data_root=DATA_ROOT, limit=1) == rows[:1]
    assert load_benchmark("aime24", path=DATA_ROOT / "aime24", limit=1) == rows[:1]  # a directory
    monkeypatch.setenv("EOPD_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    with pytest.raises(FileNotFoundError, match="aime24"):
        load_benchmark("aime24")


def test_default_data_root_is_next_to_the_repo(monkeypatch):
    monkeypatch.delenv("EOPD_DATA_ROOT", raising=False)
    repo = Path(benchmarks.__file__).resolve().parents[1]
    assert default_data_root() == repo.parent / "shared" / "data"


def test_unknown_benchmark_lists_the_allowed_ones():
    with pytest.raises(ValueError) as e:
        load_benchmark("mmlu")
    for name in BENCHMARKS:
        assert name in str(e.value)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_json_names_file_and_line(tmp_path):
    f = _write(tmp_path / "bad.jsonl", ['{"problem": "1+1?", "answer": "2"}', '{"problem": "oops", "answer": '])
    with pytest.raises(BenchmarkFormatError, match=r"bad\.jsonl:2: invalid JSON"):
        load_benchmark("math500", path=f)


def test_missing_field_names_file_line_and_field(tmp_path):
    f = _write(tmp_path / "t.jsonl", ['{"problem": "1+1?", "answer": "2"}', "", '{"problem": "2+2?"}'])
    with pytest.raises(BenchmarkFormatError, match=r"t\.jsonl:3: missing answer field 'answer'"):
        load_benchmark("math500", path=f)
    f = _write(tmp_path / "q.jsonl", ['{"answer": "2"}'])
    with pytest.raises(BenchmarkFormatError, match=r"q\.jsonl:1: missing question field 'problem'"):
        load_benchmark("math500", path=f)


def test_bad_answer_values_name_the_line(tmp_path):
    f = _write(tmp_path / "a.jsonl", ['{"problem": "p", "answer": "twelve"}'])
    with pytest.raises(BenchmarkFormatError, match=r"a\.jsonl:1: bad answer in field 'answer'.*integer"):
        load_benchmark("aime24", path=f)
    f = _write(tmp_path / "m.jsonl", ['{"problem": "p", "solution": "no box"}'])
    with pytest.raises(BenchmarkFormatError, match=r"m\.jsonl:1: .*boxed"):
        load_benchmark("minerva_math", path=f)
    f = _write(tmp_path / "o.jsonl", ['{"question": "p", "final_answer": []}'])
    with pytest.raises(BenchmarkFormatError, match=r"o\.jsonl:1: bad answer in field 'final_answer'"):
        load_benchmark("olympiadbench", path=f)
    f = _write(tmp_path / "n.jsonl", ["[1, 2]"])
    with pytest.raises(BenchmarkFormatError, match=r"n\.jsonl:1: expected a JSON object"):
        load_benchmark("gsm8k", path=f)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_benchmark("gsm8k", path=tmp_path / "nope.jsonl")


def test_parquet_and_normalisers(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": [7, 8], "question": ["Find all x.", "Find y."],
                      "final_answer": [["$3$", "$5$"], ["$(1,2)$"]]})
    pq.write_table(table, tmp_path / "ob.parquet")
    rows = load_benchmark("olympiadbench", path=tmp_path / "ob.parquet")
    assert rows == [
        {"id": "7", "prompt": "Find all x." + APPENDIX_C, "answer": "3, 5", "benchmark": "olympiadbench"},
        {"id": "8", "prompt": "Find y." + APPENDIX_C, "answer": "(1,2)", "benchmark": "olympiadbench"},
    ]
    f = _write(tmp_path / "amc.jsonl", ['{"problem": "p", "answer": 27.0}', '{"problem": "q", "answer": 0.5}'])
    assert [r["answer"] for r in load_benchmark("amc23", path=f)] == ["27", "0.5"]
    f = _write(tmp_path / "g.jsonl", ['{"question": "p", "answer": "so\\n#### 1,234"}'])
    assert load_benchmark("gsm8k", path=f)[0]["answer"] == "1234"
    f = _write(tmp_path / "aime.jsonl", ['{"problem": "p", "answer": "007"}'])
    assert load_benchmark("aime25", path=f)[0] == {"id": "0", "prompt": "p" + APPENDIX_C, "answer": "7",
                                                   "benchmark": "aime25"}


def test_hub_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed; nothing downloads
    with pytest.raises(ImportError, match="datasets"):
        load_benchmark("math500", path="hf://")
    with pytest.raises(ImportError, match="someone/some-set"):
        load_benchmark("gsm8k", path="hf://someone/some-set@test")
