"""eopd_ray/pruning.py: layer states, the two layer scores, the pruned model and its cache, on tiny random models.

References are independent of the module: per-prompt unpadded forwards (and the last decoder layer run by hand),
per-token Python float64 loops for the scores, and the teacher with its dropped layers replaced by identities."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from eopd_ray import pruning
from eopd_ray.pruning import (block_distances, block_influence, build_pruned, choose_layers, ensure_pruned_student,
                              format_report, layer_hidden_states, layers_to_drop_count, pruned_config,
                              remap_layer_keys)

VOCAB = 97
QWEN_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def llama(seed: int = 0, layers: int = 4, vocab: int = VOCAB, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=vocab, tie_word_embeddings=tie, initializer_range=0.1,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def qwen3(seed: int = 0, window: int = 3):
    """Untied, 4 layers, sliding (window 3) and full attention mixed: the window matters past 3 tokens."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, vocab_size=VOCAB, tie_word_embeddings=False,
                      use_sliding_window=True, sliding_window=window, layer_types=list(QWEN_TYPES),
                      initializer_range=0.1, max_position_embeddings=64)
    return Qwen3ForCausalLM(cfg).eval()


def make_identity(model, layer: int) -> None:
    """Zero the layer's two residual-branch outputs: the layer then returns its input exactly."""
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight.zero_()
        model.model.layers[layer].mlp.down_proj.weight.zero_()


def random_prompts(lengths, seed=1, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


class Skip(torch.nn.Module):
    """A decoder layer that returns its input: the teacher with this layer dropped."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def teacher_without(teacher, drop):
    ref = copy.deepcopy(teacher)
    for i in drop:
        ref.model.layers[i] = Skip()
    return ref


# ----------------------------------------------------------------------------------- layer states
@torch.no_grad()
def states_one_prompt(model, prompt):
    """(L + 1, T, H) for one prompt alone: layer inputs from output_hidden_states, the last layer's output by
    running that layer by hand on its input (checked against the final-norm hidden state)."""
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    num_layers = len(model.model.layers)
    assert len(hs) == num_layers + 1
    last_in = hs[num_layers - 1]
    pos = torch.arange(len(prompt))[None]
    last_out = model.model.layers[-1](last_in, attention_mask=None, position_ids=pos,
                                      position_embeddings=model.model.rotary_emb(last_in, pos))
    last_out = last_out[0] if isinstance(last_out, tuple) else last_out
    # hs[-1] is after the final norm: the hand-run layer must reproduce it
    torch.testing.assert_close(model.model.norm(last_out), hs[-1], atol=1e-5, rtol=0)
    return torch.stack([*hs[:num_layers], last_out])[:, 0]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_layer_hidden_states_match_unpadded_forwards(family):
    model = llama() if family == "llama" else qwen3()
    prompts = random_prompts([5, 1, 9, 3, 7, 8, 2])
    got = layer_hidden_states(model, prompts, batch_size=3)  # batches of 3, 3, 1: padding in the first two
    want = torch.cat([states_one_prompt(model, p) for p in prompts], dim=1)
    assert got.dtype == torch.float32
    assert got.shape == (len(model.model.layers) + 1, sum(map(len, prompts)), 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the states really differ from layer to layer (a hook capturing one tensor twice would not)
    assert all((got[i] - got[i + 1]).abs().max() > 1e-3 for i in range(got.shape[0] - 1))
    # same result whatever the batching; its hooks removed afterwards (transformers keeps its own capture hooks)
    hooks = [(dict(layer._forward_pre_hooks), dict(layer._forward_hooks)) for layer in model.model.layers]
    torch.testing.assert_close(layer_hidden_states(model, prompts, batch_size=8), got, atol=1e-5, rtol=0)
    assert [(dict(layer._forward_pre_hooks), dict(layer._forward_hooks)) for layer in model.model.layers] == hooks


# ----------------------------------------------------------------------------------- scores
def _cos(a, b):
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    return dot / (math.sqrt(sum(float(x) ** 2 for x in a)) * math.sqrt(sum(float(y) ** 2 for y in b)))


def ref_influence(states):
    num_layers, tokens = states.shape[0] - 1, states.shape[1]
    return [1.0 - sum(_cos(states[i, t].tolist(), states[i + 1, t].tolist()) for t in range(tokens)) / tokens
            for i in range(num_layers)]


def ref_distances(states, n):
    num_layers, tokens = states.shape[0] - 1, states.shape[1]
    out = []
    for l in range(num_layers - n + 1):
        total = 0.0
        for t in range(tokens):
            c = min(1.0, max(-1.0, _cos(states[l, t].tolist(), states[l + n, t].tolist())))
            total += math.acos(c) / math.pi
        out.append(total / tokens)
    return out


def test_scores_equal_python_float64_references():
    torch.manual_seed(0)
    states = torch.randn(6, 13, 8)  # 5 layers, 13 tokens
    got = block_influence(states)
    want = ref_influence(states)
    assert len(got) == 5
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-10
    for n in (1, 2, 3, 5):
        got_d, want_d = block_distances(states, n), ref_distances(states, n)
        assert len(got_d) == 5 - n + 1
        assert max(abs(a - b) for a, b in zip(got_d, want_d)) < 1e-10
    # random directions: distances strictly inside (0, 1)
    assert all(0 < d < 1 for d in block_distances(states, 1))


def test_choose_layers_on_constructed_states():
    torch.manual_seed(0)
    x = torch.randn(7, 11, 8)  # 6 layers
    x[4] = 3.0 * x[3]  # layer 3 only rescales: cos = 1, influence 0
    x[1] = x[0] + 1e-3 * torch.randn(11, 8)  # layer 0 almost the identity
    drop, scores = choose_layers("block_influence", x, 1)
    assert drop == [3] and scores["block_influence"] == block_influence(x)
    assert abs(scores["block_influence"][3]) < 1e-12
    assert choose_layers("block_influence", x, 2)[0] == [0, 3]
    # contiguous: x_5 == x_2 makes the block 2, 3, 4 (start 2, n = 3) a round trip: distance 0
    y = torch.randn(7, 11, 8)
    y[5] = y[2]
    drop, scores = choose_layers("contiguous", y, 3)
    assert drop == [2, 3, 4]
    assert scores["block_distance_by_start"] == block_distances(y, 3)
    assert scores["block_distance_by_start"][2] < 1e-6 < min(d for i, d in enumerate(
        scores["block_distance_by_start"]) if i != 2)
    # ties go to the lowest index
    same = torch.randn(1, 11, 8).repeat(5, 1, 1)
    assert choose_layers("block_influence", same, 2)[0] == [0, 1]
    assert choose_layers("contiguous", same, 2)[0] == [0, 1]
    with pytest.raises(ValueError, match="prune method"):
        choose_layers("random", x, 1)


def test_identity_layer_of_a_real_model_is_chosen():
    model = llama()
    make_identity(model, 2)
    states = layer_hidden_states(model, random_prompts([6, 4, 9]))
    infl = block_influence(states)
    assert abs(infl[2]) < 1e-12 and min(infl[i] for i in (0, 1, 3)) > 1e-4
    assert choose_layers("block_influence", states, 1)[0] == [2]
    model = llama()
    make_identity(model, 1)
    make_identity(model, 2)
    states = layer_hidden_states(model, random_prompts([6, 4, 9]))
    dists = block_distances(states, 2)
    assert dists[1] < 1e-6 and min(dists[0], dists[2]) > 1e-3
    assert choose_layers("contiguous", states, 2)[0] == [1, 2]


# ----------------------------------------------------------------------------------- the pruned model
def test_remap_layer_keys():
    state = {"model.embed_tokens.weight": 0, "model.layers.0.a.weight": 1, "model.layers.1.a.weight": 2,
             "model.layers.2.a.weight": 3, "model.layers.10.b": 4, "model.norm.weight": 5}
    got = remap_layer_keys(state, [1, 10], "model.layers.")
    assert got == {"model.embed_tokens.weight": 0, "model.layers.0.a.weight": 2, "model.layers.1.b": 4,
                   "model.norm.weight": 5}


@torch.no_grad()
@pytest.mark.parametrize("keep", [[0, 2, 3], [1, 3], [3]])
def test_build_pruned_llama_tied(tmp_path, keep):
    from transformers import AutoModelForCausalLM

    teacher = llama()
    params = build_pruned(teacher, keep, tmp_path)
    student = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == len(keep) == len(student.model.layers)
    assert teacher.config.num_hidden_layers == 4  # the teacher's config is not changed
    assert student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert params == sum(p.numel() for p in student.parameters())
    per_layer = sum(p.numel() for p in teacher.model.layers[0].parameters())
    assert params == sum(p.numel() for p in teacher.parameters()) - (4 - len(keep)) * per_layer
    for new, old in enumerate(keep):
        for (name, p), (name_t, p_t) in zip(student.model.layers[new].named_parameters(),
                                            teacher.model.layers[old].named_parameters()):
            assert name == name_t and torch.equal(p, p_t)
    ids = torch.tensor(random_prompts([10, 10, 10], seed=3))
    ref = teacher_without(teacher, [i for i in range(4) if i not in keep])
    want = ref(ids).logits
    torch.testing.assert_close(student(ids).logits, want, atol=1e-5, rtol=0)
    assert (teacher(ids).logits - want).abs().max() > 1e-2  # dropping the layers changes the logits


@torch.no_grad()
def test_build_pruned_qwen3_layer_types(tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = qwen3()
    keep = [1, 2, 3]
    build_pruned(teacher, keep, tmp_path)
    student = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert student.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert [layer.self_attn.sliding_window for layer in student.model.layers] == [None, 3, None]
    assert not student.config.tie_word_embeddings
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight, atol=0, rtol=0)
    assert student.lm_head.weight.data_ptr() != student.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor(random_prompts([12, 12], seed=4))
    want = teacher_without(teacher, [0])(ids).logits
    torch.testing.assert_close(student(ids).logits, want, atol=1e-5, rtol=0)
    # the check can fail: the first three types (not the kept ones) give other logits at 12 tokens, window 3
    wrong_cfg = copy.deepcopy(student.config)
    wrong_cfg.layer_types = QWEN_TYPES[:3]
    wrong = type(student)(wrong_cfg).eval()
    wrong.load_state_dict(student.state_dict())
    assert (wrong(ids).logits - want).abs().max() > 1e-3


def test_pruned_config_subsets_layer_lists():
    teacher = qwen3()
    cfg = pruned_config(teacher.config, [0, 3])
    assert cfg.num_hidden_layers == 2 and cfg.layer_types == ["sliding_attention", "full_attention"]
    assert teacher.config.num_hidden_layers == 4 and teacher.config.layer_types == QWEN_TYPES
    assert cfg.sliding_window == 3 and cfg.hidden_size == 64


# ----------------------------------------------------------------------------------- cached student
def test_layers_to_drop_count():
    assert layers_to_drop_count(1, 4) == 1
    assert layers_to_drop_count(3, 4) == 3
    assert layers_to_drop_count(3.0, 30) == 3
    assert layers_to_drop_count(0.5, 4) == 2
    assert layers_to_drop_count(0.25, 30) == 8  # 7.5 rounds to 8
    assert layers_to_drop_count(0.3, 30) == 9
    assert layers_to_drop_count(0.2, 4) == 1  # 0.8 -> 1
    for value, layers in [(0, 4), (4, 4), (5, 4), (0.1, 4), (0.9, 4), (-1, 4), (1, 1), (0.5, 1)]:
        with pytest.raises(ValueError, match="layers dropped"):
            layers_to_drop_count(value, layers)


def _teacher_dir(path):
    """A 4-layer Llama teacher over the project's tokenizer, layer 2 an exact identity, saved with it."""
    from eopd_ray.tiny_models import build_tokenizer

    tok = build_tokenizer()
    model = llama(layers=4, vocab=len(tok))
    make_identity(model, 2)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return model, len(tok)


def test_ensure_pruned_student_builds_once(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eopd_ray.cache import MARKER, build_info

    teacher, vocab = _teacher_dir(tmp_path / "teacher")
    calibration = random_prompts([7, 3, 11, 5], seed=5, vocab=vocab)
    cache = tmp_path / "cache"
    student_dir, report = ensure_pruned_student(str(tmp_path / "teacher"), "block_influence", 1, calibration,
                                                cache_dir=cache)
    scores = block_influence(layer_hidden_states(teacher, calibration))
    assert report["dropped"] == [2] and report["kept"] == [0, 1, 3]
    assert report["method"] == "block_influence" and report["teacher_layers"] == 4
    assert report["calibration_prompts"] == 4 and report["calibration_tokens"] == 26
    assert len(report["block_influence"]) == 4
    assert max(abs(a - b) for a, b in zip(report["block_influence"], scores)) < 1e-6
    assert report["student"] == student_dir and "keep3" in student_dir
    assert (cache / "pruned").resolve() == type(tmp_path)(student_dir).parent.resolve()
    info = build_info(student_dir)
    assert info["kept_layers"] == [0, 1, 3] and info["teacher"] == str(tmp_path / "teacher")
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    assert len(student.model.layers) == 3 and info["parameters"] == sum(p.numel() for p in student.parameters())
    assert len(AutoTokenizer.from_pretrained(student_dir)) == vocab
    ids = torch.tensor(calibration[:1])
    with torch.no_grad():  # layer 2 is an identity: the pruned student is the teacher
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-5, rtol=0)
    assert "dropped [2]" in format_report(report) and "block influence per layer" in format_report(report)

    marker = type(tmp_path)(student_dir) / MARKER
    before = (marker.read_bytes(), marker.stat().st_mtime_ns)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached student")

    monkeypatch.setattr(pruning, "build_pruned", no_rebuild)
    again, report2 = ensure_pruned_student(str(tmp_path / "teacher"), "block_influence", 1, calibration,
                                           cache_dir=cache)
    assert again == student_dir and report2 == report
    # the contiguous method drops the same (identity) layer: same student, still not rebuilt
    same, report3 = ensure_pruned_student(str(tmp_path / "teacher"), "contiguous", 1, calibration, cache_dir=cache)
    assert same == student_dir and report3["dropped"] == [2] and len(report3["block_distance_by_start"]) == 4
    assert "angular distance" in format_report(report3)
    assert (marker.read_bytes(), marker.stat().st_mtime_ns) == before
    with pytest.raises(AssertionError, match="rebuilt"):  # a new set of layers does build
        ensure_pruned_student(str(tmp_path / "teacher"), "block_influence", 2, calibration, cache_dir=cache)
    monkeypatch.undo()

    # the same number of layers, another set of them (layer 1 dropped, forced): another student
    monkeypatch.setattr(pruning, "choose_layers", lambda method, states, n: ([1], {"block_influence": [0.0] * 4}))
    other, report5 = ensure_pruned_student(str(tmp_path / "teacher"), "block_influence", 1, calibration,
                                           cache_dir=cache)
    monkeypatch.undo()
    assert other != student_dir and report5["kept"] == [0, 2, 3] == build_info(other)["kept_layers"]
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(other).eval()(ids).logits,
                                   teacher_without(teacher, [1])(ids).logits, atol=1e-5, rtol=0)

    two, report4 = ensure_pruned_student(str(tmp_path / "teacher"), "block_influence", 0.5, calibration,
                                         cache_dir=cache)
    assert two != student_dir and "keep2" in two and len(report4["dropped"]) == 2 and 2 in report4["dropped"]
    assert build_info(two)["kept_layers"] == report4["kept"]
    assert len(AutoModelForCausalLM.from_pretrained(two).model.layers) == 2
    assert (marker.read_bytes(), marker.stat().st_mtime_ns) == before
    with pytest.raises(ValueError, match="layers dropped"):
        ensure_pruned_student(str(tmp_path / "teacher"), "block_influence", 4, calibration, cache_dir=cache)
