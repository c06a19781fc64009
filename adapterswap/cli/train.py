"""``adapterswap train``: submit a Ray job to a named cluster, or train in the foreground.

When the user named a cluster (``--address``, ``RAY_API_SERVER_ADDRESS``, ``RAY_ADDRESS`` or
``ray.address``; see :mod:`actors.ray_address`), the command submits ``python -m adapterswap
train --wait`` to its job server and prints the job id and the job server's URL. Otherwise,
with ``--wait``, and inside a Ray job, it trains here: it joins the named cluster, else Ray's
default (the cluster ``ray start`` started on this machine, else a new local one), shows one
progress bar per shard and exits 1 if any shard failed. ``ray job submit -- python -m
adapterswap train --wait`` is the same entry point.
"""

from __future__ import annotations

import argparse
from typing import Any

from actors.job_submission import connect_job_server, submit_ray_job, where_to_submit
from actors.ray_address import joining, ray_errors
from actors.train_launcher import train_shards_with_ray
from adapterswap.cli.common import forwarded_flags
from adapterswap.cli.progress import ShardProgressBars
from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import TrainingFailed
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import TrainReport, run_training


def train_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """The ``train`` command's flags, to :func:`submit_or_train`."""
    return submit_or_train(
        config,
        wait=args.wait,
        address=args.address,
        forward=forwarded_flags(args),
        quiet=args.json,
    )


def train_in_foreground(config: AdapterSwapConfig, *, quiet: bool) -> TrainReport:
    """Run the training job here (joining or starting Ray if there is work), with progress bars."""
    bars = None if quiet else ShardProgressBars()
    try:
        with ray_errors(config.ray.address or "the local Ray"):
            return run_training(
                config,
                AdapterRegistry(config.db_path),
                train_shards=train_shards_with_ray,
                on_progress=bars,
            )
    finally:
        if bars is not None:
            bars.close()


def format_report(report: TrainReport) -> str:
    lines = [f"recovered from an interrupted job: {r}" for r in report.recovered]
    lines.append(report.message)
    lines += [
        f"  {t['id']:<32} v{t['version']:<3} loss {t['final_loss']:.4f}  {t['tokens']} tokens "
        f"in {t['wall_time_s']:.1f} s"
        for t in report.trained
    ]
    lines += [f"  FAILED {f['id']} v{f['version']}: {f['error']}" for f in report.failed]
    return "\n".join(lines)


def submit_or_train(
    config: AdapterSwapConfig,
    *,
    wait: bool,
    forward: list[str],
    quiet: bool,
    address: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The ``train`` command: returns its text and JSON payload; raises TrainingFailed."""
    where = where_to_submit(config, address, wait=wait)
    if where is not None:
        job = submit_ray_job(connect_job_server(where), [*forward, "train", "--wait"])
        text = (
            f"submitted training job {job.job_id} to the Ray job server at {job.job_server}; "
            f"follow it with: ray job logs -f {job.job_id} --address {job.job_server}"
        )
        return text, {"job": job.job_id, "job_server": job.job_server}
    report = train_in_foreground(joining(config, address), quiet=quiet)
    if report.failed:
        raise TrainingFailed(format_report(report))
    payload = {
        "job": report.job,
        "message": report.message,
        "trained": report.trained,
        "recovered": report.recovered,
    }
    return format_report(report), payload
