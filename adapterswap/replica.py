"""A model replica: one frozen base model, an adapter bank, generation and scoring. No Ray here.

The Ray Serve model deployment wraps this class; tests drive it directly. A replica serves a
batch of jobs, each with its own adapter mixture, in one forward per step:
``with bank.mixture(rows): generate_batch(...)``. Before every batch it syncs with the store's
epoch (a cheap read when nothing changed), so a revoked version is evicted before the replica
acknowledges the epoch that revoked it, and a job naming a version that is not active in
its view is refused rather than served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from adapterswap.active_set import ActiveSet, Snapshot
from adapterswap.adapter_source import StorageAdapterSource
from adapterswap.base_model import LoadedModel, hash_base_model, load_base_model
from adapterswap.compose import AdapterBank
from adapterswap.config import AdapterSwapConfig
from adapterswap.errors import InvalidArgument, NotFound, PayloadTooLarge
from adapterswap.generation import (
    GenerationRequest,
    GenerationResult,
    PromptScores,
    SamplingParams,
    TokenCallback,
    apply_chat_template,
    generate_batch,
    score_prompts,
)
from adapterswap.registry import AdapterRef

Mixture = tuple[tuple[AdapterRef, float], ...]


@dataclass(frozen=True)
class InferenceJob:
    """One request's work for a model replica: a prompt or a chat, sampling, its mixture.

    The replica tokenises (the ingress holds no tokenizer), so the prompt-length limit is
    enforced here: over ``serve.max_prompt_tokens`` is a PayloadTooLarge (HTTP 413).
    """

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    mixture: Mixture = ()


class ModelReplica:
    """One base model per replica, composing adapters per row of each batch."""

    def __init__(
        self,
        config: AdapterSwapConfig,
        snapshot: Snapshot,
        loaded: LoadedModel | None = None,
        epoch: Callable[[], int] | None = None,
    ) -> None:
        """``snapshot`` and ``epoch`` read the store (see :class:`ActiveSet`)."""
        self.loaded = loaded or load_base_model(config.model, config.model_cache_dir)
        self.tokenizer = self.loaded.tokenizer
        self.bank = AdapterBank.from_settings(self.loaded.model, config.lora, config.serve)
        base_hash = hash_base_model(config.model, config.model_cache_dir)
        self.source = StorageAdapterSource(config.storage, base_hash)
        self.active = ActiveSet(snapshot, self._drop, epoch)
        self.max_prompt_tokens = config.serve.max_prompt_tokens
        self.last_composition_ms = 0.0  # mixture setup of the latest batch (a metric)
        self._lock = threading.Lock()  # the bank holds one mixture at a time

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def _drop(self, keep: set[AdapterRef]) -> list[AdapterRef]:
        self.source.forget(keep)
        return self.bank.evict_all_except(keep)

    def sync(self) -> int:
        """Catch up with the store's epoch; returns the epoch now acknowledged."""
        return self.active.sync().epoch

    def prompt_ids(self, job: InferenceJob) -> list[int]:
        """Tokenise a job: the chat template for messages, the plain prompt otherwise."""
        if job.messages is not None:
            ids = apply_chat_template(self.tokenizer, list(job.messages))
        else:
            ids = self.tokenizer(job.prompt or "", add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise PayloadTooLarge(
                f"prompt is {len(ids)} tokens, over serve.max_prompt_tokens={self.max_prompt_tokens}"
            )
        if not ids:
            raise InvalidArgument("prompt: empty after tokenisation")
        return ids

    def _check_active(self, jobs: Sequence[InferenceJob]) -> None:
        wanted = {ref for job in jobs for ref, _ in job.mixture}
        if not wanted:
            return
        self.sync()
        for ref in sorted(wanted - self.active.refs()):
            raise NotFound(f"adapter {ref.id!r} version {ref.version} is not active")

    def generate(
        self, jobs: Sequence[InferenceJob], on_token: TokenCallback | None = None
    ) -> list[GenerationResult]:
        """Complete every job in one batch, each row with its own mixture."""
        requests = [GenerationRequest(self.prompt_ids(job), job.params) for job in jobs]
        with self._lock:
            self._check_active(jobs)
            started = time.perf_counter()
            with self.bank.mixture([list(job.mixture) for job in jobs], self.source.load):
                self.last_composition_ms = 1000 * (time.perf_counter() - started)
                return generate_batch(
                    self.loaded.model, self.tokenizer, requests, on_token=on_token
                )

    def score(self, jobs: Sequence[InferenceJob], top_logprobs: int = 0) -> list[PromptScores]:
        """Per-token log-probabilities of each job's prompt under its mixture (OpenAI echo).

        One job at a time: ``score_prompts`` regroups prompts into forwards by length, which
        would not keep a per-row mixture aligned with its row.
        """
        scores = []
        with self._lock:
            self._check_active(jobs)
            for job in jobs:
                with self.bank.mixture([list(job.mixture)], self.source.load):
                    scores += score_prompts(
                        self.loaded.model,
                        self.tokenizer,
                        [self.prompt_ids(job)],
                        top_logprobs=top_logprobs,
                    )
        return scores
