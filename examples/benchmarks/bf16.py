"""bf16 against fp32 on the real-model preset (examples/configs/smollm2_prune.yaml), CPU, transformers engine.

    python examples/benchmarks/bf16.py            # 4 steps per run, three runs, evaluation on 8 problems (~17 min)
    python examples/benchmarks/bf16.py --quick    # 2 steps per run, smaller batch, evaluation on 4 problems

Three runs of the preset as the user starts it (`examples/train_eopd.py --config ...`), one after another, at
`trainer.zero_stage=1` (bf16 needs a ZeRO optimizer for its fp32 master weights; fp32 runs at the same stage so
only the dtype differs):

    fp32 (trainer.seed=0), bf16 (model.dtype=bfloat16 model.teacher_dtype=bfloat16, seed 0), fp32 (seed 1)

Figures:
- `bf16/step_time_ratio` (target <= 0.6): the median over steps 2..N of bf16's step time over the mean of the
  two fp32 runs' time of the same step (the first step warms the actors up), with the spread of those per-step
  ratios; the same for each phase (rollout, teacher scoring, training, weight sync). Each run samples its own
  responses, so the work of a step differs between runs: `*/tokens_per_step` says by how much, and
  `*_time_per_token_ratio` divides each step by its response tokens (fixed costs make a short step's time per
  token larger, so that one penalises whichever run sampled less). Neither is a same-work comparison.
- held-out fidelity (exact full-vocabulary reverse KL to the teacher, eval.fidelity) of the trained student in
  each run, and `bf16/fidelity_gap_over_seed_gap`: |bf16 - fp32 seed 0| over |fp32 seed 1 - fp32 seed 0|, the
  distance bf16 moves the result against the distance a second sampling seed moves it (target <= 1: bf16
  within the seed's noise). One pair of seeds is a coarse measure of that noise; the note says so. Each run's
  evaluation runs its models in the run's dtypes, as the user's run would.
- `bf16/same_work_{score,train}_time_ratio`: the same-work comparison the runs cannot give: teacher scoring and
  one student training step (ZeRO-1) in bf16 and in fp32 on one rollout table, interleaved in this process.

Whether the CPU has bf16 dot-product instructions (`avx512_bf16`, `amx_bf16`) is recorded: without them bf16
matmuls run through conversions and bf16 is slower than fp32, with them it can be faster.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import _common as C  # noqa: E402  (sets sys.path and the Ray environment)
from peak import bf16_native, cpu_flags  # noqa: E402
from real_preset import PHASES, PRESET, run_preset  # noqa: E402

BF16 = ["model.dtype=bfloat16", "model.teacher_dtype=bfloat16"]
RUNS = (("fp32_seed0", [], 0), ("bf16_seed0", BF16, 0), ("fp32_seed1", [], 1))


def student_reverse_kl(out: Path, name: str = "student") -> float | None:
    """The held-out reverse KL of `name` ("student": the trained one) in a run's results.json."""
    ev = json.loads((out / "results.json").read_text())["eval"]
    return ((ev.get(name) or {}).get("fidelity") or {}).get("reverse_kl")


def time_ratios(rows: dict[str, list[dict]], key: str) -> tuple[list[float], list[float]]:
    """Per step after the first: bf16's `key` time over the mean of the two fp32 runs', per response token
    (`rollout/tokens`) and plain. Steps missing the key in any run are left out."""
    per_token, plain = [], []
    for b, a0, a1 in zip(*(rows[n][1:] for n in ("bf16_seed0", "fp32_seed0", "fp32_seed1"))):
        if not all(key in r for r in (b, a0, a1)):
            continue
        # per response token: on-policy runs sample responses of different lengths (a step of 75 tokens
        # against one of 243 was seen), and every phase's work grows with them
        t = [r[key] / max(r["rollout/tokens"], 1) for r in (b, a0, a1)]
        per_token.append(t[0] / ((t[1] + t[2]) / 2))
        plain.append(b[key] / ((a0[key] + a1[key]) / 2))
    return per_token, plain


def same_work(setup, reps: int, rows: int) -> dict:
    """Teacher scoring and one student training step in fp32 and in bf16 on the same rollout table (the preset's
    first `rows` held-out prompts, sampled once by the fp32 student), interleaved in this process at the
    preset's actor threads: {"score": Timings, "train": Timings, "tokens": int}."""
    from actors.rollout.engine import SamplingParams
    from actors.rollout.worker import RolloutWorker
    from actors.runtime.dist import free_port
    from actors.student.trainer import StudentTrainer
    from actors.teacher.scorer import TeacherScorer
    import dataclasses

    cfg, m = setup.cfg, setup.models
    threads = cfg.placement.actor_threads or 2
    recs = setup.eval_recs[:rows]
    worker = RolloutWorker(m.student_path, vocab_size=m.vocab_size, num_threads=threads)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=cfg.rollout.max_new_tokens, seed=0)
    table, _ = worker.rollout([r.id for r in recs], [r.prompt_ids for r in recs], [r.answer for r in recs], params)
    del worker
    trainer_cfg = dataclasses.replace(cfg.trainer, zero_stage=1, batch_size=len(recs), mini_batch_size=len(recs))
    scorers, trainers = {}, {}
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        scorers[name] = TeacherScorer(m.teacher_path, top_k=cfg.loss.top_k, vocab_size=m.vocab_size,
                                      pad_id=m.pad_id, dtype=dtype, num_threads=threads)
        trainers[name] = StudentTrainer(m.student_path, trainer_cfg, cfg.loss, rank=0, world_size=1,
                                        vocab_size=m.vocab_size, pad_id=m.pad_id, dtype=dtype, num_threads=threads)
        trainers[name].setup("127.0.0.1", free_port())
    scored = scorers["fp32"].score(table)[0]
    score = C.interleaved({n: (lambda s=s: s.score(table)) for n, s in scorers.items()}, reps)
    steps = iter(range(10 ** 6))
    train = C.interleaved({n: (lambda t=t: t.train_step(next(steps), 1, table, scored)) for n, t in trainers.items()},
                          reps)
    return {"score": score, "train": train, "tokens": sum(len(r) for r in table.column("response_ids").to_pylist())}


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--steps", type=int, default=0, help="steps per run (default 4; quick 2)")
    p.add_argument("--out", default="", help="run directories (default: a temporary directory)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    steps = args.steps or (2 if args.quick else 4)
    common = ["rollout.engine=transformers", "trainer.zero_stage=1", "eval.k=2",
              f"data.num_eval_problems={4 if args.quick else 8}"]
    if args.quick:
        common += ["trainer.batch_size=8", "trainer.mini_batch_size=4"]
    base = Path(args.out or tempfile.mkdtemp(prefix="bf16-"))
    from eopd_ray.config import load_config
    from eopd_ray.run_setup import prepare_run

    setup = prepare_run(load_config(str(PRESET), ["out_dir=" + str(base / "prepare")]))  # convert + prune, cached
    report = C.Report("bf16")
    flags = sorted({"avx512_bf16", "amx_bf16", "amx_tile"} & cpu_flags())
    report.config = {"preset": str(PRESET.relative_to(C.ROOT)), "steps": steps, "overrides": common,
                     "runs": {name: over + [f"trainer.seed={seed}"] for name, over, seed in RUNS},
                     "cpu_bf16_flags": flags}
    report.notes.append(f"CPU bf16 instructions: {', '.join(flags) or 'none'} "
                        f"({'native' if bf16_native() else 'emulated'} bf16 matmuls)")
    rows, rkl = {}, {}
    for name, over, seed in RUNS:
        out = base / name
        rows[name] = run_preset(out, steps, common + over + [f"trainer.seed={seed}"], evaluate=True, bench="bf16")
        rkl[name] = student_reverse_kl(out)
        if name == "fp32_seed0":
            rkl["initial"] = student_reverse_kl(out, "student_initial")
    for k in PHASES:
        ratios, raw = time_ratios(rows, k)
        if not ratios:
            continue
        phase = k.split("/")[1]
        report.add_repeated(f"{phase}_time_ratio", raw, "x", "<= 0.6" if phase == "step" else None,
                            note=f"bf16 {k} over the mean of the two fp32 runs', steps 2..{steps}")
        report.add_repeated(f"{phase}_time_per_token_ratio", ratios, "x",
                            note="the same per response token (fixed costs weigh on the shorter run)")
        for n in rows:
            report.add(f"{n}/{phase}_s", C.median([r[k] for r in rows[n][1:] if k in r]), "s",
                       note=f"median of steps 2..{steps}")
    for n in rows:
        report.add(f"{n}/tokens_per_step", C.median([r["rollout/tokens"] for r in rows[n][1:]]), "tokens",
                   note=f"median of steps 2..{steps}")
    C.progress("bf16", "same work: teacher scoring and a training step, fp32 and bf16 interleaved")
    work = same_work(setup, reps=3 if args.quick else 5, rows=8 if args.quick else 16)
    for phase in ("score", "train"):
        t = work[phase]
        report.add_repeated(f"same_work_{phase}_time_ratio", C.pair_ratios(t["bf16"], t["fp32"]), "x",
                            note=f"bf16 over fp32 on one rollout table of {work['tokens']} response tokens, "
                                 "interleaved in one process")
        for n in ("fp32", "bf16"):
            report.add(f"same_work_{phase}_{n}_s", C.median(t[n]), "s")
    for n, v in rkl.items():
        if v is not None:
            report.add(f"{n}/held_out_reverse_kl", v, "nats/token",
                       note="initial student" if n == "initial" else "trained student, exact full-vocabulary")
    if None not in (rkl["fp32_seed0"], rkl["fp32_seed1"], rkl["bf16_seed0"]):
        seed_gap = abs(rkl["fp32_seed1"] - rkl["fp32_seed0"])
        gap = abs(rkl["bf16_seed0"] - rkl["fp32_seed0"])
        report.add("fidelity_gap_over_seed_gap", gap / seed_gap if seed_gap > 0 else float("inf"), "x", "<= 1",
                   note=f"|bf16 - fp32| = {gap:.4f} against |fp32 seed 1 - seed 0| = {seed_gap:.4f}; one seed "
                        "pair: a coarse measure of the noise")
    report.rows = [{"run": n, **{k.split("/")[1]: round(C.median([r[k] for r in rs[1:] if k in r]), 2)
                                 for k in PHASES if any(k in r for r in rs[1:])},
                    "tokens/step": C.median([r["rollout/tokens"] for r in rs[1:]]),
                    "held_out_reverse_kl": rkl.get(n)} for n, rs in rows.items()]
    report.print()
    report.write(args.json, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
