"""One rank of a ZeRO-3 teacher group, as its own process (tests/test_teacher_zero3.py starts them).

A separate process per rank, because `HfDeepSpeedConfig` switches every later `from_pretrained` of the
process to zero.Init. Usage: python tests/zero3_worker.py MODEL RANK WORLD PORT OFFLOAD DIR N_TABLES [BACKEND [DTYPE]]
(gloo and float32 by default) reads DIR/in_{RANK}_{j}.arrow, writes DIR/out_{RANK}_{j}.arrow and DIR/meta_{RANK}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.teacher.zero3 import ShardedTeacherScorer  # noqa: E402
from eopd_ray.models import load_tokenizer  # noqa: E402

K, CHUNK, MAX_BATCH = 8, 6, 2  # small chunks and row batches: several of each, different counts per rank


def main(model: str, rank: int, world: int, port: int, offload: str, out: Path, n_tables: int,
         backend: str = "gloo", dtype: str = "float32") -> None:
    tok = load_tokenizer(model)
    scorer = ShardedTeacherScorer(model, top_k=K, vocab_size=len(tok), pad_id=tok.pad_token_id, rank=rank,
                                  world_size=world, chunk_size=CHUNK, max_batch=MAX_BATCH, offload=offload,
                                  persistence_threshold=0, num_threads=1, backend=backend, dtype=dtype)
    scorer.setup("127.0.0.1", port)
    tables = [pa.ipc.open_file(str(out / f"in_{rank}_{j}.arrow")).read_all() for j in range(n_tables)]
    *scored, stats = scorer.score_shards(*tables)
    for j, table in enumerate(scored):
        with pa.ipc.new_file(str(out / f"out_{rank}_{j}.arrow"), table.schema) as w:
            w.write_table(table)
    local, total = scorer.partition_numel()
    parts = [p.ds_tensor for p in scorer.model.parameters()]
    where = {"devices": sorted({t.device.type for t in parts}), "pinned": all(t.is_pinned() for t in parts)}
    (out / f"meta_{rank}.json").write_text(json.dumps({"local": local, "total": total, "stats": stats,
                                                       "device": str(scorer.device), "partitions": where}))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), int(a[3]), a[4], Path(a[5]), int(a[6]), *a[7:9])
