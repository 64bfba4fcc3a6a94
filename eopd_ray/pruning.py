"""Depth pruning: a student made from the teacher by dropping whole decoder layers (prune, then distil).

Two ways of choosing the layers, both from the teacher's hidden states on calibration prompts (the run's own
training prompts):

- `block_influence` (ShortGPT, Men et al. 2024): layer i's influence is 1 - cos(x_i, y_i), its input against its
  output, averaged over tokens; the layers that change their input least are dropped, wherever they are.
- `contiguous` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"; Minitron also drops
  one contiguous block): the block of n layers l .. l+n-1 whose input x_l and output x_{l+n} are closest in
  angular distance arccos(cos) / pi is dropped.

The kept layers keep their weights and order; embeddings, final norm and head are the teacher's. Layer-indexed
config lists (`layer_types`: Gemma 3's sliding/full pattern, Qwen3's) are subset the same way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

PRUNE_METHODS = ("block_influence", "contiguous")


def layers_to_drop_count(value: float, num_layers: int) -> int:
    """`value` >= 1 is a count of layers; 0 < value < 1 a fraction of them (rounded to the nearest layer)."""
    n = int(value) if value >= 1 else int(round(value * num_layers))
    if not 1 <= n <= num_layers - 1:
        raise ValueError(f"dropping {value!r} of {num_layers} layers leaves {num_layers - n}: allowed 1 .. "
                         f"{num_layers - 1} layers dropped (a count >= 1 or a fraction in (0, 1))")
    return n


@torch.no_grad()
def layer_hidden_states(model, prompts: Sequence[Sequence[int]], batch_size: int = 8) -> torch.Tensor:
    """(L + 1, N, H) float32: the input of every decoder layer and the output of the last one (before the final
    norm) at each of the N real tokens of the prompts, from forward hooks on the decoder alone (no output head).
    Prompts run in batches, right-padded: under causal attention a real token never sees the padding after it."""
    decoder = model.get_decoder()
    layers = decoder.layers
    captured: list[torch.Tensor] = []

    def take_input(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    def take_output(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_pre_hook(take_input, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(take_output))
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + 1)]
    try:
        for b in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[b:b + batch_size]]
            width = max(len(p) for p in chunk)
            ids_BT = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
            mask_BT = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
            for i, p in enumerate(chunk):
                ids_BT[i, :len(p)] = torch.as_tensor(p, device=device)
                mask_BT[i, :len(p)] = 1
            captured.clear()
            decoder(input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
            real = mask_BT.bool()
            for i, hidden_BTH in enumerate(captured):
                per_layer[i].append(hidden_BTH[real].float())
    finally:
        for h in handles:
            h.remove()
    return torch.stack([torch.cat(parts) for parts in per_layer])


def _cosine_N(a_NH: torch.Tensor, b_NH: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a_NH.double(), b_NH.double(), dim=-1, eps=1e-12)


def block_influence(states_LNH: torch.Tensor) -> list[float]:
    """ShortGPT block influence of each layer: 1 - mean over every calibration token of cos(input, output)."""
    return [1.0 - _cosine_N(states_LNH[i], states_LNH[i + 1]).mean().item() for i in range(states_LNH.shape[0] - 1)]


def block_distances(states_LNH: torch.Tensor, n: int) -> list[float]:
    """For each start l in 0 .. L-n: the mean over tokens of the angular distance arccos(cos(x_l, x_{l+n})) / pi."""
    num_layers = states_LNH.shape[0] - 1
    return [(torch.arccos(_cosine_N(states_LNH[l], states_LNH[l + n]).clamp(-1, 1)) / math.pi).mean().item()
            for l in range(num_layers - n + 1)]


def choose_layers(method: str, states_LNH: torch.Tensor, n: int) -> tuple[list[int], dict]:
    """(sorted layer indices to drop, {scores and what they mean}) for `method`."""
    if method == "block_influence":
        scores = block_influence(states_LNH)
        drop = sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:n])
        return drop, {"block_influence": scores}
    if method == "contiguous":
        dists = block_distances(states_LNH, n)
        start = min(range(len(dists)), key=lambda i: (dists[i], i))
        return list(range(start, start + n)), {"block_distance_by_start": dists}
    raise ValueError(f"prune method {method!r} is invalid: allowed {', '.join(PRUNE_METHODS)}")


def pruned_config(config, keep: list[int]):
    """A copy of `config` for the kept layers (count and layer-indexed lists)."""
    import copy

    cfg = copy.deepcopy(config)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    old = text.num_hidden_layers
    text.num_hidden_layers = len(keep)
    for name, value in list(vars(text).items()):
        if isinstance(value, list) and len(value) == old and name.startswith("layer"):
            setattr(text, name, [value[i] for i in keep])
    return cfg


def remap_layer_keys(state: dict[str, torch.Tensor], keep: list[int], prefix: str) -> dict[str, torch.Tensor]:
    """Keep `prefix{i}.` entries of the kept layers, renumbered 0 .. len(keep)-1; everything else as it is."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            if int(idx) in new_index:
                out[f"{prefix}{new_index[int(idx)]}.{rest}"] = value
        else:
            out[key] = value
    return out


def build_pruned(teacher, keep: list[int], out_dir: Path) -> int:
    """Save a model of the teacher's family with only the `keep` layers (float32 safetensors) to `out_dir`;
    returns its parameter count."""
    from transformers import AutoModelForCausalLM

    decoder = teacher.get_decoder()
    prefix = next(name for name, mod in teacher.named_modules() if mod is decoder.layers) + "."
    cfg = pruned_config(teacher.config, keep)
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = remap_layer_keys(teacher.state_dict(), keep, prefix)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(cfg, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"pruned state does not fit the pruned model: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {unexpected[:5]}")
    student.save_pretrained(str(out_dir), safe_serialization=True)
    return sum(p.numel() for p in student.parameters())


def _weights_fingerprint(path: str) -> list:
    """(name, size, mtime) of a local model's weight files: part of a pruned student's cache key."""
    p = Path(path)
    return [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(p.glob("*.safetensors"))] \
        if p.is_dir() else [path]


def ensure_pruned_student(teacher_path: str, method: str, layers: float, calibration: Sequence[Sequence[int]],
                          cache_dir: str | Path | None = None, trust_remote_code: bool = False) -> tuple[str, dict]:
    """(directory of the student pruned from the teacher, report). The layer scores are computed on the
    calibration prompts every time (seconds; they are part of the run's record); the student for a given
    teacher and set of dropped layers is built once and cached under `<cache>/pruned/`."""
    from eopd_ray.cache import build_once, cache_root, text_digest
    from eopd_ray.models import load_causal_lm, load_tokenizer

    teacher = load_causal_lm(teacher_path, "float32", trust_remote_code).eval()
    num_layers = len(teacher.get_decoder().layers)
    n = layers_to_drop_count(layers, num_layers)
    states = layer_hidden_states(teacher, calibration)
    drop, scores = choose_layers(method, states, n)
    keep = [i for i in range(num_layers) if i not in drop]
    key = text_digest(str(teacher_path), _weights_fingerprint(teacher_path), keep)
    root = Path(cache_dir) if cache_dir else cache_root()

    def build(tmp: Path) -> dict:
        params = build_pruned(teacher, keep, tmp)
        load_tokenizer(teacher_path, trust_remote_code).save_pretrained(str(tmp))
        return {"teacher": str(teacher_path), "kept_layers": keep, "parameters": params}

    out = build_once(root / "pruned" / f"{Path(str(teacher_path)).name}-keep{len(keep)}-{key}", build,
                     f"student pruned from the teacher ({num_layers} -> {len(keep)} layers)")
    report = {"method": method, "teacher": str(teacher_path), "teacher_layers": num_layers, "dropped": drop,
              "kept": keep, "calibration_prompts": len(calibration),
              "calibration_tokens": int(sum(len(c) for c in calibration)), **scores, "student": str(out)}
    return str(out), report


def format_report(report: dict) -> str:
    """Two or three lines for the run's printout."""
    lines = [f"pruned student: {report['teacher_layers']} -> {len(report['kept'])} layers by {report['method']} "
             f"on {report['calibration_prompts']} calibration prompts ({report['calibration_tokens']} tokens); "
             f"dropped {report['dropped']}"]
    if "block_influence" in report:
        lines.append("block influence per layer: " + " ".join(f"{s:.3f}" for s in report["block_influence"]))
    else:
        d = report["block_distance_by_start"]
        lines.append("angular distance of the dropped block by start layer: " + " ".join(f"{s:.3f}" for s in d))
    return "\n".join(lines)
