"""Shared fixtures and the `ray` marker. Tests never touch the user's ~/.adapterswap and never
use the network.

The tiny model is built once per run (``tiny``, ``tiny64``) and every configuration on it
comes from one factory (``tiny_config``). A test that needs a Ray cluster is marked ``ray``:
everything under tests/ray/ and every test using its ``ray_cluster`` fixture, by the hook
below; ``--no-ray`` (``make test-fast``) leaves them out, and makes ``ray.init`` fail in the
rest, so that a test starting Ray without the marker shows up instead of slowing the run.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the imports themselves wait for the fixtures: a run may need neither
    from adapterswap.config import AdapterSwapConfig
    from adapterswap.models.base import LoadedModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module: the tiny model gains nothing from more, and on a busy
    machine every small parallel op would wait milliseconds for a descheduled second thread.
    Use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Point ADAPTERSWAP_HOME at a fresh directory and drop any ADAPTERSWAP_* settings."""
    for name in list(os.environ):
        if name.startswith("ADAPTERSWAP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ADAPTERSWAP_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def embed():
    """The real embedded all-MiniLM-L6-v2 embedder (loads offline in well under a second)."""
    from adapterswap.config import EmbeddingSettings
    from adapterswap.models.embedder import load_embedder

    return load_embedder(EmbeddingSettings()).embed


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server (moto) on loopback. moto keeps its buckets in process-wide
    state, so every test module that uses it writes under its own key prefix."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def s3_query(s3_endpoint, monkeypatch):
    """pyarrow's query options for ``s3://bucket/<prefix>?<s3_query>`` on the moto server, with
    fake credentials in the environment and the bucket created. moto's state is process-wide:
    each test module keeps to its own prefix in the bucket."""
    import pyarrow.fs as pafs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    query = f"endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(f"s3://bucket?{query}&allow_bucket_creation=true")
    fs.create_dir("bucket")
    return query


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """A model cache holding the embedded SmolLM2 conversion, made once per session (~19 s)."""
    from adapterswap.config import ModelSettings
    from adapterswap.models.base import load_base_model

    cache = tmp_path_factory.mktemp("embedded-models")
    load_base_model(ModelSettings(spec="embedded"), cache)
    return cache


RAY_DIR = Path(__file__).parent / "ray"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-ray",
        action="store_true",
        help="leave out the tests marked `ray` and fail any other test that calls ray.init",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ray: needs a Ray cluster (tests/ray/, the ray_cluster fixture); --no-ray skips"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs Ray ``ray``; with ``--no-ray``, deselect them."""
    for item in items:
        if item.path.is_relative_to(RAY_DIR) or "ray_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.ray)
    if config.getoption("--no-ray"):
        keep = [item for item in items if item.get_closest_marker("ray") is None]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def _no_ray_without_the_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under ``--no-ray``, ``ray.init`` fails: a test that starts Ray unmarked fails by name."""
    if not request.config.getoption("--no-ray"):
        yield
        return
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "this test starts Ray under --no-ray: use the ray_cluster fixture "
            "(tests/ray/conftest.py) or mark it `pytest.mark.ray`"
        )

    real, ray.init = ray.init, refuse
    try:
        yield
    finally:
        ray.init = real


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model cache of every tiny-random load in the run: the SmolLM2 tokenizer is
    converted from its GGUF into it once (~3.5 s), then loads from it in ~0.3 s."""
    from adapterswap.config import ModelSettings
    from adapterswap.models.base import load_base_model

    cache = tmp_path_factory.mktemp("tiny-cache")
    load_base_model(ModelSettings(spec="tiny-random"), cache)
    return cache


def _kept_as_built(loaded: LoadedModel) -> Iterator[LoadedModel]:
    """Yield ``loaded``, shared by the run, then check that no test changed it: a change
    (LoRA injected, a weight moved, a cast) would silently change every later test."""
    import torch

    before = {name: t.clone() for name, t in loaded.model.state_dict().items()}
    yield loaded
    after = loaded.model.state_dict()
    changed = [
        name
        for name, t in before.items()
        if name not in after or after[name].dtype != t.dtype or not torch.equal(after[name], t)
    ]
    assert not changed and after.keys() == before.keys(), (
        f"a test changed the shared tiny model ({(changed or list(after))[:3]}...): "
        "change a copy, support.private_copy(tiny), instead"
    )


@pytest.fixture(scope="session")
def tiny(tiny_cache: Path) -> Iterator[LoadedModel]:
    """tiny-random (a LoadedModel), built once for the run and shared: read it, never change
    it; a test that trains or wraps it takes ``support.private_copy(tiny)``."""
    from adapterswap.config import ModelSettings
    from adapterswap.models.base import load_base_model

    yield from _kept_as_built(load_base_model(ModelSettings(spec="tiny-random"), tiny_cache))


@pytest.fixture(scope="session")
def tiny64(tiny: LoadedModel) -> Iterator[LoadedModel]:
    """The tiny model in float64 end to end (``support.exact_float64``), for exactness tests;
    shared like ``tiny``. Adapters saved from it are float64 too."""
    import torch
    from support import exact_float64

    model = exact_float64(copy.deepcopy(tiny.model))
    yield from _kept_as_built(dataclasses.replace(tiny, model=model, dtype=torch.float64))


@pytest.fixture(scope="session")
def lora_dirs(tiny64: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``support.LORA_SPECS``' three random adapters of ``tiny64``, saved once: {ref: dir}."""
    from support import LORA_SPECS, save_random_lora

    root = tmp_path_factory.mktemp("adapters")
    return {
        ref: save_random_lora(tiny64.model, root / ref.id, seed, **spec)
        for seed, (ref, spec) in enumerate(LORA_SPECS.items())
    }


@pytest.fixture(scope="session")
def tiny_config(
    tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path
) -> Callable[..., AdapterSwapConfig]:
    """A factory of configurations on the tiny model: ``tiny_config(**settings)`` is
    ``support.TINY`` with ``settings`` (sections as dicts, e.g. ``training={"max_steps": 1}``,
    or top-level fields such as ``storage_uri``) set over it, the run's model cache, and a
    fresh home of its own unless ``home=`` names one. Session-scoped, so fixtures of any
    scope can use it."""
    from support import TINY, set_flags

    from adapterswap.config import load_config

    def make(*, home: str | os.PathLike[str] | None = None, **settings: Any) -> AdapterSwapConfig:
        home = home or tmp_path_factory.mktemp("tiny") / "home"
        base = {**TINY, "model": {**TINY["model"], "cache_dir": str(tiny_cache)}}
        flags = [*set_flags(base), *set_flags(settings)]
        return load_config(home=str(home), environ={}, overrides=flags)

    return make


@pytest.fixture(scope="module")
def http_world(tiny_config: Callable[..., AdapterSwapConfig]) -> tuple[Any, dict, dict, Any]:
    """The real HTTP app in this process (``support.in_process_app``) on the tiny model in
    float64, with a random-LoRA adapter for each of two groups (``hr.b0001.000`` on
    ``support.HR_TEXTS``, ``finance.b0001.000`` on ``FIN_TEXTS``) and keys for every mix of
    hr, finance and legal (``keys["finance+hr"]``), plus an admin (``keys["admin"]``, hr).

    Returns ``(client, keys, refs, replica)``: a ``TestClient`` that answers errors as
    responses, the keys, the two adapters' refs by group, and the model replica.
    """
    from fastapi.testclient import TestClient
    from support import http_world_app

    app, keys, refs, replica = http_world_app(tiny_config)
    return TestClient(app, raise_server_exceptions=False), keys, refs, replica


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without interpreter finalisation once pytest has reported.

    After a full run (several local Ray clusters, torch thread pools, a moto server thread),
    the interpreter was seen to segfault while finalising native modules, after every test
    had passed and the summary was printed, turning a green run into a failed exit status.
    The status returned is pytest's own; every Ray cluster is shut down by its fixture.
    """
    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
