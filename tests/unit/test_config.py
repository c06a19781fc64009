from __future__ import annotations

import pytest

from adapterswap.config import AdapterSwapConfig, load_config
from adapterswap.errors import ConfigError


def test_defaults_are_documented_and_sane():
    config = load_config(environ={})
    assert config.model.spec == "embedded"
    assert config.lora.rank == 16
    assert "down_proj" in config.lora.target_modules
    assert config.storage.endswith("/storage")
    # Every field of every section carries a description (it is the documentation).
    for section in AdapterSwapConfig.model_fields.values():
        assert section.description or section.default_factory
    for name, field in AdapterSwapConfig.model_fields.items():
        sub = field.annotation
        if hasattr(sub, "model_fields"):
            for fname, f in sub.model_fields.items():
                assert f.description, f"{name}.{fname} has no description"


def test_layers_yaml_then_env_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 4\n  alpha: 8\nrouter:\n  top_k: 2\n")
    env = {"ADAPTERSWAP_LORA__RANK": "8", "ADAPTERSWAP_STORAGE_URI": "s3://b/p"}
    config = load_config(
        path, overrides=["lora.rank=32", "lora.target_modules=[q_proj, v_proj]"], environ=env
    )
    assert config.lora.rank == 32  # flag beats env beats file
    assert config.lora.alpha == 8  # file beats default
    assert config.router.top_k == 2
    assert config.storage == "s3://b/p"
    assert config.lora.target_modules == ["q_proj", "v_proj"]


def test_home_config_file_is_read(tmp_path):
    (tmp_path / "config.yaml").write_text("sharding:\n  strategy: sequential\n")
    config = load_config(home=str(tmp_path), environ={})
    assert config.sharding.strategy == "sequential"
    assert config.db_path == tmp_path.resolve() / "store.sqlite"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.rank=0"], r"lora\.rank: Input should be greater than or equal to 1"),
        (["lora.rnak=4"], r"lora\.rnak: Extra inputs are not permitted"),
        (
            ["sharding.strategy=random"],
            r"sharding\.strategy: Input should be 'topical' or 'sequential'",
        ),
        (["lora.rank"], r"expected section\.field=value"),
        (
            ["router.min_score=0.6"],
            r"router: .*full_score \(0\.4\) must be at least min_score \(0\.6\); set both",
        ),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides, environ={})


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", environ={})
