"""Math evaluation benchmarks: MATH500, AIME24, AIME25, AMC23, Minerva Math, OlympiadBench, GSM8K.

Rows are read from local JSONL/JSON/Parquet files (reference copies live in ``../shared/data/<name>/``,
see its ``SOURCES.md``) or, for users with network, from a Hugging Face hub dataset (``path="hf://..."``,
needs the optional ``datasets`` package; nothing is downloaded otherwise; the default hub copies in
:data:`BENCHMARKS` are untested here, as this project's machines have no network). Every row becomes::

    {"id": str, "prompt": question + "\\n" + PROMPT_SUFFIX, "answer": str, "benchmark": name}

``PROMPT_SUFFIX`` is the instruction the paper appends to every problem (Appendix C, the Qwen2.5-Math
evaluation pipeline, zero-shot). ``answer`` is the gold answer as a string that
:func:`eopd_ray.grading.grade` understands: AIME answers lose their zero padding (``"025"`` -> ``"25"``),
AMC floats become integers (``27.0`` -> ``"27"``), Minerva's is the last ``\\boxed{}`` of its solution,
GSM8K's the number after ``####`` without digit-group commas, and OlympiadBench's ``final_answer`` list
is joined with ``", "`` after dropping its ``$`` delimiters (a multi-answer problem keeps its answers
comma-separated in one string, e.g. ``"69,84"``; ``grade`` compares such answers as sets).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from eopd_ray.grading import extract_boxed

__all__ = ["PROMPT_SUFFIX", "BenchmarkSpec", "BENCHMARKS", "BenchmarkFormatError", "load_benchmark",
           "default_data_root", "with_instruction", "benchmark_path"]

PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
DATA_ROOT_ENV = "EOPD_DATA_ROOT"
HF_PREFIX = "hf://"


class BenchmarkFormatError(ValueError):
    """A benchmark row is malformed (the message names the file and the line or row)."""


def with_instruction(question: str) -> str:
    """The paper's zero-shot prompt: the problem, a newline, then the Appendix C instruction."""
    return question.rstrip() + "\n" + PROMPT_SUFFIX


# ----------------------------------------------------------------------------------------------------
# Gold-answer normalisers: raw field value -> answer string. They raise ValueError on a bad value.


def _plain(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)) or v is None:
        raise ValueError(f"expected a string or number, got {type(v).__name__}")
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    s = str(v).strip()
    if not s:
        raise ValueError("empty answer")
    return s


def _integer(v: Any) -> str:
    """AIME: an integer 0-999, stored zero-padded ("025") or as a number."""
    s = _plain(v)
    try:
        f = float(s)
    except ValueError:
        raise ValueError(f"expected an integer answer, got {s!r}") from None
    if not f.is_integer():
        raise ValueError(f"expected an integer answer, got {s!r}")
    return str(int(f))


def _number(v: Any) -> str:
    """AMC: a number stored as a float (27.0 -> "27", 0.5 stays "0.5"); other text is kept."""
    s = _plain(v)
    try:
        f = float(s)
    except ValueError:
        return s
    return str(int(f)) if f.is_integer() and "e" not in s.lower() else s


def _boxed_solution(v: Any) -> str:
    """Minerva / MATH test: the last \\boxed{...} of the worked solution."""
    ans = extract_boxed(_plain(v))
    if not ans:
        raise ValueError("no \\boxed{...} answer in the solution")
    return ans


def _minerva(v: Any) -> str:
    """Minerva: the boxed answer, with two Python spellings in a few gold answers made mathematical
    (``-1./3`` -> ``-1/3``, ``np.arcsin(x)`` -> ``\\arcsin(x)``)."""
    ans = _boxed_solution(v)
    ans = re.sub(r"(\d)\.(?![\d])", r"\1", ans)
    ans = re.sub(r"\bnp\.(arcsin|arccos|arctan|sin|cos|tan|exp|log|sqrt|pi)\b", r"\\\1", ans)
    return ans


def _gsm8k(v: Any) -> str:
    """GSM8K: the text after "####", digit-group commas removed ("1,000" -> "1000")."""
    s = _plain(v)
    if "####" in s:
        s = s.rsplit("####", 1)[1].strip()
    s = s.replace(",", "").strip()
    if not s:
        raise ValueError("empty answer after ####")
    return s


_DOLLAR = re.compile(r"(?<!\\)\$")


def _answer_list(v: Any) -> str:
    """OlympiadBench final_answer: a list of answers (or a list written as a string); "$" dropped,
    joined with ", "."""
    if isinstance(v, str):
        t = v.strip()
        if t.startswith("[") and t.endswith("]"):
            try:
                v = json.loads(t)
            except json.JSONDecodeError:
                import ast
                try:
                    v = ast.literal_eval(t)
                except (ValueError, SyntaxError):
                    v = [t]
        else:
            v = [t]
    if hasattr(v, "tolist"):  # numpy array from Parquet
        v = v.tolist()
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"expected a non-empty list of answers, got {v!r:.80}")
    parts = [_DOLLAR.sub("", _plain(x)).strip() for x in v]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError("empty answer list")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives and how to read a row.

    ``question_fields`` and ``answer_fields`` are tried in order and the first one present in a row is
    used (the second entries cover the hub copies' field names); each answer field has its normaliser.
    """

    name: str
    path: str  # default file, relative to the data root
    question_fields: tuple[str, ...]
    answer_fields: tuple[tuple[str, Callable[[Any], str]], ...]
    id_field: str | None = None
    hub: str | None = None  # "owner/name[:config]@split", used by path="hf://"
    notes: str = ""

    @property
    def question_field(self) -> str:
        return self.question_fields[0]

    @property
    def answer_field(self) -> str:
        return self.answer_fields[0][0]


BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in [
    BenchmarkSpec("math500", "math500/test.jsonl", ("problem",), (("answer", _plain),), "unique_id",
                  hub="HuggingFaceH4/MATH-500@test"),
    BenchmarkSpec("aime24", "aime24/test.jsonl", ("problem", "question"), (("answer", _integer),), "id",
                  hub="HuggingFaceH4/aime_2024@train", notes="answers zero-padded (\"025\")"),
    BenchmarkSpec("aime25", "aime25/test.jsonl", ("problem", "question"), (("answer", _integer),), "id",
                  hub="math-ai/aime25@test"),
    BenchmarkSpec("amc23", "amc23/test.jsonl", ("problem", "question"), (("answer", _number),), "id",
                  hub="math-ai/amc23@test", notes="answers stored as floats (27.0)"),
    BenchmarkSpec("minerva_math", "minerva_math/test.jsonl", ("problem", "question"),
                  (("solution", _minerva), ("answer", _plain)), "idx", hub="math-ai/minervamath@test",
                  notes="gold = last \\boxed{} of the solution"),
    BenchmarkSpec("olympiadbench", "olympiadbench/test.jsonl", ("question", "problem"),
                  (("final_answer", _answer_list), ("answer", _plain)), "id",
                  hub="Hothan/OlympiadBench:OE_TO_maths_en_COMP@train",
                  notes="final_answer is a list; multi-answer problems keep comma-separated answers"),
    BenchmarkSpec("gsm8k", "gsm8k/test.jsonl", ("question", "problem"), (("answer", _gsm8k),), "idx",
                  hub="openai/gsm8k:main@test", notes="gold = number after ####"),
]}


def _spec(name: str) -> BenchmarkSpec:
    key = str(name).strip().lower().replace("-", "_")
    key = {"minerva": "minerva_math", "math_500": "math500", "olympiad_bench": "olympiadbench"}.get(key, key)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


# ----------------------------------------------------------------------------------------------------
# Locations


def default_data_root() -> Path:
    """``$EOPD_DATA_ROOT`` if set, else ``<repo root>/../shared/data`` (may not exist)."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def benchmark_path(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """The default local file of benchmark ``name`` under ``data_root`` (default: default_data_root())."""
    spec = _spec(name)
    root = Path(data_root) if data_root is not None else default_data_root()
    return root / spec.path


# ----------------------------------------------------------------------------------------------------
# Readers: (location for messages, raw row)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # Not a single JSON document: treat as JSON lines.
        yield from _iter_jsonl(path)
        return
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    if not isinstance(data, list):
        raise BenchmarkFormatError(f"{path}: expected a JSON list of rows")
    for i, row in enumerate(data):
        yield f"{path}: row {i}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        raise BenchmarkFormatError(f"{path}: cannot read Parquet ({e})") from e
    for i, row in enumerate(rows):
        yield f"{path}: row {i}", row


def _iter_hub(spec: BenchmarkSpec, ref: str) -> Iterator[tuple[str, Any]]:
    ref = ref or spec.hub or ""
    if not ref:
        raise ValueError(f"no default hub dataset for {spec.name}; pass path='hf://owner/name[:config]@split'")
    repo, _, split = ref.partition("@")
    repo, _, config = repo.partition(":")
    try:
        import datasets  # optional; imported only here
    except ImportError:
        raise ImportError(f"loading {spec.name} from the hub ({ref!r}) needs the `datasets` package "
                          f"(pip install datasets) and network; or pass a local file via path=/data_root=") from None
    ds = datasets.load_dataset(repo, config or None, split=split or "test")
    for i, row in enumerate(ds):
        yield f"hf://{ref}: row {i}", row


def _iter_file(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _iter_parquet(path)
    if suffix == ".json":
        return _iter_json(path)
    return _iter_jsonl(path)


# ----------------------------------------------------------------------------------------------------


def _convert(spec: BenchmarkSpec, where: str, raw: Any, index: int) -> dict:
    if not isinstance(raw, dict):
        raise BenchmarkFormatError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    qf = next((f for f in spec.question_fields if f in raw), None)
    if qf is None:
        raise BenchmarkFormatError(f"{where}: missing question field {' or '.join(map(repr, spec.question_fields))}"
                                   f" (fields: {', '.join(map(str, raw))})")
    question = raw[qf]
    if not isinstance(question, str) or not question.strip():
        raise BenchmarkFormatError(f"{where}: question field {qf!r} is empty or not a string")
    af = next(((f, fn) for f, fn in spec.answer_fields if f in raw), None)
    if af is None:
        names = " or ".join(repr(f) for f, _ in spec.answer_fields)
        raise BenchmarkFormatError(f"{where}: missing answer field {names} (fields: {', '.join(map(str, raw))})")
    field_name, normalise = af
    try:
        answer = normalise(raw[field_name])
    except ValueError as e:
        raise BenchmarkFormatError(f"{where}: bad answer in field {field_name!r}: {e}") from None
    rid = raw.get(spec.id_field) if spec.id_field else None
    rid = str(rid) if rid is not None and str(rid) != "" else str(index)
    return {"id": rid, "prompt": with_instruction(question), "answer": answer, "benchmark": spec.name}


def load_benchmark(name: str, path: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
                   limit: int | None = None) -> list[dict]:
    """Rows ``{"id", "prompt", "answer", "benchmark"}`` of benchmark ``name`` (see :data:`BENCHMARKS`).

    ``path``: a local ``.jsonl``/``.json``/``.parquet`` file (or a directory holding the benchmark's
    default file name), or ``"hf://owner/name[:config]@split"`` for a hub dataset (``"hf://"`` alone: the
    benchmark's default hub copy; needs ``datasets`` and network). Without ``path`` the file is
    ``<data_root>/<spec.path>``, ``data_root`` defaulting to :func:`default_data_root`. ``limit`` keeps
    the first rows. Malformed rows raise :class:`BenchmarkFormatError` naming the file and line.
    """
    spec = _spec(name)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if path is not None and str(path).startswith(HF_PREFIX):
        source = _iter_hub(spec, str(path)[len(HF_PREFIX):])
    else:
        if path is None:
            file = benchmark_path(spec.name, data_root)
        else:
            file = Path(path).expanduser()
            if file.is_dir():
                file = file / Path(spec.path).name
        if not file.is_file():
            hint = "" if path is not None else (f" (data root: pass data_root=, or set ${DATA_ROOT_ENV}, "
                                                f"or path='hf://' to read the hub copy)")
            raise FileNotFoundError(f"{spec.name}: no such file {file}{hint}")
        source = _iter_file(file)
    rows: list[dict] = []
    for index, (where, raw) in enumerate(source):
        if limit is not None and len(rows) >= limit:
            break
        rows.append(_convert(spec, where, raw, index))
    return rows
