"""Composition: unmerged per-row LoRA mixtures against peft and hand-merged references.

Every equality test is preceded by a check that the adapters change the output, since a
fresh LoRA (B = 0) would make any equality pass. References are independent of the code
under test: peft's own PeftModel, and a copy of the base model whose Linear weights were
merged by hand as ``W + Σ w s B A``.

Exactness is checked in float64 end to end (the run's shared ``tiny64``): the tiny model, its
adapters and the references, so "equal" means equal to EXACT whatever order a processor's
kernels add in. In float32 the bank's zero-padded rank lanes and peft add the same products
in different orders: on an AMD EPYC machine one element in 1,792 came out 1.35e-5 apart,
above ``assert_close``'s float32 default, while another processor passed.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from support import ALL, A, B, C, hand_merged, save_random_lora

from adapterswap.compose import layer as mixture_layer
from adapterswap.compose.adapter_files import load_adapter_dir
from adapterswap.compose.bank import AdapterBank
from adapterswap.config import LoraSettings, ServeSettings
from adapterswap.errors import AdapterNotLoaded, InvalidAdapter, InvalidMixture, SlotsExhausted
from adapterswap.models.base import LoadedModel
from adapterswap.types import AdapterRef

R_MAX = 8
BIG = 1 << 20  # 8 slots of the float64 tiny model at r_max=8
# Both sides are float64 computations of one value that add the same products in different
# orders. A sum of n products, in any order, is within n·u·Σ|products| of the exact sum
# (u = 2^-53 ≈ 1.1e-16). The widest sums here have n ≤ 128 terms (down_proj's input), so an
# operation's result moves by at most ~1.4e-14 of the size of its terms; through two layers
# and the final norm, whose outputs are below 10, that stays under 1e-12 (measured: ≤ 2e-14).
# A real error (a wrong scale or weight, another adapter's lane) moves the outputs by more
# than 1e-2 (differs()); float32 rounding alone moved one by 1.35e-5.
EXACT = {"rtol": 0.0, "atol": 1e-12}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dirs(lora_dirs: dict[AdapterRef, Path]) -> dict[AdapterRef, Path]:
    return lora_dirs


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 1000, (4, 7), generator=torch.Generator().manual_seed(0))


def make_bank(tiny64: LoadedModel, cache_bytes: int = BIG, r_max: int = R_MAX) -> AdapterBank:
    return AdapterBank(copy.deepcopy(tiny64.model), ALL, r_max, cache_bytes)


def loaded_bank(tiny64: LoadedModel, dirs: dict, cache_bytes: int = BIG) -> AdapterBank:
    bank = make_bank(tiny64, cache_bytes)
    for ref, path in dirs.items():
        bank.load(ref, *load_adapter_dir(path))
    return bank


@torch.no_grad()
def hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden states: the logits are a fixed, untargeted projection of
    them, and comparing (B, T, 64) rather than (B, T, 49152) keeps the tests fast."""
    return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


@torch.no_grad()
def bank_hidden(bank: AdapterBank, rows: list, ids: torch.Tensor) -> torch.Tensor:
    with bank.mixture(rows):
        return hidden(bank.model, ids)


def differs(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (x - y).abs().max().item() > 1e-2


# --------------------------------------------------------------------------- exactness


def test_adapters_change_the_output(tiny64, dirs, ids):
    base = hidden(tiny64.model, ids)
    for ref in dirs:
        assert differs(hidden(hand_merged(tiny64.model, dirs, [(ref, 1.0)]), ids), base), ref
    assert differs(bank_hidden(loaded_bank(tiny64, dirs), [[(A, 1.0)]] * 4, ids), base)


@pytest.mark.parametrize("ref", [A, B, C])
def test_one_adapter_matches_peft(tiny64, dirs, ids, ref):
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny64.model), dirs[ref])
    expected = hidden(peft_model, ids)
    assert differs(expected, hidden(tiny64.model, ids))
    got = bank_hidden(loaded_bank(tiny64, dirs), [[(ref, 1.0)]] * len(ids), ids)
    torch.testing.assert_close(got, expected, **EXACT)


def test_rank_and_alpha_patterns_match_peft(tiny64, ids, tmp_path):
    spec = {"r": 4, "lora_alpha": 8, "target_modules": ALL}
    patterns = {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 32}}
    path = save_random_lora(tiny64.model, tmp_path / "p", 7, **spec, **patterns)
    expected = hidden(PeftModel.from_pretrained(copy.deepcopy(tiny64.model), path), ids)
    bank = make_bank(tiny64)
    bank.load(A, *load_adapter_dir(path))
    torch.testing.assert_close(bank_hidden(bank, [[(A, 1.0)]] * len(ids), ids), expected, **EXACT)


@pytest.mark.parametrize(
    "mix", [[(A, 0.7)], [(B, 1.3)], [(A, 0.5), (B, 0.3), (C, 0.2)], [(C, 2.0), (A, 0.1)]]
)
def test_mixture_matches_hand_merged(tiny64, dirs, ids, mix):
    expected = hidden(hand_merged(tiny64.model, dirs, mix), ids)
    assert differs(expected, hidden(tiny64.model, ids))
    got = bank_hidden(loaded_bank(tiny64, dirs), [mix] * len(ids), ids)
    torch.testing.assert_close(got, expected, **EXACT)


M1, M2, M3 = [(A, 0.6), (B, 0.4)], [(B, 1.0)], [(A, 0.2), (B, 0.3), (C, 0.5)]
LAYOUTS = {
    "all_same": [M3, M3, M3, M3],
    "all_different": [M1, M2, M3, [(C, 0.9)]],
    "skewed": [M3, M3, M3, M2],
    "base_only_rows": [[], M1, [], M3],
    "single_row": [M3],
}


@pytest.mark.parametrize("path", ["auto", "flat", "gather"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixed_batch_rows_match_each_row_alone(tiny64, dirs, ids, monkeypatch, layout, path):
    rows = LAYOUTS[layout]
    ids = ids[: len(rows)]
    bank = loaded_bank(tiny64, dirs)
    alone = [bank_hidden(bank, [row], ids[b : b + 1])[0] for b, row in enumerate(rows)]
    if path != "auto":
        monkeypatch.setattr(mixture_layer, "_prefer_gather", lambda *a: path == "gather")
    got = bank_hidden(bank, rows, ids)
    base = hidden(tiny64.model, ids)
    for b, row in enumerate(rows):
        torch.testing.assert_close(got[b], alone[b], **EXACT)
        merged = hidden(hand_merged(tiny64.model, dirs, row), ids[b : b + 1])[0]
        torch.testing.assert_close(got[b], merged, **EXACT)
        if row:
            assert differs(got[b], base[b])
        else:
            assert torch.equal(got[b], base[b])  # base-only rows are untouched, bit for bit


def test_base_only_batch_is_bit_identical_and_weights_untouched(tiny64, dirs, ids):
    before = {k: v.clone() for k, v in tiny64.model.state_dict().items()}
    bank = loaded_bank(tiny64, dirs)
    base = hidden(tiny64.model, ids)
    assert torch.equal(hidden(bank.model, ids), base)  # no mixture set
    assert torch.equal(bank_hidden(bank, [[]] * len(ids), ids), base)
    bank_hidden(bank, [M3] * len(ids), ids)
    assert torch.equal(bank_hidden(bank, [[(A, 0.0)]] * len(ids), ids), base)
    with torch.no_grad(), bank.mixture([[]] * len(ids)):
        assert torch.equal(bank.model(input_ids=ids).logits, tiny64.model(input_ids=ids).logits)
    after = {k.replace(".base.", "."): v for k, v in bank.model.state_dict().items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # The injected layer wraps the very same weight tensor as the original module.
    layer = bank.layers["model.layers.0.self_attn.q_proj"]
    assert layer.base.weight is bank.model.model.layers[0].self_attn.q_proj.base.weight


@pytest.mark.parametrize("rows", [[M3], [M1, M3, [], M2]])
def test_generate_with_kv_cache_matches_hand_merged(tiny64, dirs, ids, rows):
    ids = ids[: len(rows)]
    bank = loaded_bank(tiny64, dirs)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "use_cache": True}
    mask = torch.ones_like(ids)
    with torch.no_grad(), bank.mixture(rows):
        got = bank.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    for b, row in enumerate(rows):
        merged = hand_merged(tiny64.model, dirs, row)
        with torch.no_grad():
            want = merged.generate(
                input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1], **kwargs
            )
        assert torch.equal(got[b], want[0])


def test_peft_key_variant_with_adapter_name_loads(tiny64, dirs, ids):
    state, config = load_adapter_dir(dirs[A])
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in state.items()}
    bank = make_bank(tiny64)
    bank.load(A, renamed, config)
    expected = hidden(hand_merged(tiny64.model, dirs, [(A, 1.0)]), ids)
    torch.testing.assert_close(bank_hidden(bank, [[(A, 1.0)]] * len(ids), ids), expected, **EXACT)


# --------------------------------------------------------------------------- the LRU


def slot_is_zero(bank: AdapterBank, slot: int) -> bool:
    return all(
        not layer.lora_A[slot].any() and not layer.lora_B[slot].any() and layer.scale[slot] == 0
        for layer in bank.layers.values()
    )


def two_slot_bank(tiny64: LoadedModel) -> AdapterBank:
    one = make_bank(tiny64, cache_bytes=1)
    assert one.capacity == 1  # at least one slot, whatever the budget
    return make_bank(tiny64, cache_bytes=2 * one.slot_bytes + 1)


def test_lru_evicts_least_recently_used_and_zeroes_it(tiny64, dirs):
    bank = two_slot_bank(tiny64)
    assert bank.capacity == 2
    loader = lambda ref: load_adapter_dir(dirs[ref])  # noqa: E731
    slot_a, slot_b = bank.get_or_load(A, loader), bank.get_or_load(B, loader)
    assert bank.get_or_load(A, loader) == slot_a  # a hit: A is now the most recent
    assert bank.get_or_load(C, loader) == slot_b  # B, the LRU one, made room
    assert (bank.hits, bank.misses, bank.evictions) == (1, 3, 1)
    assert bank.loaded() == [A, C]
    # Nothing of B is left in its old slot: C does not target q/v/down, and has rank 2 < 8.
    for name, layer in bank.layers.items():
        if name.endswith(("q_proj", "v_proj", "down_proj")):
            assert not layer.lora_A[slot_b].any() and not layer.lora_B[slot_b].any()
        else:
            assert not layer.lora_A[slot_b, 2:].any() and not layer.lora_B[slot_b, :, 2:].any()


def test_explicit_eviction_zeroes_the_slot(tiny64, dirs):
    bank = loaded_bank(tiny64, dirs)
    slot = bank.slot_of(B)
    assert not slot_is_zero(bank, slot)
    assert bank.evict(B) and not bank.evict(B)
    assert slot_is_zero(bank, slot) and B not in bank
    assert bank.evict_all_except([A]) == [C]
    assert bank.loaded() == [A]
    with pytest.raises(AdapterNotLoaded, match="adapter b v1 is not loaded"):
        bank.mixture([[(B, 1.0)]]).__enter__()


def test_pinned_slots_are_never_evicted(tiny64, dirs):
    bank = two_slot_bank(tiny64)
    bank.load(A, *load_adapter_dir(dirs[A]))
    bank.load(B, *load_adapter_dir(dirs[B]))
    with bank.mixture([[(A, 0.5), (B, 0.5)]]):
        with pytest.raises(SlotsExhausted, match="all 2 adapter slots are pinned"):
            bank.load(C, *load_adapter_dir(dirs[C]))
        assert bank.loaded() == [A, B] and bank.evictions == 0
    bank.load(C, *load_adapter_dir(dirs[C]))  # pins released: A (least recent) goes
    assert bank.loaded() == [B, C] and bank.evictions == 1


def test_a_batch_needing_more_slots_than_exist_fails_cleanly(tiny64, dirs):
    bank = two_slot_bank(tiny64)
    loader = lambda ref: load_adapter_dir(dirs[ref])  # noqa: E731
    with pytest.raises(SlotsExhausted), bank.mixture([[(A, 1.0)], [(B, 1.0)], [(C, 1.0)]], loader):
        pass
    assert all(layer._mix is None for layer in bank.layers.values())
    with bank.mixture([[(C, 1.0)]], loader):  # pins were released
        pass


def test_evicting_an_in_flight_adapter_zeroes_it_now_and_frees_it_after(tiny64, dirs, ids):
    bank = two_slot_bank(tiny64)
    bank.load(A, *load_adapter_dir(dirs[A]))
    slot = bank.slot_of(A)
    with torch.no_grad(), bank.mixture([[(A, 1.0)]]):
        before = hidden(bank.model, ids[:1])
        assert bank.evict(A) and slot_is_zero(bank, slot)
        admitted = hidden(bank.model, ids[:1])  # admitted before the eviction: it finishes
        torch.testing.assert_close(admitted, before, **EXACT)
    bank.load(B, *load_adapter_dir(dirs[B]))
    bank.load(C, *load_adapter_dir(dirs[C]))
    assert bank.evictions == 0  # A's slot came back free


def test_mixture_is_cleared_on_exception_and_not_nested(tiny64, dirs):
    bank = loaded_bank(tiny64, dirs)
    with pytest.raises(KeyError), bank.mixture([M3]):
        assert all(layer._mix is not None for layer in bank.layers.values())
        with pytest.raises(RuntimeError, match="already active"), bank.mixture([M1]):
            pass
        raise KeyError("boom")
    assert all(layer._mix is None for layer in bank.layers.values())
    assert not bank._pins


def test_from_settings_uses_the_cache_budget(tiny64):
    serve = ServeSettings(adapter_cache_bytes=10**6)
    bank = AdapterBank.from_settings(copy.deepcopy(tiny64.model), LoraSettings(rank=8), serve)
    assert bank.capacity == 10**6 // bank.slot_bytes and bank.r_max == 8


# --------------------------------------------------------------------------- bad input


def _corrupt(dirs, ref, edit):
    state, config = load_adapter_dir(dirs[ref])
    edit(state, config)
    return state, config


KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda s, c: s.__setitem__(KEY_A, torch.ones(4, 65)),
            f"adapter a v1: {KEY_A} has shape \\(4, 65\\), expected \\(4, 64\\)",
        ),
        (
            lambda s, c: s.__setitem__(KEY_A.replace("layers.0", "layers.5"), s[KEY_A]),
            "adapter a v1: unknown target key .*layers.5.self_attn.q_proj",
        ),
        (lambda s, c: s[KEY_A].__setitem__((0, 0), math.nan), f"adapter a v1: {KEY_A} holds NaN"),
        (lambda s, c: s.pop(KEY_A), "adapter a v1: .*q_proj has lora_B only"),
        (lambda s, c: c.__setitem__("use_dora", True), "adapter a v1: .*use_dora=True"),
        (lambda s, c: s.__setitem__("lm_head.weight", s[KEY_A]), "unexpected key lm_head.weight"),
    ],
)
def test_bad_adapters_are_refused_before_taking_a_slot(tiny64, dirs, edit, match):
    bank = make_bank(tiny64)
    with pytest.raises(InvalidAdapter, match=match):
        bank.load(A, *_corrupt(dirs, A, edit))
    assert bank.loaded() == [] and slot_is_zero(bank, 0)
    assert issubclass(InvalidAdapter, ValueError)


def test_rank_above_r_max_is_refused(tiny64, dirs):
    bank = make_bank(tiny64, r_max=4)
    with pytest.raises(InvalidAdapter, match="adapter b v1: .*rank 8, above the bank's r_max=4"):
        bank.load(B, *load_adapter_dir(dirs[B]))


@pytest.mark.parametrize("weight", [-0.1, math.nan, math.inf])
def test_bad_mixture_weights_are_refused(tiny64, dirs, weight):
    bank = loaded_bank(tiny64, dirs)
    with pytest.raises(InvalidMixture, match="weights must be finite and >= 0"):
        bank.mixture([[(A, 1.0)], [(B, weight)]]).__enter__()
    assert not bank._pins


def test_overflowing_weight_is_refused(tiny64, dirs):
    bank = AdapterBank(copy.deepcopy(tiny64.model).float(), ALL, R_MAX, BIG)  # float32 serving
    for ref, path in dirs.items():
        bank.load(ref, *load_adapter_dir(path))
    with pytest.raises(InvalidMixture, match="mixture row 1: weight 1e\\+39 .* overflow"):
        bank.mixture([[(A, 1.0)], [(B, 1e39)]]).__enter__()
    assert not bank._pins


def test_batch_size_must_match_the_mixture(tiny64, dirs, ids):
    bank = loaded_bank(tiny64, dirs)
    with bank.mixture([M1, M2]), pytest.raises(RuntimeError, match="set for 2 rows"):
        hidden(bank.model, ids)


def test_only_safetensors_are_loaded(tmp_path, dirs):
    (tmp_path / "adapter_config.json").write_bytes((dirs[A] / "adapter_config.json").read_bytes())
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(InvalidAdapter, match="adapter_model.bin, a pickle file, which is never"):
        load_adapter_dir(tmp_path)


def test_a_pinned_row_composes_until_unpinned_and_no_prepared_copy_outlives_an_eviction(
    tiny64, dirs, ids
):
    bank = loaded_bank(tiny64, dirs)
    bank.use([])
    base = hidden(bank.model, ids[:1])
    row = bank.pin([(A, 1.0)])
    bank.use([row])
    composed = hidden(bank.model, ids[:1])
    assert differs(composed, base)
    bank.use([{}])  # another row set, then the same one again: prepared, not recomputed
    bank.use([row])
    torch.testing.assert_close(hidden(bank.model, ids[:1]), composed, **EXACT)
    bank.evict(A)  # revoked while a row still pins it: its slot is zeroed, not reused
    bank.use([row])
    torch.testing.assert_close(hidden(bank.model, ids[:1]), base, **EXACT)
    (slot,) = row
    assert bank._pins == {slot: 1} and slot not in bank._free
    bank.unpin(row)
    assert not bank._pins and slot in bank._free  # free once no row uses it
