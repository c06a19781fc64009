"""Which Ray cluster a command uses, with each variable meaning what Ray 2.60 says it means, and
Ray's connection and token errors turned into one line that says how to fix them.

- ``RAY_ADDRESS``, the ``ray.address`` setting and ``--address`` name the cluster in the form
  ``ray.init``, ``ray status`` and ``serve run`` take: its GCS address (``host:6379``),
  ``ray://host:10001`` (Ray client) or ``auto`` (the cluster ``ray start`` started on this
  machine). ``--address`` wins, then ``RAY_ADDRESS`` (Ray sets it in every job it runs), then
  ``ray.address``.
- ``RAY_API_SERVER_ADDRESS`` is the cluster's job server (its dashboard), ``http://host:8265``,
  as ``ray job submit`` takes it. When it is unset, jobs go to the cluster named above, and Ray
  looks the job server up in that cluster's GCS, as ``ray job submit`` does.

A job server URL in ``RAY_ADDRESS`` (older Ray documentation said to export it for ``ray job
submit``) still works for submitting jobs. A command that joins the cluster as a driver refuses
it with the address it needs, as ``ray.init`` does.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from ray.exceptions import AuthenticationError

from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import ConfigError, NoCluster

JOB_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
CLUSTER_ENV = "RAY_ADDRESS"
# Set by Ray in the environment of every submitted job's entrypoint.
IN_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class NamedAddress(NamedTuple):
    """An address and where the user gave it (``--address``, ``RAY_ADDRESS``, ...)."""

    source: str
    address: str


def named_cluster(config: AdapterSwapConfig, given: str | None = None) -> NamedAddress | None:
    """The cluster the user named (``--address``, ``RAY_ADDRESS``, ``ray.address``), if any."""
    for source, address in (
        ("--address", given),
        (CLUSTER_ENV, os.environ.get(CLUSTER_ENV)),
        ("ray.address", config.ray.address),
    ):
        if address:
            return NamedAddress(source, address)
    return None


def named_job_server(config: AdapterSwapConfig, given: str | None = None) -> NamedAddress | None:
    """Where jobs go (``--address``, ``RAY_API_SERVER_ADDRESS``, the named cluster); None when
    the user named none: the command then works in its own process."""
    if not given and os.environ.get(JOB_SERVER_ENV):
        return NamedAddress(JOB_SERVER_ENV, os.environ[JOB_SERVER_ENV])
    return named_cluster(config, given)


def inside_ray_job() -> bool:
    """True in a submitted Ray job: its work is already on the cluster, it is not sent again."""
    return IN_RAY_JOB_ENV in os.environ


def driver_address(config: AdapterSwapConfig, given: str | None = None) -> str | None:
    """The address for ``ray.init``: the named cluster, or None (Ray's default: the cluster
    ``ray start`` started here, else a new local one). A job server URL is refused."""
    named = named_cluster(config, given)
    if named is None:
        return None
    if named.address.startswith(("http://", "https://")):
        raise ConfigError(
            f"{named.source} {named.address!r} is a job server URL, but this command joins the "
            "cluster with ray.init, which takes its GCS address (e.g. 10.0.0.5:6379, shown by "
            "`ray status` on the head), ray://HOST:10001 or auto; keep the URL in "
            f"{JOB_SERVER_ENV} for job submission"
        )
    return named.address


def joining(config: AdapterSwapConfig, given: str | None = None) -> AdapterSwapConfig:
    """``config`` with ``ray.address`` set to :func:`driver_address` for work done here."""
    ray = config.ray.model_copy(update={"address": driver_address(config, given)})
    return config.model_copy(update={"ray": ray})


def check_gcs_answers(address: str | None) -> None:
    """NoCluster at once when nothing listens at a ``host:port`` cluster address, where
    ``ray.init`` would retry for minutes and then exit the process."""
    if not address or "://" in address or address.count(":") != 1:
        return  # Ray's default, auto, ray:// or a form Ray itself will judge
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise NoCluster(
            f"no Ray cluster answers at {address} ({exc}); start it with `ray start --head` "
            "or name the running one in RAY_ADDRESS"
        ) from None


@contextmanager
def ray_errors(where: str) -> Iterator[None]:
    """Ray's token errors and failed connections to ``where`` as one-line errors with the fix."""
    try:
        yield
    except AuthenticationError as exc:
        raise ConfigError(token_fix(where, str(exc))) from None
    except (ConnectionError, SystemExit) as exc:  # ray.init exits when the GCS never answers
        if where == "auto":
            raise NoCluster(
                "no Ray cluster is running on this machine; start one with `ray start --head` "
                "or `adapterswap serve`, or name a running one in RAY_ADDRESS"
            ) from None
        reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise NoCluster(
            f"no Ray cluster answers at {where} ({reason}); start it with `ray start --head` or "
            "name the running one in RAY_ADDRESS; one with token authentication also needs "
            "RAY_AUTH_MODE=token"
        ) from None


def token_fix(where: str, message: str) -> str:
    """The one line for a refused token: what was sent and what to set."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        problem = "requires a token and none was sent"
    elif "couldn't find" in message:
        problem = "requires a token and none was found"
    else:
        problem = "refused the token it was sent"
    return (
        f"the Ray cluster at {where} {problem}: export RAY_AUTH_MODE=token with the cluster's "
        "token in ~/.ray/auth_token, in the file RAY_AUTH_TOKEN_PATH names, or in RAY_AUTH_TOKEN"
    )
