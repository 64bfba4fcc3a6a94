"""Loading teacher and student models and tokenizers (offline-safe, no remote code unless asked)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions are masked out everywhere; any id works, EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a causal LM from a local directory or hub name, weights in safetensors only."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True,
                                                trust_remote_code=trust_remote_code)


def output_rows(path: str, trust_remote_code: bool = False) -> int:
    """Number of lm_head rows (the possibly padded vocabulary size) read from the config alone."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text_cfg.vocab_size)


def set_threads(n: int | None) -> None:
    """Cap intra-op threads inside an actor so co-located actors do not oversubscribe the CPU."""
    if n and n > 0:
        torch.set_num_threads(int(n))


def tied_aliases(module: torch.nn.Module) -> dict[str, str]:
    """{alias: name kept} for parameters reachable under several names (tied embeddings: `lm_head.weight` ->
    `model.embed_tokens.weight`); `named_parameters()` keeps the first name, and the weight sync sends that."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def checkpoint_aliases(path: str, trust_remote_code: bool = False) -> dict[str, str]:
    """`tied_aliases` of the model at `path`, from its config alone (built on the meta device: no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    return tied_aliases(model)


def checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a local safetensors checkpoint, read from the file headers ({} for a hub name)."""
    from pathlib import Path

    from safetensors import safe_open

    shapes = {}
    for file in sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else ():
        with safe_open(str(file), framework="pt") as fh:
            shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    return shapes


ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "vocab_size")


def architecture_mismatch(checkpoint_dir: str, model_path: str, trust_remote_code: bool = False) -> list[str]:
    """Fields of ARCH_FIELDS that differ between a checkpoint's HF config and the configured model."""
    from transformers import AutoConfig

    a = AutoConfig.from_pretrained(checkpoint_dir, trust_remote_code=trust_remote_code).to_dict()
    b = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).to_dict()
    return [f"{k}: checkpoint {a.get(k)!r} vs model {b.get(k)!r}" for k in ARCH_FIELDS if a.get(k) != b.get(k)]


class _HiddenOnly:
    """Stands in for a decoder's output: the given hidden states, None for anything else a model reads
    (past key values, router logits, cross-attentions ...)."""

    def __init__(self, hidden_1NH: torch.Tensor):
        self.last_hidden_state = hidden_1NH

    def __getitem__(self, i):
        if i == 0:
            return self.last_hidden_state
        raise IndexError(i)

    def __getattr__(self, name):
        return None


def output_head(model):
    """A function (n, H) final hidden states -> (n, V_padded) logits, exactly as `model(...).logits` makes them.

    Many families change the logits after the lm_head matmul (Gemma 2/3 soft-capping, Cohere's logit_scale,
    Granite's logits_scaling, biases); re-implementing each would miss the next. Instead the model's own
    forward runs with its decoder (`get_decoder()`) answering with the given hidden states, so whatever the
    model does after the decoder is applied. `check_output_head` checks it on a probe for a loaded model.
    Not for concurrent use: while it runs, the decoder's forward is replaced.
    """
    decoder = model.get_decoder()

    def head(hidden_NH: torch.Tensor) -> torch.Tensor:
        own = decoder.__dict__.get("forward")  # an instance-level forward (hooks, wrappers) to put back
        decoder.forward = lambda *args, **kwargs: _HiddenOnly(hidden_NH[None])
        try:
            dummy_1N = torch.zeros(1, hidden_NH.shape[0], dtype=torch.long, device=hidden_NH.device)
            return model(input_ids=dummy_1N, use_cache=False).logits[0]
        finally:
            if own is None:
                del decoder.forward  # the instance attribute shadowed the class's forward
            else:
                decoder.forward = own

    return head


def check_output_head(model, head, device, vocab_rows: int) -> None:
    """Raise if `head(decoder hidden states)` does not reproduce the model's logits on a short probe, which
    happens when a model's forward does not call the module `get_decoder()` returns (some multimodal
    wrappers). The two sides run the same operations in the same dtype, so they agree to rounding."""
    probe_1L = (torch.arange(7, device=device) * 5 + 3)[None] % max(vocab_rows, 1)
    with torch.no_grad():
        full_LV = model(input_ids=probe_1L, use_cache=False).logits[0].float()
        hidden_LH = model.get_decoder()(input_ids=probe_1L).last_hidden_state[0]
        via_head_LV = head(hidden_LH).float()
    scale = 1.0 + full_LV.abs().max().item()
    tol = 1e-4 if hidden_LH.dtype == torch.float32 else 2e-2  # bf16: kernels may differ by a few ulps
    diff = (via_head_LV - full_LV).abs().max().item() if via_head_LV.shape == full_LV.shape else float("inf")
    if diff > tol * scale:
        raise ValueError(
            f"model type {model.config.model_type!r}: computing logits from the decoder's hidden states does not "
            f"reproduce the model's own logits (max difference {diff:.3g}, allowed {tol * scale:.3g}; shapes "
            f"{tuple(via_head_LV.shape)} vs {tuple(full_LV.shape)}), so the teacher's per-token statistics would "
            "be wrong. Its forward does not go through `get_decoder()`; use a text-only causal LM checkpoint of "
            "this family.")
