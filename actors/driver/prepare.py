"""Before Ray starts: everything `eopd_ray.run_setup.prepare_run` checks, plus what the chosen engines need
(vLLM installed, both models servable by it) and the configured trackers installed, then the run directory's
config, metrics log and trackers."""

from __future__ import annotations

import json

from eopd_ray.config import RunConfig
from eopd_ray.placement import format_plan, plan_placement
from eopd_ray.run_io import MetricsLog, save_config
from eopd_ray.run_setup import RunSetup, prepare_run
from eopd_ray.tracking import Trackers, check_trackers


def prepare(cfg: RunConfig, resume: str | None = None) -> RunSetup:
    """Raises one of eopd_ray.run_setup.SETUP_ERRORS naming the bad value and the fix."""
    check_trackers(cfg)  # first: a missing package is reported before the models are built
    run = prepare_run(cfg, resume)
    if cfg.rollout.engine == "vllm":  # installed, and able to serve both models (teacher: evaluation, kd)
        from actors.rollout.vllm_engine import check_servable

        check_servable([run.models.student_path, run.models.teacher_path], cfg.model.trust_remote_code,
                       not plan_placement(cfg).has_gpus)
    return run


def open_run(run: RunSetup) -> MetricsLog:
    """Print the resolved config and the placement plan, save the config with the run, and open its metrics
    log (truncated to the step resumed from) with the configured trackers as `log.trackers` (they receive
    every row; close them with `log.trackers.close(exit_code)`, which records the job's exit status). Raises
    TrackerError if W&B cannot start a run."""
    print("resolved config:\n" + json.dumps(run.cfg.to_dict(), indent=2))
    print(format_plan(run.cfg))
    save_config(run.cfg, run.out_dir)
    if run.ckpt is not None:
        print(f"resuming from {run.ckpt} at step {run.start_step}")
    log = MetricsLog(run.out_dir / "metrics.jsonl", resume_step=run.start_step if run.ckpt is not None else None)
    log.trackers = Trackers(run.cfg, run.out_dir, log.rows)
    return log
