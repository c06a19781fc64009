"""Per-shard router statistics: the shard's own chunk embeddings, scored by a kernel density.

Each shard's statistics are computed at training time from **that shard's documents only**
(invariant 1: no projection, PCA, LDA or mixture is ever fit on several shards' data), and
scored at request time against only the shards the caller may see. Scores are per-shard
functions of (query, that shard's stats), so adding or removing another shard never changes
them.

The statistics are the unit-normalised SBERT embeddings of the shard's chunks (64-word
windows). A query scores a shard by a soft maximum of its cosine to them: a von Mises-Fisher
kernel density on the sphere, kept on cosine's scale,

    score_s(q) = τ · log( (1/n) Σ_i exp(cos(q, e_i) / τ) ),   τ = KERNEL_BANDWIDTH,

so ``softmax(score / RouterSettings.temperature)`` is a usable posterior. The mean (not the
sum) keeps a large shard from outvoting a small one on size alone.

Why not one Gaussian per shard (this module's first format, a shrunk probabilistic PCA):
measured on the manual-page benchmark (benchmarks/eval_routing.py: 24 topical shards of 8
pages, 192 held-out passages), the Gaussian routed 77 % top-1 / 90 % top-3 and the kernel
87 % / 98 %. A shard holds a handful of documents on different subjects; one ellipsoid blurs
them together, the kernel keeps each.

What is kept derives from the documents, as the adapter's weights do: it is stored beside
them, read under the same ACL, and purged with them when a document is deleted.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load, save

from adapterswap.types import Embed

FORMAT = "adapterswap.shard_stats"
FORMAT_VERSION = 2
KERNEL_BANDWIDTH = 0.05  # τ, in cosine units: chunks this much less similar weigh e times less
UNIT_NORM_TOLERANCE = 1e-3


@dataclass(frozen=True, eq=False)
class ShardStats:
    """One shard's routing statistics. ``chunks`` is float32, read-only, one unit row per chunk."""

    chunks: np.ndarray  # (n, d) unit-norm chunk embeddings
    embedder_id: str

    def __post_init__(self) -> None:
        chunks = np.array(self.chunks, dtype=np.float32)
        chunks.setflags(write=False)
        object.__setattr__(self, "chunks", chunks)

    @property
    def n_chunks(self) -> int:
        return int(self.chunks.shape[0])

    @property
    def dim(self) -> int:
        return int(self.chunks.shape[1])


def chunk_text(text: str, max_words: int = 64, overlap: int = 16) -> list[str]:
    """Split ``text`` into windows of ``max_words`` words, consecutive ones sharing ``overlap``.

    Whitespace is normalised; a text of at most ``max_words`` words is one chunk, a blank one none.
    """
    if max_words < 1:
        raise ValueError(f"max_words: must be ≥ 1, got {max_words}")
    if not 0 <= overlap < max_words:
        raise ValueError(f"overlap: must be in [0, max_words={max_words}), got {overlap}")
    words = text.split()
    chunks: list[str] = []
    for start in range(0, len(words), max_words - overlap):
        chunks.append(" ".join(words[start : start + max_words]))
        if start + max_words >= len(words):
            break
    return chunks


def fit_shard_stats(chunk_embeddings: np.ndarray, embedder_id: str) -> ShardStats:
    """One shard's stats from its own chunk embeddings ``(n, d)``; rows are normalised."""
    x = np.asarray(chunk_embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"chunk_embeddings: expected shape (n ≥ 1, d ≥ 1), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("chunk_embeddings: contains NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("chunk_embeddings: a row is all zeros and has no direction")
    return ShardStats(x / norms, embedder_id)


def compute_shard_stats(
    texts: Sequence[str],
    embed: Embed,
    embedder_id: str,
) -> ShardStats:
    """Chunk one shard's ``texts``, embed the chunks and fit its stats. Embed per shard only."""
    chunks = [chunk for text in texts for chunk in chunk_text(text)]
    if not chunks:
        raise ValueError("texts: the shard has no non-blank text to compute router stats from")
    return fit_shard_stats(embed(chunks), embedder_id)


def score_shards(
    query: np.ndarray, stats: Sequence[ShardStats], *, embedder_id: str | None = None
) -> np.ndarray:
    """Kernel density of each query under each shard, on cosine's scale (see the module).

    # score_s(q) = τ log mean_i exp(cos(q, e_i)/τ)   q:(d,) → (S,)  or  q:(Q,d) → (Q,S)
    """
    q, single = _as_queries(query, stats, embedder_id)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    out = np.empty((q.shape[0], len(stats)), dtype=np.float64)
    for j, s in enumerate(stats):  # one product per shard: its score cannot depend on the others
        z = q @ s.chunks.astype(np.float64).T / KERNEL_BANDWIDTH  # (Q, n)
        top = z.max(axis=1, keepdims=True)
        out[:, j] = KERNEL_BANDWIDTH * (top[:, 0] + np.log(np.exp(z - top).mean(axis=1)))
    return out[0] if single else out


def _as_queries(
    query: np.ndarray, stats: Sequence[ShardStats], embedder_id: str | None
) -> tuple[np.ndarray, bool]:
    """The queries as float64 ``(Q, d)``, whether one was given as ``(d,)``; checks dims and ids."""
    q = np.asarray(query, dtype=np.float64)
    single = q.ndim == 1
    q = q[None, :] if single else q
    if q.ndim != 2:
        raise ValueError(f"query: expected shape (d,) or (Q, d), got {np.shape(query)}")
    for s in stats:
        if s.dim != q.shape[1]:
            raise ValueError(f"query: dim {q.shape[1]} does not match shard stats dim {s.dim}")
        if embedder_id is not None and s.embedder_id != embedder_id:
            raise ValueError(
                f"embedder_id: query embedded by {embedder_id!r} but shard stats were fit with "
                f"{s.embedder_id!r}; refit the stats or embed with the same model"
            )
    return q, single


def save_shard_stats(stats: ShardStats) -> bytes:
    """Serialise as safetensors: the float32 chunk matrix plus one canonical-JSON metadata entry."""
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "embedder_id": stats.embedder_id}
    meta |= {"n_chunks": stats.n_chunks, "dim": stats.dim}
    # One metadata key: safetensors writes a dict's keys in hash order, which varies per process.
    return save({"chunks": stats.chunks}, metadata={FORMAT: json.dumps(meta, sort_keys=True)})


def load_shard_stats(data: bytes) -> ShardStats:
    """Parse and validate bytes from ``save_shard_stats``; ``ValueError`` names any problem."""
    meta = _read_metadata(data)
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ValueError(f"shard stats: not a valid safetensors payload: {exc}") from None
    if "chunks" not in tensors:
        raise ValueError("shard stats: missing tensor 'chunks'")
    chunks, shape = tensors["chunks"], (meta["n_chunks"], meta["dim"])
    if chunks.shape != shape or chunks.dtype != np.float32:
        raise ValueError(
            f"shard stats: tensor 'chunks' has shape {chunks.shape} and dtype {chunks.dtype}, "
            f"expected {shape} float32"
        )
    if not np.isfinite(chunks).all():
        raise ValueError("shard stats: tensor 'chunks' contains NaN or infinite values")
    norms = np.linalg.norm(chunks.astype(np.float64), axis=1)
    if (np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE).any():
        raise ValueError("shard stats: rows of 'chunks' must be unit-norm embeddings")
    return ShardStats(chunks, meta["embedder_id"])


def _read_metadata(data: bytes) -> dict:
    """The checked metadata of a shard-stats payload: ``u64le header length | JSON header``."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        meta = json.loads(header["__metadata__"][FORMAT])
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"shard stats: not a shard-stats safetensors payload ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"shard stats: metadata format is not {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"shard stats: version {meta.get('version')!r} is not supported "
            f"(expected {FORMAT_VERSION}); refit the stats"
        )
    for key in ("dim", "n_chunks"):
        if not isinstance(meta.get(key), int) or meta[key] < 1:
            raise ValueError(
                f"shard stats: metadata {key!r} must be a positive int, got {meta.get(key)!r}"
            )
    if not isinstance(meta.get("embedder_id"), str):
        raise ValueError("shard stats: metadata 'embedder_id' must be a string")
    return meta
