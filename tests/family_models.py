"""Tiny random causal LMs of several transformers families over the project's tokenizer, for family-swap tests.

Each is built from its config alone (no download), with `extra_rows` padded output rows as real checkpoints
have (Qwen3: 151,936 rows for 151,669 tokens), and saved as safetensors with the tokenizer beside it.
The overrides make each family's peculiarity visible at this size: Gemma 2 soft-caps its logits, Cohere
multiplies them by `logit_scale`, Granite divides them by `logits_scaling`, GPT-2 and OPT learn absolute
positions, Mixtral routes through experts.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
FAMILIES = {
    "qwen3": {},
    "llama": {},
    "mistral": {},
    "gemma2": {"final_logit_softcapping": 2.0, "query_pre_attn_scalar": 8},
    "cohere": {"logit_scale": 0.3},
    "granite": {"logits_scaling": 4.0},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "opt": {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 32, "max_position_embeddings": 128},
}
OWN_SIZES = {"gpt2", "opt"}  # their configs name the sizes differently


def build_family_model(out_dir: Path, family: str, extra_rows: int = 0, seed: int = 0,
                       init_std: float = 0.2, **overrides) -> Path:
    """Save a random `family` model + the project tokenizer to out_dir; returns out_dir.

    init_std is larger than the families' defaults (0.02) so that the logits are far from uniform and a
    missed soft-cap or scale shows up clearly in the statistics."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from eopd_ray.tiny_models import build_tokenizer

    tok = build_tokenizer()
    kwargs = dict(FAMILIES[family]) if family in OWN_SIZES else {**COMMON, **FAMILIES[family]}
    kwargs = {"tie_word_embeddings": False, **kwargs, **overrides}  # e.g. a head_dim vLLM's kernels accept
    cfg = AutoConfig.for_model(family, vocab_size=len(tok) + extra_rows, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               initializer_range=init_std, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
