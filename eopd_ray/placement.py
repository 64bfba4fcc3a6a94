"""The placement plan: which actor runs on which GPUs of which node, and the Ray bundles that ask for them.

No Ray and no GPU needed, so `train_eopd.py --dry-run` can print the plan on a CPU machine and the
config can refuse an impossible layout before anything starts.

Three modes (`placement.mode`):
- `cpu`: today's pipeline. Every actor gets one bundle `{"CPU": num_cpus}` of its own group; no GPU is asked for.
- `disaggregated`: separate GPU pools. Each student rank and each teacher worker takes one whole GPU, each
  rollout engine `rollout.tensor_parallel_size` whole GPUs on one node. The intended layout fills the nodes in
  order: student ranks first (their ZeRO collectives stay inside a node when they fit), then teachers, then
  engines. Each role is one placement group with PACK, so Ray puts it on as few nodes as it can; the node and
  GPU numbers printed are the layout we expect, Ray picks the physical devices.
- `colocated`: every role shares every GPU. One placement group holds one `{"GPU": 1}` bundle per GPU; student
  rank i, rollout engine i and teacher worker i are scheduled into bundle i with the fractions in
  `COLOCATED_SHARE` (Ray bookkeeping only; the memory is shared in time: vLLM sleeps while the student trains).
  The weight sync then goes GPU-local through CUDA IPC, so every engine needs a student rank on its GPU and
  engines use one GPU each (tensor parallelism across GPUs is offered in disaggregated mode).

`placement.node_roles` (cpu and disaggregated modes): node pools per role. Every bundle of a role also asks
for `ROLE_RESOURCE_AMOUNT` of the custom Ray resource `eopd_<role>`, so Ray places it only on nodes started
with that resource (`ray start --resources='{"eopd_rollout": 100}'`, a KubeRay worker group's
rayStartParams). In disaggregated mode each role then fills nodes of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eopd_ray.errors import ConfigError
from eopd_ray.teacher_config import teacher_groups

ROLES = ("student", "teacher", "rollout")
# Ray num_gpus per actor when the three roles share one GPU (they must add up to at most 1).
COLOCATED_SHARE = {"student": 0.4, "rollout": 0.4, "teacher": 0.2}
# placement.node_roles: what each bundle asks of its pool's resource. Small, so that a node offering e.g.
# {"eopd_rollout": 100} is limited by its CPUs and GPUs, never by this bookkeeping resource.
ROLE_RESOURCE_AMOUNT = 0.001


def role_resource(role: str) -> str:
    """The custom Ray resource a node offers to take actors of `role` (placement.node_roles)."""
    return f"eopd_{role}"


def role_resources(cfg: Any, role: str) -> dict[str, float]:
    """What each bundle of `role` asks for besides CPUs and GPUs: {} unless placement.node_roles."""
    return {role_resource(role): ROLE_RESOURCE_AMOUNT} if cfg.placement.node_roles else {}


class PlacementError(ConfigError):
    """The requested actors cannot be placed on the configured nodes and GPUs."""


@dataclass(frozen=True)
class Slot:
    """One actor: its role and rank, the node it is meant for and the GPU indices it uses on that node."""

    role: str
    rank: int
    node: int | None  # None on CPU: Ray may put the actor anywhere
    gpus: tuple[int, ...]
    num_gpus: float  # what the actor asks Ray for (0 on CPU; a fraction when colocated)
    num_cpus: float
    bundle: int  # index of its bundle in its placement group (the shared group when colocated)


@dataclass(frozen=True)
class PlacementPlan:
    mode: str
    num_nodes: int
    gpus_per_node: int
    slots: tuple[Slot, ...]
    # Bundles per placement group: {"student": [...], ...}, or {"shared": [...]} when colocated.
    bundles: dict[str, list[dict[str, float]]]

    def role(self, role: str) -> list[Slot]:
        return [s for s in self.slots if s.role == role]

    def num_gpus(self, role: str) -> float:
        """Ray num_gpus of one actor of `role` (the same for every member of a group)."""
        slots = self.role(role)
        return slots[0].num_gpus if slots else 0.0

    @property
    def gpus_used(self) -> int:
        return len({(s.node, g) for s in self.slots for g in s.gpus})

    @property
    def has_gpus(self) -> bool:
        return self.mode != "cpu"


def _counts(cfg: Any) -> dict[str, int]:
    teachers = sum(g.teacher.num_workers for g in teacher_groups(cfg))  # every group's workers
    return {"student": cfg.trainer.num_ranks, "teacher": teachers, "rollout": cfg.rollout.num_workers}


def _cpus(cfg: Any) -> dict[str, float]:
    return {"student": cfg.trainer.num_cpus, "teacher": cfg.teacher.num_cpus, "rollout": cfg.rollout.num_cpus}


def _fail(path: str, value: Any, allowed: str, fix: str) -> None:
    raise PlacementError(f"config value {path}={value!r} is invalid: allowed {allowed}. Fix: {fix}")


def plan_placement(cfg: Any) -> PlacementPlan:
    """The plan of a RunConfig (whose sections are already validated one by one)."""
    p = cfg.placement
    counts, cpus = _counts(cfg), _cpus(cfg)
    if p.mode == "cpu":
        slots = tuple(Slot(r, i, None, (), 0.0, cpus[r], i) for r in ROLES for i in range(counts[r]))
        return PlacementPlan("cpu", p.num_nodes, 0, slots,
                             {r: [{"CPU": cpus[r], **role_resources(cfg, r)}] * counts[r] for r in ROLES})
    if p.mode == "colocated":
        if p.node_roles:
            _fail("placement.node_roles", True, "false with placement.mode=colocated (every role shares every "
                  "GPU, so no node can serve one role only)",
                  "set placement.mode=disaggregated for node pools per role, or placement.node_roles=false")
        return _colocated(cfg, counts, cpus)
    return _disaggregated(cfg, counts, cpus)


def _colocated(cfg: Any, counts: dict[str, int], cpus: dict[str, float]) -> PlacementPlan:
    p, tp = cfg.placement, cfg.rollout.tensor_parallel_size
    total = p.num_nodes * p.gpus_per_node
    if tp != 1:
        _fail("rollout.tensor_parallel_size", tp, "1 with placement.mode=colocated (each engine shares one GPU "
              "with a student rank, and the weight sync is GPU-local CUDA IPC)",
              "set rollout.tensor_parallel_size=1, or placement.mode=disaggregated for tensor parallelism")
    for role, field in (("student", "trainer.num_ranks"), ("teacher", "teacher.num_workers"),
                        ("rollout", "rollout.num_workers")):
        if counts[role] > total:
            _fail(field, counts[role], f"at most the {total} GPUs of placement.num_nodes={p.num_nodes} x "
                  f"gpus_per_node={p.gpus_per_node} in colocated mode (one {role} per GPU)",
                  f"lower {field} or add GPUs (placement.num_nodes / placement.gpus_per_node)")
    if counts["rollout"] > counts["student"]:
        _fail("rollout.num_workers", counts["rollout"],
              f"at most trainer.num_ranks={counts['student']} in colocated mode (engine i receives its weights "
              "over CUDA IPC from student rank i on the same GPU)",
              "raise trainer.num_ranks to the number of engines, or use placement.mode=disaggregated")
    slots, bundle_cpus = [], [0.0] * total
    for role in ROLES:
        for i in range(counts[role]):
            slots.append(Slot(role, i, i // p.gpus_per_node, (i % p.gpus_per_node,), COLOCATED_SHARE[role],
                              cpus[role], i))
            bundle_cpus[i] += cpus[role]
    used = max(counts.values())
    bundles = [{"CPU": bundle_cpus[i], "GPU": 1.0} for i in range(used)]
    return PlacementPlan("colocated", p.num_nodes, p.gpus_per_node, tuple(slots), {"shared": bundles})


def _disaggregated(cfg: Any, counts: dict[str, int], cpus: dict[str, float]) -> PlacementPlan:
    p, tp = cfg.placement, cfg.rollout.tensor_parallel_size
    total = p.num_nodes * p.gpus_per_node
    if tp > p.gpus_per_node:
        _fail("rollout.tensor_parallel_size", tp, f"at most placement.gpus_per_node={p.gpus_per_node} (an engine's "
              "tensor-parallel GPUs must share one node)",
              "lower rollout.tensor_parallel_size or use nodes with more GPUs")
    need = counts["student"] + counts["teacher"] + counts["rollout"] * tp
    if p.node_roles:  # each role on nodes of its own: whole nodes per role
        widths = {"student": 1, "teacher": 1, "rollout": tp}
        nodes = sum(-(-counts[r] // (p.gpus_per_node // widths[r])) for r in ROLES)
        if nodes > p.num_nodes:
            _fail("placement.num_nodes", p.num_nodes,
                  f"at least {nodes} nodes with placement.node_roles=true (each role on nodes of its own, "
                  f"{p.gpus_per_node} GPUs each, for {counts['student']} student ranks, {counts['teacher']} "
                  f"teacher workers and {counts['rollout']} rollout engines x tensor_parallel_size {tp})",
                  f"set placement.num_nodes={nodes}, or placement.node_roles=false to share nodes between roles")
    if need > total:
        _fail("placement.num_nodes", p.num_nodes,
              f"enough nodes for {need} GPUs ({counts['student']} student ranks + {counts['teacher']} teacher "
              f"workers + {counts['rollout']} rollout engines x tensor_parallel_size {tp}); "
              f"{p.num_nodes} x {p.gpus_per_node} = {total}",
              "raise placement.num_nodes or placement.gpus_per_node, lower the worker counts, "
              "or share the GPUs with placement.mode=colocated")
    free = [p.gpus_per_node] * p.num_nodes  # GPUs left per node, filled in order
    slots = []
    for role in ROLES:
        width = tp if role == "rollout" else 1
        if p.node_roles:  # a role never shares a node: close the nodes earlier roles have touched
            free = [0 if f < p.gpus_per_node else f for f in free]
        for i in range(counts[role]):
            node = next((n for n in range(p.num_nodes) if free[n] >= width), None)
            if node is None:
                _fail("rollout.tensor_parallel_size", tp,
                      f"a size whose engines fit whole on the GPUs left per node ({free}); rollout engine {i} "
                      f"needs {tp} GPUs on one node",
                      "use a tensor_parallel_size that divides placement.gpus_per_node, or fewer workers")
            first = p.gpus_per_node - free[node]
            free[node] -= width
            slots.append(Slot(role, i, node, tuple(range(first, first + width)), float(width), cpus[role], i))
    bundles = {r: [{"CPU": cpus[r], "GPU": float(tp if r == "rollout" else 1), **role_resources(cfg, r)}]
               * counts[r] for r in ROLES}
    return PlacementPlan("disaggregated", p.num_nodes, p.gpus_per_node, tuple(slots), bundles)


def actor_threads(plan: PlacementPlan, role: str, cores: int, override: int = 0) -> int:
    """Torch threads of one actor of `role`: `override` (placement.actor_threads) when set; else the Ray CPUs its
    slot in `plan` reserves (floor, at least 1), so actors that run at once (rollout.overlap, several ranks) do
    not oversubscribe the cores; an actor on GPUs that reserves under one Ray CPU gets its GPUs' share of the
    node's `cores` (colocated actors take turns on a GPU, so each gets that GPU's whole share). At most `cores`."""
    if override:
        return override
    slots = plan.role(role)
    num_cpus = slots[0].num_cpus if slots else 1.0
    threads = max(1, int(num_cpus))
    if num_cpus < 1 and plan.has_gpus and slots and slots[0].gpus:
        threads = max(1, cores * len(slots[0].gpus) // plan.gpus_per_node)
    return min(threads, max(1, cores))


# glibc's malloc settings, read from the environment when a process starts (glibc manual, "Memory Allocation
# Tunables"); Ray sets an actor's runtime_env env_vars before its worker process starts.
ALLOCATOR_ENV_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def allocator_env(retain_mib: int, environ: dict[str, str]) -> dict[str, str]:
    """Environment of every actor process: glibc keeps up to `retain_mib` MiB of freed memory mapped (trim
    threshold) and serves blocks up to that size from its heap (mmap threshold), instead of handing them back
    to the kernel at each free. A phase allocates the same buffers every step (activations, logit chunks); with
    glibc's defaults (blocks over at most 32 MiB mapped one by one, the heap trimmed when it is idle) an actor
    that sleeps between phases pays page faults for all of them again each step. {} when `retain_mib` is 0 or
    the user set either variable or GLIBC_TUNABLES in `environ` (their own choice stands). No effect where the
    C library is not glibc."""
    if not retain_mib or "GLIBC_TUNABLES" in environ or any(v in environ for v in ALLOCATOR_ENV_VARS):
        return {}
    return dict.fromkeys(ALLOCATOR_ENV_VARS, str(int(retain_mib) << 20))


def cpu_block(rank: int, num_cpus: float, cores: list[int]) -> list[int]:
    """The cores actor `rank` of a group pins its threads to: blocks of max(1, floor(num_cpus)) of `cores`
    (the node's usable cores, in order), one after another, wrapping around when the group needs more cores
    than the node has. Ray counts CPUs but does not name them, so the group's members share them out this way."""
    width = min(max(1, int(num_cpus)), len(cores))
    start = (rank * width) % len(cores)
    return [cores[(start + i) % len(cores)] for i in range(width)]


def _gpu_list(gpus: tuple[int, ...]) -> str:
    return f"GPU {gpus[0]}" if len(gpus) == 1 else f"GPUs {gpus[0]}-{gpus[-1]}"


def format_plan(cfg: Any) -> str:
    """A human-readable plan for `--dry-run`: one line per node listing its actors, then the Ray bundles."""
    plan = plan_placement(cfg)
    counts = _counts(cfg)
    pools = cfg.placement.node_roles
    if not plan.has_gpus:
        lines = ["placement: cpu (no GPU requested; " + ("each role only on nodes offering its resource, "
                 "placement.node_roles)" if pools else "Ray places the actors on any node)")]
        for role in ROLES:
            where = f", on nodes offering {role_resource(role)}" if pools else ""
            lines.append(f"  {role:8s} x{counts[role]}: bundle {plan.bundles[role][0]} each{where}")
            if role == "teacher" and cfg.teachers:
                lines.append("    one group per teacher: " + ", ".join(
                    f"{g.name} x{g.teacher.num_workers} ({g.model}, tokenizer {g.teacher.tokenizer})"
                    for g in teacher_groups(cfg)))
        return "\n".join(lines + _teacher_line(cfg))
    total = plan.num_nodes * plan.gpus_per_node
    lines = [f"placement: {plan.mode}, {plan.num_nodes} node(s) x {plan.gpus_per_node} GPUs = {total}, "
             f"{plan.gpus_used} used"]
    for node in range(plan.num_nodes):
        here = [s for s in plan.slots if s.node == node]
        if not here:
            lines.append(f"  node {node}: idle")
            continue
        if plan.mode == "colocated":  # several actors per GPU: list them by GPU
            by_gpu: dict[int, list[str]] = {}
            for s in here:
                by_gpu.setdefault(s.gpus[0], []).append(f"{s.role} {s.rank}")
            desc = "; ".join(f"GPU {g}: {', '.join(names)}" for g, names in sorted(by_gpu.items()))
        else:
            desc = ", ".join(f"{s.role} {s.rank} on {_gpu_list(s.gpus)}" for s in sorted(here, key=lambda s: s.gpus))
        pool = f" (a node offering {role_resource(here[0].role)})" if pools else ""
        lines.append(f"  node {node}{pool}: {desc}")
    if plan.mode == "colocated":
        b = plan.bundles["shared"]
        lines.append(f"  Ray: one placement group of {len(b)} one-GPU bundles (PACK); per actor num_gpus "
                     + ", ".join(f"{r} {COLOCATED_SHARE[r]}" for r in ROLES)
                     + "; vLLM sleeps while the student trains; weight sync over CUDA IPC")
    else:
        for role in ROLES:
            lines.append(f"  Ray: {role} group, {counts[role]} bundles {plan.bundles[role][0]} (PACK)")
        lines.append("  weight sync: NCCL broadcast from student rank 0 to every engine worker")
    return "\n".join(lines + _teacher_line(cfg))


def _teacher_line(cfg: Any) -> list[str]:
    t = cfg.teacher
    if t.zero_stage != 3:
        return []
    where = ("host memory, streamed in layer by layer" if t.offload == "cpu" else
             "GPU memory" if plan_placement(cfg).has_gpus else "memory")
    lines = [f"  teacher: ZeRO-3 inference, each of the {t.num_workers} workers holds 1/{t.num_workers} of the "
             f"parameters in {where}"]
    if cfg.eval.enabled and cfg.eval.teacher:
        lines.append("  note: the final evaluation loads the teacher whole on every rollout worker; "
                     "eval.teacher=false skips it")
    if cfg.loss.spec.samples_from_teacher:
        lines.append(f"  note: loss.objective={cfg.loss.objective} samples from the teacher loaded whole on every "
                     "rollout worker")
    return lines
