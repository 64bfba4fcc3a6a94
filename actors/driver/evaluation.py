"""Sampling-based evaluation spread over the rollout workers (Avg@k, Pass@k, generated-token entropy)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import ray

from actors.driver.session import ACTOR_DIED, Session
from actors.runtime.group import ActorGroup
from actors.rollout.engine import SamplingParams
from eopd_ray import checkpoint
from eopd_ray.cross_tokenizer import ResponseEncoder, TokenBytes, retokenize
from eopd_ray.evaluation import summarize_correct
from eopd_ray.fidelity import Samples, cross_fidelity, diversity, fidelity
from eopd_ray.models import load_causal_lm, load_tokenizer
from eopd_ray.run_setup import model_groups
from eopd_ray.seeds import eval_seed
from eopd_ray.sharding import shard_slices
from eopd_ray.teacher_context import teacher_prompts


def combine_fractions(parts: list[dict]) -> float:
    """The high-entropy fraction over every worker's tokens with a finite entropy (each worker's fraction
    weighted by its `num_tokens`, the finite-entropy count). NaN when tokens were generated but none had a
    finite entropy (vLLM gives none), 0.0 when no tokens were generated at all."""
    num = den = 0.0
    for p in parts:
        n, f = float(p["num_tokens"]), float(p["high_entropy_fraction"])
        if n > 0 and math.isfinite(f):
            num, den = num + f * n, den + n
    if den > 0:
        return num / den
    generated = sum(p.get("num_generated_tokens", p["num_tokens"]) for p in parts)
    return float("nan") if generated else 0.0


def evaluate_on_workers(rollouts: ActorGroup, prompt_ids: list, answers: list, k: int, params: SamplingParams,
                        threshold: float = 1.0, model_path: str | None = None) -> dict:
    """k samples per problem; the problems are sharded over the workers and reassembled in order.

    model_path: load this model into every worker first (None = evaluate the weights they hold)."""
    order = [list(range(len(prompt_ids)))[s] for s in shard_slices(len(prompt_ids), len(rollouts))]
    parts = ray.get([a.evaluate.remote([prompt_ids[j] for j in idx], [answers[j] for j in idx], k, params,
                                       threshold, model_path)
                     for a, idx in zip(rollouts.actors, order) if idx])
    correct = np.zeros((len(prompt_ids), k), dtype=bool)
    texts: list = [None] * len(prompt_ids)
    lengths: list = [None] * len(prompt_ids)
    response_ids: list = [None] * len(prompt_ids)
    for idx, part in zip([o for o in order if o], parts):
        correct[idx] = part["correct"]
        for pos, j in enumerate(idx):
            texts[j] = part["texts"][pos * k:(pos + 1) * k]
            lengths[j] = part["lengths"][pos * k:(pos + 1) * k]
            response_ids[j] = part["response_ids"][pos * k:(pos + 1) * k]
    out = summarize_correct(correct, k)
    out["high_entropy_fraction"] = combine_fractions(parts)
    out["entropy_hist"] = np.sum([p["entropy_hist"] for p in parts], axis=0).tolist()
    out["entropy_edges"] = parts[0]["entropy_edges"]
    out["correct"] = correct.tolist()
    # per problem, its k samples: texts, token counts and ids (samples.jsonl, diversity, fidelity)
    out["texts"], out["lengths"], out["response_ids"] = texts, lengths, response_ids
    return out


def evaluate(session: Session, eval_recs: list, model_path: str | None, as_teacher: bool = False) -> dict:
    """Avg@k / Pass@k of `model_path` (None: the trained weights the workers hold); `as_teacher`: the model is
    the teacher, prompted in its own context (teacher.prompt_template / system_prompt), as when it scores. A
    rollout worker that dies leaves, and the evaluation is redone by the others or by replacements given the
    trained weights."""
    cfg = session.cfg
    prompts = teacher_prompts(eval_recs) if as_teacher else [r.prompt_ids for r in eval_recs]
    params = SamplingParams(cfg.eval.temperature, cfg.eval.top_p, cfg.rollout.max_new_tokens,
                            eval_seed(cfg.trainer.seed))
    while True:
        try:
            return evaluate_on_workers(session.rollouts, prompts,
                                       [r.answer for r in eval_recs], cfg.eval.k, params,
                                       cfg.eval.high_entropy_threshold, model_path)
        except ACTOR_DIED:
            if not session.recover_rollout_workers("during evaluation",
                                                   None if session.on_policy else session.models.student_path):
                raise


def evaluate_models(session: Session, eval_recs: list) -> dict:
    """The trained student, the initial student and (eval.teacher) the teacher, on the same problems and seeds;
    then (eval.fidelity) each one's fidelity to the teacher and the diversity of its samples.
    Off-policy objectives' workers held the teacher: they are given the student and its trained weights first."""
    if not session.on_policy:
        session.rollouts.run("load_model", session.models.student_path)
        session.sync.sync()
    results = {"student": evaluate(session, eval_recs, None),
               "student_initial": evaluate(session, eval_recs, session.models.student_path)}
    if session.cfg.eval.teacher:
        results["teacher"] = evaluate(session, eval_recs, session.models.teacher_path, as_teacher=True)
    for r in results.values():
        r["diversity/distinct_2"] = diversity(r["response_ids"], 2)
    if session.cfg.eval.fidelity:
        add_fidelity(session, eval_recs, results)
    return results


def trained_student_path(session: Session) -> str:
    """The HF copy of the trained student in the run's newest checkpoint (written at the last step); the initial
    student's path when no step has run."""
    ckpt = checkpoint.latest(Path(session.cfg.out_dir) / "checkpoints")
    return str(ckpt / "hf") if ckpt is not None else session.models.student_path


def teacher_tokens(models, trust_remote_code: bool):
    """A function: (T,) student response ids -> (M,) the teacher's ids of the same bytes (teacher.tokenizer=cross)."""
    student_bytes = TokenBytes(load_tokenizer(models.student_path, trust_remote_code))
    encoder = ResponseEncoder(load_tokenizer(models.teacher_path, trust_remote_code))
    return lambda response: retokenize(response, student_bytes, encoder)[0]


def add_fidelity(session: Session, eval_recs: list, results: dict) -> None:
    """results[name]["fidelity"] for every evaluated model, computed in this (the driver's) process: the models
    are loaded from their paths, the samples are the evaluation's own; the teacher reads every sample after the
    teacher's prompt, the students after their own. With several teachers (`teachers`), the students' fidelity
    to each one on the held-out problems routed to it: results[name]["fidelity_by_teacher"][teacher name]."""
    cfg, models = session.cfg, session.models
    t0 = time.perf_counter()
    paths = {"student": trained_student_path(session), "student_initial": models.student_path}
    groups = model_groups(cfg, models)
    if len(groups) == 1:
        for name, fid in fidelity_to_teacher(cfg, models, eval_recs, results, paths).items():
            results[name]["fidelity"] = fid
    for i, (group, group_cfg, group_models) in enumerate(groups if len(groups) > 1 else []):
        idx = [j for j, r in enumerate(eval_recs) if r.teacher == i]
        if not idx:
            print(f"fidelity to teacher {group!r}: no held-out problem is routed to it")
            continue
        mine = {name: {"response_ids": [results[name]["response_ids"][j] for j in idx]} for name in paths}
        for name, fid in fidelity_to_teacher(group_cfg, group_models, [eval_recs[j] for j in idx], mine, paths).items():
            results[name].setdefault("fidelity_by_teacher", {})[group] = {**fid, "problems": len(idx)}
    print(f"fidelity to the teacher{'s' if len(groups) > 1 else ''} computed in {time.perf_counter() - t0:.0f} s")


def fidelity_to_teacher(cfg, models, eval_recs: list, results: dict, paths: dict) -> dict:
    """{model name: its fidelity to cfg's (one) teacher} for the models of `paths` (and the teacher itself when
    `results` holds its samples), on `eval_recs` with the samples in results[name]["response_ids"]."""
    k = cfg.eval.k
    prompts = [r.prompt_ids for r in eval_recs for _ in range(k)]
    teacher_side = [p for p in teacher_prompts(eval_recs) for _ in range(k)]

    def samples(name):
        return Samples(prompts, [ids for row in results[name]["response_ids"] for ids in row], teacher_side)

    teacher = load_causal_lm(models.teacher_path, cfg.model.teacher_dtype, cfg.model.trust_remote_code).eval()
    teacher_samples = samples("teacher") if "teacher" in results else None
    retokenized = teacher_tokens(models, cfg.model.trust_remote_code) if cfg.teacher.tokenizer == "cross" else None
    out = {}
    for name, path in paths.items():
        model = load_causal_lm(path, cfg.model.dtype, cfg.model.trust_remote_code).eval()
        if retokenized is None:
            out[name] = fidelity(model, teacher, samples(name), teacher_samples, models.vocab_size, cfg.loss.tau)
        else:  # teacher.tokenizer=cross: over whole responses, in the teacher's tokens
            own = samples(name)
            out[name] = cross_fidelity(model, teacher, own, [retokenized(r) for r in own.responses],
                                       models.vocab_size, models.teacher_vocab_size)
        del model
    if teacher_samples is not None:  # the teacher against itself: both KLs are 0 by definition
        out["teacher"] = {**fidelity(teacher, teacher, teacher_samples, None, models.vocab_size, cfg.loss.tau),
                          "forward_kl": 0.0, "forward_kl_high_entropy": 0.0}
    return out
