"""Documents and their validation: the ingest boundary.

Validation is all or nothing. :func:`validate_records` checks every record, collects
every problem with its location, and raises one :class:`InvalidDocument` naming them
all; only a fully valid input yields documents. Inner code trusts what comes out.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from adapterswap.catalog.readers import RawRecord
from adapterswap.config import GROUP_PATTERN, IngestSettings
from adapterswap.errors import InvalidDocument

GROUP_RE = re.compile(GROUP_PATTERN)
# Ids appear in URLs (/v1/documents/{id}) and file names, so they stay URL-safe.
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
ALLOWED_FIELDS = ("id", "text", "group", "batch", "metadata")
BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class Document:
    """A validated document, not yet placed in a shard."""

    id: str
    text: str
    group: str
    batch: str | None
    metadata: str  # canonical JSON object text
    content_hash: str
    where: str

    @property
    def tokens(self) -> int:
        return estimate_tokens(self.text)


def estimate_tokens(text: str) -> int:
    """A tokenizer-free size estimate (≈4 UTF-8 bytes per BPE token for English prose).

    Shard sizing only needs a stable, cheap bound, not the base model's exact count.
    """
    return max(1, math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN))


def content_hash(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_name(value: Any, field: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field '{field}' must be a string, got {type(value).__name__}")
    if not pattern.fullmatch(value):
        raise ValueError(
            f"field '{field}': {value[:80]!r} is not a valid {field} name "
            f"(must match {pattern.pattern})"
        )
    return value


def _check_id(value: Any, limits: IngestSettings) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field 'id' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("field 'id' is empty")
    if len(value) > limits.max_id_chars:
        raise ValueError(
            f"field 'id' is {len(value)} characters, over the limit of {limits.max_id_chars}"
        )
    if not ID_RE.fullmatch(value):
        raise ValueError(
            f"field 'id': {value[:80]!r} has characters outside letters, digits and ._:@- "
            "(or does not start with a letter or digit)"
        )
    return value


def _check_text(value: Any, limits: IngestSettings, max_tokens: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field 'text' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError("field 'text' is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "field 'text' contains characters that cannot be encoded as UTF-8 "
            "(a lone surrogate escape?)"
        ) from None
    if len(value) > limits.max_doc_chars:
        raise ValueError(
            f"field 'text' is {len(value)} characters, over ingest.max_doc_chars={limits.max_doc_chars}"
        )
    tokens = estimate_tokens(value)
    if tokens > max_tokens:
        raise ValueError(
            f"field 'text' is ~{tokens} tokens, over sharding.max_shard_tokens={max_tokens}: "
            "split the document"
        )
    return value


def _check_metadata(value: Any) -> str:
    if value is None:
        return "{}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"field 'metadata' is not valid JSON: {exc.msg}") from None
    if isinstance(value, list) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        value = dict(value)  # a Parquet map column
    if not isinstance(value, dict):
        raise ValueError(f"field 'metadata' must be a JSON object, got {type(value).__name__}")
    try:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"field 'metadata' is not JSON-serialisable: {exc}") from None
    try:
        text.encode("utf-8")  # the catalog stores UTF-8: a lone surrogate would fail there
    except UnicodeEncodeError:
        raise ValueError(
            "field 'metadata' contains characters that cannot be encoded as UTF-8 "
            "(a lone surrogate escape?)"
        ) from None
    return text


def validate_record(
    record: RawRecord,
    *,
    limits: IngestSettings,
    max_tokens: int,
    group: str | None = None,
    batch: str | None = None,
) -> Document:
    """Validate one record; raise ValueError naming the field and the problem.

    ``group`` and ``batch`` are defaults from the command line. A record that names a
    different group than ``group`` is an error rather than silently overridden.
    """
    fields = record.fields
    unknown = sorted(set(fields) - set(ALLOWED_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(ALLOWED_FIELDS)}"
        )
    for name in ("id", "text"):
        if fields.get(name) is None:
            raise ValueError(f"missing field '{name}'")
    record_group = fields.get("group")
    if record_group is None and group is None:
        raise ValueError("missing field 'group' (give it in the record or with --group)")
    if record_group is not None and group is not None and record_group != group:
        raise ValueError(f"field 'group' is {record_group!r} but --group says {group!r}")
    record_batch = fields.get("batch", batch)
    text = _check_text(fields["text"], limits, max_tokens)
    return Document(
        id=_check_id(fields["id"], limits),
        text=text,
        group=_check_name(record_group if record_group is not None else group, "group", GROUP_RE),
        batch=None if record_batch is None else _check_name(record_batch, "batch", GROUP_RE),
        metadata=_check_metadata(fields.get("metadata")),
        content_hash=content_hash(text),
        where=record.where,
    )


def validate_records(
    records: Iterable[RawRecord],
    *,
    existing_ids: Mapping[str, Any] | set[str],
    limits: IngestSettings,
    max_tokens: int,
    group: str | None = None,
    batch: str | None = None,
    problems: Iterable[str] = (),
    refuse: Callable[[Document], str | None] | None = None,
) -> list[Document]:
    """Validate a whole input. Returns every document, or raises InvalidDocument listing all problems.

    ``problems`` carries what the readers already found (undecodable lines and the like).
    ``refuse`` says why a valid document cannot be accepted now (None: it can), e.g. its id
    is still being deleted.
    """
    found = list(problems)
    docs: list[Document] = []
    first_seen: dict[str, str] = {}
    for record in records:
        try:
            doc = validate_record(
                record, limits=limits, max_tokens=max_tokens, group=group, batch=batch
            )
        except ValueError as exc:
            found.append(f"{record.where}: {exc}")
            continue
        if doc.id in first_seen:
            found.append(
                f"{record.where}: duplicate id {doc.id!r}, first seen at {first_seen[doc.id]}"
            )
            continue
        first_seen[doc.id] = record.where
        if doc.id in existing_ids:
            found.append(f"{record.where}: id {doc.id!r} already exists in the catalog")
            continue
        reason = refuse(doc) if refuse is not None else None
        if reason is not None:
            found.append(f"{record.where}: {reason}")
            continue
        docs.append(doc)
    if not found and not docs:
        found.append("no documents in the input")
    if found:
        raise InvalidDocument(found)
    return docs
