"""Every serve_configs/*.yaml parses as a Serve config and its application builds (no deploy);
the builder's args are validated through the config models and laid over the home's."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from actors.serve_app import build_app
from adapterswap.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "serve_configs").glob("*.yaml"))


def _built(args: dict) -> tuple:
    """(ingress deployment, model deployment, the settings both were given)."""
    ingress = build_app(args)._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    (settings,) = model.init_args
    assert ingress.init_args[1] == settings
    return ingress, model, settings


def test_both_configs_exist():
    assert [p.name for p in CONFIGS] == ["gpu.yaml", "local.yaml"]


def _app_args(path: Path) -> dict:
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = schema.applications
    assert app.import_path == "actors.serve_app:build_app"
    assert "overrides" not in app.args  # structured settings, not dotted strings
    return app.args


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_builds(path, tmp_path):
    ingress, model, settings = _built({**_app_args(path), "home": str(tmp_path)})
    assert ingress.name == "Ingress" and model.name == "Model"
    assert settings["model"]["spec"] == "embedded"  # the default: the home has no config file
    assert settings["home"] == str(tmp_path)
    options = model.ray_actor_options
    if path.name == "gpu.yaml":
        assert (
            options["num_gpus"] == 1
            and model._deployment_config.autoscaling_config.max_replicas == 8
        )
        assert settings["serve"]["max_batch_size"] == 32
        # the engine's running rows and its queue; each caller queues no more than that
        assert model._deployment_config.max_ongoing_requests == 32 + 64
        assert model._deployment_config.max_queued_requests == 64
    else:
        assert options["num_gpus"] == 0 and 0 < options["num_cpus"] < 1


def test_bad_args_are_refused_with_the_field_named(tmp_path):
    with pytest.raises(ConfigError, match="replicas: Extra inputs"):
        build_app({"home": str(tmp_path), "replicas": 2})


@pytest.mark.parametrize(
    "config, field",
    [
        ({"serve": {"max_batch_sise": 4}}, "config.serve.max_batch_sise: Extra inputs"),
        ({"serve": {"max_batch_size": 0}}, "config.serve.max_batch_size: Input should be"),
        ({"modle": {"spec": "embedded"}}, "config.modle: Extra inputs"),
        ({"model": "embedded"}, "config.model: Input should be"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(tmp_path, config, field):
    with pytest.raises(ConfigError, match=field):
        build_app({"home": str(tmp_path), "config": config})


def test_settings_are_laid_over_the_homes_section_by_section(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "lora: {rank: 8}\nserve: {max_batch_size: 4, max_new_tokens: 7}\n"
    )
    _, model, settings = _built(
        {"home": str(tmp_path), "config": {"serve": {"max_batch_size": 16}}, "num_replicas": 2}
    )
    assert settings["serve"]["max_batch_size"] == 16  # given in args
    assert settings["serve"]["max_new_tokens"] == 7  # the home's, in the same section
    assert settings["lora"]["rank"] == 8  # the home's, in another section
    assert settings["serve"]["max_prompt_tokens"] == 2048  # the default, set by neither
    assert model._deployment_config.num_replicas == 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_model_comes_from_the_deployments_configuration(path, tmp_path, monkeypatch):
    """A Serve config never names the model: the home's config.yaml does, or the environment."""
    (tmp_path / "config.yaml").write_text("model: {spec: tiny-random, dtype: float32}\n")
    monkeypatch.setenv("ADAPTERSWAP_HOME", str(tmp_path))
    _, _, settings = _built(_app_args(path))
    assert settings["model"]["spec"] == "tiny-random"
    if path.name == "gpu.yaml":  # its one model setting: the dtype its GPUs want
        assert settings["model"]["dtype"] == "auto"
    else:
        assert settings["model"]["dtype"] == "float32"
    monkeypatch.setenv("ADAPTERSWAP_MODEL__SPEC", "embedded")
    assert _built(_app_args(path))[2]["model"]["spec"] == "embedded"
