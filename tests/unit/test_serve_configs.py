"""Every serve_configs/*.yaml parses as a Serve config and its application builds (no deploy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from actors.serve_app import build_app

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "serve_configs").glob("*.yaml"))


def test_both_configs_exist():
    assert [p.name for p in CONFIGS] == ["gpu.yaml", "local.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_builds(path, tmp_path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = schema.applications
    assert app.import_path == "actors.serve_app:build_app"
    application = build_app({**app.args, "home": str(tmp_path)})
    ingress = application._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert ingress.name == "Ingress" and model.name == "Model"
    options = model.ray_actor_options
    if path.name == "gpu.yaml":
        assert (
            options["num_gpus"] == 1
            and model._deployment_config.autoscaling_config.max_replicas == 8
        )
    else:
        assert options["num_gpus"] == 0 and 0 < options["num_cpus"] < 1


def test_bad_args_are_refused_with_the_field_named(tmp_path):
    with pytest.raises(Exception, match="replicas"):
        build_app({"home": str(tmp_path), "replicas": 2})
