"""Rollout tokens/s of the project's engine against a bare `model.generate` on the same model and prompts.

    python examples/benchmarks/rollout_throughput.py                 # tiny student + random V=151,936 model
    python examples/benchmarks/rollout_throughput.py --student DIR --batch 64 --max-new-tokens 128

Variants, run interleaved on one model object (`worker.engine.model`), the same left-padded prompts, the
same sampling settings (temperature 1, top-p 1, top-k off, KV cache) and the same seed, so every variant
samples the same tokens:
  bare    `model.generate(...)` returning only the sequences;
  engine  `TransformersEngine.generate` (adds per-step logits, behaviour log-probs and entropies);
  worker  `RolloutWorker.rollout` (engine + decoding, grading, the Arrow table).
tokens/s counts response tokens up to and including EOS. Target: worker >= 0.9 x bare.
"""

from __future__ import annotations

import time

import _common as C  # noqa: E402  (sets sys.path and the Ray environment)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def bench(name: str, model_path: str, prompts: list[np.ndarray], answers: list[str], max_new: int, reps: int,
          threads: int, report: C.Report, prefix: str) -> None:
    from actors.rollout.worker import RolloutWorker
    from actors.rollout.engine import SamplingParams

    worker = RolloutWorker(model_path, num_threads=threads)
    tok, model = worker.tokenizer, worker.engine.model
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=max_new, seed=5)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.from_numpy(np.asarray(p, dtype=np.int64))
        attn[i, width - len(p):] = 1

    @torch.no_grad()
    def bare() -> int:
        gen = torch.Generator().manual_seed(params.seed)  # the engine's seeding, so the same tokens come out
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=params.temperature,
                             top_p=params.top_p, top_k=0, max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        new = out[:, width:]
        n = 0
        for row in new:
            eos = (row == tok.eos_token_id).nonzero()
            n += int(eos[0]) + 1 if len(eos) else row.shape[0]
        return n

    def engine() -> int:
        return sum(len(r) for r in worker.engine.generate(prompts, params).response_ids)

    def rollout() -> int:
        _, stats = worker.rollout(list(range(len(prompts))), prompts, answers, params)
        return stats["rollout/tokens"]

    tokens: dict[str, int] = {}
    C.progress("rollout_throughput", f"{name}: {len(prompts)} prompts x {max_new} tokens, {reps} reps")
    times = C.interleaved({"bare": bare, "engine": engine, "worker": rollout}, reps=reps, warmup=1,
                          after=lambda n, res: tokens.__setitem__(n, res))
    tps = {k: tokens[k] / C.median(v) for k, v in times.items()}
    row = {"config": name, "vocab": len(tok), "batch": len(prompts), "max_new_tokens": max_new,
           "tokens": tokens["bare"], "bare_tok_s": tps["bare"], "engine_tok_s": tps["engine"],
           "worker_tok_s": tps["worker"], "engine_ratio": C.paired_ratio(times["bare"], times["engine"]),
           "worker_ratio": C.paired_ratio(times["bare"], times["worker"]),
           "worker_cpu_ratio": C.paired_ratio(times.cpu["bare"], times.cpu["worker"])}
    report.rows.append(row)
    report.extra[f"{prefix}seconds"] = {"wall": times, "cpu": times.cpu}
    # time ratios bare/variant = throughput ratios variant/bare (the token counts are equal, checked below)
    report.add(f"{prefix}ratio", row["worker_ratio"], "x", ">= 0.9", f"{name}: RolloutWorker.rollout / bare generate")
    report.add(f"{prefix}cpu_time_ratio", row["worker_cpu_ratio"], "x", ">= 0.9",
               "the same in process CPU time (load-robust)")
    report.add(f"{prefix}engine_ratio", row["engine_ratio"], "x", ">= 0.9",
               f"{name}: TransformersEngine.generate / bare generate")
    report.add(f"{prefix}worker_tokens_per_s", tps["worker"], "tok/s")
    report.add(f"{prefix}bare_tokens_per_s", tps["bare"], "tok/s")
    report.add(f"{prefix}token_count_diff", max(abs(tokens[k] - tokens["bare"]) for k in tokens), "tokens",
               note="same-work check: response tokens of engine/worker minus bare")


def main(argv=None) -> int:
    args = C.rollout_parser(__doc__, "default 40 (tiny), 48 (large)").parse_args(argv)
    t_start = time.perf_counter()
    threads = C.set_threads(args)
    q = args.quick
    reps, large_reps = C.repetitions(args, large_full=5)
    _, student = C.tiny_pair(args.teacher, args.student)
    report = C.Report("rollout_throughput")

    batch = args.batch or (8 if q else 32)
    max_new = args.max_new_tokens or (16 if q else 40)
    bench("student", student, *C.synthetic_prompts(student, batch), max_new, reps, threads, report, "")
    large = C.large_spec(args)
    cfg = {"reps": reps, "large_reps": large_reps, "threads": threads, "student": student, "batch": batch,
           "max_new_tokens": max_new}
    if large:
        lb = args.batch or (2 if q else 8)
        lt = args.max_new_tokens or (8 if q else 48)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(4, large.vocab, (16,), generator=gen).numpy().astype(np.int32) for _ in range(lb)]
        bench(large.name, C.random_model_dir(large), prompts, ["0"] * lb, lt, large_reps,
              threads, report, "large_vocab_")
        cfg.update(large=large.key(), large_batch=lb, large_max_new_tokens=lt)
    report.config = cfg
    report.print()
    report.write(args.json, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
