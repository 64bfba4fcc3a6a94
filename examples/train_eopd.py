"""Entropy-Aware On-Policy Distillation on Ray (Algorithm 1 of Jin et al. 2026): the main recipe.

    python examples/train_eopd.py                                  # embedded default: tiny models, CPU
    python examples/train_eopd.py loss.objective=opd --out runs/opd
    python examples/train_eopd.py --config examples/configs/tiny_eopd.yaml trainer.max_steps=3
    python examples/train_eopd.py --resume runs/eopd-default        # continue the last checkpoint

Build (config, models, data: all checked before Ray starts) -> loop (generate, score, train, sync, log,
checkpoint; `actors/driver/`) -> evaluate teacher / initial student / trained student -> results.json and
plots -> clean up. Exit status: 2 bad input, 3 non-finite loss (trainer.on_nonfinite=stop), 4 the engines do
not hold the student's weights after a sync, 5 the cluster cannot place the actors (trainer.place_wait_s),
1 too many actor failures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from actors.driver.build import init_ray  # noqa: E402  (importing actors first keeps a local Ray on 127.0.0.1)
from actors.driver.evaluation import evaluate_models  # noqa: E402
from actors.driver.loop import TooManyRestarts, train  # noqa: E402
from actors.driver.prepare import open_run, prepare  # noqa: E402
from actors.driver.session import Session  # noqa: E402
from actors.runtime.group import PlacementTimeout  # noqa: E402
from actors.student.trainer import NonFiniteLossError  # noqa: E402
from actors.sync.check import SyncCheckError  # noqa: E402
from eopd_ray.evaluation import eval_report  # noqa: E402
from eopd_ray.placement import format_plan  # noqa: E402
from eopd_ray.plots import entropy_histograms, training_curves  # noqa: E402
from eopd_ray.run_io import write_results, write_samples  # noqa: E402
from eopd_ray.run_setup import SETUP_ERRORS, resolve_config  # noqa: E402

import ray  # noqa: E402,I001


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.objective=opd trainer.max_steps=3")
    p.add_argument("--config", help="YAML preset (see examples/configs/)")
    p.add_argument("--out", help="output directory (overrides out_dir)")
    p.add_argument("--resume", help="run directory (or checkpoint) to continue from")
    p.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="checkpoint and stop after step N as if interrupted (resume later with --resume)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv=None) -> int:
    args = parse_args(argv)
    # ---- build: everything that can be wrong is checked before Ray starts ----------------------------
    try:
        cfg = resolve_config(args.config, args.overrides, args.out, args.resume)
        if args.dry_run:
            print(json.dumps(cfg.to_dict(), indent=2))
            print(format_plan(cfg), file=sys.stderr)  # stdout stays pure JSON for tools
            return 0
        run = prepare(cfg, args.resume)
        log = open_run(run)  # metrics.jsonl and the trackers of logging.trackers
    except SETUP_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init_ray(cfg.ray_address)
    code, session = 0, None  # code: the exit status the trackers record (an escaping exception: failed too)
    try:
        # ---- actors, then the loop: generate -> score -> train -> sync -> log -> checkpoint ------------
        try:
            session = Session.build(run.cfg, run.models, run.ckpt)  # run.cfg: with what the models resolved
            finished = train(run, session, log, stop_after=args.stop_after)
        except PlacementTimeout as exc:
            print(f"error: {exc}", file=sys.stderr)
            return (code := 5)
        except SyncCheckError as exc:
            print(f"error: {exc}; the rollout engines do not hold the student's weights (set "
                  "placement.check_sync=false to skip this check)", file=sys.stderr)
            return (code := 4)
        except NonFiniteLossError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return (code := 3)
        except TooManyRestarts as exc:
            print(f"error: {exc}", file=sys.stderr)
            return (code := 1)
        # ---- evaluate teacher, initial and trained student; write results ------------------------------
        results = evaluate_models(session, run.eval_recs) if finished and cfg.eval.enabled else {}
        report = eval_report(results, cfg.eval.high_entropy_threshold, cfg.eval.show_samples) if results else []
        for line in report:
            print(line)
        if results:
            write_samples(run.out_dir, results, [r.prompt for r in run.eval_recs])  # every decoded response
            entropy_histograms(results, run.out_dir / "entropy_hist.png", cfg.eval.high_entropy_threshold)
        if log.rows:
            training_curves(log.rows, run.out_dir / "training_curves.png", f"{cfg.loss.objective} on {cfg.model.student}")
        if finished:
            print(f"wrote {write_results(run.out_dir, cfg, log.rows, results, report)}")
        log.trackers.log_eval(results)
    finally:
        # ---- clean up -----------------------------------------------------------------------------------
        log.trackers.close(code)  # a failed or interrupted run shows as failed, with its exit status
        if session is not None:  # None: Session.build failed
            session.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
