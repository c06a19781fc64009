"""The mixture layer: exact, unmerged, per-row mixtures of LoRA adapters on one frozen
``nn.Linear``, and putting those layers into a model. No Ray here.

For every LoRA target layer and every row b of a batch::

    y[b] = W x[b] + Σ_i w[b,i] · s_i · B_i (A_i x[b])        x:(B,T,d_in)

so one batch can hold requests with different mixtures and ``W`` is never modified.
peft cannot do this: ``add_weighted_adapter`` combines A and B separately (linear/ties/dare are
not this sum), and its mixed-batch ``adapter_names`` allows one adapter per row.

:class:`LoraMixtureLinear` wraps a target ``nn.Linear`` (the same module object, so ``W`` is
literally the same tensor) and owns a bank of slots: ``lora_A (S, r_max, d_in)``,
``lora_B (S, d_out, r_max)``, ``scale (S,)``. Smaller ranks are zero-padded (exact). Which
adapter sits in which slot is the bank's business (``bank.AdapterBank``).

A mixture is resolved once per batch (a :class:`MixturePlan`). Each layer gathers the batch's
U distinct slots into ``A_u (U·r, d_in)`` and ``B_u (d_out, U·r)`` (scale folded in; weights
too when every row has the same mixture). Two ways to apply it, chosen per forward by a cost
model:

- flat: ``u = x A_uᵀ`` over all tokens, times each row's per-lane weights, then ``y += u B_uᵀ``.
  Reads each distinct adapter once: best for decode steps, which are memory-bound.
- gathered: per row, ``A_cat (K·r, d_in)``, ``B_cat`` of its own K adapters, then two bmm.
  K instead of U adapters per token: best for prefill of distinct mixtures (compute-bound).

A batch with no adapter in any row skips both: output and cost are exactly the base model's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# How many multiply-adds per token one weight read from memory is worth. Decode steps are
# memory-bound (CPU and GPU alike), so reading B·K gathered copies costs far more than
# multiplying a few extra lanes; prefill has many tokens per read, so FLOPs dominate there.
_READ_COST = 32


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

    def set_mixture(self, plan: MixturePlan | _LayerMixture) -> None:
        """Apply a batch's mixture: a plan (its ``A_u``, ``B_u`` computed now) or what
        :meth:`prepare` computed for one earlier."""
        self._mix = plan if isinstance(plan, _LayerMixture) else self.prepare(plan)

    def prepare(self, plan: MixturePlan) -> _LayerMixture:
        """This batch's ``A_u`` and ``B_u`` (once per batch, not per step)."""
        r, dtype = plan.rank, self.lora_B.dtype
        a = self.lora_A[plan.slots, :r].reshape(-1, self.in_features)  # A_u (U·r, d_in)
        factor = self.scale[plan.slots]  # s_u (U,), >= fp32 so bf16 folding rounds once
        if plan.uniform:
            factor = factor * plan.weights[0]  # w_u · s_u
        b = self.lora_B[plan.slots, :, :r].to(factor.dtype) * factor[:, None, None]  # (U,d_out,r)
        b = b.to(dtype).permute(1, 0, 2).reshape(self.out_features, -1)  # B_u (d_out, U·r)
        rows = None if plan.uniform else plan.weights.shape[0]
        return _LayerMixture(a.t(), b.t(), plan, rows)

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
