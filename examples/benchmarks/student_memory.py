"""The student step's memory and time with the chunked logits path against the full logits, at the paper's
vocabulary and response length.

    python examples/benchmarks/student_memory.py                 # random Qwen3, V = 151,936, T = 4,096
    python examples/benchmarks/student_memory.py --quick         # T = 256

One `StudentTrainer.train_step` (the product's own: Arrow -> tensors, forward, loss, backward, AdamW; ZeRO-0,
world size 1, objective eopd) on one row of a 16-token prompt and a T-token response, the same trainer and
batch, with `trainer.logits_chunk` switched between 0 (the full [1, L, V] logits of the model's forward) and
the chunk the default (-1, auto) runs at this vocabulary, 256 (`eopd_ray.objectives.core.LOGITS_CHUNK`), on
alternate calls (lr 1e-7, so the model barely moves). Time: median of paired ratios over interleaved
repetitions. Memory: peak RSS growth over the step (`_common.peak_rss_growth`), median of two each.
Targets: logits_peak_ratio <= 0.125, step_time_ratio <= 1.10 (the chunked path recomputes each chunk's head in
backward: one more head forward per step).
"""

from __future__ import annotations

import dataclasses
import time

import _common as C  # noqa: E402  (sets sys.path and the Ray environment)

from loss_overhead import K, TAU, make_tables  # noqa: E402


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--response-len", type=int, default=0, help="response tokens T (default 4096; quick 256)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    threads = C.set_threads(args)
    q = args.quick
    reps = args.reps or (1 if q else 3)
    T = args.response_len or (256 if q else 4096)
    args.no_large = False  # this benchmark is about the large vocabulary only
    spec = C.large_spec(args)
    report = C.Report("student_memory")

    from actors.runtime.dist import free_port
    from actors.student.trainer import StudentTrainer
    from eopd_ray.config import load_config
    from eopd_ray.models import load_tokenizer
    from eopd_ray.objectives import resolve_logits_chunk
    from eopd_ray.objectives.core import LOGITS_CHUNK

    path = C.random_model_dir(spec)
    tok = load_tokenizer(path)
    vocab = len(tok)
    cfg = load_config(None, ["trainer.batch_size=1", "trainer.mini_batch_size=1", "trainer.lr=1e-7",
                             "trainer.max_steps=1000", f"loss.top_k={K}", f"loss.tau={TAU}"])
    tr = StudentTrainer(path, cfg.trainer, cfg.loss, rank=0, world_size=1, vocab_size=vocab,
                        pad_id=tok.pad_token_id, num_threads=threads)
    tr.setup("127.0.0.1", free_port())
    rollout, teacher, n_tok = make_tables(tr.engine.module, vocab, 1, 16, T, seed=7)
    chunk = resolve_logits_chunk(cfg.trainer.logits_chunk, vocab) or LOGITS_CHUNK  # the default's chunk here
    trainers = {"full": dataclasses.replace(cfg.trainer, logits_chunk=0),
                "chunked": dataclasses.replace(cfg.trainer, logits_chunk=chunk)}
    losses = {}

    def run(name):
        def f():
            tr.trainer = trainers[name]
            losses[name] = tr.train_step(0, 1, rollout, teacher)["loss/total"]
        return f

    C.progress("student_memory", f"{spec.name}: one row, {n_tok} response positions, {reps} reps")
    times = C.interleaved({n: run(n) for n in trainers}, reps=reps, warmup=1)
    C.use_exact_malloc()
    mem = {n: [] for n in trainers}
    for r in range(2):
        for n in (list(trainers) if r % 2 == 0 else list(trainers)[::-1]):
            mem[n].append(C.peak_rss_growth(run(n))[0])
    peak = {n: C.median(v) for n, v in mem.items()}
    report.rows.append({"config": spec.name, "positions": n_tok, "chunk": chunk,
                        **{f"{n}_s": C.median(times[n]) for n in trainers},
                        **{f"{n}_peak_gib": peak[n] / C.GIB for n in trainers}})
    report.extra["seconds"] = {"wall": times, "cpu": times.cpu}
    report.add("logits_peak_ratio", peak["chunked"] / peak["full"], "x", "<= 0.125",
               f"peak RSS growth of a step, logits_chunk={chunk} over full logits, V={vocab}, T={n_tok}")
    report.add("step_time_ratio", C.paired_ratio(times["chunked"], times["full"]), "x", "<= 1.10",
               "the same pair's step time (median of paired ratios)")
    report.add("full_peak_gib", peak["full"] / C.GIB, "GiB")
    report.add("chunked_peak_gib", peak["chunked"] / C.GIB, "GiB")
    report.add("full_step_s", C.median(times["full"]), "s")
    report.add("chunked_step_s", C.median(times["chunked"]), "s")
    report.add("loss_abs_diff", abs(losses["chunked"] - losses["full"]), "",
               note="same-work check: loss/total of the two paths on the same batch")
    report.config = {"reps": reps, "threads": threads, "model": spec.key(), "response_len": T, "chunk": chunk}
    report.print()
    report.write(args.json, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
