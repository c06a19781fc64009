"""Issue 14, point 8: an adapter version's directory, copied to another machine, loads with
PEFT (``PeftModel`` on a base the user loads, ``AutoPeftModelForCausalLM`` from the name it
records) and gives the logits our own composition gives; nothing in it names this machine.

"Another machine" is a fresh process whose only model is in a Hugging Face hub cache of its
own, offline. Versions are trained for one real step through the trainer's own path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from support import private_copy, untrained_manifest

from adapterswap.compose.bank import AdapterBank
from adapterswap.config import AdapterSwapConfig, ModelSettings
from adapterswap.engine.adapter_source import StorageAdapterSource
from adapterswap.errors import BaseModelMismatch
from adapterswap.models.base import (
    EMBEDDED_HUB_ID,
    LoadedModel,
    base_model_identity,
    hash_base_model,
    load_base_model,
)
from adapterswap.models.gguf import find_embedded_gguf
from adapterswap.storage.artifacts import ADAPTER_CONFIG, MODEL_CARD, write_adapter_version
from adapterswap.storage.layout import StorageLayout
from adapterswap.storage.manifest import MANIFEST
from adapterswap.train.plan import ShardWork
from adapterswap.train.shard import finish_shard_run, make_shard_run, start_shard_trainer
from adapterswap.types import AdapterRef

HUB_ID = "adapterswap-test/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"
IDS = torch.tensor([[1, 2, 3, 4, 5, 6]])
WORK = ShardWork("hr.b0001.000", "hr", ("memo",), ("The vault code is 7319.",), "sha256:t")

# The other machine: only the adapter directory and its own hub cache, offline.
LOAD_ELSEWHERE = """
import sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    torch.save(model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6]])).logits, sys.argv[2])
"""


def hub_cache(root: Path, tiny: LoadedModel) -> Path:
    """A Hugging Face hub cache at ``root`` holding the tiny model as repo ``HUB_ID``, laid out
    as a download leaves it (``models--org--name/snapshots/<rev>``, ``refs/main``)."""
    repo = root / f"models--{HUB_ID.replace('/', '--')}"
    tiny.model.save_pretrained(repo / "snapshots" / REVISION)
    tiny.tokenizer.save_pretrained(repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return root


@pytest.fixture
def on_hub(tmp_path, tiny, monkeypatch) -> str:
    """``HUB_ID`` resolvable offline in this process, as on the machine that trains."""
    cache = hub_cache(tmp_path / "trainer-hub-cache", tiny)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return HUB_ID


@pytest.fixture
def tiny_random() -> str:
    return "tiny-random"


@pytest.fixture
def local_dir(tmp_path, tiny) -> str:
    """The tiny model as a local Hugging Face directory, deep in this machine's paths."""
    path = tmp_path / "models" / "tiny-llama-local"
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return str(path)


def train_version(config: AdapterSwapConfig) -> tuple[AdapterRef, Path]:
    """Version 1 of ``WORK``'s adapter, trained and written as a training job does it."""
    base = base_model_identity(config.model, config.model_cache_dir)
    run = make_shard_run(WORK, 1, config, base)
    trainer, _ = start_shard_trainer(run, torch.device("cpu"))
    while not trainer.done:
        trainer.step()
    finish_shard_run(run, trainer)
    return run.ref, Path(StorageLayout.from_config(config).version(run.ref).path)


def composed_logits(config: AdapterSwapConfig, ref: AdapterRef) -> torch.Tensor:
    """The adapter alone at weight 1, composed by our own bank from storage."""
    model = load_base_model(config.model, config.model_cache_dir).model
    bank = AdapterBank(model, config.lora.target_modules, config.lora.rank, cache_bytes=10**8)
    base_hash = hash_base_model(config.model, config.model_cache_dir)
    bank.get_or_load(ref, StorageAdapterSource(StorageLayout.from_config(config), base_hash).load)
    with torch.no_grad(), bank.mixture([[(ref, 1.0)]]):
        return bank.model(input_ids=IDS).logits


def machine_strings(config: AdapterSwapConfig, tmp_path: Path) -> list[str]:
    return [str(Path.home()), str(config.home), str(config.model_cache_dir), str(tmp_path)]


def strings_in(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize(
    ("spec_fixture", "recorded"),
    [("tiny_random", "tiny-random"), ("local_dir", "tiny-llama-local"), ("on_hub", HUB_ID)],
)
def test_adapter_files_name_the_base_model_portably_with_its_hash(
    spec_fixture, recorded, tiny_config, tmp_path, request
):
    spec = request.getfixturevalue(spec_fixture)
    config = tiny_config(model={"spec": spec}, training={"max_steps": 1})
    _, version_dir = train_version(config)
    peft_config = json.loads((version_dir / ADAPTER_CONFIG).read_text())
    card = ModelCard.load(version_dir / MODEL_CARD)

    assert peft_config["base_model_name_or_path"] == recorded
    for text in [*strings_in(peft_config), *strings_in(card.data.to_dict()), card.text]:
        assert not os.path.isabs(text), text
        assert not any(local in text for local in machine_strings(config, tmp_path)), text
    assert card.data.library_name == "peft"
    assert card.data.base_model == (HUB_ID if spec == HUB_ID else None)  # hub ids only
    assert card.data.adapterswap["base_model"] == {
        "id": recorded,
        "sha256": hash_base_model(config.model, config.model_cache_dir),
    }


def test_a_hub_cache_snapshot_is_named_by_its_repo_id_not_its_path(on_hub, tmp_path, tiny_cache):
    repo = f"models--{HUB_ID.replace('/', '--')}"
    snapshot = tmp_path / "trainer-hub-cache" / repo / "snapshots" / REVISION
    by_path = base_model_identity(ModelSettings(spec=str(snapshot)), tiny_cache)
    assert by_path == base_model_identity(ModelSettings(spec=on_hub), tiny_cache)
    assert (by_path.id, by_path.hub_id) == (HUB_ID, HUB_ID)


def test_the_embedded_model_is_named_by_the_hub_model_its_gguf_quantises(tmp_path, tiny):
    embedded = base_model_identity(ModelSettings(spec="embedded"), tmp_path)
    assert (embedded.id, embedded.hub_id) == ("embedded", EMBEDDED_HUB_ID)
    assert EMBEDDED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert embedded.hash == hash_base_model(ModelSettings(spec="embedded"), tmp_path)
    # The same weights as a .gguf file of the user's: its file name, the same hash.
    gguf = tmp_path / "deep" / "weights" / "my-smol.gguf"
    gguf.parent.mkdir(parents=True)
    shutil.copy(find_embedded_gguf(), gguf)
    own = base_model_identity(ModelSettings(spec=str(gguf)), tmp_path)
    assert (own.id, own.hub_id) == ("my-smol.gguf", None)
    assert own.hash == hash_base_model(ModelSettings(spec=str(gguf)), tmp_path)
    # And what an adapter trained on the embedded model records for PEFT.
    ref = AdapterRef("hr.b0001.000", 1)
    loc = StorageLayout.from_uri(str(tmp_path / "s")).version(ref)
    peft_model = get_peft_model(private_copy(tiny).model, LoraConfig(target_modules=["q_proj"]))
    write_adapter_version(loc, peft_model, b"stats", untrained_manifest(ref, "hr", [], embedded))
    written = json.loads((Path(loc.path) / ADAPTER_CONFIG).read_text())
    assert written["base_model_name_or_path"] == EMBEDDED_HUB_ID
    assert ModelCard.load(Path(loc.path) / MODEL_CARD).data.base_model == EMBEDDED_HUB_ID


def test_a_copied_directory_loads_in_peft_to_the_logits_of_our_composition(tiny_config, tmp_path):
    config = tiny_config(training={"max_steps": 1, "learning_rate": 1e-2})
    ref, version_dir = train_version(config)
    copied = shutil.copytree(version_dir, tmp_path / "elsewhere" / "adapter")
    shutil.rmtree(version_dir)  # nothing may still point at the original

    base = load_base_model(ModelSettings(spec="tiny-random"), config.model_cache_dir).model
    with torch.no_grad():
        base_logits = base(input_ids=IDS).logits
        peft_logits = PeftModel.from_pretrained(base, copied)(input_ids=IDS).logits
    shutil.copytree(copied, version_dir)
    ours = composed_logits(config, ref)
    assert not torch.allclose(ours, base_logits)  # the adapter does something
    torch.testing.assert_close(peft_logits, ours)


def test_auto_peft_model_resolves_the_recorded_hub_id_on_another_machine(
    on_hub, tiny_config, tiny, tmp_path
):
    config = tiny_config(model={"spec": on_hub}, training={"max_steps": 1, "learning_rate": 1e-2})
    ref, version_dir = train_version(config)
    ours = composed_logits(config, ref)
    copied = shutil.copytree(version_dir, tmp_path / "other-machine" / "adapter")
    cache = hub_cache(tmp_path / "other-machine" / "hf-home" / "hub", tiny)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path / "other-machine"),
        "HF_HOME": str(cache.parent),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
    }
    out = tmp_path / "logits.pt"
    done = subprocess.run(
        [sys.executable, "-c", LOAD_ELSEWHERE, str(copied), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.load(out), ours)


def test_versions_written_before_keep_loading_and_another_base_is_still_refused(
    tiny_config, tmp_path
):
    config = tiny_config(training={"max_steps": 1, "learning_rate": 1e-2})
    ref, version_dir = train_version(config)
    new_logits = composed_logits(config, ref)
    other = StorageAdapterSource(StorageLayout.from_config(config), "f" * 64)
    with pytest.raises(BaseModelMismatch, match="trained on base model tiny-random"):
        other.load(ref)
    # As versions were written before: a local path in both files, no hub id, no model card.
    old_path = "/root/.cache/adapterswap/models/smollm2-135m-instruct"
    for name, edit in (
        (ADAPTER_CONFIG, lambda c: {**c, "base_model_name_or_path": old_path}),
        (
            MANIFEST,
            lambda m: {**m, "base_model": {"id": old_path, "hash": m["base_model"]["hash"]}},
        ),
    ):
        path = version_dir / name
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    (version_dir / MODEL_CARD).unlink()

    torch.testing.assert_close(composed_logits(config, ref), new_logits, rtol=0, atol=0)
    with pytest.raises(BaseModelMismatch, match=f"trained on base model {old_path}"):
        other.load(ref)
