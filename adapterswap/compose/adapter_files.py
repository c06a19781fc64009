"""Reading and checking PEFT LoRA adapters: the files of an adapter directory (safetensors
only, never a pickle), and the checks that its config and tensors compose exactly as
``W x + s B A x`` into a model's mixture layers. No Ray here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

from adapterswap.compose.layer import LoraMixtureLinear
from adapterswap.errors import InvalidAdapter
from adapterswap.storage.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapterswap.types import AdapterRef

# peft writes `base_model.model.<module>.lora_A.weight`; older or multi-adapter saves add the
# adapter name before `.weight`. Anything else (embeddings, DoRA magnitudes, biases) is refused.
_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
# Config switches that change the maths away from `W x + s B A x`: composing them would be wrong.
_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "target_parameters")
_UNSUPPORTED += ("trainable_token_indices", "layer_replication", "alora_invocation_tokens")


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


def adapter_name(ref: AdapterRef) -> str:
    return f"adapter {ref.id} v{ref.version}"


def _check_config(ref: AdapterRef, config: dict[str, Any]) -> None:
    """Refuse configs whose maths is not ``W x + s B A x``."""
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidAdapter(
            f"{adapter_name(ref)}: peft_type={config['peft_type']!r}; expected 'LORA'"
        )
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(
            f"{adapter_name(ref)}: bias={config['bias']!r}; retrain with bias='none'"
        )
    for key in _UNSUPPORTED:
        if config.get(key):
            raise InvalidAdapter(
                f"{adapter_name(ref)}: adapter_config sets {key}={config[key]!r}, which cannot be "
                "composed; retrain it as a plain LoRA"
            )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise InvalidAdapter(
                f"{adapter_name(ref)}: adapter_config {key}={value!r}; expected > 0"
            )


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
        raise InvalidAdapter(f"{adapter_name(ref)}: the state dict is empty")
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise InvalidAdapter(
                f"{adapter_name(ref)}: unexpected key {key}; expected PEFT LoRA keys"
            )
        module = match["module"]
        if module not in layers:
            raise InvalidAdapter(
                f"{adapter_name(ref)}: unknown target key {key}: the base model has no LoRA target "
                f"layer {module} (targets like {next(iter(layers))})"
            )
        pairs.setdefault(module, {})[match["ab"]] = (key, tensor)
    for module, pair in pairs.items():
        if len(pair) != 2:
            raise InvalidAdapter(f"{adapter_name(ref)}: {module} has lora_{next(iter(pair))} only")
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
                f"{adapter_name(ref)}: {key_a} has rank {a.shape[0]}, above the bank's r_max="
                f"{layer.r_max}; build the bank with a larger r_max"
            )
        for key, tensor, want in (
            (key_a, a, (r, layer.in_features)),
            (key_b, b, (layer.out_features, r)),
        ):
            if tuple(tensor.shape) != want:
                raise InvalidAdapter(
                    f"{adapter_name(ref)}: {key} has shape {tuple(tensor.shape)}, expected {want}"
                )
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise InvalidAdapter(
                    f"{adapter_name(ref)}: {key} holds NaN, inf or non-float values"
                )
        parsed[module] = (a, b, scale)
    return parsed
