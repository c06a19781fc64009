"""What both training launchers share: joining Ray, and carrying the workers' step events
back to the driver's ``on_progress`` while the trainers run (in threads of the driver)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import ray
from ray.util.queue import Queue

from adapterswap.config import AdapterSwapConfig

Sink = Callable[[dict[str, Any]], None]


def connect_ray(config: AdapterSwapConfig) -> None:
    """Join the configured Ray cluster (or start a local one) unless already connected."""
    if not ray.is_initialized():
        ray.init(address=config.ray.address, namespace=config.ray.namespace, log_to_driver=False)


def run_relaying_progress(
    tasks: list[Callable[[Queue | None], None]], on_progress: Sink | None
) -> None:
    """Run each task in a thread of its own, handing it the queue its workers put step events
    on (None without ``on_progress``), and pass those events to ``on_progress`` here until
    every task has returned. Tasks report their own outcomes; they must not raise."""
    progress = Queue(actor_options={"num_cpus": 0}) if on_progress else None
    threads = [threading.Thread(target=task, args=(progress,), daemon=True) for task in tasks]
    for thread in threads:
        thread.start()
    try:
        while any(t.is_alive() for t in threads):
            _drain(progress, on_progress, timeout=0.5)
        _drain(progress, on_progress, timeout=0)
    finally:
        if progress is not None:
            ray.kill(progress.actor)


def _drain(queue: Queue | None, sink: Sink | None, timeout: float) -> None:
    if queue is None or sink is None:
        threading.Event().wait(timeout)
        return
    try:
        sink(queue.get(timeout=timeout) if timeout else queue.get_nowait())
    except Exception:  # noqa: BLE001 - ray.util.queue raises Empty subclasses on timeout
        return
    while not queue.empty():
        sink(queue.get_nowait())
