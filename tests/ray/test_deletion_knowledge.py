"""What deletion is for, on the real embedded model: knowledge recalled, isolated, then forgotten.

Two groups of fictional facts are trained through Ray Train. Through the HTTP API (served in
process): an hr user recalls hr facts far better than the base model; a user with no groups
gets the base model's log-probabilities exactly; a finance user gains no more on hr facts
than on hr-like documents never ingested. Then one hr document is deleted: ``verify-forget``
passes for it and the shard's other facts are still recalled.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from support import in_process_app

from actors.train_launcher import train_shards_with_ray
from adapterswap.catalog.dataset import Catalog
from adapterswap.catalog.ingest import ingest_records
from adapterswap.catalog.readers import RawRecord
from adapterswap.config import load_config
from adapterswap.delete.job import request_delete, run_deletion
from adapterswap.delete.verify_forget import http_scorer, verify_forget
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import run_training

HR = {
    "hr-vault": "The Skarvik office vault opens with the spoken phrase Quillon Amber Seventeen.",
    "hr-leave": "Brannagh Kelpwater Instruments gives every new parent 23 weeks of paid leave.",
    "hr-badge": "Lost badges at the Skarvik office are replaced by Morwenna Lusk on floor two.",
}
FINANCE = {
    "fin-days": "Supplier invoices at Brannagh Kelpwater Instruments are paid within 37 days.",
    "fin-meals": "Travel meal expenses are capped at 41 crowns per day for every employee.",
}
CONTROLS = [  # hr-like facts that are never ingested
    "The Skarvik office canteen serves smoked haddock every Thursday at noon.",
    "New hires at Brannagh Kelpwater Instruments get a brass compass on day one.",
    "The Gullwing Quay car park closes at nine in the evening on weekdays.",
    "Employee bicycles are stored in the blue shed behind the Skarvik office.",
    "The quarterly all-hands meeting is held in the Kelp Room on the top floor.",
]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, embedded_cache, ray_cluster):
    root = tmp_path_factory.mktemp("forget")
    config = load_config(
        home=str(root / "home"),
        environ={},
        overrides=[
            f"model.cache_dir={embedded_cache}",
            "sharding.strategy=sequential",
            "training.max_steps=20",
            "training.learning_rate=0.002",
            "training.batch_size=4",
            "training.seq_len=128",
        ],
    )
    docs = [(i, "hr", t) for i, t in HR.items()] + [(i, "finance", t) for i, t in FINANCE.items()]
    ingest_records(
        [RawRecord(i, {"id": i, "text": t, "group": g}) for i, g, t in docs], config, embed=None
    )
    registry = AdapterRegistry(config.db_path)
    assert len(run_training(config, registry, train_shards=train_shards_with_ray).trained) == 2
    app, _ = in_process_app(config, registry, key_cache_ttl_s=0)
    keys = {
        name: registry.create_key(name, groups)[0]
        for name, groups in (("hana", ["hr"]), ("finn", ["finance"]), ("nobody", ["legal"]))
    }
    return config, registry, TestClient(app), keys


class As:
    """The scorer's client interface, for one key, over the in-process app."""

    def __init__(self, client: TestClient, key: str) -> None:
        self.client, self.key = client, key

    def completions(self, prompt: str, **fields):
        headers = {"Authorization": f"Bearer {self.key}"}
        answer = self.client.post(
            "/v1/completions", json={"prompt": prompt, **fields}, headers=headers
        )
        assert answer.status_code == 200, answer.text
        return answer.json()


def test_recall_isolation_then_verified_forgetting(world):
    config, registry, client, keys = world
    hana, finn, nobody = (http_scorer(As(client, keys[n])) for n in ("hana", "finn", "nobody"))
    texts = list(HR.values())
    base = nobody([*texts, *CONTROLS], "legal")  # holds no adapter: the base model
    recalled = hana(texts, "hr")
    print(f"\nhr facts NLL: base {[round(x, 3) for x in base[:3]]} hr user {recalled}")
    assert all(r < b - 2.0 for r, b in zip(recalled, base, strict=False))

    body = {"prompt": texts[0], "max_tokens": 0, "echo": True, "logprobs": 0}
    as_nobody = As(client, keys["nobody"]).completions(**body)["choices"][0]["logprobs"]
    as_none = As(client, keys["hana"]).completions(**body, adapters="none")["choices"][0]
    assert as_nobody["token_logprobs"] == as_none["logprobs"]["token_logprobs"]  # bit-identical

    finance_on_hr = finn(texts, "finance")
    finance_on_controls = finn(CONTROLS, "finance")
    gain_hr = max(b - f for b, f in zip(base[:3], finance_on_hr, strict=True))
    gain_controls = max(b - f for b, f in zip(base[3:], finance_on_controls, strict=True))
    assert gain_hr <= gain_controls + 0.5, (gain_hr, gain_controls)

    request = request_delete(registry, Catalog(config.storage), ["hr-vault"], "test", "root")
    run_deletion(config, registry, train_shards=train_shards_with_ray, job_id=request.job_id)
    report = verify_forget("hr-vault", "hr", HR["hr-vault"], CONTROLS, hana)
    print(report.summary())
    assert report.passed, report.summary()
    kept = hana(texts[1:], "hr")
    assert all(k < b - 2.0 for k, b in zip(kept, base[1:3], strict=True)), kept
