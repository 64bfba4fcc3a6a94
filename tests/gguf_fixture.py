"""A tiny Llama written as a GGUF file by the tests themselves, the way llama.cpp's converter writes one.

`write_tiny_llama_gguf(path)` builds a random `LlamaForCausalLM` (seeded) and a byte-level BPE tokenizer trained on
a few sentences, and writes both with `gguf.GGUFWriter` under llama.cpp's names and conventions:

- tensors `token_embd`, `blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,ffn_down}`,
  `output_norm`, `output` (all `.weight`, F32, in the HF `[out, in]` layout, which GGUF stores with its dims
  reversed and the reader hands back as is);
- the q and k projection rows permuted for llama.cpp's rotary (`convert_hf_to_gguf.py`'s `LlamaModel.permute`,
  which transformers' `LlamaTensorProcessor._reverse_permute_weights` undoes);
- the `llama.*` hyperparameters transformers' GGUF config mapping reads, and a `tokenizer.ggml.*` "gpt2"
  tokenizer (tokens, token types, merges, bos/eos ids) with a `tokenizer.chat_template`.

Nothing is downloaded; a file takes well under a second to write.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A teacher distils its knowledge into a smaller student, token by token.",
    "Two plus two is four, and four plus four is eight.",
    "On-policy distillation samples from the student and scores with the teacher.",
    "She sells sea shells by the sea shore; the shells she sells are sea shells.",
]
# llama.cpp token types (gguf.TokenType): 1 NORMAL, 3 CONTROL
NORMAL, CONTROL = 1, 3


@dataclass(frozen=True)
class TinyLlamaSpec:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    vocab_size: int = 320  # 256 byte symbols + 3 special tokens + merges
    max_positions: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0  # not the LlamaConfig default, so a dropped rope_theta changes the logits
    init_std: float = 0.1  # big enough that logits spread well beyond the 1e-5 the round trip is held to
    seed: int = 0


def train_tokenizer(vocab_size: int):
    """A byte-level BPE of exactly `vocab_size` tokens: (tokens in id order, merges as "a b", special ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    assert None not in tokens and len(tokens) == vocab_size, (len(tokens), vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges, tok


def random_llama(spec: TinyLlamaSpec):
    """The seeded random model (float32), its norms perturbed away from 1 so that swapped norms would show."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, max_position_embeddings=spec.max_positions,
        rms_norm_eps=spec.rms_norm_eps, rope_theta=spec.rope_theta, initializer_range=spec.init_std,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.5 * torch.randn_like(param))
    return model


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): HF rotary halves -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_tensors(model, spec: TinyLlamaSpec, permute_qk: bool = True) -> dict[str, np.ndarray]:
    """llama.cpp name -> float32 array for every weight of `model`."""
    sd = {k: v.detach().to("cpu").float().numpy().copy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"],
           "output_norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    leaves = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
    for layer in range(spec.num_layers):
        for gguf_leaf, hf_leaf in leaves.items():
            w = sd[f"model.layers.{layer}.{hf_leaf}.weight"]
            if permute_qk and gguf_leaf == "attn_q":
                w = llama_cpp_permute(w, spec.num_heads, spec.num_heads)
            elif permute_qk and gguf_leaf == "attn_k":
                w = llama_cpp_permute(w, spec.num_heads, spec.num_kv_heads)
            out[f"blk.{layer}.{gguf_leaf}.weight"] = np.ascontiguousarray(w, dtype=np.float32)
    return out


def write_gguf(path: Path, tensors: dict[str, np.ndarray], spec: TinyLlamaSpec, tokens: list[str],
               merges: list[str], arch: str = "llama", name: str = "tiny-llama") -> Path:
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(spec.max_positions)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if t in SPECIAL_TOKENS else NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)
    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_llama_gguf(path: Path, spec: TinyLlamaSpec = TinyLlamaSpec(), permute_qk: bool = True,
                          arch: str = "llama"):
    """Write the tiny Llama to `path`; returns (path, the random HF model it was made from, tokens)."""
    tokens, merges, _ = train_tokenizer(spec.vocab_size)
    model = random_llama(spec)
    write_gguf(path, gguf_tensors(model, spec, permute_qk), spec, tokens, merges, arch=arch)
    return Path(path), model, tokens
