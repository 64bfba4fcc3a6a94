"""The training loop of Algorithm 1 over a `Session`: step after step with a progress bar, rollout workers
admitted back when the cluster can place them (elastic runs), a rebuild from the last complete checkpoint
when a teacher or student worker dies, checkpoints every `trainer.save_every` steps and at the end.

A recipe calls `train(...)` and handles what it raises: `SyncCheckError` (the engines do not hold the
student's weights) and `NonFiniteLossError` (`trainer.on_nonfinite=stop`); `TooManyRestarts` after
`trainer.max_restarts` failures; `PlacementTimeout` when a rebuild cannot place the actors within
`trainer.place_wait_s`. Another loop can be written from the same pieces: `phases.iteration`,
`Session.admit_rollout_workers`, `save_checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray
from tqdm import tqdm

from actors.driver.phases import PendingRollout, iteration
from actors.driver.session import ACTOR_DIED, Session
from actors.runtime.group import PlacementTimeout
from actors.runtime.faults import hold_after
from actors.student.trainer import NonFiniteLossError
from eopd_ray import checkpoint
from eopd_ray.batch import read_rollout_files, write_rollout_files
from eopd_ray.run_io import MetricsLog
from eopd_ray.run_setup import RunSetup, restore_driver_state

AHEAD_DIR = "rollouts_ahead"  # a checkpoint's next-step rollouts (rollout.overlap)
KEEP_CHECKPOINTS = 2  # complete checkpoints kept; older ones are removed after a new one is committed


class TooManyRestarts(RuntimeError):
    """Actors died more than trainer.max_restarts times; the message names the last good checkpoint."""


def save_checkpoint(out_dir: Path, step: int, session: Session, sampler_state: dict) -> Path:
    """The student's training state (every rank joins), its HF copy and the driver state, committed whole;
    with rollout.overlap, also the next step's rollouts generated ahead (Arrow files), so that a resumed run
    trains on the same batch as one never interrupted."""
    root = out_dir / "checkpoints"
    tmp = checkpoint.begin(root, step)
    try:
        session.students.run("save", str(tmp))
        state = {"step": step, "sampler": sampler_state}
        if session.ahead is not None:
            ahead = session.ahead
            write_rollout_files(tmp / AHEAD_DIR, ray.get(ahead.table_refs))
            state["ahead"] = {"step": ahead.step, "stats": ray.get(ahead.stats_refs)}
        checkpoint.write_json_atomic(tmp / "driver_state.json", state)
        final = checkpoint.commit(tmp, step, meta={"student_hf": "hf"})
    except BaseException:
        checkpoint.abort(tmp)
        raise
    done = sorted((p for p in root.glob("step_*") if checkpoint.is_complete(p)), key=lambda p: p.name)
    for old in done[:-KEEP_CHECKPOINTS]:
        checkpoint.abort(old)
    return final


def restore_ahead(session: Session, ckpt: Path | None) -> None:
    """The rollouts a checkpoint holds for its next step (rollout.overlap) back into the object store."""
    state = json.loads((ckpt / "driver_state.json").read_text()) if ckpt is not None else {}
    if "ahead" not in state:
        session.ahead = None
        return
    tables = read_rollout_files(ckpt / AHEAD_DIR)
    session.ahead = PendingRollout(int(state["ahead"]["step"]), [ray.put(t) for t in tables],
                                   [ray.put(s) for s in state["ahead"]["stats"]], [t.num_rows for t in tables])


def _rebuild(run: RunSetup, session: Session, exc: BaseException, restarts: int, step: int) -> tuple[int, Path | None]:
    """Rebuild every actor group from the last complete checkpoint after `exc` (a lost worker), counting each
    loss against trainer.max_restarts, a loss during the rebuild itself (a second node gone while the
    replacements start) included. Returns (restarts so far, the checkpoint rebuilt from). Raises TooManyRestarts
    past the limit, and PlacementTimeout when the cluster cannot place a group within trainer.place_wait_s (a
    lost node that never comes back); both name the checkpoint, which is left as it was."""
    t = run.cfg.trainer
    ckpt = checkpoint.latest(run.out_dir / "checkpoints")
    when = f"at step {step + 1}"
    while True:
        restarts += 1
        if restarts > t.max_restarts:
            raise TooManyRestarts(f"{restarts} actor failures (trainer.max_restarts={t.max_restarts}); "
                                  f"last good checkpoint: {ckpt or 'none'}. Last failure: {exc}") from None
        tqdm.write(f"[fault] {type(exc).__name__} {when}: {str(exc).splitlines()[0]}; restart "
                   f"{restarts}/{t.max_restarts}: rebuilding the actors from {ckpt or 'the initial weights'}")
        try:
            session.rebuild(ckpt)
            return restarts, ckpt
        except ACTOR_DIED as again:
            exc, when = again, f"while rebuilding for step {step + 1}"
        except PlacementTimeout as stuck:
            raise PlacementTimeout(f"{stuck}. The run stopped while rebuilding for step {step + 1}; the last good "
                                   f"checkpoint, {ckpt or 'none (no step was saved)'}, is intact: continue with "
                                   f"--resume {run.out_dir} once the cluster can place the group") from None


def _report(row: dict, bar: tqdm) -> None:
    bar.update(1)
    bar.set_postfix({"loss": f"{row.get('loss/total', float('nan')):.3f}", "acc": f"{row['rollout/accuracy']:.2f}",
                     "gate": f"{row.get('gate/fraction', 0):.2f}", "H_s": f"{row.get('student/entropy', 0):.2f}"})
    tqdm.write(" ".join(f"{k}={v:.4g}" for k, v in row.items() if not k.startswith("time/") and k != "step")
               + f"  [step {row['step']}, {row['time/step']:.1f}s]")


def train(run: RunSetup, session: Session, log: MetricsLog, stop_after: int = 0) -> bool:
    """Run steps run.start_step .. trainer.max_steps, appending each step's metrics to `log`. Returns True
    when all steps ran, False when it stopped early at `stop_after` (checkpointed; resume with --resume)."""
    cfg, sampler, t = run.cfg, run.sampler, run.cfg.trainer
    step, restarts = run.start_step, 0
    restore_ahead(session, run.ckpt)
    prompts = sampler.next_batch()
    bar = tqdm(total=t.max_steps, initial=step, desc=cfg.loss.objective.upper(), unit="step")
    try:
        while step < t.max_steps:
            sampler_state = sampler.state_dict()  # after this step's batch: what a checkpoint of it records
            # overlapped: the next step's prompts now, generated while this step trains
            next_prompts = sampler.next_batch() if cfg.rollout.overlap and step + 1 < t.max_steps else None
            try:
                session.admit_rollout_workers(cfg.rollout.join_wait_s if session.rollouts.pending else 0.0)
                row = iteration(session, step, prompts, next_prompts)
                row.update({f"data/{k}": v for k, v in sampler_state.items() if k != "seed"})
            except ACTOR_DIED as exc:  # a worker process died: rebuild everything from the last checkpoint
                restarts, ckpt = _rebuild(run, session, exc, restarts, step)
                step = restore_driver_state(ckpt, sampler)
                restore_ahead(session, ckpt)
                prompts = sampler.next_batch()
                log.truncate(step)
                bar.n = step
                bar.refresh()
                continue
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, NonFiniteLossError):  # trainer.on_nonfinite=stop
                    raise exc.cause from None
                raise
            log.append(row)
            _report(row, bar)
            step += 1
            stop_now = bool(stop_after) and step >= stop_after
            if (t.save_every and step % t.save_every == 0) or step == t.max_steps or stop_now:
                save_checkpoint(run.out_dir, step, session, sampler_state)
            hold_after(step)
            if stop_now and step < t.max_steps:
                print(f"stopping after step {step} (--stop-after); continue with --resume {run.out_dir}")
                return False
            if step < t.max_steps:
                prompts = next_prompts if next_prompts is not None else sampler.next_batch()
    finally:
        bar.close()
    return True
