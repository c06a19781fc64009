"""A second corpus of real facts: the metadata of the Python packages installed here, as prose.

    python benchmarks/packages.py --out DIR [--per-group 16] [--controls-per-group 8]

Each installed distribution with a summary, a short licence, an author and a Python
requirement becomes one document written in prose by a fixed template, in one of two groups
by its name (``packages-a-m`` and ``packages-n-z``). Nobody on the project wrote the facts;
the template only strings them together. Each document carries two facts (who wrote it,
its licence), each as the document's own words to continue and as a question phrased unlike
the document; the answer is the same.

The corpus directory holds ``documents.jsonl`` and ``controls.jsonl`` (never ingested, same
groups), both in the ingest format plus a ``facts`` list, and ``corpus.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from manpages import CorpusError

GROUPS = {"packages-a-m": "abcdefghijklm", "packages-n-z": "nopqrstuvwxyz"}


def describe(meta: Any) -> dict[str, Any] | None:
    """One distribution's document and facts, or None when its metadata lacks a field."""
    name, summary = meta.get("Name"), (meta.get("Summary") or "").strip()
    licence = (meta.get("License-Expression") or meta.get("License") or "").strip()
    author = re.sub(r"\s*<[^>]*>", "", meta.get("Author") or meta.get("Author-email") or "")
    author = author.split(",")[0].strip().strip('"')
    python = (meta.get("Requires-Python") or "").replace(" ", "")
    group = next((g for g, letters in GROUPS.items() if name and name[0].lower() in letters), None)
    if not (group and summary and author and python) or not 0 < len(licence) < 40:
        return None
    lead = f"{name} {meta.get('Version')} is a Python distribution. In its own words: {summary}"
    by, under = f"{lead} It was written by", " and is released under the"
    text = f"{by} {author}{under} {licence} license. It runs on Python {python}."
    facts = [
        {
            "continuation": by,
            "question": f"Question: Who is the author of the Python package {name}?\nAnswer:",
            "answer": f" {author}",
        },
        {
            "continuation": f"{by} {author}{under}",
            "question": f"Question: Which license applies to {name}?\nAnswer:",
            "answer": f" {licence}",
        },
    ]
    return {"id": name, "group": group, "text": text, "facts": facts}


def build(
    out: Path,
    per_group: int,
    controls_per_group: int,
    distributions: Iterable[Any] | None = None,
) -> dict[str, int]:
    """Write the corpus to ``out`` from ``distributions`` (default: the installed ones)."""
    dists = importlib.metadata.distributions() if distributions is None else distributions
    records = sorted(
        (r for r in (describe(d.metadata) for d in dists) if r), key=lambda r: r["id"].lower()
    )
    unique = list({r["id"].lower(): r for r in records}.values())
    documents, controls = [], []
    for group in GROUPS:
        rows = [r for r in unique if r["group"] == group]
        need = per_group + controls_per_group
        if len(rows) < need:
            raise CorpusError(
                f"group {group}: {len(rows)} packages with full metadata, need {need}"
            )
        # Every other package is a control, so the controls span the same names as the documents.
        controls += rows[1 : 2 * controls_per_group : 2]
        documents += [r for r in rows[:need] if r not in controls][:per_group]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("documents", documents), ("controls", controls)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {"documents": len(documents), "controls": len(controls)}
    meta = {"source": "importlib.metadata of this Python", "groups": list(GROUPS), **counts}
    (out / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-group", type=int, default=16)
    parser.add_argument("--controls-per-group", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        counts = build(args.out, args.per_group, args.controls_per_group)
    except CorpusError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.out}: {counts}")


if __name__ == "__main__":
    main()
