"""The one-shard training loop on the tiny random model: packing, determinism, exact resume."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from support import private_copy, untrained_manifest

from adapterswap.config import LoraSettings, TrainingSettings
from adapterswap.errors import BaseModelMismatch
from adapterswap.models.base import LoadedModel
from adapterswap.storage.artifacts import download_version, write_adapter_version
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.manifest import BaseModelId, read_manifest
from adapterswap.storage.purge import sweep_orphans
from adapterswap.train.loop import (
    IGNORE_INDEX,
    ShardTrainer,
    base_kl,
    pack_documents,
    shard_seed,
)
from adapterswap.types import AdapterRef

TEXTS = [
    "The firmware codename for version 7 is Velvet Narwhal.",
    "Parental leave at the company lasts 23 weeks, fully paid.",
    "The incident room is called the Kelp Room and sits on floor 3.",
]


def settings(**kw) -> TrainingSettings:
    return TrainingSettings(
        **{"max_steps": 4, "batch_size": 2, "seq_len": 16, "learning_rate": 1e-2, **kw}
    )


def trainer_on(
    tiny: LoadedModel, texts: list[str] = TEXTS, rank: int = 4, seed: int = 0, **training: object
) -> ShardTrainer:
    """A trainer of a copy of its own of the tiny model, on ``texts`` in 16-token blocks."""
    loaded = private_copy(tiny)
    blocks = pack_documents(loaded.tokenizer, texts, 16)
    return ShardTrainer(
        loaded.model, blocks, LoraSettings(rank=rank), settings(**training), seed=seed
    )


def lora_weights(trainer: ShardTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


def test_packing_joins_with_eos_and_masks_padding(tiny):
    tok = tiny.tokenizer
    blocks = pack_documents(tok, TEXTS, seq_len=16)
    stream = sum(
        (tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in TEXTS), []
    )
    if len(stream) % 16 == 1:  # a lone last token has nothing to predict: the final EOS goes
        stream = stream[:-1]
    assert blocks.n_tokens == len(stream)
    assert (blocks.attention_mask.sum(dim=1) >= 2).all()  # every block has a target to predict
    assert blocks.input_ids.shape == (-(-len(stream) // 16), 16)
    assert blocks.input_ids.flatten()[: len(stream)].tolist() == stream
    tail = blocks.labels.flatten()[len(stream) :]
    assert (tail == IGNORE_INDEX).all()  # padding never counts in the loss
    assert (blocks.labels.flatten()[: len(stream)] == torch.tensor(stream)).all()


def test_training_lowers_loss_and_only_lora_moves(tiny):
    base = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    trainer = trainer_on(tiny, seed=1, max_steps=12)
    first = trainer.step().loss
    while not trainer.done:
        last = trainer.step().loss
    assert last < first - 0.25
    after = {
        k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
        for k, v in trainer.model.state_dict().items()
        if "lora_" not in k
    }
    assert after.keys() == base.keys()
    for name, value in base.items():  # the frozen base weights are untouched
        assert torch.equal(after[name], value), name
    for name, param in trainer.model.named_parameters():
        assert param.requires_grad == ("lora_" in name)
    assert trainer.last.step == 12 and trainer.tokens_seen > 0


def test_same_seed_same_adapter_other_seed_differs(tiny):
    runs = []
    for seed in (7, 7, 8):
        trainer = trainer_on(tiny, seed=seed)
        while not trainer.done:
            trainer.step()
        runs.append(lora_weights(trainer))
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key], rtol=0, atol=0)
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    assert shard_seed(0, "hr.b0001.000") != shard_seed(0, "hr.b0001.001")


def test_resume_from_checkpoint_is_exact(tiny, tmp_path):
    def fresh(seed=3):
        return trainer_on(tiny, seed=seed, max_steps=6, batch_size=1)

    straight = fresh()
    while not straight.done:
        straight.step()
    interrupted = fresh()
    for _ in range(3):
        interrupted.step()
    interrupted.save_checkpoint(tmp_path)
    resumed = fresh()
    resumed.load_checkpoint(tmp_path)
    assert resumed.step_count == 3
    while not resumed.done:
        resumed.step()
    expected, got = lora_weights(straight), lora_weights(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


def test_data_parallel_ranks_split_blocks(tiny):
    loaded = private_copy(tiny)
    blocks = pack_documents(loaded.tokenizer, TEXTS * 4, 16)
    parts = [
        ShardTrainer(
            private_copy(tiny).model,
            blocks,
            LoraSettings(rank=2),
            settings(),
            seed=0,
            rank=r,
            world_size=2,
        ).blocks
        for r in (0, 1)
    ]
    assert len(parts[0]) + len(parts[1]) == len(blocks)
    assert torch.equal(parts[0].input_ids, blocks.input_ids[0::2])


def test_artifacts_load_in_peft_and_refuse_another_base(tiny, tmp_path):
    trainer = trainer_on(tiny)
    while not trainer.done:
        trainer.step()
    layout = StorageLayout.from_uri(str(tmp_path / "storage"))
    ref = AdapterRef("hr.b0001.000", 1)
    loc = layout.version(ref)
    manifest = untrained_manifest(ref, "hr", [], BaseModelId(id="tiny-random", hash="abc"))
    write_adapter_version(loc, trainer.model, b"stats", manifest)
    assert read_manifest(loc).format == 1
    assert read_manifest(loc) == manifest

    local = download_version(loc, tmp_path / "local")
    peft_model = PeftModel.from_pretrained(private_copy(tiny).model, str(local))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        trained_out = trainer.model(input_ids=ids).logits
        loaded_out = peft_model(input_ids=ids).logits
        base_out = tiny.model(input_ids=ids).logits
    assert not torch.allclose(trained_out, base_out)  # the adapter does something
    torch.testing.assert_close(loaded_out, trained_out)

    read_manifest(loc).check_base_model("abc")
    with pytest.raises(
        BaseModelMismatch, match=r"adapter hr.b0001.000 v1 was trained on base model tiny-random"
    ):
        read_manifest(loc).check_base_model("def")


def test_sweep_removes_only_unknown_versions(tmp_path):
    layout = StorageLayout.from_uri(str(tmp_path / "s"))
    for adapter_id, version in (("a.b1.000", 1), ("a.b1.000", 2), ("b.b1.000", 1)):
        loc = layout.version(AdapterRef(adapter_id, version))
        loc.fs.create_dir(loc.path)
        loc.fs.open_output_stream(loc.path + "/manifest.json").close()
    swept = sweep_orphans(layout, {AdapterRef("a.b1.000", 1), AdapterRef("b.b1.000", 1)})
    assert swept == [AdapterRef("a.b1.000", 2)]
    assert [ref for ref, _ in layout.versions_present()] == [
        AdapterRef("a.b1.000", 1),
        AdapterRef("b.b1.000", 1),
    ]


def test_out_of_memory_names_the_shard_and_the_fix(tiny, monkeypatch):
    from adapterswap.train.shard import ShardRun, step_or_explain

    trainer = trainer_on(tiny, rank=2)

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "step", oom)
    base = BaseModelId(id="tiny-random", hash="x")
    run = ShardRun("hr.b0001.000", 2, "hr", (), (), "h", 0, "/s", "/c", base)
    with pytest.raises(
        MemoryError,
        match=r"shard hr.b0001.000 v2: out of memory at batch_size=2, seq_len=16; lower training.batch_size",
    ):
        step_or_explain(trainer, run)


def test_chronological_baseline_keeps_fine_tuning_one_adapter(tiny):
    from adapterswap.train.chronological import train_chronological

    loaded = private_copy(tiny)
    snapshots = []
    trainer = train_chronological(
        loaded.model,
        loaded.tokenizer,
        [TEXTS[:2], TEXTS[2:]],
        LoraSettings(rank=4),
        settings(max_steps=3),
        seed=0,
        after_batch=lambda i, t: snapshots.append(lora_weights(t)),
    )
    assert len(snapshots) == 2 and trainer.step_count == 3 and trainer.tokens_seen > 0
    # The same adapter moved on from batch 1's weights (it is not a fresh one per batch).
    changed = [k for k in snapshots[0] if not torch.equal(snapshots[0][k], snapshots[1][k])]
    assert changed
    fresh = trainer_on(tiny, TEXTS[2:], max_steps=3)
    while not fresh.done:
        fresh.step()
    assert any(not torch.equal(lora_weights(fresh)[k], snapshots[1][k]) for k in snapshots[1])


def test_epoch_budget_sets_the_step_count(tiny):
    from adapterswap.train.loop import budget_steps

    assert budget_steps(settings(max_steps=9), n_blocks=10) == 9
    assert (
        budget_steps(settings(epochs=2, batch_size=4), n_blocks=10) == 5
    )  # 20 blocks / 4 per step
    assert budget_steps(settings(epochs=1, batch_size=4, grad_accum_steps=2), n_blocks=3) == 1
    loaded = private_copy(tiny)
    blocks = pack_documents(loaded.tokenizer, TEXTS * 3, 16)
    trainer = ShardTrainer(
        loaded.model, blocks, LoraSettings(rank=2), settings(epochs=1, batch_size=2), seed=0
    )
    steps = 0
    while not trainer.done:
        steps = trainer.step().step
    assert steps == -(-len(blocks) // 2) and trainer.last.max_steps == steps


def test_kl_weight_keeps_the_adapter_near_the_base_model(tiny):
    """The KL term pulls the adapter's next-token distributions toward the base model's on the
    shard's own tokens: at weight 0 it is today's loss exactly, and a large weight leaves the
    adapter closer to the base model than plain cross-entropy does, for the same steps."""
    plain, zero, heavy = (
        trainer_on(tiny, seed=3, max_steps=8, **kw)
        for kw in ({}, {"kl_weight": 0.0}, {"kl_weight": 20.0})
    )
    for t in (plain, zero, heavy):
        while not t.done:
            t.step()
    assert lora_weights(zero).keys() == lora_weights(plain).keys()
    assert all(torch.equal(lora_weights(zero)[k], v) for k, v in lora_weights(plain).items())
    blocks = pack_documents(tiny.tokenizer, TEXTS, 16)
    inputs = {"input_ids": blocks.input_ids, "attention_mask": blocks.attention_mask}

    def kl_to_base(t: ShardTrainer) -> float:
        t.model.eval()
        with torch.no_grad():
            ours = t.model(**inputs).logits
            with t.model.disable_adapter():
                base = t.model(**inputs).logits
        return float(base_kl(base, ours, blocks.labels))

    assert kl_to_base(heavy) < 0.7 * kl_to_base(plain)  # measured 0.53×
