"""The phases of one step of Algorithm 1 and the step itself: generate, score, train, sync (and check).

Payloads move between actors as object refs; only small stats dicts reach the driver. Every function takes
the `Session` of actors (actors/driver/session.py) and returns metrics as flat dicts with slash names.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import ray
from tqdm import tqdm

from actors.driver.routing import score_routed
from actors.driver.session import ACTOR_DIED, Session
from actors.rollout.engine import SamplingParams
from actors.runtime.group import ActorGroup
from eopd_ray.batch import list_rows
from eopd_ray.run_setup import model_groups
from eopd_ray.seeds import rollout_seed
from eopd_ray.sharding import shard_slices
from eopd_ray.teacher_context import alignment_report, alignment_warning
from eopd_ray.worker_stats import reduce_worker_stats


@dataclass
class PendingRollout:
    """A step's rollouts in flight (or restored from a checkpoint): table refs, stats refs and the number of
    responses (rows), one per worker."""

    step: int
    table_refs: list
    stats_refs: list
    rows: list[int]


def submit_rollouts(session: Session, step: int, prompts: list) -> PendingRollout:
    """Start step `step`'s generation on the live rollout workers, each with its share of the prompts."""
    cfg = session.cfg
    workers = session.rollouts.actors
    shards = [prompts[s] for s in shard_slices(len(prompts), len(workers))]
    n = cfg.rollout.n_samples_per_prompt
    roll = [a.rollout.options(num_returns=2).remote(
        [r.id for r in s], [r.prompt_ids for r in s], [r.answer for r in s],
        SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens,
                       seed=rollout_seed(cfg.trainer.seed, step, i)), n, [r.teacher_prompt_ids for r in s],
        not session.on_policy)  # off-policy KD: the workers hold the teacher, which samples in its own context
        for i, (a, s) in enumerate(zip(workers, shards)) if s]
    return PendingRollout(step, [r[0] for r in roll], [r[1] for r in roll], [len(s) * n for s in shards if s])


def rollout_phase(session: Session, step: int, prompts: list,
                  pending: PendingRollout | None = None) -> tuple[list, list[dict]]:
    """Sample one iteration's responses, split over the live rollout workers (or wait for `pending`, started
    earlier). A worker that dies leaves the group and the phase is redone by the others (or by replacements
    when none is left), with the weights they hold now: no student state has changed yet, so nothing needs
    replaying from a checkpoint. Returns (rollout table refs, stats of each worker with its response count
    `rollout/responses`, which its per-response means are weighted by)."""
    while True:
        pending = pending or submit_rollouts(session, step, prompts)
        try:
            stats = ray.get(pending.stats_refs)
            return pending.table_refs, [{**s, "rollout/responses": n} for s, n in zip(stats, pending.rows)]
        except ACTOR_DIED:
            pending = None
            if not session.recover_rollout_workers(f"at step {step + 1}"):
                raise


def score_rollouts(teachers: ActorGroup, rollout_refs: list, zero3: bool) -> tuple[list, list[dict]]:
    """The score phase: (teacher table refs, one per rollout ref in the same order; the stats dict of each).
    The rollouts are sharded over the teacher workers. Whole-model workers take one call per rollout (Ray
    pipelines them); a ZeRO-3 group (`actors/teacher/zero3.py`) takes one collective call per worker with its
    whole share, since its workers must run in step."""
    n = len(teachers)
    slices = shard_slices(len(rollout_refs), n)
    if not zero3:
        owner = [w for w, s in enumerate(slices) for _ in range(s.start, s.stop)]
        scored = [teachers.actors[owner[i]].score.options(num_returns=2).remote(ref)
                  for i, ref in enumerate(rollout_refs)]
        return [s[0] for s in scored], ray.get([s[1] for s in scored])
    shares = [rollout_refs[s] for s in slices]
    outs = [a.score_shards.options(num_returns=len(share) + 1).remote(*share)
            for a, share in zip(teachers.actors, shares)]
    outs = [out if share else [out] for out, share in zip(outs, shares)]  # num_returns=1 gives a bare ref
    _wait_for_group(teachers, [out[-1] for out in outs])
    stats_per_worker = ray.get([out[-1] for out in outs])
    refs = [ref for out, share in zip(outs, shares) for ref in out[:len(share)]]
    # a worker without a share answers ([],) through its single return: take as many stats as it had rollouts
    return refs, [stats for per_worker, share in zip(stats_per_worker, shares) for stats in per_worker[:len(share)]]


def _wait_for_group(teachers: ActorGroup, pending: list) -> None:
    """Wait for every worker's call, raising as soon as one fails. When a worker dies, its peers' collectives
    may fail first (or hang): the death itself is raised then, which the training loop recovers from, rather
    than a peer's error."""
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
    except ray.exceptions.RayTaskError:
        pings = [a.ping.remote() for a in teachers.actors]
        # One deadline for all: live peers may be stuck in a collective and never answer.
        for ping in ray.wait(pings, num_returns=len(pings), timeout=30)[0]:
            ray.get(ping)  # a dead worker raises ActorDiedError here
        raise


def sync_check_rows(rollout_ref, rows: int = 4) -> tuple[list, list]:
    """(prompt ids, response ids) of the first `rows` rows of a rollout table that have response tokens."""
    table = ray.get(rollout_ref).slice(0, rows)
    pairs = [(p, r) for p, r in zip(list_rows(table.column("prompt_ids")), list_rows(table.column("response_ids")))
             if len(r)]
    return [p for p, _ in pairs], [r for _, r in pairs]


def check_sync(session: Session) -> dict:
    """After a sync, until the check is conclusive: the engines' teacher-forced log-probs of the reference rows
    equal the student's and moved with the student's since the reference (`WeightSync.verify`), so a sync that
    silently sends nothing or the wrong tensors stops the run rather than training on stale samples. While
    the student has moved too little since the reference to tell new weights from the previous ones (bf16, a
    small learning rate) the check is inconclusive: it says so and is made again after the next sync."""
    # the limits follow the dtype engines and student run in (float32: rounding only; bf16: kernel noise)
    metrics = session.sync.verify(dtype=session.cfg.model.dtype)
    session.sync_checked = bool(metrics.get("sync/check_conclusive"))
    if session.sync_checked or "sync/check_moved" not in metrics:
        session.sync.reference = None  # done; or no rows, or no engine of the reference left: anew next step
    elif session.sync.reference.syncs == 1:
        tqdm.write(f"post-sync check inconclusive: the student's log-probs moved by {metrics['sync/check_moved']:.2g} "
                   f"nats rms since the reference, too little against the engine-student gap there "
                   f"({metrics['sync/check_noise']:.2g}); checking again after each sync as the movement adds up")
    return metrics


def check_alignment(session: Session, rollout_ref, teacher_ref, models=None, name: str = "") -> dict:
    """Once per process, before its first training step: how the teacher read a few of the sampled responses
    (`eopd_ray.teacher_context.alignment_report`), printed, with a warning and the fix when the responses'
    end token is far less likely under the teacher than its own end of turn. Returns the `align/*` metrics
    (`align/<name>/*` for teacher group `name` of several, with its `models`)."""
    session.aligned = True
    rows = session.cfg.teacher.alignment_rows
    if not rows:
        return {}
    rollout, teacher = ray.get([rollout_ref, teacher_ref])
    m = models or session.models
    report = alignment_report(rollout.slice(0, rows), teacher.slice(0, rows), *m.end_ids, session.cfg.loss.top_k)
    # tqdm.write: printed above the progress bar rather than through it
    tqdm.write(f"alignment check{f' ({name})' if name else ''}: " + ", ".join(
        f"{key.removeprefix('align/')}={value:.3g}" for key, value in report.items()))
    warning = alignment_warning(report, *m.end_names, remapped=m.end_swap is not None)
    if warning:
        tqdm.write(f"warning: {warning}", file=sys.stderr)
    return {f"align/{name}/{key.removeprefix('align/')}" if name else key: value for key, value in report.items()}


def score_phase(session: Session, rollout_refs: list, prompts: list) -> tuple[list, dict, dict]:
    """(teacher table refs, one per rollout ref; the teacher stats of the batch; the alignment check's metrics,
    at a process's first step). With several teachers (`teachers`), each prompt's rows go to its teacher group
    (`PromptRecord.teacher`) and every group's statistics are reported under `teacher/<name>/...` too."""
    cfg = session.cfg
    if len(session.teachers) == 1:
        refs, stats = score_rollouts(session.teachers[0], rollout_refs, cfg.teacher.zero_stage == 3)
        align = check_alignment(session, rollout_refs[0], refs[0]) if not session.aligned else {}
        return refs, reduce_worker_stats(stats), align
    groups = model_groups(cfg, session.models)
    refs, metrics, firsts = score_routed([(name, t) for (name, _, _), t in zip(groups, session.teachers)],
                                         rollout_refs, {r.id: r.teacher for r in prompts}, cfg.loss.tau,
                                         lambda group, part_refs: score_rollouts(group, part_refs, False))
    align = {}
    if not session.aligned:
        for name, _, models in groups:
            if name in firsts:
                align.update(check_alignment(session, *firsts[name], models, name))
    return refs, metrics, align


def iteration(session: Session, step: int, prompts: list, next_prompts: list | None = None) -> dict:
    """One step of Algorithm 1: generate, score, train, sync. Returns the step's metrics row.

    Overlapped (`next_prompts` given, rollout.overlap): as soon as this step's rollouts are in, the workers
    start on step + 1's prompts with the weights they hold (this step's behaviour policy), while the teacher
    scores and the student trains; the sync that follows waits for that generation, so it is one step off
    policy. It is kept in `session.ahead` for the next call (and for a checkpoint)."""
    cfg = session.cfg
    t0 = time.perf_counter()
    ahead, session.ahead = session.ahead, None
    rollout_refs, rollout_stats = rollout_phase(session, step, prompts,
                                                ahead if ahead is not None and ahead.step == step else None)
    t1 = time.perf_counter()
    if next_prompts is not None:
        # queued on each worker before this step's sync, so it samples with the weights held now
        session.ahead = submit_rollouts(session, step + 1, next_prompts)
    teacher_refs, teacher_metrics, align = score_phase(session, rollout_refs, prompts)
    t2 = time.perf_counter()
    checking = session.on_policy and cfg.placement.check_sync and not session.sync_checked
    if checking and session.sync.reference is None:
        # both sides' log-probs of a few rows before this step's update: the check measures the movement since
        session.sync.record_reference(*sync_check_rows(rollout_refs[0]))
    train_metrics = session.students.run("train_step", step, len(rollout_refs), *rollout_refs, *teacher_refs)[0]
    t3 = time.perf_counter()
    sync_metrics = session.sync.sync() if session.on_policy else {}
    if checking:
        sync_metrics.update(check_sync(session))
    row = {"step": step + 1, **train_metrics, **sync_metrics, **align, "rollout/workers": len(rollout_refs),
           **reduce_worker_stats(rollout_stats), **teacher_metrics}  # sums, weighted means, max
    row.update({"time/rollout": t1 - t0, "time/score": t2 - t1, "time/train_phase": t3 - t2,
                "time/step": time.perf_counter() - t0})
    return row
