"""Per-shard router statistics: a shrunk Gaussian over one shard's chunk embeddings.

Each shard's summary is computed at training time from **that shard's documents only**
(invariant 1: no projection, PCA, LDA or mixture is ever fit on several shards' data), and
scored at request time against only the shards the caller may see. Scores are per-shard
functions of (query, that shard's stats), so adding or removing another shard never changes
them. Only the summary is kept, never the chunk embeddings: those derive from document text.

Model: probabilistic PCA with Ledoit-Wolf shrinkage. n chunks (5..200) in d=384 dims give a
sample covariance S of rank n-1, so it is shrunk toward a scaled identity,
``Σ = (1-ρ) S + ρ m I`` (Ledoit-Wolf 2004 ρ, m = tr(S)/d, S unbiased), and kept as its top
r ≤ 8 eigenpairs plus one variance for the other d-r directions. Only eigenvalues above the
Marchenko-Pastur edge of isotropic noise are kept: for small shards the sample directions are
noise, and keeping them made a 3-chunk shard lose its own queries to a 40-chunk one. m has a
weak constant prior (``PRIOR_TOTAL_VARIANCE`` over ``PRIOR_CHUNKS``; fit on no data), so a
one-chunk shard is still a proper Gaussian. The score is the posterior-predictive log-density
(Σ inflated by 1 + 1/n for a mean estimated from n chunks, log-det included) divided by d: the
coordinates are far from independent, and per dimension it lands on cosine's scale, so
``softmax(score / RouterSettings.temperature)`` is a usable posterior.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load, save

FORMAT = "adapterswap.shard_stats"
FORMAT_VERSION = 1
MAX_RANK = 8
PRIOR_TOTAL_VARIANCE = 0.5  # typical within-topic spread of unit-norm sentence embeddings
PRIOR_CHUNKS = 2.0  # weight of that prior, in chunks
_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True, eq=False)
class ShardStats:
    """One shard's embedding summary. Arrays are float32 and read-only.

    ``Σ = basisᵀ diag(basis_var) basis + residual_var (I - basisᵀ basis)``.
    """

    centroid: np.ndarray  # (d,) mean chunk embedding μ (not unit norm)
    basis: np.ndarray  # (r, d) orthonormal top eigenvectors of the shrunk covariance
    basis_var: np.ndarray  # (r,) their variances, each ≥ residual_var
    residual_var: float  # variance of every direction orthogonal to the basis
    n_chunks: int
    dim: int
    embedder_id: str
    mean_sim: float  # mean cosine of the chunks to the centroid direction (spread)
    shrinkage: float  # Ledoit-Wolf ρ in [0, 1]

    def __post_init__(self) -> None:
        for name in ("centroid", "basis", "basis_var"):
            array = np.array(getattr(self, name), dtype=np.float32)
            array.setflags(write=False)
            object.__setattr__(self, name, array)


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


def fit_shard_stats(
    chunk_embeddings: np.ndarray, embedder_id: str, *, max_rank: int = MAX_RANK
) -> ShardStats:
    """Fit the shrunk Gaussian of one shard from its own chunk embeddings ``(n, d)``."""
    x = np.asarray(chunk_embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"chunk_embeddings: expected shape (n ≥ 1, d ≥ 1), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("chunk_embeddings: contains NaN or infinite values")
    n, d = x.shape
    mu = x.mean(axis=0)  # (d,)
    xc = x - mu  # (n, d)
    rho, m = _ledoit_wolf(xc)
    m *= n / max(n - 1, 1)  # unbiased: a biased S would make small shards look too tight
    _, sing, vt = np.linalg.svd(xc, full_matrices=False)  # S = V diag(sing²/(n-1)) Vᵀ
    eig = sing**2 / max(n - 1, 1)  # (min(n, d),) descending
    # Keep only directions above the Marchenko-Pastur edge of isotropic noise with n-1 degrees
    # of freedom, m(1+√(d/(n-1)))²: below it a sample direction is noise, not topic structure.
    edge = m * (1.0 + math.sqrt(d / max(n - 1, 1))) ** 2
    r = int(min(max_rank, d - 1, np.count_nonzero(eig > edge)))
    m = (n * m + PRIOR_CHUNKS * PRIOR_TOTAL_VARIANCE / d) / (n + PRIOR_CHUNKS)
    basis = _fix_signs(vt[:r])  # (r, d)
    basis_var = (1.0 - rho) * eig[:r] + rho * m  # (r,) Σ's eigenvalues on the basis
    rest = max(float(eig.sum() - eig[:r].sum()), 0.0) / (d - r)
    residual_var = (1.0 - rho) * rest + rho * m  # mean of Σ's other d-r eigenvalues
    direction = mu / max(float(np.linalg.norm(mu)), 1e-12)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return ShardStats(
        centroid=mu,
        basis=basis,
        basis_var=np.maximum(basis_var, residual_var),
        residual_var=float(np.float32(residual_var)),
        n_chunks=n,
        dim=d,
        embedder_id=embedder_id,
        mean_sim=float(np.float32((unit @ direction).mean())),
        shrinkage=float(np.float32(rho)),
    )


def _ledoit_wolf(xc: np.ndarray) -> tuple[float, float]:
    """Ledoit-Wolf ρ and m = tr(S)/d for centred rows ``xc:(n, d)``, via the Gram matrix.

    # ρ = min(b̄², δ²)/δ²,  δ² = ‖S - mI‖²_F,  b̄² = n⁻² Σ_i ‖x_i x_iᵀ - S‖²_F
    """
    n, d = xc.shape
    gram = xc @ xc.T  # (n, n)
    sq_norms = np.diag(gram)  # (n,) ‖x_i‖²
    m = float(sq_norms.sum()) / (n * d)
    s_fro2 = float((gram**2).sum()) / n**2  # ‖S‖²_F
    delta2 = s_fro2 - d * m * m
    if delta2 <= 1e-18:
        return 1.0, m
    xsx = (gram**2).sum(axis=1) / n  # (n,) x_iᵀ S x_i
    beta2 = float((sq_norms**2 - 2.0 * xsx + s_fro2).sum()) / n**2
    return min(beta2, delta2) / delta2, m


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each row so its largest-magnitude entry is positive (SVD signs are arbitrary)."""
    idx = np.argmax(np.abs(vectors), axis=1)
    signs = np.sign(vectors[np.arange(len(vectors)), idx])
    return vectors * np.where(signs == 0, 1.0, signs)[:, None]


def compute_shard_stats(
    texts: Sequence[str],
    embed: Callable[[Sequence[str]], np.ndarray],
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
    """Per-dimension posterior-predictive log-density of each query under each shard.

    # score_s(q) = log N(q; μ_s, (1 + 1/n_s) Σ_s) / d   q:(d,) → (S,)  or  q:(Q,d) → (Q,S)
    """
    q, single = _as_queries(query, stats, embedder_id)
    out = np.empty((q.shape[0], len(stats)), dtype=np.float64)
    for j, s in enumerate(stats):
        c = 1.0 + 1.0 / s.n_chunks
        x = q - s.centroid.astype(np.float64)  # (Q, d)
        proj = x @ s.basis.astype(np.float64).T  # (Q, r)
        basis_var = c * s.basis_var.astype(np.float64)  # (r,)
        residual_var = c * s.residual_var
        rest = np.maximum((x * x).sum(axis=1) - (proj * proj).sum(axis=1), 0.0)  # (Q,)
        maha = (proj * proj / basis_var).sum(axis=1) + rest / residual_var  # (Q,)
        logdet = np.log(basis_var).sum() + (s.dim - len(basis_var)) * math.log(residual_var)
        out[:, j] = -0.5 * (maha + logdet + s.dim * _LOG_2PI) / s.dim
    return out[0] if single else out


def similarity_to_centroid(
    query: np.ndarray, stats: Sequence[ShardStats], *, embedder_id: str | None = None
) -> np.ndarray:
    """Cosine between each query and each shard's centroid direction, for ``min_score``.

    # sim_s(q) = q·μ_s / (‖q‖ ‖μ_s‖)   q:(d,) → (S,)  or  q:(Q,d) → (Q,S)
    """
    q, single = _as_queries(query, stats, embedder_id)
    if not stats:
        return np.zeros((q.shape[0], 0))[0 if single else slice(None)]
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    # One mat-vec per shard (not one (Q,d)@(d,S) product): BLAS may round a column
    # differently depending on S, and a shard's score must not depend on the other shards.
    mus = [s.centroid.astype(np.float64) for s in stats]
    sims = np.stack([q @ (mu / max(float(np.linalg.norm(mu)), 1e-12)) for mu in mus], axis=1)
    return sims[0] if single else sims


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
    """Serialise as safetensors: float32 tensors plus one canonical-JSON metadata entry."""
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "embedder_id": stats.embedder_id}
    meta |= {"n_chunks": stats.n_chunks, "dim": stats.dim}
    scalars = np.array([stats.residual_var, stats.mean_sim, stats.shrinkage], dtype=np.float32)
    tensors = {"centroid": stats.centroid, "basis": stats.basis, "basis_var": stats.basis_var}
    tensors["scalars"] = scalars
    # One metadata key: safetensors writes a dict's keys in hash order, which varies per process.
    return save(tensors, metadata={FORMAT: json.dumps(meta, sort_keys=True)})


def load_shard_stats(data: bytes) -> ShardStats:
    """Parse and validate bytes from ``save_shard_stats``; ``ValueError`` names any problem."""
    meta = _read_metadata(data)
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ValueError(f"shard stats: not a valid safetensors payload: {exc}") from None
    missing = {"centroid", "basis", "basis_var", "scalars"} - tensors.keys()
    if missing:
        raise ValueError(f"shard stats: missing tensors {sorted(missing)}")
    dim, n_chunks = meta["dim"], meta["n_chunks"]
    centroid, basis, basis_var, scalars = (
        tensors[k] for k in ("centroid", "basis", "basis_var", "scalars")
    )
    r = basis.shape[0] if basis.ndim == 2 else -1
    expected = {"centroid": (dim,), "basis": (r, dim), "basis_var": (r,), "scalars": (3,)}
    for name, shape in expected.items():
        if tensors[name].shape != shape or tensors[name].dtype != np.float32:
            raise ValueError(
                f"shard stats: tensor {name!r} has shape {tensors[name].shape} and dtype "
                f"{tensors[name].dtype}, expected {shape} float32 (dim={dim})"
            )
        if not np.isfinite(tensors[name]).all():
            raise ValueError(f"shard stats: tensor {name!r} contains NaN or infinite values")
    if r >= dim or scalars[0] <= 0 or (basis_var <= 0).any():
        raise ValueError("shard stats: variances must be positive and rank < dim")
    return ShardStats(
        centroid,
        basis,
        basis_var,
        float(scalars[0]),
        n_chunks,
        dim,
        meta["embedder_id"],
        float(scalars[1]),
        float(scalars[2]),
    )


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
