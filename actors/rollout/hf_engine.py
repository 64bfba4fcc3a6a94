"""The transformers rollout engine: `model.generate` with a KV cache, behaviour log-probs and full-vocabulary
entropies from the raw per-step logits; it also receives the bucketed broadcast on CPU (gloo)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from actors.rollout.engine import Generation, RolloutEngine, SamplingParams
from eopd_ray.models import load_causal_lm, load_tokenizer


class TransformersEngine(RolloutEngine):
    """`model.generate` with a KV cache; log-probs and entropies from the raw per-step logits."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 vocab_size: int | None = None, max_batch: int = 256):
        self.dtype, self.trust_remote_code = dtype, trust_remote_code
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.vocab_size = vocab_size or len(self.tokenizer)
        self.max_batch = max_batch
        self.load_model(model_path)

    def load_model(self, path: str) -> None:
        self.model = load_causal_lm(path, self.dtype, self.trust_remote_code).eval()
        self.adopted = False  # parameters adopted from the object store (load_weights): read-only shared memory
        rows = self.model.get_output_embeddings().weight.shape[0]
        # Padded output rows are no tokens: never sample them (log-probs are over the real ids only).
        self.suppress = list(range(self.vocab_size, rows)) or None

    def load_weights(self, state: dict[str, np.ndarray]) -> None:
        """Load the student's weights {name: array} (tied weights sent once). Read-only arrays of the engine's
        dtype (the object store's, float32) become the parameters themselves instead of being copied: they are
        views of the node's shared memory, so the sync's only copy is the store's own and the engines of one
        node share one copy of the weights; other arrays are copied. Inference never writes to its weights; the
        broadcast path, which does, takes its own copies first (`_own_parameters`)."""
        params = dict(self.model.named_parameters())  # a tied output head appears once, as its embedding
        buffers = dict(self.model.named_buffers())
        unexpected = [k for k in state if k not in params and k not in buffers]
        missing = [k for k in params if k not in state]
        if unexpected or missing:
            raise RuntimeError(f"weight sync mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch.from_numpy on a read-only array warns
            for name, array in state.items():
                array = np.asarray(array)
                src = torch.from_numpy(array)
                dst = params[name] if name in params else buffers[name]
                if tuple(src.shape) != tuple(dst.shape):
                    raise RuntimeError(f"weight sync mismatch: {name} is {tuple(dst.shape)} in the engine, "
                                       f"{tuple(src.shape)} sent")
                # read-only: the object store's frozen copy; a writable array may be someone's live tensor
                # (the student's, called in-process), which the engine must not alias
                if not array.flags.writeable and name in params and src.dtype == dst.dtype and dst.device.type == "cpu":
                    dst.data = src
                    self.adopted = True
                else:
                    dst.copy_(src)

    def _own_parameters(self) -> None:
        """Give every parameter adopted from the object store (read-only memory) a private, writable copy."""
        if self.adopted:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.data = p.data.clone()
            self.adopted = False

    # -- the disaggregated sync's receiving side on CPU (actors/sync/broadcast.py: gloo instead of NCCL) --------
    def init_weight_group(self, addr: str, port: int, rank_offset: int, world_size: int) -> None:
        from actors.sync.buckets import GlooComm

        self.weight_comm = GlooComm(addr, port, rank_offset, world_size)

    def weight_mismatches(self, metas: list) -> list[str]:
        params = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        sent = {m.name for m in metas}
        return ([f"{m.name}: the engine has {'no such parameter' if m.name not in params else params[m.name]}, "
                 f"the student sends {m.shape}" for m in metas if params.get(m.name) != tuple(m.shape)]
                + [f"{n}: never sent" for n in params if n not in sent])

    def receive_weights(self, metas: list, bucket_bytes: int) -> None:
        from actors.sync.buckets import receive_buckets

        self._own_parameters()
        params = dict(self.model.named_parameters())  # tied weights appear once, as the sender sends them

        def load(pairs):  # names and shapes were checked when the group was built (weight_mismatches)
            for name, tensor in pairs:
                params[name].data.copy_(tensor)

        with torch.no_grad():
            receive_buckets(self.weight_comm, metas, bucket_bytes, torch.device("cpu"), load)

    def score_tokens(self, prompt_ids: list[np.ndarray], response_ids: list[np.ndarray]) -> list[np.ndarray]:
        """Teacher-forced log p(response_t | prompt, response_<t) over the real vocabulary, (T_i,) per row."""
        from actors.sync.check import teacher_forced_logprobs

        return [teacher_forced_logprobs(self.model, p, r, self.vocab_size) for p, r in zip(prompt_ids, response_ids)]

    @torch.no_grad()
    def generate(self, prompt_ids: list[np.ndarray], params: SamplingParams) -> Generation:
        out = Generation([], [], [])
        gen = torch.Generator().manual_seed(params.seed)
        for start in range(0, len(prompt_ids), self.max_batch):
            chunk = prompt_ids[start:start + self.max_batch]
            # Each chunk reseeds the global RNG from our generator: results depend only on the seed.
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
            part = self._generate_chunk(chunk, params)
            for field in ("response_ids", "logprobs", "entropy"):
                getattr(out, field).extend(getattr(part, field))
        return out

    def _generate_chunk(self, prompt_ids: list[np.ndarray], params: SamplingParams) -> Generation:
        tok = self.tokenizer
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left padding, as decoder-only generation needs
            ids[i, width - len(p):] = torch.from_numpy(np.array(p, dtype=np.int64))
            attn[i, width - len(p):] = 1
        res = self.model.generate(
            input_ids=ids, attention_mask=attn, do_sample=True, temperature=params.temperature,
            top_p=params.top_p, top_k=0, max_new_tokens=params.max_new_tokens, output_logits=True,
            return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            suppress_tokens=self.suppress)
        new_BT = res.sequences[:, width:]
        # Step by step: stacking the T steps' (B, V) logits first would make several (B, T, V) float32 copies.
        # clamp: a padded id (only with `suppress` off) gets a placeholder; the worker cuts the response there.
        ids_BT = new_BT.clamp(max=self.vocab_size - 1)
        logprob_steps, entropy_steps = [], []
        for t, logits_BV in enumerate(res.logits):
            logp_BV = torch.log_softmax(logits_BV[:, :self.vocab_size].float() / params.temperature, dim=-1)
            logprob_steps.append(logp_BV.gather(-1, ids_BT[:, t, None])[:, 0])
            entropy_steps.append(-(logp_BV.exp() * logp_BV).sum(-1))
        logprobs_BT, entropy_BT = torch.stack(logprob_steps, 1), torch.stack(entropy_steps, 1)
        out = Generation([], [], [])
        for i in range(new_BT.shape[0]):
            row = new_BT[i]
            eos = (row == tok.eos_token_id).nonzero()
            n = int(eos[0]) + 1 if len(eos) else row.shape[0]  # keep the EOS: it is a sampled token
            out.response_ids.append(row[:n].numpy().astype(np.int32))
            out.logprobs.append(logprobs_BT[i, :n].numpy().astype(np.float32))
            out.entropy.append(entropy_BT[i, :n].numpy().astype(np.float32))
        return out
