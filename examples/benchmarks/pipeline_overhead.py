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
(`--actor-threads N`, default 1, skipped with --quick; `placement.actor_threads=N`) sets N threads on both
sides. At the defaults both passes run 1 thread, so their difference is this machine's run-to-run spread.
`--threads` is not used here.

Both pipelines start from the same weights and see the same prompts and seeds, so they do the same work
step by step (the losses are compared as a check). Steps alternate Ray / alone (order flipped every step)
after one warm-up step each; the figure is the median over steps of (Ray step) / (sum of phases alone).
"""

from __future__ import annotations

import dataclasses
import time

import _common as C  # noqa: E402  (sets sys.path and the Ray environment)
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
        return {"rollout": t1 - t0, "score": t2 - t1, "train": t3 - t2, "sync": t4 - t3, "step": t4 - t0,
                "loss": train["loss/total"], "tokens": stats["rollout/tokens"]}

    res = {"ray": [], "alone": [], "build_s": build_s}
    try:
        for step in range(len(batches)):
            for name in (["ray", "alone"] if step % 2 == 0 else ["alone", "ray"]):
                res[name].append((ray_step if name == "ray" else local_step)(step))
    finally:
        actors.shutdown()
    return res


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
                        "(default: N = 1 except with --quick)")
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
    if args.actor_threads or not q:
        n = args.actor_threads or 1
        passes.append((f"threads{n}_", dict.fromkeys(product_threads, n), n))
    for prefix, local_threads, override in passes:
        C.progress("pipeline_overhead", f"pass {prefix or 'product'}: {local_threads} threads per role")
        res = run_pass(ctx, local_threads, override)
        summarize(report, prefix, res, local_threads)
    ray.shutdown()
    report.print()
    report.write(args.json, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
