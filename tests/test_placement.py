"""Placement plans (eopd_ray/placement.py): layouts over several nodes, impossible plans refused, presets."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from eopd_ray.config import ConfigError, load_config
from eopd_ray.placement import (ALLOCATOR_ENV_VARS, COLOCATED_SHARE, PlacementError, actor_threads, allocator_env,
                                cpu_block, format_plan, plan_placement)

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


def _cfg(*overrides):
    return load_config(None, list(overrides))


def _gpu(mode, nodes, per_node, students, teachers, engines, tp=1, *extra):
    return _cfg(f"placement.mode={mode}", f"placement.num_nodes={nodes}", f"placement.gpus_per_node={per_node}",
                f"trainer.num_ranks={students}", f"teacher.num_workers={teachers}", f"rollout.num_workers={engines}",
                f"rollout.tensor_parallel_size={tp}", "rollout.engine=vllm", "trainer.batch_size=64",
                "trainer.mini_batch_size=16", *extra)


def test_cpu_default_requests_no_gpu_and_keeps_todays_bundles():
    cfg = _cfg()
    plan = plan_placement(cfg)
    assert plan.mode == "cpu" and not plan.has_gpus and plan.gpus_used == 0
    assert [s.role for s in plan.slots] == ["student", "teacher", "rollout"]
    for role, cpus in (("student", cfg.trainer.num_cpus), ("teacher", cfg.teacher.num_cpus),
                       ("rollout", cfg.rollout.num_cpus)):
        assert plan.num_gpus(role) == 0.0
        assert plan.bundles[role] == [{"CPU": cpus}]  # exactly what ActorGroup asked for before placement existed


def test_disaggregated_over_two_nodes_gives_every_actor_its_own_gpus():
    plan = plan_placement(_gpu("disaggregated", 2, 4, 2, 2, 2, 2))
    assert plan.gpus_used == 8
    taken = Counter((s.node, g) for s in plan.slots for g in s.gpus)
    assert max(taken.values()) == 1, "no GPU is given twice"
    engines = plan.role("rollout")
    assert [len(s.gpus) for s in engines] == [2, 2] and all(s.num_gpus == 2.0 for s in engines)
    # Students first, so the ZeRO collectives of both ranks stay on node 0.
    assert {s.node for s in plan.role("student")} == {0}
    assert plan.bundles["rollout"] == [{"CPU": 0.5, "GPU": 2.0}] * 2
    assert plan.bundles["teacher"] == [{"CPU": 0.5, "GPU": 1.0}] * 2


def test_disaggregated_engine_never_straddles_nodes():
    # 3 GPUs per node: student + teacher take node 0's first two; the TP-2 engine must go to node 1.
    plan = plan_placement(_gpu("disaggregated", 2, 3, 1, 1, 1, 2))
    (engine,) = plan.role("rollout")
    assert engine.node == 1 and engine.gpus == (0, 1)


def test_colocated_shares_each_gpu_between_roles():
    plan = plan_placement(_gpu("colocated", 2, 2, 4, 2, 4))
    assert plan.gpus_used == 4 and len(plan.bundles["shared"]) == 4
    for i in range(4):  # engine i sits on the GPU of student rank i (CUDA IPC weight sync)
        assert (plan.role("rollout")[i].node, plan.role("rollout")[i].gpus) == \
            (plan.role("student")[i].node, plan.role("student")[i].gpus)
    per_gpu = Counter()
    for s in plan.slots:
        per_gpu[(s.node, s.gpus)] += s.num_gpus
    assert max(per_gpu.values()) <= 1.0 + 1e-9, "Ray cannot give more than one GPU's worth on a GPU"
    assert plan.bundles["shared"][0] == {"CPU": 1.5, "GPU": 1.0}  # student + teacher + rollout CPUs
    assert plan.bundles["shared"][3] == {"CPU": 1.0, "GPU": 1.0}  # no teacher on GPU 3
    assert sum(COLOCATED_SHARE.values()) <= 1.0


@pytest.mark.parametrize("overrides, field", [
    (("disaggregated", 1, 4, 2, 2, 2), "placement.num_nodes=1"),                 # 6 GPUs needed, 4 there
    (("disaggregated", 2, 4, 1, 1, 1, 8), "rollout.tensor_parallel_size=8"),     # TP wider than a node
    (("disaggregated", 2, 3, 1, 1, 2, 2), "rollout.tensor_parallel_size=2"),     # fragments: no node has 2 left
    (("colocated", 1, 4, 4, 1, 4, 2), "rollout.tensor_parallel_size=2"),         # colocated engines use one GPU
    (("colocated", 1, 2, 4, 1, 2), "trainer.num_ranks=4"),                       # more ranks than GPUs
    (("colocated", 1, 4, 2, 1, 4), "rollout.num_workers=4"),                     # an engine without a student rank
])
def test_impossible_plans_are_refused_naming_the_value_and_a_fix(overrides, field):
    with pytest.raises(PlacementError) as err:
        _gpu(*overrides)
    assert field in str(err.value) and "Fix:" in str(err.value)
    assert isinstance(err.value, ConfigError), "the driver catches ConfigError before Ray starts"


@pytest.mark.parametrize("overrides, fragment", [
    (["placement.mode=gpu"], "placement.mode='gpu'"),
    (["placement.gpus_per_node=8"], "placement.gpus_per_node=8"),          # GPUs given but mode cpu
    (["placement.mode=disaggregated"], "placement.gpus_per_node=0"),       # mode given but no GPUs
    (["rollout.engine=vllm", "rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size=2"),  # TP on CPU
    (["rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size=2"),  # TP with transformers
    (["rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization=1.5"),
    (["placement.num_nodes=0"], "placement.num_nodes=0"),
    (["rollout.overlap=2"], "rollout.overlap=2"),
    (["rollout.overlap=true", "placement.mode=colocated", "placement.gpus_per_node=2", "rollout.engine=vllm"],
     "rollout.overlap=True"),  # colocated engines and students take turns on a GPU
])
def test_bad_placement_fields_name_the_field(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert fragment in str(err.value) and "allowed" in str(err.value)


def test_vllm_runs_on_cpu_placement_and_cpu_blocks_share_out_the_cores():
    cfg = _cfg("rollout.engine=vllm", "rollout.num_workers=2")
    assert not plan_placement(cfg).has_gpus  # vLLM's CPU backend: the config no longer refuses it
    assert [cpu_block(r, 0.5, [0, 1]) for r in range(3)] == [[0], [1], [0]]  # one core each, wrapping around
    assert [cpu_block(r, 2, [4, 5, 6]) for r in range(2)] == [[4, 5], [6, 4]]
    assert cpu_block(0, 8, [0, 1]) == [0, 1]  # never more cores than the node has


def test_actor_threads_follow_the_ray_cpus_or_the_gpu_share():
    def cpu(c):
        return plan_placement(_cfg(f"trainer.num_cpus={c}"))

    assert [actor_threads(cpu(c), "student", cores=2) for c in (0, 0.5, 1, 1.9, 2, 5)] == [1, 1, 1, 1, 2, 2]
    assert actor_threads(cpu(0.5), "teacher", cores=2, override=3) == 3  # placement.actor_threads wins
    dis = plan_placement(_gpu("disaggregated", 1, 8, 2, 2, 2, 2))  # rollout engines on 2 GPUs each
    assert actor_threads(dis, "student", cores=96) == 12  # one GPU of 8: 96 / 8 cores
    assert actor_threads(dis, "rollout", cores=96) == 24
    dis4 = plan_placement(_gpu("disaggregated", 1, 8, 2, 2, 2, 2, "rollout.num_cpus=4"))
    assert actor_threads(dis4, "rollout", cores=96) == 4  # Ray CPUs, where reserved, decide
    col = plan_placement(_gpu("colocated", 1, 4, 4, 4, 4))  # colocated actors take turns on a whole GPU
    assert actor_threads(col, "teacher", cores=32) == 8


def test_the_driver_sizes_threads_from_the_same_plan_as_the_bundles():
    """One source: the Ray CPUs in each role's bundles are what the driver's thread count reads."""
    from actors.driver.build import actor_threads as driver_threads

    cfg = _cfg("trainer.num_cpus=2", "teacher.num_cpus=1", "rollout.num_cpus=0.5")
    plan = plan_placement(cfg)
    assert [b["CPU"] for b in plan.bundles["student"]] == [2]
    assert {r: driver_threads(cfg, r) for r in ("student", "teacher", "rollout")} == \
        {"student": min(2, len(os.sched_getaffinity(0))), "teacher": 1, "rollout": 1}


def test_format_plan_names_every_actor_and_node():
    text = format_plan(_gpu("disaggregated", 2, 4, 2, 2, 2, 2))
    assert "node 0: student 0 on GPU 0, student 1 on GPU 1, teacher 0 on GPU 2, teacher 1 on GPU 3" in text
    assert "node 1: rollout 0 on GPUs 0-1, rollout 1 on GPUs 2-3" in text
    text = format_plan(_gpu("colocated", 1, 2, 2, 1, 2))
    assert "GPU 0: student 0, teacher 0, rollout 0; GPU 1: student 1, rollout 1" in text
    assert format_plan(_cfg()).startswith("placement: cpu")


def test_placement_and_config_need_no_ray():
    """--dry-run prints the plan without Ray (the config imports torch, through the objectives' registry)."""
    code = ("import sys; import eopd_ray.placement as p; from eopd_ray.config import load_config; "
            "p.format_plan(load_config()); sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_has_a_valid_plan(path):
    cfg = load_config(str(path))
    plan = plan_placement(cfg)
    if path.name.startswith("tiny") or path.name in ("smollm2_prune.yaml", "gemma3_to_smollm2_cross.yaml",
                                                                  "two_teachers_smollm2.yaml"):  # laptop
        assert plan.mode == "cpu"
        return
    assert cfg.rollout.engine == "vllm" and plan.has_gpus
    assert plan.gpus_used <= cfg.placement.num_nodes * cfg.placement.gpus_per_node
    # Table 8 of the paper.
    t = cfg.trainer
    assert (t.batch_size, t.mini_batch_size, t.lr, cfg.rollout.max_new_tokens) == (128, 32, 3e-6, 4096)
    assert (cfg.loss.top_k, cfg.loss.tau, cfg.rollout.temperature) == (16, 0.8, 1.0)
    assert cfg.rollout.top_p == (0.8 if "llama" in path.name else 1.0)


def test_node_roles_send_each_role_to_its_own_pool():
    # cpu: every bundle asks for a little of eopd_<role>, so only nodes started with that resource take it
    cfg = _cfg("placement.node_roles=true", "rollout.num_workers=2")
    plan = plan_placement(cfg)
    assert plan.bundles["rollout"] == [{"CPU": 0.5, "eopd_rollout": 0.001}] * 2
    assert plan.bundles["student"] == [{"CPU": 0.5, "eopd_student": 0.001}]
    text = format_plan(cfg)
    assert "rollout  x2: bundle {'CPU': 0.5, 'eopd_rollout': 0.001} each, on nodes offering eopd_rollout" in text
    assert "eopd_" not in format_plan(_cfg())  # off by default: the bundles of before
    # disaggregated: a role never shares a node, so 2 students + 1 teacher take two 4-GPU nodes of their own
    plan = plan_placement(_gpu("disaggregated", 4, 4, 2, 1, 2, 2, "placement.node_roles=true"))
    nodes = {role: {s.node for s in plan.role(role)} for role in ("student", "teacher", "rollout")}
    assert nodes == {"student": {0}, "teacher": {1}, "rollout": {2}}
    assert plan.bundles["teacher"] == [{"CPU": 0.5, "GPU": 1.0, "eopd_teacher": 0.001}]
    text = format_plan(_gpu("disaggregated", 4, 4, 2, 1, 2, 2, "placement.node_roles=true"))
    assert "node 0 (a node offering eopd_student): student 0 on GPU 0, student 1 on GPU 1" in text
    assert "node 2 (a node offering eopd_rollout): rollout 0 on GPUs 0-1, rollout 1 on GPUs 2-3" in text
    assert "node 3: idle" in text


@pytest.mark.parametrize("overrides, field", [
    (("disaggregated", 2, 4, 1, 1, 1), "placement.num_nodes=2"),  # 3 GPUs fit one node, but 3 roles need 3
    (("colocated", 1, 2, 2, 1, 2), "placement.node_roles=True"),  # colocated roles share every GPU
])
def test_node_roles_refuse_plans_that_mix_roles(overrides, field):
    with pytest.raises(PlacementError) as err:
        _gpu(*overrides, 1, "placement.node_roles=true")
    assert field in str(err.value) and "Fix:" in str(err.value)


def test_allocator_env_keeps_freed_memory_unless_the_user_chose_otherwise():
    mib = 1 << 20
    assert allocator_env(1024, {}) == {"MALLOC_TRIM_THRESHOLD_": str(1024 * mib),
                                       "MALLOC_MMAP_THRESHOLD_": str(1024 * mib)}
    assert allocator_env(3, {"PATH": "/bin"}) == dict.fromkeys(ALLOCATOR_ENV_VARS, str(3 * mib))
    assert allocator_env(0, {}) == {}  # placement.retain_freed_mib=0: glibc's own defaults
    for own in ({"MALLOC_TRIM_THRESHOLD_": "0"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
                {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}):
        assert allocator_env(1024, own) == {}
    assert _cfg().placement.retain_freed_mib == 1024


@pytest.mark.parametrize("value", [-1, 1.5, "big"])
def test_bad_retain_freed_mib_names_the_field(value):
    with pytest.raises(ConfigError, match="placement.retain_freed_mib"):
        _cfg(f"placement.retain_freed_mib={value}")
