"""Splitting a mini-batch does not change the update: row pieces of one call (micro-batches) and shares of
several ranks, each gated before any forward and divided by the mini-batch's global token and gated counts,
give the loss, the gradients and the weights of the unsplit mini-batch, for either forward-KL normaliser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.runtime.dist import free_port
from actors.teacher.scorer import TeacherScorer
from eopd_ray.batch import list_rows
from eopd_ray.config import LossConfig
from eopd_ray.losses import eopd_loss
from eopd_ray.objectives import objective_gate
from tests.test_losses import F64, make_batch, ref_eopd
from tests.test_workers import BUDGET, K, _max_diff, _new_trainer, _weights, setup  # noqa: F401 (fixture)

WORKER = Path(__file__).with_name("student_rank_worker.py")
@pytest.mark.parametrize("normalizer", ["all_tokens", "gated_tokens"])
@pytest.mark.parametrize("objective", ["eopd", "full_fkl", "random_fkl"])
def test_pieces_gated_first_sum_to_the_whole_batch(objective, normalizer):
    """A mini-batch cut into row pieces (as micro-batches and ranks take it), every piece gated by
    `objective_gate` before any loss, as the trainer does: with the global token and gated counts the pieces'
    losses and gradients sum to the float64 loop over the whole batch with the same gates, for either
    normaliser. The gate is the objective's own, and eopd_loss draws the same one when not given it."""
    g = torch.Generator().manual_seed(23)
    _, tokens, old, teacher, mask = make_batch(B=5, T=6, V=11, seed=23)
    mask[:2, :] = True  # unequal pieces: per-piece means would not sum to the whole batch's mean
    h = torch.randn(5, 6, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    cfg = LossConfig(objective=objective, fkl_normalizer=normalizer, random_fraction=0.4)
    n_tok, pieces = int(mask.sum()), (slice(0, 1), slice(1, 3), slice(3, 5))
    gen = torch.Generator().manual_seed(4)
    gates = [objective_gate(cfg, mask[sl], teacher.index(sl), old[sl], n_tok, gen, dtype=torch.float64)
             for sl in pieces]
    gate_BT = torch.cat(gates)
    n_gated = int(gate_BT.sum())
    assert 0 < n_gated < n_tok or objective == "full_fkl"
    if objective == "eopd":  # eq. 9, by hand
        assert torch.equal(gate_BT, mask & (teacher.entropy > cfg.tau))
    parts, g_sum = [], torch.zeros_like(w)
    for sl, gate in zip(pieces, gates):
        part, m = eopd_loss(h[sl] @ w, tokens[sl], old[sl], teacher.index(sl), mask[sl], cfg, num_tokens=n_tok,
                            num_gated=n_gated, gate=gate, generator=torch.Generator().manual_seed(99))
        assert m["tokens/gated"] == int(gate.sum())  # the gate given, not one drawn from this generator
        g_sum += torch.autograd.grad(part, w)[0]
        parts.append(part.item())
    ref = ref_eopd(h @ w, tokens, old, teacher, mask, cfg, gate=gate_BT)
    (g_ref,) = torch.autograd.grad(ref, w)
    assert sum(parts) == pytest.approx(ref.item(), rel=0, abs=1e-12)
    assert torch.allclose(g_sum, g_ref, **F64)
    # Without a gate eopd_loss draws the same one from a generator in the same state: the same losses.
    again = torch.Generator().manual_seed(4)
    for sl, part in zip(pieces, parts):
        drawn, _ = eopd_loss(h[sl] @ w, tokens[sl], old[sl], teacher.index(sl), mask[sl], cfg, num_tokens=n_tok,
                             num_gated=n_gated, generator=again)
        assert drawn.item() == part
    if normalizer == "gated_tokens" and objective != "full_fkl":
        # Sensitivity: each piece divided by its own gated count does not sum to the whole batch.
        local = sum(eopd_loss(h[sl] @ w, tokens[sl], old[sl], teacher.index(sl), mask[sl], cfg, num_tokens=n_tok,
                              gate=gate)[0].item() for sl, gate in zip(pieces, gates))
        assert abs(local - ref.item()) > 1e-3


def _run_ranks(model_dir: str, world: int, runs: list[list[str]], rollout: pa.Table, teacher: pa.Table,
               tmp: Path) -> tuple[list[dict], list[list[dict]]]:
    """One process per rank, each training every run's config for one step on its share of the same rows;
    returns (rank 0's weights per run, every rank's metrics per run)."""
    for name, table in (("rollout", rollout), ("teacher", teacher)):
        with pa.ipc.new_file(str(tmp / f"{name}.arrow"), table.schema) as w:
            w.write_table(table)
    (tmp / "runs.json").write_text(json.dumps(runs))
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    procs = [subprocess.Popen([sys.executable, str(WORKER), model_dir, str(rank), str(world), str(port), str(tmp)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in range(world)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-3000:]}"
    weights = [torch.load(tmp / f"weights_{run}.pt") for run in range(len(runs))]
    metrics = [[json.loads((tmp / f"metrics_{run}_{rank}.json").read_text()) for rank in range(world)]
               for run in range(len(runs))]
    return weights, metrics


@pytest.mark.e2e
def test_two_ranks_with_micro_batches_give_the_update_of_one_rank(setup, tmp_path):  # noqa: F811
    """Two trainer ranks over gloo, each cutting its 4-row share of every 8-row mini-batch into micro-batches
    (a different number per rank before they agree on one), land on the weights and metrics of one rank
    running each mini-batch in one forward, for both normalisers. Before the trainer passed the global gated
    count, gated_tokens divided each rank's and each piece's forward KL by its own count."""
    tok, table = setup["tok"], setup["table"]
    scored, _ = TeacherScorer(setup["teacher"], top_k=K, vocab_size=len(tok), pad_id=tok.pad_token_id).score(table)
    # tau at the median teacher entropy: about half the positions gated, a different share per rank and piece
    tau = float(np.median(np.concatenate(list_rows(scored.column("teacher_entropy")))))
    common = ["trainer.batch_size=16", "trainer.mini_batch_size=8", "trainer.max_steps=4", "trainer.lr=1e-4",
              f"loss.tau={tau!r}"]
    normalizers = ("all_tokens", "gated_tokens")
    runs = [[*common, f"loss.fkl_normalizer={n}", f"trainer.micro_batch_tokens={BUDGET}"] for n in normalizers]
    weights, metrics = _run_ranks(setup["student"], 2, runs, table, scored, tmp_path)
    for normalizer, w_ranks, m_ranks in zip(normalizers, weights, metrics):
        one = _new_trainer(setup, f"loss.tau={tau!r}", f"loss.fkl_normalizer={normalizer}", lr=1e-4)
        m_one = one.train_step(0, 1, table, scored)
        assert 0 < m_one["gate/fraction"] < 1
        w_one = _weights(one)
        moved = _max_diff(w_one, {n: w_ranks[n] for n in w_one})
        assert moved < 1e-6, f"{normalizer}: two ranks land {moved:.3g} away from one"
        for m in m_ranks:  # every rank reports the same, reduced, metrics
            for key in m_one:
                if key != "time/train":
                    assert m[key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-7), (normalizer, key)
