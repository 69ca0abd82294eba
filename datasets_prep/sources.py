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
import re
import sysconfig
import zlib
from typing import Iterator
from urllib.parse import parse_qsl

from datasets_prep import storage

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
    """Parse `KIND:LOCATION?k=v&k=v`; unknown keys are errors that name the key."""
    head, _, query = text.partition("?")
    kind, _, location = head.partition(":")
    if kind == "s3":  # a bare s3:// URL means a directory of text unless told otherwise
        kind, location = "dir", head
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    allowed = {"glob", "domain"} | ({"max_mb"} if kind == "demo" else set())
    for key in options:
        if key not in allowed:
            raise ValueError(f"unknown key {key!r} in source {text!r}: allowed are {sorted(allowed)}")
    if "max_mb" in options:
        options["max_mb"] = float(options["max_mb"])
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

_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes \fB \fI \fR \f(CW \f[B]
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\*?\((..)"), lambda m: {"em": "--", "en": "-", "aq": "'", "dq": '"',
                                            "lq": '"', "rq": '"', "bu": "*", "co": "(c)",
                                            "rg": "(R)", "mi": "-", "pl": "+", "ti": "~",
                                            "ha": "^", "cq": "'", "oq": "'"}.get(m.group(1), "")),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[&|^%:]"), ""),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "),
]
_ROFF_BREAKS = {"PP", "LP", "P", "TP", "IP", "br", "sp", "HP", "RS", "RE", "SS", "SH", "nf", "fi",
                "EX", "EE", "in", "ti"}
_ROFF_TEXT_MACROS = {"B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "SH", "SS", "IP",
                     "TP", "UR", "MT", "Nm", "Nd", "Op", "Ar", "Fl"}


def strip_roff(source: str) -> str:
    """Plain text of a man page: macros become line breaks or their argument text, escapes go."""
    out: list[str] = []
    for line in source.split("\n"):
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            name, _, args = line[1:].strip().partition(" ")
            if name in _ROFF_TEXT_MACROS and args:
                text = args.replace('"', "")
                out.append(text.upper() if name == "SH" else text)
            elif name in _ROFF_BREAKS:
                out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    for pattern, replacement in _ROFF_ESCAPES:
        text = pattern.sub(replacement, text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _decode(raw: bytes, url: str) -> str | None:
    if url.endswith(".gz"):
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None  # not text we can round-trip exactly; counted as skipped by the caller


def read_item(item: Item) -> Iterator[Document]:
    """Documents of one item; files that are not UTF-8 text yield nothing."""
    text = _decode(storage.read_bytes(item.url), item.url)
    if text is None or "\x00" in text:
        return
    if item.kind == "man":
        if text.startswith(".so "):  # a redirect to another page, no content of its own
            return
        yield Document(strip_roff(text), item.domain or "text", item.url)
    elif item.kind == "dir":
        if text.strip():
            yield Document(text, item.domain or "text", item.url)
    elif item.kind == "jsonl":
        for line_number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                body = record["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{item.url}:{line_number}: not a JSON object with a 'text' field "
                                 f"({exc}); fix the record or drop the file") from None
            domain = record.get("domain", item.domain or "text")
            if domain not in DOMAINS:
                raise ValueError(f"{item.url}:{line_number}: unknown domain {domain!r}: use one of "
                                 f"{DOMAINS}")
            if body:
                yield Document(body, domain, f"{item.url}#{line_number}")
    else:
        raise ValueError(f"unknown item kind {item.kind!r}")
