"""The ZeRO-3 teacher (actors/teacher/zero3.py): two ranks over gloo, parameters partitioned (and offloaded),
each scoring a different number of rows and positions, give the whole-model teacher's statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from actors.runtime.dist import free_port
from actors.teacher.scorer import TeacherScorer
from eopd_ray.batch import list_rows
from eopd_ray.models import load_tokenizer
from tests.family_models import build_family_model
from tests.test_families import _table
from tests.zero3_worker import CHUNK, K, MAX_BATCH

pytestmark = pytest.mark.e2e
WORKER = Path(__file__).with_name("zero3_worker.py")
COLUMNS = ("teacher_logprobs", "teacher_entropy", "topk_ids", "topk_logprobs")


def run_group(model_dir: str, shares: list[list[pa.Table]], offload: str, tmp: Path, backend: str = "gloo",
              dtype: str = "float32") -> list[dict]:
    """Start one process per rank, each scoring its share; returns each rank's meta (partition, stats)."""
    for rank, share in enumerate(shares):
        for j, table in enumerate(share):
            with pa.ipc.new_file(str(tmp / f"in_{rank}_{j}.arrow"), table.schema) as w:
                w.write_table(table)
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if backend == "gloo":
        env["DS_ACCELERATOR"] = "cpu"
    # NCCL: one GPU per rank, each rank's own as its cuda:0 (as Ray arranges for actors)
    gpu = (lambda rank: {"CUDA_VISIBLE_DEVICES": str(rank)}) if backend == "nccl" else (lambda rank: {})
    procs = [subprocess.Popen([sys.executable, str(WORKER), model_dir, str(rank), str(len(shares)), str(port),
                               offload, str(tmp), str(len(share)), backend, dtype], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, **gpu(rank)})
             for rank, share in enumerate(shares)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]  # out of step: gloo aborts, NCCL would hang (timeout)
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [json.loads((tmp / f"meta_{rank}.json").read_text()) for rank in range(len(shares))]


def assert_tables_close(got: pa.Table, want: pa.Table, atol: float) -> None:
    """Two teacher tables: the same rows and top-k ids, the float columns within atol."""
    assert got.column("sample_id").to_pylist() == want.column("sample_id").to_pylist()
    for col in COLUMNS:
        for g, w in zip(list_rows(got.column(col)), list_rows(want.column(col)), strict=True):
            if col == "topk_ids":
                np.testing.assert_array_equal(g, w)
            else:
                np.testing.assert_allclose(g, w, rtol=0, atol=atol)


@pytest.mark.parametrize("family,offload,shape,dtype,tied", [
    ("qwen3", "none", "unequal", "float32", False),  # rank 0: 3 + 2 row chunks, rank 1: 1 (stand-ins, padding)
    ("gemma2", "cpu", "one_idle", "float32", False),  # soft-capped head; rank 1 has no table at all
    ("llama", "none", "unequal", "float32", True),  # the lm_head is the (partitioned) embedding matrix
    ("qwen3", "cpu", "unequal", "bfloat16", False),  # the dtype of paper-scale runs (DeepSpeed's bf16 section)
])
def test_zero3_teacher_equals_whole_teacher(tmp_path, family, offload, shape, dtype, tied):
    model_dir = str(build_family_model(tmp_path / family, family, extra_rows=5, seed=3, tie_word_embeddings=tied))
    tok = load_tokenizer(model_dir)
    tables = [_table(tok, n_rows=5, seed=1), _table(tok, n_rows=3, seed=2), _table(tok, n_rows=2, seed=3)]
    shares = [tables[:2], tables[2:]] if shape == "unequal" else [tables, []]
    metas = run_group(model_dir, shares, offload, tmp_path, dtype=dtype)

    for meta in metas:  # really partitioned: each rank holds about half of the elements
        assert meta["local"] <= 0.55 * meta["total"], meta
        assert meta["partitions"]["devices"] == ["cpu"]
    whole = TeacherScorer(model_dir, top_k=K, vocab_size=len(tok), pad_id=tok.pad_token_id, chunk_size=CHUNK,
                          max_batch=MAX_BATCH, device="cpu", dtype=dtype)
    # The same arithmetic on the same weights, in bf16 too (measured: bit-equal on CPU; a float32 model instead
    # of the bf16 one would differ by 0.03-0.07 nats, a model not loaded from the checkpoint by whole nats).
    atol = 1e-5
    for rank, share in enumerate(shares):
        assert len(metas[rank]["stats"]) == len(share)
        for j, table in enumerate(share):
            got = pa.ipc.open_file(str(tmp_path / f"out_{rank}_{j}.arrow")).read_all()
            want, want_stats = whole.score(table)
            assert_tables_close(got, want, atol=atol)
            got_stats = metas[rank]["stats"][j]
            assert got_stats["teacher/entropy_rollout"] == pytest.approx(want_stats["teacher/entropy_rollout"],
                                                                         abs=atol)
