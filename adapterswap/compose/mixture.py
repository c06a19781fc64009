"""Exact, unmerged, per-row mixtures of LoRA adapters on one frozen base model. No Ray here.

For every LoRA target layer and every row b of a batch::

    y[b] = W x[b] + Σ_i w[b,i] · s_i · B_i (A_i x[b])        x:(B,T,d_in)

so one batch can hold requests with different mixtures and ``W`` is never modified.
peft cannot do this: ``add_weighted_adapter`` combines A and B separately (linear/ties/dare are
not this sum), and its mixed-batch ``adapter_names`` allows one adapter per row.

- :class:`LoraMixtureLinear` wraps a target ``nn.Linear`` (the same module object, so ``W`` is
  literally the same tensor) and owns a bank of slots: ``lora_A (S, r_max, d_in)``,
  ``lora_B (S, d_out, r_max)``, ``scale (S,)``. Smaller ranks are zero-padded (exact).
- :class:`AdapterBank` injects those layers and manages the slots: PEFT state dicts in, an
  LRU bounded by ``serve.adapter_cache_bytes``, pinning of the in-flight batch, eviction that
  zeroes memory (revocation), and ``with bank.mixture(rows):`` around a forward or generate.
  Its lock is never held during I/O: adapter files load outside it and install under it, so
  a slow load never delays an eviction, and an adapter evicted while it loads is never
  installed.

A mixture is resolved once per batch. Each layer gathers the batch's U distinct slots into
``A_u (U·r, d_in)`` and ``B_u (d_out, U·r)`` (scale folded in; weights too when every row has
the same mixture). Two ways to apply it, chosen per forward by a cost model:

- flat: ``u = x A_uᵀ`` over all tokens, times each row's per-lane weights, then ``y += u B_uᵀ``.
  Reads each distinct adapter once: best for decode steps, which are memory-bound.
- gathered: per row, ``A_cat (K·r, d_in)``, ``B_cat`` of its own K adapters, then two bmm.
  K instead of U adapters per token: best for prefill of distinct mixtures (compute-bound).

A batch with no adapter in any row skips both: output and cost are exactly the base model's.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn

from adapterswap.config import LoraSettings, ServeSettings
from adapterswap.errors import AdapterSwapError, StaleMixture
from adapterswap.storage.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapterswap.store.registry import AdapterRef

AdapterLoader = Callable[[AdapterRef], tuple[dict[str, torch.Tensor], dict[str, Any]]]
MixtureRows = Sequence[Sequence[tuple[AdapterRef, float]]]

# peft writes `base_model.model.<module>.lora_A.weight`; older or multi-adapter saves add the
# adapter name before `.weight`. Anything else (embeddings, DoRA magnitudes, biases) is refused.
_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
# Config switches that change the maths away from `W x + s B A x`: composing them would be wrong.
_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "target_parameters")
_UNSUPPORTED += ("trainable_token_indices", "layer_replication", "alora_invocation_tokens")
# How many multiply-adds per token one weight read from memory is worth. Decode steps are
# memory-bound (CPU and GPU alike), so reading B·K gathered copies costs far more than
# multiplying a few extra lanes; prefill has many tokens per read, so FLOPs dominate there.
_READ_COST = 32


class InvalidAdapter(AdapterSwapError, ValueError):
    """An adapter's files or tensors cannot be composed (bad shape, rank, key, NaN, format)."""


class InvalidMixture(AdapterSwapError, ValueError):
    """A mixture's weights are not finite and non-negative, or its rows are malformed."""


class AdapterNotLoaded(AdapterSwapError, LookupError):
    """A mixture names an adapter that is not in the bank and no loader was given."""


class SlotsExhausted(AdapterSwapError, RuntimeError):
    """Every slot is pinned by the in-flight batch, so nothing can be evicted to load another."""


# --------------------------------------------------------------------------- the layer


@dataclass(frozen=True)
class MixturePlan:
    """A batch's mixture resolved to slots once, shared by every layer."""

    slots: torch.Tensor  # (U,) long: the distinct slots the batch uses
    rank: int  # r: the largest rank among them; lanes beyond a slot's rank are zero
    weights: torch.Tensor  # (B, U) w[b,u] in the scale's dtype; (1, U) when every row is the same
    uniform: bool  # every row has the same mixture: weights are folded into B_u
    lane_weights: torch.Tensor | None  # (B, 1, U·r) w[b,u] per lane, layer dtype; None if uniform
    index: torch.Tensor | None  # (B, K) long into `slots`: row b's K adapters (padding: w=0)
    index_weights: torch.Tensor | None  # (B, K) w[b,k] in layer dtype


@dataclass(frozen=True)
class _LayerMixture:
    a_t: torch.Tensor  # A_uᵀ (d_in, U·r), a view of the contiguous A_u (U·r, d_in)
    b_t: torch.Tensor  # B_uᵀ (U·r, d_out), rows scaled by s (and by w when uniform)
    plan: MixturePlan
    rows: int | None  # batch rows the per-row weights were set for; None when uniform


class LoraMixtureLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a bank of LoRA slots, applied per row as a weighted mixture.

    ``y[b] = W x[b] + Σ_i w[b,i] · s_i · B_i (A_i x[b])``  x:(B,T,d_in). Without an active
    mixture the forward is exactly ``base(x)``.
    """

    def __init__(self, base: nn.Linear, slots: int, r_max: int) -> None:
        super().__init__()
        self.base = base  # the original module: W is the very same tensor, never copied
        self.in_features, self.out_features, self.r_max = base.in_features, base.out_features, r_max
        device, dtype = base.weight.device, base.weight.dtype
        # Buffers, not parameters (nothing here trains), and not persistent: a model's state
        # dict never carries adapter weights, which live in the store as safetensors.
        # Scales (and mixture weights) are fp32, or fp64 in an fp64 model, so fp64 stays exact.
        for name, shape, kind in (
            ("lora_A", (slots, r_max, self.in_features), dtype),
            ("lora_B", (slots, self.out_features, r_max), dtype),
            ("scale", (slots,), torch.promote_types(dtype, torch.float32)),
        ):
            self.register_buffer(name, torch.zeros(shape, device=device, dtype=kind), False)
        self._mix: _LayerMixture | None = None

    def write_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Put one adapter's ``A (r, d_in)``, ``B (d_out, r)`` and scale into ``slot``."""
        r = a.shape[0]
        self.clear_slot(slot)
        self.lora_A[slot, :r].copy_(a)
        self.lora_B[slot, :, :r].copy_(b)
        self.scale[slot] = scale

    def clear_slot(self, slot: int) -> None:
        """Zero a slot, so nothing of the adapter that was there stays in memory."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scale[slot] = 0.0

    def set_mixture(self, plan: MixturePlan) -> None:
        """Precompute this batch's ``A_u`` and ``B_u`` (once per batch, not per step)."""
        r, dtype = plan.rank, self.lora_B.dtype
        a = self.lora_A[plan.slots, :r].reshape(-1, self.in_features)  # A_u (U·r, d_in)
        factor = self.scale[plan.slots]  # s_u (U,), >= fp32 so bf16 folding rounds once
        if plan.uniform:
            factor = factor * plan.weights[0]  # w_u · s_u
        b = self.lora_B[plan.slots, :, :r].to(factor.dtype) * factor[:, None, None]  # (U,d_out,r)
        b = b.to(dtype).permute(1, 0, 2).reshape(self.out_features, -1)  # B_u (d_out, U·r)
        rows = None if plan.uniform else plan.weights.shape[0]
        self._mix = _LayerMixture(a.t(), b.t(), plan, rows)

    def clear_mixture(self) -> None:
        self._mix = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The hot path of every decode step: keep it to the two matmuls and few lookups.
        y = self.base(x)
        mix = self._mix
        if mix is None:
            return y  # base-only batch: exactly the base layer's output and cost
        if mix.rows is not None:
            return self._add_rows(x, y, mix)
        u = x.reshape(-1, self.in_features) @ mix.a_t  # u = x A_uᵀ  (B·T, U·r)
        y.view(-1, self.out_features).addmm_(u, mix.b_t)  # y += u B_uᵀ  (B·T, d_out)
        return y

    def _add_rows(self, x: torch.Tensor, y: torch.Tensor, mix: _LayerMixture) -> torch.Tensor:
        """Rows with different mixtures: flat with per-row lane weights, or gathered bmm."""
        rows, plan = x.shape[0], mix.plan
        if rows != mix.rows:
            raise RuntimeError(
                f"the mixture was set for {mix.rows} rows but the batch has {rows}; set one "
                "mixture row per batch row (beam search and num_return_sequences>1 expand it)"
            )
        tokens = x.numel() // (rows * self.in_features)
        if _prefer_gather(rows, tokens, plan.slots.numel(), plan.index.shape[1]):
            return self._add_gathered(x, y, mix)
        lanes = mix.a_t.shape[1]
        u = x.reshape(-1, self.in_features) @ mix.a_t  # u = x A_uᵀ  (B·T, U·r)
        u.view(rows, -1, lanes).mul_(plan.lane_weights)  # u[b] *= w[b] per lane  (B,T,U·r)
        y.view(-1, self.out_features).addmm_(u, mix.b_t)  # y += u B_uᵀ  (B·T, d_out)
        return y

    def _add_gathered(self, x: torch.Tensor, y: torch.Tensor, mix: _LayerMixture) -> torch.Tensor:
        """``y[b] += (x[b] A_cat[b]ᵀ) B_cat[b]ᵀ`` over each row's own K adapters (two bmm)."""
        plan, rows, r = mix.plan, x.shape[0], mix.plan.rank
        index, k = plan.index, plan.index.shape[1]
        u_count = plan.slots.numel()
        a_cat = mix.a_t.t().view(u_count, r, -1)[index].reshape(rows, k * r, -1)  # (B,K·r,d_in)
        b_cat = mix.b_t.view(u_count, r, -1)[index] * plan.index_weights[:, :, None, None]
        b_cat = b_cat.reshape(rows, k * r, -1)  # B_catᵀ (B, K·r, d_out)
        u = torch.bmm(x.reshape(rows, -1, self.in_features), a_cat.transpose(1, 2))  # (B,T,K·r)
        y.view(rows, -1, self.out_features).baddbmm_(u, b_cat)  # y += u B_catᵀ  (B,T,d_out)
        return y


def _prefer_gather(rows: int, tokens: int, unique: int, k: int) -> bool:
    """Gathered bmm when its cost (K lanes per token, B·K copies) beats flat (U lanes, U reads)."""
    flat = rows * tokens * unique + _READ_COST * unique
    gathered = rows * tokens * k + _READ_COST * 3 * rows * k  # gather reads + writes + bmm reads
    return gathered < flat


# --------------------------------------------------------------------------- injection


def find_target_linears(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules named by ``targets``, matched as peft does (name suffix)."""
    targets = list(targets)
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(name == t or name.endswith(f".{t}") for t in targets)
    }
    if not found:
        raise ValueError(
            f"lora.target_modules: no nn.Linear in the model matches {targets}; "
            "use module names such as q_proj, v_proj"
        )
    return found


def inject_mixture_layers(
    model: nn.Module, targets: Iterable[str], slots: int, r_max: int
) -> dict[str, LoraMixtureLinear]:
    """Replace each target ``nn.Linear`` in place by a :class:`LoraMixtureLinear` around it."""
    if any(isinstance(m, LoraMixtureLinear) for m in model.modules()):
        raise ValueError("mixture layers are already injected into this model; inject once")
    layers = {}
    for name, linear in find_target_linears(model, targets).items():
        parent_name, _, child = name.rpartition(".")
        layer = LoraMixtureLinear(linear, slots, r_max)
        setattr(model.get_submodule(parent_name), child, layer)
        layers[name] = layer
    return layers


# --------------------------------------------------------------------------- adapter files


def load_adapter_dir(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a PEFT adapter directory: safetensors weights only, never a pickle."""
    path = Path(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if (path / n).exists()]
        found = f"; it has {pickled[0]}, a pickle file, which is never loaded" if pickled else ""
        raise InvalidAdapter(
            f"{path}: no {ADAPTER_WEIGHTS}{found}. Save the adapter with "
            "save_pretrained(..., safe_serialization=True)"
        )
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise InvalidAdapter(f"{path}: no {ADAPTER_CONFIG}; it is not a PEFT adapter directory")
    return load_file(weights), json.loads(config_path.read_text())


def _name(ref: AdapterRef) -> str:
    return f"adapter {ref.id} v{ref.version}"


def _check_config(ref: AdapterRef, config: dict[str, Any]) -> None:
    """Refuse configs whose maths is not ``W x + s B A x``."""
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidAdapter(f"{_name(ref)}: peft_type={config['peft_type']!r}; expected 'LORA'")
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(f"{_name(ref)}: bias={config['bias']!r}; retrain with bias='none'")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise InvalidAdapter(
                f"{_name(ref)}: adapter_config sets {key}={config[key]!r}, which cannot be "
                "composed; retrain it as a plain LoRA"
            )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise InvalidAdapter(f"{_name(ref)}: adapter_config {key}={value!r}; expected > 0")


def _module_scale(config: dict[str, Any], module: str) -> tuple[int, float]:
    """(rank, s) of one module, as peft computes them (rank_pattern, alpha_pattern, rsLoRA)."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(ranks.keys(), module), config["r"])
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), config["lora_alpha"])
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _pair_tensors(
    ref: AdapterRef, state_dict: dict[str, torch.Tensor], layers: dict[str, LoraMixtureLinear]
) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """Group PEFT keys by target module: ``{module: {"A": (key, A), "B": (key, B)}}``."""
    if not state_dict:
        raise InvalidAdapter(f"{_name(ref)}: the state dict is empty")
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise InvalidAdapter(f"{_name(ref)}: unexpected key {key}; expected PEFT LoRA keys")
        module = match["module"]
        if module not in layers:
            raise InvalidAdapter(
                f"{_name(ref)}: unknown target key {key}: the base model has no LoRA target "
                f"layer {module} (targets like {next(iter(layers))})"
            )
        pairs.setdefault(module, {})[match["ab"]] = (key, tensor)
    for module, pair in pairs.items():
        if len(pair) != 2:
            raise InvalidAdapter(f"{_name(ref)}: {module} has lora_{next(iter(pair))} only")
    return pairs


def parse_adapter(
    ref: AdapterRef,
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    layers: dict[str, LoraMixtureLinear],
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Validate a PEFT LoRA against ``layers``: ``{module: (A (r,d_in), B (d_out,r), s)}``."""
    _check_config(ref, config)
    parsed = {}
    for module, pair in _pair_tensors(ref, state_dict, layers).items():
        layer = layers[module]
        (key_a, a), (key_b, b) = pair["A"], pair["B"]
        r, scale = _module_scale(config, module)
        if a.shape[0] > layer.r_max:
            raise InvalidAdapter(
                f"{_name(ref)}: {key_a} has rank {a.shape[0]}, above the bank's r_max="
                f"{layer.r_max}; build the bank with a larger r_max"
            )
        for key, tensor, want in (
            (key_a, a, (r, layer.in_features)),
            (key_b, b, (layer.out_features, r)),
        ):
            if tuple(tensor.shape) != want:
                raise InvalidAdapter(
                    f"{_name(ref)}: {key} has shape {tuple(tensor.shape)}, expected {want}"
                )
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise InvalidAdapter(f"{_name(ref)}: {key} holds NaN, inf or non-float values")
        parsed[module] = (a, b, scale)
    return parsed


# --------------------------------------------------------------------------- the bank


def _clean_row(index: int, row: Sequence[tuple[AdapterRef, float]]) -> dict[AdapterRef, float]:
    """One row's {ref: weight}: weights finite and >= 0, duplicates summed, zeros dropped."""
    merged: dict[AdapterRef, float] = {}
    for ref, weight in row:
        if not isinstance(ref, AdapterRef):
            raise InvalidMixture(f"mixture row {index}: {ref!r} is not an AdapterRef")
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise InvalidMixture(
                f"mixture row {index}: weight {weight} for {_name(ref)}; weights must be "
                "finite and >= 0"
            )
        merged[ref] = merged.get(ref, 0.0) + weight
    return {ref: w for ref, w in merged.items() if w > 0}


@dataclass
class _Loading:
    """An adapter being read by one thread, outside the bank's lock; others wait on ``done``."""

    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # evicted (revoked) while it loaded: it must not be installed
    error: BaseException | None = None


class AdapterBank:
    """LoRA slots injected into one base model: an LRU of loaded adapters, and batch mixtures.

    Capacity is ``cache_bytes // slot_bytes`` slots (at least one). A mixture's precomputed
    ``A_u``, ``B_u`` are transient and not counted. Thread-safe for a serving loop plus a
    revocation handler; one mixture is active at a time, since the layers hold it. The lock
    guards slots and indexes only: loaders (file or network reads) run outside it.
    """

    def __init__(
        self, model: nn.Module, target_modules: Iterable[str], r_max: int, cache_bytes: int
    ) -> None:
        targets = find_target_linears(model, target_modules)
        size = next(iter(targets.values())).weight.element_size()
        self.slot_bytes = sum(r_max * (m.in_features + m.out_features) for m in targets.values())
        self.slot_bytes *= size
        self.capacity = max(1, cache_bytes // self.slot_bytes)
        self.cache_bytes = cache_bytes
        self.layers = inject_mixture_layers(model, target_modules, self.capacity, r_max)
        self.model = model  # run it (forward, generate) inside `with bank.mixture(...)`
        self.r_max = r_max
        self.hits = self.misses = self.evictions = 0
        self._index: OrderedDict[AdapterRef, int] = OrderedDict()  # LRU first
        self._ranks: dict[int, int] = {}  # slot -> largest rank over its layers
        self._bounds: dict[int, float] = {}  # slot -> max |s · B| over its layers
        self._free = list(range(self.capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self._pinned: set[int] = set()
        self._loading: dict[AdapterRef, _Loading] = {}  # loads in progress, outside the lock
        self._active = False
        self._mixture_rows: list[dict[int, float]] = []  # the active mixture's rows, as slots
        self._mixture_ranks: dict[int, int] = {}  # their ranks when it was set
        self._lock = threading.RLock()

    @classmethod
    def from_settings(
        cls, model: nn.Module, lora: LoraSettings, serve: ServeSettings, r_max: int | None = None
    ) -> AdapterBank:
        """A bank for ``lora.target_modules``, ranks up to ``r_max`` (default ``lora.rank``)."""
        return cls(model, lora.target_modules, r_max or lora.rank, serve.adapter_cache_bytes)

    def __contains__(self, ref: AdapterRef) -> bool:
        return ref in self._index

    def loaded(self) -> list[AdapterRef]:
        """Loaded adapters, least recently used first."""
        with self._lock:
            return list(self._index)

    def slot_of(self, ref: AdapterRef) -> int:
        return self._index[ref]

    def load(self, ref: AdapterRef, state_dict: dict[str, torch.Tensor], config: dict) -> int:
        """Validate and load an adapter (replacing it if loaded); returns its slot.

        Raises ``InvalidAdapter`` (a ``ValueError``) before touching any slot, and
        ``SlotsExhausted`` when every slot is pinned by the in-flight batch.
        """
        parsed = parse_adapter(ref, state_dict, config, self.layers)
        with self._lock:
            return self._install(ref, parsed)

    def _install(
        self, ref: AdapterRef, parsed: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    ) -> int:
        """Write parsed tensors into a slot (the caller holds the lock; no I/O here)."""
        slot = self._index.pop(ref, None)
        if slot is None:
            slot = self._take_slot()
        else:
            self._clear(slot)
        for module, (a, b, scale) in parsed.items():
            self.layers[module].write_slot(slot, a, b, scale)
        self._ranks[slot] = max(a.shape[0] for a, _, _ in parsed.values())
        self._bounds[slot] = max(s * float(b.abs().max()) for _, b, s in parsed.values())
        self._index[ref] = slot
        return slot

    def get_or_load(self, ref: AdapterRef, loader: AdapterLoader) -> int:
        """The adapter's slot, calling ``loader(ref) -> (state_dict, config)`` on a miss.

        The loader runs outside the lock; concurrent misses on one ref read it once. An
        eviction of ``ref`` while it loads wins: the load raises ``StaleMixture`` and
        installs nothing.
        """
        return self._acquire(ref, loader, pin=False)

    def _acquire(self, ref: AdapterRef, loader: AdapterLoader, *, pin: bool) -> int:
        """``get_or_load``, pinning the slot in the same critical section when asked."""
        while True:
            with self._lock:
                slot = self._index.get(ref)
                if slot is not None:
                    self.hits += 1
                    self._index.move_to_end(ref)
                    if pin:
                        self._pinned.add(slot)
                    return slot
                pending = self._loading.get(ref)
                owner = pending is None
                if owner:
                    pending = self._loading[ref] = _Loading()
                    self.misses += 1
            if owner:
                return self._load_outside_lock(ref, loader, pending, pin=pin)
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            # Loaded by the other thread: take it from the index (or load again if it was
            # already evicted to make room, which the next pass sees).

    def _load_outside_lock(
        self, ref: AdapterRef, loader: AdapterLoader, pending: _Loading, *, pin: bool
    ) -> int:
        """Read and validate ``ref`` with no lock held, then install it unless it was evicted."""
        try:
            try:
                parsed = parse_adapter(ref, *loader(ref), self.layers)  # I/O: no lock held
            except BaseException:
                with self._lock:
                    self._loading.pop(ref, None)
                raise
            with self._lock:  # one critical section: an eviction lands before or after it
                self._loading.pop(ref, None)
                if pending.cancelled:
                    raise StaleMixture(
                        f"adapter {ref.id!r} version {ref.version} was revoked while it loaded"
                    )
                slot = self._install(ref, parsed)
                if pin:
                    self._pinned.add(slot)
                return slot
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            pending.done.set()

    def evict(self, ref: AdapterRef) -> bool:
        """Drop an adapter now and zero its slot; False if it was not loaded.

        Works even while the in-flight batch uses it: that batch (admitted before) finishes
        with its own precomputed copy, released when its mixture exits; no later one sees it.
        A load of ``ref`` in progress is cancelled: it installs nothing.
        """
        with self._lock:
            pending = self._loading.get(ref)
            if pending is not None:
                pending.cancelled = True
            slot = self._index.pop(ref, None)
            if slot is None:
                return False
            self._clear(slot)
            if slot not in self._pinned:
                self._free.append(slot)
            return True

    def evict_all_except(self, keep: Iterable[AdapterRef]) -> list[AdapterRef]:
        """Drop every loaded adapter not in ``keep`` (e.g. the store's servable versions)."""
        keep = set(keep)
        with self._lock:
            for ref, pending in self._loading.items():
                if ref not in keep:
                    pending.cancelled = True
            dropped = [ref for ref in self._index if ref not in keep]
            for ref in dropped:
                self.evict(ref)
            return dropped

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self._ranks.pop(slot, None)
        self._bounds.pop(slot, None)

    def _take_slot(self) -> int:
        """A free slot, evicting the least recently used unpinned adapter if none is free."""
        if self._free:
            return self._free.pop()
        for ref, slot in self._index.items():
            if slot not in self._pinned:
                del self._index[ref]
                self._clear(slot)
                self.evictions += 1
                return slot
        raise SlotsExhausted(
            f"all {self.capacity} adapter slots are pinned by the in-flight batch; raise "
            f"serve.adapter_cache_bytes (now {self.cache_bytes}; {self.slot_bytes} bytes per "
            "slot) or lower serve.max_batch_size or router.top_k"
        )

    @contextmanager
    def mixture(self, rows: MixtureRows, loader: AdapterLoader | None = None) -> Iterator[None]:
        """Compose ``rows[b] = [(ref, weight), ...]`` for batch row b inside the block.

        Every ref must be loaded, or ``loader`` is called for the missing ones. The batch's
        slots stay pinned and each layer's precomputed mixture stays set until the block
        exits, even on an exception. An empty row is the base model for that row.
        """
        cleaned = [_clean_row(i, row) for i, row in enumerate(rows)]
        with self._lock:
            if self._active:
                raise RuntimeError("a mixture is already active on this bank; exit it first")
            self._active = True
        try:
            slot_rows = [
                {self._resolve(ref, loader): w for ref, w in row.items()} for row in cleaned
            ]
            with self._lock:  # an eviction after this point zeroes a slot; it cannot move it
                self._check_finite(slot_rows)
                self._mixture_ranks = {s: self._ranks.get(s, 1) for row in slot_rows for s in row}
            self._mixture_rows = slot_rows
            self._set_layers(self._layout(slot_rows))
            yield
        finally:
            for layer in self.layers.values():
                layer.clear_mixture()
            with self._lock:
                self._free.extend(s for s in self._pinned if s not in self._index.values())
                self._pinned.clear()
                self._mixture_rows, self._mixture_ranks = [], {}
                self._active = False

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Narrow the active mixture to ``rows`` (indices into its rows, in the new order).

        The decode loop drops finished or stopped rows from its batch (``generate_batch``'s
        ``on_rows_kept``): the layers then hold only the kept rows' adapters, so a row stopped
        because its adapter was revoked leaves no copy of it in use. Slots stay pinned until
        the mixture exits.
        """
        if not self._active:
            raise RuntimeError("keep_rows: no mixture is active on this bank")
        self._set_layers(self._layout([self._mixture_rows[i] for i in rows]))

    def _set_layers(self, plan: MixturePlan | None) -> None:
        for layer in self.layers.values():
            if plan is None:
                layer.clear_mixture()
            else:
                layer.set_mixture(plan)

    def check_row(
        self, row: Sequence[tuple[AdapterRef, float]], loader: AdapterLoader | None = None
    ) -> None:
        """Everything ``mixture([row])`` would refuse, for one row alone, before it joins a
        batch: weights, loading each adapter (``loader`` for missing ones), and overflow.

        Pins nothing. Raises ``InvalidMixture``, ``SlotsExhausted``, ``StaleMixture`` (evicted
        while it loaded), ``AdapterNotLoaded``, or whatever the loader or parsing raised.
        """
        cleaned = _clean_row(0, row)
        slots = {}
        for ref, w in cleaned.items():
            if loader is not None:
                slots[self.get_or_load(ref, loader)] = w
            else:
                with self._lock:
                    if ref not in self._index:
                        raise AdapterNotLoaded(
                            f"{_name(ref)} is not loaded; load it or pass a loader"
                        )
                    slots[self._index[ref]] = w
        with self._lock:
            self._check_finite([slots])

    def _resolve(self, ref: AdapterRef, loader: AdapterLoader | None) -> int:
        """The slot of ``ref``, pinned, so loading the batch's next adapter cannot evict it."""
        if loader is not None:
            return self._acquire(ref, loader, pin=True)  # loads outside the lock
        with self._lock:
            if ref not in self._index:
                raise AdapterNotLoaded(f"{_name(ref)} is not loaded; load it or pass a loader")
            self._index.move_to_end(ref)
            slot = self._index[ref]
            self._pinned.add(slot)
            return slot

    def _layout(self, slot_rows: list[dict[int, float]]) -> MixturePlan | None:
        """Lay a batch of resolved, pinned rows out for the layers; None for a base-only batch."""
        if not any(slot_rows):
            return None
        unique = sorted({s for row in slot_rows for s in row})
        column = {s: j for j, s in enumerate(unique)}
        scale_dtype = next(iter(self.layers.values())).scale.dtype  # w like s: fp32 or fp64
        weights = torch.zeros(len(slot_rows), len(unique), dtype=scale_dtype)
        for b, row in enumerate(slot_rows):
            for slot, w in row.items():
                weights[b, column[slot]] = w
        layer = next(iter(self.layers.values()))
        device, dtype = layer.lora_A.device, layer.lora_A.dtype
        rank = max(self._mixture_ranks[s] for s in unique)
        slots = torch.tensor(unique, device=device)
        if all(row == slot_rows[0] for row in slot_rows):
            return MixturePlan(slots, rank, weights[:1].to(device), True, None, None, None)
        k = max(len(row) for row in slot_rows)
        index = torch.zeros(len(slot_rows), k, dtype=torch.long)
        index_weights = torch.zeros(len(slot_rows), k, dtype=weights.dtype)
        for b, row in enumerate(slot_rows):
            for j, (slot, w) in enumerate(row.items()):
                index[b, j], index_weights[b, j] = column[slot], w
        lanes = weights.repeat_interleave(rank, dim=1)[:, None, :]  # (B, 1, U·r)
        lanes, index_weights = lanes.to(device, dtype), index_weights.to(device, dtype)
        return MixturePlan(
            slots, rank, weights.to(device), False, lanes, index.to(device), index_weights
        )

    def _check_finite(self, slot_rows: list[dict[int, float]]) -> None:
        """Refuse deltas that would overflow the dtype, as peft's safe_merge does, but from
        bounds kept at load time: no tensor op, so no cost per layer per batch."""
        dtype = next(iter(self.layers.values())).lora_B.dtype
        for b, row in enumerate(slot_rows):
            for slot, w in row.items():
                # an evicted (zeroed) slot has no bound left: it adds nothing
                if not w * self._bounds.get(slot, 0.0) < torch.finfo(dtype).max:
                    raise InvalidMixture(
                        f"mixture row {b}: weight {w} makes the composed LoRA delta overflow "
                        f"{dtype}; lower the weight"
                    )
