"""A group of identical Ray actors placed together: one placement group, ranks, call-all-and-wait-once."""

from __future__ import annotations

from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class ActorGroup:
    """`n` actors of `actor_cls`, one per bundle of a placement group.

    kwargs_for_rank(rank) gives each member's constructor arguments. Bundles ask for `num_cpus` CPUs and
    `num_gpus` GPUs each; `strategy` PACK keeps a group on as few nodes as possible (SPREAD for
    data-parallel groups that should use several nodes).
    """

    def __init__(self, name: str, actor_cls, n: int, kwargs_for_rank: Callable[[int], dict],
                 num_cpus: float = 1.0, num_gpus: float = 0.0, strategy: str = "PACK",
                 env_vars: dict[str, str] | None = None, ready_timeout_s: float = 600.0):
        self.name = name
        bundle = {"CPU": num_cpus} if not num_gpus else {"CPU": num_cpus, "GPU": num_gpus}
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy, name=f"eopd-{name}")
        ready, _ = ray.wait([self.pg.ready()], timeout=ready_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise RuntimeError(f"actor group {name!r}: the cluster cannot place {n} x {bundle} within "
                               f"{ready_timeout_s:.0f} s; check `ray status` or lower the group size")
        self.actors = [
            actor_cls.options(
                num_cpus=num_cpus, num_gpus=num_gpus, name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": env_vars} if env_vars else None,
            ).remote(**kwargs_for_rank(i))
            for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.actors)

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
        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)
