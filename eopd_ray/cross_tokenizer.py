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
3. Statistics at the heads (`eopd_ray.cross_stats`: `student_stats`, `cross_teacher_stats`): the log-prob is
   the group's teacher log-prob (the sum over its teacher tokens) less the student's own behaviour log-probs of
   the group's other tokens, so the head's log-ratio is the group's; the entropy is the teacher's at the head's
   decision point; the top-k is that distribution mapped onto student ids by equal bytes (`vocab_map`), summed
   where several teacher tokens land on one student id. Teacher mass on tokens no student token spells is left
   out of the k slots (log-prob -inf there) and reported per position as `unmatched_logprob`: the forward KL of
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
    """How a tokenizer's pieces spell bytes: 'byte_level'; 'sentencepiece' with its space mark and whether
    `<0xNN>` pieces are raw bytes; or 'plain' (a word-level vocabulary joined by a Fuse decoder: each piece is
    its own text, as in the project's tiny character-level tokenizer)."""

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
    if (spec.get("model") or {}).get("type") == "WordLevel" and [p.get("type") for p in decoders] == ["Fuse"]:
        return Scheme("plain")
    kinds = {k: [p.get("type") for p in _parts(spec.get(k))] for k in ("decoder", "pre_tokenizer", "normalizer")}
    raise TokenizerSchemeError(
        f"tokenizer {name!r}: cannot map its tokens to bytes (model {(spec.get('model') or {}).get('type')}, "
        f"decoder {kinds['decoder']}, pre-tokenizer {kinds['pre_tokenizer']}, normalizer {kinds['normalizer']}). "
        "Supported: byte-level BPE (a ByteLevel decoder or pre-tokenizer: GPT-2, SmolLM2, Qwen, Llama 3) and "
        "SentencePiece-style pieces (a Metaspace or Replace('▁', ' ') decoder, optionally ByteFallback: "
        "Llama 2, Gemma), and word-level pieces joined by a Fuse decoder")


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
        if m:
            return bytes([int(m.group(1), 16)])
        return (piece if self.scheme.kind == "plain" else piece.replace(self.scheme.space_mark, " ")).encode("utf-8")

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
        self._specials: dict[str, int] | None = None
        # a dummy prefix, a collapsed space or lower-casing shows; characters the vocabulary cannot spell at
        # all (a character-level tokenizer without capitals) are left out of the probe
        probe = "".join(c for c in "A b  c." if b"".join(self.bytes(self.encode_text(c))))
        got = b"".join(self.bytes(self.encode_text(probe)))
        if got != probe.encode("utf-8"):
            raise TokenizerSchemeError(f"tokenizer {self.bytes.name!r} changes the text it encodes ({probe!r} -> "
                                       f"{got!r}: a normalizer such as NFKC or lower-casing), so its tokens cannot "
                                       "spell the student's response bytes")

    def special_id(self, piece: str) -> int | None:
        """The teacher's special token spelled `piece` (a student special of the same content), or None."""
        if self._specials is None:
            self._specials = {self.bytes.piece(i): i for i in sorted(self.bytes.special_ids, reverse=True)}
        return self._specials.get(piece)

    def encode_text(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def __call__(self, data: bytes, ended: bool = False) -> np.ndarray:
        """(M,) int32 teacher ids of the response bytes `data`, with the end token when `ended`."""
        ids = self.encode_text(_as_text(data))
        if ended and self.end_id is not None:
            ids.append(self.end_id)
        return np.asarray(ids, dtype=np.int32)


def retokenize(response_ids, student_bytes: TokenBytes, encoder: ResponseEncoder) -> tuple[np.ndarray, list[bytes]]:
    """(T,) student response ids -> ((M,) the teacher's ids of the same bytes, with its end token when the
    response ended with the student's EOS; the student tokens' bytes).

    A special token inside the response (zero bytes) becomes the teacher's special of the same content, the
    text on each side of it encoded apart, so the two pair up in the alignment; one the teacher lacks is left
    out (the student position has no counterpart)."""
    ids = np.asarray(response_ids).reshape(-1)
    s_bytes = student_bytes(ids)
    ended = len(ids) > 0 and student_bytes.eos_id is not None and int(ids[-1]) == student_bytes.eos_id
    body = len(ids) - ended
    out: list[int] = []
    start = 0
    for i in range(body):
        if int(ids[i]) in student_bytes.special_ids:
            out += encoder.encode_text(_as_text(b"".join(s_bytes[start:i])))
            same = encoder.special_id(student_bytes.piece(int(ids[i])))
            out += [] if same is None else [same]
            start = i + 1
    teacher = encoder(b"".join(s_bytes[start:body]), ended=ended)
    return np.concatenate([np.asarray(out, dtype=np.int32), teacher]), s_bytes


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
