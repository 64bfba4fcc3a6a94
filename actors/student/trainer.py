"""Student trainer ranks: DeepSpeed (ZeRO 0-3, gloo on CPU, NCCL on GPU), AdamW and a cosine schedule.

Each rank takes an equal, contiguous share of every mini-batch and calls `eopd_loss` with the GLOBAL
response-token count of the mini-batch, so the per-rank losses sum to the single-rank loss (Algorithm 1,
line 13). DeepSpeed averages gradients over ranks, so each rank's loss is multiplied by the world size to
make the applied gradient the gradient of that sum.

Token-budget micro-batches (`trainer.micro_batch_tokens` > 0): a rank's share is cut into consecutive pieces
of rows of at most that many padded prompt+response tokens; each piece calls `eopd_loss` with the same global
token count and is back-propagated on its own, and the mini-batch still takes ONE optimizer step, so the
update equals the unsplit one up to float summation order. Every rank runs the same number of pieces
(DeepSpeed's ZeRO 2/3 reduce and gather inside forward and backward, collectively).

The same holds for `loss.fkl_normalizer=gated_tokens`: every piece is gated before any forward
(`objective_gate`, from the teacher's statistics), the gated counts are summed over pieces and ranks, and
every piece divides its forward KL by that global count, with the gate it was counted with.

Devices: on CUDA with NCCL each rank uses `cuda:0` (Ray makes one GPU visible per actor) and every batch
tensor, the finiteness flag and the metric all-reduce live there; weights leave the rank as CPU copies.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from actors.runtime.dist import join_process_group, master_address
from actors.runtime.faults import maybe_fail
from eopd_ray.batch import (SequenceBatch, list_rows, pad_rows, padded_float, padded_topk, sequence_batch,
                            teacher_mask_rows)
from eopd_ray.config import LossConfig, TrainerConfig
from eopd_ray.models import load_causal_lm, load_tokenizer, output_head, set_threads
from eopd_ray.objectives import (Objective, eopd_loss, eopd_loss_from_hidden, get_objective,
                                 group_normalized_advantages, objective_gate, resolve_logits_chunk)
from eopd_ray.seeds import gate_seed
from eopd_ray.stats import TokenStats

# Metrics that are already normalised by the global token count: they add up over ranks.
_SUMMED = ("loss/total", "loss/pg", "loss/fkl", "loss/entropy")
# Means over a subset of tokens are weighted by that subset's count; all other means by masked tokens.
_WEIGHTS = {"fkl/gated_mean": "tokens/gated", "fkl/high_entropy_mean": "tokens/high_entropy"}


class NonFiniteLossError(FloatingPointError):
    """A mini-batch produced a NaN or infinite loss and trainer.on_nonfinite is `stop`."""


def cosine_schedule(total_updates: int, warmup_ratio: float, min_lr_ratio: float):
    warmup = int(total_updates * warmup_ratio)

    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / warmup
        progress = min(1.0, (update - warmup) / max(1, total_updates - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def split_rows(lengths, budget: int, num_pieces: int | None = None) -> list[tuple[int, int]]:
    """Consecutive [start, end) row ranges whose padded size (rows x longest row) is at most `budget`, each
    holding at least one row (a single row longer than the budget is a piece of its own). `num_pieces`
    (>= the greedy count, <= the number of rows) splits further, halving the largest piece, so that every
    rank can run the same number of pieces. budget <= 0: one piece."""
    n = len(lengths)
    if n == 0:
        return []
    pieces: list[tuple[int, int]] = []
    if budget <= 0:
        pieces = [(0, n)]
    else:
        start, longest = 0, 0
        for i, length in enumerate(lengths):
            wider = max(longest, int(length))
            if i > start and wider * (i + 1 - start) > budget:
                pieces.append((start, i))
                start, wider = i, int(length)
            longest = wider
        pieces.append((start, n))
    if num_pieces is not None:
        if not len(pieces) <= num_pieces <= n:
            raise ValueError(f"cannot cut {n} rows into {num_pieces} pieces (at least {len(pieces)} needed)")
        while len(pieces) < num_pieces:
            size = lambda se: (se[1] - se[0]) * max(int(x) for x in lengths[se[0]:se[1]])  # noqa: E731
            i = max((j for j, (a, b) in enumerate(pieces) if b - a > 1), key=lambda j: size(pieces[j]))
            a, b = pieces[i]
            pieces[i:i + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
    return pieces


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class StudentTrainer:
    def __init__(self, model_path: str, trainer: TrainerConfig, loss: LossConfig, rank: int, world_size: int,
                 vocab_size: int, pad_id: int, dtype: str = "float32", trust_remote_code: bool = False,
                 num_threads: int | None = None, backend: str = "gloo", n_samples: int = 1,
                 objective: Objective | None = None):
        set_threads(num_threads)
        self.model_path, self.trainer, self.loss_cfg = model_path, trainer, loss
        # Passed in (not looked up) so that an objective registered only in the driver's process trains here too.
        self.objective = objective or get_objective(loss.objective)
        self.rank, self.world_size, self.vocab_size, self.pad_id = rank, world_size, vocab_size, pad_id
        self.dtype, self.trust_remote_code, self.backend = dtype, trust_remote_code, backend
        self.n_samples = n_samples  # responses per prompt: a mini-batch is mini_batch_size * n_samples rows
        self.engine = None
        self.device = torch.device("cpu")

    # -- set-up: rank 0 publishes an address, then every rank joins at once ---------------------------
    def master_address(self) -> tuple[str, int]:
        return master_address()

    def setup(self, master_addr: str, master_port: int) -> bool:
        import deepspeed

        self.device = join_process_group(self.rank, self.world_size, master_addr, master_port, self.backend)
        t = self.trainer
        model = load_causal_lm(self.model_path, "float32", self.trust_remote_code).to(self.device)
        model.config.use_cache = False
        if t.gradient_checkpointing:  # before deepspeed.initialize; non-reentrant works with ZeRO-3's hooks
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        updates = t.max_steps * (t.batch_size // t.mini_batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_schedule(max(updates, 1), t.warmup_ratio, t.min_lr_ratio))
        ds_config = {
            "train_batch_size": t.mini_batch_size,
            "train_micro_batch_size_per_gpu": t.mini_batch_size // self.world_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": t.zero_stage},
            "bf16": {"enabled": self.dtype == "bfloat16"},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config, dist_init_required=False)
        self.tokenizer = load_tokenizer(self.model_path, self.trust_remote_code)
        # The model's own output head on hidden states (soft-capping, logit scales kept), for logits_chunk.
        self._head = output_head(self.engine.module)
        return True

    # -- training --------------------------------------------------------------------------------------
    def train_step(self, step: int, num_parts: int, *tables: pa.Table) -> dict:
        """B / B_mini optimizer updates on one iteration's rollouts.

        tables: `num_parts` rollout tables, then the `num_parts` teacher tables scored from them (passed
        flat so Ray resolves each object ref). Returns token-weighted metrics, equal on every rank.
        """
        maybe_fail("student")
        t0 = time.perf_counter()
        rollout, teacher = pa.concat_tables(tables[:num_parts]), pa.concat_tables(tables[num_parts:])
        if not np.array_equal(rollout.column("sample_id").to_numpy(), teacher.column("sample_id").to_numpy()):
            raise RuntimeError("teacher rows are not aligned with rollout rows (sample_id differs)")
        t = self.trainer
        rows = t.mini_batch_size * self.n_samples
        share = rows // self.world_size
        seq_adv = None
        if self.objective.needs_rewards:  # group-normalised within each prompt's group, over the whole batch
            rewards = torch.from_numpy(rollout.column("correct").to_numpy(zero_copy_only=False).astype(np.float64))
            seq_adv = group_normalized_advantages(rewards, torch.from_numpy(rollout.column("sample_id").to_numpy()))
        sums: dict[str, float] = {}
        self.engine.train()
        for mb, start in enumerate(range(0, rollout.num_rows, rows)):
            num_tokens = sum(len(r) for r in list_rows(rollout.column("response_ids").slice(start, rows)))
            mine = start + self.rank * share
            gen = torch.Generator().manual_seed(gate_seed(self.loss_cfg.random_seed, step, mb, self.rank))
            metrics = self._update(rollout.slice(mine, share), teacher.slice(mine, share), num_tokens, gen,
                                   None if seq_adv is None else seq_adv[mine:mine + share])
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        reduced = self._all_reduce(sums)
        n_mini = rollout.num_rows // rows
        out = {}
        for key, value in reduced.items():
            if key.startswith("_w/") or key.startswith("tokens/"):
                continue
            if key == "train/skipped_updates":
                out[key] = value / self.world_size
                continue
            if key in _SUMMED or key == "optim/grad_norm" or key == "optim/lr":
                out[key] = value / n_mini / (1 if key in _SUMMED else self.world_size)
            else:
                out[key] = value / max(reduced.get(f"_w/{key}", 0.0), 1e-12)
        out["train/tokens"] = reduced.get("tokens/masked", 0.0)
        out["time/train"] = time.perf_counter() - t0
        return out

    def _update(self, rollout: pa.Table, teacher: pa.Table, num_tokens: int, gen: torch.Generator,
                seq_adv: torch.Tensor | None = None) -> dict:
        """One optimizer update on this rank's share of a mini-batch; returns token-weighted metric sums.

        Without trainer.logits_chunk the student's logits are a full [rows, L, V] tensor per forward (log-softmaxed
        in float32 by `eopd_loss`), bounded only by `trainer.micro_batch_tokens` (rows x length of a piece); with
        it, by chunk x V (`_loss`). Every piece divides by the mini-batch's global token count `num_tokens` (and
        its forward KL, under gated_tokens, by the global gated count), so the summed piece gradients are the
        gradient of the unsplit loss. `random_fkl` draws its gate per piece from the same generator: the same
        distribution as unsplit, not the same draw.
        """
        pieces = self._pieces(rollout)
        masked = float(sum(len(r) for r in list_rows(rollout.column("response_ids"))))
        parts = [self._tensors(rollout.slice(a, b - a), teacher.slice(a, b - a),
                               None if seq_adv is None else seq_adv[a:b]) for a, b in pieces]
        # Every piece's gate before any forward: their count over all pieces and ranks is the normaliser of
        # gated_tokens. Every rank joins this all-reduce, whatever the normaliser, before its first piece.
        gates = [objective_gate(self.loss_cfg, batch.response_mask_BT, teacher_stats, old_logprobs_BT, num_tokens,
                                gen, adv, self.objective) for batch, teacher_stats, old_logprobs_BT, adv in parts]
        num_gated = self._all_reduce({"gated": float(sum(g.sum() for g in gates))})["gated"]  # one sync
        sums: dict[str, float] = {}
        for i, ((a, b), (batch, teacher_stats, old_logprobs_BT, adv)) in enumerate(zip(pieces, parts)):
            loss, metrics = self._loss(batch, old_logprobs_BT, teacher_stats, num_tokens, gen, adv, gates[i],
                                       num_gated)
            if not self._all_finite(loss):  # decided by every rank together, piece by piece
                ids = rollout.column("sample_id").slice(a, b - a).to_pylist()
                if self.trainer.on_nonfinite == "stop":
                    raise NonFiniteLossError(f"non-finite loss ({float(loss)}) on the mini-batch with sample ids {ids}; "
                                             "the run stops (trainer.on_nonfinite=stop) keeping its last checkpoint")
                loss_value = loss.detach()
                del loss
                if i > 0:  # earlier pieces have accumulated gradients: the whole mini-batch is dropped
                    self._discard_gradients()
                where = (f"non-finite loss on sample ids {ids}" if not torch.isfinite(loss_value).item()
                         else f"a non-finite loss on another rank (this rank's piece: sample ids {ids})")
                print(f"[student rank {self.rank}] skipped an update: {where}", flush=True)
                return {"train/skipped_updates": 1.0, "tokens/masked": masked}
            self.engine.set_gradient_accumulation_boundary(i == len(pieces) - 1)
            # DeepSpeed averages over ranks (x world size); gradient_accumulation_steps is 1, so no 1/gas.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            # Per-token means are re-weighted by this piece's token count (gated count for gated means).
            n = float(metrics.get("tokens/masked", batch.num_tokens))
            for key, value in metrics.items():
                if key in _SUMMED or key.startswith(("tokens/", "optim/", "train/")):
                    sums[key] = sums.get(key, 0.0) + float(value)
                else:
                    w = float(metrics[_WEIGHTS[key]]) if key in _WEIGHTS else n
                    sums[key] = sums.get(key, 0.0) + float(value) * w
                    sums[f"_w/{key}"] = sums.get(f"_w/{key}", 0.0) + w
        # Stage 0 keeps full gradients on the parameters and DeepSpeed does not report their norm there.
        manual_norm = None
        if self.trainer.zero_stage == 0:
            grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
            manual_norm = float(torch.stack(grads).norm()) if grads else 0.0
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        sums["optim/grad_norm"] = float(grad_norm) if grad_norm is not None else (manual_norm or 0.0)
        sums["optim/lr"] = float(self.engine.get_lr()[0])
        return sums

    def _loss(self, batch: SequenceBatch, old_logprobs_BT, teacher_stats: TokenStats, num_tokens: int,
              gen: torch.Generator, adv, gate_BT: torch.Tensor, num_gated: float) -> tuple[torch.Tensor, dict]:
        """The objective on one piece, with its gate (B, T) and the mini-batch's global token and gated counts.
        Chunked (trainer.logits_chunk > 0, or -1 with a large vocabulary): from the decoder's hidden states at
        the response positions, through the model's own output head that many positions at a time (recomputed
        in backward); else from the full (rows, L, V) logits of the model's forward, gathered at the response
        positions."""
        common = dict(num_tokens=num_tokens, generator=gen, sequence_advantages=adv, objective=self.objective,
                      gate=gate_BT, num_gated=num_gated)
        index_BT1 = batch.logit_index_BT[..., None]
        chunk = resolve_logits_chunk(self.trainer.logits_chunk, self.vocab_size)
        if chunk:
            module = self.engine.module
            hidden_BLH = module.get_decoder()(input_ids=batch.input_ids_BL,
                                              attention_mask=batch.attention_mask_BL).last_hidden_state
            hidden_BTH = hidden_BLH.gather(1, index_BT1.expand(-1, -1, hidden_BLH.shape[-1]))
            return eopd_loss_from_hidden(hidden_BTH, self._head, batch.response_BT, old_logprobs_BT, teacher_stats,
                                         batch.response_mask_BT, self.loss_cfg, chunk_size=chunk,
                                         vocab_size=self.vocab_size, **common)
        logits_BLV = self.engine(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL).logits
        logits_BTV = logits_BLV.gather(1, index_BT1.expand(-1, -1, logits_BLV.shape[-1]))[..., :self.vocab_size]
        return eopd_loss(logits_BTV, batch.response_BT, old_logprobs_BT, teacher_stats, batch.response_mask_BT,
                         self.loss_cfg, **common)

    def _pieces(self, rollout: pa.Table) -> list[tuple[int, int]]:
        """Row ranges of this rank's share, one per forward/backward; the same count on every rank."""
        budget = self.trainer.micro_batch_tokens
        if budget <= 0 or rollout.num_rows <= 1:
            return [(0, rollout.num_rows)]
        lengths = [len(p) + len(r) for p, r in zip(list_rows(rollout.column("prompt_ids")),
                                                   list_rows(rollout.column("response_ids")))]
        count = len(split_rows(lengths, budget))
        if self.world_size > 1:
            import torch.distributed as dist

            most = torch.tensor([count], dtype=torch.int64, device=self.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            count = int(most.item())
        return split_rows(lengths, budget, count)

    def _tensors(self, rollout: pa.Table, teacher: pa.Table, seq_adv: torch.Tensor | None):
        """Padded batch tensors of some rows, on this rank's device."""
        k = self.loss_cfg.top_k
        dev = self.device
        responses = list_rows(rollout.column("response_ids"))
        batch = sequence_batch(list_rows(rollout.column("prompt_ids")), responses, self.pad_id)
        # positions the teacher has no statistics for (teacher.tokenizer=cross) are left out of the loss
        scored_BT = torch.from_numpy(pad_rows(teacher_mask_rows(teacher, [len(r) for r in responses]),
                                              batch.response_BT.shape[1], False, bool))
        batch = SequenceBatch(*(x.to(dev) for x in (batch.input_ids_BL, batch.attention_mask_BL, batch.response_BT,
                                                   batch.logit_index_BT, batch.response_mask_BT & scored_BT)))
        t_max = batch.response_BT.shape[1]
        teacher_stats = TokenStats(
            logprobs=padded_float(list_rows(teacher.column("teacher_logprobs")), t_max),
            entropy=padded_float(list_rows(teacher.column("teacher_entropy")), t_max),
            topk_logprobs=padded_topk(list_rows(teacher.column("topk_logprobs")), t_max, k, 0.0),
            topk_ids=padded_topk(list_rows(teacher.column("topk_ids")), t_max, k, 0)).to(dev)
        old_logprobs_BT = padded_float(list_rows(rollout.column("logprobs")), t_max).to(dev)
        return batch, teacher_stats, old_logprobs_BT, None if seq_adv is None else seq_adv.to(dev)

    def _discard_gradients(self) -> None:
        """Drop gradients accumulated by earlier pieces of a skipped mini-batch, without an optimizer step,
        the way DeepSpeed's own overflow path clears them (ZeRO 1/2 and 3 keep partitioned accumulators)."""
        from deepspeed.runtime.zero import stage_1_and_2

        opt = self.engine.optimizer
        if hasattr(opt, "zero_grad"):
            try:
                opt.zero_grad(set_to_none=True)
            except TypeError:
                opt.zero_grad()
        self.engine.zero_grad()
        if self.trainer.zero_stage == 3:
            if isinstance(getattr(opt, "averaged_gradients", None), dict):
                opt.averaged_gradients = {}
        elif isinstance(getattr(opt, "averaged_gradients", None), dict):
            release = getattr(opt, "_release_preflattened_grad_buffers", None)
            if callable(release):
                release()
            for key in list(opt.averaged_gradients):
                opt.averaged_gradients[key] = None
            for key in list(getattr(opt, "all_grad_tensors", {}) or {}):
                opt.all_grad_tensors[key] = None
            opt.micro_step_id = stage_1_and_2.INITIAL_MICRO_STEP_ID
        self.engine.set_gradient_accumulation_boundary(True)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Every rank decides together, so either all ranks step or none does."""
        import torch.distributed as dist

        bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1).to(self.device)
        if self.world_size > 1:
            dist.all_reduce(bad)
        return bad.item() == 0.0

    def _all_reduce(self, sums: dict[str, float]) -> dict[str, float]:
        import torch.distributed as dist

        keys = sorted(sums)
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(values)
        return dict(zip(keys, values.tolist()))

    # -- weights and checkpoints -----------------------------------------------------------------------
    def _full_state(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights on rank 0 (gathered first under ZeRO-3); every rank must call this."""
        import deepspeed

        module = self.engine.module
        params = list(module.parameters())
        if self.trainer.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = _cpu_copy(module) if self.rank == 0 else None
        else:
            state = _cpu_copy(module) if self.rank == 0 else None
        return state

    def export_weights(self) -> dict[str, np.ndarray] | None:
        """Rank 0: the student weights as float32 numpy arrays for the object-store sync (zero-copy on a node).

        Whole float32 weights on the CPU (ZeRO 0-2) go out as views of the parameters, not copies: Ray copies
        a call's return value into the object store before the actor runs its next call, so that copy is the
        only one the sync makes (the engines adopt the store's arrays: TransformersEngine.load_weights)."""
        module = self.engine.module
        if self.trainer.zero_stage == 3 or any(p.device.type != "cpu" or p.dtype != torch.float32
                                               for p in module.parameters()):
            state = self._full_state()
        else:
            state = {k: v.detach() for k, v in module.state_dict().items()} if self.rank == 0 else None
        if state is None:
            return None
        if getattr(module.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the embedding: sending it twice doubles the payload
        return {k: v.to(torch.float32).cpu().numpy() for k, v in state.items()}

    def save(self, ckpt_dir: str) -> bool:
        """World-size-independent training state (every rank joins the gathers) plus an HF-format copy
        of the weights in the model dtype (rank 0), loadable with `from_pretrained`."""
        from actors.student.state import save_state

        ckpt = Path(ckpt_dir)
        save_state(self.engine, self.rank, self.world_size, self.trainer.zero_stage, ckpt)
        state = self._full_state()
        if self.rank == 0:
            hf_dir = ckpt / "hf"
            self.engine.module.save_pretrained(str(hf_dir), state_dict=state)  # safetensors in transformers 5
            self.tokenizer.save_pretrained(str(hf_dir))
        return True

    def load(self, ckpt_dir: str) -> dict:
        """Restore a checkpoint saved by any number of ranks at any ZeRO stage; returns its trainer state."""
        from actors.student.state import load_state

        maybe_fail("student_load")  # a worker lost while the actors are being rebuilt (tests/test_faults_e2e.py)
        return load_state(self.engine, self.trainer.zero_stage, ckpt_dir, self.pad_id)

    def config(self) -> dict:
        return {"trainer": asdict(self.trainer), "loss": asdict(self.loss_cfg)}
