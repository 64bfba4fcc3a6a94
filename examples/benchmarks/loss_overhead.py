"""EOPD's cost over plain OPD: one training step, and the loss function alone at the paper's vocabulary.

    python examples/benchmarks/loss_overhead.py                      # tiny student + random V=151,936 model
    python examples/benchmarks/loss_overhead.py --student DIR --hidden 512 --layers 4 --json out.json
    python examples/benchmarks/loss_overhead.py --parts loss --pairs 15   # the loss alone, more pairs

Three variants of the objective everywhere:
  eopd       EOPD as the trainer runs it (its forward KL, plus the diagnostics every objective computes);
  opd        OPD as the trainer runs it: with the diagnostics on, it evaluates the teacher's top-k forward KL
             and the student's entropy at every position for its metrics, nearly EOPD's work;
  opd_plain  plain OPD: the same objective with `Objective.diagnostics=False`, which computes only what its
             loss uses (the sampled token's log-prob; no top-k gather, forward KL or entropy).
The headline ratios are eopd / opd_plain (what EOPD costs over OPD); eopd / opd (`*_product_*`: both as the
trainer runs them) and opd / opd_plain (`*_diagnostics_*`: what the diagnostics cost) are reported beside them.

1. Step: `StudentTrainer.train_step` (the product's own: Arrow -> tensors, forward, `eopd_loss`, backward,
   AdamW step; DeepSpeed ZeRO-0, world size 1) on one fixed batch, the same trainer and model, with its
   loss config and objective switched between the variants on alternate calls (lr 1e-7, so the model barely
   moves); each variant's gate fraction is checked (EOPD gates, OPD does not), so the variants cannot run the
   same objective. Run on the student (default: the tiny one) and on a random Qwen3 with V = 151,936.
   The synthetic teacher payload gates about 20% of the positions (paper: 15-20%); the cost of the loss
   does not depend on the gate fraction (the forward KL is evaluated at every position, then masked).
2. Loss alone, with its backward, k = 16, V = 151,936, T = 1024, 2048, 4096 (quick: 256), on the path the
   default `trainer.logits_chunk` (-1, auto) runs at that vocabulary: chunked, `eopd_loss_from_hidden` from
   float32 hidden states (1, T, 256) through a (V, 256) head; and at the longest T also on the full-logits
   path (`eopd_loss` on (1, T, V) float32 logits), for comparison. The headline figure is measured at
   `--ratio-length` (default 1024; the chunked path runs the same work per 256-position chunk at every T)
   over `--pairs` rounds (default 9; quick 5); every other T gets `--row-reps` rounds (default 1).

Interleaving: each round calls every variant once, the order reversed every round (A B C, C B A, ...), so a
load change on the machine hits every variant alike and none always runs first; the call order is kept in the
JSON (`extra`). A ratio is the median of the per-round ratios, with their spread (interquartile range, min,
max); the verdict of a repeated figure is its interquartile range's against the target (`_common.check_target`:
pass, MISS, or unclear when the range straddles it). Figures: time ratios (wall clock and process CPU time;
target <= 1.05) and peak memory difference (peak RSS growth of the eopd call minus that of the opd_plain call;
target <= 1 GiB). One torch thread by default. The loss-alone rows also give the kernel (sys) time of each
call: on CPU every fresh V-wide float32 tensor is page-faulted in, which at T = 4096 costs more than the
arithmetic. See `_common` for the memory method.
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
VARIANTS = ("eopd", "opd_plain", "opd")  # see the module doc


def variant_objectives() -> dict:
    """variant -> (loss.objective, the Objective the loss runs)."""
    from eopd_ray.objectives import get_objective

    return {"eopd": ("eopd", get_objective("eopd")), "opd": ("opd", get_objective("opd")),
            "opd_plain": ("opd", dataclasses.replace(get_objective("opd"), diagnostics=False))}


def rounds(fns: dict, n: int, call) -> list[str]:
    """n rounds of every variant once, the order reversed every round; call(name) times one call. Returns the
    call order."""
    names, order = list(fns), []
    for r in range(n):
        for name in (names if r % 2 == 0 else names[::-1]):
            call(name)
            order.append(name)
    return order


def add_ratio_figures(report: C.Report, prefix: str, wall: dict, cpu: dict, what: str) -> dict:
    """The three ratios of the module doc from per-round seconds, each with its spread; returns the medians."""
    pairs = {"": ("eopd", "opd_plain"), "product_": ("eopd", "opd"), "diagnostics_": ("opd", "opd_plain")}
    out = {}
    for tag, (a, b) in pairs.items():
        r = C.pair_ratios(wall[a], wall[b])
        out[tag] = C.median(r)
        if tag == "":
            report.add_repeated(f"{prefix}time_ratio", r, "x", "<= 1.05",
                                f"{what}: eopd / plain OPD (diagnostics off), median of {len(r)} rounds")
            report.add_repeated(f"{prefix}cpu_time_ratio", C.pair_ratios(cpu[a], cpu[b]), "x", "<= 1.05",
                                "the same in process CPU time (load-robust)")
        else:
            report.add_repeated(f"{prefix}{tag}time_ratio", r, "x", note=(
                "eopd / opd, both as the trainer runs them (diagnostics on)" if tag == "product_"
                else "opd with its diagnostics / plain OPD: what the diagnostics cost"))
    return out


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
    variants = variant_objectives()
    cfgs = {v: dataclasses.replace(cfg.loss, objective=o) for v, (o, _) in variants.items()}
    seen: dict[str, dict] = {v: {} for v in variants}

    def run(v):
        def f():
            # both: the trainer gates and computes the loss with its `objective`, not the config's name
            tr.loss_cfg, tr.objective = cfgs[v], variants[v][1]
            m = tr.train_step(0, 1, rollout, teacher)
            seen[v] = {"gate": m["gate/fraction"], "fkl_metric": "fkl/mean" in m}
            return m
        return f

    C.progress("loss_overhead", f"train_step {name}: {n_tok} positions, {reps} rounds of {', '.join(variants)}")
    times = C.interleaved({v: run(v) for v in VARIANTS}, reps=reps, warmup=1)
    # The variants must be what their names say: EOPD gates positions, OPD none; plain OPD has no FKL metric.
    if not (seen["eopd"]["gate"] > 0 and seen["opd"]["gate"] == 0 and seen["opd_plain"]["gate"] == 0
            and seen["opd"]["fkl_metric"] and not seen["opd_plain"]["fkl_metric"]):
        raise RuntimeError(f"train_step {name}: the variants did not run their objectives: {seen}")
    report.extra[f"step_seconds_{name}"] = {"wall": times, "cpu": times.cpu}
    prefix = "step_" if name == "student" else "large_vocab_step_"
    ratio = add_ratio_figures(report, prefix, times, times.cpu, f"{name}: train_step, {n_tok} positions")
    row = {"config": name, "vocab": vocab, "rows": rows, "mini_batch": mini, "positions": n_tok,
           **{f"{v}_s": C.median(times[v]) for v in VARIANTS}, "ratio": ratio[""],
           "product_ratio": ratio["product_"], "cpu_ratio": C.paired_ratio(times.cpu["eopd"], times.cpu["opd_plain"]),
           **{f"{v}_gate_fraction": seen[v]["gate"] for v in VARIANTS}}
    report.rows.append(row)
    report.add(f"{prefix}eopd_s", row["eopd_s"], "s")
    report.add(f"{prefix}opd_s", row["opd_plain_s"], "s", note="plain OPD (diagnostics off)")

    def measure():
        mem = {v: [] for v in ("eopd", "opd_plain")}
        for r in range(2):
            for v in (["eopd", "opd_plain"] if r % 2 == 0 else ["opd_plain", "eopd"]):
                mem[v].append(C.peak_rss_growth(run(v))[0])
        e, o = C.median(mem["eopd"]), C.median(mem["opd_plain"])
        row.update(eopd_peak_mib=e / C.MIB, opd_plain_peak_mib=o / C.MIB, peak_diff_mib=(e - o) / C.MIB)
        report.add(f"{prefix}peak_mem_diff_gib", (e - o) / C.GIB, "GiB", "<= 1",
                   f"{name}: peak RSS growth eopd - plain opd over one train_step")
        report.add(f"{prefix}peak_mem_eopd_gib", e / C.GIB, "GiB")
        report.add(f"{prefix}peak_mem_opd_gib", o / C.GIB, "GiB")

    memory_jobs.append((measure, tr))


# ------------------------------------------------------------------------------------------ loss only
HIDDEN = 256  # hidden size of the chunked path's synthetic output head (the large random model's)


def loss_calls(T: int, path: str, vocab: int, chunk: int, variants: dict) -> dict:
    """variant -> a call of its loss and backward on one fresh random problem of T positions (`path`: chunked
    or full logits); the problem's tensors live as long as the calls."""
    from eopd_ray.config import LossConfig
    from eopd_ray.losses import TokenStats, eopd_loss, eopd_loss_from_hidden

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
    cfgs = {v: LossConfig(objective=o, tau=TAU, top_k=K) for v, (o, _) in variants.items()}
    leaves = [logits] if path == "full" else [hidden, weight]

    def run(v):
        def f():
            if path == "full":
                loss, _ = eopd_loss(logits, tokens, old, stats, mask, cfgs[v], objective=variants[v][1])
            else:
                loss, _ = eopd_loss_from_hidden(hidden, lambda h: h @ weight.T, tokens, old, stats, mask,
                                                cfgs[v], chunk_size=chunk or 256, objective=variants[v][1])
            loss.backward()
            for t in leaves:
                t.grad = None
        return f

    return {v: run(v) for v in VARIANTS}


def bench_loss_only(lengths: list[int], vocab: int, ratio_length: int, pairs: int, row_reps: int,
                    report: C.Report) -> None:
    """The loss with its backward for every variant, on the path the default trainer.logits_chunk runs at `vocab`
    (chunked: `eopd_loss_from_hidden` from (1, T, H) hidden states through a (V, H) head; full: `eopd_loss` on
    (1, T, V) logits), and at the longest T also on the other path, for comparison. `pairs` rounds at
    T = ratio_length (the headline figures), `row_reps` at every other T."""
    from eopd_ray.config import TrainerConfig
    from eopd_ray.objectives import resolve_logits_chunk

    chunk = resolve_logits_chunk(TrainerConfig().logits_chunk, vocab)
    default = "chunked" if chunk else "full"
    other = "full" if chunk else "chunked"
    rows = {"chunked": [], "full": []}
    variants = variant_objectives()
    C.use_exact_malloc()  # this part measures time and memory in the same calls (all tensors are huge)
    lengths = sorted(set(lengths) | {ratio_length})
    plan = [(T, default) for T in lengths] + [(lengths[-1], other)]
    headline, warmed = None, set()
    for T, path in plan:
        n_rounds = pairs if (T, path) == (ratio_length, default) else row_reps
        need = 5 * T * vocab * 4 if path == "full" else 6 * min(T, chunk or 256) * vocab * 4 + T * vocab * 4
        if need > 0.85 * C.available_memory_bytes():
            report.notes.append(f"loss alone ({path}): T={T} skipped, needs about {need / C.GIB:.1f} GiB")
            continue
        if path not in warmed:  # one warm-up per path on a short problem: lazy initialisation, first allocations
            for f in loss_calls(min(64, T), path, vocab, chunk, variants).values():
                f()
            warmed.add(path)
        C.progress("loss_overhead", f"loss alone T={T}, {path} path, {n_rounds} rounds")
        runs = loss_calls(T, path, vocab, chunk, variants)
        t = {v: [] for v in VARIANTS}
        cpu = {v: [] for v in VARIANTS}
        sys_s = {v: [] for v in VARIANTS}  # kernel time: page faults of fresh V-wide tensors, on CPU
        m = {v: [] for v in VARIANTS}

        def call(v):
            s0 = os.times().system
            grow, (wall, c, _) = C.peak_rss_growth(lambda: C.timed(runs[v]))
            sys_s[v].append(os.times().system - s0)
            m[v].append(grow)
            t[v].append(wall)
            cpu[v].append(c)

        order = rounds(runs, n_rounds, call)
        del runs
        report.extra[f"loss_seconds_T{T}_{path}"] = {"wall": t, "cpu": cpu, "sys": sys_s, "order": order}
        e, o = C.median(m["eopd"]), C.median(m["opd_plain"])
        ratios = C.pair_ratios(t["eopd"], t["opd_plain"])
        row = {"config": f"loss T={T} {path}", "vocab": vocab, "positions": T, "rounds": n_rounds,
               **{f"{v}_s": C.median(t[v]) for v in VARIANTS}, "ratio": C.median(ratios),
               "ratio_iqr": C.spread_text(C.spread_of(ratios)) if n_rounds > 1 else "",
               "product_ratio": C.paired_ratio(t["eopd"], t["opd"]),
               "cpu_ratio": C.paired_ratio(cpu["eopd"], cpu["opd_plain"]),
               **{f"{v}_sys_s": C.median(sys_s[v]) for v in VARIANTS},
               "eopd_peak_mib": e / C.MIB, "opd_plain_peak_mib": o / C.MIB, "peak_diff_mib": (e - o) / C.MIB,
               "logits_mib": T * vocab * 4 / C.MIB}
        rows[path].append(row)
        if (T, path) == (ratio_length, default):
            headline = (row, t, cpu)
    report.rows.extend(rows["chunked"] + rows["full"])
    if headline:
        row, t, cpu = headline
        T = row["positions"]
        where = f"T={T}, V={vocab}, k={K}, {default} path (the default: trainer.logits_chunk=-1 -> {chunk})"
        add_ratio_figures(report, "loss_only_", t, cpu, f"loss + backward at {where}")
        report.add("loss_only_peak_mem_diff_gib", row["peak_diff_mib"] / 1024, "GiB", "<= 1",
                   f"at T={T}, V={vocab}: eopd - plain opd")
        report.add("loss_only_positions", T, "positions")
        report.add("loss_only_rounds", row["rounds"], "rounds", note="interleaved rounds of the headline figures")
        report.add("loss_only_extra_bytes_per_position", row["peak_diff_mib"] * C.MIB / T, "B",
                   note=f"float32 [T, V] row = {4 * vocab} B")
        report.add("loss_only_eopd_s", row["eopd_s"], "s")
        report.add("loss_only_opd_s", row["opd_plain_s"], "s", note="plain OPD (diagnostics off)")
    longest = [r for r in rows[default] if r["positions"] == lengths[-1]]
    if longest and longest[0] is not (headline or [None])[0]:
        report.add("loss_only_longest_time_ratio", longest[0]["ratio"], "x",
                   note=f"eopd / plain opd at T={lengths[-1]}, {default} path, {longest[0]['rounds']} round(s)")
    if rows[other]:
        last = rows[other][-1]
        report.add(f"loss_only_{other}_time_ratio", last["ratio"], "x",
                   note=f"the same on the {other} path, T={last['positions']}, {last['rounds']} round(s) (comparison)")
        report.add(f"loss_only_{other}_eopd_s", last["eopd_s"], "s")
        report.add(f"loss_only_{other}_opd_s", last["opd_plain_s"], "s")


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--lengths", default="", help="loss-alone T values, comma-separated (default 1024,2048,4096)")
    p.add_argument("--ratio-length", type=int, default=0,
                   help="T of the loss-alone headline figures (default 1024; quick: the first of --lengths)")
    p.add_argument("--pairs", type=int, default=0, help="interleaved rounds at --ratio-length (default 9; quick 5)")
    p.add_argument("--row-reps", type=int, default=1, help="rounds at every other T (default 1)")
    p.add_argument("--parts", default="step,loss", help="what to run: step, loss or both (default step,loss)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    threads = C.set_threads(args)
    report = C.Report("loss_overhead")
    q = args.quick
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts or parts - {"step", "loss"}:
        p.error(f"--parts {args.parts}: allowed step, loss or step,loss")
    reps, large_reps = C.repetitions(args, large_full=4)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else ([256] if q else [1024, 2048, 4096])
    ratio_length = args.ratio_length or (lengths[0] if q or args.lengths else 1024)
    pairs = args.pairs or (5 if q else 9)
    vocab = args.vocab if not args.no_large else C.PAPER_VOCAB
    report.config = {"reps": reps, "large_reps": large_reps, "threads": threads, "parts": sorted(parts),
                     "variants": list(VARIANTS), "loss_lengths": lengths, "loss_ratio_length": ratio_length,
                     "loss_pairs": pairs, "loss_row_reps": args.row_reps, "loss_vocab": vocab, "top_k": K,
                     "tau": TAU, "synthetic_gate_fraction": GATED}

    if "step" in parts:
        _, student = C.tiny_pair(args.teacher, args.student)
        large = C.large_spec(args)
        report.config.update(student=student, large=large and large.key())
        memory_jobs: list = []
        bench_step("student", student, rows=8 if q else 32, mini=8 if q else 8, prompt_len=12,
                   resp_len=16 if q else 40, reps=reps, threads=threads, report=report, memory_jobs=memory_jobs)
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
    if "loss" in parts:
        bench_loss_only(lengths, vocab, ratio_length, pairs, args.row_reps, report)
    report.print()
    report.write(args.json, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
