"""Start (or join) Ray and build the three actor groups of a run from its config."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

from actors.group import ActorGroup
from actors.remote import RolloutActor, StudentActor, TeacherActor
from eopd_ray.config import OFF_POLICY_OBJECTIVES, RunConfig


@dataclass
class ResolvedModels:
    """What the driver resolved before Ray starts: local paths and the shared vocabulary."""

    teacher_path: str
    student_path: str
    vocab_size: int
    pad_id: int


def init_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS / `address` if given (ray job submit), else start a local Ray on 127.0.0.1."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Logical CPUs: our actors run phase after phase, so they may share the physical cores.
        # Binding to loopback needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 set before `import ray` (the
        # example script does this); the node address alone is not enough.
        ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 1), include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DS_ACCELERATOR": "cpu"}}
                 if not _has_cuda() else None)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _threads(cfg: RunConfig) -> int:
    return max(1, (os.cpu_count() or 1))


def build_rollouts(cfg: RunConfig, models: ResolvedModels) -> ActorGroup:
    # Off-policy KD learns from the teacher's own samples: its rollout workers hold the teacher.
    path = models.teacher_path if cfg.loss.objective in OFF_POLICY_OBJECTIVES else models.student_path
    return ActorGroup("rollout", RolloutActor, cfg.rollout.num_workers, lambda rank: dict(
        model_path=path, engine=cfg.rollout.engine, dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code, vocab_size=models.vocab_size,
        num_threads=_threads(cfg)), num_cpus=cfg.rollout.num_cpus)


def build_teachers(cfg: RunConfig, models: ResolvedModels) -> ActorGroup:
    return ActorGroup("teacher", TeacherActor, cfg.teacher.num_workers, lambda rank: dict(
        model_path=models.teacher_path, top_k=cfg.loss.top_k, vocab_size=models.vocab_size,
        pad_id=models.pad_id, chunk_size=cfg.teacher.chunk_size, dtype=cfg.model.teacher_dtype,
        trust_remote_code=cfg.model.trust_remote_code, num_threads=_threads(cfg)), num_cpus=cfg.teacher.num_cpus)


def build_students(cfg: RunConfig, models: ResolvedModels) -> ActorGroup:
    """Student ranks: rank 0 publishes an address, then every rank joins the process group at once."""
    n = cfg.trainer.num_ranks
    group = ActorGroup("student", StudentActor, n, lambda rank: dict(
        model_path=models.student_path, trainer=cfg.trainer, loss=cfg.loss, rank=rank, world_size=n,
        vocab_size=models.vocab_size, pad_id=models.pad_id, dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code, num_threads=max(1, _threads(cfg) // n),
        n_samples=cfg.rollout.n_samples_per_prompt),
        num_cpus=cfg.trainer.num_cpus)
    addr, port = ray.get(group.actors[0].master_address.remote())
    group.run("setup", addr, port)
    return group
