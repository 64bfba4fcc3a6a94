"""The overlapped step (rollout.overlap) against the synchronous one, in one Ray session, side by side.

    python examples/benchmarks/overlap.py                 # tiny models, B = 32, 3 blocks of each mode
    python examples/benchmarks/overlap.py --quick         # B = 8, 1 block of 3 steps each

One session of the main job's actors (`actors.driver.session.Session.build`: 1 rollout worker, 1 teacher,
1 student rank, ZeRO-0, every actor at its default threads: its Ray CPUs, 1) runs blocks of synchronous steps
(`actors.driver.phases.iteration`) and blocks of overlapped steps (the same call with the next step's
prompts, as the training loop passes them with rollout.overlap=true), alternating. Within an overlapped
block the first step only starts the pipeline (its own rollouts are not generated ahead) and the last does
not generate ahead (so that the next synchronous block starts clean); both are left out, and the figure is
the median overlapped step in steady state over the median synchronous step.

Ideal: from the synchronous steps' own phase times, max(phases) / sum(phases) (every phase overlapped with
every other, as the issue defines it), and the bound of this schedule, which overlaps only generation with
scoring + training: (max(rollout, score + train) + sync) / sum(phases).
"""

from __future__ import annotations

import time

import _common as C  # noqa: E402  (sets sys.path and the Ray environment)


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--blocks", type=int, default=0, help="blocks of each mode (default 3; quick 2)")
    p.add_argument("--block-steps", type=int, default=0, help="steps per block, at least 3 (default 4; quick 3)")
    p.add_argument("--batch", type=int, default=0, help="prompts per step B (default 32; quick 8)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="response length cap (default 40; quick 16)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    q = args.quick
    blocks = args.blocks or args.reps or (1 if q else 3)
    per_block = max(3, args.block_steps or (3 if q else 4))
    batch = args.batch or (8 if q else 32)
    max_new = args.max_new_tokens or (16 if q else 40)
    teacher_dir, student_dir = C.tiny_pair(args.teacher, args.student)
    report = C.Report("overlap")

    from actors.driver.build import actor_threads
    from actors.driver.phases import iteration
    from actors.driver.session import Session
    from eopd_ray.config import load_config
    from eopd_ray.run_setup import load_data, resolve_models

    total = 2 * blocks * per_block
    cfg = load_config(None, [f"model.teacher={teacher_dir}", f"model.student={student_dir}",
                             f"trainer.batch_size={batch}", f"trainer.mini_batch_size={min(8, batch)}",
                             f"trainer.max_steps={total}", f"rollout.max_new_tokens={max_new}",
                             "rollout.num_workers=1", "teacher.num_workers=1", "trainer.num_ranks=1",
                             "data.num_train_problems=4096", "eval.enabled=false"])
    models, tokenizer = resolve_models(cfg)
    sampler, _ = load_data(cfg, tokenizer)
    batches = [sampler.next_batch() for _ in range(total + 1)]
    report.config = {"blocks": blocks, "block_steps": per_block, "batch_size": batch, "max_new_tokens": max_new,
                     "teacher": teacher_dir, "student": student_dir,
                     "actor_threads": {r: actor_threads(cfg, r) for r in ("rollout", "teacher", "student")}}
    ray = C.init_local_ray()
    session = Session.build(cfg, models)
    rows = {"sync": [], "overlap": []}
    step = 0
    try:
        for b in range(2 * blocks):
            mode = ("sync", "overlap")[b % 2]
            C.progress("overlap", f"block {b + 1}/{2 * blocks}: {per_block} {mode} steps from step {step + 1}")
            for i in range(per_block):
                ahead = mode == "overlap" and i < per_block - 1
                row = iteration(session, step, batches[step], batches[step + 1] if ahead else None)
                if mode == "sync" or 0 < i < per_block - 1:  # steady state only
                    rows[mode].append(row)
                step += 1
    finally:
        session.shutdown()
        ray.shutdown()

    phases = ("time/rollout", "time/score", "time/train_phase")
    for mode, rs in rows.items():
        report.rows.append({"mode": mode, "steps": len(rs), "step_s": C.median([r["time/step"] for r in rs]),
                            **{f"{ph.split('/')[1]}_s": C.median([r[ph] for r in rs]) for ph in phases},
                            "sync_s": C.median([r["time/step"] - sum(r[ph] for ph in phases) for r in rs]),
                            "pg_ratio_mean": C.median([r["pg/ratio_mean"] for r in rs])})
    sync_step = C.median([r["time/step"] for r in rows["sync"]])
    over_step = C.median([r["time/step"] for r in rows["overlap"]])
    med = {ph: C.median([r[ph] for r in rows["sync"]]) for ph in phases}
    med_sync = C.median([r["time/step"] - sum(r[ph] for ph in phases) for r in rows["sync"]])
    parts = [*med.values(), med_sync]
    report.add("step_time_ratio", over_step / sync_step, "x", note="overlapped step / synchronous step (medians)")
    report.add("ideal_ratio", max(parts) / sum(parts), "x",
               note="max(phases) / sum(phases) of the synchronous steps")
    report.add("schedule_bound_ratio",
               (max(med["time/rollout"], med["time/score"] + med["time/train_phase"]) + med_sync) / sum(parts), "x",
               note="(max(rollout, score + train) + sync) / sum: what overlapping generation alone can give")
    report.add("sync_step_s", sync_step, "s")
    report.add("overlap_step_s", over_step, "s")
    report.add("overlap_ratio_mean", C.median([r["pg/ratio_mean"] for r in rows["overlap"]]), "",
               note="pg/ratio_mean of the overlapped steps (one step off-policy)")
    report.extra["steps"] = {m: [{k: r[k] for k in ("step", "time/step", *phases, "pg/ratio_mean")} for r in rs]
                             for m, rs in rows.items()}
    report.print()
    report.write(args.json, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
