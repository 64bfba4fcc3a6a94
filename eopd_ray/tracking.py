"""Experiment trackers beside metrics.jsonl: TensorBoard and Weights & Biases (`logging.trackers`).

metrics.jsonl stays the record of a run; a tracker receives the same rows (every numeric metric under its
slash name, at the row's `step`), the resolved config at the start and the evaluation as flat
`eval/<model>/<metric>` values at the end. Both packages are optional extras (`.[tensorboard]`,
`.[wandb]`); `check_trackers` names the missing one before anything starts.

Files: TensorBoard event files in `<out_dir>/tensorboard/`; W&B run directories in `<out_dir>/wandb/`, with
`mode` from WANDB_MODE and "offline" when it is unset, so nothing is sent unless the user asks for it
(`wandb sync <out_dir>/wandb/latest-run` uploads later).

Resume and fault replay. metrics.jsonl loses the rows after step s when a run resumes from the checkpoint
of step s, or when a fault rebuilds the actors from it (`MetricsLog.truncate(s)`); the loop then logs
steps s+1, ... again. The trackers follow:

- TensorBoard: a SessionLog.START event at step s+1 tells TensorBoard's reader to drop every event at a
  step >= s+1 seen before it (the same event `SummaryWriter(purge_step=s+1)` writes). A resumed process
  opens its writer with purge_step=s+1; a fault replay writes the event into the open file, which keeps it
  after the events it purges (a new file could sort before an older one of the same second). Each step
  is flushed at once, so a crash cannot lose a step that metrics.jsonl keeps.
- W&B: a run's history is append-only and its `_step` must grow, so a dropped step cannot be taken back.
  Instead the run is finished (tagged `superseded` when a fault ends it) and a new run, with the same
  name, starts with every row metrics.jsonl kept, then goes on. The latest run under `<out_dir>/wandb/`
  therefore always holds exactly the rows of metrics.jsonl; earlier ones are prefixes of it. Charts use
  the row's `step` as x axis (`define_metric`), not W&B's internal `_step`.

How a run ends. `close(exit_code)` records the job's exit status in every tracker, so a failed or interrupted
run never reads as a success: W&B finishes the run with that code (non-zero: state "failed"), TensorBoard
gets it as the scalar `run/exit_code` and a `status` text at the last step. An exception passing through the
caller's `finally` counts as failed even when no code was given (Ctrl-C: 130, see `exit_status`).
"""

from __future__ import annotations

import importlib
import json
import numbers
import os
import sys
import time
from pathlib import Path

import numpy as np

from eopd_ray.config import RunConfig
from eopd_ray.run_io import json_safe

TENSORBOARD_DIR = "tensorboard"
EXIT_CODE_TAG = "run/exit_code"  # TensorBoard scalar of the exit status (no metric starts with run/)
# tracker -> the modules it needs; each tracker's package and its pyproject.toml extra carry its name.
# torch's SummaryWriter is importable only with the tensorboard package installed
MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}


class TrackerError(RuntimeError):
    """A configured tracker cannot be used (package missing, or W&B could not start a run)."""


def check_trackers(cfg: RunConfig) -> None:
    """Import each configured tracker's package; raises TrackerError naming the extra to install."""
    for name in cfg.logging.names():
        try:
            for module in MODULES[name]:
                importlib.import_module(module)
        except ImportError as exc:
            raise TrackerError(f"logging.trackers={cfg.logging.trackers!r} needs the {name} package, which "
                               f"cannot be imported ({exc}); install it with pip install -e \".[{name}]\" "
                               f"(or \".[trackers]\" for both), or remove {name} from logging.trackers") from None


def is_metric(value) -> bool:
    """Real numbers (bool and numpy scalars included) go to the trackers; anything else stays in
    metrics.jsonl only."""
    return isinstance(value, (numbers.Real, np.bool_))


def flat_eval(results: dict) -> dict[str, float]:
    """`eval/<model>/<metric>` for every scalar of `evaluate_models`' results (avg_at_k, pass_at_k, k,
    num_problems, high_entropy_fraction, diversity/distinct_2, and fidelity/* from eval.fidelity); histograms,
    samples and per-sample correctness stay in results.json."""
    flat = {}
    for model, r in results.items():
        for key, value in r.items():
            inner = value.items() if key == "fidelity" and isinstance(value, dict) else [("", value)]
            for sub, v in inner:  # fidelity's figures as eval/<model>/fidelity/<name>
                if is_metric(v):
                    flat[f"eval/{model}/{key}/{sub}" if sub else f"eval/{model}/{key}"] = float(v)
    return flat


class Trackers:
    """The configured trackers of one run directory; with none configured every method does nothing.

    rows: the rows metrics.jsonl holds when the run (re)starts (resumed: those up to the checkpoint)."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, rows: list[dict] = ()):
        names = cfg.logging.names()
        check_trackers(cfg)
        self.out_dir = Path(out_dir)
        self.project = cfg.logging.wandb_project
        self.name = cfg.logging.run_name or self.out_dir.resolve().name
        self.config = json_safe(cfg.to_dict(), inf_as_string=True)  # as config.json: loss.tau=inf -> "inf"
        self.last_step = rows[-1]["step"] if rows else 0
        self.tb = self.wandb_run = None
        if "tensorboard" in names:
            self._open_tensorboard(purge_step=self.last_step + 1)
        if "wandb" in names:
            try:
                self._open_wandb(rows)
            except TrackerError:
                self.close(exit_code=2)  # the job stops at setup (exit 2): TensorBoard, if open, says so
                raise

    # ---- opening ---------------------------------------------------------------------------------------
    def _open_tensorboard(self, purge_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step also on a fresh start (1): event files of an earlier run in the same out_dir are
        # dropped by the reader, as metrics.jsonl is rewritten
        self.tb = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=purge_step)
        # the config of the process that logs from purge_step on (a resume may override values)
        self.tb.add_text("config", "```\n" + json.dumps(self.config, indent=2) + "\n```", purge_step)
        self.tb.flush()

    def _open_wandb(self, rows: list[dict]) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")  # explicit: a `wandb online` settings file is ignored
        try:
            run = wandb.init(project=self.project, name=self.name, dir=str(self.out_dir), mode=mode,
                             config=self.config, reinit="create_new")
        except Exception as exc:  # e.g. WANDB_MODE=online without a login
            raise TrackerError(f"W&B could not start a run (WANDB_MODE={mode}): {exc}; run `wandb login`, "
                               "or unset WANDB_MODE to log offline") from exc
        run.define_metric("step")
        run.define_metric("*", step_metric="step")  # x axis = training step, whatever W&B's _step is
        self.wandb_run = run
        for row in rows:
            self._log_wandb(row)

    # ---- logging ---------------------------------------------------------------------------------------
    def _log_wandb(self, row: dict) -> None:
        self.wandb_run.log({k: v for k, v in row.items() if is_metric(v)})

    def log(self, row: dict) -> None:
        """One training step's metrics (`row["step"]` is the step)."""
        step = int(row["step"])
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and is_metric(value):
                    self.tb.add_scalar(key, float(value), step)
            self.tb.flush()  # a crash must not lose a step that metrics.jsonl keeps (see the docstring)
        if self.wandb_run is not None:
            self._log_wandb(row)
        self.last_step = step

    def truncate(self, step: int, rows: list[dict]) -> None:
        """metrics.jsonl dropped the rows after `step` and now holds `rows`; those steps will be logged again."""
        self.last_step = step
        if self.tb is not None:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            self.tb.file_writer.add_event(Event(step=step + 1, wall_time=time.time(),
                                                session_log=SessionLog(status=SessionLog.START)))
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.tags = tuple(self.wandb_run.tags or ()) + ("superseded",)
            self.wandb_run.finish(exit_code=1)  # ended by a fault; its successor starts now
            self._open_wandb(rows)

    def log_eval(self, results: dict) -> None:
        """The evaluation (`evaluate_models`' results) as flat `eval/<model>/<metric>` values: W&B summary,
        TensorBoard scalars at the last training step."""
        flat = flat_eval(results)
        if self.tb is not None and flat:
            for key, value in flat.items():
                self.tb.add_scalar(key, value, self.last_step)
            self.tb.flush()
        if self.wandb_run is not None and flat:
            self.wandb_run.summary.update(flat)

    def close(self, exit_code: int = 0) -> None:
        """Flush and close every tracker, recording how the job ends (safe to call twice).

        exit_code: the job's exit status. Called from a `finally` that an exception is passing through, a 0
        becomes that exception's status (`exit_status`), so a crash or Ctrl-C never shows as a success. W&B
        marks a run with a non-zero code as failed (`finish(exit_code=...)`); TensorBoard gets the code as the
        scalar `run/exit_code` and a `status` text at the last step."""
        if exit_code == 0:
            exit_code = exit_status(sys.exc_info()[1])
        if self.tb is not None:
            status = "finished" if exit_code == 0 else "failed"
            self.tb.add_scalar(EXIT_CODE_TAG, exit_code, self.last_step)
            self.tb.add_text("status", f"{status} (exit code {exit_code})", self.last_step)
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def exit_status(exc: BaseException | None) -> int:
    """The exit status a Python process ends with when `exc` escapes it: 0 for none, SystemExit's code,
    130 for KeyboardInterrupt (128 + SIGINT, what a shell reports for Ctrl-C), 1 for any other exception."""
    if exc is None:
        return 0
    if isinstance(exc, SystemExit):
        code = exc.code
        return int(code) if isinstance(code, int) else (0 if code is None else 1)  # sys.exit("msg") exits 1
    return 130 if isinstance(exc, KeyboardInterrupt) else 1
