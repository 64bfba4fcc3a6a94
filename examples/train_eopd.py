"""Entropy-Aware On-Policy Distillation on Ray (Algorithm 1 of Jin et al. 2026).

    python examples/train_eopd.py                                  # embedded default: tiny models, CPU
    python examples/train_eopd.py loss.objective=opd --out runs/opd
    python examples/train_eopd.py --config examples/configs/tiny_eopd.yaml trainer.max_steps=3
    python examples/train_eopd.py --resume runs/eopd-default        # continue the last checkpoint

Build (config, models, data: all checked before Ray starts) -> loop (generate, score, train, sync, log,
checkpoint) -> evaluate teacher / initial student / trained student -> results.json and plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
# Before `import ray`: keep a local Ray on 127.0.0.1 rather than the machine's network address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from tqdm import tqdm  # noqa: E402

from actors.runtime.group import ActorGroup  # noqa: E402
from actors.driver.build import (ResolvedModels, build_rollouts, build_students, build_teachers,  # noqa: E402
                                 build_weight_sync, init_ray)
from actors.driver.evaluation import evaluate_on_workers  # noqa: E402
from actors.sync.check import SyncCheckError  # noqa: E402
from actors.rollout.engine import SamplingParams  # noqa: E402
from actors.driver.scoring import score_rollouts  # noqa: E402
from actors.student.trainer import NonFiniteLossError  # noqa: E402
from actors.sync.base import WeightSync  # noqa: E402
from eopd_ray import checkpoint  # noqa: E402
from eopd_ray.batch import list_rows  # noqa: E402
from eopd_ray.config import OFF_POLICY_OBJECTIVES, ConfigError, apply_overrides, config_from_dict, load_config  # noqa: E402
from eopd_ray.data import DataError, PromptSampler, load_rows, synthetic_rows, tokenize_rows  # noqa: E402
from eopd_ray.models import architecture_mismatch, load_tokenizer, output_rows  # noqa: E402
from eopd_ray.placement import format_plan, plan_placement  # noqa: E402
from eopd_ray.plots import entropy_histograms, training_curves  # noqa: E402
from eopd_ray.run_io import MetricsLog, OutputDirError, check_out_dir, save_config, write_results  # noqa: E402
from eopd_ray.vocab import VocabMismatchError, shared_vocab_size  # noqa: E402

KEEP_CHECKPOINTS = 2


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


def resolve_config(args):
    if args.resume and not args.config and (Path(args.resume) / "config.json").exists():
        saved = json.loads((Path(args.resume) / "config.json").read_text())
        cfg = apply_overrides(config_from_dict(saved), args.overrides)  # the saved run, then the CLI
    else:
        cfg = load_config(args.config, args.overrides)
    if args.out:
        cfg.out_dir = args.out
    elif args.resume:
        cfg.out_dir = args.resume
    return cfg.validate()


def resolve_models(cfg) -> ResolvedModels:
    teacher, student = cfg.model.teacher, cfg.model.student
    if "tiny" in (teacher, student):
        from eopd_ray.tiny_models import ensure_tiny_models

        tiny_teacher, tiny_student = ensure_tiny_models(cache_dir=cfg.model.tiny_cache_dir or None)
        teacher = tiny_teacher if teacher == "tiny" else teacher
        student = tiny_student if student == "tiny" else student
    trc = cfg.model.trust_remote_code
    t_tok, s_tok = load_tokenizer(teacher, trc), load_tokenizer(student, trc)
    vocab = shared_vocab_size(t_tok, s_tok, output_rows(teacher, trc), output_rows(student, trc))
    return ResolvedModels(str(teacher), str(student), vocab, s_tok.pad_token_id), s_tok


def load_data(cfg, tokenizer):
    d = cfg.data
    train = load_rows(d.train_path, d.prompt_key, d.answer_key) if d.train_path else \
        synthetic_rows(d.num_train_problems, d.seed, "train")
    held = load_rows(d.eval_path, d.eval_prompt_key or d.prompt_key, d.eval_answer_key or d.answer_key) \
        if d.eval_path else \
        synthetic_rows(d.num_eval_problems, d.seed, "test")
    train_recs = tokenize_rows(train, tokenizer, d.max_prompt_tokens, d.train_path or "synthetic train split",
                               d.prompt_suffix)
    eval_recs = tokenize_rows(held[:d.num_eval_problems], tokenizer, d.max_prompt_tokens,
                              d.eval_path or "synthetic test split", d.prompt_suffix + d.eval_prompt_suffix)
    return PromptSampler(train_recs, cfg.trainer.batch_size, d.seed), eval_recs


def find_checkpoint(resume: str | None) -> Path | None:
    if not resume:
        return None
    path = Path(resume)
    ckpt = path if checkpoint.is_complete(path) else checkpoint.latest(path / "checkpoints")
    if ckpt is None:
        raise checkpoint.CheckpointError(f"--resume {resume}: no complete checkpoint found (looked for {path}/checkpoints/"
                                "step_*/MANIFEST.json); start without --resume or point at a run directory")
    return ckpt


def save_checkpoint(out_dir: Path, step: int, students, sampler) -> Path:
    root = out_dir / "checkpoints"
    tmp = checkpoint.begin(root, step)
    try:
        students.run("save", str(tmp))
        checkpoint.write_json_atomic(tmp / "driver_state.json", {"step": step, "sampler": sampler.state_dict()})
        final = checkpoint.commit(tmp, step, meta={"student_hf": "hf"})
    except BaseException:
        checkpoint.abort(tmp)
        raise
    done = sorted((p for p in root.glob("step_*") if checkpoint.is_complete(p)), key=lambda p: p.name)
    for old in done[:-KEEP_CHECKPOINTS]:
        checkpoint.abort(old)
    return final


def evaluate(cfg, actors, models, eval_recs, model_path: str | None, seed: int) -> dict:
    """Avg@k / Pass@k of `model_path` (None: the trained weights the workers hold). A rollout worker that dies
    leaves, and the evaluation is redone by the others or by replacements given the trained weights."""
    params = SamplingParams(cfg.eval.temperature, cfg.eval.top_p, cfg.rollout.max_new_tokens, seed)
    while True:
        try:
            return evaluate_on_workers(actors.rollouts, [r.prompt_ids for r in eval_recs],
                                       [r.answer for r in eval_recs], cfg.eval.k, params,
                                       cfg.eval.high_entropy_threshold, model_path)
        except ACTOR_DIED:
            if not recover_rollout_workers(cfg, actors, "during evaluation",
                                           None if actors.on_policy else models.student_path):
                raise


ACTOR_DIED = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError,
              ray.exceptions.WorkerCrashedError)


@dataclass
class Actors:
    rollouts: ActorGroup
    teachers: ActorGroup
    students: ActorGroup
    sync: WeightSync
    on_policy: bool  # False for off-policy KD: the rollout workers keep the teacher
    sync_checked: bool = False  # the engines' log-probs were compared with the student's after a sync

    def shutdown(self) -> None:
        for group in (self.rollouts, self.teachers, self.students):
            group.shutdown()


def build_actors(cfg, models, ckpt: Path | None) -> Actors:
    """Rollout, teacher and student groups; the student (and the rollout copy) restored from `ckpt`."""
    t0 = time.perf_counter()
    rollouts, teachers = build_rollouts(cfg, models), build_teachers(cfg, models)
    students = build_students(cfg, models)
    actors = Actors(rollouts, teachers, students, build_weight_sync(cfg, students, rollouts),
                    cfg.loss.objective not in OFF_POLICY_OBJECTIVES)
    if ckpt is not None:
        students.run("load", str(ckpt))
        if actors.on_policy:
            actors.sync.sync()
    ray.get(rollouts.call("ping") + teachers.call("ping"))
    print(f"actors ready in {time.perf_counter() - t0:.1f} s: {len(rollouts)} rollout, {len(teachers)} teacher, "
          f"{len(students)} student rank(s)")
    return actors


def restore_driver_state(ckpt: Path | None, sampler) -> int:
    """Data position and step of a checkpoint (or of a fresh start); returns the step to run next."""
    if ckpt is None:
        sampler.load_state_dict({"epoch": 0, "position": 0})
        return 0
    state = json.loads((ckpt / "driver_state.json").read_text())
    sampler.load_state_dict(state["sampler"])
    return int(state["step"])


def admit_rollout_workers(cfg, actors: Actors, wait_s: float = 0.0, student_path: str | None = None) -> int:
    """Bring the rollout group back to rollout.num_workers when the cluster can place workers again (an
    elastic cluster scaling up); new workers get the current student weights (after loading `student_path`
    when they start with another model: off-policy KD's workers hold the teacher until the evaluation).
    Returns how many joined."""
    joined = actors.rollouts.grow(cfg.rollout.num_workers, wait_s)
    if joined:
        if student_path:
            ray.get([a.load_model.remote(student_path) for a in joined])
        if actors.on_policy or student_path:
            actors.sync.sync()
        tqdm.write(f"[elastic] {len(joined)} rollout worker(s) joined; {len(actors.rollouts)} working")
    return len(joined)


def recover_rollout_workers(cfg, actors: Actors, where: str, student_path: str | None = None) -> bool:
    """After an actor error: drop the rollout workers that died and admit replacements (waiting for one when
    none is left). False when no rollout worker died (the error is another actor's) or none is working."""
    lost = actors.rollouts.drop_dead()
    if not lost:
        return False
    tqdm.write(f"[elastic] {lost} rollout worker(s) left {where}; {len(actors.rollouts)} still working")
    admit_rollout_workers(cfg, actors, 600.0 if not actors.rollouts.actors else 0.0, student_path)
    return bool(actors.rollouts.actors)


def rollout_phase(cfg, actors: Actors, step: int, prompts: list) -> tuple[list, list[dict]]:
    """Sample one iteration's responses, split over the live rollout workers. A worker that dies leaves the
    group and the phase is redone by the others (or by replacements when none is left): no student state
    has changed yet, so nothing needs replaying from a checkpoint."""
    while True:
        workers = actors.rollouts.actors
        bounds = np.linspace(0, len(prompts), len(workers) + 1).astype(int)  # shards differ by at most one
        shards = [prompts[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        roll = [a.rollout.options(num_returns=2).remote(
            [r.id for r in s], [r.prompt_ids for r in s], [r.answer for r in s],
            SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens,
                           seed=cfg.trainer.seed * 1_000_003 + step * 1009 + i), cfg.rollout.n_samples_per_prompt)
            for i, (a, s) in enumerate(zip(workers, shards)) if s]
        try:
            return [r[0] for r in roll], ray.get([r[1] for r in roll])
        except ACTOR_DIED:
            if not recover_rollout_workers(cfg, actors, f"at step {step + 1}"):
                raise


def iteration(cfg, actors: Actors, step: int, prompts: list) -> dict:
    """One step of Algorithm 1: generate, score, train, sync. Payloads move between actors as refs."""
    t0 = time.perf_counter()
    rollout_refs, rollout_stats = rollout_phase(cfg, actors, step, prompts)
    t1 = time.perf_counter()
    teacher_refs, teacher_stats = score_rollouts(actors.teachers, rollout_refs, cfg.teacher.zero_stage == 3)
    t2 = time.perf_counter()
    train_metrics = actors.students.run("train_step", step, len(rollout_refs), *rollout_refs, *teacher_refs)[0]
    t3 = time.perf_counter()
    sync_metrics = actors.sync.sync() if actors.on_policy else {}
    if actors.on_policy and cfg.placement.check_sync and not actors.sync_checked:
        sync_metrics.update(check_sync(cfg, actors, rollout_refs[0]))
    row = {"step": step + 1, **train_metrics, **sync_metrics, "rollout/workers": len(rollout_refs)}
    for stats in (rollout_stats, teacher_stats):
        for key in stats[0]:
            row[key] = sum(s[key] for s in stats) / len(stats)
    row.update({"time/rollout": t1 - t0, "time/score": t2 - t1, "time/train_phase": t3 - t2,
                "time/step": time.perf_counter() - t0})
    return row


def check_sync(cfg, actors: Actors, rollout_ref, rows: int = 4) -> dict:
    """After the first sync of these actors: the engines' teacher-forced log-probs of a few sampled rows equal
    the student's (`WeightSync.verify`), so a sync that silently sends nothing or the wrong tensors stops the
    run at its first step rather than training on stale samples."""
    table = ray.get(rollout_ref).slice(0, rows)
    pairs = [(p, r) for p, r in zip(list_rows(table.column("prompt_ids")), list_rows(table.column("response_ids")))
             if len(r)]
    # the limits follow the dtype engines and student run in (float32: rounding only; bf16: kernel noise)
    metrics = actors.sync.verify([p for p, _ in pairs], [r for _, r in pairs], cfg.model.dtype)
    actors.sync_checked = bool(metrics)  # no response tokens in these rows: check after the next sync
    return metrics


def eval_report(results: dict, threshold: float) -> list[str]:
    """One line per model, then how each student's share of high-entropy tokens compares with the teacher's
    (n/a where the engine gives no entropies: vLLM)."""
    share = {n: r["high_entropy_fraction"] for n, r in results.items()
             if r["high_entropy_fraction"] is not None and np.isfinite(r["high_entropy_fraction"])}
    lines = [f"eval {name:16s} Avg@{r['k']}={r['avg_at_k']:.3f} Pass@{r['k']}={r['pass_at_k']:.3f} "
             f"tokens with entropy >= {threshold:g}: "
             + (f"{100 * share[name]:.1f}%" if name in share else "n/a (the engine gives no entropies)")
             for name, r in results.items()]
    teacher = share.get("teacher")  # absent with eval.teacher=false or a vLLM engine
    for name in ("student_initial", "student") if teacher is not None else ():
        frac = share[name]
        lines.append(f"{name} keeps {frac / teacher:.2f}x the teacher's share of high-entropy tokens "
                     f"({100 * frac:.1f}% vs {100 * teacher:.1f}%)" if teacher > 0 else
                     f"{name}: {100 * frac:.1f}% high-entropy tokens; the teacher has none")
    gain = results["student"]["avg_at_k"] - results["student_initial"]["avg_at_k"]
    lines.append(f"training changed Avg@k by {gain:+.3f} ({results['student_initial']['avg_at_k']:.3f} -> "
                 f"{results['student']['avg_at_k']:.3f})")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    # ---- build: everything that can be wrong is checked before Ray starts ----------------------------
    try:
        cfg = resolve_config(args)
        if args.dry_run:
            print(json.dumps(cfg.to_dict(), indent=2))
            print(format_plan(cfg), file=sys.stderr)  # stdout stays pure JSON for tools
            return 0
        ckpt = find_checkpoint(args.resume)
        if ckpt is None and cfg.auto_resume:
            ckpt = checkpoint.latest(Path(cfg.out_dir) / "checkpoints")
            print(f"auto_resume: {'found ' + str(ckpt) if ckpt else 'no checkpoint in ' + cfg.out_dir + ', starting fresh'}")
        out_dir = check_out_dir(cfg.out_dir)
        models, tokenizer = resolve_models(cfg)
        if ckpt is not None and (diff := architecture_mismatch(str(ckpt / "hf"), models.student_path)):
            raise checkpoint.CheckpointError(f"checkpoint {ckpt} belongs to another model ({'; '.join(diff)}); resume "
                                    "with the model.student it was trained from, or start a new --out")
        sampler, eval_recs = load_data(cfg, tokenizer)
        if cfg.rollout.engine == "vllm":  # installed, and able to serve both models (teacher: evaluation, kd)
            from actors.rollout.vllm_engine import check_servable

            check_servable([models.student_path, models.teacher_path], cfg.model.trust_remote_code,
                           not plan_placement(cfg).has_gpus)
    except (ConfigError, DataError, VocabMismatchError, OutputDirError, checkpoint.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("resolved config:\n" + json.dumps(cfg.to_dict(), indent=2))
    print(format_plan(cfg))
    save_config(cfg, out_dir)
    start_step = restore_driver_state(ckpt, sampler)
    if ckpt is not None:
        print(f"resuming from {ckpt} at step {start_step}")
    log = MetricsLog(out_dir / "metrics.jsonl", resume_step=start_step if ckpt is not None else None)

    init_ray(cfg.ray_address)
    actors = build_actors(cfg, models, ckpt)

    # ---- loop: generate -> score -> train -> sync -> log ------------------------------------------------
    t = cfg.trainer
    step, restarts = start_step, 0
    bar = tqdm(total=t.max_steps, initial=start_step, desc=cfg.loss.objective.upper(), unit="step")
    while step < t.max_steps:
        prompts = sampler.next_batch()
        try:
            admit_rollout_workers(cfg, actors, cfg.rollout.join_wait_s if actors.rollouts.pending else 0.0)
            row = iteration(cfg, actors, step, prompts)
            row.update({f"data/{k}": v for k, v in sampler.state_dict().items() if k != "seed"})  # after this batch
        except ACTOR_DIED as exc:  # a worker process died: rebuild everything from the last checkpoint
            restarts += 1
            ckpt = checkpoint.latest(out_dir / "checkpoints")
            if restarts > t.max_restarts:
                raise SystemExit(f"error: {restarts} actor failures (trainer.max_restarts={t.max_restarts}); "
                                 f"last good checkpoint: {ckpt or 'none'}. Last failure: {exc}") from None
            tqdm.write(f"[fault] {type(exc).__name__} at step {step + 1}: {str(exc).splitlines()[0]}; restart "
                       f"{restarts}/{t.max_restarts}: rebuilding the actors from {ckpt or 'the initial weights'}")
            actors.shutdown()
            actors = build_actors(cfg, models, ckpt)
            step = restore_driver_state(ckpt, sampler)
            log.truncate(step)
            bar.n = step
            bar.refresh()
            continue
        except SyncCheckError as exc:
            print(f"error: {exc}; the rollout engines do not hold the student's weights (set "
                  "placement.check_sync=false to skip this check)", file=sys.stderr)
            actors.shutdown()
            return 4
        except ray.exceptions.RayTaskError as exc:
            if not isinstance(exc.cause, NonFiniteLossError):
                raise
            print(f"error: {exc.cause}", file=sys.stderr)  # trainer.on_nonfinite=stop
            actors.shutdown()
            return 3
        log.append(row)
        bar.update(1)
        bar.set_postfix({"loss": f"{row.get('loss/total', float('nan')):.3f}", "acc": f"{row['rollout/accuracy']:.2f}",
                         "gate": f"{row.get('gate/fraction', 0):.2f}", "H_s": f"{row.get('student/entropy', 0):.2f}"})
        tqdm.write(" ".join(f"{k}={v:.4g}" for k, v in row.items() if not k.startswith("time/")
                            and k != "step") + f"  [step {step + 1}, {row['time/step']:.1f}s]")
        step += 1
        stop_now = args.stop_after and step >= args.stop_after
        if (t.save_every and step % t.save_every == 0) or step == t.max_steps or stop_now:
            save_checkpoint(out_dir, step, actors.students, sampler)
        if stop_now:
            print(f"stopping after step {step} (--stop-after); continue with --resume {out_dir}")
            break
    bar.close()
    interrupted = bool(args.stop_after) and args.stop_after < t.max_steps

    # ---- evaluate teacher, initial and trained student; write results ----------------------------------
    eval_results = {}
    rollouts = actors.rollouts
    if cfg.eval.enabled and not interrupted:
        if not actors.on_policy:  # the rollout workers held the teacher: give them the student, then its weights
            rollouts.run("load_model", models.student_path)
            actors.sync.sync()
        seed = t.seed + 777
        eval_results["student"] = evaluate(cfg, actors, models, eval_recs, None, seed)
        eval_results["student_initial"] = evaluate(cfg, actors, models, eval_recs, models.student_path, seed)
        if cfg.eval.teacher:
            eval_results["teacher"] = evaluate(cfg, actors, models, eval_recs, models.teacher_path, seed)
        for line in eval_report(eval_results, cfg.eval.high_entropy_threshold):
            print(line)
        entropy_histograms(eval_results, out_dir / "entropy_hist.png", cfg.eval.high_entropy_threshold)
    if log.rows:
        training_curves(log.rows, out_dir / "training_curves.png", f"{cfg.loss.objective} on {cfg.model.student}")
    if not interrupted:
        report = eval_report(eval_results, cfg.eval.high_entropy_threshold) if eval_results else []
        print(f"wrote {write_results(out_dir, cfg, log.rows, eval_results, report)}")

    # ---- clean up -------------------------------------------------------------------------------------
    actors.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
