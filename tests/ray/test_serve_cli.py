"""`adapterswap serve` starts Ray, serves the API on the given port, prints where its
Prometheus metrics are (on the configured port), and stops on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from support import free_port

from adapterswap.store.registry import AdapterRegistry


def get(url: str, key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:  # before the app is up, Serve's proxy answers 404
        return exc.code, exc.read()


def test_serve_command_serves_and_stops(tmp_path, tiny_cache):
    home = tmp_path / "home"
    home.mkdir()
    key = AdapterRegistry(home / "store.sqlite").create_key("ann", ["hr"])[0]
    port, metrics_port = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "adapterswap",
        "--home",
        str(home),
        "--set",
        "model.spec=tiny-random",
        "--set",
        f"model.cache_dir={tiny_cache}",  # the run's tokenizer, converted once
        "--set",
        f"ray.metrics_export_port={metrics_port}",
        "serve",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while not any("Prometheus metrics on" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert get(f"http://127.0.0.1:{port}/v1/models")[0] == 401
        status, models = get(f"http://127.0.0.1:{port}/v1/models", key)
        assert status == 200 and json.loads(models)["data"][0]["id"] == "tiny-random"
        (printed,) = [line for line in lines if line.startswith("Prometheus metrics on ")]
        (metrics_url,) = printed.split()[3:]
        assert metrics_url.endswith(f":{metrics_port}/metrics")
        status, metrics = get(metrics_url)
        assert status == 200 and b"ray_" in metrics  # Ray's Prometheus exposition
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert f"serving on http://127.0.0.1:{port}" in out
