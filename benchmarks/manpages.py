"""The evaluation corpus: Debian's manual pages, one access group per manual section.

    python benchmarks/manpages.py --out benchmarks/results/corpus [--per-group 48]

Real technical text that neither the project nor its authors wrote, with a natural label
(the section) for the access group, rendered locally from ``/usr/share/man`` by groff.
When the pages are missing, ``ensure_manpages`` installs Debian's ``manpages``,
``manpages-dev`` and ``groff-base`` with apt-get (root only; otherwise it says what to run).

Each sampled page becomes one document: its NAME line and the first words of its
DESCRIPTION. The passage that follows in the page is **held out** (never ingested) and is a
routing query whose source is that document's shard. More pages of each section, never
ingested, are the controls the removal benchmark compares deleted documents against.

The corpus directory holds three JSONL files, in the ingest format (``id``, ``group``,
``text``; queries add ``doc_id``): ``documents.jsonl``, ``queries.jsonl``, ``controls.jsonl``,
plus ``corpus.json`` describing how it was built.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
SECTIONS = {"2": "syscalls", "3": "library", "5": "formats", "7": "overview"}
DEBIAN_PACKAGES = ("manpages", "manpages-dev", "groff-base")
RENDER = ["groff", "-t", "-man", "-Tutf8", "-rHY=0", "-dAD=l", "-rLL=2000n", "-P", "-cbou"]
HEADING = re.compile(r"^[A-Z][A-Z0-9 ,/-]*$")


class CorpusError(RuntimeError):
    """The corpus cannot be built here; the message says why and what to do."""


@dataclass(frozen=True)
class Page:
    """One rendered manual page: ``open(2)``'s name line and description, as plain words."""

    name: str  # "open.2"
    section: str
    summary: str  # the NAME line: "open, openat, creat - open and possibly create a file"
    description: list[str]  # words


def ensure_manpages(root: Path = MAN_ROOT, sections: Sequence[str] = tuple(SECTIONS)) -> None:
    """Install the Debian packages the corpus needs when the pages or groff are missing."""
    missing = [s for s in sections if not any((root / f"man{s}").glob("*.gz"))]
    if not missing and shutil.which("groff"):
        return
    if root != MAN_ROOT:
        raise CorpusError(f"{root}: no manual pages for sections {', '.join(missing)}")
    command = ["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES]
    if shutil.which("apt-get") is None or not _is_root():
        raise CorpusError(
            f"manual pages or groff are missing; install them with: sudo {' '.join(command)}"
        )
    print("installing", " ".join(DEBIAN_PACKAGES), flush=True)
    subprocess.run(["apt-get", "update", "-q"], check=True)
    subprocess.run(command, check=True)


def _is_root() -> bool:
    return os.geteuid() == 0


def render(path: Path) -> str | None:
    """A page rendered to plain text, or None for a ``.so`` alias of another page."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    source = raw.decode("utf-8", errors="replace")
    body = [line for line in source.splitlines() if line.strip() and not line.startswith('.\\"')]
    if body and body[0].startswith(".so "):
        return None
    done = subprocess.run(RENDER, input=source, capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else None


def parse(name: str, section: str, text: str) -> Page | None:
    """NAME and DESCRIPTION of a rendered page; None when either is missing."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line and not line[0].isspace():
            current = blocks.setdefault(line.strip(), []) if HEADING.match(line.strip()) else None
        elif current is not None:
            current.append(line)
    summary = " ".join(" ".join(blocks.get("NAME", [])).split())
    description = " ".join(blocks.get("DESCRIPTION", [])).split()
    if not summary or not description:
        return None
    return Page(name, section, summary, description)


def pages(root: Path, section: str, rng: random.Random) -> Iterator[Page]:
    """The renderable pages of one section, in an order shuffled by ``rng`` (rendered lazily)."""
    paths = sorted((root / f"man{section}").glob("*"))
    rng.shuffle(paths)
    for path in paths:
        text = render(path)
        page = parse(path.name.removesuffix(".gz"), section, text) if text else None
        if page is not None:
            yield page


@dataclass(frozen=True)
class CorpusSpec:
    """How a corpus is cut from the pages; recorded in ``corpus.json``."""

    per_group: int = 48  # documents ingested per group
    controls_per_group: int = 8  # pages never ingested, per group
    doc_words: int = 160  # description words ingested per document, at most
    query_words: int = 40  # held-out words after them: the routing query
    min_words: int = 100  # pages with shorter descriptions are skipped
    seed: int = 0


def build(
    out: Path,
    spec: CorpusSpec,
    *,
    root: Path = MAN_ROOT,
    sections: dict[str, str] = SECTIONS,
) -> dict[str, int]:
    """Write the corpus to ``out``; returns the counts written."""
    out.mkdir(parents=True, exist_ok=True)
    documents, queries, controls = [], [], []
    rng = random.Random(spec.seed)
    for section, group in sections.items():
        need = spec.per_group + spec.controls_per_group
        long_enough = (p for p in pages(root, section, rng) if len(p.description) >= spec.min_words)
        usable = list(itertools.islice(long_enough, need))
        if len(usable) < need:
            raise CorpusError(
                f"section {section}: {len(usable)} pages with ≥ {spec.min_words} description "
                f"words, need {need} (per_group + controls_per_group)"
            )
        for page in usable[: spec.per_group]:
            ingested = min(spec.doc_words, len(page.description) - spec.query_words)
            documents.append(_record(page, group, page.description[:ingested]))
            held_out = page.description[ingested : ingested + spec.query_words]
            queries.append({"doc_id": page.name, "group": group, "text": " ".join(held_out)})
        for page in usable[spec.per_group : need]:
            controls.append(_record(page, group, page.description[: spec.doc_words]))
    for name, rows in (("documents", documents), ("queries", queries), ("controls", controls)):
        _write_jsonl(out / f"{name}.jsonl", rows)
    counts = {"documents": len(documents), "queries": len(queries), "controls": len(controls)}
    meta = {"source": f"{root} (groff)", "sections": sections, "spec": asdict(spec), **counts}
    (out / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    return counts


def _record(page: Page, group: str, words: Sequence[str]) -> dict[str, str]:
    section_title = f"{page.name.rsplit('.', 1)[0]}({page.section})"
    return {
        "id": page.name,
        "group": group,
        "text": f"{section_title}: {page.summary}. " + " ".join(words),
    }


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Corpus:
    """A built corpus, read back."""

    documents: list[dict[str, str]]
    queries: list[dict[str, str]]
    controls: list[dict[str, str]]

    @classmethod
    def load(cls, directory: Path) -> Corpus:
        missing = [
            n
            for n in ("documents", "queries", "controls")
            if not (directory / f"{n}.jsonl").exists()
        ]
        if missing:
            raise CorpusError(
                f"{directory}: no {', '.join(m + '.jsonl' for m in missing)}; "
                "build it with: python benchmarks/manpages.py --out " + str(directory)
            )
        return cls(
            *(read_jsonl(directory / f"{n}.jsonl") for n in ("documents", "queries", "controls"))
        )

    def groups(self) -> list[str]:
        return sorted({d["group"] for d in self.documents})


def ensure_corpus(directory: Path, spec: CorpusSpec | None = None) -> Corpus:
    """The corpus in ``directory``, built first (installing the pages if need be) when absent."""
    if not (directory / "corpus.json").exists():
        ensure_manpages()
        print(f"building the manual-page corpus in {directory}", flush=True)
        build(directory, spec or CorpusSpec())
    return Corpus.load(directory)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--root", type=Path, default=MAN_ROOT)
    for field, default in asdict(CorpusSpec()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=default)
    args = parser.parse_args(argv)
    spec = CorpusSpec(**{f: getattr(args, f) for f in asdict(CorpusSpec())})
    try:
        ensure_manpages(args.root)
        counts = build(args.out, spec, root=args.root)
    except CorpusError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {args.out}: {counts}")


if __name__ == "__main__":
    main()
