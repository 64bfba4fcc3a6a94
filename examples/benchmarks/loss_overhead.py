"""EOPD's cost over OPD: one training step, and the loss function alone at the paper's vocabulary.

    python examples/benchmarks/loss_overhead.py                      # tiny student + random V=151,936 model
    python examples/benchmarks/loss_overhead.py --student DIR --hidden 512 --layers 4 --json out.json

1. Step: `StudentTrainer.train_step` (the product's own: Arrow -> tensors, forward, `eopd_loss`, backward,
   AdamW step; DeepSpeed ZeRO-0, world size 1) on one fixed batch, the same trainer and model, with
   `loss.objective` switched between `eopd` and `opd` on alternate calls (lr 1e-7, so the model barely
   moves). Run on the student (default: the tiny one) and on a random Qwen3 with V = 151,936.
   The synthetic teacher payload gates about 20% of the positions (paper: 15-20%); the cost of the loss
   does not depend on the gate fraction (the forward KL is evaluated at every position, then masked).
2. Loss alone, with its backward, objective eopd vs opd, k = 16, V = 151,936, T = 1024, 2048, 4096 (quick:
   256), on the path the default `trainer.logits_chunk` (-1, auto) runs at that vocabulary: chunked,
   `eopd_loss_from_hidden` from float32 hidden states (1, T, 256) through a (V, 256) head; and at the longest
   T also on the full-logits path (`eopd_loss` on (1, T, V) float32 logits), for comparison.

Figures: time ratio eopd / opd (median of paired ratios, wall clock and process CPU time; target <= 1.05)
and peak memory difference (peak RSS growth of the eopd call minus that of the opd call; target <= 1 GiB).
One torch thread by default. The loss-alone rows also give the kernel (sys) time of each call: on CPU every
fresh V-wide float32 tensor is page-faulted in, which at T = 4096 costs more than the arithmetic. See
`_common` for the memory method.
"""

from __future__ import annotations

import dataclasses
import os
import time

import _common as C  # noqa: E402  (sets sys.path and the Ray environment)

import numpy as np  # noqa: E402
import torch  # noqa: E402

K = 16
TAU = 0.8
GATED = 0.2  # share of positions whose synthetic teacher entropy exceeds tau


def synthetic_teacher(n: int, vocab: int, gen: torch.Generator):
    """Per-position teacher payload: (logprob of the sampled token, entropy, top-k ids, top-k logprobs)."""
    top = torch.log_softmax(torch.randn(n, K, generator=gen) * 2, -1).sort(-1, descending=True).values - 0.05
    ids = torch.randint(4, vocab, (n, K), generator=gen)
    ent = torch.where(torch.rand(n, generator=gen) < GATED, TAU + 2 * torch.rand(n, generator=gen),
                      TAU * torch.rand(n, generator=gen))
    lp = -3 * torch.rand(n, generator=gen)
    return lp, ent, ids, top


# ------------------------------------------------------------------------------------------ step
def make_tables(model, vocab: int, rows: int, prompt_len: int, resp_len: int, seed: int):
    """A rollout table (random prompts/responses, behaviour log-probs from the model itself) and a
    synthetic teacher table for it."""
    from eopd_ray.batch import make_rollout_table, make_teacher_table, sequence_batch

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, vocab, (prompt_len,), generator=gen).numpy().astype(np.int32) for _ in range(rows)]
    lengths = torch.randint(max(1, resp_len // 2), resp_len + 1, (rows,), generator=gen).tolist()
    lengths[0] = resp_len
    responses = [torch.randint(4, vocab, (n,), generator=gen).numpy().astype(np.int32) for n in lengths]
    batch = sequence_batch(prompts, responses, 0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits
        old = []
        for i, r in enumerate(responses):
            lg = logits[i, batch.logit_index_BT[i, :len(r)], :vocab].float()
            old.append(torch.log_softmax(lg, -1).gather(-1, torch.as_tensor(r, dtype=torch.long)[:, None])[:, 0]
                       .numpy())
        del logits
    rollout = make_rollout_table(np.arange(rows), prompts, responses, old, [np.ones(len(r), np.float32)
                                                                            for r in responses], [False] * rows)
    t_lp, t_ent, t_ids, t_top = [], [], [], []
    for r in responses:
        lp, ent, ids, top = synthetic_teacher(len(r), vocab, gen)
        t_lp.append(lp.numpy()), t_ent.append(ent.numpy()), t_ids.append(ids.numpy().astype(np.int32))
        t_top.append(top.numpy())
    teacher = make_teacher_table(np.arange(rows), t_lp, t_ent, t_ids, t_top)
    return rollout, teacher, int(sum(lengths))


def bench_step(name: str, model_path: str, rows: int, mini: int, prompt_len: int, resp_len: int, reps: int,
               threads: int, report: C.Report, memory_jobs: list) -> None:
    from actors.runtime.dist import free_port
    from actors.student.trainer import StudentTrainer
    from eopd_ray.config import load_config
    from eopd_ray.models import load_tokenizer

    tok = load_tokenizer(model_path)
    vocab = len(tok)
    cfg = load_config(None, [f"trainer.batch_size={rows}", f"trainer.mini_batch_size={mini}", "trainer.lr=1e-7",
                             "trainer.max_steps=1000", f"loss.top_k={K}", f"loss.tau={TAU}"])
    tr = StudentTrainer(model_path, cfg.trainer, cfg.loss, rank=0, world_size=1, vocab_size=vocab,
                        pad_id=tok.pad_token_id, num_threads=threads)
    tr.setup("127.0.0.1", free_port())
    rollout, teacher, n_tok = make_tables(tr.engine.module, vocab, rows, prompt_len, resp_len, seed=7)
    cfgs = {obj: dataclasses.replace(cfg.loss, objective=obj) for obj in ("eopd", "opd")}
    gates = {}

    def run(obj):
        def f():
            tr.loss_cfg = cfgs[obj]
            m = tr.train_step(0, 1, rollout, teacher)
            gates[obj] = m["gate/fraction"]
            return m
        return f

    C.progress("loss_overhead", f"train_step {name}: {n_tok} positions, {reps} reps")
    times = C.interleaved({obj: run(obj) for obj in cfgs}, reps=reps, warmup=1)
    report.extra[f"step_seconds_{name}"] = {"wall": times, "cpu": times.cpu}
    ratio = C.paired_ratio(times["eopd"], times["opd"])
    cpu_ratio = C.paired_ratio(times.cpu["eopd"], times.cpu["opd"])
    row = {"config": name, "vocab": vocab, "rows": rows, "mini_batch": mini, "positions": n_tok,
           "eopd_s": C.median(times["eopd"]), "opd_s": C.median(times["opd"]), "ratio": ratio,
           "cpu_ratio": cpu_ratio, "gate_fraction": gates["eopd"]}
    report.rows.append(row)
    prefix = "step" if name == "student" else "large_vocab_step"
    report.add(f"{prefix}_time_ratio", ratio, "x", "<= 1.05", f"{name}: train_step eopd/opd, {n_tok} positions")
    report.add(f"{prefix}_cpu_time_ratio", cpu_ratio, "x", "<= 1.05", "the same in process CPU time (load-robust)")
    report.add(f"{prefix}_eopd_s", row["eopd_s"], "s")
    report.add(f"{prefix}_opd_s", row["opd_s"], "s")

    def measure():
        mem = {obj: [] for obj in cfgs}
        for r in range(2):
            for obj in (["eopd", "opd"] if r % 2 == 0 else ["opd", "eopd"]):
                mem[obj].append(C.peak_rss_growth(run(obj))[0])
        e, o = C.median(mem["eopd"]), C.median(mem["opd"])
        row.update(eopd_peak_mib=e / C.MIB, opd_peak_mib=o / C.MIB, peak_diff_mib=(e - o) / C.MIB)
        report.add(f"{prefix}_peak_mem_diff_gib", (e - o) / C.GIB, "GiB", "<= 1",
                   f"{name}: peak RSS growth eopd - opd over one train_step")
        report.add(f"{prefix}_peak_mem_eopd_gib", e / C.GIB, "GiB")
        report.add(f"{prefix}_peak_mem_opd_gib", o / C.GIB, "GiB")

    memory_jobs.append((measure, tr))


# ------------------------------------------------------------------------------------------ loss only
HIDDEN = 256  # hidden size of the chunked path's synthetic output head (the large random model's)


def bench_loss_only(lengths: list[int], vocab: int, reps: int, report: C.Report) -> None:
    """The loss with its backward, eopd vs opd, on the path the default trainer.logits_chunk runs at `vocab`
    (chunked: `eopd_loss_from_hidden` from (1, T, H) hidden states through a (V, H) head; full: `eopd_loss` on
    (1, T, V) logits), and at the longest T also on the other path, for comparison."""
    from eopd_ray.config import LossConfig, TrainerConfig
    from eopd_ray.losses import TokenStats, eopd_loss, eopd_loss_from_hidden
    from eopd_ray.objectives import resolve_logits_chunk

    chunk = resolve_logits_chunk(TrainerConfig().logits_chunk, vocab)
    default = "chunked" if chunk else "full"
    rows = {"chunked": [], "full": []}
    C.use_exact_malloc()  # this part measures time and memory in the same calls (all tensors are huge)
    plan = [(T, default) for T in lengths] + [(lengths[-1], "full" if chunk else "chunked")] if lengths else []
    for i, (T, path) in enumerate(plan):
        need = 5 * T * vocab * 4 if path == "full" else 6 * min(T, chunk or 256) * vocab * 4 + T * vocab * 4
        if need > 0.85 * C.available_memory_bytes():
            report.notes.append(f"loss alone ({path}): T={T} skipped, needs about {need / C.GIB:.1f} GiB")
            continue
        C.progress("loss_overhead", f"loss alone T={T}, {path} path")
        gen = torch.Generator().manual_seed(T)
        tokens = torch.randint(4, vocab, (1, T), generator=gen)
        hidden = torch.randn(1, T, HIDDEN, generator=gen).requires_grad_(True)
        weight = (torch.randn(vocab, HIDDEN, generator=gen) * (2 / HIDDEN ** 0.5)).requires_grad_(True)
        with torch.no_grad():  # logits of about unit scale x 2, as the full path's random logits
            logits = hidden @ weight.T
            old = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
        logits = logits.requires_grad_(True) if path == "full" else None
        lp, ent, ids, top = synthetic_teacher(T, vocab, gen)
        stats = TokenStats(lp[None], ent[None], top[None], ids[None])
        mask = torch.ones(1, T, dtype=torch.bool)
        cfgs = {obj: LossConfig(objective=obj, tau=TAU, top_k=K) for obj in ("eopd", "opd")}
        leaves = [logits] if path == "full" else [hidden, weight]

        def run(obj):
            def f():
                if path == "full":
                    loss, _ = eopd_loss(logits, tokens, old, stats, mask, cfgs[obj])
                else:
                    loss, _ = eopd_loss_from_hidden(hidden, lambda h: h @ weight.T, tokens, old, stats, mask,
                                                    cfgs[obj], chunk_size=chunk or 256)
                loss.backward()
                for t in leaves:
                    t.grad = None
            return f

        runs = {obj: run(obj) for obj in cfgs}
        if i == 0:  # warm-up once: the later, larger calls take seconds each
            for obj in cfgs:
                runs[obj]()
        t = {obj: [] for obj in cfgs}
        cpu = {obj: [] for obj in cfgs}
        sys_s = {obj: [] for obj in cfgs}  # kernel time: page faults of fresh V-wide tensors, on CPU
        m = {obj: [] for obj in cfgs}
        for r in range(reps):
            for obj in (["eopd", "opd"] if r % 2 == 0 else ["opd", "eopd"]):
                s0 = os.times().system
                grow, (wall, c, _) = C.peak_rss_growth(lambda: C.timed(runs[obj]))
                sys_s[obj].append(os.times().system - s0)
                m[obj].append(grow)
                t[obj].append(wall)
                cpu[obj].append(c)
        del logits, hidden, weight
        report.extra[f"loss_seconds_T{T}_{path}"] = {"wall": t, "cpu": cpu, "sys": sys_s}
        e, o = C.median(m["eopd"]), C.median(m["opd"])
        rows[path].append({"config": f"loss T={T} {path}", "vocab": vocab, "positions": T,
                           "eopd_s": C.median(t["eopd"]), "opd_s": C.median(t["opd"]),
                           "ratio": C.paired_ratio(t["eopd"], t["opd"]),
                           "cpu_ratio": C.paired_ratio(cpu["eopd"], cpu["opd"]),
                           "eopd_sys_s": C.median(sys_s["eopd"]), "opd_sys_s": C.median(sys_s["opd"]),
                           "eopd_peak_mib": e / C.MIB, "opd_peak_mib": o / C.MIB, "peak_diff_mib": (e - o) / C.MIB,
                           "logits_mib": T * vocab * 4 / C.MIB})
    report.rows.extend(rows["chunked"] + rows["full"])
    if rows[default]:
        last = rows[default][-1]
        T = last["positions"]
        where = f"T={T}, V={vocab}, k={K}, {default} path (the default: trainer.logits_chunk=-1 -> {chunk})"
        report.add("loss_only_time_ratio", last["ratio"], "x", "<= 1.05", f"loss + backward eopd/opd at {where}")
        report.add("loss_only_cpu_time_ratio", last["cpu_ratio"], "x", "<= 1.05",
                   "the same in process CPU time (load-robust)")
        report.add("loss_only_peak_mem_diff_gib", last["peak_diff_mib"] / 1024, "GiB", "<= 1",
                   f"at T={T}, V={vocab}")
        report.add("loss_only_positions", T, "positions")
        report.add("loss_only_extra_bytes_per_position", last["peak_diff_mib"] * C.MIB / T, "B",
                   note=f"float32 [T, V] row = {4 * vocab} B")
        report.add("loss_only_eopd_s", last["eopd_s"], "s")
        report.add("loss_only_opd_s", last["opd_s"], "s")
    other = "full" if chunk else "chunked"
    if rows[other]:
        last = rows[other][-1]
        report.add(f"loss_only_{other}_time_ratio", last["ratio"], "x",
                   note=f"the same on the {other} path, T={last['positions']} (comparison)")
        report.add(f"loss_only_{other}_eopd_s", last["eopd_s"], "s")
        report.add(f"loss_only_{other}_opd_s", last["opd_s"], "s")


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--lengths", default="", help="loss-alone T values, comma-separated (default 1024,2048,4096)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    threads = C.set_threads(args)
    report = C.Report("loss_overhead")
    q = args.quick
    reps, large_reps = C.repetitions(args, large_full=4)
    _, student = C.tiny_pair(args.teacher, args.student)
    large = C.large_spec(args)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else ([256] if q else [1024, 2048, 4096])
    report.config = {"reps": reps, "large_reps": large_reps, "loss_reps": 2 if not q else 1, "threads": threads,
                     "student": student, "large": large and large.key(), "loss_lengths": lengths, "top_k": K,
                     "tau": TAU, "synthetic_gate_fraction": GATED}

    memory_jobs: list = []
    bench_step("student", student, rows=8 if q else 32, mini=8 if q else 8, prompt_len=12, resp_len=16 if q else 40,
               reps=reps, threads=threads, report=report, memory_jobs=memory_jobs)
    if large:
        bench_step(large.name, C.random_model_dir(large), rows=2 if q else 4, mini=2 if q else 4,
                   prompt_len=16 if q else 32, resp_len=32 if q else 256, reps=large_reps,
                   threads=threads, report=report, memory_jobs=memory_jobs)
    # Memory after every timing: the malloc setting it needs never touches a timed call above.
    C.use_exact_malloc()
    C.progress("loss_overhead", "train_step memory")
    for measure, _ in memory_jobs:
        measure()
    memory_jobs.clear()
    bench_loss_only(lengths, args.vocab if not args.no_large else C.PAPER_VOCAB, 2 if not q else 1,
                    report)
    report.print()
    report.write(args.json, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
