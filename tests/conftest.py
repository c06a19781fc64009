"""Shared fixtures. Tests never touch the user's ~/.adapterswap and never use the network."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
