"""vLLM rollout tokens/s: the project's vLLM engine against a bare `LLM.generate`, and against the transformers
engine, side by side in one process (vLLM's CPU build on a CPU machine).

    python examples/benchmarks/vllm_rollout.py                  # tiny student + a random hidden-512, 4-layer Qwen3
    python examples/benchmarks/vllm_rollout.py --quick --no-large

vLLM variants, run interleaved on one `LLM` object (`worker.engine.llm`), the same prompts and the same
per-request vLLM SamplingParams (`actors.rollout.vllm_engine.vllm_requests`: temperature 1, top-p 1, the sampled
token's log-prob, a seed per request), so all three sample the same tokens:
  bare    `LLM.generate(...)`, outputs left as vLLM returns them;
  engine  `VLLMEngine.generate` (adds the per-token log-prob arrays);
  worker  `RolloutWorker.rollout` on the vLLM engine (engine + decoding, grading, the Arrow table).
Then `RolloutWorker.rollout` on the transformers engine with the same prompts, length and thread count:
tokens/s of each engine (they sample different tokens; tokens/s counts response tokens including EOS).
Target: vLLM worker >= 0.9 x bare.
"""

from __future__ import annotations

import time

import _common as C  # noqa: E402  (sets sys.path and the Ray environment)

import numpy as np  # noqa: E402


def bench(name: str, model_path: str, prompts: list[np.ndarray], answers: list[str], max_new: int, reps: int,
          threads: int, report: C.Report, prefix: str) -> None:
    from actors.rollout.worker import RolloutWorker
    from actors.rollout.engine import SamplingParams
    from actors.rollout.vllm_engine import vllm_requests

    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=max_new, seed=5)
    ids = list(range(len(prompts)))
    C.progress("vllm_rollout", f"{name}: {len(prompts)} prompts x {max_new} tokens, {reps} reps")
    worker = RolloutWorker(model_path, engine="vllm", num_threads=threads, engine_kwargs=dict(
        max_model_len=max(len(p) for p in prompts) + max_new, kv_cache_gib=0.5))
    llm = worker.engine.llm

    def bare() -> int:
        outputs = llm.generate(*vllm_requests(prompts, params), use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    def engine() -> int:
        return sum(len(r) for r in worker.engine.generate(prompts, params).response_ids)

    def rollout() -> int:
        return worker.rollout(ids, prompts, answers, params)[1]["rollout/tokens"]

    tokens: dict[str, int] = {}
    times = C.interleaved({"bare": bare, "engine": engine, "worker": rollout}, reps=reps, warmup=1,
                          after=lambda n, res: tokens.__setitem__(n, res))
    worker.engine.shutdown()
    hf = RolloutWorker(model_path, engine="transformers", num_threads=threads)
    hf_tokens: list[int] = []
    hf_times = C.interleaved({"transformers": lambda: hf.rollout(ids, prompts, answers, params)[1]["rollout/tokens"]},
                             reps=reps, warmup=1, after=lambda n, res: hf_tokens.append(res))
    tps = {k: tokens[k] / C.median(v) for k, v in times.items()}
    hf_tps = C.median(hf_tokens) / C.median(hf_times["transformers"])
    row = {"config": name, "batch": len(prompts), "max_new_tokens": max_new, "tokens": tokens["bare"],
           "bare_tok_s": tps["bare"], "engine_tok_s": tps["engine"], "worker_tok_s": tps["worker"],
           "transformers_worker_tok_s": hf_tps, "worker_ratio": C.paired_ratio(times["bare"], times["worker"]),
           "engine_ratio": C.paired_ratio(times["bare"], times["engine"])}
    report.rows.append(row)
    report.extra[f"{prefix}seconds"] = {"wall": times, "cpu": times.cpu, "transformers": hf_times}
    report.add(f"{prefix}worker_ratio", row["worker_ratio"], "x", ">= 0.9",
               f"{name}: RolloutWorker.rollout on vLLM / bare LLM.generate")
    report.add(f"{prefix}engine_ratio", row["engine_ratio"], "x", ">= 0.9",
               f"{name}: VLLMEngine.generate / bare LLM.generate")
    report.add(f"{prefix}vllm_worker_tokens_per_s", tps["worker"], "tok/s", note=f"{name}, {threads} thread(s)")
    report.add(f"{prefix}transformers_worker_tokens_per_s", hf_tps, "tok/s", note=f"{name}, {threads} thread(s)")
    report.add(f"{prefix}vllm_over_transformers", tps["worker"] / hf_tps, "x",
               note="tokens/s of the vLLM worker over the transformers worker")
    report.add(f"{prefix}token_count_diff", max(abs(tokens[k] - tokens["bare"]) for k in tokens), "tokens",
               note="same-work check: response tokens of engine/worker minus bare")


def main(argv=None) -> int:
    args = C.rollout_parser(__doc__, "default 64 (quick 16)").parse_args(argv)
    t_start = time.perf_counter()
    threads = C.set_threads(args)
    q = args.quick
    reps, large_reps = C.repetitions(args, large_full=5)
    _, student = C.tiny_pair(args.teacher, args.student)
    report = C.Report("vllm_rollout")

    batch = args.batch or (8 if q else 32)
    max_new = args.max_new_tokens or (16 if q else 64)
    prompts, answers = C.synthetic_prompts(student, batch)
    bench("tiny student", student, [np.asarray(p) for p in prompts], answers, max_new, reps, threads, report, "")
    cfg = {"reps": reps, "threads": threads, "student": student, "batch": batch, "max_new_tokens": max_new}
    if not args.no_large:
        # head_dim 64 (a size vLLM's CPU attention takes); a small vocabulary keeps the head cheap
        spec = C.RandomSpec(hidden=args.hidden or (128 if q else 512), layers=args.layers or (1 if q else 4),
                            vocab=4096, heads=2 if q else 8)
        gen = np.random.default_rng(0)
        prompts = [gen.integers(4, spec.vocab, 16).astype(np.int32) for _ in range(batch)]
        bench(spec.name, C.random_model_dir(spec), prompts, ["0"] * batch, max_new, large_reps, threads, report,
              "larger_")
        cfg["larger"] = spec.key()
    report.config = cfg
    report.print()
    report.write(args.json, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
