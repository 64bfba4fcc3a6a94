"""Several Ray nodes on one machine (Ray's own test cluster, real raylets on 127.0.0.1), one pool per role
(placement.node_roles), and the loss of a whole node while the job runs: the rollout node (its workers leave,
the step is redone, replacements join on a new node) and the student's node (a restart from the last
complete checkpoint that ends with the weights of a run never interrupted).

The job runs as a subprocess joining the cluster (`ray_address=`); this process owns the nodes and takes them
away. EOPD_HOLD_FILE (actors/runtime/faults.py::hold_after) holds the job after step 2, so that the node goes
away at a known point however fast the tiny steps are (a tenth of a second each).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from test_e2e_ray import ROOT, SCRIPT, SMALL, _env, final_weights

pytestmark = pytest.mark.e2e

ROLES = ("rollout", "teacher", "student")
# One update per step (mini-batch = batch), so pi/pi_old is 1 unless a worker sampled with stale weights.
ARGS = ["trainer.max_steps=4", "trainer.save_every=2", "eval.enabled=false", "trainer.batch_size=6",
        "trainer.mini_batch_size=6", "rollout.num_workers=2", "placement.node_roles=true"]
WAIT_S = 600  # generous: a loaded 2-core machine; Ray declares an unannounced dead node after ~10-30 s
NODES = re.compile(r"\[nodes\] (\w+) (\d+): node ([0-9a-f]+)")


class RoleCluster:
    """A head with no CPUs (the job's driver attaches there) and one node per role offering `eopd_<role>`."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, node_ip_address="127.0.0.1", include_dashboard=False))
        self.nodes: dict = {}  # role -> its node now (ray._private.node.Node)
        for role in ROLES:
            self.add(role)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, role: str):
        """A new node for `role`'s pool (2 logical CPUs: its group needs at most 2 x 0.5)."""
        node = self.cluster.add_node(num_cpus=2, resources={f"eopd_{role}": 100}, node_ip_address="127.0.0.1")
        self.nodes[role] = node
        return node

    def lose(self, role: str, graceful: bool) -> str:
        """Take `role`'s node away as a lost machine goes: its raylet and every process it started. remove_node
        alone stops the raylet but may leave the actors' worker processes running, orphaned and still
        answering calls, which no lost machine does. graceful: the raylet is asked to stop first (SIGTERM, a pod
        evicted); else everything is killed at once (a spot node gone), and Ray learns of it only when the
        node misses its health checks. Returns the lost node's id."""
        import psutil  # shipped with Ray (ray/thirdparty_files)
        from ray._private import ray_constants

        node = self.nodes.pop(role)
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
        children = psutil.Process(raylet.pid).children(recursive=True)
        if not graceful:
            _kill(children)
        self.cluster.remove_node(node, allow_graceful=graceful)
        _kill(children)
        psutil.wait_procs(children, timeout=60)
        return node.node_id

    def shutdown(self) -> None:
        self.cluster.shutdown()


def _kill(procs) -> None:
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def cluster():
    # Ray writes the cluster's address to $RAY_TMPDIR/ray/ray_current_cluster (default /tmp/ray), where a bare
    # ray.init() elsewhere on this machine would find and join it: keep it, and the nodes' sessions, private.
    tmp = tempfile.mkdtemp(prefix="eopd_mn_", dir="/tmp")  # short: Ray's socket paths live under it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        roles = RoleCluster()
        try:
            yield roles
        finally:
            roles.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


class Job:
    """train_eopd.py joined to the cluster, its output in a file (never a pipe that could fill and block it)."""

    def __init__(self, out: Path, tiny_models, cluster: RoleCluster, hold_after: int = 0, extra: tuple = ()):
        teacher, student = tiny_models
        env = _env()
        if hold_after:
            self.hold = out.parent / f"{out.name}.hold"
            self.hold.write_text(str(hold_after))
            env["EOPD_HOLD_FILE"] = str(self.hold)
        self.out, self.log_path = out, out.parent / f"{out.name}.log"
        cmd = [sys.executable, str(SCRIPT), "--out", str(out), f"model.teacher={teacher}",
               f"model.student={student}", *SMALL, *ARGS, *extra, f"ray_address={cluster.address}"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, not_before: str = "") -> None:
        """Until `text` is in the job's output; fails if the job ends first, if `not_before` shows up first
        (the job took another path: fail now, not after WAIT_S), or after WAIT_S."""
        deadline = time.monotonic() + WAIT_S
        while text not in self.log:
            if not_before and not_before in self.log:
                raise AssertionError(f"{not_before!r} before {text!r} in the job's output:\n{self.log[-6000:]}")
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended ({self.proc.returncode}) before printing {text!r}:\n"
                                     f"{self.log[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the job's output after {WAIT_S} s:\n{self.log[-6000:]}")
            time.sleep(0.2)

    def release(self) -> None:
        self.hold.unlink()

    def finish(self, expect: int = 0) -> str:
        try:
            self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the job did not finish within {WAIT_S} s:\n{self.log[-6000:]}")
        assert self.proc.returncode == expect, f"the job ended with {self.proc.returncode}:\n{self.log[-6000:]}"
        return self.log

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _nodes(text: str) -> dict[tuple[str, int], str]:
    """{(role, index): node id} from the job's `[nodes]` lines (the last line of each actor wins)."""
    return {(m[1], int(m[2])): m[3] for m in NODES.finditer(text)}


def _metrics(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["train"]["metrics"]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    for k in wa:  # no update applied twice or lost (the tolerance of tests/test_faults_e2e.py)
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def clean_run(cluster, tiny_models, tmp_path_factory):
    """The uninterrupted run of ARGS on the three role nodes: the placement test reads it, the node-loss tests
    compare with it. Returns (out dir, log, {role: node id} of the cluster it ran on)."""
    out = tmp_path_factory.mktemp("multinode") / "clean"
    job = Job(out, tiny_models, cluster)
    try:
        log = job.finish()
    finally:
        job.kill()
    return out, log, {role: node.node_id for role, node in cluster.nodes.items()}


def test_each_role_runs_on_the_node_of_its_pool(clean_run):
    out, log, node_of = clean_run
    assert len(set(node_of.values())) == 3
    for role in ROLES:  # the plan says where each role may go
        assert re.search(rf"{role}\s+x\d+: bundle .*'eopd_{role}': 0\.001.* on nodes offering eopd_{role}", log), role
    where = _nodes(log)
    assert sorted(where) == [("rollout", 0), ("rollout", 1), ("student", 0), ("teacher", 0)]
    for (role, _), node_id in where.items():  # and Ray put every actor there
        assert node_id == node_of[role], (role, node_id, node_of)
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]


def test_losing_the_rollout_node_redoes_the_step_on_a_new_one(cluster, clean_run, tiny_models, tmp_path):
    # Killed at once (a spot node gone): Ray calls its actors unavailable until the health checks declare the
    # node dead; the rollout workers must then leave (not trigger a rebuild that waits for a rollout node).
    job = Job(tmp_path / "run", tiny_models, cluster, hold_after=2)
    try:
        job.wait_for("[hold] after step 2")
        lost = cluster.lose("rollout", graceful=False)
        job.release()
        job.wait_for("[elastic] 2 rollout worker(s) left at step 3; 0 still working", not_before="[fault]")
        new = cluster.add("rollout").node_id
        log = job.finish()
    finally:
        job.kill()
    assert "[elastic] 2 rollout worker(s) joined; 2 working" in log
    assert "[fault]" not in log  # handled without rebuilding the actors
    joined = _nodes(log[log.index("rollout worker(s) joined"):])
    assert joined == {("rollout", 0): new, ("rollout", 1): new} and new != lost
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3 redone, none lost or logged twice
    assert [r["rollout/workers"] for r in rows] == [2, 2, 2, 2]
    for r in rows:  # the replacements sampled with the student's current weights
        assert r["pg/ratio_mean"] == pytest.approx(1.0, abs=1e-4), r["step"]
    # the post-sync check, done after step 1, runs again for the newcomers in the redone step 3
    assert [("sync/check_max_abs" in r) for r in rows] == [True, False, True, False]
    assert rows[2]["sync/check_conclusive"] == 1.0 and rows[2]["sync/check_max_abs"] < 1e-3
    # Step 3 resampled with the same seeds and weights: the same run as the uninterrupted one.
    _same_weights(clean_run[0], tmp_path / "run")


def test_losing_the_student_node_restarts_from_the_last_checkpoint(cluster, clean_run, tiny_models, tmp_path):
    # Stopped the way an evicted pod is (its raylet asked to stop first): the student dies in step 3, every
    # group is rebuilt from step 2's checkpoint once a node offering eopd_student is back.
    job = Job(tmp_path / "run", tiny_models, cluster, hold_after=2)
    try:
        job.wait_for("[hold] after step 2")
        lost = cluster.lose("student", graceful=True)
        job.release()
        job.wait_for("[fault]")
        new = cluster.add("student").node_id
        log = job.finish()
    finally:
        job.kill()
    assert log.count("[fault]") == 1
    assert re.search(r"\[fault\] \w+ at step 3: .* rebuilding the actors from \S+step_000002", log)
    rebuilt = _nodes(log[log.index("[fault]"):])
    assert rebuilt[("student", 0)] == new and new != lost
    a, b = _metrics(clean_run[0]), _metrics(tmp_path / "run")
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # steps 3-4 replayed once, none logged twice
    for ra, rb in zip(a, b):
        assert rb["loss/total"] == pytest.approx(ra["loss/total"], rel=1e-5, abs=1e-7), ra["step"]
    _same_weights(clean_run[0], tmp_path / "run")


def test_a_lost_node_that_never_returns_stops_the_run_after_the_bounded_wait(cluster, tiny_models, tmp_path):
    # The student's node goes away for good: the rebuild waits trainer.place_wait_s for a node offering
    # eopd_student, then the run stops with exit status 5, an error naming the group it could not place and
    # what the cluster lacks, and step 2's checkpoint as it was written.
    from eopd_ray import checkpoint

    out = tmp_path / "run"
    job = Job(out, tiny_models, cluster, hold_after=2, extra=("trainer.place_wait_s=15",))
    try:
        job.wait_for("[hold] after step 2")
        saved = {p.name: p.read_bytes() for p in (out / "checkpoints" / "step_000002" / "hf").iterdir()}
        cluster.lose("student", graceful=True)
        job.release()
        t0 = time.monotonic()
        log = job.finish(expect=5)
        waited = time.monotonic() - t0
    finally:
        job.kill()
        cluster.add("student")  # the module's other tests need the pool back
    assert log.count("[fault]") == 1
    assert re.search(r"error: actor group 'student' \(1 student actor\(s\)\): the cluster could not place 1 x "
                     r"\{.*'eopd_student': 0\.001\} within 15 s \(trainer\.place_wait_s\) \(eopd_student: needs "
                     r"0\.001, the cluster has 0\)", log), log[-3000:]
    assert "step_000002, is intact: continue with --resume" in log
    assert waited >= 15
    assert checkpoint.latest(out / "checkpoints").name == "step_000002"
    assert {p.name: p.read_bytes() for p in (out / "checkpoints" / "step_000002" / "hf").iterdir()} == saved
