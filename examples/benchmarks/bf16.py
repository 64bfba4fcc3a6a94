"""bf16 against fp32 on the real-model preset (examples/configs/smollm2_prune.yaml), CPU, transformers engine.

    python examples/benchmarks/bf16.py            # 4 steps per run, three runs, evaluation on 8 problems (~20 min)
    python examples/benchmarks/bf16.py --quick    # 2 steps per run, smaller batch, evaluation on 4 problems

Three runs of the preset as the user starts it (`examples/train_eopd.py --config ...`), one after another, at
`trainer.zero_stage=1` (bf16 needs a ZeRO optimizer for its fp32 master weights; fp32 runs at the same stage so
only the dtype differs):

    fp32 (trainer.seed=0), bf16 (model.dtype=bfloat16 model.teacher_dtype=bfloat16, seed 0), fp32 (seed 1)

Figures:
- `bf16/step_time_ratio` (target <= 0.6): the median over steps 2..N of bf16's step time per response token
  over the mean of the two fp32 runs' of the same step (the first step warms the actors up), with the spread
  of those per-step ratios; the same for each phase (rollout, teacher scoring, training, weight sync). Per
  token, since each run samples its own responses and their lengths differ from step to step; fixed costs
  make a short step's time per token larger, so the normalisation penalises whichever run sampled less.
  `*_unnormalised`: the plain time ratios.
- held-out fidelity (exact full-vocabulary reverse KL to the teacher, eval.fidelity) of the trained student in
  each run, and `bf16/fidelity_gap_over_seed_gap`: |bf16 - fp32 seed 0| over |fp32 seed 1 - fp32 seed 0|, the
  distance bf16 moves the result against the distance a second sampling seed moves it (target <= 1: bf16
  within the seed's noise). One pair of seeds is a coarse measure of that noise; the note says so. Each run's
  evaluation runs its models in the run's dtypes, as the user's run would.

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

    prepare_run(load_config(str(PRESET), ["out_dir=" + str(base / "prepare")]))  # convert + prune, cached
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
        ratios, raw = [], []
        for b, a0, a1 in zip(rows["bf16_seed0"][1:], rows["fp32_seed0"][1:], rows["fp32_seed1"][1:]):
            if not all(k in r for r in (b, a0, a1)):
                continue
            # per response token: on-policy runs sample responses of different lengths (a step of 75 tokens
            # against one of 243 was seen), and every phase's work grows with them
            per_tok = [r[k] / max(r["rollout/tokens"], 1) for r in (b, a0, a1)]
            ratios.append(per_tok[0] / ((per_tok[1] + per_tok[2]) / 2))
            raw.append(b[k] / ((a0[k] + a1[k]) / 2))
        if not ratios:
            continue
        phase = k.split("/")[1]
        report.add_repeated(f"{phase}_time_ratio", ratios, "x", "<= 0.6" if phase == "step" else None,
                            note=f"bf16 {k} per response token over the mean of the two fp32 runs', steps 2..{steps}")
        report.add_repeated(f"{phase}_time_ratio_unnormalised", raw, "x",
                            note="the same, not divided by the tokens of each step")
        for n in rows:
            report.add(f"{n}/{phase}_s", C.median([r[k] for r in rows[n][1:] if k in r]), "s",
                       note=f"median of steps 2..{steps}")
    for n in rows:
        report.add(f"{n}/tokens_per_step", C.median([r["rollout/tokens"] for r in rows[n][1:]]), "tokens",
                   note=f"median of steps 2..{steps}")
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
