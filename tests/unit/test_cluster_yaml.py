"""cluster.yaml is a valid Ray cluster launcher config that installs the project as the README
does, and builds a cluster closed to the network: token auth on every node, the dashboard on
loopback, a firewall open to SSH and HTTPS serving only, TLS on the serving port."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from ray._private.authentication.authentication_token_setup import _get_default_token_path
from ray.autoscaler._private.aws.config import _create_default_inbound_rules
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import HTTPOptionsSchema

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


# --------------------------------------------------------------------------- closed to the network
# What tests/adversarial/test_cluster_token.py shows on a live head, asserted on the file itself.

SSH_USER_HOME = "/home/{user}"  # the home of cluster.yaml's ssh_user on the AMI (ubuntu)
SERVING_PORT = 8000


def _config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _ray_start(commands: list[str]) -> str:
    (command,) = [c for c in commands if re.search(r"/ray start\b", c)]
    return command


@pytest.mark.parametrize("kind", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_every_node_starts_ray_with_token_auth(kind):
    # Ray 2.60 turns token auth on by itself only when a token already exists: never rely on it.
    command = _ray_start(_config()[kind])
    assert re.search(r"(^|[;&]\s*)RAY_AUTH_MODE=token \S+/ray start\b", command), command


def test_one_token_reaches_every_node_where_ray_reads_it():
    config = _config()
    mounts = {dest: src for dest, src in config["file_mounts"].items() if "auth_token" in src}
    # Ray's default token path (~/.ray/auth_token), relative to the node's home.
    default = _get_default_token_path().relative_to(Path.home())
    assert mounts == {f"~/{default}": "~/.adapterswap-cluster/auth_token"}
    # Outside the project directory: `ray job submit --working-dir .` never uploads it.
    assert not Path(mounts[f"~/{default}"]).expanduser().resolve().is_relative_to(ROOT)
    setup = " ".join(config["setup_commands"])
    assert "test -s ~/.ray/auth_token" in setup and "chmod 600 ~/.ray/auth_token" in setup
    assert "export RAY_AUTH_MODE=token" in setup  # every Ray client on a node sends the token


def test_the_dashboard_listens_on_loopback_only():
    config = _config()
    head = _ray_start(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "0.0.0.0" not in command


def test_the_firewall_opens_ssh_and_the_serving_port_only():
    config = _config()
    group = config["provider"]["security_group"]
    assert group["GroupName"] == "adapterswap-cluster"
    # The rules Ray writes when it creates the group: its own plus the file's.
    rules = _create_default_inbound_rules({"sg-self"}, group["IpPermissions"])
    from_outside = {(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in rules if "IpRanges" in r}
    assert from_outside == {("tcp", 22, 22), ("tcp", SERVING_PORT, SERVING_PORT)}
    (inside,) = [r for r in rules if "IpRanges" not in r]
    assert inside["UserIdGroupPairs"] == [{"GroupId": "sg-self"}]  # node to node only


def test_the_serving_port_speaks_https_with_files_on_every_node():
    config = _config()
    deploy = yaml.safe_load((ROOT / "serve_configs" / "gpu.yaml").read_text())
    options = HTTPOptionsSchema.model_validate(deploy["http_options"])
    assert options.port == SERVING_PORT and deploy["proxy_location"] == "EveryNode"
    home = SSH_USER_HOME.format(user=config["auth"]["ssh_user"])
    mounted = {dest.replace("~", home, 1): src for dest, src in config["file_mounts"].items()}
    for path in (options.ssl_certfile, options.ssl_keyfile):
        assert path in mounted, f"{path} is not copied to the nodes by cluster.yaml"
        assert mounted[path].startswith("~/.adapterswap-cluster/")
    assert "chmod 600 ~/.ray/auth_token ~/adapterswap-tls/tls.key" in " ".join(
        config["setup_commands"]
    )
