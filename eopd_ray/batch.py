"""Arrow payloads exchanged between actors, and their conversion to padded tensors.

Rollouts and teacher statistics travel through the Ray object store as `pyarrow.Table`s of list columns:
one row per response, flat numeric buffers, no per-token Python objects, zero-copy on the same node.
The teacher payload per response position is 4 (log-prob) + 4 (entropy) + k * (4 + 4) (top-k ids and
log-probs) bytes = 8k + 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROLLOUT_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("response_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())),  # behaviour log-probs of pi_old at the sampled tokens
    ("entropy", pa.list_(pa.float32())),  # the sampler's own full-vocabulary entropy per position
    ("correct", pa.bool_()),
    # the prompt as the teacher reads it (teacher.prompt_template / system_prompt); empty: the student's prompt_ids
    ("teacher_prompt_ids", pa.list_(pa.int32())),
])

TEACHER_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("teacher_logprobs", pa.list_(pa.float32())),  # (T,)
    ("teacher_entropy", pa.list_(pa.float32())),  # (T,)
    ("topk_ids", pa.list_(pa.int32())),  # (T * k,) row-major
    ("topk_logprobs", pa.list_(pa.float32())),  # (T * k,)
    # (T,) the positions that carry statistics (teacher.tokenizer=cross: a student token with no teacher
    # counterpart is False and left out of the loss); empty: every position does (one shared tokenizer)
    ("teacher_mask", pa.list_(pa.bool_())),
])


def _list_column(arrays: list[np.ndarray], dtype: pa.DataType) -> pa.Array:
    """Build a list<dtype> column from per-row 1-D numpy arrays with one flat buffer."""
    lengths = np.array([len(a) for a in arrays], dtype=np.int32)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(dtype.to_pandas_dtype(), copy=False)))


def make_rollout_table(sample_ids, prompt_ids, response_ids, logprobs, entropy, correct,
                       teacher_prompt_ids=None) -> pa.Table:
    """All per-row arguments are sequences of equal length; the list ones hold 1-D numpy arrays.
    teacher_prompt_ids: None, or per row the teacher's prompt (None or empty where it is the student's)."""
    empty = np.zeros(0, dtype=np.int32)
    teacher_rows = [empty if t is None else np.asarray(t) for t in (teacher_prompt_ids or [None] * len(sample_ids))]
    return pa.Table.from_arrays([
        pa.array(np.asarray(sample_ids, dtype=np.int64)),
        _list_column([np.asarray(p) for p in prompt_ids], pa.int32()),
        _list_column([np.asarray(r) for r in response_ids], pa.int32()),
        _list_column([np.asarray(x) for x in logprobs], pa.float32()),
        _list_column([np.asarray(x) for x in entropy], pa.float32()),
        pa.array(np.asarray(correct, dtype=bool)),
        _list_column(teacher_rows, pa.int32()),
    ], schema=ROLLOUT_SCHEMA)


def make_teacher_table(sample_ids, logprobs, entropy, topk_ids, topk_logprobs, mask=None) -> pa.Table:
    """`topk_*` rows are (T_i, k) arrays; they are stored flattened. mask: None, or per row a (T_i,) bool array
    (None or empty where every position carries statistics)."""
    empty = np.zeros(0, dtype=bool)
    mask_rows = [empty if m is None else np.asarray(m, dtype=bool) for m in (mask or [None] * len(sample_ids))]
    return pa.Table.from_arrays([
        pa.array(np.asarray(sample_ids, dtype=np.int64)),
        _list_column([np.asarray(x) for x in logprobs], pa.float32()),
        _list_column([np.asarray(x) for x in entropy], pa.float32()),
        _list_column([np.asarray(x).reshape(-1) for x in topk_ids], pa.int32()),
        _list_column([np.asarray(x).reshape(-1) for x in topk_logprobs], pa.float32()),
        _list_column(mask_rows, pa.bool_()),
    ], schema=TEACHER_SCHEMA)


def teacher_mask_rows(teacher: pa.Table, lengths: list[int]) -> list[np.ndarray]:
    """Per row, the (T_i,) bool positions that carry teacher statistics (all True where the row's mask is empty)."""
    rows = list_rows(teacher.column("teacher_mask"))
    return [np.ones(n, dtype=bool) if len(m) == 0 else m for m, n in zip(rows, lengths)]


def list_rows(column: pa.ChunkedArray | pa.ListArray) -> list[np.ndarray]:
    """Per-row numpy views of a list column (no per-element Python objects)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(column))]


def teacher_prompt_rows(rollout: pa.Table) -> list[np.ndarray]:
    """Per row, the prompt the teacher scores the response after: its own rendering where the rollout carries
    one, else the student's prompt ids."""
    student = list_rows(rollout.column("prompt_ids"))
    teacher = list_rows(rollout.column("teacher_prompt_ids"))
    return [t if len(t) else p for p, t in zip(student, teacher)]


def write_rollout_files(directory: str | Path, tables: list[pa.Table]) -> None:
    """Rollout tables as Arrow IPC files `rollout_000.arrow`, ... (a checkpoint's batch generated ahead)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i, table in enumerate(tables):
        with pa.OSFile(str(directory / f"rollout_{i:03d}.arrow"), "wb") as sink, \
                pa.ipc.new_file(sink, ROLLOUT_SCHEMA) as writer:
            writer.write_table(table.cast(ROLLOUT_SCHEMA))


def read_rollout_files(directory: str | Path) -> list[pa.Table]:
    """The tables `write_rollout_files` wrote, in order; a file of another schema is refused."""
    tables = []
    for path in sorted(Path(directory).glob("rollout_*.arrow")):
        with pa.OSFile(str(path), "rb") as source:  # read into memory: the file may be removed later
            table = pa.ipc.open_file(source).read_all()
        if not table.schema.equals(ROLLOUT_SCHEMA):
            raise ValueError(f"{path}: not a rollout table (schema {table.schema}); expected {ROLLOUT_SCHEMA}")
        tables.append(table)
    return tables


def payload_bytes_per_position(teacher: pa.Table) -> float:
    """Bytes of numeric teacher payload per response position (offsets and ids excluded)."""
    n = sum(len(r) for r in list_rows(teacher.column("teacher_logprobs")))
    cols = ("teacher_logprobs", "teacher_entropy", "topk_ids", "topk_logprobs")
    total = sum(teacher.column(c).combine_chunks().values.nbytes for c in cols)
    return total / max(n, 1)


@dataclass
class SequenceBatch:
    """Prompt + response sequences, right-padded, with the response aligned to its predicting positions.

    input_ids_BL / attention_mask_BL: (B, L) full sequences. For response position t of row b the token
    is `response_BT[b, t]`, predicted by the logits at sequence position `logit_index_BT[b, t]`.
    """

    input_ids_BL: torch.Tensor
    attention_mask_BL: torch.Tensor
    response_BT: torch.Tensor
    logit_index_BT: torch.Tensor
    response_mask_BT: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask_BT.sum())


def pad_rows(rows: list[np.ndarray], width: int, fill, dtype) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def sequence_batch(prompt_rows: list[np.ndarray], response_rows: list[np.ndarray], pad_id: int) -> SequenceBatch:
    """Concatenate prompts and responses (right padding) and index the response positions."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_rows, response_rows)]
    width = max(lengths)
    t_max = max(1, max(len(r) for r in response_rows))
    seqs = [np.concatenate([p, r]) for p, r in zip(prompt_rows, response_rows)]
    input_ids = torch.from_numpy(pad_rows(seqs, width, pad_id, np.int64))
    attn = torch.from_numpy(pad_rows([np.ones(n, np.int64) for n in lengths], width, 0, np.int64))
    response = torch.from_numpy(pad_rows(response_rows, t_max, pad_id, np.int64))
    resp_mask = torch.from_numpy(pad_rows([np.ones(len(r), bool) for r in response_rows], t_max, False, bool))
    starts = torch.tensor([len(p) - 1 for p in prompt_rows], dtype=torch.long)  # logit that predicts response[0]
    index = (starts[:, None] + torch.arange(t_max)[None, :]).clamp(max=width - 1)
    return SequenceBatch(input_ids, attn, response, index, resp_mask)


def padded_float(rows: list[np.ndarray], t_max: int, fill: float = 0.0) -> torch.Tensor:
    return torch.from_numpy(pad_rows(rows, t_max, fill, np.float32))


def padded_topk(rows: list[np.ndarray], t_max: int, k: int, fill) -> torch.Tensor:
    """Flattened (T_i * k) rows -> (B, t_max, k)."""
    dtype = np.float32 if np.issubdtype(rows[0].dtype, np.floating) else np.int64
    out = np.full((len(rows), t_max, k), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r) // k] = r.reshape(-1, k)
    return torch.from_numpy(out)
