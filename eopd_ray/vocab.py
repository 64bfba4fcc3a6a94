"""Teacher/student vocabulary compatibility.

Token-level distillation compares the two models' distributions id by id, so both must use the same
tokenizer. Their embedding matrices may still be padded to different sizes (Qwen: 151,936 vs 152,064
rows for the same 151,669 real tokens); every statistic is then computed over the shared real vocabulary,
the first `len(tokenizer)` ids, so padded rows never enter an entropy, a top-k or a log-softmax.
"""

from __future__ import annotations


class VocabMismatchError(ValueError):
    """Teacher and student tokenizers disagree, so their token ids do not mean the same thing."""


def shared_vocab_size(teacher_tok, student_tok, teacher_rows: int, student_rows: int) -> int:
    """Return the number of real token ids shared by both models, or raise naming the difference.

    teacher_rows / student_rows: the models' output (lm_head) sizes, possibly padded.
    """
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        moved = sorted(t for t in set(t_vocab) & set(s_vocab) if t_vocab[t] != s_vocab[t])[:5]
        raise VocabMismatchError(
            f"teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens; "
            f"only in teacher: {only_t}, only in student: {only_s}, different ids: {moved}). "
            "On-policy distillation scores the student's token ids with the teacher, so both must share a "
            "tokenizer: pick a student of the teacher's family (e.g. Qwen3-8B -> Qwen3-1.7B-Base, "
            "Llama-3.1-8B-Instruct -> Llama-3.2-3B-Instruct), or set teacher.tokenizer=cross to align the "
            "teacher's tokens to the student's by bytes (docs/cross_tokenizer.md).")
    n_real = real_vocab_size(teacher_tok, teacher_rows, "teacher")
    real_vocab_size(student_tok, student_rows, "student")
    return n_real


def real_vocab_size(tokenizer, rows: int, name: str) -> int:
    """The model's real vocabulary, `len(tokenizer)`, or raise when its output head has fewer rows."""
    n_real = len(tokenizer)
    if rows < n_real:
        raise VocabMismatchError(f"the {name} model has {rows} output rows but its tokenizer has {n_real} tokens; "
                                 "the checkpoint and tokenizer do not belong together")
    return n_real
