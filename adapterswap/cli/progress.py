"""Progress bars for long work on the command line (stderr, hidden when it is not a terminal)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from adapterswap.types import Embed

EMBED_CHUNK = 256


def embed_with_progress(embed: Embed, desc: str = "embedding") -> Embed:
    """Wrap an embedder so that each call shows a bar advancing in chunks of documents."""

    def run(texts: Sequence[str]) -> np.ndarray:
        parts = []
        with tqdm(total=len(texts), desc=desc, unit="doc", file=sys.stderr, disable=None) as bar:
            for start in range(0, len(texts), EMBED_CHUNK):
                chunk = texts[start : start + EMBED_CHUNK]
                parts.append(embed(chunk))
                bar.update(len(chunk))
        return np.concatenate(parts)

    return run


class ShardProgressBars:
    """One bar per shard, fed with the step events Ray Train workers send back."""

    def __init__(self) -> None:
        self._bars: dict[str, tqdm] = {}

    def __call__(self, event: dict) -> None:
        shard = event["shard"]
        bar = self._bars.get(shard)
        if bar is None:
            bar = tqdm(
                total=event["max_steps"],
                desc=shard,
                unit="step",
                file=sys.stderr,
                disable=None,
                position=len(self._bars),
            )
            self._bars[shard] = bar
        bar.update(event["step"] - bar.n)
        bar.set_postfix(
            loss=f"{event['loss']:.3f}", tok_s=f"{event['tokens_per_s']:.0f}", refresh=False
        )

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
