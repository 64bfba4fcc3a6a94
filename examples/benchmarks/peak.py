"""This machine's own peaks, measured in the same run as the other benchmarks: matmul throughput in float32 and
bfloat16, and memory-copy bandwidth. Other benchmarks call `matmul_gflops` / `memcpy_gbs` / `peaks` to state a
phase's achieved FLOP/s or bytes/s as a fraction of the matching peak, at the phase's own thread count
(`matmul_params` and `model_flops` count a phase's useful FLOPs).

    python examples/benchmarks/peak.py                     # 1 thread (the benchmarks' default), then all cores
    python examples/benchmarks/peak.py --threads 2 --json out.json

matmul: `torch.matmul(x, w.mT)` of two N x N matrices (N = 2048; 1024 where one call takes over a second, as
bf16 on a CPU without bf16 instructions), 2 N^3 FLOP per call: the layout of every `nn.Linear` in the models
(the weight stored (out, in), used transposed). The layout matters on some CPUs: on an AVX2-only machine bf16
`torch.matmul(x, w)` with w stored (in, out) ran at 0.3 GFLOP/s against 10 for this layout (fp32: the same for
both), so this layout is the peak a model's layers can reach. Then one warm-up call, then repeated calls until `reps` or the
time budget (at least 3). The product is checked against a float64 reference on a few entries, so a figure
cannot come from a call that did nothing. memcpy: `dst.copy_(src)` of a 256 MiB float32 tensor (far above any
cache), bytes copied per second (1 GB = 1e9 B), the destination touched before timing. Each figure is the
median of its calls, with their spread (`spread`: interquartile range, min and max; the max is the best this
machine did). A few seconds in all.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import _common as C  # noqa: E402  (sets sys.path and the Ray environment)

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATMUL_N = 2048
MEMCPY_BYTES = 256 * C.MIB


def cpu_flags() -> set[str]:
    try:
        m = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return set(m.group(1).split()) if m else set()
    except OSError:
        return set()


def bf16_native() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


class _Threads:
    """torch's thread count set for a block and restored after it."""

    def __init__(self, n: int | None):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def _check_product(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dtype: torch.dtype) -> None:
    """c = a @ b.mT on a few entries, against float64."""
    ref = a[:4].double() @ b[:4].double().T
    got = c[:4, :4].double()
    tol = (2e-2 if dtype == torch.bfloat16 else 1e-3) * math.sqrt(a.shape[1])
    if not torch.allclose(got, ref, rtol=0, atol=tol):
        raise RuntimeError(f"matmul check failed ({dtype}): {got.flatten()[:4].tolist()} vs "
                           f"{ref.flatten()[:4].tolist()}")


def matmul_gflops(dtype: str = "fp32", threads: int | None = None, n: int = MATMUL_N, reps: int = 7,
                  budget_s: float = 1.5) -> dict:
    """{"value": median GFLOP/s, "spread": ..., "n": matrix size, "calls": timed calls, "threads"} of
    torch.matmul(x, w.mT) on two n x n matrices of `dtype` ("fp32" or "bf16") at `threads` torch threads."""
    dt = DTYPES[dtype]
    with _Threads(threads):
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(dt)
        b = torch.randn(n, n, generator=gen).to(dt)
        t0 = time.perf_counter()
        c = torch.matmul(a, b.mT)  # warm-up
        if time.perf_counter() - t0 > 1.0 and n > 1024:  # slow dtype: a smaller problem, the same measure
            n = 1024
            a, b = a[:n, :n].contiguous(), b[:n, :n].contiguous()
            c = torch.matmul(a, b.mT)
        _check_product(a, b, c, dt)
        rates, start = [], time.perf_counter()
        while len(rates) < reps and (len(rates) < 3 or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            torch.matmul(a, b.mT, out=c)
            rates.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
        _check_product(a, b, c, dt)
        used = torch.get_num_threads()
    return {"value": C.median(rates), "spread": C.spread_of(rates), "n": n, "calls": len(rates), "threads": used}


def memcpy_gbs(threads: int | None = None, nbytes: int = MEMCPY_BYTES, reps: int = 7) -> dict:
    """{"value": median GB/s, "spread", "bytes", "threads"} of dst.copy_(src), bytes copied per second."""
    with _Threads(threads):
        numel = max(1, nbytes // 4)
        src = torch.ones(numel, dtype=torch.float32)
        dst = torch.zeros(numel, dtype=torch.float32)  # touched: no first-use page faults in the timing
        dst.copy_(src)
        rates = []
        for i in range(reps):
            src[i % numel] = float(i)
            t0 = time.perf_counter()
            dst.copy_(src)
            rates.append(numel * 4 / (time.perf_counter() - t0) / 1e9)
        if float(dst[(reps - 1) % numel]) != float(reps - 1):
            raise RuntimeError("memcpy check failed: the destination does not hold the last copy")
        used = torch.get_num_threads()
    return {"value": C.median(rates), "spread": C.spread_of(rates), "bytes": numel * 4, "threads": used}


def peaks(threads: int | None = None, quick: bool = False, dtypes=("fp32", "bf16")) -> dict:
    """{"matmul_fp32_gflops": {...}, "matmul_bf16_gflops": {...}, "memcpy_gbs": {...}} at `threads`."""
    reps, budget = (3, 0.5) if quick else (7, 1.5)
    out = {f"matmul_{d}_gflops": matmul_gflops(d, threads, reps=reps, budget_s=budget) for d in dtypes}
    out["memcpy_gbs"] = memcpy_gbs(threads, nbytes=MEMCPY_BYTES // (4 if quick else 1), reps=reps)
    return out


# ------------------------------------------------------------------------------------------ FLOP accounting
def matmul_params(model) -> tuple[int, int]:
    """(parameters a token's forward multiplies through, output-head parameters) of a causal LM: every unique
    parameter but the input embeddings (a lookup, not a matmul) and the head, which the project applies at
    response positions only. Norm weights are counted with the first (a rounding error)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    head = out.weight if out is not None else emb
    skip = {id(emb), id(head)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip), head.numel()


def model_flops(params: tuple[int, int], tokens: int, head_positions: int, backward: bool) -> float:
    """Useful FLOPs of a forward (2 x params x tokens) or forward + backward (6 x) over `tokens` tokens, the
    output head at `head_positions` positions (`matmul_params`). Attention's own score/value products are left
    out (small next to the weights at the sequence lengths benchmarked here), as are recomputations."""
    body, head = params
    return (6 if backward else 2) * (body * tokens + head * head_positions)


DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def add_figures(report: C.Report, measured: dict, suffix: str = "", where: str = "") -> None:
    for name, m in measured.items():
        unit = "GB/s" if name.startswith("memcpy") else "GFLOP/s"
        what = (f"dst.copy_(src), {m['bytes'] / C.MIB:.0f} MiB float32" if unit == "GB/s"
                else f"torch.matmul(x, w.mT) {m['n']} x {m['n']}, median of {m['calls']} calls")
        report.add(name + suffix, m["value"], unit, note=f"{what}, {m['threads']} thread(s){where}",
                   spread=m["spread"])


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--no-all-cores", action="store_true", help="measure at --threads only")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    threads = C.set_threads(args)
    report = C.Report("peak")
    C.progress("peak", f"matmul fp32/bf16 and memcpy at {threads} thread(s)")
    measured = peaks(threads, args.quick)
    add_figures(report, measured)
    cores = C.machine_info()["cpu_count"] or 1
    rows = [{"threads": threads, **{k: m["value"] for k, m in measured.items()}}]
    if cores > threads and not args.no_all_cores:
        C.progress("peak", f"the same at {cores} threads")
        every = peaks(cores, args.quick)
        add_figures(report, every, f"_{cores}_threads")
        rows.append({"threads": cores, **{k: m["value"] for k, m in every.items()}})
    report.rows = rows
    report.config = {"threads": threads, "matmul_n": MATMUL_N, "memcpy_bytes": measured["memcpy_gbs"]["bytes"],
                     "bf16_native": bf16_native(), "quick": args.quick}
    if not bf16_native():
        report.notes.append("this CPU has no bf16 dot-product instructions (avx512_bf16 / amx_bf16): bf16 "
                            "matmuls are emulated and slower than fp32")
    report.add("bf16_over_fp32", measured["matmul_bf16_gflops"]["value"] / measured["matmul_fp32_gflops"]["value"],
               "x", note="bf16 matmul throughput over fp32's, same threads")
    report.print()
    report.write(args.json, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
