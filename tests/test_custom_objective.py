"""An objective defined and registered here, outside the package, trains through the whole job (Ray actors
included), and the README's "Write your own objective" / "Write your own loop" examples run as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from eopd_ray.objectives import Objective, register, unregister
from eopd_ray.objectives.fkl import entropy_gate
from tests.test_e2e_ray import ROOT, SMALL, _env

pytestmark = pytest.mark.e2e


def no_policy_gradient(inputs, cfg, pg_BT):
    """Only the gated forward KL trains: the policy term is zero (with a gradient path, as the core expects)."""
    return 0.0 * inputs.masked_mean(pg_BT)


def test_registered_objective_trains_through_the_job(tmp_path, tiny_models):
    from actors.driver.build import init_ray
    from actors.driver.loop import train
    from actors.driver.prepare import open_run, prepare
    from actors.driver.session import Session
    from eopd_ray.run_setup import resolve_config

    register(Objective("gated_fkl_only", "EOPD's gated forward KL alone", gate=entropy_gate,
                       policy_term=no_policy_gradient, trains_fkl=True))
    try:
        teacher, student = tiny_models
        cfg = resolve_config(None, [f"model.teacher={teacher}", f"model.student={student}", *SMALL,
                                    "loss.objective=gated_fkl_only", "trainer.max_steps=2", "eval.enabled=false"],
                             out=str(tmp_path / "run"))
        run = prepare(cfg)
        log = open_run(run)
        init_ray()
        session = Session.build(run.cfg, run.models)
        try:
            assert train(run, session, log)
        finally:
            session.shutdown()
            import ray

            ray.shutdown()
    finally:
        unregister("gated_fkl_only")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # the student actor ran this file's objective: no policy term, the gated forward KL only
    assert all(r["loss/pg"] == 0.0 and r["loss/fkl"] > 0 and r["loss/total"] == pytest.approx(r["loss/fkl"])
               for r in rows)
    from safetensors.torch import load_file

    before = load_file(str(tiny_models[1] + "/model.safetensors"))
    after = load_file(str(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1] / "hf" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def readme_block(title: str) -> str:
    """The first ```python block after the README heading `title`."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"### {title}"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_objective_and_loop_examples_run(tmp_path, tiny_models):
    script = tmp_path / "example.py"
    script.write_text(readme_block("Write your own objective") + "\n" + readme_block("Write your own loop"))
    teacher, student = tiny_models
    proc = subprocess.run([sys.executable, str(script), f"out_dir={tmp_path / 'run'}", f"model.teacher={teacher}",
                           f"model.student={student}", *SMALL], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss/total"]) and r["loss/pg"] == 0.0 and r["loss/fkl"] > 0 for r in rows)
