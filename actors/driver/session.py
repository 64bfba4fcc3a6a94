"""The session of actors of a run: the rollout, teacher and student groups and the weight sync between them,
built from the config, rebuilt from a checkpoint after a fault, and grown back when rollout workers leave."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from actors.driver.build import (build_rollouts, build_students, build_teachers, build_weight_sync,
                                 release_shared_placement)
from actors.runtime.group import ActorGroup
from actors.sync.base import WeightSync
from eopd_ray.config import RunConfig
from eopd_ray.run_setup import ResolvedModels, model_groups

# What a lost worker process looks like from the driver.
ACTOR_DIED = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError,
              ray.exceptions.WorkerCrashedError)


def node_report(groups: dict[str, ActorGroup]) -> list[str]:
    """One line per actor: the Ray node it landed on (its id, its name, and the eopd_<role> pools it offers,
    placement.node_roles), e.g. `[nodes] rollout 0: node 5e1f... (10.0.3.7, eopd_rollout)`. Tests and
    operators read where Ray actually put each role, which the placement plan can only intend."""
    nodes = {n["NodeID"]: n for n in ray.nodes()}
    lines = []
    for role, group in groups.items():
        for i, node_id in enumerate(group.node_ids()):
            info = nodes.get(node_id, {})
            pools = sorted(k for k in info.get("Resources", {}) if k.startswith("eopd_"))
            where = ", ".join([info.get("NodeName", "?"), *pools])
            lines.append(f"[nodes] {role} {i}: node {node_id or '?'} ({where})")
    return lines


def group_label(name: str) -> str:
    """The actor group (and node report) name of teacher group `name`: `teacher` for the one teacher."""
    return "teacher" if name == "teacher" else f"teacher_{name}"


@dataclass
class Session:
    cfg: RunConfig
    models: ResolvedModels
    rollouts: ActorGroup
    teachers: list[ActorGroup]  # one group per teacher (`teachers`), in order; one with a single teacher
    students: ActorGroup
    sync: WeightSync
    sync_checked: bool = False  # the engines' log-probs were compared with the student's after a sync
    ahead: Any = None  # rollout.overlap: the next step's rollouts in flight (phases.PendingRollout)
    aligned: bool = False  # the teacher-context alignment check has run (once per process, at its first step)
    down: bool = False  # shut down (and not rebuilt since): the groups' actors and placement groups are gone

    @property
    def on_policy(self) -> bool:
        """False for objectives that learn from the teacher's samples: their rollout workers hold the teacher."""
        return not self.cfg.loss.spec.samples_from_teacher

    @classmethod
    def build(cls, cfg: RunConfig, models: ResolvedModels, ckpt: Path | None = None) -> "Session":
        """Rollout, teacher and student groups; the student (and the rollout copy) restored from `ckpt`. If any
        step fails (a group the cluster cannot place within trainer.place_wait_s: PlacementTimeout; a worker
        lost while starting: one of ACTOR_DIED), the groups already built are shut down before it raises, so
        that nothing holds the cluster's resources for the next try."""
        t0 = time.perf_counter()
        built: list[ActorGroup] = []
        try:
            built.append(build_rollouts(cfg, models))
            for name, group_cfg, group_models in model_groups(cfg, models):  # each teacher group as a run of its own
                built.append(build_teachers(group_cfg, group_models, group_label(name)))
            built.append(build_students(cfg, models))
            rollouts, teachers, students = built[0], built[1:-1], built[-1]
            session = cls(cfg, models, rollouts, teachers, students, build_weight_sync(cfg, students, rollouts))
            if ckpt is not None:
                students.run("load", str(ckpt))
                if session.on_policy:
                    session.sync.sync()
            ray.get(rollouts.call("ping") + [ping for group in teachers for ping in group.call("ping")])
        except BaseException:
            for group in built:
                group.shutdown()
            release_shared_placement()
            raise
        print(f"actors ready in {time.perf_counter() - t0:.1f} s: {len(rollouts)} rollout, "
              f"{' + '.join(str(len(group)) for group in teachers)} teacher, {len(students)} student rank(s)")
        names = [name for name, _, _ in model_groups(cfg, models)]
        groups = {group_label(name): group for name, group in zip(names, teachers)}
        for line in node_report({"rollout": rollouts, **groups, "student": students}):
            print(line)
        return session

    def rebuild(self, ckpt: Path | None) -> None:
        """After a teacher or student worker died: every group anew, the student from `ckpt`. Raises what
        `build` raises; the session then holds no actors (shutdown is a no-op) until a rebuild succeeds."""
        self.shutdown()
        fresh = Session.build(self.cfg, self.models, ckpt)
        self.rollouts, self.teachers, self.students, self.sync = fresh.rollouts, fresh.teachers, fresh.students, fresh.sync
        self.sync_checked = False
        self.ahead = None
        self.down = False

    def shutdown(self) -> None:
        if self.down:
            return
        self.down = True
        for group in (self.rollouts, *self.teachers, self.students):
            group.shutdown()

    # -- elasticity -----------------------------------------------------------------------------------------
    def admit_rollout_workers(self, wait_s: float = 0.0, student_path: str | None = None) -> int:
        """Bring the rollout group back to rollout.num_workers when the cluster can place workers again (an
        elastic cluster scaling up); new workers get the current student weights (after loading `student_path`
        when they start with another model: off-policy KD's workers hold the teacher until the evaluation).
        Returns how many joined."""
        joined = self.rollouts.grow(self.cfg.rollout.num_workers, wait_s)
        if joined:
            if student_path:
                ray.get([a.load_model.remote(student_path) for a in joined])
            if self.on_policy or student_path:
                self.sync.sync()
            self.sync_checked = False  # the newcomers are checked too: against a reference taken with them in
            tqdm.write(f"[elastic] {len(joined)} rollout worker(s) joined; {len(self.rollouts)} working")
            for line in node_report({"rollout": self.rollouts}):
                tqdm.write(line)
        return len(joined)

    def recover_rollout_workers(self, where: str, student_path: str | None = None) -> bool:
        """After an actor error: drop the rollout workers that died and admit replacements (waiting for one when
        none is left). False when no rollout worker died (the error is another actor's) or none is working."""
        lost = self.rollouts.drop_dead()
        if not lost:
            return False
        tqdm.write(f"[elastic] {lost} rollout worker(s) left {where}; {len(self.rollouts)} still working")
        self.admit_rollout_workers(600.0 if not self.rollouts.actors else 0.0, student_path)
        return bool(self.rollouts.actors)
