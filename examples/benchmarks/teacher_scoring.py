"""Teacher scoring: tokens/s, payload bytes per response position and peak memory, against scoring that
materialises the full [N, V] float32 log-probabilities.

    python examples/benchmarks/teacher_scoring.py                  # tiny teacher + random V=151,936 teacher
    python examples/benchmarks/teacher_scoring.py --teacher DIR --hidden 512 --layers 4 --json out.json

Variants on one model object and one rollout table (random response ids; the cost does not depend on them):
  scorer  `TeacherScorer.score` (decoder hidden states, lm_head on response positions only, chunk-wise
          statistics: sampled-token log-prob, entropy, top-k; Arrow table out);
  full    `model(...).logits` -> `log_softmax` over [B, L, V] float32 -> the same statistics at the
          response positions -> the same Arrow table (`make_teacher_table`).
Figures: tokens/s of each (scored response positions per second); payload bytes per response position, measured:
the scored teacher table written with pyarrow's IPC stream writer (schema, one record batch: everything a
serialised batch carries), over its positions (`payload_bytes_per_position`; target <= 1.05 x (8k + 8) = 142.8
for k = 16: the numbers it must carry, 8k + 8 bytes, plus at most 5% of framing), the same for the rollout
table it was scored from (prompts included), and the IPC size split into bytes per position beyond the
per-table metadata and that fixed metadata; the numeric payload (`numeric_bytes_per_position`, 8k + 8 by
construction) as a reference only; peak RSS growth of each call (see `_common`), and the largest deviation
between the two variants.
"""

from __future__ import annotations

import time

import _common as C  # noqa: E402  (sets sys.path and the Ray environment)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

K = 16


def rollout_table(vocab: int, rows: int, prompt_len: int, resp_len: int, fixed: bool, seed: int = 3):
    from eopd_ray.batch import make_rollout_table

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, vocab, (prompt_len,), generator=gen).numpy().astype(np.int32) for _ in range(rows)]
    lengths = [resp_len] * rows if fixed else \
        torch.randint(max(1, resp_len // 2), resp_len + 1, (rows,), generator=gen).tolist()
    responses = [torch.randint(4, vocab, (n,), generator=gen).numpy().astype(np.int32) for n in lengths]
    ones = [np.zeros(len(r), np.float32) for r in responses]
    return make_rollout_table(np.arange(rows), prompts, responses, ones, ones, [False] * rows), int(sum(lengths))


def ipc_bytes(table: pa.Table) -> int:
    """Size of the table written as one Arrow IPC stream (schema + one record batch)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table.combine_chunks())
    return sink.getvalue().size


def ipc_split(table: pa.Table, n_pos: int) -> tuple[float, float]:
    """(serialized bytes per position, without the per-table metadata; that fixed metadata in bytes).
    The marginal size comes from the table and the table twice over (both as one record batch), so it
    keeps everything that grows with rows and positions (offsets and sample ids included)."""
    one, two = ipc_bytes(table), ipc_bytes(pa.concat_tables([table, table]))
    per_pos = (two - one) / n_pos
    return per_pos, one - per_pos * n_pos


@torch.no_grad()
def full_logits_score(model, table: pa.Table, vocab: int, pad_id: int) -> pa.Table:
    """The naive teacher: full [B, L, V] float32 log-probabilities, then the statistics."""
    from eopd_ray.batch import list_rows, make_teacher_table, sequence_batch

    prompts, responses = list_rows(table.column("prompt_ids")), list_rows(table.column("response_ids"))
    batch = sequence_batch(prompts, responses, pad_id)
    logits = model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits
    logp_BLV = torch.log_softmax(logits[..., :vocab].float(), dim=-1)
    del logits
    cols = {"lp": [], "ent": [], "ids": [], "top": []}
    for i, r in enumerate(responses):
        logp = logp_BLV[i, batch.logit_index_BT[i, :len(r)]]  # (T_i, V)
        cols["lp"].append(logp.gather(-1, torch.from_numpy(r.astype(np.int64))[:, None])[:, 0].numpy())
        cols["ent"].append((-(logp.exp() * logp).sum(-1)).numpy())
        top = logp.topk(K, dim=-1)
        cols["ids"].append(top.indices.numpy().astype(np.int32))
        cols["top"].append(top.values.numpy())
    return make_teacher_table(table.column("sample_id").to_numpy(), cols["lp"], cols["ent"], cols["ids"], cols["top"])


def bench(name: str, model_path: str, rows: int, prompt_len: int, resp_len: int, fixed: bool, reps: int,
          threads: int, report: C.Report, prefix: str, memory_jobs: list) -> None:
    from actors.teacher.scorer import TeacherScorer
    from eopd_ray.batch import list_rows, payload_bytes_per_position
    from eopd_ray.models import load_tokenizer

    tok = load_tokenizer(model_path)
    vocab = len(tok)
    scorer = TeacherScorer(model_path, top_k=K, vocab_size=vocab, pad_id=tok.pad_token_id, num_threads=threads)
    table, n_pos = rollout_table(vocab, rows, prompt_len, resp_len, fixed)
    fns = {"scorer": lambda: scorer.score(table)[0],
           "full": lambda: full_logits_score(scorer.model, table, vocab, tok.pad_token_id)}
    out: dict[str, pa.Table] = {}
    C.progress("teacher_scoring", f"{name}: {rows} rows, {n_pos} positions, {reps} reps")
    times = C.interleaved(fns, reps=reps, warmup=1, after=lambda n, res: out.__setitem__(n, res))
    diff = max(float(np.abs(np.concatenate(list_rows(out["scorer"].column(c))) -
                            np.concatenate(list_rows(out["full"].column(c)))).max())
               for c in ("teacher_logprobs", "teacher_entropy", "topk_logprobs"))
    sc = out["scorer"]
    marginal, fixed_b = ipc_split(sc, n_pos)
    row = {"config": name, "vocab": vocab, "rows": rows, "positions": n_pos,
           "scorer_tok_s": n_pos / C.median(times["scorer"]), "full_tok_s": n_pos / C.median(times["full"]),
           "speed_ratio": C.paired_ratio(times["full"], times["scorer"]),
           "ipc_B_per_pos": ipc_bytes(sc) / n_pos, "rollout_ipc_B_per_pos": ipc_bytes(table) / n_pos,
           "ipc_marginal_B_per_pos": marginal, "ipc_fixed_B": fixed_b,
           "numeric_B_per_pos": payload_bytes_per_position(sc), "full_logits_B_per_pos": 4 * vocab,
           "max_abs_diff": diff}
    report.rows.append(row)
    report.extra[f"{prefix}seconds"] = {"wall": times, "cpu": times.cpu}
    report.add(f"{prefix}tokens_per_s", row["scorer_tok_s"], "tok/s", note=f"{name}: TeacherScorer.score")
    report.add(f"{prefix}full_logits_tokens_per_s", row["full_tok_s"], "tok/s", note=f"{name}: full [N, V] float32")
    report.add(f"{prefix}speed_ratio", row["speed_ratio"], "x", note="scorer tokens/s over full-logits tokens/s")
    report.add(f"{prefix}payload_bytes_per_position", row["ipc_B_per_pos"], "B", f"<= {1.05 * (8 * K + 8):.1f}",
               f"the scored teacher table as an Arrow IPC stream (pyarrow's stream writer), bytes / response "
               f"position, measured; {rows} rows, mean response {n_pos / rows:.0f} positions; the numbers it "
               f"carries are 8k + 8 = {8 * K + 8} B, full float32 log-probs {4 * vocab:,} B")
    report.add(f"{prefix}rollout_payload_bytes_per_position", row["rollout_ipc_B_per_pos"], "B",
               note="the rollout table the teacher scored, as an Arrow IPC stream, bytes / response position "
                    f"(prompts of {prompt_len} tokens included)")
    report.add(f"{prefix}ipc_marginal_bytes_per_position", marginal, "B",
               note=f"teacher IPC bytes per position beyond the per-table metadata (list offsets and sample ids "
                    f"add {24 * rows / n_pos:.2f} B at this mean length)")
    report.add(f"{prefix}ipc_fixed_bytes", fixed_b, "B", note="per-table IPC metadata (schema, message)")
    report.add(f"{prefix}numeric_bytes_per_position", row["numeric_B_per_pos"], "B",
               note="eopd_ray.batch.payload_bytes_per_position: the value buffers alone (8k + 8 by construction; "
                    "a reference, not a measurement of what is sent)")
    report.add(f"{prefix}max_abs_diff", diff, "", note="scorer vs full log-probs/entropy/top-k values")

    def measure():
        mem = {n: [] for n in fns}
        for r in range(2):
            for n in (["scorer", "full"] if r % 2 == 0 else ["full", "scorer"]):
                mem[n].append(C.peak_rss_growth(fns[n])[0])
        s, f = C.median(mem["scorer"]), C.median(mem["full"])
        row.update(scorer_peak_mib=s / C.MIB, full_peak_mib=f / C.MIB)
        report.add(f"{prefix}peak_mem_mib", s / C.MIB, "MiB", note="peak RSS growth of TeacherScorer.score")
        report.add(f"{prefix}full_logits_peak_mem_mib", f / C.MIB, "MiB", note="peak RSS growth of full-logits scoring")
        report.add(f"{prefix}peak_mem_ratio", s / f if f > 0 else float("nan"), "x",
                   note="scorer peak / full-logits peak")

    memory_jobs.append(measure)


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    threads = C.set_threads(args)
    q = args.quick
    reps, large_reps = C.repetitions(args, large_full=5)
    teacher, _ = C.tiny_pair(args.teacher, args.student)
    report = C.Report("teacher_scoring")
    cfg = {"reps": reps, "large_reps": large_reps, "threads": threads, "teacher": teacher, "top_k": K}
    jobs: list = []
    bench("teacher", teacher, rows=8 if q else 32, prompt_len=12, resp_len=16 if q else 40, fixed=False,
          reps=reps, threads=threads, report=report, prefix="", memory_jobs=jobs)
    large = C.large_spec(args)
    if large:
        lr, lt = (2, 48) if q else (8, 224)  # 1,792 positions: above the scorer's 1,024-position chunk
        bench(large.name, C.random_model_dir(large), rows=lr, prompt_len=32, resp_len=lt, fixed=True,
              reps=large_reps, threads=threads, report=report, prefix="large_vocab_",
              memory_jobs=jobs)
        cfg.update(large=large.key(), large_rows=lr, large_response_len=lt, large_prompt_len=32)
    C.use_exact_malloc()  # memory runs come after every timing
    C.progress("teacher_scoring", "memory")
    for job in jobs:
        job()
    report.config = cfg
    report.print()
    report.write(args.json, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
