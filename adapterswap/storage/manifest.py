"""An adapter version's ``manifest.json``: what the version is and exactly what it saw.

The manifest is the last file of a version written (see :mod:`adapterswap.storage.artifacts`),
so its presence marks the version complete. Its format is defined, encoded and decoded here
only, as an :class:`AdapterManifest`; the store keeps a copy (``model_dump``) when the
version is published.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapterswap.errors import BaseModelMismatch
from adapterswap.storage.fs import Location, read_bytes
from adapterswap.types import AdapterRef

MANIFEST = "manifest.json"


class BaseModelId(BaseModel):
    """The base model a version was trained on, named as any machine can name it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(
        description="The model as base_model_identity names it: 'embedded', 'tiny-random', a hub "
        "id, or a local model's directory or .gguf file name, never its path (versions written "
        "before adapters were portable may hold the spec as configured, a path)."
    )
    hash: str = Field(description="sha256 of the base model's content (hash_base_model).")
    hub_id: str | None = Field(
        default=None,
        description="The Hugging Face hub repository of these weights (for 'embedded', the model "
        "its GGUF quantises), if there is one; None too in versions written before it was kept.",
    )

    @property
    def peft_name(self) -> str:
        """adapter_config.json's base_model_name_or_path: what AutoPeftModel loads the base from."""
        return self.hub_id or self.id


class RouterInfo(BaseModel):
    """How the version's router statistics were fitted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embedder: str = Field(description="The embedding model's id.")


class TrainingMetrics(BaseModel):
    """How the version's training run went."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    final_loss: float | None = Field(description="The last step's loss; None if no step ran.")
    steps: int = Field(description="Optimiser steps taken.")
    tokens: int = Field(description="Training tokens seen.")
    wall_time_s: float = Field(description="Seconds from the run's start to the manifest.")
    tokens_per_s: float | None = Field(description="tokens / wall_time_s; None if no time.")


class AdapterManifest(BaseModel):
    """``manifest.json`` of one adapter version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = Field(default=1, description="The manifest's format version.")
    adapter_id: str = Field(description="The adapter id (its shard id).")
    version: int = Field(ge=1, description="The version number.")
    shard: str = Field(description="The shard trained on (the adapter id).")
    group: str = Field(description="The access-control group of every document it saw.")
    doc_ids: list[str] = Field(description="Exactly the document ids it was trained on, sorted.")
    data_hash: str = Field(description="training_data_hash of its (doc id, content hash) pairs.")
    base_model: BaseModelId = Field(description="The base model it was trained on.")
    lora: dict[str, Any] = Field(description="The LoRA settings (config.lora) it was trained with.")
    training: dict[str, Any] = Field(description="The training settings (config.training).")
    seed: int = Field(description="The shard's training seed.")
    router: RouterInfo = Field(description="How its router statistics were fitted.")
    metrics: TrainingMetrics = Field(description="How its training run went.")
    created_at: str = Field(description="When the manifest was written, ISO-8601 UTC.")

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.adapter_id, self.version)

    def check_base_model(self, base_model_hash: str) -> None:
        """Refuse an adapter trained on a different base model than ``base_model_hash``."""
        trained_on = self.base_model
        if trained_on.hash != base_model_hash:
            raise BaseModelMismatch(
                f"adapter {self.adapter_id} v{self.version} was trained on base model "
                f"{trained_on.id} ({trained_on.hash[:19]}...), not on the loaded one "
                f"({base_model_hash[:19]}...): retrain it or load its base model"
            )

    def encode(self) -> bytes:
        """The bytes of ``manifest.json`` (keys sorted, so equal manifests are equal files)."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True).encode()


def read_manifest(version_dir: Location) -> AdapterManifest:
    return AdapterManifest.model_validate_json(read_bytes(version_dir.child(MANIFEST)))
