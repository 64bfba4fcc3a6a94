"""A group of identical Ray actors placed together: one placement group, ranks, call-all-and-wait-once."""

from __future__ import annotations

import time
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class PlacementTimeout(RuntimeError):
    """The cluster did not place an actor group's bundles within the wait (trainer.place_wait_s); the message
    names the group, its bundles and, where the cluster lacks them, the resources it is short of."""


def wait_placed(pg, what: str, n: int, bundle: dict, wait_s: float) -> None:
    """Wait up to `wait_s` for placement group `pg` (`n` x `bundle`) to be placed; else remove it and raise
    PlacementTimeout naming `what` could not be placed and why, where the cluster's totals tell."""
    ready, _ = ray.wait([pg.ready()], timeout=wait_s)
    if ready:
        return
    remove_placement_group(pg)
    totals = ray.cluster_resources()  # alive nodes only: a lost node's resources are gone from it
    short = [f"{key}: needs {need * n:g}, the cluster has {totals.get(key, 0.0):g}"
             for key, need in bundle.items() if totals.get(key, 0.0) < need * n]
    why = f" ({'; '.join(short)})" if short else " (the resources exist but are taken, or no single node has them)"
    raise PlacementTimeout(f"{what}: the cluster could not place {n} x {bundle} within {wait_s:.0f} s "
                           f"(trainer.place_wait_s){why}. Check `ray status`; add the missing node(s) or lower "
                           "the group size")


class ActorGroup:
    """`n` actors of `actor_cls`, one per bundle of a placement group.

    kwargs_for_rank(rank) gives each member's constructor arguments. Bundles ask for `num_cpus` CPUs and
    `num_gpus` GPUs each, plus `resources` (custom Ray resources, e.g. {"eopd_rollout": 0.001} so that only
    nodes offering it take the group: placement.node_roles); `strategy` PACK keeps a group on as few nodes as
    possible (SPREAD for data-parallel groups that should use several nodes).
    """

    def __init__(self, name: str, actor_cls, n: int, kwargs_for_rank: Callable[[int], dict],
                 num_cpus: float = 1.0, num_gpus: float = 0.0, strategy: str = "PACK",
                 env_vars: dict[str, str] | None = None, ready_timeout_s: float = 600.0,
                 resources: dict[str, float] | None = None):
        self.name = name
        bundle = {"CPU": num_cpus} if not num_gpus else {"CPU": num_cpus, "GPU": num_gpus}
        bundle.update(resources or {})
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy, name=f"eopd-{name}")
        wait_placed(self.pg, f"actor group {name!r} ({n} {name} actor(s))", n, bundle, ready_timeout_s)
        self._options = dict(num_cpus=num_cpus, num_gpus=num_gpus,
                             runtime_env={"env_vars": env_vars} if env_vars else None)
        self._actor_cls, self._kwargs_for_rank = actor_cls, kwargs_for_rank
        self.actors = [self._start(i) for i in range(n)]
        self.bundles = list(range(n))  # bundle index of each member of self.actors
        self.pending: list[tuple[Any, ray.ObjectRef, int]] = []  # (actor, ready ref, bundle) still starting

    def _start(self, bundle: int):
        return self._actor_cls.options(
            name=None, scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle),
            **self._options).remote(**self._kwargs_for_rank(bundle))

    # -- elasticity: members that die leave; replacements join when the cluster can place them ------------
    def drop_dead(self, timeout_s: float = 30.0, verdict_s: float = 180.0) -> int:
        """Ping every member; remove those whose process is gone (their bundles become free). Returns how many
        left. A member that does not answer within `timeout_s` but is not dead stays.

        A member that is unavailable (ActorUnavailableError: its node stopped answering without notice, a spot
        node or a partition, and Ray has not declared the node dead yet; that takes its health checks some
        seconds) is pinged again until Ray decides, for up to `verdict_s`: our actors never restart, so
        unavailable ends as answered (a transient fault: it stays) or dead (it leaves). Undecided after
        `verdict_s`, it stays."""
        status: dict[int, str] = {}  # member index -> "alive" | "dead"
        deadline = time.monotonic() + verdict_s
        while True:
            undecided = [i for i in range(len(self.actors)) if i not in status]
            refs = [self.actors[i].ping.remote() for i in undecided]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)  # one deadline for all
            retry = []
            for i, ref in zip(undecided, refs):
                try:
                    if ref in done:
                        ray.get(ref)
                    status[i] = "alive"  # answered, or busy past the deadline: not known to be dead
                except ray.exceptions.ActorUnavailableError:
                    retry.append(i)  # unreachable for now: dead or back, Ray will tell
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                    status[i] = "dead"
                    ray.kill(self.actors[i], no_restart=True)
            if not retry or time.monotonic() > deadline:
                status.update({i: "alive" for i in retry})
                break
            time.sleep(1.0)
        lost = sum(v == "dead" for v in status.values())
        keep = [i for i in range(len(self.actors)) if status[i] == "alive"]
        self.actors, self.bundles = [self.actors[i] for i in keep], [self.bundles[i] for i in keep]
        return lost

    def grow(self, target: int, wait_s: float = 0.0) -> list:
        """Start members on free bundles until `target` are running or starting, then admit the ones that are
        ready within `wait_s` seconds (0: only those already up). Returns the newly admitted actors."""
        taken = set(self.bundles) | {b for _, _, b in self.pending}
        for bundle in [b for b in range(len(self.pg.bundle_specs)) if b not in taken]:
            if len(self.actors) + len(self.pending) >= target:
                break
            actor = self._start(bundle)
            self.pending.append((actor, actor.ping.remote(), bundle))
        if not self.pending:
            return []
        ready, _ = ray.wait([r for _, r, _ in self.pending], num_returns=len(self.pending), timeout=wait_s)
        admitted, still = [], []
        for actor, ref, bundle in self.pending:
            if ref not in ready:
                still.append((actor, ref, bundle))
                continue
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                ray.kill(actor, no_restart=True)  # died while starting: its bundle is free for the next try
                continue
            self.actors.append(actor)
            self.bundles.append(bundle)
            admitted.append(actor)
        self.pending = still
        return admitted

    def __len__(self) -> int:
        return len(self.actors)

    def node_ids(self) -> list[str]:
        """The Ray node id (hex) each member runs on, in `self.actors` order: the node its bundle is placed on
        now (after a node is lost, Ray moves the bundle to another node and a replacement starts there)."""
        where = ray.util.placement_group_table(self.pg).get("bundles_to_node_id", {})
        return [where.get(b, "") for b in self.bundles]

    def call(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """Submit the same call to every member; returns one ref per member (no waiting)."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_each(self, method: str, args_per_rank: list[tuple], num_returns: int = 1) -> list[Any]:
        """Submit rank-specific positional arguments to every member."""
        return [getattr(a, method).options(num_returns=num_returns).remote(*args)
                for a, args in zip(self.actors, args_per_rank)]

    def run(self, method: str, *args, **kwargs) -> list[Any]:
        """Call every member and wait once for all of them."""
        return ray.get(self.call(method, *args, **kwargs))

    def shutdown(self) -> None:
        for a in self.actors + [p[0] for p in self.pending]:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)
