"""A user's mistake gets one line ``error: ...`` naming the fix and exit 1 (2 for wrong usage),
never a traceback. Two run the real ``adapterswap`` entry point as a subprocess, as a user runs
it; the rest call ``main`` (which is what that entry point runs). No Ray here: every mistake
below is caught before Ray would start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from support import free_port

from adapterswap.cli import main as cli_main


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)


def adapterswap(home: Path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m adapterswap --home HOME ARGV`` with no Ray address of this process."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run(
        [sys.executable, "-m", "adapterswap", "--home", str(home), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
        check=False,
    )


def one_line_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The single ``error: ...`` line a failed command printed (and nothing else)."""
    return _one_line(proc.returncode, proc.stdout, proc.stderr, code)


def run_main(capsys, home: Path, *argv: str, code: int = 1) -> str:
    """``main(--home HOME ARGV)`` in this process; its one error line."""
    returned = cli_main.main(["--home", str(home), *argv])
    out, err = capsys.readouterr()
    return _one_line(returned, out, err, code)


def _one_line(returned: int, out: str, err: str, code: int) -> str:
    assert returned == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    return lines[0]


@pytest.fixture
def forget_files(tmp_path: Path) -> list[str]:
    source, controls = tmp_path / "deleted.jsonl", tmp_path / "controls.jsonl"
    source.write_text(json.dumps({"id": "d1", "text": "Dock 4 opens at 6 am.", "group": "ops"}))
    controls.write_text(json.dumps({"id": "c1", "text": "Dock 9 opens at 8 am.", "group": "ops"}))
    return ["verify-forget", "d1", "--source", str(source), "--controls-file", str(controls)]


class _RefusesKeys(BaseHTTPRequestHandler):
    """An AdapterSwap server's answer to an unknown key."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps({"error": {"message": "invalid API key", "type": "authentication_error"}})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def key_refusing_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _RefusesKeys)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_server_not_running(tmp_path, forget_files):
    url = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(adapterswap(tmp_path, *forget_files, "--url", url, "--key", "k"))
    assert f"no AdapterSwap server answers at {url}" in line
    assert "adapterswap serve" in line and "--url" in line


def test_wrong_key(capsys, tmp_path, forget_files, key_refusing_server):
    line = run_main(capsys, tmp_path, *forget_files, "--url", key_refusing_server, "--key", "wrong")
    assert "invalid API key" in line and "HTTP 401" in line
    assert "adapterswap keys create" in line and "--key" in line


def test_missing_key_is_a_usage_error(capsys, tmp_path, forget_files, monkeypatch):
    monkeypatch.delenv("ADAPTERSWAP_API_KEY", raising=False)
    line = run_main(capsys, tmp_path, *forget_files, code=2)
    assert "--key" in line and "ADAPTERSWAP_API_KEY" in line


def test_serve_on_a_port_in_use(capsys, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        line = run_main(capsys, tmp_path, "serve", "--port", str(port))
    assert f"127.0.0.1:{port} is in use" in line and "--port" in line


def test_serve_with_a_metrics_port_in_use(capsys, tmp_path, monkeypatch):
    import actors.serve_run as serve_run

    monkeypatch.setattr(serve_run, "read_ray_address", lambda: None)  # Ray would start here
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        metrics = held.getsockname()[1]
        line = run_main(
            capsys,
            tmp_path,
            "serve",
            "--port",
            str(free_port()),
            "--set",
            f"ray.metrics_export_port={metrics}",
        )
    assert f"ray.metrics_export_port: port {metrics} is in use" in line


def test_serve_with_a_misspelt_model_spec_fails_before_ray_starts(tmp_path):
    # A cluster address where nothing answers: had Ray been started, the error would say so.
    proc = adapterswap(
        tmp_path,
        "serve",
        "--port",
        str(free_port()),
        "--set",
        "model.spec=embeded",
        RAY_ADDRESS=f"127.0.0.1:{free_port()}",
    )
    line = one_line_error(proc)
    assert line.startswith("error: model.spec: 'embeded'") and "did you mean 'embedded'" in line


@pytest.mark.parametrize(
    "spec, named",
    [
        ("./no/such/model", "does not exist"),
        ("someone/not-cached-model", "not in the local Hugging Face cache"),
    ],
)
def test_serve_with_a_model_spec_that_does_not_resolve(capsys, tmp_path, monkeypatch, spec, named):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")  # as above
    line = run_main(capsys, tmp_path, "serve", "--set", f"model.spec={spec}")
    assert line.startswith("error: model.spec") and named in line and "tiny-random" in line


def test_train_without_an_address_trains_here(capsys, tmp_path, monkeypatch):
    """No RAY_ADDRESS, no --address, no ray.address: nothing is submitted anywhere."""
    import actors.job_submission as job_submission

    monkeypatch.setattr(job_submission, "JobSubmissionClient", None)  # any use would fail
    assert cli_main.main(["--home", str(tmp_path), "train"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out and "submitted" not in out


def test_train_inside_a_ray_job_trains_there(capsys, tmp_path, monkeypatch):
    """`ray job submit -- adapterswap train`: Ray names its cluster in RAY_ADDRESS, and the
    job trains where it runs instead of submitting another job."""
    import actors.job_submission as job_submission

    monkeypatch.setattr(job_submission, "JobSubmissionClient", None)  # any use would fail
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert cli_main.main(["--home", str(tmp_path), "train"]) == 0
    assert "nothing to train" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["--address", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"])
def test_train_told_an_address_where_nothing_answers(capsys, tmp_path, monkeypatch, where):
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["train"]
    if where == "--address":
        argv += ["--address", url]
    else:
        monkeypatch.setenv(where, url)
    line = run_main(capsys, tmp_path, *argv)
    assert f"no Ray job server answers at {url} (from {where}" in line and "--wait" in line


def test_delete_told_an_address_where_nothing_answers_revokes_nothing(
    capsys, tmp_path, monkeypatch
):
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"id": "d1", "text": "Dock 4 opens at 6 am.", "group": "ops"}))
    assert cli_main.main(["--home", str(tmp_path), "ingest", str(docs)]) == 0
    capsys.readouterr()
    url = f"http://127.0.0.1:{free_port()}"
    line = run_main(capsys, tmp_path, "delete", "d1", "--address", url)
    assert f"no Ray job server answers at {url} (from --address" in line
    assert cli_main.main(["--home", str(tmp_path), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["deletions"] == [] and status["documents"]["total"] == 1


def test_status_cluster_with_a_job_server_url_says_which_address_it_needs(
    capsys, tmp_path, monkeypatch
):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    line = run_main(capsys, tmp_path, "status", "--cluster")
    assert "RAY_ADDRESS 'http://127.0.0.1:8265' is a job server URL" in line
    assert "RAY_API_SERVER_ADDRESS" in line and "6379" in line


@pytest.mark.parametrize("argv", [["status", "--cluster"], ["serve"]])
def test_a_named_cluster_that_does_not_answer(capsys, tmp_path, monkeypatch, argv):
    """At once, where ray.init would retry for minutes and then exit the process."""
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    line = run_main(capsys, tmp_path, *argv)
    assert line.startswith(f"error: no Ray cluster answers at {address} (")
    assert "Connection refused" in line and "RAY_ADDRESS" in line


def test_a_bug_shows_one_line_and_keeps_the_traceback(capsys, monkeypatch, tmp_path):
    def broken(args, config):
        return {}["missing"]

    monkeypatch.setattr(cli_main, "load_handler", lambda name: broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cli_main.main(["status"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: unexpected KeyError: 'missing'")
    log = Path(err.rsplit("traceback in ", 1)[1].split()[0])
    assert log.parent == tmp_path
    assert "Traceback" in log.read_text() and "in broken" in log.read_text()
    with pytest.raises(KeyError):  # --debug: the traceback itself
        cli_main.main(["--debug", "status"])


def test_ctrl_c_exits_130_without_a_traceback(capsys, monkeypatch):
    def interrupted(args, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "load_handler", lambda name: interrupted)
    assert cli_main.main(["status"]) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"


# What Ray 2.60's job client raised against a head started with RAY_AUTH_MODE=token (run once
# by hand: ray start --head with a token, then JobSubmissionClient without / with a wrong one).
RAY_NO_TOKEN = (
    "Authentication required: Unauthorized: Missing authentication token\n\nToken "
    "authentication is enabled but no authentication token was found. Note: RAY_AUTH_MODE is "
    "currently 'disabled' (not 'token'). Ensure that the token for the cluster is available ..."
)
RAY_WRONG_TOKEN = (
    "Authentication failed: Forbidden: Invalid authentication token\n\nToken authentication "
    "is enabled but the authentication token is invalid or incorrect.. Ensure that ..."
)


RAY_TOKEN_NOT_FOUND = (
    "Token authentication is enabled but Ray couldn't find an authentication token. Create a "
    "token file at ~/.ray/auth_token, or store the token in any file and set ..."
)


@pytest.mark.parametrize(
    "mode, ray_says, problem",
    [
        (None, RAY_NO_TOKEN, "requires a token and none was sent"),
        ("token", RAY_TOKEN_NOT_FOUND, "requires a token and none was found"),
        ("token", RAY_WRONG_TOKEN, "refused the token it was sent"),
    ],
)
def test_a_cluster_refusing_the_token_is_one_line_with_the_fix(
    capsys, tmp_path, monkeypatch, mode, ray_says, problem
):
    from ray.exceptions import AuthenticationError

    import actors.job_submission as job_submission

    if mode is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)

    def refused(address):
        raise AuthenticationError(ray_says)

    monkeypatch.setattr(job_submission, "JobSubmissionClient", refused)
    line = run_main(capsys, tmp_path, "train", "--address", "http://10.0.0.5:8265")
    assert line == (
        f"error: the Ray cluster at http://10.0.0.5:8265 {problem}: export RAY_AUTH_MODE=token "
        "with the cluster's token in ~/.ray/auth_token, in the file RAY_AUTH_TOKEN_PATH names, "
        "or in RAY_AUTH_TOKEN"
    )
