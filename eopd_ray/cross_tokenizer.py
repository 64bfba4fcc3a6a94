"""Teacher statistics across two tokenizers: the teacher reads the student's response in its own tokens, and
its statistics are carried back to the student's positions and vocabulary (`docs/cross_tokenizer.md`).

1. Bytes (`TokenBytes`): the exact UTF-8 bytes each token id stands for, read from the piece strings, never by
   decoding prefixes (half a character decodes to U+FFFD). Byte-level BPE pieces (GPT-2's printable stand-ins
   for the 256 bytes: SmolLM2, Qwen, Llama 3) and SentencePiece-style pieces (`▁` for a space, `<0xNN>`
   byte-fallback pieces: Llama 2, Gemma) are mapped; any other scheme raises `TokenizerSchemeError`. Special
   tokens (BOS, EOS, chat-template markers) stand for no text: zero bytes.
2. Alignment (`align`): both token sequences cover the same bytes; a byte offset where a token starts on both
   sides is a shared boundary, and the stretch between two consecutive shared boundaries is a group (whole
   tokens on each side). The first student token of a group (its head) decides from the same byte prefix as
   the group's first teacher token. Zero-byte tokens at one offset pair up in order (the student's EOS with
   the teacher's end token). Student tokens inside a group after its head, unpaired zero-byte tokens and
   everything from the group that would reach the first byte the two sides disagree on are masked.
3. Statistics at the heads (`student_stats`, `cross_teacher_stats`): the log-prob is the group's teacher
   log-prob (the sum over its teacher tokens) less the student's own behaviour log-probs of the group's
   other tokens, so the head's log-ratio is the group's; the entropy is the teacher's at the head's decision
   point; the top-k is that distribution mapped onto student ids by equal bytes (`vocab_map`), summed where
   several teacher tokens land on one student id. Teacher mass on tokens no student token spells is left out
   of the k slots (log-prob -inf there) and reported per position as `unmatched_logprob`: the forward KL of
   eq. 10, which renormalises over its top-k set, renormalises it out.

With one tokenizer on both sides every output equals the same-tokenizer path (`eopd_ray.stats.token_stats`).
Arrays are per response; the shapes and dtypes are those of a teacher-table row (`eopd_ray/batch.py`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from eopd_ray.stats import TokenStats, entropy_from_logprobs

SPACE_MARK = "\u2581"  # SentencePiece's stand-in for a space
BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # a byte-fallback piece
NEG_INF = float("-inf")


class TokenizerSchemeError(ValueError):
    """A tokenizer whose pieces cannot be mapped to exact bytes, or that changes the text it encodes."""


def _byte_level_alphabet() -> dict[str, int]:
    """char -> byte of the byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other 68
    bytes (controls, space, DEL, NBSP, soft hyphen) for U+0100, U+0101, ... in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(0x100 + n): b for n, b in enumerate(others)})
    return table


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _backend_spec(tokenizer) -> tuple[object, dict]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerSchemeError(f"tokenizer {_name(tokenizer)!r} has no backend_tokenizer (a slow tokenizer): "
                                   "cross-tokenizer alignment reads the fast tokenizer's pieces; load it with "
                                   "use_fast=True")
    return backend, json.loads(backend.to_str())


def _parts(node: dict | None) -> list[dict]:
    """A decoder / pre-tokenizer / normalizer and, for a Sequence, its members, flattened."""
    if not node:
        return []
    children = node.get("decoders") or node.get("pretokenizers") or node.get("normalizers")
    if node.get("type") == "Sequence" and children is not None:
        return [p for c in children for p in _parts(c)]
    return [node]


@dataclass(frozen=True)
class Scheme:
    """How a tokenizer's pieces spell bytes: 'byte_level', or 'sentencepiece' with its space mark and whether
    `<0xNN>` pieces are raw bytes."""

    kind: str
    space_mark: str = SPACE_MARK
    byte_fallback: bool = False


def scheme_of(spec: dict, name: str) -> Scheme:
    """The piece scheme of a tokenizer.json dict (decoder first, then pre-tokenizer and normalizer)."""
    decoders = _parts(spec.get("decoder"))
    others = _parts(spec.get("pre_tokenizer")) + _parts(spec.get("normalizer"))
    if any(p.get("type") == "ByteLevel" for p in decoders + _parts(spec.get("pre_tokenizer"))):
        return Scheme("byte_level")
    marks = [p.get("replacement") for p in decoders if p.get("type") == "Metaspace"]
    marks += [p.get("pattern", {}).get("String") for p in decoders if p.get("type") == "Replace"
              and p.get("content") == " "]
    marks += [p.get("replacement") for p in others if p.get("type") == "Metaspace"]
    marks += [p.get("content") for p in others if p.get("type") == "Replace"
              and p.get("pattern", {}).get("String") == " "]
    marks = [m for m in marks if m]
    if marks:
        fallback = any(p.get("type") == "ByteFallback" for p in decoders) or bool(
            (spec.get("model") or {}).get("byte_fallback"))
        return Scheme("sentencepiece", marks[0], fallback)
    kinds = {k: [p.get("type") for p in _parts(spec.get(k))] for k in ("decoder", "pre_tokenizer", "normalizer")}
    raise TokenizerSchemeError(
        f"tokenizer {name!r}: cannot map its tokens to bytes (model {(spec.get('model') or {}).get('type')}, "
        f"decoder {kinds['decoder']}, pre-tokenizer {kinds['pre_tokenizer']}, normalizer {kinds['normalizer']}). "
        "Supported: byte-level BPE (a ByteLevel decoder or pre-tokenizer: GPT-2, SmolLM2, Qwen, Llama 3) and "
        "SentencePiece-style pieces (a Metaspace or Replace('▁', ' ') decoder, optionally ByteFallback: "
        "Llama 2, Gemma)")


class TokenBytes:
    """The bytes of one tokenizer's token ids (build once per tokenizer; `token_bytes` builds one per call).

    A special token (flagged special in the tokenizer, or one of its named special tokens) is zero bytes; an
    added token that is not special is its content's UTF-8; a model piece is read by the tokenizer's scheme.
    Per-token bytes are context-free: a decoder step that strips the first space of a whole decoded string
    (Llama 2's Strip, a Metaspace prepend) is not applied, since a response continues its prompt."""

    def __init__(self, tokenizer):
        self.backend, spec = _backend_spec(tokenizer)
        self.name = _name(tokenizer)
        self.scheme = scheme_of(spec, self.name)
        self.size = len(tokenizer)
        added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
        self.special_ids = frozenset({i for i, a in added.items() if a.get("special")}
                                     | {int(i) for i in tokenizer.all_special_ids})
        self.added = {i: a["content"] for i, a in added.items() if i not in self.special_ids}
        self.eos_id = tokenizer.eos_token_id
        self._alphabet = _byte_level_alphabet() if self.scheme.kind == "byte_level" else {}
        self._cache: dict[int, bytes] = {}

    def piece(self, token_id: int) -> str:
        piece = self.backend.id_to_token(int(token_id)) if 0 <= int(token_id) < self.size else None
        if piece is None:
            raise ValueError(f"token id {token_id} is not in tokenizer {self.name!r} (size {self.size})")
        return piece

    def of(self, token_id: int) -> bytes:
        token_id = int(token_id)
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._bytes(token_id)
        return hit

    def _bytes(self, token_id: int) -> bytes:
        piece = self.piece(token_id)
        if token_id in self.special_ids:
            return b""
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        if self.scheme.kind == "byte_level":
            try:
                return bytes(self._alphabet[c] for c in piece)
            except KeyError as err:
                raise TokenizerSchemeError(f"tokenizer {self.name!r}: token {token_id} {piece!r} has the character "
                                           f"{err.args[0]!r}, outside the byte-level alphabet") from None
        m = BYTE_PIECE.match(piece) if self.scheme.byte_fallback else None
        return bytes([int(m.group(1), 16)]) if m else piece.replace(self.scheme.space_mark, " ").encode("utf-8")

    def __call__(self, ids) -> list[bytes]:
        return [self.of(i) for i in np.asarray(ids).reshape(-1)]

    def vocabulary(self) -> list[bytes]:
        """The bytes of ids 0 .. size - 1."""
        return [self.of(i) for i in range(self.size)]


def token_bytes(tokenizer, ids) -> list[bytes]:
    """The exact bytes each id of `ids` contributes (b"" for special tokens)."""
    return TokenBytes(tokenizer)(ids)


def _no_dummy_prefix(node):
    """A tokenizer.json normalizer / pre-tokenizer without the space some add before a text's first word."""
    if isinstance(node, list):
        return [n for n in (_no_dummy_prefix(x) for x in node) if n is not None]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "Prepend":
        return None
    out = {k: _no_dummy_prefix(v) for k, v in node.items()}
    if out.get("type") == "Metaspace":
        out["prepend_scheme"] = "never"
        out.pop("add_prefix_space", None)
    if out.get("type") == "ByteLevel":
        out["add_prefix_space"] = False
    return out


def _as_text(data: bytes) -> str:
    """The response bytes as text: an incomplete character at the end (a response cut at max length) is left
    out; other invalid bytes become U+FFFD (the alignment then stops there)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.reason == "unexpected end of data":
            return data[:err.start].decode("utf-8", errors="replace")
        return data.decode("utf-8", errors="replace")


class ResponseEncoder:
    """The teacher's ids for the student's response bytes: the text as it continues the teacher's prompt (no
    BOS/EOS added, no dummy prefix space, special-token strings read as text), and `end_id` (default: the
    teacher's EOS) appended when the student's response ended with its own end token."""

    def __init__(self, tokenizer, end_id: int | None = None):
        from tokenizers import Tokenizer

        backend, spec = _backend_spec(tokenizer)
        self.bytes = TokenBytes(tokenizer)
        for key in ("normalizer", "pre_tokenizer"):
            spec[key] = _no_dummy_prefix(spec.get(key))
        self._backend = Tokenizer.from_str(json.dumps(spec))
        self._backend.encode_special_tokens = True
        self.end_id = tokenizer.eos_token_id if end_id is None else int(end_id)
        probe = "A b  c."  # a dummy prefix, a collapsed space or lower-casing shows
        got = b"".join(self.bytes(self.encode_text(probe)))
        if got != probe.encode("utf-8"):
            raise TokenizerSchemeError(f"tokenizer {self.bytes.name!r} changes the text it encodes ({probe!r} -> "
                                       f"{got!r}: a normalizer such as NFKC or lower-casing), so its tokens cannot "
                                       "spell the student's response bytes")

    def encode_text(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def __call__(self, data: bytes, ended: bool = False) -> np.ndarray:
        """(M,) int32 teacher ids of the response bytes `data`, with the end token when `ended`."""
        ids = self.encode_text(_as_text(data))
        if ended and self.end_id is not None:
            ids.append(self.end_id)
        return np.asarray(ids, dtype=np.int32)


@dataclass
class Alignment:
    """One response: student positions (T,) against teacher positions (num_teacher,).

    head (T,) bool: the student position heads a group; its statistics come from the teacher.
    teacher_start / teacher_stop (T,) int64: for a head, the group's teacher positions [start, stop), `start`
    deciding from the same byte prefix; -1 elsewhere.
    group (T,) int64: the group of each student position, -1 outside any (masked without being merged)."""

    head: np.ndarray
    teacher_start: np.ndarray
    teacher_stop: np.ndarray
    group: np.ndarray
    num_teacher: int

    @property
    def merged(self) -> np.ndarray:
        """(T,) bool: inside a group after its head: a decision point with no teacher counterpart."""
        return (self.group >= 0) & ~self.head

    def head_positions(self) -> np.ndarray:
        """(H,) the teacher positions whose full distributions the heads need, in student order."""
        return self.teacher_start[self.head]


def align(student: Sequence[bytes], teacher: Sequence[bytes]) -> Alignment:
    """Align two tokenisations of one response by byte offsets (the module docstring gives the rule)."""
    s_len, t_len = [len(b) for b in student], [len(b) for b in teacher]
    n, m = len(s_len), len(t_len)
    joined_s, joined_t = b"".join(student), b"".join(teacher)
    limit = min(len(joined_s), len(joined_t))
    diff = np.flatnonzero(np.frombuffer(joined_s[:limit], np.uint8) != np.frombuffer(joined_t[:limit], np.uint8))
    common = int(diff[0]) if diff.size else limit  # bytes both sides agree on
    head = np.zeros(n, dtype=bool)
    start, stop, group = (np.full(n, -1, dtype=np.int64) for _ in range(3))
    i = j = pos = g = 0  # at a shared boundary: both sides' next tokens start at byte `pos`
    while i < n and j < m:
        if s_len[i] == 0 or t_len[j] == 0:
            if s_len[i] == 0 and t_len[j] == 0:  # zero-byte tokens at one offset pair up, in order
                head[i], start[i], stop[i], group[i] = True, j, j + 1, g
                g += 1
            i += s_len[i] == 0  # an unpaired student one is masked; an unpaired teacher one scores nothing
            j += t_len[j] == 0
            continue
        i0, j0 = i, j
        s_end, t_end = pos + s_len[i], pos + t_len[j]
        i, j = i + 1, j + 1
        while s_end != t_end and (i < n if s_end < t_end else j < m):
            if s_end < t_end:
                s_end, i = s_end + s_len[i], i + 1
            else:
                t_end, j = t_end + t_len[j], j + 1
        if s_end != t_end or s_end > common:
            break  # past the bytes both sides share: this group and the rest have no counterpart
        head[i0], start[i0], stop[i0] = True, j0, j
        group[i0:i] = g
        g, pos = g + 1, s_end
    return Alignment(head, start, stop, group, m)


def align_ids(student_bytes: TokenBytes, student_ids, teacher_bytes: TokenBytes, teacher_ids) -> Alignment:
    return align(student_bytes(student_ids), teacher_bytes(teacher_ids))


@dataclass
class VocabMap:
    """student_of (V_teacher,) int64: the student id spelling each teacher token's bytes, -1 where none does."""

    student_of: np.ndarray
    student_size: int


def vocab_map(student: TokenBytes, teacher: TokenBytes, end_pairs: dict[int, int] | None = None) -> VocabMap:
    """Teacher ids -> student ids by equal bytes. Where several student ids spell the same bytes, the one with
    the teacher's piece string wins, then one that is not a `<0xNN>` piece, then the lowest id. A special
    token maps to the student's special of the same content; `end_pairs` {teacher id: student id} adds pairs
    (default: the teacher's EOS to the student's, so the end-of-response target names the student's end)."""
    by_bytes: dict[bytes, list[int]] = {}
    for s in range(student.size):
        b = student.of(s)
        if b and s not in student.special_ids:
            by_bytes.setdefault(b, []).append(s)
    special = {student.piece(s): s for s in sorted(student.special_ids, reverse=True)}
    out = np.full(teacher.size, -1, dtype=np.int64)
    for t in range(teacher.size):
        if t in teacher.special_ids:
            out[t] = special.get(teacher.piece(t), -1)
            continue
        found = by_bytes.get(teacher.of(t)) if teacher.of(t) else None
        if found:
            out[t] = found[0] if len(found) == 1 else _preferred(found, teacher.piece(t), student)
    if end_pairs is None:
        end_pairs = {} if teacher.eos_id is None or student.eos_id is None else {teacher.eos_id: student.eos_id}
    for t, s in end_pairs.items():
        out[int(t)] = int(s)
    return VocabMap(out, student.size)


def _preferred(candidates: list[int], piece: str, student: TokenBytes) -> int:
    same = [s for s in candidates if student.piece(s) == piece]
    plain = [s for s in candidates if not BYTE_PIECE.match(student.piece(s))]
    return (same or plain or candidates)[0]


@dataclass
class MappedTopK:
    """Per row (N,): the top-k of a teacher distribution over student ids, sorted descending; logprobs (N, k)
    (-inf in slots no student id fills), ids (N, k) int64, unmatched_logprob (N,) the teacher's log-mass on
    tokens with no student id (-inf when none)."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    unmatched_logprob: torch.Tensor


def _check_width(width: int, vmap: VocabMap, what: str) -> None:
    if width != len(vmap.student_of):
        raise ValueError(f"{what} has {width} teacher ids per row but the vocabulary map covers "
                         f"{len(vmap.student_of)}; restrict the teacher's log-probs to its real vocabulary")


def map_logprobs(logprobs_NV: torch.Tensor, vmap: VocabMap, top_k: int) -> MappedTopK:
    """From full teacher log-probs (N, V_teacher): the distribution over student ids (teacher mass summed per
    student id) and its top-k. A one-to-one map returns the teacher's own values, exactly."""
    _check_width(logprobs_NV.shape[-1], vmap, "logprobs_NV")
    if not 1 <= top_k <= vmap.student_size:
        raise ValueError(f"top_k={top_k} must lie in [1, student vocabulary {vmap.student_size}]")
    dev, dt, n = logprobs_NV.device, logprobs_NV.dtype, logprobs_NV.shape[0]
    target = torch.as_tensor(vmap.student_of, device=dev)
    matched = target >= 0
    x_NM = logprobs_NV[:, matched]
    index_NM = target[matched].expand(n, -1)
    peak = torch.full((n, vmap.student_size), NEG_INF, dtype=dt, device=dev).scatter_reduce(1, index_NM, x_NM, "amax")
    shifted = torch.where(x_NM == NEG_INF, NEG_INF, x_NM - peak.gather(1, index_NM))
    total = torch.zeros_like(peak).scatter_add_(1, index_NM, shifted.exp())
    mapped = torch.where(peak == NEG_INF, NEG_INF, peak + total.log())
    values, ids = mapped.topk(top_k, dim=-1, largest=True, sorted=True)
    unmatched = torch.logsumexp(logprobs_NV[:, ~matched], dim=-1) if bool((~matched).any()) else \
        torch.full((n,), NEG_INF, dtype=dt, device=dev)
    return MappedTopK(values, ids, unmatched)


def map_topk(topk_logprobs_NK: torch.Tensor, topk_ids_NK: torch.Tensor, vmap: VocabMap) -> MappedTopK:
    """From the teacher's top-k only (N, k): each entry moved to its student id, entries landing on one id
    summed, unmatched ones out of the slots (into unmatched_logprob), re-sorted descending (stably)."""
    target = torch.as_tensor(vmap.student_of, device=topk_ids_NK.device)
    if topk_ids_NK.numel() and int(topk_ids_NK.max()) >= len(target):
        raise ValueError(f"teacher top-k ids reach {int(topk_ids_NK.max())}, outside the vocabulary map "
                         f"({len(target)} teacher ids)")
    sid = target[topk_ids_NK.long()]
    ok = sid >= 0
    same = (sid.unsqueeze(-1) == sid.unsqueeze(-2)) & ok.unsqueeze(-1) & ok.unsqueeze(-2)  # (N, k, k)
    lp = topk_logprobs_NK
    merged = torch.logsumexp(torch.where(same, lp.unsqueeze(-2), NEG_INF), dim=-1)
    k = lp.shape[-1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=lp.device).tril(-1)
    keep = ok & ~(same & earlier).any(-1)  # the first slot of each student id carries the sum
    values = torch.where(keep, merged, NEG_INF)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    ids = torch.where(keep, sid, 0).gather(-1, order)
    unmatched = torch.logsumexp(torch.where(ok, NEG_INF, lp), dim=-1)
    return MappedTopK(values.gather(-1, order), ids, unmatched)


@dataclass
class CrossStats:
    """Teacher statistics at the student's positions, in the arrays of a teacher-table row (`make_teacher_table`):
    logprobs, entropy (T,) float32; topk_ids (T, k) int32; topk_logprobs (T, k) float32. mask (T,) bool: the
    positions that carry statistics (elsewhere every value is 0, as padding is; the loss must not read them);
    unmatched_logprob (T,) float32: the teacher's log-mass at the head's decision point on tokens no student
    token spells (-inf: none; 0 where masked)."""

    logprobs: np.ndarray
    entropy: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    mask: np.ndarray
    unmatched_logprob: np.ndarray

    def token_stats(self) -> TokenStats:
        """The same values as the (T,) / (T, k) torch tensors the loss reads (ids int64)."""
        return TokenStats(torch.from_numpy(self.logprobs), torch.from_numpy(self.entropy),
                          torch.from_numpy(self.topk_logprobs), torch.from_numpy(self.topk_ids).long())


def student_stats(alignment: Alignment, teacher_token_logprobs: np.ndarray | torch.Tensor,
                  head_entropy: np.ndarray | torch.Tensor, head_topk: MappedTopK,
                  student_logprobs: np.ndarray | None = None) -> CrossStats:
    """Per student position, from the teacher's log-prob of each of its own tokens (num_teacher,) and, at the
    heads' decision points (`Alignment.head_positions`, H rows), its entropy (H,) and mapped top-k (H, k).

    A head's log-prob is the sum of its group's teacher log-probs, less `student_logprobs` (T,) (the rollout's
    behaviour log-probs) over the group's other student tokens; without them a head of a group of several
    student tokens is masked. A head with no student id in its top-k is masked too (no forward-KL target)."""
    head = alignment.head
    t, h = len(head), int(head.sum())
    token_lp = np.asarray(_numpy(teacher_token_logprobs), dtype=np.float64)
    if len(token_lp) != alignment.num_teacher:
        raise ValueError(f"{len(token_lp)} teacher log-probs for {alignment.num_teacher} teacher positions")
    top_lp, top_ids = _numpy(head_topk.logprobs), _numpy(head_topk.ids)
    if top_lp.shape[0] != h or len(_numpy(head_entropy)) != h:
        raise ValueError(f"{h} heads but {top_lp.shape[0]} top-k rows and {len(_numpy(head_entropy))} entropies")
    k = top_lp.shape[-1]
    starts, stops = alignment.teacher_start[head], alignment.teacher_stop[head]
    sums = np.array([token_lp[a:b].sum() for a, b in zip(starts, stops)], dtype=np.float64)
    groups, inner = alignment.group[head], alignment.merged
    n_groups = int(alignment.group.max()) + 1 if t else 0
    several = np.bincount(alignment.group[inner], minlength=n_groups)[groups] > 0  # heads with merged tokens
    valid = np.isfinite(top_lp).any(-1)
    if student_logprobs is None:
        valid &= ~several
    else:
        slp = np.asarray(student_logprobs, dtype=np.float64)
        if slp.shape != (t,):
            raise ValueError(f"student_logprobs has shape {slp.shape}; expected ({t},)")
        others = np.bincount(alignment.group[inner], weights=slp[inner], minlength=n_groups)
        sums[several] -= others[groups[several]]
    rows = np.flatnonzero(head)[valid]
    out = CrossStats(np.zeros(t, np.float32), np.zeros(t, np.float32), np.zeros((t, k), np.int32),
                     np.zeros((t, k), np.float32), np.zeros(t, bool), np.zeros(t, np.float32))
    out.logprobs[rows] = sums[valid]
    out.entropy[rows] = _numpy(head_entropy)[valid]
    out.topk_ids[rows] = top_ids[valid]
    out.topk_logprobs[rows] = top_lp[valid]
    out.mask[rows] = True
    out.unmatched_logprob[rows] = _numpy(head_topk.unmatched_logprob)[valid]
    return out


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def cross_teacher_stats(alignment: Alignment, teacher_logprobs_MV: torch.Tensor, teacher_ids, vmap: VocabMap,
                        top_k: int, student_logprobs: np.ndarray | None = None) -> CrossStats:
    """`student_stats` from the teacher's full log-probs at every one of its response positions (M, V_teacher)
    and its response ids (M,): the reference composition of the pieces a chunked scorer runs."""
    ids = torch.as_tensor(np.asarray(teacher_ids), dtype=torch.long, device=teacher_logprobs_MV.device)
    if teacher_logprobs_MV.shape[0] != len(ids):
        raise ValueError(f"{teacher_logprobs_MV.shape[0]} rows of teacher log-probs for {len(ids)} teacher ids")
    token_lp = teacher_logprobs_MV.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    rows = teacher_logprobs_MV[torch.as_tensor(alignment.head_positions(), device=teacher_logprobs_MV.device)]
    return student_stats(alignment, token_lp, entropy_from_logprobs(rows), map_logprobs(rows, vmap, top_k),
                         student_logprobs)
