"""Training shard after shard on one loaded base model: a pool worker's body. No Ray here.

``actors.train_pool`` runs one :class:`PoolWorker` per Ray Train worker. It loads the base
model (and, on the first finish, the embedder: ``load_embedder`` keeps it per process) once,
then trains each shard it is handed exactly as a trainer of its own would
(:func:`~adapterswap.train.shard.shard_trainer_on`, the same seed and steps), so the
adapter's bytes do not depend on which path trained it or what the worker trained before.
Between shards, peft's ``unload()`` takes the LoRA layers out without merging them: the
base model's weights are never written (LoRA trains only its own matrices), so the next
shard starts from the base model exactly as loaded.

Checkpoints go to the shard's own directory (``StorageLayout.checkpoints(ref)``), one
``step-NNNNNNNN`` folder per save, marked complete by a last empty file; a shard handed out
again after its worker died resumes from its newest complete one.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from adapterswap.config import ModelSettings
from adapterswap.models.base import load_base_model
from adapterswap.storage.fs import Location, delete_dir, read_bytes, write_atomic
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.manifest import AdapterManifest
from adapterswap.train.loop import STATE_FILE, WEIGHTS_FILE, ShardTrainer, StepInfo
from adapterswap.train.shard import ShardRun, finish_shard_run, shard_trainer_on, step_or_explain

COMPLETE = "COMPLETE"  # written last into a checkpoint folder: the folder is whole


def save_shard_checkpoint(loc: Location, trainer: ShardTrainer) -> None:
    """Save ``trainer`` under ``loc`` as ``step-<step>``, then delete every other folder."""
    name = f"step-{trainer.step_count:08d}"
    with tempfile.TemporaryDirectory() as tmp:
        trainer.save_checkpoint(Path(tmp))
        for file in sorted(Path(tmp).iterdir()):
            write_atomic(loc.child(name, file.name), file.read_bytes(), durable=False)
    write_atomic(loc.child(name, COMPLETE), b"", durable=False)
    for other in _step_folders(loc):
        if other != name:  # older saves, and any a crash left without its mark
            delete_dir(loc.child(other))


def restore_shard_checkpoint(loc: Location, trainer: ShardTrainer) -> int:
    """Resume ``trainer`` from the newest complete checkpoint under ``loc``; returns its step
    (0 when there is none)."""
    complete = [
        name
        for name in _step_folders(loc)
        if loc.fs.get_file_info(loc.child(name, COMPLETE).path).type == pafs.FileType.File
    ]
    if not complete:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for file in (WEIGHTS_FILE, STATE_FILE):
            (Path(tmp) / file).write_bytes(read_bytes(loc.child(complete[-1], file)))
        trainer.load_checkpoint(Path(tmp))
    return trainer.step_count


def _step_folders(loc: Location) -> list[str]:
    selector = pafs.FileSelector(loc.path, allow_not_found=True)
    return sorted(
        info.base_name
        for info in loc.fs.get_file_info(selector)
        if info.type == pafs.FileType.Directory and info.base_name.startswith("step-")
    )


class PoolWorker:
    """One worker of the pool: the base model loaded once, and each shard trained on it."""

    def __init__(self, model: dict[str, Any], cache_dir: str, device: torch.device) -> None:
        self.model_settings = model
        self.cache_dir = cache_dir
        self.loaded = load_base_model(
            ModelSettings(**{**model, "device": str(device)}), Path(cache_dir)
        )

    def train(self, run: ShardRun, on_step: Callable[[StepInfo], None]) -> AdapterManifest:
        """Train ``run`` to its last step (resuming from its checkpoint, if any), write its
        version's files, and hand the base model back as loaded; ``on_step`` sees each step."""
        if (run.model, run.cache_dir) != (self.model_settings, self.cache_dir):
            raise ValueError(
                f"shard {run.adapter_id} v{run.version} names another base model than the "
                "training pool loaded; train it with the pool's configuration"
            )
        run = dataclasses.replace(run, started_at=time.time())  # its own time, not the queue's
        trainer = shard_trainer_on(self.loaded, run)
        try:
            checkpoints = StorageLayout.from_uri(run.storage_uri).checkpoints(run.ref)
            restore_shard_checkpoint(checkpoints, trainer)
            every = trainer.training.checkpoint_every
            while not trainer.done:
                info = step_or_explain(trainer, run)
                on_step(info)
                if info.step % every == 0 or trainer.done:
                    save_shard_checkpoint(checkpoints, trainer)
            return finish_shard_run(run, trainer)
        finally:
            trainer.model.unload()  # take the LoRA layers out, unmerged: the base as loaded
