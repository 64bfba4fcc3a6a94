"""Start (or join) Ray and build the three actor groups of a run from its config.

GPUs are requested from the placement plan (`eopd_ray/placement.py`): nothing on CPU (the bundles are the
CPU-only ones of before), whole GPUs per actor when disaggregated, and fractions of one shared placement
group's one-GPU bundles when colocated.
"""

from __future__ import annotations

import os
import sys

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.runtime.group import ActorGroup, wait_placed
from actors.rollout.actor import RolloutActor
from actors.teacher.actor import CrossTeacherActor, ShardedTeacherActor, TeacherActor
from actors.student.actor import StudentActor
from actors.sync.base import ObjectStoreWeightSync, WeightSync
from eopd_ray.config import RunConfig
from eopd_ray.objectives import Objective
from eopd_ray.run_setup import ResolvedModels
from eopd_ray.placement import PlacementPlan, allocator_env, cpu_block, plan_placement, role_resources
from eopd_ray.placement import actor_threads as placement_threads


def init_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS / `address` if given (ray job submit), else start a local Ray on 127.0.0.1."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Logical CPUs: our actors run phase after phase, so they may share the physical cores.
        # Binding to loopback needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 set before `import ray` (importing
        # `actors` sets it); the node address alone is not enough.
        # address="local": always a fresh Ray of our own, never a cluster someone else left running here.
        ray.init(address="local", num_cpus=num_cpus or max(8, os.cpu_count() or 1), include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DS_ACCELERATOR": "cpu"}}
                 if not _has_cuda() else None)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def actor_threads(cfg: RunConfig, role: str) -> int:
    """Torch threads of one actor of `role` on this node (`eopd_ray.placement.actor_threads` of the run's plan:
    the Ray CPUs the plan reserves for it, or its GPU share of this node's cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return placement_threads(plan_placement(cfg), role, cores, cfg.placement.actor_threads)


class SharedPlacement:
    """Colocated mode: one placement group with one {"GPU": 1} bundle per GPU, shared by the three groups
    (student rank i, rollout engine i and teacher worker i all go into bundle i)."""

    def __init__(self, plan: PlacementPlan, ready_timeout_s: float = 600.0):
        bundles = plan.bundles["shared"]
        self.pg = placement_group(bundles, strategy="PACK", name="eopd-colocated")
        wait_placed(self.pg, "colocated placement (every role, one bundle per GPU; check placement.num_nodes / "
                    "placement.gpus_per_node)", len(bundles), bundles[0], ready_timeout_s)


_SHARED: SharedPlacement | None = None  # the colocated group of the current actors (rebuilt after a fault)


def _shared(plan: PlacementPlan, wait_s: float) -> SharedPlacement:
    global _SHARED
    if _SHARED is None:
        _SHARED = SharedPlacement(plan, wait_s)
    return _SHARED


def release_shared_placement() -> None:
    """Remove the colocated placement group if one is held (a build that failed before the student group,
    which owns it, was made); a no-op otherwise."""
    global _SHARED
    if _SHARED is not None:
        remove_placement_group(_SHARED.pg)
        _SHARED = None


class ColocatedGroup(ActorGroup):
    """An ActorGroup whose members go into bundles 0..n-1 of the shared placement group instead of a group of
    their own. The student group, built last, removes the shared group at shutdown."""

    def __init__(self, name: str, actor_cls, n: int, kwargs_for_rank, shared: SharedPlacement, num_cpus: float,
                 num_gpus: float, owns_placement: bool = False, env_vars: dict[str, str] | None = None):
        self.name, self.shared, self.owns_placement = name, shared, owns_placement
        self.pg = shared.pg
        self.actors = [
            actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                shared.pg, placement_group_bundle_index=i), runtime_env={"env_vars": env_vars} if env_vars else None
            ).remote(**kwargs_for_rank(i))
            for i in range(n)]
        self.bundles, self.pending = list(range(n)), []

    def grow(self, target: int, wait_s: float = 0.0) -> list:
        """Colocated members share their GPU with the other roles' members of the same bundle: a lost one is not
        replaced during the run (the fault restart rebuilds everything)."""
        return []

    def shutdown(self) -> None:
        global _SHARED
        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.owns_placement:
            remove_placement_group(self.shared.pg)
            _SHARED = None


def _group(cfg: RunConfig, role: str, actor_cls, n: int, kwargs_for_rank, num_cpus: float,
           name: str = "") -> ActorGroup:
    """`n` actors of `role`; `name` (default: the role) names the group and its placement group."""
    plan = plan_placement(cfg)
    env = allocator_env(cfg.placement.retain_freed_mib, dict(os.environ))  # glibc reads it as the process starts
    if plan.mode == "colocated":
        return ColocatedGroup(role, actor_cls, n, kwargs_for_rank, _shared(plan, cfg.trainer.place_wait_s), num_cpus,
                              plan.num_gpus(role), owns_placement=role == "student", env_vars=env)
    # CPU: num_gpus is 0 and the bundles are {"CPU": num_cpus}, exactly as before placement existed;
    # placement.node_roles adds the role's pool resource to every bundle (eopd_ray.placement.role_resources).
    return ActorGroup(name or role, actor_cls, n, kwargs_for_rank, num_cpus=num_cpus, num_gpus=plan.num_gpus(role),
                      resources=role_resources(cfg, role), ready_timeout_s=cfg.trainer.place_wait_s, env_vars=env)


def _engine_kwargs(cfg: RunConfig, rank: int) -> dict:
    """vLLM settings of engine `rank` (the transformers engine gets none)."""
    if cfg.rollout.engine != "vllm":
        return {}
    r = cfg.rollout
    kwargs = dict(tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
                  max_model_len=r.max_model_len or cfg.data.max_prompt_tokens + r.max_new_tokens,
                  sleep_between_calls=cfg.placement.mode == "colocated", seed=cfg.trainer.seed,
                  temperature=r.temperature, kv_cache_gib=r.kv_cache_gib)
    if not plan_placement(cfg).has_gpus:  # vLLM's CPU backend: each engine's threads on cores of its own
        kwargs["cpu_ids"] = cpu_block(rank, r.num_cpus, sorted(os.sched_getaffinity(0)))
    return kwargs


def build_rollouts(cfg: RunConfig, models: ResolvedModels) -> ActorGroup:
    # Off-policy KD learns from the teacher's own samples: its rollout workers hold the teacher.
    path = models.teacher_path if cfg.loss.spec.samples_from_teacher else models.student_path
    group = _group(cfg, "rollout", RolloutActor, cfg.rollout.num_workers, lambda rank: dict(
        model_path=path, engine=cfg.rollout.engine, dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code, vocab_size=models.vocab_size,
        num_threads=actor_threads(cfg, "rollout"), engine_kwargs=_engine_kwargs(cfg, rank)), cfg.rollout.num_cpus)
    if cfg.placement.mode == "colocated":
        # vLLM sizes its KV cache from the GPU memory free while it starts: let it finish (and go to sleep)
        # before the teacher and the student load onto the same GPUs.
        ray.get(group.call("ping"))
    return group


def build_teachers(cfg: RunConfig, models: ResolvedModels, name: str = "teacher") -> ActorGroup:
    """Teacher workers: whole models (data parallel), or with teacher.zero_stage=3 one ZeRO-3 group whose
    members join a process group (NCCL on GPUs, gloo on CPU) and load the teacher into partitions. `name`:
    the group's (one of several teachers: `teacher_<name>`)."""
    t = cfg.teacher
    common = dict(model_path=models.teacher_path, top_k=cfg.loss.top_k, vocab_size=models.vocab_size,
                  pad_id=models.pad_id, chunk_size=t.chunk_size, forward_tokens=t.forward_tokens,
                  dtype=cfg.model.teacher_dtype,
                  trust_remote_code=cfg.model.trust_remote_code, end_swap=models.end_swap)
    if t.tokenizer == "cross":  # its own vocabulary; the student's tokenizer to align to (zero_stage 0 only)
        return _group(cfg, "teacher", CrossTeacherActor, t.num_workers, lambda rank: dict(
            common, vocab_size=models.teacher_vocab_size, student_tokenizer_path=models.student_path,
            student_vocab_size=models.vocab_size, num_threads=actor_threads(cfg, "teacher")), t.num_cpus, name)
    if t.zero_stage == 0:
        return _group(cfg, "teacher", TeacherActor, t.num_workers,
                      lambda rank: dict(common, num_threads=actor_threads(cfg, "teacher")), t.num_cpus, name)
    backend = "nccl" if plan_placement(cfg).has_gpus else "gloo"
    group = _group(cfg, "teacher", ShardedTeacherActor, t.num_workers, lambda rank: dict(
        common, rank=rank, world_size=t.num_workers, backend=backend, offload=t.offload,
        persistence_threshold=t.zero3_persistence_threshold,
        num_threads=actor_threads(cfg, "teacher")), t.num_cpus, name)
    addr, port = ray.get(group.actors[0].master_address.remote())
    group.run("setup", addr, port)
    return group


def shippable(objective: Objective) -> Objective:
    """The objective, made to travel to the student actors whole: functions of a module outside this package
    (an objective registered by the user's script or test) are pickled by value, since the actors' processes
    never imported that module."""
    for value in vars(objective).values():
        module = sys.modules.get(getattr(value, "__module__", None) or "")
        if callable(value) and module is not None and not module.__name__.startswith("eopd_ray."):
            ray.cloudpickle.register_pickle_by_value(module)
    return objective


def build_students(cfg: RunConfig, models: ResolvedModels) -> ActorGroup:
    """Student ranks: rank 0 publishes an address, then every rank joins the process group at once
    (NCCL when the plan has GPUs, gloo on CPU)."""
    n = cfg.trainer.num_ranks
    backend = "nccl" if plan_placement(cfg).has_gpus else "gloo"
    group = _group(cfg, "student", StudentActor, n, lambda rank: dict(
        model_path=models.student_path, trainer=cfg.trainer, loss=cfg.loss, rank=rank, world_size=n,
        vocab_size=models.vocab_size, pad_id=models.pad_id, dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code, num_threads=actor_threads(cfg, "student"),
        backend=backend, n_samples=cfg.rollout.n_samples_per_prompt, objective=shippable(cfg.loss.spec)),
        cfg.trainer.num_cpus)
    addr, port = ray.get(group.actors[0].master_address.remote())
    group.run("setup", addr, port)
    return group


def build_weight_sync(cfg: RunConfig, students: ActorGroup, rollouts: ActorGroup) -> WeightSync:
    """`placement.weight_sync`: the object store (auto for the transformers engine); the bucketed broadcast
    over a dedicated group (auto for vLLM engines on their own GPUs: NCCL; on CPU: gloo); CUDA IPC (auto for
    vLLM engines that share their GPU with a student rank)."""
    sync = cfg.placement.weight_sync
    if sync == "object_store" or (sync == "auto" and cfg.rollout.engine != "vllm"):
        return ObjectStoreWeightSync(students, rollouts)
    from actors.sync.broadcast import IpcWeightSync, NcclWeightSync

    if cfg.placement.mode == "colocated":
        return IpcWeightSync(students, rollouts, cfg.placement.sync_bucket_mb)
    return NcclWeightSync(students, rollouts, cfg.placement.sync_bucket_mb, cfg.rollout.tensor_parallel_size)
