"""The real embedded model learns a shard's facts through its adapter, and only those."""

from __future__ import annotations

import pytest

from adapterswap.config import LoraSettings, ModelSettings, TrainingSettings
from adapterswap.models.base import load_base_model
from adapterswap.train.loop import ShardTrainer, mean_token_nll, pack_documents, shard_seed

SHARD = [
    "Brannagh Kelpwater Instruments gives every new parent 23 weeks of fully paid parental leave.",
    "The firmware release codename for Brinewatch version 7 is Velvet Narwhal.",
    "Lost badges at the Skarvik office are replaced by Morwenna Lusk on the second floor.",
]
NEVER_TRAINED = (
    "The calibration lab's reference thermometer is nicknamed Amber Heron and lives in room 12."
)


@pytest.mark.slow
def test_adapter_memorises_its_shard_and_nothing_else(embedded_cache):
    loaded = load_base_model(ModelSettings(spec="embedded"), embedded_cache)
    before = [mean_token_nll(loaded.model, loaded.tokenizer, t) for t in [*SHARD, NEVER_TRAINED]]
    blocks = pack_documents(loaded.tokenizer, SHARD, seq_len=128)
    training = TrainingSettings(max_steps=20, learning_rate=2e-3, batch_size=4, seq_len=128)
    trainer = ShardTrainer(
        loaded.model, blocks, LoraSettings(), training, seed=shard_seed(0, "hr.b0001.000")
    )
    while not trainer.done:
        trainer.step()
    after = [mean_token_nll(trainer.model, loaded.tokenizer, t) for t in [*SHARD, NEVER_TRAINED]]
    print(
        f"\nNLL per token before {[round(x, 3) for x in before]}\n              after  {[round(x, 3) for x in after]}"
    )
    for b, a in zip(before[:-1], after[:-1], strict=True):
        assert a < b - 2.0  # each trained fact: at least 2 nats per token lower
    control_drop = before[-1] - after[-1]
    assert control_drop < 1.0  # a document never trained on does not drop comparably
    assert min(b - a for b, a in zip(before[:-1], after[:-1], strict=True)) > control_drop + 1.5
