"""Corpus readers: local or s3:// directories filtered by glob, JSONL files, and the `demo` corpus.

A source is written as `KIND:LOCATION?key=value&...`, e.g.
    dir:/usr/lib/python3.11?glob=*.py&domain=code
    jsonl:s3://corpora/web?glob=*.jsonl&domain=text      (a record's own "domain" wins)
    demo?max_mb=4
Each source expands to a sorted list of Items (one file each). Items are grouped into
partitions of roughly `partition_bytes`; a partition is the unit of work of one Ray task.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import sysconfig
import zlib
from typing import Iterator
from urllib.parse import unquote

from core import storage
from datasets_prep.roff import strip_roff

DOMAINS = ("text", "code")
KINDS = ("dir", "jsonl", "demo", "man")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str
    location: str = ""
    glob: str | None = None
    domain: str | None = None
    max_mb: float = 8.0  # demo only

    def __post_init__(self):
        if self.kind not in ("dir", "jsonl", "demo"):
            raise ValueError(f"unknown source kind {self.kind!r}: use dir:, jsonl: or demo")
        if self.domain is not None and self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r} in source: use one of {DOMAINS}")
        if self.kind == "dir" and self.domain is None:
            raise ValueError(f"source dir:{self.location} needs a domain: add ?domain=text or "
                             f"?domain=code")
        if self.kind != "demo" and not self.location:
            raise ValueError(f"source {self.kind}: needs a location, e.g. {self.kind}:/data/corpus")
        if self.max_mb <= 0:
            raise ValueError(f"demo max_mb must be positive, got {self.max_mb}")


def parse_source(text: str) -> SourceSpec:
    """Parse `KIND:LOCATION?k=v&k=v`; unknown keys are errors that name the key.

    Values are %-decoded but '+' stays '+', because it is common in file names (`*.c++`).
    """
    head, _, query = text.partition("?")
    kind, _, location = head.partition(":")
    if kind == "s3":  # a bare s3:// URL is a dir: source (it still needs ?domain=)
        kind, location = "dir", head
    allowed = {"glob", "domain"} | ({"max_mb"} if kind == "demo" else set())
    options: dict[str, str] = {}
    for field in query.split("&") if query else []:
        key, equals, value = field.partition("=")
        if not equals:
            raise ValueError(f"source {text!r}: {field!r} is not key=value; write e.g. "
                             f"?glob=*.py&domain=code")
        if key not in allowed:
            raise ValueError(f"unknown key {key!r} in source {text!r}: allowed are {sorted(allowed)}")
        options[key] = unquote(value)
    if "max_mb" in options:
        try:
            options["max_mb"] = float(options["max_mb"])
        except ValueError:
            raise ValueError(f"source {text!r}: max_mb must be a number of megabytes, got "
                             f"{options['max_mb']!r}") from None
    if kind == "demo" and location:
        raise ValueError(f"source {text!r}: demo takes no location; write demo?max_mb=N")
    return SourceSpec(kind=kind, location=location, **options)


@dataclasses.dataclass(frozen=True)
class Item:
    """One input file. `kind` says how to turn it into documents."""

    kind: str  # "dir" (whole file is one document), "jsonl" (one per record), "man" (roff page)
    url: str
    domain: str | None
    size: int


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    domain: str
    doc_id: str


# ---------------------------------------------------------------------------------------------
# Expanding sources into items


def _file_items(kind: str, url: str, pattern: str | None, domain: str | None) -> list[Item]:
    items = []
    for file_url in storage.list_files(url, pattern):
        items.append(Item(kind=kind, url=file_url, domain=domain,
                          size=storage.stat(file_url).size))
    if not items:
        raise ValueError(f"source {kind}:{url} matched no files (glob={pattern!r})")
    return items


def _budgeted(paths: list[str], budget: int, kind: str, domain: str) -> list[Item]:
    """A deterministic, well-spread subset of `paths` up to `budget` bytes (order: crc32 of name)."""
    items, used = [], 0
    for path in sorted(paths, key=lambda p: (zlib.crc32(p.encode()), p)):
        try:
            size = os.path.getsize(path)
        except OSError:
            continue
        if size == 0 or size > 1_000_000 or used + size > budget:
            continue
        items.append(Item(kind=kind, url=path, domain=domain, size=size))
        used += size
    return sorted(items, key=lambda item: item.url)


def demo_items(max_mb: float) -> list[Item]:
    """A real mixed corpus from files on this machine: half code (stdlib .py), half prose."""
    budget = int(max_mb * 1024 * 1024) // 2
    stdlib = sysconfig.get_paths()["stdlib"]
    code = [os.path.join(d, f) for d, _, files in os.walk(stdlib) for f in files
            if f.endswith(".py") and "site-packages" not in d]
    prose_budget = budget
    man_pages = [os.path.join(d, f) for d, _, files in os.walk("/usr/share/man/man1")
                 for f in files if f.endswith(".gz")]
    docs = [os.path.join(d, f) for root in ("/usr/share/doc", "/usr/share/common-licenses")
            for d, _, files in os.walk(root) for f in files
            if f in ("copyright", "README", "NEWS") or f.endswith((".txt", ".md"))
            or root.endswith("licenses")]
    prose = _budgeted(man_pages, prose_budget // 2, "man", "text")
    prose += _budgeted(docs, prose_budget - sum(i.size for i in prose), "dir", "text")
    items = _budgeted(code, budget, "dir", "code") + prose
    if not items:
        raise ValueError("the demo corpus found no files: is the Python stdlib or /usr/share/doc "
                         "present on this machine?")
    return sorted(items, key=lambda item: item.url)


def expand(spec: SourceSpec) -> list[Item]:
    if spec.kind == "demo":
        return demo_items(spec.max_mb)
    return _file_items(spec.kind, spec.location, spec.glob, spec.domain)


def partition(items: list[Item], partition_bytes: int) -> list[list[Item]]:
    """Group items, in URL order, into partitions of about `partition_bytes` (deterministic)."""
    if partition_bytes <= 0:
        raise ValueError(f"partition_bytes must be positive, got {partition_bytes}")
    partitions: list[list[Item]] = []
    current: list[Item] = []
    size = 0
    for item in sorted(items, key=lambda item: (item.url, item.kind)):
        if current and size + item.size > partition_bytes:
            partitions.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        partitions.append(current)
    return partitions


# ---------------------------------------------------------------------------------------------
# Reading items into documents

def _decode(raw: bytes, url: str) -> str | None:
    if url.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{url} is not a valid gzip file ({exc}): re-compress or remove "
                             f"it") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None  # not text we can round-trip exactly; counted as skipped by the caller


def _jsonl_documents(text: str, item: Item) -> Iterator[Document]:
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{item.url}:{line_number}: not valid JSON ({exc}); fix the record or "
                             f"drop the file") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{item.url}:{line_number}: expected a JSON object with a string "
                             f"'text' field, got {line[:80]!r}; fix the record or drop the file")
        domain = record.get("domain", item.domain or "text")
        if domain not in DOMAINS:
            raise ValueError(f"{item.url}:{line_number}: unknown domain {domain!r}: use one of "
                             f"{DOMAINS}")
        if record["text"]:
            yield Document(record["text"], domain, f"{item.url}#{line_number}")


def read_item(item: Item) -> Iterator[Document]:
    """Documents of one item. Plain files that are not UTF-8 text yield nothing (a glob may catch
    binaries); a JSONL file that is not UTF-8 is an error, since it was named as a corpus."""
    text = _decode(storage.read_bytes(item.url), item.url)
    if item.kind == "jsonl":
        if text is None:
            raise ValueError(f"{item.url} is not UTF-8 text: JSONL corpora must be UTF-8; "
                             f"re-encode it (e.g. iconv -t utf-8) or narrow the glob")
        yield from _jsonl_documents(text, item)
        return
    if text is None or "\x00" in text:
        return
    if item.kind == "man":
        if text.startswith(".so "):  # a redirect to another page, no content of its own
            return
        yield Document(strip_roff(text), item.domain or "text", item.url)
    elif item.kind == "dir":
        if text.strip():
            yield Document(text, item.domain or "text", item.url)
    else:
        raise ValueError(f"unknown item kind {item.kind!r}")
