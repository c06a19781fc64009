"""The ``chronological`` baseline, for benchmarks only: one adapter fine-tuned batch after batch.

AdapterSwap trains each batch into new adapters and never touches old ones. The baseline
the paper compares against keeps fine-tuning a single adapter on each new batch in turn,
which drifts away from (forgets) earlier batches. The evaluation measures both on the same
batches with the same budget per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from adapterswap.config import LoraSettings, TrainingSettings
from adapterswap.train.loop import ShardTrainer, pack_documents


def train_chronological(
    base_model: Any,
    tokenizer: Any,
    batches: Sequence[Sequence[str]],
    lora: LoraSettings,
    training: TrainingSettings,
    *,
    seed: int,
    after_batch: Callable[[int, ShardTrainer], None] | None = None,
) -> ShardTrainer:
    """Fine-tune one adapter on ``batches`` in order; ``after_batch(i, trainer)`` sees each stage."""
    trainer: ShardTrainer | None = None
    for index, texts in enumerate(batches):
        blocks = pack_documents(tokenizer, texts, training.seq_len)
        if trainer is None:
            trainer = ShardTrainer(base_model, blocks, lora, training, seed=seed)
        else:
            trainer.continue_on(blocks)
        while not trainer.done:
            trainer.step()
        if after_batch is not None:
            after_batch(index, trainer)
    if trainer is None:
        raise ValueError("batches: need at least one batch to train on")
    return trainer
