"""A synthetic adapter population for the serving-at-scale benchmark (serve_scale.py).

Thousands of adapters that were never trained, but whose every record and file is the real
thing, as training would leave them:

- **weights**: a random LoRA per adapter, in peft's format (``adapter_config.json`` from
  peft's own ``LoraConfig``, ``adapter_model.safetensors`` under peft's key names), each A and
  B matrix scaled to the Frobenius norm trained adapters have (``TRAINED_NORMS``);
- **router statistics**: synthetic chunk embeddings around a centre per group (the real
  embedding of a topic text of that group) and an offset per shard, so a prompt on a group's
  topic routes to that group's shards, and fitted by ``fit_shard_stats``;
- **files** written by ``write_adapter_version`` (atomic, durable, manifest last, with the
  real base model's identity), and **records** through the real store, as
  ``adapterswap.train.job`` does: ``register_version``, then the files, then ``activate``.

Adapter ``i`` belongs to group ``i % groups``, so every prefix of the population spreads
evenly over the groups and a population grows (10 → 100 → 1,000 ...) by adding indices.
"""

from __future__ import annotations

import concurrent.futures
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from adapterswap.catalog.planner import shard_id
from adapterswap.config import AdapterSwapConfig
from adapterswap.models.base import base_model_identity, load_base_model
from adapterswap.route.stats import fit_shard_stats, save_shard_stats
from adapterswap.storage.artifacts import ADAPTER_WEIGHTS, write_adapter_version
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.manifest import AdapterManifest, BaseModelId, RouterInfo
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.loop import build_lora_config
from adapterswap.types import AdapterRef, Embed

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from support import untrained_manifest  # noqa: E402  (tests' helper: a complete manifest)

GROUPS = 50
BATCH = "b0001"
CHUNKS = 16  # chunks per shard's statistics: a few documents of a few 64-word windows
SHARD_SPREAD = 0.6  # a shard's offset from its group's centre, in units of the centre's norm
CHUNK_SPREAD = 0.4  # a chunk's offset from its shard's centre
# Mean Frobenius norms (A, B) per module kind of the 32 rank-16 adapters trained on the
# embedded SmolLM2-135M by benchmarks/eval_harm.py (benchmarks/results/harm-adapters/).
# A rank-r matrix of comparable entries has sqrt(r/16) times the norm of a rank-16 one.
TRAINED_RANK = 16
TRAINED_NORMS = {
    "q_proj": (2.46, 0.75),
    "k_proj": (2.45, 0.43),
    "v_proj": (2.43, 0.38),
    "o_proj": (2.49, 0.71),
    "gate_proj": (2.60, 1.28),
    "up_proj": (2.57, 1.25),
    "down_proj": (2.73, 0.75),
}


@dataclass(frozen=True)
class Target:
    """One linear layer LoRA adapts: its module path and shape."""

    module: str
    kind: str  # the module's own name, e.g. q_proj
    d_in: int
    d_out: int


def lora_targets(model: nn.Module, target_modules: list[str]) -> list[Target]:
    """The linear layers of ``model`` that ``target_modules`` names, as peft would adapt them."""
    return [
        Target(name, name.rsplit(".", 1)[-1], m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    ]


def intended_norms(kind: str, rank: int) -> tuple[float, float]:
    """The Frobenius norms (A, B) a rank-``rank`` adapter of module kind ``kind`` gets."""
    a, b = TRAINED_NORMS[kind]
    scale = math.sqrt(rank / TRAINED_RANK)
    return a * scale, b * scale


def random_lora(targets: list[Target], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA state dict under peft's key names, each matrix at its intended norm.

    # A:(r, d_in), B:(d_out, r), ‖A‖_F, ‖B‖_F = intended_norms(kind, r)
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for t in targets:
        norm_a, norm_b = intended_norms(t.kind, rank)
        a = torch.randn(rank, t.d_in, generator=generator)
        b = torch.randn(t.d_out, rank, generator=generator)
        state[f"base_model.model.{t.module}.lora_A.weight"] = a * (norm_a / a.norm())
        state[f"base_model.model.{t.module}.lora_B.weight"] = b * (norm_b / b.norm())
    return state


class RandomLora:
    """What ``write_adapter_version`` saves, for an adapter nobody trained: peft's config
    (``LoraConfig.save_pretrained``) and the weights under peft's key names. Thread-safe, so
    a pool writes many at once (a ``PeftModel`` is one model's state at a time)."""

    def __init__(self, config: AdapterSwapConfig, state: dict[str, torch.Tensor]) -> None:
        self.lora_config = build_lora_config(config.lora)
        self.state = state

    def save_pretrained(self, directory: str, safe_serialization: bool = True) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``."""
        self.lora_config.save_pretrained(directory)
        save_file(self.state, str(Path(directory) / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def adapter_of(index: int, groups: int = GROUPS) -> tuple[str, str]:
    """Adapter ``index``'s (id, group): groups in turn, so any prefix is spread evenly."""
    group = group_name(index % groups)
    return shard_id(group, BATCH, index // groups), group


def group_name(g: int) -> str:
    return f"g{g:02d}"


def topic_texts(words: list[str], groups: int = GROUPS, length: int = 24) -> list[str]:
    """One topic text per group: consecutive windows of ``words``, one per group."""
    stride = max(1, (len(words) - length) // groups)
    return [" ".join(words[g * stride : g * stride + length]) for g in range(groups)]


def shard_chunks(centre: np.ndarray, seed: int, n: int = CHUNKS) -> np.ndarray:
    """``n`` unit chunk embeddings of one shard: its group's ``centre`` (unit, (d,)) plus the
    shard's own offset plus each chunk's.

    # e_i = normalise(c + SHARD_SPREAD · u + CHUNK_SPREAD · v_i),  u, v_i ~ N(0, I/d)   → (n, d)
    """
    rng = np.random.default_rng(seed)
    d = centre.shape[0]
    offset = SHARD_SPREAD * rng.standard_normal(d) / math.sqrt(d)
    noise = CHUNK_SPREAD * rng.standard_normal((n, d)) / math.sqrt(d)
    x = centre[None, :] + offset[None, :] + noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@dataclass(frozen=True)
class PopulationSpec:
    """What every adapter of a population shares: the home, the base model, the topics."""

    config: AdapterSwapConfig
    targets: list[Target]
    base: BaseModelId
    centres: np.ndarray  # (groups, d) unit embeddings of the groups' topic texts
    embedder_id: str

    @classmethod
    def build(
        cls, config: AdapterSwapConfig, embed: Embed, embedder_id: str, topics: list[str]
    ) -> PopulationSpec:
        """Loads the base model once for its layer shapes and identity, embeds the topics."""
        model = load_base_model(config.model, config.model_cache_dir).model
        return cls(
            config,
            lora_targets(model, config.lora.target_modules),
            base_model_identity(config.model, config.model_cache_dir),
            np.asarray(embed(topics), dtype=np.float64),
            embedder_id,
        )

    @property
    def groups(self) -> int:
        return int(self.centres.shape[0])


def grow_population(
    spec: PopulationSpec, registry: AdapterRegistry, size: int, threads: int = 8
) -> list[AdapterRef]:
    """Make the first ``size`` adapters active (adding those missing), as training would:
    register each version, write its files (``threads`` at once), then activate it."""
    versions = registry.list_versions()
    present = {v.adapter_id: v.ref for v in versions if v.status == "active"}
    latest = {v.adapter_id: v.version for v in versions}  # sorted: the last one is the latest
    ids = [adapter_of(i, spec.groups) for i in range(size)]
    missing = [(i, a, g) for i, (a, g) in enumerate(ids) if a not in present]
    layout = StorageLayout.from_config(spec.config)
    refs = {}
    for i, adapter_id, group in missing:  # a build cut short left versions in training
        expected = AdapterRef(adapter_id, latest.get(adapter_id, 0) + 1)
        uri = layout.uri_of(layout.version(expected))
        lineage = [f"{adapter_id}-doc"]
        refs[i] = registry.register_version(adapter_id, group, uri, lineage, actor="bench").ref
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        written = pool.map(
            lambda item: write_one(spec, layout, refs[item[0]], item[0], item[2]), missing
        )
        manifests = list(written)
    for (_, adapter_id, _), manifest in zip(missing, manifests, strict=True):
        registry.activate(
            adapter_id, manifest.version, manifest=manifest.model_dump(mode="json"), actor="bench"
        )
    return [present.get(a) or refs[i] for i, (a, _) in enumerate(ids)]


def write_one(
    spec: PopulationSpec, layout: StorageLayout, ref: AdapterRef, index: int, group: str
) -> AdapterManifest:
    """Adapter ``index``'s files (weights, statistics, manifest last); returns the manifest."""
    lora = RandomLora(spec.config, random_lora(spec.targets, spec.config.lora.rank, index))
    centre = spec.centres[index % spec.groups]
    stats = fit_shard_stats(shard_chunks(centre, seed=index), spec.embedder_id)
    manifest = untrained_manifest(ref, group, [f"{ref.id}-doc"], spec.base).model_copy(
        update={
            "lora": spec.config.lora.model_dump(),
            "seed": index,
            "router": RouterInfo(embedder=spec.embedder_id),
        }
    )
    write_adapter_version(layout.version(ref), lora, save_shard_stats(stats), manifest)
    return manifest
