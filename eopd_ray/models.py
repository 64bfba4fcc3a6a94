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


ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "vocab_size")


def architecture_mismatch(checkpoint_dir: str, model_path: str, trust_remote_code: bool = False) -> list[str]:
    """Fields of ARCH_FIELDS that differ between a checkpoint's HF config and the configured model."""
    from transformers import AutoConfig

    a = AutoConfig.from_pretrained(checkpoint_dir, trust_remote_code=trust_remote_code).to_dict()
    b = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).to_dict()
    return [f"{k}: checkpoint {a.get(k)!r} vs model {b.get(k)!r}" for k in ARCH_FIELDS if a.get(k) != b.get(k)]
