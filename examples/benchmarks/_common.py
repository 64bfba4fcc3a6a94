"""Shared pieces of the benchmark scripts: environment, models, timing, memory, figures and output.

Threads: one torch thread by default (`--threads`), the same for every compared variant; see `base_parser`.

Timing: compared variants run interleaved (A, B, B, A, A, B, ... the order alternates every repetition)
after warm-up runs, and a ratio is the median of the per-repetition ratios, so a load change on the machine
hits both sides of a pair alike. Repeated figures also carry their spread (`spread_of`: the interquartile
range of the per-repetition values, min and max), and their verdict is the range's against the target
(`check_target`: pass / MISS / unclear). Absolute times are medians. Where the compared variants run in this one
process, the CPU time of the process (`time.process_time`) is recorded too: with one thread it is the
call's time on a core of its own, which other processes' load hardly changes (`*_cpu_time_ratio` figures
cross-check the wall-clock ratios).

Memory (CPU): peak resident-set growth of this process over a call. Before the call the kernel's
high-water mark is reset to the current RSS (`/proc/self/clear_refs` <- "5", Linux >= 4.0) after
`gc.collect()` and `malloc_trim(0)`; after it `VmHWM - VmRSS(before)` is read from `/proc/self/status`.
glibc serves allocations above its mmap threshold with mmap and gives them back on free, so every
tensor of that size shows in RSS while it lives and leaves it when freed; `use_exact_malloc()` fixes
the threshold at 256 KiB (glibc otherwise raises it up to 32 MiB at run time and smaller tensors come
from a heap that does not shrink). It is called only before the memory phase of a script, after the
timings, so it never changes a timing. Tensors below 256 KiB and Python objects may reuse heap memory and
be under-counted; the V-wide tensors that matter here are far larger. Where `clear_refs` cannot be
written, a 1 ms RSS sampler thread stands in (it can miss peaks shorter than that).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Before any `import ray`: Ray on 127.0.0.1, no token, no usage report.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 1024 ** 3
MIB = 1024 ** 2
PAPER_VOCAB = 151_936  # Qwen3's padded vocabulary


# ------------------------------------------------------------------------------------------ machine
def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                            "platform": platform.platform(), "cuda": torch.cuda.is_available()}
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        info["cpu_model"] = cpu.group(1).strip() if cpu else platform.processor()
        mem = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        info["memory_gib"] = round(int(mem.group(1)) * 1024 / GIB, 1) if mem else None
    except OSError:
        pass
    for mod in ("transformers", "ray", "deepspeed", "pyarrow"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version is informational only
            pass
    return info


def available_memory_bytes() -> int:
    try:
        m = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return int(m.group(1)) * 1024 if m else 0
    except OSError:
        return 0


# timing (`_timing.py`): re-exported, the scripts call them as C.<name>
from _timing import (Timings, interleaved, median, pair_ratios, paired_ratio, spread_of,  # noqa: E402,F401
                     timed)


# ------------------------------------------------------------------------------------------ memory
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def use_exact_malloc(threshold: int = 256 * 1024) -> bool:
    """Fix glibc's mmap threshold (M_MMAP_THRESHOLD = -3) so freed large blocks leave RSS at once."""
    libc = _libc()
    return bool(libc and libc.mallopt(-3, threshold))


def _status_bytes(key: str) -> int:
    m = re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) * 1024 if m else 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_growth(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak RSS during fn() minus RSS before it, in bytes; fn's result). See the module doc."""
    gc.collect()
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
    base = _status_bytes("VmRSS")
    if _reset_hwm():
        res = fn()
        peak = _status_bytes("VmHWM")
        return max(0, peak - base), res
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _status_bytes("VmRSS"))
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        res = fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], _status_bytes("VmRSS"))
    return max(0, peak[0] - base), res


MEMORY_METHOD = ("peak RSS growth over the call: /proc/self/clear_refs=5 resets VmHWM to VmRSS, then "
                 "VmHWM - VmRSS(before); glibc mmap threshold fixed at 256 KiB (mallopt) during memory runs")


# ------------------------------------------------------------------------------------------ models
def tiny_pair(teacher: str | None, student: str | None) -> tuple[str, str]:
    """The command-line models, or the embedded tiny pair (built and cached on first use)."""
    if teacher and student:
        return str(teacher), str(student)
    from eopd_ray.tiny_models import ensure_tiny_models

    t, s = ensure_tiny_models()
    return str(teacher or t), str(student or s)


def synthetic_prompts(student: str, n: int) -> tuple[list, list[str]]:
    """n prompts of the embedded task tokenised for `student` (the rollout benchmarks' workload) and answers."""
    from eopd_ray.data import synthetic_rows, tokenize_rows
    from eopd_ray.models import load_tokenizer

    recs = tokenize_rows(synthetic_rows(n, 3, "train"), load_tokenizer(student), 64, "synthetic")
    return [r.prompt_ids for r in recs], [r.answer for r in recs]


def rollout_parser(doc: str, lengths: str) -> argparse.ArgumentParser:
    """The rollout benchmarks' options: the base ones plus --batch and --max-new-tokens."""
    p = base_parser(doc)
    p.add_argument("--batch", type=int, default=0, help="prompts per call (default 32; quick 8)")
    p.add_argument("--max-new-tokens", type=int, default=0, help=lengths)
    return p


@dataclass(frozen=True)
class RandomSpec:
    """A randomly initialised Qwen3 (the shape is what matters for speed and memory)."""

    hidden: int = 256
    layers: int = 2
    vocab: int = PAPER_VOCAB
    heads: int = 4
    intermediate: int = 0  # 0 = 3 x hidden
    tie: bool = True
    seed: int = 0

    @property
    def name(self) -> str:
        return f"qwen3-h{self.hidden}-l{self.layers}-v{self.vocab}"

    def key(self) -> str:
        return (f"{self.name}-a{self.heads}-i{self.intermediate or 3 * self.hidden}-t{int(self.tie)}"
                f"-s{self.seed}")


def bench_cache_dir() -> Path:
    root = os.environ.get("EOPD_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "eopd_ray")
    return Path(root) / "bench-models"


def word_tokenizer(vocab: int):
    """A WordLevel tokenizer with exactly `vocab` ids: <pad> <bos> <eos> <unk>, then t4, t5, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"t{i}" for i in range(4, vocab)]
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False, padding_side="left")


def random_model_dir(spec: RandomSpec, cache: Path | None = None) -> str:
    """Build (once, cached) an HF directory holding a random Qwen3 of `spec` and a matching tokenizer."""
    import shutil
    import uuid

    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    final = (cache or bench_cache_dir()) / spec.key()
    if (final / "COMPLETE").exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{spec.key()}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tok = word_tokenizer(spec.vocab)
    head_dim = max(8, spec.hidden // spec.heads)
    cfg = Qwen3Config(vocab_size=spec.vocab, hidden_size=spec.hidden,
                      intermediate_size=spec.intermediate or 3 * spec.hidden, num_hidden_layers=spec.layers,
                      num_attention_heads=spec.heads, num_key_value_heads=spec.heads, head_dim=head_dim,
                      max_position_embeddings=8192, tie_word_embeddings=spec.tie, rms_norm_eps=1e-6,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen3ForCausalLM(cfg).float()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True,
                                               temperature=1.0, top_p=1.0, top_k=0)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "COMPLETE").write_text(json.dumps({"spec": spec.key()}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def model_param_bytes(path: str) -> int:
    """Bytes of the unique parameters as saved (tied weights once): the safetensors files' sizes."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


# ------------------------------------------------------------------------------------------ figures
@dataclass
class Figure:
    value: float
    unit: str = ""
    target: str | None = None  # "<= 1.05" or ">= 0.9"; None = informational
    note: str = ""
    spread: dict | None = None  # repeated figures: `spread_of` their repetitions (value: their median)

    def passed(self) -> bool | None:
        return check_target(self.value, self.target, self.spread)


def check_target(value: float, target: str | None, spread: dict | None = None) -> bool | None:
    """True (met), False (missed) or None: no target, or (a repeated figure) a spread that straddles it.

    With a spread the verdict is the interquartile range's, not the median's: met when the whole range meets
    the target, missed when none of it does, else None ("unclear"), so a noisy machine widens the range into
    "unclear" instead of flipping a verdict either way."""
    if not target:
        return None
    if value is None or not math.isfinite(value):
        return False
    op, num = target.split()
    bound = float(num)

    def meets(x: float) -> bool:
        return x <= bound if op == "<=" else x >= bound

    if spread is None:
        return meets(value)
    low, high = spread["low"], spread["high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return False
    if meets(low) and meets(high):
        return True
    if not meets(low) and not meets(high):
        return False
    return None


def verdict(passed: bool | None, target: str | None) -> str:
    """The summary's word for a figure: pass / MISS / unclear (a spread across the target) / '' (no target)."""
    if not target:
        return ""
    return {True: "pass", False: "MISS", None: "unclear"}[passed]


@dataclass
class Report:
    """What a benchmark script writes: flat figures plus free-form detail rows."""

    benchmark: str
    figures: dict[str, Figure] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # free-form detail kept in the JSON only

    def add(self, name: str, value: float, unit: str = "", target: str | None = None, note: str = "",
            spread: dict | None = None) -> None:
        """A figure. A name with a "/" is a group of its own (`phase/...`): run_all keeps it as it is instead of
        prefixing the benchmark's name."""
        self.figures[name] = Figure(float(value), unit, target, note, spread)

    def add_repeated(self, name: str, values: Sequence[float], unit: str = "", target: str | None = None,
                     note: str = "") -> None:
        """A figure of repeated measurements: their median, with their spread (`spread_of`)."""
        self.add(name, median([v for v in values if math.isfinite(v)]), unit, target, note, spread_of(values))

    def to_dict(self, elapsed_s: float) -> dict:
        figures = {}
        for k, f in self.figures.items():
            figures[k] = {"value": f.value, "unit": f.unit, "target": f.target, "pass": f.passed(), "note": f.note}
            if f.spread is not None:
                figures[k]["spread"] = f.spread
        return {"benchmark": self.benchmark, "machine": machine_info(), "config": self.config,
                "elapsed_s": round(elapsed_s, 2), "memory_method": MEMORY_METHOD, "notes": self.notes,
                "figures": figures, "rows": self.rows, "extra": self.extra}

    def print(self) -> None:
        print(f"\n== {self.benchmark} ==")
        if self.rows:
            print_table(self.rows)
            print()
        print_table([{"figure": k, "value": fmt(f.value), "spread": spread_text(f.spread), "unit": f.unit,
                      "target": f.target or "", "pass": verdict(f.passed(), f.target)}
                     for k, f in self.figures.items()])
        for n in self.notes:
            print(f"note: {n}")

    def write(self, path: str | None, elapsed_s: float) -> None:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(self.to_dict(elapsed_s), indent=2, default=_json_default))


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def spread_text(spread: dict | None) -> str:
    """`low-high (n)` of a repeated figure's interquartile range, '' for a single measurement."""
    if not spread:
        return ""
    return f"{fmt(float(spread['low']))}-{fmt(float(spread['high']))} (n={spread['n']})"


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.3f}"
        return f"{v:.4g}"
    return str(v)


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


# ------------------------------------------------------------------------------------------ CLI
def base_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="teacher model directory (default: the embedded tiny teacher)")
    p.add_argument("--student", help="student model directory (default: the embedded tiny student)")
    p.add_argument("--hidden", type=int, default=0, help="large config: random Qwen3 hidden size (256; quick 64)")
    p.add_argument("--layers", type=int, default=0, help="large config: random Qwen3 layers (2; quick 1)")
    p.add_argument("--vocab", type=int, default=PAPER_VOCAB, help="large config: vocabulary (paper: 151,936)")
    p.add_argument("--heads", type=int, default=4, help="large config: attention heads")
    p.add_argument("--no-large", action="store_true", help="skip the large-vocabulary random-model config")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions per variant (0 = the script's default)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1; 0 = all cores). On a shared 2-core machine two OpenMP threads "
                        "stall for whole scheduler slices whenever another process runs (a 0.08 s call measured at "
                        "0.07-4.8 s), which no number of repetitions averages out")
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (smoke runs)")
    p.add_argument("--json", help="write the figures and rows to this JSON file")
    return p


def large_spec(args) -> RandomSpec | None:
    if args.no_large:
        return None
    hidden = args.hidden or (64 if args.quick else 256)
    return RandomSpec(hidden=hidden, layers=args.layers or (1 if args.quick else 2), vocab=args.vocab,
                      heads=min(args.heads, max(1, hidden // 16)))


def set_threads(args) -> int:
    import torch

    n = args.threads if args.threads and args.threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def repetitions(args, large_full: int) -> tuple[int, int]:
    """(reps for the tiny models, reps for the large-vocabulary config): --reps if given, else 2 with --quick,
    else 15 (the tiny models' calls take a tenth of a second) and `large_full`."""
    if args.reps:
        return args.reps, args.reps
    return (2, 2) if args.quick else (15, large_full)


def init_local_ray():
    """Local Ray on 127.0.0.1 through the project's own `init_ray` (no dashboard, loopback only)."""
    import ray

    from actors.driver.build import init_ray

    init_ray("")
    return ray


def progress(bench: str, msg: str) -> None:
    """A progress line on stderr (run_all keeps it in the script's log)."""
    print(f"[{bench} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
