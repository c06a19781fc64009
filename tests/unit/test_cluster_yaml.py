"""cluster.yaml is a valid Ray cluster launcher config that installs the project as the README does."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_validates_against_ray_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)  # raises jsonschema.ValidationError on any bad field
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith(
        "g5"
    )


def test_cluster_installs_with_the_readme_setup_command():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    readme = (ROOT / "README.md").read_text()
    assert any("make setup" in cmd for cmd in config["setup_commands"])
    assert "make setup" in readme
    # The store's state volume on the head outlives the instance.
    mappings = config["available_node_types"]["head"]["node_config"]["BlockDeviceMappings"]
    assert any(m["Ebs"].get("DeleteOnTermination") is False for m in mappings)
