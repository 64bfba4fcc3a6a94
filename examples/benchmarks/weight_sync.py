"""Weight sync through the Ray object store: seconds against model bytes, GB/s, for several model sizes.

    python examples/benchmarks/weight_sync.py                       # tiny student + random Qwen3s
    python examples/benchmarks/weight_sync.py --sizes 1024x8x32000,2048x4x151936

Per size: one student rank (`actors.driver.build.build_students`, ZeRO-0) and one rollout worker
(`build_rollouts`) holding the same model, then `ObjectStoreWeightSync.sync()` (rank 0's
`export_weights` -> object store -> the worker's `update_weights`), timed by the driver, and the same path
split in two: export + put (until the ref is ready: `ray.wait`) and get + load (the worker's call; its
`load_state_dict` time is reported by the worker). Both run interleaved after one warm-up sync.

model bytes = the unique parameters in float32 (the safetensors files: tied weights once); payload bytes
= what `export_weights` puts in the store. GB/s = model bytes / sync seconds (1 GB = 1e9 B). The machine's
memory-copy bandwidth is measured in the same run (`peak.memcpy_gbs`: a torch copy of the largest payload's size,
at most 1 GiB, in this process at the benchmark's threads, 1 by default), and `memcpy_fraction` is the largest
model's sync GB/s over it (target >= 0.5: a sync at half the speed of a plain copy).
"""

from __future__ import annotations

import time

import _common as C  # noqa: E402  (sets sys.path and the Ray environment)

import peak  # noqa: E402


def parse_sizes(text: str) -> list[C.RandomSpec]:
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        h, l, v = (int(x) for x in item.lower().split("x"))
        specs.append(C.RandomSpec(hidden=h, layers=l, vocab=v, heads=max(1, h // 64)))
    return specs


def bench_size(ray, name: str, path: str, reps: int, report: C.Report) -> dict:
    from actors.driver.build import ResolvedModels, build_rollouts, build_students
    from actors.sync.base import ObjectStoreWeightSync
    from eopd_ray.config import load_config
    from eopd_ray.models import load_tokenizer

    C.progress("weight_sync", f"{name}: building the actors")
    tok = load_tokenizer(path)
    cfg = load_config(None, [f"model.teacher={path}", f"model.student={path}", "trainer.batch_size=8",
                             "trainer.mini_batch_size=8", "rollout.num_workers=1", "trainer.num_ranks=1"])
    models = ResolvedModels(path, path, len(tok), tok.pad_token_id)
    t0 = time.perf_counter()
    students, rollouts = build_students(cfg, models), build_rollouts(cfg, models)
    ray.get(rollouts.call("ping"))
    build_s = time.perf_counter() - t0
    sync = ObjectStoreWeightSync(students, rollouts)
    try:
        ref = students.call("export_weights")[0]
        state = ray.get(ref)  # numpy arrays: zero-copy views of the store
        payload = int(sum(v.nbytes for v in state.values()))
        del state, ref
        model_bytes = C.model_param_bytes(path)

        def full():
            return sync.sync()

        def split():
            t0 = time.perf_counter()
            ref = students.call("export_weights")[0]
            ray.wait([ref], fetch_local=False)
            t1 = time.perf_counter()
            load = ray.get(rollouts.call("update_weights", ref))[0]
            t2 = time.perf_counter()
            return {"export_put": t1 - t0, "get_load": t2 - t1, "load": load}

        parts: list[dict] = []
        loads: list[float] = []
        times = C.interleaved({"sync": full, "split": split}, reps=reps, warmup=1,
                              after=lambda n, r: (parts if n == "split" else loads).append(
                                  r if n == "split" else r["time/sync_load"]))
    finally:
        students.shutdown()
        rollouts.shutdown()
    sync_s = C.median(times["sync"])
    row = {"model": name, "model_mib": model_bytes / C.MIB, "payload_mib": payload / C.MIB,
           "sync_s": sync_s, "gb_per_s": model_bytes / sync_s / 1e9, "payload_gb_per_s": payload / sync_s / 1e9,
           "export_put_s": C.median([p["export_put"] for p in parts]),
           "get_load_s": C.median([p["get_load"] for p in parts]),
           "load_state_dict_s": C.median([p["load"] for p in parts]), "actors_build_s": build_s}
    report.rows.append(row)
    report.extra[f"seconds_{name}"] = {**times, "split": parts}  # wall clock (the work is in other processes)
    return row


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--sizes", default="", help="random Qwen3 sizes as HIDDENxLAYERSxVOCAB, comma-separated (default "
                   "256x4x32000,512x8x32000,1024x8x32000, then the large config; quick: only the large config)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    C.set_threads(args)
    q = args.quick
    reps = args.reps or (2 if q else 5)
    _, student = C.tiny_pair(args.teacher, args.student)
    specs = parse_sizes(args.sizes or ("" if q else "256x4x32000,512x8x32000,1024x8x32000"))
    large = C.large_spec(args)
    if large:
        specs.append(large)
    report = C.Report("weight_sync")
    report.config = {"reps": reps, "student": student, "sizes": [s.key() for s in specs]}
    models = [("student", student)] + [(s.name, C.random_model_dir(s)) for s in specs]
    ray = C.init_local_ray()
    rows = [bench_size(ray, name, path, reps, report) for name, path in models]
    ray.shutdown()
    biggest = max(rows, key=lambda r: r["model_mib"])
    C.progress("weight_sync", "memcpy reference")
    copy = peak.memcpy_gbs(nbytes=min(int(biggest["payload_mib"] * C.MIB), 1 << 30), reps=5)
    ref = copy["value"]
    report.add("gb_per_s", biggest["gb_per_s"], "GB/s", note=f"{biggest['model']}: model bytes / sync seconds")
    report.add("seconds", biggest["sync_s"], "s", note=f"{biggest['model']}: ObjectStoreWeightSync.sync()")
    report.add("model_mib", biggest["model_mib"], "MiB")
    report.add("export_put_s", biggest["export_put_s"], "s")
    report.add("get_load_s", biggest["get_load_s"], "s")
    report.add("memcpy_gb_per_s", ref, "GB/s", spread=copy["spread"],
               note=f"peak.memcpy_gbs: a torch copy of {copy['bytes'] / C.MIB:.0f} MiB in one process, "
                    f"{copy['threads']} thread(s), the same run")
    report.add("memcpy_fraction", biggest["gb_per_s"] / ref, "", ">= 0.5",
               f"{biggest['model']}: sync GB/s (model bytes / sync seconds) over the memcpy GB/s")
    report.add("smallest_sync_s", min(r["sync_s"] for r in rows), "s", note="fixed cost: the smallest model's sync")
    if large:
        lv = rows[-1]
        report.add("large_vocab_gb_per_s", lv["gb_per_s"], "GB/s", note=f"{lv['model']}")
        report.add("large_vocab_payload_ratio", lv["payload_mib"] / lv["model_mib"], "x",
                   note="exported bytes / unique parameter bytes (tied embeddings are exported twice when > 1)")
    report.print()
    report.write(args.json, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
