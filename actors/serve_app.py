"""``build_app``: the Serve application for ``serve run`` / ``serve deploy`` and ``adapterswap serve``.

Serve YAML (``serve_configs/``) names it with ``import_path: actors.serve_app:build_app``;
its ``args`` are validated into :class:`ServeAppArgs` first, settings included, so a bad
field fails the build with its name. The deployments themselves are ordinary classes
(``actors.deployments``); this module applies ``serve.deployment`` to them, with the
resources and scaling the configuration asks for. Importing it starts nothing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from actors.deployments import IngressDeployment, ModelDeployment
from adapterswap.config import AdapterSwapConfig, load_config
from adapterswap.errors import ConfigError


class ServeAppArgs(BaseModel):
    """``args:`` of the Serve application (serve_configs/*.yaml)."""

    model_config = ConfigDict(extra="forbid")

    home: str | None = Field(None, description="AdapterSwap home (default: ADAPTERSWAP_HOME).")
    config_file: str | None = Field(
        None, description="YAML config file (default: <home>/config.yaml when it exists)."
    )
    config: AdapterSwapConfig = Field(
        default_factory=AdapterSwapConfig,
        description="Settings over the home's, nested by section as in a config file, e.g. "
        "{model: {spec: embedded}, serve: {max_batch_size: 32}}. Only the fields given apply.",
    )
    num_replicas: int | None = Field(
        None, ge=1, description="Fixed model replicas (no autoscaling)."
    )
    autoscaling: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config for the model."
    )


def validate_args(args: dict[str, Any] | None) -> ServeAppArgs:
    """``args`` as :class:`ServeAppArgs`; ConfigError naming each bad field otherwise."""
    try:
        return ServeAppArgs.model_validate(args or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid Serve application args: {problems}") from None


def resolve_config(settings: ServeAppArgs) -> AdapterSwapConfig:
    """The home's configuration (file, environment) with the fields ``settings.config`` gives
    laid over it, section by section."""
    base = load_config(settings.config_file, home=settings.home)
    given = settings.config.model_dump(exclude_unset=True)
    update = {
        name: getattr(base, name).model_copy(update=value)
        if isinstance(getattr(base, name), BaseModel)
        else value
        for name, value in given.items()
    }
    return base.model_copy(update=update)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application (args: :class:`ServeAppArgs`): the ingress over the model."""
    settings = validate_args(args)
    config = resolve_config(settings)
    scaling: dict[str, Any] = (
        {"num_replicas": settings.num_replicas}
        if settings.num_replicas
        else {"autoscaling_config": settings.autoscaling or {"min_replicas": 1, "max_replicas": 1}}
    )
    resources: dict[str, Any] = {
        "num_cpus": config.ray.replica_num_cpus,
        "num_gpus": config.ray.replica_num_gpus,
    }
    if config.ray.replica_resources:
        resources["resources"] = dict(config.ray.replica_resources)
    if config.ray.max_replicas_per_node:
        scaling["max_replicas_per_node"] = config.ray.max_replicas_per_node
    # A model replica takes what its engine runs and queues; each caller (the ingress
    # replicas' handles) queues no more than that before answering 503 (BackPressureError).
    serve_settings = config.serve
    model = serve.deployment(
        ModelDeployment,
        name="Model",
        ray_actor_options=resources,
        max_ongoing_requests=serve_settings.max_batch_size + serve_settings.max_queued_requests,
        max_queued_requests=serve_settings.max_queued_requests,
        **scaling,
    )
    ingress = serve.deployment(
        serve.ingress()(IngressDeployment),
        name="Ingress",
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=256,
    )
    payload = config.model_dump()
    return ingress.bind(model.bind(payload), payload)
