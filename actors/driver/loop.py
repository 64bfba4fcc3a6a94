"""The training loop of Algorithm 1 over a `Session`: step after step with a progress bar, rollout workers
admitted back when the cluster can place them (elastic runs), a rebuild from the last complete checkpoint
when a teacher or student worker dies, checkpoints every `trainer.save_every` steps and at the end.

A recipe calls `train(...)` and handles what it raises: `SyncCheckError` (the engines do not hold the
student's weights) and `NonFiniteLossError` (`trainer.on_nonfinite=stop`); `TooManyRestarts` after
`trainer.max_restarts` failures. Another loop can be written from the same pieces: `phases.iteration`,
`Session.admit_rollout_workers`, `save_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import ray
from tqdm import tqdm

from actors.driver.phases import iteration
from actors.driver.session import ACTOR_DIED, Session
from actors.student.trainer import NonFiniteLossError
from eopd_ray import checkpoint
from eopd_ray.data import PromptSampler
from eopd_ray.run_io import MetricsLog
from eopd_ray.run_setup import RunSetup, restore_driver_state

KEEP_CHECKPOINTS = 2  # complete checkpoints kept; older ones are removed after a new one is committed


class TooManyRestarts(RuntimeError):
    """Actors died more than trainer.max_restarts times; the message names the last good checkpoint."""


def save_checkpoint(out_dir: Path, step: int, session: Session, sampler: PromptSampler) -> Path:
    """The student's training state (every rank joins), its HF copy and the driver state, committed whole."""
    root = out_dir / "checkpoints"
    tmp = checkpoint.begin(root, step)
    try:
        session.students.run("save", str(tmp))
        checkpoint.write_json_atomic(tmp / "driver_state.json", {"step": step, "sampler": sampler.state_dict()})
        final = checkpoint.commit(tmp, step, meta={"student_hf": "hf"})
    except BaseException:
        checkpoint.abort(tmp)
        raise
    done = sorted((p for p in root.glob("step_*") if checkpoint.is_complete(p)), key=lambda p: p.name)
    for old in done[:-KEEP_CHECKPOINTS]:
        checkpoint.abort(old)
    return final


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
    bar = tqdm(total=t.max_steps, initial=step, desc=cfg.loss.objective.upper(), unit="step")
    try:
        while step < t.max_steps:
            prompts = sampler.next_batch()
            try:
                session.admit_rollout_workers(cfg.rollout.join_wait_s if session.rollouts.pending else 0.0)
                row = iteration(session, step, prompts)
                row.update({f"data/{k}": v for k, v in sampler.state_dict().items() if k != "seed"})  # after this batch
            except ACTOR_DIED as exc:  # a worker process died: rebuild everything from the last checkpoint
                restarts += 1
                ckpt = checkpoint.latest(run.out_dir / "checkpoints")
                if restarts > t.max_restarts:
                    raise TooManyRestarts(f"{restarts} actor failures (trainer.max_restarts={t.max_restarts}); "
                                          f"last good checkpoint: {ckpt or 'none'}. Last failure: {exc}") from None
                tqdm.write(f"[fault] {type(exc).__name__} at step {step + 1}: {str(exc).splitlines()[0]}; restart "
                           f"{restarts}/{t.max_restarts}: rebuilding the actors from {ckpt or 'the initial weights'}")
                session.rebuild(ckpt)
                step = restore_driver_state(ckpt, sampler)
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
                save_checkpoint(run.out_dir, step, session, sampler)
            if stop_now and step < t.max_steps:
                print(f"stopping after step {step} (--stop-after); continue with --resume {run.out_dir}")
                return False
    finally:
        bar.close()
    return True
