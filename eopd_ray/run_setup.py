"""What a run needs before Ray starts, each piece checked: the resolved config, the models (local paths and
the shared vocabulary), the prompts, and the checkpoint to resume from. No Ray, no actors."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eopd_ray import checkpoint
from eopd_ray.checkpoint import write_json_atomic
from eopd_ray.config import ConfigError, RunConfig, apply_overrides, config_from_dict, load_config
from eopd_ray.data import DataError, PromptRecord, PromptSampler, load_rows, synthetic_rows, tokenize_rows
from eopd_ray.model_sources import ModelSourceError, resolve_source
from eopd_ray.models import architecture_mismatch, load_tokenizer, output_rows
from eopd_ray.pruning import ensure_pruned_student, format_report
from eopd_ray.objectives import resolve_logits_chunk
from eopd_ray.run_io import OutputDirError, check_out_dir
from eopd_ray.teacher_config import group_config, route_index, teacher_groups
from eopd_ray.teacher_context import first_difference, render_prompt, resolve_end_swap, teacher_prompt_ids
from eopd_ray.tracking import TrackerError
from eopd_ray.vocab import VocabMismatchError, real_vocab_size, shared_vocab_size

# What `prepare_run` raises for bad input (the message names the value and the fix); a recipe prints it and
# exits with status 2 before anything has started.
SETUP_ERRORS = (ConfigError, DataError, VocabMismatchError, OutputDirError, checkpoint.CheckpointError,
                TrackerError)


@dataclass
class ResolvedModels:
    """Local paths of teacher and student and their shared (real) vocabulary."""

    teacher_path: str
    student_path: str
    vocab_size: int
    pad_id: int
    end_swap: tuple[int, int] | None = None  # teacher.eos_remap resolved: (student end id, teacher end id)
    # (the token the student's responses end with, the teacher's end of turn): the remap's pair when one is
    # set, else the two tokenizers' EOS; and their token strings
    end_ids: tuple[int | None, int | None] = (None, None)
    end_names: tuple[str, str] = ("", "")
    # teacher.tokenizer=cross: the teacher's own real vocabulary (vocab_size is then the student's); else None
    teacher_vocab_size: int | None = None
    # several teachers (`teachers`): every group's own, in order (this one is the first's); () with one teacher
    groups: tuple = ()


@dataclass
class RunSetup:
    cfg: RunConfig
    models: ResolvedModels
    sampler: PromptSampler  # training prompts, positioned at the step to run next
    eval_recs: list[PromptRecord]  # held-out problems of the final evaluation
    out_dir: Path
    ckpt: Path | None  # the checkpoint resumed from, or None
    start_step: int


def resolve_config(config: str | None, overrides: list[str], out: str | None = None,
                   resume: str | None = None) -> RunConfig:
    """Defaults, the YAML preset, the overrides; when resuming a run without --config, its saved config
    replaces the defaults and preset. Validated."""
    if resume and not config and (Path(resume) / "config.json").exists():
        saved = json.loads((Path(resume) / "config.json").read_text())
        cfg = apply_overrides(config_from_dict(saved), overrides)  # the saved run, then the command line
    else:
        cfg = load_config(config, overrides)
    if out:
        cfg.out_dir = out
    elif resume:
        cfg.out_dir = resume
    return cfg.validate()


def _source(spec: str, role: str, tiny: dict, cfg: RunConfig) -> str:
    """A local directory or hub name for model.<role> (`tiny` built once, a GGUF converted once)."""
    if spec == "tiny":
        if not tiny:
            from eopd_ray.tiny_models import VARIANTS, ensure_tiny_models

            tiny["teacher"], tiny["student"] = ensure_tiny_models(cache_dir=cfg.model.tiny_cache_dir or None,
                                                                  cfg=VARIANTS[cfg.model.tiny_variant])
        return str(tiny[role])
    return resolve_source(spec)


def _tokenizer(path: str, role: str, trc: bool):
    """The tokenizer at `path`, or a setup error naming the model field when it cannot be loaded or its chat
    template cannot render a user message (tried once here, before any data is read or actor started)."""
    try:
        tok = load_tokenizer(path, trc)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"model.{role}={path!r}: cannot load its tokenizer ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a local HF directory with "
                               "tokenizer files, a .gguf file, gguf:PACKAGE, or a hub name already in the local "
                               "hub cache (nothing is downloaded at run time here)") from None
    try:
        render_prompt(tok, "1 + 1 =")
    except Exception as exc:  # jinja2's TemplateError and whatever a template raises (raise_exception)
        raise ModelSourceError(f"model.{role}={path!r}: its chat template cannot render a user message "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); fix "
                               "`chat_template` in its tokenizer_config.json (or chat_template.jinja), or remove it "
                               "to use raw prompts") from None
    return tok


def resolve_models(cfg: RunConfig, out_dir: Path | None = None):
    """(ResolvedModels, the student's tokenizer). `tiny` is built (once) and cached, a GGUF converted (once),
    and `pruned` made from the (first) teacher (layer scores on the training prompts, written to
    out_dir/prune.json). With several teachers the result is the first one's, each group's in `groups`."""
    tiny: dict = {}
    trc = cfg.model.trust_remote_code
    groups = teacher_groups(cfg)
    teachers = [_source(g.model, "teacher", tiny, cfg) for g in groups]
    t_toks = [_tokenizer(t, "teacher", trc) for t in teachers]
    if cfg.model.student == "pruned":
        student = prune_student(cfg, teachers[0], t_toks[0], out_dir)
    else:
        student = _source(cfg.model.student, "student", tiny, cfg)
    s_tok = _tokenizer(student, "student", trc)
    resolved = [_pair(group_config(cfg, g), str(t), t_tok, str(student), s_tok)
                for g, t, t_tok in zip(groups, teachers, t_toks)]
    for g, m in zip(groups, resolved):
        if m.vocab_size != resolved[0].vocab_size:
            raise VocabMismatchError(f"teacher {g.name!r} ({m.teacher_path}) shares {m.vocab_size} token ids with the "
                                     f"student, teacher {groups[0].name!r} {resolved[0].vocab_size}: every teacher must "
                                     "score over one student vocabulary; use teachers with the same tokenizer, or "
                                     "tokenizer: cross")
    if len(resolved) > 1:
        resolved[0] = dataclasses.replace(resolved[0], groups=tuple(resolved))
    return resolved[0], s_tok


def _pair(cfg: RunConfig, teacher: str, t_tok, student: str, s_tok) -> ResolvedModels:
    """One teacher (cfg.model.teacher at `teacher`) and the student: the vocabulary they are compared over and
    the end tokens the teacher's context needs."""
    trc = cfg.model.trust_remote_code
    teacher_vocab = None
    if cfg.teacher.tokenizer == "cross":  # each side's own vocabulary; the teacher's is aligned to it by bytes
        vocab = real_vocab_size(s_tok, output_rows(student, trc), "student")
        teacher_vocab = real_vocab_size(t_tok, output_rows(teacher, trc), "teacher")
        check_cross_tokenizers(s_tok, t_tok)
    else:
        vocab = shared_vocab_size(t_tok, s_tok, output_rows(teacher, trc), output_rows(student, trc))
    swap = resolve_end_swap(cfg.teacher.eos_remap, s_tok, t_tok)
    # cross: the teacher's top-k comes back in student ids, its EOS mapped onto the student's
    ends = swap or (s_tok.eos_token_id, s_tok.eos_token_id if teacher_vocab else t_tok.eos_token_id)
    return ResolvedModels(teacher, student, vocab, s_tok.pad_token_id, end_swap=swap,
                          end_ids=ends, end_names=tuple(s_tok.convert_ids_to_tokens(i) if i is not None else ""
                                                        for i in ends), teacher_vocab_size=teacher_vocab)


def model_groups(cfg: RunConfig, models: ResolvedModels) -> list[tuple[str, RunConfig, ResolvedModels]]:
    """(name, single-teacher config, resolved models) of every teacher group, in `teachers` order."""
    return [(g.name, group_config(cfg, g), m) for g, m in zip(teacher_groups(cfg), models.groups or (models,))]


def check_cross_tokenizers(student_tok, teacher_tok) -> None:
    """Both tokenizers' pieces can be read as bytes and the teacher's keeps the text it encodes; else a setup
    error naming the model and the reason (before any actor starts)."""
    from eopd_ray.cross_tokenizer import ResponseEncoder, TokenBytes, TokenizerSchemeError

    for role, check, tok in (("student", TokenBytes, student_tok), ("teacher", ResponseEncoder, teacher_tok)):
        try:
            check(tok)
        except TokenizerSchemeError as exc:
            raise VocabMismatchError(f"model.{role}: teacher.tokenizer=cross cannot use its tokenizer: {exc}") from None


def prune_student(cfg: RunConfig, teacher: str, tokenizer, out_dir: Path | None) -> str:
    """The student `model.student=pruned` names: the teacher less the layers `model.prune_*` choose, scored on
    the first training prompts."""
    m = cfg.model
    calib = load_data(cfg, tokenizer, teacher_context=False)[0].records[:m.prune_calibration_prompts]
    path, report = ensure_pruned_student(teacher, m.prune_method, m.prune_layers, [r.prompt_ids for r in calib],
                                         trust_remote_code=m.trust_remote_code)
    print(format_report(report))
    if out_dir is not None:
        write_json_atomic(out_dir / "prune.json", report)
    return path


def load_data(cfg: RunConfig, tokenizer, teacher_tokenizers=None, teacher_context: bool = True) -> tuple[PromptSampler, list[PromptRecord]]:
    """(sampler over the training prompts, held-out records), tokenised and length-checked, each routed to its
    teacher group (`routing`; `PromptRecord.teacher`); training and held-out records carry their teacher's own
    prompt where its prompt_template / system_prompt ask for one (the teacher scores, generates in `kd`, and is
    evaluated after it). teacher_tokenizers: a list with one per teacher group, or one tokenizer for every
    group (None: the student's renders). teacher_context=False: the student's records only (no teacher prompts,
    nothing printed), for what reads the student's prompts alone (pruning's calibration)."""
    d, key = cfg.data, cfg.routing.field
    train = load_rows(d.train_path, d.prompt_key, d.answer_key, key) if d.train_path else \
        synthetic_rows(d.num_train_problems, d.seed, "train")
    if d.train_skip_rows:
        # the rows keep their file position as id, so held-out and training ids never coincide
        train = [{**r, "id": i if r.get("id") is None else r["id"]} for i, r in enumerate(train)][d.train_skip_rows:]
        if not train:
            raise DataError(f"{d.train_path}: data.train_skip_rows={d.train_skip_rows} skips every row; lower it "
                            "or add rows")
    held = load_rows(d.eval_path, d.eval_prompt_key or d.prompt_key, d.eval_answer_key or d.answer_key, key) \
        if d.eval_path else synthetic_rows(d.num_eval_problems, d.seed, "test")
    train_recs = tokenize_rows(train, tokenizer, d.max_prompt_tokens, d.train_path or "synthetic train split",
                               d.prompt_suffix)
    eval_recs = tokenize_rows(held[:d.num_eval_problems], tokenizer, d.max_prompt_tokens,
                              d.eval_path or "synthetic test split", d.prompt_suffix + d.eval_prompt_suffix)
    groups = teacher_groups(cfg)
    names = [g.name for g in groups]
    if teacher_tokenizers is not None and not isinstance(teacher_tokenizers, (list, tuple)):
        teacher_tokenizers = [teacher_tokenizers] * len(groups)
    for recs, rows, source in ((train_recs, train, d.train_path or "synthetic train split"),
                               (eval_recs, held, d.eval_path or "synthetic test split")):
        for rec, row in zip(recs, rows):
            if key and "route" not in row:
                raise DataError(f"{source}: routing.field={key!r} needs a data file with that field (the synthetic "
                                "task has none); set data.train_path / data.eval_path, or routing.field=''")
            try:
                rec.teacher = route_index(rec.id, rec.prompt, row.get("route"), names, cfg.routing,
                                          f"{source} row id {rec.id}")
            except ValueError as exc:
                raise DataError(str(exc)) from None
    for i, group in enumerate(groups if teacher_context else ()):
        own = teacher_tokenizers[i] if teacher_tokenizers else None
        gcfg = group_config(cfg, group)
        mine = [r for r in train_recs if r.teacher == i]
        renderer = attach_teacher_prompts(mine, d.prompt_suffix, gcfg, tokenizer, own)
        attach_teacher_prompts([r for r in eval_recs if r.teacher == i], d.prompt_suffix + d.eval_prompt_suffix, gcfg,
                               tokenizer, own)
        if renderer is None or not mine:
            continue
        rec = mine[0]
        ids = rec.prompt_ids if rec.teacher_prompt_ids is None else rec.teacher_prompt_ids
        at = first_difference(rec.prompt_ids, ids)
        print(f"teacher context{f' ({group.name})' if len(groups) > 1 else ''}: " + (
              "the teacher reads the student's prompts unchanged" if at < 0 else
              f"the teacher's prompt differs from the student's from token {at} on (student: "
              f"{tokenizer.decode(rec.prompt_ids[at:at + 8])!r}, teacher: {renderer.decode(ids[at:at + 8])!r})"))
    if len(groups) > 1 and teacher_context:
        counts = ", ".join(f"{g.name} {sum(r.teacher == i for r in train_recs)}" for i, g in enumerate(groups))
        print(f"routing ({f'field {key!r}' if key else f'rule {cfg.routing.rule}'}): training prompts per teacher: "
              f"{counts}")
    return PromptSampler(train_recs, cfg.trainer.batch_size, d.seed), eval_recs


def attach_teacher_prompts(records: list[PromptRecord], suffix: str, cfg: RunConfig, tokenizer,
                           teacher_tokenizer=None):
    """Set each record's `teacher_prompt_ids` ((P',) int32; None where it equals its prompt_ids) as
    teacher.prompt_template / system_prompt render it, the question + `suffix` (the suffix its prompt_ids were
    tokenised with). Returns the tokenizer that rendered them, or None (and changes nothing) when the teacher
    reads the student's prompts (the defaults)."""
    t = cfg.teacher
    if t.prompt_template != "teacher" and not t.system_prompt:
        return None
    renderer = (teacher_tokenizer or tokenizer) if t.prompt_template == "teacher" else tokenizer
    ids = teacher_prompt_ids([r.prompt + suffix for r in records], renderer, t.system_prompt)
    limit = cfg.data.max_prompt_tokens  # the engines' context (rollout.max_model_len) assumes it of every prompt
    for rec, teacher_ids in zip(records, ids):
        if len(teacher_ids) > limit:
            raise DataError(f"row id {rec.id}: the teacher's prompt has {len(teacher_ids)} tokens ({len(rec.prompt_ids)} "
                            f"as the student reads it; teacher.prompt_template={t.prompt_template!r}, "
                            f"teacher.system_prompt of {len(t.system_prompt)} characters), over "
                            f"data.max_prompt_tokens={limit}; raise data.max_prompt_tokens or shorten the system prompt")
        rec.teacher_prompt_ids = None if np.array_equal(teacher_ids, rec.prompt_ids) else teacher_ids
    return renderer


def find_checkpoint(resume: str | None) -> Path | None:
    """The checkpoint `--resume` names: a checkpoint directory, or the newest complete one of a run."""
    if not resume:
        return None
    path = Path(resume)
    ckpt = path if checkpoint.is_complete(path) else checkpoint.latest(path / "checkpoints")
    if ckpt is None:
        raise checkpoint.CheckpointError(f"--resume {resume}: no complete checkpoint found (looked for {path}/checkpoints/"
                                         "step_*/MANIFEST.json); start without --resume or point at a run directory")
    return ckpt


def restore_driver_state(ckpt: Path | None, sampler: PromptSampler) -> int:
    """Data position and step of a checkpoint (or of a fresh start); returns the step to run next."""
    if ckpt is None:
        sampler.load_state_dict({"epoch": 0, "position": 0})
        return 0
    state = json.loads((ckpt / "driver_state.json").read_text())
    sampler.load_state_dict(state["sampler"])
    return int(state["step"])


def prepare_run(cfg: RunConfig, resume: str | None = None) -> RunSetup:
    """Check and load everything before any actor starts; raises one of SETUP_ERRORS on bad input."""
    ckpt = find_checkpoint(resume)
    if ckpt is None and cfg.auto_resume:
        ckpt = checkpoint.latest(Path(cfg.out_dir) / "checkpoints")
        print(f"auto_resume: {'found ' + str(ckpt) if ckpt else 'no checkpoint in ' + cfg.out_dir + ', starting fresh'}")
    out_dir = check_out_dir(cfg.out_dir)
    models, tokenizer = resolve_models(cfg, out_dir)
    # the config printed and saved with the run names the chunk the loss will run (auto resolved)
    chunk = resolve_logits_chunk(cfg.trainer.logits_chunk, models.vocab_size)
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, logits_chunk=chunk))
    if ckpt is not None and (diff := architecture_mismatch(str(ckpt / "hf"), models.student_path)):
        raise checkpoint.CheckpointError(f"checkpoint {ckpt} belongs to another model ({'; '.join(diff)}); resume "
                                         "with the model.student it was trained from, or start a new --out")
    sampler, eval_recs = load_data(cfg, tokenizer, [load_tokenizer(m.teacher_path, cfg.model.trust_remote_code)
                                                    for _, _, m in model_groups(cfg, models)])
    return RunSetup(cfg, models, sampler, eval_recs, out_dir, ckpt, restore_driver_state(ckpt, sampler))
