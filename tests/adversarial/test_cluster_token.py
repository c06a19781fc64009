"""A cluster built from cluster.yaml accepts jobs and Ray calls only with its token (issue 12,
point 1), shown through Ray itself.

The head is started on loopback with cluster.yaml's own head start command, parsed from the
file (so this breaks if cluster.yaml drifts): ``RAY_AUTH_MODE=token ... ray start --head
--port=6379 --dashboard-host=127.0.0.1 ...``, with only what a laptop needs changed: the ray
binary of this venv, free ports instead of the fixed ones, a temporary directory, no
autoscaler. Its HOME is a temporary directory holding the token where cluster.yaml's
file_mounts put it, so the machine's own ``~/.ray/auth_token`` is neither used nor touched.

Then it is attacked the way anyone who reaches its ports would (before the fix, cluster.yaml
started the head without ``RAY_AUTH_MODE=token`` and with ``--dashboard-host=0.0.0.0``: with
no token on the node, Ray 2.60 started it open, and every attack below succeeded):
- a job submitted without the token, or with a wrong one, is refused and leaves no job;
  with the token it runs;
- a driver connecting to the GCS (``ray.init(address=...)``) without the token is refused;
- the Ray client server (``ray://``) refuses a call without the token;
- the worker start command of cluster.yaml, on a node without the token, does not start;
- Serve, started with serve_configs/gpu.yaml's http_options, answers HTTPS only: a request
  carrying an API key in clear text gets no answer.

What token auth does not cover: the Prometheus metrics endpoints that Ray's processes expose
(read-only) are not authenticated; cluster.yaml's security group keeps them, like every Ray
port, inside the cluster.

The head is never stopped with ``ray stop``: that kills every Ray process of the machine
(other test clusters, a user's own). The test ends exactly the processes it started: the
``ray start --block`` process and its descendants, then any process still naming its
temporary directory.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import grpc
import psutil
import pytest
import yaml
from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc
from support import free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")  # this venv's, as ~/adapterswap/.venv/bin/ray is there
CLUSTER_RAY = "~/adapterswap/.venv/bin/ray"
START_TIMEOUT_S = 90
# Starts its own head with `ray start` (token auth), so it cannot share tests/ray's cluster.
pytestmark = pytest.mark.ray


@dataclass(frozen=True)
class Head:
    token: str
    gcs: str  # host:port
    dashboard: str  # http://host:port
    client_server: str  # host:port of the Ray client server (ray://)
    root: Path  # the temporary directory: HOME, Ray's temp dir, logs


def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def start_command(commands: list[str], kind: str) -> str:
    """The one command of ``commands`` that runs ``ray start`` (the other is ``ray stop``)."""
    (command,) = [c for c in commands if " start " in f"{c} "]
    assert CLUSTER_RAY in command, f"{kind}: expected {CLUSTER_RAY} in {command!r}"
    return command.replace(CLUSTER_RAY, shlex.quote(str(RAY)))


def token_destination(config: dict) -> str | None:
    """Where cluster.yaml's file_mounts put the token on every node (``~/...``), if anywhere."""
    found = [d for d, src in config["file_mounts"].items() if src.endswith("auth_token")]
    assert len(found) <= 1, found
    return found[0] if found else None


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A process environment with no Ray or AdapterSwap settings of this one (earlier tests may
    have set RAY_AUTH_MODE here), HOME in the temporary directory, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "ADAPTERSWAP_")) and k not in ("HOME", "TMPDIR")
    }
    return {**env, "HOME": str(home), **extra}


def ports(n: int) -> list[int]:
    found: set[int] = set()
    while len(found) < n:
        found.add(free_port())
    return sorted(found)


def http(
    url: str,
    method: str = "GET",
    token: str | None = None,
    body: dict | None = None,
    context: ssl.SSLContext | None = None,
):
    """(status, text) of one request, without Ray's client (nothing here adds a token);
    status 0 when nothing answers."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, HTTPException) as exc:
        return 0, str(exc)  # not listening (yet), or not answering this protocol


def stop_started(proc: subprocess.Popen, marker: str | None = None) -> None:
    """End what ``proc`` started (``bash -c "... ray start --block"`` in its own session):
    SIGTERM to its process group, its descendants and any process naming ``marker``, then
    SIGKILL to those still alive."""
    started: dict[int, psutil.Process] = {}
    if proc.poll() is None:
        root = psutil.Process(proc.pid)
        started = {p.pid: p for p in [root, *root.children(recursive=True)]}
        os.killpg(proc.pid, signal.SIGTERM)
    if marker is not None:
        for other in psutil.process_iter(["cmdline"]):
            if any(marker in part for part in other.info["cmdline"] or ()):
                started[other.pid] = other
    for each in started.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            each.terminate()
    _, alive = psutil.wait_procs(list(started.values()), timeout=5)
    for left in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            left.kill()
    psutil.wait_procs(alive, timeout=5)
    proc.wait(timeout=5)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    config = cluster_config()
    # Short: Ray's Unix sockets live under it (paths are limited to ~107 bytes).
    root = Path(tempfile.mkdtemp(prefix="rtok-", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    token = secrets.token_hex(32)  # what Ray's own `ray get-auth-token --generate` makes
    destination = token_destination(config)
    if destination is not None:  # a node has the token only if cluster.yaml mounts it
        token_file = home / destination.removeprefix("~/")
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(f"{token}\n")  # as docs/operations.md's command writes it
        token_file.chmod(0o600)

    gcs, dash, client, agent_http, agent_grpc, env_agent, metrics, node, objects = ports(9)
    command = start_command(config["head_start_ray_commands"], "head")
    command, replaced = re.subn(r"--port=6379\b", f"--port={gcs}", command)
    assert replaced == 1, command
    command, removed = re.subn(r"\s--autoscaling-config=\S+", "", command)
    assert removed == 1, command  # the launcher writes that file; no autoscaler here
    command += (
        f" --block --node-ip-address=127.0.0.1 --temp-dir={root / 'ray'}"
        f" --dashboard-port={dash} --ray-client-server-port={client}"
        f" --dashboard-agent-listen-port={agent_http} --dashboard-agent-grpc-port={agent_grpc}"
        f" --runtime-env-agent-port={env_agent} --metrics-export-port={metrics}"
        f" --node-manager-port={node} --object-manager-port={objects}"
        " --num-cpus=1 --num-gpus=0 --object-store-memory=100000000"
        " --include-dashboard=true --disable-usage-stats"
    )
    log = (root / "ray-start.log").open("wb")
    proc = subprocess.Popen(
        ["bash", "-c", command],
        env=clean_env(home),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started = Head(
        token, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", f"127.0.0.1:{client}", root
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while http(f"{started.dashboard}/api/jobs/", token=token)[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the head did not start:\n{(root / 'ray-start.log').read_text()}")
            time.sleep(0.5)
        yield started
    finally:
        stop_started(proc, marker=str(root))
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir()
    )


# --------------------------------------------------------------------------- jobs


def test_a_job_needs_the_token(head: Head):
    jobs = f"{head.dashboard}/api/jobs/"
    owned = head.root / "owned"  # what an attacker's job would leave behind
    attack = {"entrypoint": f"touch {owned}"}
    # The job server's HTTP API, as anyone who reaches the port would call it.
    assert http(jobs, "POST", None, attack)[0] == 401
    assert http(jobs, "POST", secrets.token_hex(32), attack)[0] == 403
    assert http(jobs, "GET")[0] == 401  # nor may it list or read jobs

    # Ray's own CLI on a machine without the token, then with a wrong one.
    nobody = head.root / "nobody"
    nobody.mkdir()
    submit = [str(RAY), "job", "submit", "--address", head.dashboard]
    refused = run([*submit, "--no-wait", "--", "touch", str(owned)], clean_env(nobody))
    assert refused.returncode != 0
    assert "Authentication required" in refused.stdout + refused.stderr
    wrong = clean_env(nobody, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    refused = run([*submit, "--no-wait", "--", "touch", str(owned)], wrong)
    assert refused.returncode != 0
    assert "Authentication failed" in refused.stdout + refused.stderr

    # The operator's way (docs/operations.md): the token file named by RAY_AUTH_TOKEN_PATH.
    token_file = head.root / "operator-token"
    token_file.write_text(f"{head.token}\n")
    operator = clean_env(nobody, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    marker = secrets.token_hex(8)
    accepted = run([*submit, "--", "python", "-c", f"print('ran {marker}')"], operator, 120)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert f"ran {marker}" in accepted.stdout

    status, listing = http(jobs, token=head.token)
    assert status == 200
    (job,) = json.loads(listing)  # the refused submissions left nothing
    assert marker in job["entrypoint"] and job["status"] == "SUCCEEDED"
    assert not owned.exists()


# --------------------------------------------------------------------------- Ray calls

DRIVER = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("answer", ray.get(ray.remote(lambda: 6 * 7).remote(), timeout=60))
"""


def test_a_driver_needs_the_token(head: Head):
    nobody = head.root / "driver"
    nobody.mkdir(exist_ok=True)
    driver = [sys.executable, "-c", DRIVER, head.gcs]
    quick = {"RAY_gcs_server_port_wait_time_s": "2"}  # give up after 2 refusals, not 20
    for env in (
        clean_env(nobody, **quick),
        clean_env(nobody, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), **quick),
    ):
        refused = run(driver, env)
        assert refused.returncode != 0 and "answer" not in refused.stdout
        assert "Unauthenticated" in refused.stderr and "InvalidAuthToken" in refused.stderr
    accepted = run(driver, clean_env(nobody, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token))
    assert accepted.returncode == 0, accepted.stderr
    assert "answer 42" in accepted.stdout


def test_the_ray_client_server_needs_the_token(head: Head):
    with grpc.insecure_channel(head.client_server) as channel:
        stub = ray_client_pb2_grpc.RayletDriverStub(channel)
        ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
        for metadata in ((), (("authorization", f"Bearer {secrets.token_hex(32)}"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ClusterInfo(ping, metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = stub.ClusterInfo(
            ping, metadata=(("authorization", f"Bearer {head.token}"),), timeout=10
        )
        assert answer.json  # {} for a ping: the call went through


def test_a_worker_without_the_token_does_not_start(head: Head):
    """cluster.yaml's worker start command, on a node whose token is missing: it must fail
    closed (before the fix, the worker started without auth and joined an open head)."""
    config = cluster_config()
    command = start_command(config["worker_start_ray_commands"], "worker")
    assert "--address=$RAY_HEAD_IP:6379" in command
    command = command.replace("$RAY_HEAD_IP:6379", head.gcs) + " --block --num-cpus=0"
    node = head.root / "worker-home"
    node.mkdir()
    proc = subprocess.Popen(
        ["bash", "-c", command],
        env=clean_env(node),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker start command started without a token")
    finally:
        stop_started(proc)
    assert proc.returncode != 0
    assert "no authentication token was found" in output


# --------------------------------------------------------------------------- TLS

SERVE = """
import json, sys, ray
from ray import serve
ray.init(address=sys.argv[1], log_to_driver=False)
serve.start(http_options=json.loads(sys.argv[2]))

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Echo:
    async def __call__(self, request):
        return "key received" if request.headers.get("authorization") else "no key"

serve.run(Echo.bind(), route_prefix="/")
"""


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (what `openssl req -x509` in docs/operations.md makes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


def test_the_serving_port_answers_https_only(head: Head):
    """gpu.yaml's http_options on a real Serve proxy: HTTPS with the certificate; a request
    sent in clear text (a key in its Authorization header) is never answered."""
    deploy = yaml.safe_load((ROOT / "serve_configs" / "gpu.yaml").read_text())
    options = dict(deploy["http_options"])
    assert options["ssl_certfile"] and options["ssl_keyfile"]
    tls = head.root / "tls"
    tls.mkdir()
    cert, key = self_signed(tls)
    port = free_port()
    options.update(host="127.0.0.1", port=port, ssl_certfile=str(cert), ssl_keyfile=str(key))
    env = clean_env(head.root / "home", RAY_AUTH_MODE="token")
    started = run([sys.executable, "-c", SERVE, head.gcs, json.dumps(options)], env, 120)
    assert started.returncode == 0, started.stderr[-3000:]

    trusted = ssl.create_default_context(cafile=str(cert))
    key_header = secrets.token_hex(16)  # stands for an API key
    assert http(f"https://127.0.0.1:{port}/", token=key_header, context=trusted) == (
        200,
        "key received",
    )
    status, text = http(f"http://127.0.0.1:{port}/", token=key_header)
    assert status == 0, (status, text)  # no HTTP answer to clear text
    untrusted = ssl.create_default_context()  # the system's CAs: not this self-signed cert
    assert http(f"https://127.0.0.1:{port}/", token=key_header, context=untrusted)[0] == 0
