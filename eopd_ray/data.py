"""Prompt data: loading JSONL/Parquet rows with clear errors, tokenising, and a resumable sampler."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eopd_ray.teacher_context import render_prompt

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file or row is missing, malformed, or cannot be used."""


@dataclass
class PromptRecord:
    id: int
    prompt: str  # the question as written in the data
    answer: str  # gold answer, graded against the response
    prompt_ids: np.ndarray  # (P,) int32 token ids of the formatted prompt
    teacher_prompt_ids: np.ndarray | None = None  # (P',) the prompt as the teacher reads it; None: prompt_ids
    teacher: int = 0  # the index of the teacher group that scores it (eopd_ray.teacher_config.route_index)


def load_rows(path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer",
              route_key: str = "") -> list[dict]:
    """Read `{prompt, answer}` rows from a .jsonl or .parquet file; errors name the file and line/row.
    route_key: also keep this field (routing.field: the row's teacher) as the row's `route`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist; set data.train_path/data.eval_path to a "
                        "JSONL or Parquet file, or leave it empty for the built-in synthetic task")
    rows: list[dict] = []
    wheres: list[str] = []  # each row's file:line or file row i, for errors about two rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for key in (prompt_key, answer_key) + ((route_key,) if route_key else ()):
            if key.split(".")[0] not in table.column_names:
                raise DataError(f"{path}: column {key.split('.')[0]!r} is missing (columns: {table.column_names}); "
                                f"set data.prompt_key / data.answer_key to the right names")
        # the id column too, where there is one: JSONL rows keep theirs, and both are checked the same way
        columns = sorted({prompt_key.split(".")[0], answer_key.split(".")[0]} | ({"id"} & set(table.column_names))
                         | ({route_key.split(".")[0]} if route_key else set()))
        for i, row in enumerate(table.select(columns).to_pylist()):
            wheres.append(f"{path} row {i}")
            rows.append(_check_row(row, wheres[-1], prompt_key, answer_key, route_key))
    elif path.suffix in (".jsonl", ".json"):
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                where = f"{path}:{lineno}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
                wheres.append(where)
                rows.append(_check_row(row, where, prompt_key, answer_key, route_key))
    else:
        raise DataError(f"data file {str(path)!r} has an unknown extension {path.suffix!r}; use .jsonl or .parquet")
    if not rows:
        raise DataError(f"data file {str(path)!r} holds no rows")
    unique_ids([r["id"] for r in rows], wheres)
    return rows


_MISSING = object()


def get_field(row, dotted: str):
    """`reward_model.ground_truth` or `prompt.0.content`: nested dicts and lists (as in verl-style Parquet)."""
    value = row
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _check_row(row: dict, where: str, prompt_key: str, answer_key: str, route_key: str = "") -> dict:
    values = {key: get_field(row, key) for key in (prompt_key, answer_key)}
    for key, value in values.items():
        if value is _MISSING or value is None:
            raise DataError(f"{where}: field {key!r} is missing (fields: {sorted(row)}); "
                            f"set data.{'prompt' if key == prompt_key else 'answer'}_key to the right name "
                            "(nested fields as a.b or a.0.b)")
    row = {**row, prompt_key: values[prompt_key], answer_key: values[answer_key]}
    prompt = row[prompt_key]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field {prompt_key!r} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise DataError(f"{where}: the prompt is empty")
    out = {"id": row_id(row.get("id"), where), "prompt": prompt, "answer": str(row[answer_key])}
    if route_key:
        route = get_field(row, route_key)
        if route is _MISSING or route is None:
            raise DataError(f"{where}: field {route_key!r} (routing.field: the row's teacher) is missing (fields: "
                            f"{sorted(row)}); add it to every row, or set routing.field='' to route by routing.rule")
        out["route"] = str(route)
    return out


_INTEGER = re.compile(r"[+-]?[0-9]+")
_ID_FIX = "give every row a unique integer id, or drop the field from every row to number the rows by position"


def row_id(value, where: str) -> int | None:
    """A row's `id` field as an int (None: the row has none and is numbered by its position). Integers, strings
    of decimal digits and integral floats (as pandas writes an int column with gaps) are ids; anything else
    is a DataError naming `where`, the value and the fix, rather than a bare ValueError later or an id
    truncated in silence (3.5 -> 3)."""
    if value is None:
        return None
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        n = int(value)
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        n = int(value)
    elif isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        n = int(value)
    else:
        raise DataError(f"{where}: field 'id' must be an integer, got {value!r} ({type(value).__name__}); "
                        f"{_ID_FIX}")
    if not -2**63 <= n < 2**63:  # sample ids travel as int64 (eopd_ray.batch)
        raise DataError(f"{where}: field 'id' must be an integer, got {value!r}, out of the int64 range; {_ID_FIX}")
    return n


def unique_ids(ids: list[int | None], wheres: list[str]) -> list[int]:
    """The rows' ids, a row without one (None) numbered by its position (0-based) in the list. Two rows with
    one id are a DataError naming both: GRPO groups responses by sample id, so two prompts sharing one would
    have their rewards normalised as one group, in silence."""
    first: dict[int, int] = {}
    out = []
    for i, (value, where) in enumerate(zip(ids, wheres)):
        n = i if value is None else value
        if n in first:
            how = " (it has no id field: its position)" if value is None else ""
            raise DataError(f"{where} has id {n}{how}, as {wheres[first[n]]} does; ids must be unique "
                            f"(GRPO groups responses by id): {_ID_FIX}")
        first[n] = i
        out.append(n)
    return out


def synthetic_rows(n: int, seed: int, split: str) -> list[dict]:
    """Rows of the embedded arithmetic task (eopd_ray.task)."""
    from eopd_ray import task

    return [{"id": p.id, "prompt": p.prompt, "answer": p.answer}
            for p in task.make_problems(n, seed=seed, split=split)]


def tokenize_rows(rows: list[dict], tokenizer, max_prompt_tokens: int, source: str,
                  suffix: str = "") -> list[PromptRecord]:
    """Format and tokenise every prompt (+ suffix); a prompt over the limit, a bad id or two rows with one id
    is an error naming the row (a row without an id is numbered by its position)."""
    if not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer has no chat template: prompts from %s are used as raw text", source)
    wheres = [f"{source} row {i}" for i in range(len(rows))]
    row_ids = unique_ids([row_id(row.get("id"), where) for row, where in zip(rows, wheres)], wheres)
    records = []
    for i, row in enumerate(rows):
        text = render_prompt(tokenizer, row["prompt"] + suffix)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"{source} row {i}: the prompt tokenises to nothing")
        if len(ids) > max_prompt_tokens:
            raise DataError(f"{source} row {i}: prompt has {len(ids)} tokens, over data.max_prompt_tokens="
                            f"{max_prompt_tokens}; raise the limit or drop the row")
        records.append(PromptRecord(id=row_ids[i], prompt=row["prompt"], answer=row["answer"],
                                    prompt_ids=np.asarray(ids, dtype=np.int32)))
    return records


class PromptSampler:
    """Epoch-wise shuffled batches. Its whole state is (epoch, position), so resume is exact and does
    not depend on how many actors consume the batches."""

    def __init__(self, records: list[PromptRecord], batch_size: int, seed: int):
        if len(records) < batch_size:
            raise DataError(f"the data set has {len(records)} prompts, fewer than one batch "
                            f"(trainer.batch_size={batch_size}); add data or lower the batch size")
        self.records, self.batch_size, self.seed = records, batch_size, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.records))

    def next_batch(self) -> list[PromptRecord]:
        # An incomplete tail is dropped so every iteration has exactly B prompts.
        if self.position + self.batch_size > len(self.records):
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return [self.records[i] for i in order]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
