"""One GPU against its own peak: the figures of `gpu_check.sh`, one stage per process, then one JSON file.

    python examples/benchmarks/gpu_peak.py stage peak   --json parts/peak.json     # bf16/fp32 matmul, copies
    python examples/benchmarks/gpu_peak.py stage phases --json parts/phases.json   # teacher scoring, student step
    python examples/benchmarks/gpu_peak.py stage sync   --json parts/sync.json     # weight sync on one GPU (+NCCL on 2)
    python examples/benchmarks/gpu_peak.py stage vllm   --json parts/vllm.json     # sleep / wake, where vLLM imports
    python examples/benchmarks/gpu_report.py --parts parts --json gpu_check.json    # all in one file

Each stage runs in a process of its own so that `gpu_check.sh` can put a timeout on it and so that the memory one
stage leaves in torch's caching allocator cannot change the next one (vLLM sizes its KV cache from free memory).
`--device cpu --size tiny` runs the same code on a CPU with a tiny model: a smoke test of the code, not a figure.

What is measured (GPU times from CUDA events, after warm-up calls; each figure the median of its repetitions, with
`spread` = interquartile range, min, max as in the other benchmarks):
- peak: `torch.matmul(x, w.mT)` of two 8192 x 8192 matrices in bf16 and in fp32 (TF32 off: true fp32), 2 N^3 FLOP a
  call, the product checked against float64 on a few entries; `dst.copy_(src)` of 1 GiB on the device (bytes copied
  per second, the convention of `peak.py`), and 512 MiB between pinned host memory and the device both ways.
- phases, on a model with the shape of Qwen3-0.6B (28 layers, hidden 1024, untied 151,936-row head; random weights,
  built from its config, nothing downloaded):
  teacher scoring in bf16 = the decoder over 16 rows x (512 prompt + 512 response) tokens, then the project's
  `token_stats_from_hidden` (log-prob, entropy, top-16) at the 512 response positions of each row, as
  `TeacherScorer` does; teacher forward = the same decoder and the head's matmul alone (this shape's ceiling);
  student step = forward + backward + fused AdamW over 8 x 512 tokens, fp32 master weights under bf16 autocast.
  FLOPs = 2 x matmul params x tokens forward, 6 x for forward + backward (`peak.model_flops`); the fractions of
  the bf16 matmul peak are formed by `gpu_report.py`, against the peak of the same run.
- sync: a bf16 state dict with this model's parameter shapes (1.5 GB). Same-device copy of every tensor (the
  ceiling of any one-GPU sync); packing into 512 MiB buckets (`actors.sync.buckets.flatten`, the sender's side);
  CUDA IPC: a second process on the same GPU maps the buckets (`open_ipc_handle`, timed apart, once per sync in the
  project) and copies every tensor out of them into tensors of its own, checked bit for bit. One GPU cannot run the
  NCCL broadcast (NCCL refuses two ranks on one GPU): with 2 GPUs it runs `run_two_process_broadcast`, else it is
  recorded as skipped with that reason.
- vllm: `VLLMEngine` with sleep mode on a small Qwen3 (level 1 sleep: weights to host, KV cache dropped), seconds
  per sleep and per wake-up; skipped with the reason where vLLM or CUDA is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import traceback

import _common as C  # noqa: E402  (sets sys.path to the repository root)

import torch  # noqa: E402

from peak import DTYPES, _check_product, matmul_params, model_flops  # noqa: E402

# Model shapes. "qwen3-0.6b": Qwen3-0.6B's layer shapes with an untied head (the students' head is the largest
# single matmul of a step); "tiny": the same code in seconds on a CPU.
SHAPES = {
    "qwen3-0.6b": dict(vocab_size=151_936, hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32),
}
# Work per size: matmul N, copy bytes, teacher (rows, prompt, response), student (rows, length), repetitions.
WORK = {
    "qwen3-0.6b": dict(matmul_n=8192, d2d_bytes=1 << 30, host_bytes=512 * C.MIB, teacher=(16, 512, 512),
                       student=(8, 512), reps=10, bucket_mb=512),
    "tiny": dict(matmul_n=256, d2d_bytes=16 * C.MIB, host_bytes=8 * C.MIB, teacher=(2, 16, 16),
                 student=(2, 32), reps=3, bucket_mb=1),
}
TOP_K = 16


# ------------------------------------------------------------------------------------------ pure helpers
def model_config(size: str):
    """The transformers config of a `SHAPES` entry (random weights are built from it; nothing is downloaded)."""
    from transformers import AutoConfig

    return AutoConfig.for_model("qwen3", tie_word_embeddings=False, max_position_embeddings=4096,
                                **SHAPES[size])


def shape_params(size: str) -> tuple[int, int]:
    """(matmul parameters a token's forward runs through, head parameters) of a size, counted on the meta device
    (no memory): `peak.matmul_params`."""
    return matmul_params(build_model(size, torch.device("meta"), torch.float32))


def teacher_flops(params: tuple[int, int], rows: int, prompt: int, response: int) -> float:
    """Forward FLOPs of scoring `rows` rows: the decoder over every token, the head at response positions."""
    return model_flops(params, rows * (prompt + response), rows * response, backward=False)


def student_flops(params: tuple[int, int], rows: int, length: int) -> float:
    """Forward + backward FLOPs of a training step over rows x length tokens, the head at every position."""
    return model_flops(params, rows * length, rows * length, backward=True)


# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, reps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of `reps` calls of fn after `warmup` calls: CUDA events on a GPU (the stream's own time,
    not the launch's), perf_counter with a synchronize on a CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def add_rate(report: C.Report, name: str, seconds: list[float], amount: float, unit: str, note: str) -> None:
    """A repeated rate figure: amount / seconds per call, scaled to G (1e9)."""
    report.add_repeated(name, [amount / s / 1e9 for s in seconds], unit, note=note)


# ------------------------------------------------------------------------------------------ stages
def stage_peak(device: torch.device, size: str, report: C.Report) -> None:
    w = WORK[size]
    n, reps = w["matmul_n"], 2 * w["reps"]
    for name, dt in DTYPES.items():
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: TF32 would be a third, different peak
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(n, n, device=device, generator=gen).to(dt)
            b = torch.randn(n, n, device=device, generator=gen).to(dt)
            c = torch.empty(n, n, device=device, dtype=dt)
            secs = time_calls(lambda: torch.matmul(a, b.mT, out=c), device, reps, warmup=3)
            _check_product(a, b, c, dt)  # a figure cannot come from a call that did nothing
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        add_rate(report, f"peak/matmul_{name}_gflops", secs, 2 * n ** 3, "GFLOP/s",
                 f"torch.matmul(x, w.mT) {n} x {n} {name}, median of {reps} calls")
        del a, b, c
    nbytes = w["d2d_bytes"]
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    add_rate(report, "peak/memcpy_gbs", time_calls(lambda: dst.copy_(src), device, reps), nbytes, "GB/s",
             f"dst.copy_(src) of {nbytes / C.MIB:.0f} MiB on {device.type}, bytes copied per second")
    del src, dst
    if device.type != "cuda":
        report.extra.setdefault("skipped", {})["peak/h2d_gbs"] = "host <-> device copies need a GPU"
        return
    hb = w["host_bytes"]
    host = torch.ones(hb, dtype=torch.uint8).pin_memory()
    dev = torch.zeros(hb, dtype=torch.uint8, device=device)
    add_rate(report, "peak/h2d_gbs", time_calls(lambda: dev.copy_(host, non_blocking=True), device, reps), hb,
             "GB/s", f"pinned host -> device, {hb / C.MIB:.0f} MiB")
    add_rate(report, "peak/d2h_gbs", time_calls(lambda: host.copy_(dev, non_blocking=True), device, reps), hb,
             "GB/s", f"device -> pinned host, {hb / C.MIB:.0f} MiB")


def build_model(size: str, device: torch.device, dtype: torch.dtype):
    """A random model of `size` built directly on `device` (no host copy of 0.75 B parameters)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(model_config(size), dtype=dtype)


def stage_phases(device: torch.device, size: str, report: C.Report) -> None:
    from eopd_ray.stats import token_stats_from_hidden

    w, reps = WORK[size], WORK[size]["reps"]
    vocab = SHAPES[size]["vocab_size"]
    gen = torch.Generator(device=device).manual_seed(1)

    # --- teacher: bf16 weights, no grad
    model = build_model(size, device, torch.bfloat16).eval()
    params = matmul_params(model)
    rows, prompt, response = w["teacher"]
    ids_BL = torch.randint(0, vocab, (rows, prompt + response), device=device, generator=gen)
    tokens_N = ids_BL[:, prompt:].reshape(-1)
    decoder, head = model.get_decoder(), model.lm_head

    def hidden_NH() -> torch.Tensor:
        # (B, L, H) -> (B x response, H): the hidden state before each response token, as the scorer gathers it
        h = decoder(input_ids=ids_BL).last_hidden_state
        return h[:, prompt - 1:prompt + response - 1].reshape(-1, h.shape[-1])

    def scoring():
        return token_stats_from_hidden(hidden_NH(), head, tokens_N, TOP_K, chunk_size=1024, vocab_size=vocab)

    def forward():
        return hidden_NH() @ head.weight.T

    with torch.no_grad():
        stats = scoring()
        if not (torch.isfinite(stats.entropy).all() and stats.topk_ids.shape == (rows * response, TOP_K)):
            raise RuntimeError("teacher scoring returned non-finite entropy or a wrong top-k shape")
        flops = teacher_flops(params, rows, prompt, response)
        shape = f"{rows} rows x ({prompt} prompt + {response} response) tokens"
        add_rate(report, "phase/teacher_scoring_gflops", time_calls(scoring, device, reps), flops, "GFLOP/s",
                 f"decoder + token_stats_from_hidden (top-{TOP_K}, chunks of 1024), bf16, {shape}")
        add_rate(report, "phase/teacher_forward_gflops", time_calls(forward, device, reps), flops, "GFLOP/s",
                 f"decoder + head matmul only (no statistics), bf16, {shape}")
    report.config.update(teacher_flops=flops, matmul_params=params[0], head_params=params[1],
                         attn_implementation=getattr(model.config, "_attn_implementation", None))
    del model, decoder, head, stats

    # --- student: fp32 master weights, bf16 autocast, fused AdamW where CUDA has it
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(size, device, torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    rows, length = w["student"]
    ids = torch.randint(0, vocab, (rows, length), device=device, generator=gen)
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    probe = next(model.parameters())
    before = probe.detach().clone()
    flops = student_flops(params, rows, length)
    add_rate(report, "phase/student_train_gflops", time_calls(step, device, reps), flops, "GFLOP/s",
             f"forward + backward + AdamW, fp32 master, bf16 autocast, {rows} x {length} tokens")
    if not (all(torch.isfinite(x) for x in losses) and not torch.equal(before, probe.detach())):
        raise RuntimeError("student step: a non-finite loss, or the weights did not change")
    report.config.update(student_flops=flops)
    if device.type == "cuda":
        report.add("phase/student_train_peak_memory_gib", torch.cuda.max_memory_allocated(device) / C.GIB, "GiB",
                   note="torch.cuda.max_memory_allocated over the student steps")


def _int_checksums(tensors) -> list[int]:
    """One exact integer per tensor: the sum of its bf16 bit patterns (equal sums for bit-equal tensors)."""
    return [int(t.view(torch.int16).sum(dtype=torch.int64)) for t in tensors]


def _ipc_child(handles: list, metas_per_bucket: list, rounds: int, queue) -> None:
    """The receiving process: map every bucket, then `rounds` times copy every tensor out of the buckets into
    tensors of its own (the colocated engine's load). Puts {open_s, load_s, checksums} on `queue`."""
    from actors.sync.buckets import open_ipc_handle, unflatten

    try:
        torch.cuda.set_device(0)
        t0 = time.perf_counter()
        flats = [open_ipc_handle(h, 0) for h in handles]
        torch.cuda.synchronize()
        open_s = time.perf_counter() - t0
        own = {m.name: torch.empty(m.shape, dtype=torch.bfloat16, device="cuda")
               for metas in metas_per_bucket for m in metas}
        load_s = []
        for _ in range(rounds):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for flat, metas in zip(flats, metas_per_bucket):
                for name, view in unflatten(flat, metas):
                    own[name].copy_(view)
            torch.cuda.synchronize()
            load_s.append(time.perf_counter() - t0)
        queue.put({"open_s": open_s, "load_s": load_s, "checksums": _int_checksums(own.values())})
    except Exception as e:  # noqa: BLE001 - the parent reports it
        queue.put({"error": f"{type(e).__name__}: {e}"})


def stage_sync(device: torch.device, size: str, report: C.Report) -> None:
    from actors.sync.buckets import MIB, ParamMeta, flatten, plan_buckets

    w, reps = WORK[size], WORK[size]["reps"]
    skipped = report.extra.setdefault("skipped", {})
    meta = build_model(size, torch.device("meta"), torch.bfloat16)  # the shapes only, no memory
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}
    torch.manual_seed(2)
    state = [torch.randn(s, device=device, dtype=torch.bfloat16) for s in shapes.values()]
    metas = [ParamMeta(n, s, "bfloat16") for n, s in shapes.items()]
    nbytes = sum(m.nbytes for m in metas)
    plan = plan_buckets(metas, w["bucket_mb"] * MIB)
    report.config.update(sync_bytes=nbytes, sync_tensors=len(metas), sync_buckets=len(plan),
                         bucket_mb=w["bucket_mb"])
    twins = [torch.empty_like(t) for t in state]

    def copy_all():
        for d, s in zip(twins, state):
            d.copy_(s)

    def pack():
        return [flatten([state[i] for i in idx], torch.bfloat16, device) for idx in plan]

    add_rate(report, "weight_sync/state_dict_copy_gbs", time_calls(copy_all, device, reps), nbytes, "GB/s",
             f"copy_ of each of {len(metas)} bf16 tensors into a twin on the same device: the ceiling of a "
             f"one-GPU sync")
    pack_s = time_calls(pack, device, reps)
    add_rate(report, "weight_sync/pack_gbs", pack_s, nbytes, "GB/s",
             f"flatten into {len(plan)} bucket(s) of {w['bucket_mb']} MiB (sender side)")
    del twins
    if device.type != "cuda":
        skipped["weight_sync/ipc_gbs"] = skipped["weight_sync/ipc_load_gbs"] = "CUDA IPC needs a GPU"
    else:
        _ipc(state, metas, plan, nbytes, C.median(pack_s), reps, report)
    if torch.cuda.device_count() >= 2:
        from actors.sync.selftest import run_two_process_broadcast

        res = run_two_process_broadcast(total_mb=1024, bucket_mb=w["bucket_mb"])
        if not res["equal"]:
            raise RuntimeError("NCCL broadcast: the received tensors differ from the sent ones")
        report.add("weight_sync/nccl_broadcast_gbs", res["gbps"], "GB/s",
                   note=f"GPU 0 -> GPU 1, {res['bytes'] / MIB:.0f} MiB in {res['buckets']} buckets, second round")
    else:
        skipped["weight_sync/nccl_broadcast_gbs"] = (
            f"{torch.cuda.device_count()} GPU(s): the two-process NCCL broadcast needs 2 (NCCL refuses two ranks "
            "on one GPU)")


def _ipc(state, metas, plan, nbytes: int, pack_s: float, reps: int, report: C.Report) -> None:
    import torch.multiprocessing as mp

    from actors.sync.buckets import flatten, ipc_handle

    flats = [flatten([state[i] for i in idx], torch.bfloat16, "cuda") for idx in plan]
    torch.cuda.synchronize()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_ipc_child, args=([ipc_handle(f) for f in flats],
                                                 [[metas[i] for i in idx] for idx in plan], reps + 1, queue))
    child.start()
    try:
        res = queue.get(timeout=180)  # the flats stay alive here until the child is done with them
    finally:
        child.join(timeout=60)
    if "error" in res:
        raise RuntimeError(f"CUDA IPC child: {res['error']}")
    if res["checksums"] != _int_checksums(state):
        raise RuntimeError("CUDA IPC: the tensors the second process loaded differ from the sent ones")
    load_s = res["load_s"][1:]  # the first round touches fresh memory in the child
    add_rate(report, "weight_sync/ipc_load_gbs", load_s, nbytes, "GB/s",
             "a second process on the same GPU copies every tensor out of the mapped buckets into its own")
    report.add_repeated("weight_sync/ipc_gbs", [nbytes / (pack_s + s) / 1e9 for s in load_s], "GB/s",
                        note="pack (median) + load per round; handle opening and process start not included; "
                             "every byte is copied twice (into a bucket, out of it)")
    report.add("weight_sync/ipc_open_s", res["open_s"], "s", note=f"open_ipc_handle of {len(plan)} bucket(s)")


def stage_vllm(device: torch.device, size: str, report: C.Report) -> None:
    skipped = report.extra.setdefault("skipped", {})
    if device.type != "cuda":
        skipped["vllm/wake_s"] = "vLLM sleep mode needs CUDA"
        return
    if importlib.util.find_spec("vllm") is None:
        skipped["vllm/wake_s"] = "vLLM is not installed here"
        return
    import numpy as np
    from transformers import AutoConfig, AutoModelForCausalLM

    from actors.rollout.engine import SamplingParams
    from actors.rollout.vllm_engine import VLLMEngine
    from eopd_ray.tiny_models import build_tokenizer

    tok = build_tokenizer()
    # head_dim 64: a size every vLLM attention backend takes; 8 layers of width 1024 give weights worth moving
    cfg = AutoConfig.for_model("qwen3", vocab_size=len(tok), hidden_size=1024, num_hidden_layers=8,
                               intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                               tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        engine = VLLMEngine(tmp, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=512,
                            sleep_between_calls=True)  # asleep once built
        try:
            wake, sleep = [], []
            for _ in range(WORK[size]["reps"] // 2 + 1):
                t0 = time.perf_counter()
                engine.wake_up()
                wake.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                engine.sleep()
                sleep.append(time.perf_counter() - t0)
            # still an engine after the cycles: generate raises if the weights or the KV cache did not come back
            gen = engine.generate([np.array(tok("3+4+5=")["input_ids"])], SamplingParams(1.0, 1.0, 8, seed=1))
            report.config.update(generated_tokens=len(gen.response_ids[0]), weight_bytes=wbytes)
        finally:
            engine.shutdown()
    report.add_repeated("vllm/wake_s", wake, "s", note=f"level-1 wake-up, {wbytes / C.MIB:.0f} MiB of weights")
    report.add_repeated("vllm/sleep_s", sleep, "s", note="level-1 sleep (weights to host, KV cache dropped)")
    report.add_repeated("vllm/wake_gbs", [wbytes / s / 1e9 for s in wake], "GB/s",
                        note="weight bytes / wake-up seconds (the wake-up also re-creates the KV cache)")


STAGES = {"peak": stage_peak, "phases": stage_phases, "sync": stage_sync, "vllm": stage_vllm}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["stage"])
    p.add_argument("name", choices=sorted(STAGES))
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke test of the code)")
    p.add_argument("--size", choices=sorted(SHAPES), default=None, help="default: qwen3-0.6b on cuda, tiny on cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    size = args.size or ("qwen3-0.6b" if device.type == "cuda" else "tiny")
    report = C.Report(f"gpu_{args.name}")
    report.config.update(size=size, device=args.device)
    t0 = time.perf_counter()
    C.progress("gpu_peak", f"stage {args.name} on {args.device}, size {size}")
    rc = 0
    try:
        STAGES[args.name](device, size, report)
    except Exception:  # noqa: BLE001 - what was measured before the failure is still written, with it
        report.extra["error"] = traceback.format_exc()[-3000:]
        print(report.extra["error"], file=sys.stderr)
        rc = 1
    report.print()
    report.write(args.json, time.perf_counter() - t0)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
