"""Corpus readers: directories of files, JSONL (plain, .gz, .zst), Parquet, Hugging Face datasets,
and the `demo` corpus, from local paths or s3:// prefixes.

A source is written as `KIND:LOCATION?key=value&...`, e.g.
    dir:/usr/lib/python3.11?glob=*.py&domain=code           (one document per file)
    jsonl:s3://corpora/web?glob=*.jsonl*&domain=text        (one per line; .gz/.zst by extension)
    parquet:/data/stack?glob=*.parquet&text_field=content&domain=code     (one per row)
    hf:/data/saved_dataset?split=train&text_field=text       (a `save_to_disk` folder)
    hf:HuggingFaceFW/fineweb-edu?config=sample-10BT&split=train       (a hub dataset)
    demo?max_mb=4
In record formats (jsonl, parquet, hf) `text_field` names the text (default "text") and a record's
own `domain_field` value (default "domain"; `domain_field=` with no value ignores it) wins over the
source's `domain`, which defaults to "text". docs/data.md has the full syntax.

Each source expands to a sorted list of Items (one file each; row ranges for hf datasets). Items are
grouped into partitions of roughly `partition_bytes`; a partition is the unit of work of one Ray task.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import sysconfig
import zlib
from typing import Iterable, Iterator
from urllib.parse import unquote

from core import storage
from datasets_prep.roff import strip_roff

DOMAINS = ("text", "code")
KINDS = ("dir", "jsonl", "parquet", "hf", "demo")
# Keys each kind accepts after "?" (anything else is an error naming the key).
_RECORD_KEYS = {"domain", "text_field", "domain_field"}
KEYS = {
    "dir": {"glob", "domain"},
    "jsonl": {"glob"} | _RECORD_KEYS,
    "parquet": {"glob"} | _RECORD_KEYS,
    "hf": {"split", "config"} | _RECORD_KEYS,
    "demo": {"max_mb"},
}
DEFAULT_GLOBS = {"parquet": "*.parquet"}  # a Spark/pandas output folder also holds _SUCCESS, .crc
# Rows of a Hugging Face dataset per item (a Ray task reads one or more items).
HF_ROWS_PER_ITEM = 50_000


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str
    location: str = ""
    glob: str | None = None
    domain: str | None = None
    max_mb: float = 8.0  # demo only
    text_field: str = "text"  # record formats: the field / column holding the document text
    domain_field: str = "domain"  # record formats: a per-record domain that wins; "" ignores it
    split: str | None = None  # hf only: which split (default "train" where there are splits)
    config: str | None = None  # hf hub datasets only: the configuration (subset) name

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown source kind {self.kind!r}: use dir:, jsonl:, parquet:, hf: "
                             f"or demo")
        if self.domain is not None and self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r} in source: use one of {DOMAINS}")
        if self.kind == "dir" and self.domain is None:
            raise ValueError(f"source dir:{self.location} needs a domain: add ?domain=text or "
                             f"?domain=code")
        if self.kind != "demo" and not self.location:
            raise ValueError(f"source {self.kind}: needs a location, e.g. {self.kind}:/data/corpus")
        if not self.text_field:
            raise ValueError(f"source {self.kind}:{self.location}: text_field= needs a field name, "
                             f"e.g. ?text_field=content")
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
    if kind not in KINDS:
        raise ValueError(f"unknown source kind {kind!r} in {text!r}: use dir:, jsonl:, parquet:, "
                         f"hf: or demo")
    allowed = KEYS[kind]
    options: dict = {}
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
    if kind in DEFAULT_GLOBS and "glob" not in options:
        options["glob"] = DEFAULT_GLOBS[kind]
    return SourceSpec(kind=kind, location=location, **options)


@dataclasses.dataclass(frozen=True)
class Item:
    """One input file (or, for a Hugging Face dataset, a range of its rows). `kind` says how to
    turn it into documents; the record options travel with it into the Ray task that reads it."""

    kind: str  # "dir" (whole file is one document), "jsonl", "parquet", "hf", "man" (roff page)
    url: str
    domain: str | None
    size: int
    text_field: str = "text"
    domain_field: str = "domain"
    split: str | None = None  # hf
    config: str | None = None  # hf hub datasets
    rows: tuple[int, int] | None = None  # hf: [start, end) of the selected split


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    domain: str
    doc_id: str


# ---------------------------------------------------------------------------------------------
# Expanding sources into items


def _file_items(spec: SourceSpec) -> list[Item]:
    items = []
    for file_url in storage.list_files(spec.location, spec.glob):
        items.append(Item(kind=spec.kind, url=file_url, domain=spec.domain,
                          size=storage.stat(file_url).size, text_field=spec.text_field,
                          domain_field=spec.domain_field))
    if not items:
        raise ValueError(f"source {spec.kind}:{spec.location} matched no files (glob={spec.glob!r})")
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
    if spec.kind == "hf":
        return _hf_items(spec)
    return _file_items(spec)


def partition(items: list[Item], partition_bytes: int) -> list[list[Item]]:
    """Group items, in URL order, into partitions of about `partition_bytes` (deterministic)."""
    if partition_bytes <= 0:
        raise ValueError(f"partition_bytes must be positive, got {partition_bytes}")
    partitions: list[list[Item]] = []
    current: list[Item] = []
    size = 0
    for item in sorted(items, key=lambda item: (item.url, item.kind, item.rows or (0, 0))):
        if current and size + item.size > partition_bytes:
            partitions.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        partitions.append(current)
    return partitions


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def _is_local_path(location: str) -> bool:
    return location.startswith(("/", ".", "~", "file://")) or os.path.exists(location)


def _hf_where(location: str, split: str | None) -> str:
    return f"{location} (split {split})" if split else location


@functools.lru_cache(maxsize=8)
def _load_hf(location: str, split: str | None, config: str | None):
    """The selected split of a `save_to_disk` folder or a hub dataset (cached per process: a Ray
    worker reading several row ranges of one dataset opens it once; folders are memory-mapped)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("hf: sources need the `datasets` package: pip install 'mmrec[data]' "
                         "(or pip install datasets)") from None
    if storage.is_s3(location):
        raise ValueError(f"hf:{location}: Hugging Face folders are read from local disk only; copy "
                         f"the folder here, or write it as Parquet (Dataset.to_parquet) and use "
                         f"parquet:{location}")
    if _is_local_path(location):
        path = os.path.expanduser(storage.local_path(location))
        if not os.path.isdir(path):
            raise storage.StorageNotFound(f"{location} is not a directory: hf: takes a folder "
                                          f"written by Dataset.save_to_disk, or a hub dataset name")
        if config is not None:
            raise ValueError(f"hf:{location}: config= selects a subset of a hub dataset; a "
                             f"save_to_disk folder has none, drop it")
        try:
            loaded = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"{location} is not a dataset folder written by save_to_disk ({exc}): "
                             f"write it with Dataset.save_to_disk, or use parquet:/jsonl: for "
                             f"plain files") from None
        if isinstance(loaded, datasets.DatasetDict):
            chosen = split or "train"
            if chosen not in loaded:
                raise ValueError(f"{location} has no split {chosen!r}: its splits are "
                                 f"{sorted(loaded)}; choose one with ?split=")
            return loaded[chosen]
        if split is not None and loaded.split is not None and str(loaded.split) != split:
            raise ValueError(f"{location} holds the {str(loaded.split)!r} split only, not "
                             f"{split!r}: drop ?split= or choose {str(loaded.split)!r}")
        return loaded
    try:
        return datasets.load_dataset(location, config, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - network, unknown name, auth: all fixed by the user
        raise ValueError(f"could not load the Hugging Face dataset {location!r} (config "
                         f"{config!r}, split {split or 'train'!r}): {type(exc).__name__}: {exc}; "
                         f"check the name, the network and HF_TOKEN, or save it with "
                         f"Dataset.save_to_disk and give that folder") from None


def _hf_items(spec: SourceSpec) -> list[Item]:
    location = spec.location
    if not storage.is_s3(location) and _is_local_path(location):
        location = os.path.abspath(os.path.expanduser(storage.local_path(location)))
    dataset = _load_hf(location, spec.split, spec.config)
    _check_columns(dataset.data.schema, spec.text_field, spec.domain_field,
                   _hf_where(spec.location, spec.split))
    rows = dataset.num_rows
    if rows == 0:
        raise ValueError(f"source hf:{spec.location} has no rows in split {spec.split or 'train'!r}")
    bytes_per_row = max(1, dataset.data.nbytes // max(1, len(dataset.data)))
    return [Item(kind="hf", url=location, domain=spec.domain,
                 size=bytes_per_row * (min(rows, start + HF_ROWS_PER_ITEM) - start),
                 text_field=spec.text_field, domain_field=spec.domain_field, split=spec.split,
                 config=spec.config, rows=(start, min(rows, start + HF_ROWS_PER_ITEM)))
            for start in range(0, rows, HF_ROWS_PER_ITEM)]


# ---------------------------------------------------------------------------------------------
# Reading items into documents


def _zstd_decompress(raw: bytes, url: str) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"{url}: reading .zst files needs the `zstandard` package: pip install "
                         f"'mmrec[data]' (or pip install zstandard)") from None
    out, rest = [], raw
    try:
        while True:  # one decompressor per frame: a file may hold several concatenated frames
            decompressor = zstandard.ZstdDecompressor().decompressobj()
            out.append(decompressor.decompress(rest))
            if not decompressor.eof:
                raise ValueError(f"{url} is not a valid zstd file (it ends inside a frame: "
                                 f"truncated?): re-compress or remove it")
            rest = decompressor.unused_data
            if not rest:
                return b"".join(out)
    except zstandard.ZstdError as exc:
        raise ValueError(f"{url} is not a valid zstd file ({exc}): re-compress or remove "
                         f"it") from None


def _decode(raw: bytes, url: str) -> str | None:
    if url.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{url} is not a valid gzip file ({exc}): re-compress or remove "
                             f"it") from None
    elif url.endswith(".zst"):
        raw = _zstd_decompress(raw, url)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None  # not text we can round-trip exactly; counted as skipped by the caller


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _record_domain(value: object, item: Item, where: str) -> str:
    """A record's own domain (None: absent) or the source's, checked."""
    if value is None:
        return item.domain or "text"
    if value not in DOMAINS:
        raise ValueError(f"{where}: unknown domain {value!r}: use one of {DOMAINS}")
    return value


def _jsonl_documents(text: str, item: Item) -> Iterator[Document]:
    field = item.text_field
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{item.url}:{line_number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc}); fix the record or drop the "
                             f"file") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with a string {field!r} field, got "
                             f"{line[:80]!r}; fix the record or drop the file")
        if field not in record:
            raise ValueError(f"{where}: no {field!r} field (the record has "
                             f"{', '.join(map(repr, list(record)[:12])) or 'no fields'}); set "
                             f"text_field= in the source to the field that holds the text, e.g. "
                             f"jsonl:PATH?text_field=content")
        value = record[field]
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {field!r} is {_json_type(value)}, not a string "
                             f"({json.dumps(value)[:60]}); fix the record or drop the file")
        domain = _record_domain(record.get(item.domain_field) if item.domain_field else None,
                                item, where)
        if value:
            yield Document(value, domain, f"{item.url}#{line_number}")


def _is_string_type(arrow_type) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or pa.types.is_string_view(arrow_type))


def _check_columns(schema, text_field: str, domain_field: str, where: str) -> bool:
    """Check the text (and domain) columns of an Arrow schema; True when a domain column is used."""
    names = list(schema.names)
    if text_field not in names:
        raise ValueError(f"{where}: no column {text_field!r} (columns: {', '.join(names)}); set "
                         f"text_field= in the source to the column that holds the text")
    text_type = schema.field(text_field).type
    if not _is_string_type(text_type):
        raise ValueError(f"{where}: column {text_field!r} holds {text_type}, not strings; set "
                         f"text_field= to a text column")
    if not domain_field or domain_field not in names:
        return False
    domain_type = schema.field(domain_field).type
    if not _is_string_type(domain_type):
        raise ValueError(f"{where}: column {domain_field!r} holds {domain_type}, not the strings "
                         f"'text'/'code'; name the domain column with domain_field=, or write "
                         f"domain_field= (empty) to ignore it")
    return True


def _batch_documents(batches: Iterable, item: Item, where: str, first_row: int,
                     has_domain: bool) -> Iterator[Document]:
    """Documents of Arrow record batches; rows count from 0 (as pyarrow and datasets index them),
    from `first_row` for a row range."""
    row = first_row
    for batch in batches:
        texts = batch.column(item.text_field).to_pylist()
        domains = batch.column(item.domain_field).to_pylist() if has_domain else None
        for i, text in enumerate(texts):
            if text is None:
                raise ValueError(f"{where}: row {row}: field {item.text_field!r} is null, not a "
                                 f"string; drop or fill that row")
            domain = _record_domain(domains[i] if domains else None, item, f"{where}: row {row}")
            if text:
                yield Document(text, domain, f"{item.url}#row{row}")
            row += 1


def _parquet_documents(data: bytes, item: Item) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def corrupt(exc: Exception) -> ValueError:
        return ValueError(f"{item.url} is not a valid Parquet file ({exc}): re-write or remove it, "
                          f"or narrow the glob")

    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise corrupt(exc) from None
    has_domain = _check_columns(parquet.schema_arrow, item.text_field, item.domain_field, item.url)
    columns = [item.text_field] + ([item.domain_field] if has_domain else [])
    try:
        yield from _batch_documents(parquet.iter_batches(batch_size=8192, columns=columns), item,
                                    item.url, 0, has_domain)
    except (pa.ArrowInvalid, OSError) as exc:
        raise corrupt(exc) from None


def _hf_documents(item: Item) -> Iterator[Document]:
    dataset = _load_hf(item.url, item.split, item.config)
    where = _hf_where(item.url, item.split)
    has_domain = _check_columns(dataset.data.schema, item.text_field, item.domain_field, where)
    columns = [item.text_field] + ([item.domain_field] if has_domain else [])
    start, end = item.rows or (0, dataset.num_rows)
    table = dataset.select_columns(columns).with_format("arrow")[start:end]
    yield from _batch_documents(table.to_batches(), item, where, start, has_domain)


def read_item(item: Item) -> Iterator[Document]:
    """Documents of one item. Plain files that are not UTF-8 text yield nothing (a glob may catch
    binaries); a JSONL file that is not UTF-8 is an error, since it was named as a corpus."""
    if item.kind == "hf":
        yield from _hf_documents(item)
        return
    raw = storage.read_bytes(item.url)
    if item.kind == "parquet":
        yield from _parquet_documents(raw, item)
        return
    text = _decode(raw, item.url)
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
