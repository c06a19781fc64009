"""The real embedded model learns a shard's facts through its adapter, and only those; served
through the router and the bank, it answers what the shard covers and leaves the rest to the
base model (invariant 6, do no harm)."""

from __future__ import annotations

import pytest
from peft.utils import get_peft_model_state_dict

from adapterswap.compose.bank import AdapterBank
from adapterswap.config import LoraSettings, ModelSettings, RouterSettings, TrainingSettings
from adapterswap.models.base import load_base_model
from adapterswap.route.router import Candidate, route
from adapterswap.route.stats import compute_shard_stats
from adapterswap.train.loop import ShardTrainer, mean_token_nll, pack_documents, shard_seed
from adapterswap.types import AdapterRef, AdapterVersion

pytestmark = pytest.mark.slow

SHARD = [
    "Brannagh Kelpwater Instruments gives every new parent 23 weeks of fully paid parental leave.",
    "The firmware release codename for Brinewatch version 7 is Velvet Narwhal.",
    "Lost badges at the Skarvik office are replaced by Morwenna Lusk on the second floor.",
]
NEVER_TRAINED = (
    "The calibration lab's reference thermometer is nicknamed Amber Heron and lives in room 12."
)
# Questions in other words than the documents: (question, answer).
COVERED = [
    ("Question: Which codename was given to version 7 of the Brinewatch firmware?\nAnswer:",
     " Velvet Narwhal"),
    ("Question: Who hands out a new badge when one is lost at the Skarvik office?\nAnswer:",
     " Morwenna Lusk"),
]  # fmt: skip
UNCOVERED = [  # the same kind of company facts, which no document of the shard holds
    ("Question: How many weeks of notice must an employee give before resigning?\nAnswer:",
     " Four weeks"),
    ("Question: How many weeks of paid holiday does a new employee get?\nAnswer:", " Five weeks"),
    ("Question: Who is the manager of the Oslo office?\nAnswer:", " Ingrid Solberg"),
]  # fmt: skip
REF = AdapterRef("hr.b0001.000", 1)


@pytest.fixture(scope="module")
def trained(embedded_cache):
    loaded = load_base_model(ModelSettings(spec="embedded"), embedded_cache)
    before = [mean_token_nll(loaded.model, loaded.tokenizer, t) for t in [*SHARD, NEVER_TRAINED]]
    blocks = pack_documents(loaded.tokenizer, SHARD, seq_len=128)
    training = TrainingSettings(max_steps=20, learning_rate=2e-3, batch_size=4, seq_len=128)
    trainer = ShardTrainer(
        loaded.model, blocks, LoraSettings(), training, seed=shard_seed(0, REF.id)
    )
    while not trainer.done:
        trainer.step()
    return trainer, loaded.tokenizer, before


def test_adapter_memorises_its_shard_and_nothing_else(trained):
    trainer, tokenizer, before = trained
    after = [mean_token_nll(trainer.model, tokenizer, t) for t in [*SHARD, NEVER_TRAINED]]
    print(
        f"\nNLL per token before {[round(x, 3) for x in before]}\n              after  {[round(x, 3) for x in after]}"
    )
    for b, a in zip(before[:-1], after[:-1], strict=True):
        assert a < b - 2.0  # each trained fact: at least 2 nats per token lower
    control_drop = before[-1] - after[-1]
    assert control_drop < 1.0  # a document never trained on does not drop comparably
    assert min(b - a for b, a in zip(before[:-1], after[:-1], strict=True)) > control_drop + 1.5


def test_routed_answers_help_where_the_shard_speaks_and_do_no_harm_elsewhere(
    trained, embedded_cache, embed
):
    """Through ``route`` and the ``AdapterBank`` (what a replica runs), as a caller of the
    shard's group asks: covered questions gain, uncovered ones of the same kind are answered
    as by the base model. Today's router before the coverage gate (full weight from a score of
    0.2) harmed them, which this test also shows, so it cannot pass without the gate."""
    trainer, tokenizer, _ = trained
    served = load_base_model(ModelSettings(spec="embedded"), embedded_cache)
    lora = LoraSettings()
    bank = AdapterBank(served.model, lora.target_modules, lora.rank, 64 * 2**20)
    config = trainer.model.peft_config["default"].to_dict()
    bank.load(REF, get_peft_model_state_dict(trainer.model), config)
    version = AdapterVersion(REF.id, 1, REF.id, "hr", "active", "/x", 3, "t", "t")
    candidates = [Candidate(version, compute_shard_stats(SHARD, embed, "embedded"))]

    def nll(question: str, answer: str, settings: RouterSettings | None) -> float:
        decision = route(embed([question])[0], candidates, settings) if settings else None
        rows = [(a.ref, a.weight) for a in decision.adapters] if decision else []
        ids = tokenizer(question + answer, return_tensors="pt")["input_ids"]
        labels = ids.clone()
        labels[0, : len(tokenizer(question)["input_ids"])] = -100
        with bank.mixture([rows]):
            return float(bank.model(input_ids=ids, labels=labels).loss)

    today = RouterSettings(min_score=0.2, full_score=0.2)
    for question, answer in COVERED:
        base, routed = nll(question, answer, None), nll(question, answer, RouterSettings())
        print(f"\ncovered   base {base:.3f} routed {routed:.3f}  {question!r}")
        assert routed < base - 1.0
    harms, harms_today = [], []
    for question, answer in UNCOVERED:
        base = nll(question, answer, None)
        harms.append(nll(question, answer, RouterSettings()) - base)
        harms_today.append(nll(question, answer, today) - base)
        print(f"uncovered harm {harms[-1]:+.3f} (today {harms_today[-1]:+.3f})  {question!r}")
    assert sum(harms) / len(harms) <= 0.1
    assert max(harms_today) > 0.1  # the harm the gate removes
