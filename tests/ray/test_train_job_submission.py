"""`adapterswap train` without --wait hands the training to the cluster the user named as a
Ray job, by any address Ray's own tools take, and says where."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import NamedTuple

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient

from adapterswap.cli.main import main

DASHBOARD_PORT = 8299


class Addresses(NamedTuple):
    gcs: str  # as ray.init takes it
    job_server: str  # as ray job submit takes it


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
        yield Addresses(cluster.address, f"http://127.0.0.1:{DASHBOARD_PORT}")
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ["PATH"] = saved_path


def test_train_submits_a_ray_job_that_trains(
    cluster_with_job_server, tmp_path, capsys, monkeypatch
):
    # RAY_ADDRESS as ray.init takes it: Ray finds the job server in the cluster's GCS.
    monkeypatch.setenv("RAY_ADDRESS", cluster_with_job_server.gcs)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
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
    submitted = json.loads(capsys.readouterr().out)
    job_id = submitted["job"]
    assert submitted["job_server"] == cluster_with_job_server.job_server
    client = JobSubmissionClient(cluster_with_job_server.job_server)
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


@pytest.mark.parametrize("where", ["--address", "RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"])
def test_train_says_where_it_submitted(
    cluster_with_job_server, tmp_path, capsys, monkeypatch, where
):
    """The job server's URL, however it was named (a URL in RAY_ADDRESS too, as older Ray
    documentation had it), and the command that follows the job."""
    url = cluster_with_job_server.job_server
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    argv = ["--home", str(tmp_path), "train"]  # an empty home: the job has nothing to train
    if where == "--address":
        argv += ["--address", url]
    else:
        monkeypatch.setenv(where, url)
    assert main(argv) == 0
    out = capsys.readouterr().out
    job_id = out.split()[3]
    assert out.strip() == (
        f"submitted training job {job_id} to the Ray job server at {url}; "
        f"follow it with: ray job logs -f {job_id} --address {url}"
    )
    JobSubmissionClient(url).stop_job(job_id)
