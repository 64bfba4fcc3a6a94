"""The Ray pipeline's iteration time against the sum of its phases run alone in one process.

    python examples/benchmarks/pipeline_overhead.py                 # tiny models, B = 32, 6 timed steps
    python examples/benchmarks/pipeline_overhead.py --teacher T --student S --steps 10 --batch 64

Ray side: the main job's own pieces (`eopd_ray.run_setup.resolve_models` / `load_data`,
`actors.driver.session.Session.build` and `actors.driver.phases.iteration`, the loop body): 1 rollout worker,
1 teacher, 1 student rank (ZeRO-0); generate -> score -> train_step -> weight sync, timed by the driver.
Alone: the same phases with the plain classes in this process (`RolloutWorker.rollout`,
`TeacherScorer.score`, `StudentTrainer.train_step` with world size 1, `export_weights` +
`update_weights`), the same seeds and prompts, the same thread count.

Threads: the headline pass gives every actor, and each phase alone, the product's thread count for its role
(`actors.driver.build.actor_threads`: the actor's Ray CPUs, at least 1; 1 at the defaults); a second pass
(`threads{N}_*` figures; `placement.actor_threads=N`) sets N threads on both sides, N = `--actor-threads`
(default: every core this process may use). It runs only where N differs from the product's count for some
role, so the two passes never run the same settings (at the defaults on 2 cores: 1 thread, then 2).
`--threads` is not used here.

Against the machine's peak (`peak.py`, measured here at each phase's thread count and dtype before the
passes): the teacher's scoring and the student's training step as achieved FLOP/s, the useful FLOPs of the step
(`peak.model_flops`: 2 x params x tokens for the teacher's forward, 6 x for the student's forward + backward,
the output head at response positions only) over the phase's own time inside its actor (`time/teacher`,
`time/train`), as a fraction of the matmul peak for the phase's dtype: `phase/teacher_scoring_peak_fraction`
(target >= 0.5) and `phase/student_train_peak_fraction` (target >= 0.4), headline pass, median over steps with
their spread; the same for the phases alone in `rows`.

Both pipelines start from the same weights and see the same prompts and seeds, so they do the same work
step by step (the losses are compared as a check). Steps alternate Ray / alone (order flipped every step)
after one warm-up step each; the figure is the median over steps of (Ray step) / (sum of phases alone).
"""

from __future__ import annotations

import dataclasses
import os
import time

import _common as C  # noqa: E402  (sets sys.path and the Ray environment)
import peak  # noqa: E402
import torch  # noqa: E402


def run_pass(ctx: dict, threads: dict, actor_threads: int | None) -> dict:
    """One interleaved run: Ray pipeline and the phases alone, both built fresh from the model files.
    threads: {role: torch threads} of the phases alone; actor_threads: placement.actor_threads of every actor
    (None = the product's setting)."""
    from actors.driver.phases import iteration
    from actors.driver.session import Session
    from actors.rollout.worker import RolloutWorker
    from actors.runtime.dist import free_port
    from actors.student.trainer import StudentTrainer
    from actors.teacher.scorer import TeacherScorer
    from eopd_ray.batch import list_rows, teacher_prompt_rows

    cfg, models, batches, params = ctx["cfg"], ctx["models"], ctx["batches"], ctx["params"]
    if actor_threads:
        cfg = dataclasses.replace(cfg, placement=dataclasses.replace(cfg.placement, actor_threads=actor_threads))
    # ---- Ray: the main job's own actor build and step (actors/driver) ----------------------------------
    t0 = time.perf_counter()
    actors = Session.build(cfg, models)
    build_s = time.perf_counter() - t0

    def ray_step(step: int) -> dict:
        row = iteration(actors, step, batches[step])
        rollout, score, train = row["time/rollout"], row["time/score"], row["time/train_phase"]
        return {"rollout": rollout, "score": score, "train": train, "sync": row["time/step"] - rollout - score - train,
                "step": row["time/step"], "loss": row["loss/total"], "tokens": row["rollout/tokens"],
                "in_actor": {"rollout": row["time/generate"], "score": row["time/teacher"],
                             "train": row["time/train"], "sync": row["time/sync_load"]}}

    # ---- alone: the same phases with the plain classes in this process ------------------------------
    # One process: torch's thread count is global, so each phase sets its role's count before it runs.
    worker = RolloutWorker(models.student_path, vocab_size=models.vocab_size, num_threads=threads["rollout"])
    scorer = TeacherScorer(models.teacher_path, top_k=cfg.loss.top_k, vocab_size=models.vocab_size,
                           pad_id=models.pad_id, chunk_size=cfg.teacher.chunk_size, num_threads=threads["teacher"])
    trainer = StudentTrainer(models.student_path, cfg.trainer, cfg.loss, rank=0, world_size=1,
                             vocab_size=models.vocab_size, pad_id=models.pad_id, num_threads=threads["student"])
    trainer.setup("127.0.0.1", free_port())

    def local_step(step: int) -> dict:
        prompts = batches[step]
        t0 = time.perf_counter()
        torch.set_num_threads(threads["rollout"])
        table, stats = worker.rollout([r.id for r in prompts], [r.prompt_ids for r in prompts],
                                      [r.answer for r in prompts], params(step), cfg.rollout.n_samples_per_prompt)
        t1 = time.perf_counter()
        torch.set_num_threads(threads["teacher"])
        scored, _ = scorer.score(table)
        t2 = time.perf_counter()
        torch.set_num_threads(threads["student"])
        train = trainer.train_step(step, 1, table, scored)
        t3 = time.perf_counter()
        worker.update_weights(trainer.export_weights())
        t4 = time.perf_counter()
        responses = [len(r) for r in list_rows(table.column("response_ids"))]
        return {"rollout": t1 - t0, "score": t2 - t1, "train": t3 - t2, "sync": t4 - t3, "step": t4 - t0,
                "loss": train["loss/total"], "tokens": stats["rollout/tokens"],
                # what each phase computes over (the Ray side does the same work: checked by the losses)
                "counts": {"positions": sum(responses),
                           "teacher_tokens": sum(len(p) for p in teacher_prompt_rows(table)) + sum(responses),
                           "student_tokens": sum(len(p) for p in list_rows(table.column("prompt_ids")))
                           + sum(responses)}}

    res = {"ray": [], "alone": [], "build_s": build_s,
           "params": {"teacher": peak.matmul_params(scorer.model), "student": peak.matmul_params(trainer.engine.module)}}
    try:
        for step in range(len(batches)):
            for name in (["ray", "alone"] if step % 2 == 0 else ["alone", "ray"]):
                res[name].append((ray_step if name == "ray" else local_step)(step))
    finally:
        actors.shutdown()
    return res


def phase_fractions(report: C.Report, res: dict, threads: dict, peaks: dict, dtypes: dict) -> None:
    """Achieved FLOP/s of teacher scoring and student training, and their fraction of the matching matmul peak
    (module doc); steps after the first, Ray in-actor times as the figures, the phases alone as a row."""
    r, a = res["ray"][1:], res["alone"][1:]
    phases = {"teacher_scoring": ("teacher", "score", "teacher_tokens", False),
              "student_train": ("student", "train", "student_tokens", True)}
    row = {"pipeline": "achieved GFLOP/s: in actor / alone (peak)"}
    for name, (role, ph, tok_key, backward) in phases.items():
        flops = [peak.model_flops(res["params"][role], x["counts"][tok_key], x["counts"]["positions"], backward)
                 for x in a]
        pk = peaks[(threads[role], dtypes[role])]
        in_actor = [f / x["in_actor"][ph] / 1e9 for f, x in zip(flops, r)]
        alone = [f / x[ph] / 1e9 for f, x in zip(flops, a)]
        what = (f"{'6' if backward else '2'} x params x tokens over the {role} actor's own time, "
                f"{dtypes[role]} matmul peak {pk:.1f} GFLOP/s at {threads[role]} thread(s), this run")
        report.add_repeated(f"phase/{name}_gflops", in_actor, "GFLOP/s", note=what)
        report.add_repeated(f"phase/{name}_peak_fraction", [g / pk for g in in_actor], "",
                            ">= 0.5" if role == "teacher" else ">= 0.4", note=what)
        report.add_repeated(f"{name}_alone_peak_fraction", [g / pk for g in alone], "",
                            note=f"the same for the {role}'s phase alone in one process")
        row[f"{name}_gflops"] = f"{C.fmt(C.median(in_actor))} / {C.fmt(C.median(alone))} ({C.fmt(pk)})"
    row["params"] = {role: list(res["params"][role]) for role in ("teacher", "student")}
    report.rows.append(row)


def summarize(report: C.Report, prefix: str, res: dict, threads: dict) -> None:
    r, a = res["ray"][1:], res["alone"][1:]  # step 0 warms both up
    phases = ("rollout", "score", "train", "sync")
    n = sorted(set(threads.values()))
    label = f" ({'/'.join(map(str, n))} thread{'s' if max(n) > 1 else ''} per process)"
    for name, rows in (("ray", r), ("alone", a)):
        report.rows.append({"pipeline": name + label, **{f"{ph}_s": C.median([x[ph] for x in rows]) for ph in phases},
                            "step_s": C.median([x["step"] for x in rows]),
                            "tokens_per_step": C.median([x["tokens"] for x in rows])})
    report.rows.append({"pipeline": "ray in-actor" + label,
                        **{f"{ph}_s": C.median([x["in_actor"][ph] for x in r]) for ph in phases}})
    report.extra[f"{prefix or 'product_'}steps"] = {"ray": r, "alone": a, "actor_build_s": res["build_s"]}
    ratio = C.paired_ratio([x["step"] for x in r], [x["step"] for x in a])
    if prefix:
        report.add(f"{prefix}step_time_ratio", ratio, "x",
                   note=f"every actor and each phase alone at {label.strip(' ()')}")
        report.add(f"{prefix}ray_step_s", C.median([x["step"] for x in r]), "s")
        report.add(f"{prefix}alone_step_s", C.median([x["step"] for x in a]), "s")
        return
    report.add("step_time_ratio", ratio, "x", "<= 1.15", "Ray step / sum of phases alone, median of paired steps")
    report.add("ray_step_s", C.median([x["step"] for x in r]), "s")
    report.add("alone_step_s", C.median([x["step"] for x in a]), "s")
    for ph in phases:
        report.add(f"{ph}_ratio", C.paired_ratio([x[ph] for x in r], [x[ph] for x in a]), "x",
                   note=f"{ph} phase: Ray / alone")
    report.add("ray_transport_s", C.median([sum(x[ph] - x["in_actor"][ph] for ph in phases) for x in r]), "s",
               note="per step: driver-observed phase times minus the compute the actors report")
    report.add("ray_overhead_s", C.median([x["step"] - y["step"] for x, y in zip(r, a)]), "s",
               note="median per-step difference Ray - alone")
    report.add("loss_max_abs_diff", max(abs(x["loss"] - y["loss"]) for x, y in zip(res["ray"], res["alone"])), "",
               note="same work check: loss/total of Ray vs alone, every step")
    report.add("tokens_max_abs_diff", max(abs(x["tokens"] - y["tokens"]) for x, y in zip(res["ray"], res["alone"])),
               "tokens", note="same work check: rollout tokens of Ray vs alone")


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--steps", type=int, default=0, help="timed steps (default 6; quick 2)")
    p.add_argument("--batch", type=int, default=0, help="prompts per step B (default 32; quick 8)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="response length cap (default 40; quick 16)")
    p.add_argument("--actor-threads", type=int, default=0,
                   help="also run a diagnostic pass with every actor (and the lone process) at N torch threads "
                        "(default: every core; skipped where N is the product's count for every role)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    q = args.quick
    steps = args.steps or args.reps or (2 if q else 6)
    batch = args.batch or (8 if q else 32)
    mini = min(8, batch) if not q else 4
    max_new = args.max_new_tokens or (16 if q else 40)
    teacher_dir, student_dir = C.tiny_pair(args.teacher, args.student)
    report = C.Report("pipeline_overhead")
    report.config = {"steps": steps, "warmup_steps": 1, "batch_size": batch, "mini_batch_size": mini,
                     "max_new_tokens": max_new, "teacher": teacher_dir, "student": student_dir,
                     "rollout_workers": 1, "teacher_workers": 1, "student_ranks": 1}

    from actors.driver.build import actor_threads
    from actors.rollout.engine import SamplingParams
    from eopd_ray.config import load_config
    from eopd_ray.run_setup import load_data, resolve_models
    from eopd_ray.seeds import rollout_seed

    total = steps + 1
    cfg = load_config(None, [f"model.teacher={teacher_dir}", f"model.student={student_dir}",
                             f"trainer.batch_size={batch}", f"trainer.mini_batch_size={mini}",
                             f"trainer.max_steps={total}", f"rollout.max_new_tokens={max_new}",
                             "rollout.num_workers=1", "teacher.num_workers=1", "trainer.num_ranks=1",
                             "data.num_train_problems=2048", "eval.enabled=false"])
    models, tokenizer = resolve_models(cfg)
    sampler, _ = load_data(cfg, tokenizer)
    batches = [sampler.next_batch() for _ in range(total)]
    t = cfg.trainer

    def params(step: int, i: int = 0) -> SamplingParams:
        return SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens,
                              seed=rollout_seed(t.seed, step, i))

    product_threads = {r: actor_threads(cfg, r) for r in ("rollout", "teacher", "student")}  # what a run gives
    report.config["product_actor_threads"] = product_threads
    ray = C.init_local_ray()
    ctx = dict(cfg=cfg, models=models, batches=batches, params=params, ray=ray)
    passes = [("", product_threads, None)]  # headline: the product's setting, on both sides
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = args.actor_threads or cores
    if set(product_threads.values()) != {n}:
        passes.append((f"threads{n}_", dict.fromkeys(product_threads, n), n))
    else:
        report.notes.append(f"no second pass: {n} thread(s) per actor is the product's own setting (the headline)")
    report.config["passes"] = {prefix or "product": threads for prefix, threads, _ in passes}
    dtypes = {"teacher": peak.DTYPE_NAMES[cfg.model.teacher_dtype], "student": peak.DTYPE_NAMES[cfg.model.dtype]}
    C.progress("pipeline_overhead", f"matmul peaks at {sorted(set(product_threads.values()))} thread(s), {dtypes}")
    peaks = {(t, d): peak.matmul_gflops(d, t, reps=3 if q else 5, budget_s=0.5 if q else 1.0)["value"]
             for t in set(product_threads.values()) for d in set(dtypes.values())}
    report.extra["peaks_gflops"] = {f"{d}@{t}": v for (t, d), v in peaks.items()}
    for prefix, local_threads, override in passes:
        C.progress("pipeline_overhead", f"pass {prefix or 'product'}: {local_threads} threads per role")
        res = run_pass(ctx, local_threads, override)
        summarize(report, prefix, res, local_threads)
        if not prefix:
            phase_fractions(report, res, local_threads, peaks, dtypes)
    ray.shutdown()
    report.print()
    report.write(args.json, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
