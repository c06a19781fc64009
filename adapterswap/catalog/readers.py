"""Read raw document records from JSONL, CSV and Parquet files.

Readers do not judge records; they only turn bytes into ``RawRecord`` values, each
tagged with where it came from (``file:line N`` or ``file:record N``) so that the
validator can name it. Bytes that cannot be decoded become ``problems`` instead of
exceptions, so one pass reports every bad line of every file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class RawRecord:
    """One input record before validation."""

    where: str
    fields: dict[str, Any]


@dataclass
class ReadResult:
    """Everything read from the inputs: the records, plus problems that stopped a record."""

    records: list[RawRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def detect_format(path: Path) -> str | None:
    """The input format of ``path`` from its suffix, or None when it is not one we read."""
    return FORMATS.get(path.suffix.lower())


def read_inputs(paths: list[Path]) -> ReadResult:
    """Read every file; unreadable files and undecodable records become problems."""
    result = ReadResult()
    for path in paths:
        fmt = detect_format(path)
        if fmt is None:
            allowed = ", ".join(sorted(FORMATS))
            result.problems.append(f"{path}: unsupported file type '{path.suffix}' ({allowed})")
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            result.problems.append(f"{path}: cannot read file: {exc.strerror or exc}")
            continue
        reader = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[fmt]
        for item in reader(path, data):
            if isinstance(item, RawRecord):
                result.records.append(item)
            else:
                result.problems.append(item)
    return result


def _undecodable(where: str, exc: UnicodeDecodeError) -> str:
    return (
        f"{where}: text is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
        f"{exc.start}); re-encode the file as UTF-8"
    )


def _read_jsonl(path: Path, data: bytes) -> Iterator[RawRecord | str]:
    for number, line in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _undecodable(where, exc)
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield f"{where}: not valid JSON: {exc.msg} (column {exc.colno})"
            continue
        if not isinstance(obj, dict):
            yield f"{where}: expected a JSON object, got {type(obj).__name__}"
            continue
        yield RawRecord(where, obj)


def _read_csv(path: Path, data: bytes) -> Iterator[RawRecord | str]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        yield _undecodable(f"{path}:{line}", exc)
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                yield f"{where}: more values than header columns ({', '.join(reader.fieldnames)})"
                continue
            # An empty CSV cell means "absent", as a missing key does in JSON.
            yield RawRecord(where, {k: v for k, v in row.items() if v not in ("", None)})
    except csv.Error as exc:
        yield f"{path}:{reader.line_num}: malformed CSV: {exc}"


def _read_parquet(path: Path, data: bytes) -> Iterator[RawRecord | str]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        yield f"{path}: not a readable Parquet file: {exc}"
        return
    columns: dict[str, list[Any]] = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            # Parquet does not guarantee valid UTF-8 in string columns: decode value by value.
            column = column.cast(pa.binary())
        columns[name] = column.to_pylist()
    for index in range(table.num_rows):
        where = f"{path}:record {index + 1}"
        fields: dict[str, Any] = {}
        bad = None
        for name, values in columns.items():
            value = values[index]
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad = _undecodable(f"{where}: field '{name}'", exc)
                    break
            if value is not None:
                fields[name] = value
        yield bad if bad else RawRecord(where, fields)
