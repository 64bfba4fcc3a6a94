"""Tiny teacher and student models for the embedded task (`eopd_ray.task`), built offline in about a minute.

Both are `Qwen3ForCausalLM` over one character-level tokenizer, trained on the exact distribution over
valid continuations (every accumulation order), so the teacher's entropy is about ln(number of valid
choices) at decision points and near 0 elsewhere. The student is smaller (width 96 against 128), trained for
fewer steps, and under-confident: 10% of every training target is spread uniformly over the vocabulary
(label smoothing), so at temperature 1 it samples characters that leave every valid trace and most of its
solutions fail (about 1 in 8 is right against the teacher's 19 in 20). That is the weakness on-policy
distillation repairs quickly: the teacher scores each slip it samples, and the student learns the teacher's
sharpness where the task is determined while the choices of accumulation order stay open.

What did not work as the default student, measured with the same loop (24-60 steps): a student trained
mostly on one order (canonical) drops in accuracy when pushed toward the teacher's diverse orders, which it
tracks poorly; an undertrained but well-calibrated student improves too slowly to show within the budget.
`ensure_tiny_models()` caches the build under a hash of its config.

Tokenizer convention (as Qwen's): encoding text adds no special tokens; the chat template renders a user
message as ``<bos>`` + prompt, an assistant message as its text + ``<eos>``; `add_generation_prompt` adds
nothing. Models were trained on ``<bos> prompt response <eos>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import task as T

VERSION = "tiny-models-v1"  # bump when the build changes in a way the config hash cannot see
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
ALPHABET = "0123456789+-*/=;#?:(), .\nabcdefghijklmnopqrstuvwxyz"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
)
MARKER = "COMPLETE.json"  # written last into a finished build
MAX_POSITIONS = 512  # RoPE context the models declare (task sequences are < 48 tokens)


@dataclass
class TinyModelSpec:
    """Architecture and training of one tiny model (a `Qwen3ForCausalLM`)."""

    hidden_size: int = 128  # model width
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # attention heads; head_dim = hidden_size // num_heads = 32, a size vLLM's CPU attention takes
    intermediate_size: int = 0  # MLP width; 0 = 4 x hidden_size
    steps: int = 800  # AdamW steps of cross entropy on responses (+ eos)
    lr: float = 1e-3  # peak learning rate (linear warmup, cosine to 10%)
    traces: str = "all"  # "all": uniformly sampled accumulation orders; "canonical": left to right only
    targets: str = "soft"  # with traces="all": "soft" = exact distribution over valid next chars; "hard"
    canonical_frac: float = 0.0  # with traces="all": share of rows given the left-to-right trace (hard)
    label_smoothing: float = 0.0  # share of every target spread uniformly over the vocabulary (under-confidence)


@dataclass
class TinyModelsConfig:
    """How `build_tiny_models` makes the teacher and the student; its hash names the cache directory."""

    teacher: TinyModelSpec = field(default_factory=TinyModelSpec)
    student: TinyModelSpec = field(default_factory=lambda: TinyModelSpec(
        hidden_size=96, num_layers=2, num_heads=3, steps=700, lr=1e-3, targets="soft", label_smoothing=0.1))
    batch_size: int = 32  # sequences per optimizer step
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_frac: float = 0.05  # share of steps with linear warmup
    seed: int = 0  # seeds model init and training data; the build is deterministic for a thread count
    min_terms: int = T.MIN_TERMS  # task: fewest terms per problem
    max_terms: int = T.MAX_TERMS  # task: most terms per problem
    max_term: int = T.MAX_TERM  # task: largest term
    distinct: bool = T.DISTINCT  # task: terms of a problem differ
    num_threads: int = 1  # torch threads while building (0 = torch's default); a 2nd thread gains little on
    # matrices this small, and OpenMP threads stall badly when other processes hold the cores
    parallel: bool = True  # train the student in a child process while the teacher trains (2+ CPUs only)

    def validate(self) -> None:
        for name, s in (("teacher", self.teacher), ("student", self.student)):
            for bad, field_, value, allowed in [
                (s.traces not in ("all", "canonical"), "traces", s.traces, "all, canonical"),
                (s.targets not in ("soft", "hard"), "targets", s.targets, "soft, hard"),
                (s.hidden_size % s.num_heads != 0, "hidden_size", s.hidden_size, "a multiple of num_heads"),
                (not 0 <= s.canonical_frac <= 1, "canonical_frac", s.canonical_frac, "a number in [0, 1]"),
                (not 0 <= s.label_smoothing < 1, "label_smoothing", s.label_smoothing, "a number in [0, 1)"),
                (s.steps < 1, "steps", s.steps, "an integer >= 1")]:
                if bad:
                    raise ValueError(f"tiny_models.{name}.{field_}={value!r} is invalid: allowed {allowed}")

    def key(self) -> str:
        """Short hash of the config (less `parallel`, which changes no weight) and VERSION: the cache
        subdirectory name."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "parallel"}
        blob = json.dumps(fields, sort_keys=True) + VERSION
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------- tokenizer
def build_tokenizer():
    """Character-level WordLevel tokenizer over the task alphabet with ``<pad> <bos> <eos> <unk>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(SPECIALS) + list(ALPHABET))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", unk_token="<unk>", clean_up_tokenization_spaces=False,
                                  model_max_length=MAX_POSITIONS, padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok


_CHAR_IDS = {c: len(SPECIALS) + i for i, c in enumerate(ALPHABET)}  # `build_tokenizer`'s ids (tested)
_ID_CHARS = {i: c for c, i in _CHAR_IDS.items()}


# ----------------------------------------------------------------------------------------- models
def _make_model(spec: TinyModelSpec, tok, seed: int):
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size or 4 * spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        head_dim=spec.hidden_size // spec.num_heads, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=40)
    return model


@lru_cache(maxsize=65536)
def _targets(terms: tuple[int, ...], trace: str, soft: bool, eos_id: int):
    """(response position, token id, probability) triples of one trace's targets; position len(trace) is
    the end of the response (token eos)."""
    dists = (T.next_char_distributions(T.problem_from_terms(terms), trace) if soft
             else [{c: 1.0} for c in trace] + [{"": 1.0}])
    trip = [(i, _CHAR_IDS[ch] if ch else eos_id, pr) for i, d in enumerate(dists) for ch, pr in d.items()]
    return tuple(np.asarray(x) for x in zip(*trip))


def _batch(rng: np.random.Generator, cfg: TinyModelsConfig, spec: TinyModelSpec, tok):
    """Right-padded ``<bos> prompt response <eos>`` rows and per-position target distributions over the
    vocabulary (zero rows outside response + eos). Soft targets are the exact next-character distribution
    over all accumulation orders (`task.next_char_distributions`): the expected cross entropy of sampled
    traces, without its sampling noise."""
    rows, trips = [], []
    k = int(rng.integers(cfg.min_terms, cfg.max_terms + 1))  # one term count per batch: little padding
    soft = spec.targets == "soft" and spec.traces == "all"
    for _ in range(cfg.batch_size):
        p = T.problem_from_terms(T.sample_terms(rng, "train", k, k, cfg.max_term, cfg.distinct))
        canonical = spec.traces == "canonical" or rng.random() < spec.canonical_frac
        trace = T.canonical_trace(p) if canonical else T.sample_trace(p, rng)
        prompt = [tok.bos_token_id] + [_CHAR_IDS[c] for c in p.prompt]
        rows.append(prompt + [_CHAR_IDS[c] for c in trace] + [tok.eos_token_id])
        pos, tid, pr = _targets(tuple(sorted(p.terms)), trace, soft and not canonical, tok.eos_token_id)
        trips.append((pos + len(prompt) - 1, tid, pr))  # logits at len(prompt) - 1 + i predict position i
    width = max(map(len, rows))
    input_ids = np.full((len(rows), width), tok.pad_token_id, dtype=np.int64)
    targets = np.zeros((len(rows), width - 1, len(tok)), dtype=np.float32)
    for r, (row, (pos, tid, pr)) in enumerate(zip(rows, trips)):
        input_ids[r, : len(row)] = row
        targets[r, pos, tid] = pr
        if spec.label_smoothing:
            eps, at = spec.label_smoothing, np.unique(pos)
            targets[r, at] = (1 - eps) * targets[r, at] + eps / len(tok)
    return torch.from_numpy(input_ids), torch.from_numpy(targets)


def _train_model(model, tok, spec: TinyModelSpec, cfg: TinyModelsConfig, seed: int, progress: bool,
                 desc: str, on_step=None) -> float:
    """Next-token cross entropy on responses; returns the mean loss of the last 20 steps. `on_step(step,
    model, loss)`, if given, runs after every optimizer step (experiments, tests)."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    warm = max(1, int(cfg.warmup_frac * spec.steps))

    def lr_at(step: int) -> float:  # linear warmup, then cosine from 1 to 0.1
        t = (step - warm) / max(1, spec.steps - warm)
        return (step + 1) / warm if step < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    recent: list[float] = []
    bar = tqdm(range(spec.steps), desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for step in bar:
        input_ids, targets = _batch(rng, cfg, spec, tok)
        # right padding under a causal mask: real tokens never see pads, so no attention mask is needed
        logp = torch.log_softmax(model(input_ids=input_ids).logits[:, :-1].float(), -1)
        loss = -(targets * logp).sum() / targets.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{recent[-1]:.3f}", refresh=False)
        if on_step is not None:
            on_step(step, model, recent[-1])
    bar.close()
    model.eval()
    return float(np.mean(recent))


def build_tiny_models(out_dir, cfg: TinyModelsConfig | None = None,
                      progress: bool = True) -> tuple[Path, Path]:
    """Train and save ``out_dir/teacher`` and ``out_dir/student`` (HF format: model.safetensors, config.json,
    generation_config.json, tokenizer files). With `cfg.parallel` and 2+ usable CPUs the student trains in a
    child process meanwhile. Deterministic for a given config and thread count; the caller's torch RNG state
    and thread count are left as they were."""
    cfg = cfg or TinyModelsConfig()
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info: dict = {"version": VERSION, "config": dataclasses.asdict(cfg)}
    child = None
    if cfg.parallel and len(os.sched_getaffinity(0)) >= 2:  # a fresh interpreter: no __main__ re-import
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        child = subprocess.Popen([sys.executable, "-m", "eopd_ray.tiny_models", "--build-one", "student",
                                  str(out_dir), json.dumps(dataclasses.asdict(cfg))],
                                 env=dict(os.environ, PYTHONPATH=path))
    try:
        info["teacher"] = _build_one(out_dir, cfg, "teacher", progress)
        if child is None:
            info["student"] = _build_one(out_dir, cfg, "student", progress)
        elif child.wait() != 0:
            raise RuntimeError(f"building the tiny student in a child process failed (exit code "
                               f"{child.returncode}, error printed above); retry with parallel=False")
        else:
            info["student"] = json.loads((out_dir / ".student.json").read_text())
            (out_dir / ".student.json").unlink()
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2))
    return out_dir / "teacher", out_dir / "student"


def _build_one(out_dir: Path, cfg: TinyModelsConfig, name: str, progress: bool) -> dict:
    """Train and save one model into ``out_dir/name``; returns facts about the build."""
    prev_threads = torch.get_num_threads()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            i = ("teacher", "student").index(name)
            spec = getattr(cfg, name)
            t0 = time.perf_counter()
            tok = build_tokenizer()
            model = _make_model(spec, tok, seed=cfg.seed * 1000 + i)
            loss = _train_model(model, tok, spec, cfg, seed=cfg.seed * 1000 + 100 + i, progress=progress,
                                desc=f"tiny {name}")
            model.save_pretrained(out_dir / name, safe_serialization=True)
            tok.save_pretrained(out_dir / name)
            return {"params": sum(p.numel() for p in model.parameters()), "final_loss": round(loss, 4),
                    "seconds": round(time.perf_counter() - t0, 2), "torch_threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(prev_threads)


# The embedded pairs `model.tiny_variant` names: one teacher, three students. `calibrated` and `canonical60`
# were built to look for OPD's entropy collapse on this task (docs/results.md, the collapse search).
VARIANTS = {
    "default": TinyModelsConfig(),  # over-dispersed student (label smoothing 0.1)
    # smaller, trained on the exact soft targets without smoothing: as calibrated as its width allows
    "calibrated": TinyModelsConfig(student=TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, steps=800, lr=2e-3)),
    # 60% of its rows in the left-to-right order: starts with fewer high-entropy tokens than the teacher
    "canonical60": TinyModelsConfig(student=TinyModelSpec(hidden_size=96, num_layers=2, num_heads=3, steps=700,
                                                          lr=1e-3, canonical_frac=0.6)),
}


def _config_from_dict(d: dict) -> TinyModelsConfig:
    d = dict(d)
    teacher, student = TinyModelSpec(**d.pop("teacher")), TinyModelSpec(**d.pop("student"))
    return TinyModelsConfig(teacher=teacher, student=student, **d)


def default_cache_dir() -> Path:
    root = os.environ.get("EOPD_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "eopd_ray")
    return Path(root) / "tiny-models"


def ensure_tiny_models(cache_dir=None, cfg: TinyModelsConfig | None = None,
                       progress: bool = True) -> tuple[Path, Path]:
    """(teacher_dir, student_dir) under ``cache_dir/<cfg.key()>``, building them once. The build goes to a
    temporary sibling directory, gets its marker file last, and is renamed into place; a lock file keeps
    concurrent callers from building twice. An interrupted build never looks complete."""
    from filelock import FileLock

    cfg = cfg or TinyModelsConfig()
    cfg.validate()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / cfg.key()
    if (final / MARKER).exists():
        return final / "teacher", final / "student"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{cfg.key()}.lock")):
        if (final / MARKER).exists():
            return final / "teacher", final / "student"
        for stale in root.glob(f".{cfg.key()}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a directory without marker is not trusted
            shutil.rmtree(final)
        tmp = root / f".{cfg.key()}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        print(f"[eopd_ray] building tiny teacher + student models (config {cfg.key()}) into {final}",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            build_tiny_models(tmp, cfg, progress=progress)
            (tmp / MARKER).write_text(json.dumps({"version": VERSION, "key": cfg.key(),
                                                  "seconds": round(time.perf_counter() - t0, 1)}))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"[eopd_ray] tiny models ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return final / "teacher", final / "student"


# ----------------------------------------------------------------------------------------- measurement
@torch.no_grad()
def evaluate_model(model_or_dir, problems: Sequence[T.Problem], n: int = 1, temperature: float = 1.0,
                   seed: int = 0, batch_size: int = 256, max_new_tokens: int = 40) -> dict:
    """Sample `n` responses per problem and report accuracy, trace validity and the model's own entropy
    (nats, full vocabulary, at `temperature`) over its generated tokens, split by decision points
    (>= 2 valid options, `task.branching`) and determined positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model_or_dir, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_or_dir)
    else:
        model, tok = model_or_dir, build_tokenizer()
    model.eval()
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG state alone
        torch.manual_seed(seed)
        return _evaluate(model, tok, [p for p in problems for _ in range(n)], temperature, batch_size,
                         max_new_tokens)


def _evaluate(model, tok, jobs: list, temperature: float, batch_size: int, max_new_tokens: int) -> dict:
    correct = valid = noncanon = 0
    ents, branch = [], []
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s: s + batch_size]
        enc = tok.apply_chat_template([[{"role": "user", "content": p.prompt}] for p in chunk],
                                      tokenize=True, add_generation_prompt=True, padding=True,
                                      return_tensors="pt", return_dict=True)
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        resp = out[:, enc["input_ids"].shape[1]:]
        is_eos = (resp == tok.eos_token_id).int()
        keep = (torch.cumsum(is_eos, 1) - is_eos) == 0  # tokens up to and including the first eos
        full_mask = torch.cat([enc["attention_mask"], keep.long()], 1)
        logits = model(input_ids=out, attention_mask=full_mask).logits[:, enc["input_ids"].shape[1] - 1: -1]
        logp = torch.log_softmax(logits.float() / temperature, -1)
        ent = -(logp.exp() * logp).sum(-1)
        for r, p in enumerate(chunk):
            k = int(keep[r].sum())
            ended = bool(is_eos[r].any())
            # one character per token (special tokens become NUL) so that `branching` lines up with them
            text = "".join(_ID_CHARS.get(i, "\0") for i in resp[r, : k - 1 if ended else k].tolist())
            correct += T.grade(text, p.answer)
            valid += T.is_valid_trace(p, text)
            noncanon += T.is_valid_trace(p, text) and text != T.canonical_trace(p)
            b = T.branching(p, text, include_end=ended)
            ents.extend(ent[r, :k].tolist())
            branch.extend(b[:k] + [0] * (k - len(b)))
    e, b = np.asarray(ents), np.asarray(branch)
    m = max(1, len(jobs))
    return {
        "n": len(jobs), "accuracy": correct / m, "valid_trace_rate": valid / m,
        "noncanonical_rate": noncanon / m, "tokens_per_response": len(e) / m,
        "frac_entropy_ge_1.0": float((e >= 1.0).mean()), "frac_entropy_ge_0.8": float((e >= 0.8).mean()),
        "decision_fraction": float((b >= 2).mean()),
        "mean_entropy_decision": float(e[b >= 2].mean()) if (b >= 2).any() else float("nan"),
        "mean_entropy_determined": float(e[b == 1].mean()) if (b == 1).any() else float("nan"),
    }


def sample_accuracy(model_dir, problems: Sequence[T.Problem], n: int = 1, temperature: float = 1.0,
                    seed: int = 0) -> float:
    """Share of `n` samples per problem at `temperature` whose answer grades correct."""
    return evaluate_model(model_dir, problems, n=n, temperature=temperature, seed=seed)["accuracy"]


if __name__ == "__main__":  # python -m eopd_ray.tiny_models [--cache-dir DIR]: build or find the pair
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default=None, help="cache root (default: ~/.cache/eopd_ray/tiny-models)")
    ap.add_argument("--build-one", nargs=3, metavar=("NAME", "OUT", "CONFIG_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_one:  # the child process of a parallel build
        name, out, cfg_json = args.build_one
        facts = _build_one(Path(out), _config_from_dict(json.loads(cfg_json)), name, progress=False)
        (Path(out) / f".{name}.json").write_text(json.dumps(facts))
    else:
        print(*ensure_tiny_models(args.cache_dir), sep="\n")
