"""The context the teacher scores the student's responses in, and the check that it is the right one.

On-policy distillation goes wrong without an error when the teacher reads the student's tokens in a context
it was not trained on: a student rendered with another chat template, or a Base student whose responses end
with `<|endoftext|>` where an instruct teacher ends its turn with `<|im_end|>` (then the teacher gives every
response's last token a very low log-prob, a large negative advantage). Three settings (`teacher.*`) give
the teacher its own context; the response token ids are never changed, so the teacher's statistics stay
aligned position by position with what the student sampled:

- `prompt_template=teacher` renders the prompt with the teacher tokenizer's chat template;
- `system_prompt` adds a system message only the teacher sees;
- `eos_remap` exchanges two end tokens in the responses the teacher reads (and in the top-k ids it returns,
  so the forward-KL target at an end position names the student's own end token).

Both models share one vocabulary (`eopd_ray.vocab`), so ids mean the same thing on both sides. The teacher's
prompt is used wherever the teacher reads or writes: when it scores, when it samples (`kd`), when it is
evaluated, and in the fidelity figures (`eopd_ray/fidelity.py`); the student always reads its own.
`alignment_report` reads the first step's rollouts and teacher statistics and says whether they look aligned.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from eopd_ray.batch import list_rows, teacher_mask_rows
from eopd_ray.errors import ConfigError

END_GAP_NATS = 2.0  # warn when the other end token is this much more likely than the one the responses end with


def swap_ids(ids: np.ndarray, swap: tuple[int, int] | None) -> np.ndarray:
    """ids of any shape with the two ids of `swap` exchanged (a copy); `ids` itself when swap is None."""
    if not swap:
        return ids
    a, b = swap
    out = ids.copy()
    out[ids == a], out[ids == b] = b, a
    return out


def _token_id(tokenizer, token: str, role: str, value: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or token not in tokenizer.get_vocab():
        raise ConfigError(f"config value teacher.eos_remap={value!r} is invalid: {token!r} is not a token of the "
                          f"{role}'s tokenizer. Fix: name two single tokens, e.g. its EOS "
                          f"{tokenizer.eos_token!r}, as 'STUDENT_END->TEACHER_END'")
    return int(tid)


def resolve_end_swap(remap: str, student_tok, teacher_tok) -> tuple[int, int] | None:
    """teacher.eos_remap -> (student end id, teacher end id), or None when off or when the two are one token."""
    if not remap:
        return None
    if remap == "auto":
        a, b = student_tok.eos_token_id, teacher_tok.eos_token_id
        return (int(a), int(b)) if a is not None and b is not None and a != b else None
    src, dst = (t.strip() for t in remap.split("->"))
    a, b = _token_id(student_tok, src, "student", remap), _token_id(teacher_tok, dst, "teacher", remap)
    if a == b:
        raise ConfigError(f"config value teacher.eos_remap={remap!r} is invalid: both sides are one token (id {a}). "
                          "Fix: name two different tokens, or set teacher.eos_remap='' to turn it off")
    return a, b


def render_prompt(tokenizer, prompt: str, system_prompt: str = "") -> str:
    """The prompt as a chat template renders it (non-thinking mode, paper Appendix A); raw text when the
    tokenizer has no template and no system message is asked for."""
    if not getattr(tokenizer, "chat_template", None):
        if system_prompt:
            raise ConfigError("config value teacher.system_prompt is set but the tokenizer rendering the teacher's "
                              "prompt has no chat template to put it in. Fix: set teacher.prompt_template to a "
                              "side whose tokenizer has one, or teacher.system_prompt=''")
        return prompt
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def teacher_prompt_ids(prompts: list[str], tokenizer, system_prompt: str) -> list[np.ndarray]:
    """(P_i,) int32 ids of each prompt (suffix included) as the teacher is to read it."""
    return [np.asarray(tokenizer(render_prompt(tokenizer, p, system_prompt), add_special_tokens=False)["input_ids"],
                       dtype=np.int32) for p in prompts]


def teacher_prompts(records) -> list[np.ndarray]:
    """(P'_i,) per `PromptRecord`: the prompt the teacher reads, its `teacher_prompt_ids` where it carries one,
    else the student's `prompt_ids` (the same array: with the defaults nothing differs, not even a copy)."""
    return [r.prompt_ids if r.teacher_prompt_ids is None else r.teacher_prompt_ids for r in records]


def first_difference(a: np.ndarray, b: np.ndarray) -> int:
    """Index of the first position where two id sequences differ (the shorter's length when one is a prefix
    of the other); -1 when they are equal."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    if diff.size:
        return int(diff[0])
    return -1 if len(a) == len(b) else n


def alignment_report(rollout: pa.Table, teacher: pa.Table, student_end_id: int | None, teacher_end_id: int | None,
                     k: int) -> dict[str, float]:
    """`align/*` metrics of a few scored responses (the rows of one rollout table and its teacher table).

    - teacher_logprob_mean: the teacher's mean log-prob per response token;
    - ended_fraction: share of responses ending with the student's end token;
    - final_logprob: mean teacher log-prob of that final end token (in the teacher's reading, remap applied);
    - other_end_logprob: at the same positions, the teacher's mean log-prob of the other end token (the
      teacher's own end of turn; with a remap, the one exchanged for it). A token outside the teacher's
      top-k counts as the k-th log-prob, an upper bound; NaN when the two end tokens are one;
    - prompt_diff_position: first token where the teacher's prompt differs from the student's (-1: same).
    """
    responses = list_rows(rollout.column("response_ids"))
    masks = teacher_mask_rows(teacher, [len(r) for r in responses])  # positions carrying statistics
    logprobs = [lp[m] for lp, m in zip(list_rows(teacher.column("teacher_logprobs")), masks)]
    topk_ids = [r.reshape(-1, k) for r in list_rows(teacher.column("topk_ids"))]
    topk_lp = [r.reshape(-1, k) for r in list_rows(teacher.column("topk_logprobs"))]
    scored = np.concatenate(logprobs).astype(np.float64) if logprobs else np.zeros(0)
    ended = [i for i, r in enumerate(responses) if len(r) and r[-1] == student_end_id and masks[i][-1]]
    final = [float(logprobs[i][-1]) for i in ended]
    other = []
    if teacher_end_id is not None and teacher_end_id != student_end_id:
        for i in ended:
            ids, lp = topk_ids[i][-1], topk_lp[i][-1]
            hit = np.flatnonzero(ids == teacher_end_id)
            other.append(float(lp[hit[0]] if hit.size else lp.min()))
    # the first row carrying a teacher's prompt (every row of a run does when its context differs)
    prompt_diff = next((first_difference(p, t) for p, t in zip(list_rows(rollout.column("prompt_ids")),
                                                               list_rows(rollout.column("teacher_prompt_ids")))
                        if len(t)), -1)
    nan = float("nan")
    return {"align/rows": float(len(responses)),
            "align/teacher_logprob_mean": float(scored.mean()) if scored.size else nan,
            "align/ended_fraction": len(ended) / len(responses) if responses else nan,
            "align/final_logprob": float(np.mean(final)) if final else nan,
            "align/other_end_logprob": float(np.mean(other)) if other else nan,
            "align/prompt_diff_position": float(prompt_diff)}


def alignment_warning(report: dict[str, float], student_end: str, teacher_end: str, remapped: bool) -> str | None:
    """The warning to print when the responses' end token is far less likely under the teacher than the
    other end token, with the numbers and the fix; None when the report looks aligned."""
    final, other = report["align/final_logprob"], report["align/other_end_logprob"]
    if not (np.isfinite(final) and np.isfinite(other)) or other - final < END_GAP_NATS:
        return None
    fix = ("teacher.eos_remap='' (the remap makes it worse: the teacher already ends its turn with the student's "
           "end token)" if remapped else f"teacher.eos_remap='{student_end}->{teacher_end}' (or teacher.eos_remap=auto)")
    return (f"alignment: the teacher gives the responses' end token {student_end!r} a mean log-prob of {final:.2f} "
            f"but {teacher_end!r} {other:.2f} at the same positions ({report['align/ended_fraction']:.0%} of the "
            f"responses end there): it does not read the student's end token as the end of its turn, so every "
            f"response's last token gets a large negative advantage. Fix: {fix}")
