"""Config defaults, YAML presets, dotted overrides and up-front validation."""

import math
from pathlib import Path

import pytest

from eopd_ray.config import ConfigError, LossConfig, RunConfig, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))


def test_defaults_validate_and_match_the_paper():
    cfg = load_config()
    assert (cfg.loss.objective, cfg.loss.tau, cfg.loss.top_k, cfg.loss.clip_eps) == ("eopd", 0.8, 16, 0.2)
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0


def test_overrides_are_typed():
    cfg = load_config(None, ["loss.objective=opd", "trainer.max_steps=3", "loss.tau=inf", "loss.renormalize=false",
                             "trainer.lr=1e-4"])
    assert cfg.loss.objective == "opd" and cfg.trainer.max_steps == 3
    assert math.isinf(cfg.loss.tau) and cfg.loss.renormalize is False and cfg.trainer.lr == 1e-4


@pytest.mark.parametrize("override, fragment", [
    ("loss.objective=bad", "loss.objective='bad'"),
    ("loss.tau=abc", "loss.tau"),
    ("loss.top_k=0", "loss.top_k=0"),
    ("loss.clip_eps=1.5", "loss.clip_eps=1.5"),
    ("trainer.mini_batch_size=7", "trainer.mini_batch_size=7"),
    ("trainer.zero_stage=4", "trainer.zero_stage=4"),
    ("trainer.max_steps=2.5", "trainer.max_steps"),
    ("rollout.top_p=0", "rollout.top_p=0"),
    ("rollout.num_workers=33", "rollout.num_workers=33"),
    ("model.dtype=fp8", "model.dtype='fp8'"),
    ("model.dtype=bfloat16", "trainer.zero_stage=0"),  # bf16 needs a ZeRO stage >= 1
    ("teacher.zero_stage=2", "teacher.zero_stage=2"),  # a frozen teacher has no optimizer state to shard
    ("teacher.offload=cpu", "teacher.offload='cpu'"),  # parameter offload needs ZeRO-3
    ("teacher.offload=nvme", "teacher.offload='nvme'"),
    ("loss.nope=1", "loss.nope"),
    ("nosection.x=1", "nosection"),
    ("trainer=3", "trainer"),
    ("loss.renormalize=maybe", "loss.renormalize"),
    ("placement.weight_sync=nccl", "placement.weight_sync='nccl'"),
])
def test_bad_values_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)
    assert "allowed" in str(err.value)


@pytest.mark.parametrize("overrides, fragment", [
    (["placement.weight_sync=broadcast", "placement.mode=disaggregated", "placement.gpus_per_node=4"],
     "placement.weight_sync='broadcast'"),  # the transformers engine receives broadcasts on CPU only
    (["placement.weight_sync=broadcast", "rollout.engine=vllm", "placement.mode=colocated",
      "placement.gpus_per_node=4", "trainer.zero_stage=1"], "CUDA IPC"),
])
def test_weight_sync_choices_that_cannot_work_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match="allowed") as err:
        load_config(None, overrides)
    assert fragment in str(err.value)
    assert load_config(None, ["placement.weight_sync=broadcast"]).placement.weight_sync == "broadcast"  # on CPU


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["loss.objective"])


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_round_trip_through_dict():
    cfg = load_config(None, ["loss.objective=random_fkl", "trainer.batch_size=16", "trainer.mini_batch_size=4"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again, RunConfig)


def test_loss_config_rejects_bad_objective_directly():
    with pytest.raises(ConfigError, match="'bad'"):
        LossConfig(objective="bad").validate()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_preset_parses(path):
    cfg = load_config(str(path))
    assert cfg.trainer.batch_size % cfg.trainer.mini_batch_size == 0


def test_presets_exist():
    assert CONFIGS, "examples/configs/ ships at least one preset"


def test_default_placement_is_cpu_and_changes_nothing():
    """The CPU default keeps today's behaviour: no GPU anywhere, transformers rollouts, one engine GPU count."""
    cfg = load_config()
    assert (cfg.placement.mode, cfg.placement.gpus_per_node, cfg.placement.num_nodes) == ("cpu", 0, 1)
    assert cfg.rollout.engine == "transformers" and cfg.rollout.tensor_parallel_size == 1


def test_placement_section_round_trips_and_accepts_a_gpu_layout():
    cfg = load_config(None, ["placement.mode=disaggregated", "placement.gpus_per_node=4", "rollout.engine=vllm",
                             "rollout.tensor_parallel_size=2", "placement.sync_bucket_mb=256"])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.placement.sync_bucket_mb == 256


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("path", [p for p in CONFIGS if load_config(str(p)).data.train_path], ids=lambda p: p.name)
def test_every_preset_reads_its_data_and_its_eval_golds_grade_themselves(path):
    """The presets' data paths are relative (`data/...`; docs/gpu.md section 3), read here from the shared
    copies; train and eval rows load with the configured fields, and every eval gold answer, boxed, grades correct
    (a worked solution in place of the final answer would not)."""
    from eopd_ray.data import load_rows
    from eopd_ray.grading import grade

    d = load_config(str(path)).data
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data copies not found at {SHARED_DATA}")
    local = lambda p: SHARED_DATA / Path(p).relative_to("data")  # noqa: E731
    assert len(load_rows(local(d.train_path), d.prompt_key, d.answer_key)) >= d.num_eval_problems
    held = load_rows(local(d.eval_path), d.eval_prompt_key or d.prompt_key, d.eval_answer_key or d.answer_key)
    assert len(held) >= d.num_eval_problems
    wrong = [r["answer"] for r in held[:d.num_eval_problems] if not grade(f"\\boxed{{{r['answer']}}}", r["answer"])]
    assert not wrong, f"{len(wrong)} eval golds do not grade as correct, e.g. {wrong[0][:200]!r}"
