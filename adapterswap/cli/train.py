"""``adapterswap train``: submit a Ray job to a running cluster, or train in the foreground.

Without ``--wait``, when a Ray cluster's job server answers (``RAY_ADDRESS``, else the local
dashboard at 127.0.0.1:8265), the command submits ``python -m adapterswap train --wait``
there and prints the job id. With ``--wait``, or when no cluster is running, it trains
here: it joins or starts Ray, shows one progress bar per shard and exits 1 if any shard
failed. ``ray job submit -- python -m adapterswap train --wait`` is the same entry point.
"""

from __future__ import annotations

import argparse
from typing import Any

from actors.job_submission import submit_ray_job
from actors.train_launcher import train_shards_with_ray
from adapterswap.cli.common import forwarded_flags
from adapterswap.cli.progress import ShardProgressBars
from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import TrainingFailed
from adapterswap.store.registry import AdapterRegistry
from adapterswap.train.job import TrainReport, run_training


def train_command(args: argparse.Namespace, config: AdapterSwapConfig) -> tuple[str, Any]:
    """The ``train`` command's flags, to :func:`submit_or_train`."""
    return submit_or_train(config, wait=args.wait, forward=forwarded_flags(args), quiet=args.json)


def train_in_foreground(config: AdapterSwapConfig, *, quiet: bool) -> TrainReport:
    """Run the training job here (joining or starting Ray if there is work), with progress bars."""
    bars = None if quiet else ShardProgressBars()
    try:
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
    config: AdapterSwapConfig, *, wait: bool, forward: list[str], quiet: bool
) -> tuple[str, dict[str, Any]]:
    """The ``train`` command: returns its text and JSON payload; raises TrainingFailed."""
    if not wait:
        job_id = submit_ray_job(config, [*forward, "train", "--wait"])
        if job_id is not None:
            return f"submitted training job {job_id}; follow it with: ray job logs -f {job_id}", {
                "job": job_id
            }
    report = train_in_foreground(config, quiet=quiet)
    if report.failed:
        raise TrainingFailed(format_report(report))
    payload = {
        "job": report.job,
        "message": report.message,
        "trained": report.trained,
        "recovered": report.recovered,
    }
    return format_report(report), payload
