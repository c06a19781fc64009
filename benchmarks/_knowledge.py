"""What the knowledge benchmarks share: training one adapter, composing adapters, and the
measure they all report, the perplexity of a document's second half given its first half.

Training is our trainer (``ShardTrainer``, the code a Ray Train worker runs) in this process,
and composition is our ``AdapterBank`` (the code a serving replica runs): the numbers are
about adapters, routing and composition, not about the orchestration around them.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS
from peft.utils import get_peft_model_state_dict

from adapterswap.compose.bank import AdapterBank
from adapterswap.compose.layer import find_target_linears
from adapterswap.config import LoraSettings, ModelSettings, RouterSettings, TrainingSettings
from adapterswap.models.base import LoadedModel, load_base_model
from adapterswap.models.embedder import Embedder
from adapterswap.route.router import Candidate, route
from adapterswap.route.stats import compute_shard_stats
from adapterswap.train.loop import ShardTrainer, pack_documents
from adapterswap.types import AdapterRef, AdapterStatus, AdapterVersion

MODEL_CACHE = Path("~/.adapterswap/models").expanduser()
Rows = list[tuple[AdapterRef, float]]


@dataclass(frozen=True)
class Adapter:
    """A trained adapter, in memory, with what training it cost."""

    ref: AdapterRef
    group: str
    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    seconds: float
    tokens: int

    def version(self) -> AdapterVersion:
        return AdapterVersion(
            self.ref.id,
            self.ref.version,
            self.ref.id,
            self.group,
            AdapterStatus.ACTIVE,
            "",
            0,
            "",
            "",
        )


def run_from_command_line(run: Callable[..., Any], doc: str, **options: tuple[type, Any]) -> None:
    """A knowledge benchmark's ``main``: parse the options and call
    ``run(corpus, out, spec=model, cache=model_cache, **options)``.

    Every knowledge benchmark takes ``--corpus``, ``--out``, ``--model`` and ``--model-cache``
    (the corpus is built there when absent; results go to ``--out``); ``options`` adds its
    own, ``name=(type, default)`` for ``--name``.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=RESULTS / "corpus")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--model-cache", type=Path, default=MODEL_CACHE)
    for name, (kind, default) in options.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    args = vars(parser.parse_args())
    corpus, out = args.pop("corpus"), args.pop("out")
    run(corpus, out, spec=args.pop("model"), cache=args.pop("model_cache"), **args)


def load_model(spec: str, cache_dir: Path = MODEL_CACHE) -> LoadedModel:
    """A fresh copy of the base model (training wraps the copy it is given in LoRA layers)."""
    return load_base_model(ModelSettings(spec=spec, device="cpu"), cache_dir)


def train_adapter(
    spec: str,
    ref: AdapterRef,
    group: str,
    texts: Sequence[str],
    training: TrainingSettings,
    *,
    seed: int,
    lora: LoraSettings | None = None,
    cache_dir: Path = MODEL_CACHE,
) -> Adapter:
    """Train one adapter on ``texts`` from the base model, as a shard's training run does."""
    loaded = load_model(spec, cache_dir)
    blocks = pack_documents(loaded.tokenizer, texts, training.seq_len)
    trainer = ShardTrainer(loaded.model, blocks, lora or LoraSettings(), training, seed=seed)
    started = time.perf_counter()
    while not trainer.done:
        trainer.step()
    return adapter_of(trainer, ref, group, time.perf_counter() - started)


def adapter_of(trainer: ShardTrainer, ref: AdapterRef, group: str, seconds: float) -> Adapter:
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    config = trainer.model.peft_config["default"].to_dict()
    return Adapter(ref, group, state, config, seconds, trainer.tokens_seen)


class System:
    """What serving does for a caller who holds every group: adapters in one bank, each with
    router statistics fitted from its own texts, routed and composed per prompt."""

    def __init__(
        self, spec: str, embedder: Embedder, capacity: int, *, cache_dir: Path = MODEL_CACHE
    ) -> None:
        lora = LoraSettings()
        self.embedder = embedder
        self.loaded = load_model(spec, cache_dir)
        targets = find_target_linears(self.loaded.model, lora.target_modules).values()
        slot = sum(lora.rank * (m.in_features + m.out_features) for m in targets)
        slot *= next(iter(targets)).weight.element_size()
        self.bank = AdapterBank(self.loaded.model, lora.target_modules, lora.rank, slot * capacity)
        self.candidates: list[Candidate] = []
        self._queries: dict[str, Any] = {}  # prompt -> embedding, as prompts recur across settings
        # Measures recur too (many settings route a prompt to the same mixture): memoised by
        # what the mixture is made of, each adapter by a hash of its weights.
        self._weights: dict[AdapterRef, str] = {}
        self._measured: dict[tuple, Any] = {}

    def add(self, adapter: Adapter, texts: Sequence[str]) -> None:
        """Serve ``adapter`` (replacing any version of the same id) with stats from ``texts``."""
        stats = compute_shard_stats(texts, self.embedder.embed, self.embedder.model_id)
        self.candidates = [c for c in self.candidates if c.version.adapter_id != adapter.ref.id]
        self.load(adapter)
        self.candidates.append(Candidate(adapter.version(), stats))

    def load(self, adapter: Adapter) -> None:
        """Load ``adapter`` into the bank only (not routed to), evicting its other versions."""
        for ref in self.bank.loaded():
            if ref.id == adapter.ref.id:
                self.bank.evict(ref)
        self.bank.load(adapter.ref, adapter.state, adapter.config)
        digest = hashlib.sha256()
        for name in sorted(adapter.state):
            digest.update(name.encode() + adapter.state[name].float().numpy().tobytes())
        self._weights[adapter.ref] = digest.hexdigest()

    def query(self, prompt: str) -> Any:
        """``prompt``'s embedding (memoised: prompts recur across settings)."""
        if prompt not in self._queries:
            self._queries[prompt] = self.embedder.embed([prompt])[0]
        return self._queries[prompt]

    def routed(self, prompt: str, settings: RouterSettings | None = None) -> Rows:
        """Our router's mixture for ``prompt``, default ``settings`` unless given."""
        decision = route(self.query(prompt), self.candidates, settings or RouterSettings())
        return [(a.ref, a.weight) for a in decision.adapters]

    def uniform_top3(self, prompt: str) -> Rows:
        """The paper's composition: the router's three best shards, averaged uniformly."""
        settings = RouterSettings(min_weight=0.0, min_score=-1.0, full_score=-1.0)
        ranked = route(self.embedder.embed([prompt])[0], self.candidates, settings, top_k=3)
        return [(a.ref, 1.0 / len(ranked.adapters)) for a in ranked.adapters]

    def nll(self, text: str, rows: Rows) -> float:
        """Second-half NLL of ``text`` given its first half, composed as ``rows``."""
        return self.answer_nll(*halves(text), rows)

    def answer_nll(self, prompt: str, answer: str, rows: Rows) -> float:
        """Mean NLL of ``answer``'s tokens after ``prompt``, composed as ``rows``."""
        tokenizer = self.loaded.tokenizer
        return self._memo(
            ("nll", prompt, answer),
            rows,
            lambda: conditional_nll(self.bank.model, tokenizer, prompt, answer),
        )

    def greedy(self, prompt: str, n_tokens: int, rows: Rows) -> str:
        """``n_tokens`` greedy tokens after ``prompt``, composed as ``rows``, as text."""
        return self._memo(
            ("greedy", prompt, n_tokens), rows, lambda: self._greedy(prompt, n_tokens)
        )

    @torch.no_grad()
    def _greedy(self, prompt: str, n_tokens: int) -> str:
        ids = self.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        start = len(ids)
        self.bank.model.eval()
        for _ in range(n_tokens):
            logits = self.bank.model(input_ids=torch.tensor([ids])).logits
            ids.append(int(logits[0, -1].argmax()))
        return self.loaded.tokenizer.decode(ids[start:])

    def _memo(self, what: tuple, rows: Rows, compute: Callable[[], Any]) -> Any:
        """``compute()`` under the mixture ``rows``, or its earlier result for the same mixture."""
        key = (what, tuple(sorted((self._weights[ref], weight) for ref, weight in rows)))
        if key not in self._measured:
            with self.bank.mixture([rows]):
                self._measured[key] = compute()
        return self._measured[key]

    def routed_nll(self, text: str) -> float:
        """Second-half NLL through the routed mixture chosen on the first half."""
        return self.nll(text, self.routed(halves(text)[0]))


def halves(text: str) -> tuple[str, str]:
    """A document's first half (the prompt) and second half (the target), split between words."""
    words = text.split()
    middle = len(words) // 2
    return " ".join(words[:middle]), " " + " ".join(words[middle:])


@torch.no_grad()
def conditional_nll(model: Any, tokenizer: Any, prompt: str, target: str) -> float:
    """Mean NLL (nats per token) of ``target``'s tokens given ``prompt``."""
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + answer])
    labels = ids.clone()
    labels[0, : len(context)] = -100
    model.eval()
    return float(model(input_ids=ids, labels=labels).loss)


def perplexity(nlls: Sequence[float]) -> float:
    """Perplexity over documents: exp of the mean per-token NLL."""
    return math.exp(statistics.mean(nlls))
