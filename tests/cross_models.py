"""A teacher of another tokenizer that must give the same statistics: the tiny teacher with its character ids
shuffled (the tokenizer's vocabulary and the model's embedding and output rows permuted together).

Its tokenizer differs from the student's (the same characters under other ids, so `teacher.tokenizer=shared`
refuses it), while every distribution it gives is the tiny teacher's over the same characters: a
cross-tokenizer run with it must reproduce the same-tokenizer run with the tiny teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def build_permuted_teacher(teacher_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Save the permuted copy of the HF model in `teacher_dir` (a tiny model, WordLevel tokenizer) to out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    from tokenizers import Tokenizer

    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]  # piece -> id
    special = {a["id"] for a in spec["added_tokens"]}
    movable = np.array(sorted(i for i in vocab.values() if i not in special))
    new_of = np.arange(len(vocab))
    new_of[movable] = np.random.default_rng(seed).permutation(movable)  # old id -> new id, specials kept
    spec["model"]["vocab"] = {piece: int(new_of[i]) for piece, i in vocab.items()}
    backend = Tokenizer.from_str(json.dumps(spec))
    new_tok = PreTrainedTokenizerFast(tokenizer_object=backend, **{k: getattr(tok, k) for k in (
        "pad_token", "bos_token", "eos_token", "unk_token")}, clean_up_tokenization_spaces=False,
        model_max_length=tok.model_max_length, padding_side=tok.padding_side)
    new_tok.chat_template = tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    old_of = torch.as_tensor(np.argsort(new_of))  # new id -> old id
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb[old_of].clone())
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.data_ptr():  # an untied head: its rows too
            head.weight.copy_(head.weight[old_of].clone())
    model.save_pretrained(out_dir, safe_serialization=True)
    new_tok.save_pretrained(out_dir)
    return out_dir
