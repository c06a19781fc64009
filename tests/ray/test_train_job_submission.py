"""`adapterswap train` without --wait hands the training to a running cluster as a Ray job."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient

from adapterswap.cli.main import main

DASHBOARD_PORT = 8299


@pytest.fixture(scope="module")
def cluster_with_job_server():
    # Jobs run `python -m adapterswap` with the cluster's PATH, as cluster.yaml sets it up:
    # started from this venv, the cluster finds this venv's python first.
    saved_path = os.environ["PATH"]
    os.environ["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{saved_path}"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_port": DASHBOARD_PORT},
    )
    try:
        yield f"http://127.0.0.1:{DASHBOARD_PORT}"
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ["PATH"] = saved_path


def test_train_submits_a_ray_job_that_trains(
    cluster_with_job_server, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("RAY_ADDRESS", cluster_with_job_server)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    home = str(tmp_path / "home")
    docs = tmp_path / "d.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"id": f"d{i}", "text": f"Dock {i} opens at {i + 6} am.", "group": "ops"})
            + "\n"
            for i in range(3)
        )
    )
    flags = [
        "--home",
        home,
        "--set",
        "model.spec=tiny-random",
        "--set",
        "training.max_steps=3",
        "--set",
        "sharding.strategy=sequential",
    ]
    assert main([*flags, "ingest", str(docs)]) == 0
    capsys.readouterr()

    assert main([*flags, "train", "--json"]) == 0
    job_id = json.loads(capsys.readouterr().out)["job"]
    client = JobSubmissionClient(cluster_with_job_server)
    deadline = time.monotonic() + 240
    while (status := client.get_job_status(job_id)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        assert time.monotonic() < deadline, client.get_job_logs(job_id)
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert "train --wait" in client.get_job_info(job_id).entrypoint
    assert "trained 1 shard(s), 0 failed" in logs

    assert main([*flags, "status", "--json"]) == 0
    adapters = json.loads(capsys.readouterr().out)["adapters"]
    assert [(a["adapter_id"], a["status"]) for a in adapters] == [("ops.b0001.000", "active")]
