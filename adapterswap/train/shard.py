"""One shard's training run, start to finish, wherever it executes. No Ray here.

A :class:`ShardRun` is everything a worker needs, as plain picklable values: the shard's
own rows (never the whole catalog), its version and seed, and the settings. The Ray Train
worker calls :func:`start_shard_trainer`, steps the trainer, then :func:`finish_shard_run`,
which writes the version's artifacts (adapter, router statistics, manifest) to storage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from adapterswap.config import (
    AdapterSwapConfig,
    EmbeddingSettings,
    LoraSettings,
    ModelSettings,
    TrainingSettings,
)
from adapterswap.models.base import LoadedModel, load_base_model
from adapterswap.models.embedder import load_embedder
from adapterswap.route.stats import compute_shard_stats, save_shard_stats
from adapterswap.storage.artifacts import write_adapter_version
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.manifest import AdapterManifest, BaseModelId, RouterInfo, TrainingMetrics
from adapterswap.train.loop import ShardTrainer, StepInfo, pack_documents, shard_seed
from adapterswap.train.plan import ShardWork
from adapterswap.types import AdapterRef


@dataclass(frozen=True)
class ShardRun:
    """One version of one shard's adapter to train. Settings travel as plain dicts."""

    adapter_id: str
    version: int
    group: str
    doc_ids: tuple[str, ...]
    texts: tuple[str, ...]
    data_hash: str
    seed: int
    storage_uri: str
    cache_dir: str
    base_model: BaseModelId
    model: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    embedding: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.adapter_id, self.version)


def make_shard_run(
    work: ShardWork,
    version: int,
    config: AdapterSwapConfig,
    base_model: BaseModelId,
) -> ShardRun:
    """The run for ``work`` as version ``version``, with this configuration's settings."""
    return ShardRun(
        adapter_id=work.adapter_id,
        version=version,
        group=work.group,
        doc_ids=work.doc_ids,
        texts=work.texts,
        data_hash=work.data_hash,
        seed=shard_seed(config.training.seed, work.adapter_id),
        storage_uri=config.storage,
        cache_dir=str(config.model_cache_dir),
        base_model=base_model,
        model=config.model.model_dump(),
        lora=config.lora.model_dump(),
        training=config.training.model_dump(),
        embedding=config.embedding.model_dump(),
        started_at=time.time(),
    )


def load_shard_model(run: ShardRun, device: torch.device) -> LoadedModel:
    """The run's base model and tokenizer, loaded on ``device``."""
    settings = ModelSettings(**{**run.model, "device": str(device)})
    return load_base_model(settings, Path(run.cache_dir))


def shard_trainer_on(
    loaded: LoadedModel,
    run: ShardRun,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[Any], Any] | None = None,
) -> ShardTrainer:
    """Pack the shard's documents and build its trainer on ``loaded`` (which peft changes in
    place: LoRA layers are injected into the model until ``trainer.model.unload()``)."""
    training = TrainingSettings(**run.training)
    blocks = pack_documents(loaded.tokenizer, run.texts, training.seq_len)
    return ShardTrainer(
        loaded.model,
        blocks,
        LoraSettings(**run.lora),
        training,
        seed=run.seed,
        rank=rank,
        world_size=world_size,
        wrap=wrap,
    )


def start_shard_trainer(
    run: ShardRun,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[Any], Any] | None = None,
) -> tuple[ShardTrainer, LoadedModel]:
    """Load the base model on ``device``, pack the shard's documents, build the trainer."""
    loaded = load_shard_model(run, device)
    return shard_trainer_on(loaded, run, rank, world_size, wrap), loaded


def build_manifest(run: ShardRun, trainer: ShardTrainer, embedder_id: str) -> AdapterManifest:
    """What the version is and exactly what it saw (written last, as manifest.json)."""
    last = trainer.last
    wall = time.time() - run.started_at
    return AdapterManifest(
        adapter_id=run.adapter_id,
        version=run.version,
        shard=run.adapter_id,
        group=run.group,
        doc_ids=sorted(run.doc_ids),
        data_hash=run.data_hash,
        base_model=run.base_model,
        lora=run.lora,
        training=run.training,
        seed=run.seed,
        router=RouterInfo(embedder=embedder_id),
        metrics=TrainingMetrics(
            final_loss=None if last is None else last.loss,
            steps=trainer.step_count,
            tokens=trainer.tokens_seen,
            wall_time_s=round(wall, 3),
            tokens_per_s=round(trainer.tokens_seen / wall, 2) if wall > 0 else None,
        ),
        created_at=datetime.now(UTC).isoformat(),
    )


def finish_shard_run(run: ShardRun, trainer: ShardTrainer) -> AdapterManifest:
    """Fit the shard's router statistics and write the version's files; returns the manifest."""
    embedder = load_embedder(EmbeddingSettings(**run.embedding))
    stats = compute_shard_stats(run.texts, embedder.embed, embedder.model_id)
    manifest = build_manifest(run, trainer, embedder.model_id)
    loc = StorageLayout.from_uri(run.storage_uri).version(run.ref)
    write_adapter_version(loc, trainer.model, save_shard_stats(stats), manifest)
    return manifest


def step_or_explain(trainer: ShardTrainer, run: ShardRun) -> StepInfo:
    """One step; out-of-memory becomes an error that names the shard and the fix."""
    try:
        return trainer.step()
    except torch.OutOfMemoryError as exc:
        training = trainer.training
        raise MemoryError(
            f"shard {run.adapter_id} v{run.version}: out of memory at batch_size="
            f"{training.batch_size}, seq_len={training.seq_len}; lower training.batch_size "
            "(raising training.grad_accum_steps keeps the effective batch) or training.seq_len"
        ) from exc
