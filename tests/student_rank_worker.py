"""One rank of a student trainer group, as its own process (tests/test_split_invariance.py starts them).

A process per rank, because torch.distributed holds one default group per process. Usage:
python tests/student_rank_worker.py MODEL RANK WORLD PORT DIR reads DIR/rollout.arrow, DIR/teacher.arrow and
DIR/runs.json (a list of config override lists), runs one StudentTrainer per run (one train_step each) and
writes DIR/metrics_{RUN}_{RANK}.json and, on rank 0, DIR/weights_{RUN}.pt (the full float32 weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.student.trainer import StudentTrainer  # noqa: E402
from eopd_ray.config import load_config  # noqa: E402
from eopd_ray.models import load_tokenizer  # noqa: E402


def main(model: str, rank: int, world: int, port: int, out: Path) -> None:
    tok = load_tokenizer(model)
    rollout = pa.ipc.open_file(str(out / "rollout.arrow")).read_all()
    teacher = pa.ipc.open_file(str(out / "teacher.arrow")).read_all()
    for run, overrides in enumerate(json.loads((out / "runs.json").read_text())):
        cfg = load_config(None, overrides)
        tr = StudentTrainer(model, cfg.trainer, cfg.loss, rank=rank, world_size=world, vocab_size=len(tok),
                            pad_id=tok.pad_token_id, num_threads=1)
        tr.setup("127.0.0.1", port)  # joins the process group once; later runs reuse it
        metrics = tr.train_step(0, 1, rollout, teacher)
        state = tr._full_state()
        (out / f"metrics_{run}_{rank}.json").write_text(json.dumps(metrics))
        if rank == 0:
            torch.save({k: v.float() for k, v in state.items()}, out / f"weights_{run}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
