"""A small mixed corpus assembled from files found on any Debian/Python machine, for the smoke job.

code: Python standard-library modules; text: man pages (roff stripped crudely), license texts and
package documentation. Selection is deterministic: files are ordered by a hash of their path, so the
same machine always yields the same corpus, and the order is spread over packages rather than
alphabetical. Every 10th document goes to the validation split.
"""
from __future__ import annotations

import gzip
import hashlib
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

VAL_EVERY = 10
_ROFF_ESCAPE = re.compile(r"\\(?:f[BIRP1-9]|f\(..|\(..|\*.|s[-+]?\d|[-&|^e0 ])")
_SKIPPED_CODE_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}


def _ordered(paths: Iterable[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: hashlib.sha1(str(p).encode()).hexdigest())


def strip_roff(source: str) -> str:
    """Man-page roff to plain text: macro lines keep their arguments, comments and escapes are dropped."""
    lines = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\}')):
            continue
        if line.startswith((".", "'")):
            _, _, line = line.partition(" ")  # ".SH NAME" -> "NAME", ".TP" -> ""
            line = line.replace('"', "")
        line = _ROFF_ESCAPE.sub(lambda m: "-" if m.group(0) == "\\-" else "", line).strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def _read(path: Path) -> str | None:
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None  # unreadable or binary files are simply not part of the corpus


def code_documents() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = (p for p in stdlib.rglob("*.py") if not _SKIPPED_CODE_DIRS & set(p.relative_to(stdlib).parts))
    for path in _ordered(paths):
        text = _read(path)
        if text and len(text) > 200:
            yield text


def text_documents() -> Iterator[str]:
    man = _ordered(Path("/usr/share/man").glob("man[1-8]/*.gz"))
    licenses = _ordered(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    docs = _ordered(
        p for p in Path("/usr/share/doc").glob("*/*")
        if p.is_file() and (p.name == "copyright" or p.name.lower().startswith(("readme", "news", "changelog")))
    )
    # Interleave the sources so a byte budget takes some of each.
    sources = [
        (strip_roff(t) for t in map(_read, man) if t),
        (t for t in map(_read, licenses) if t),
        (t for t in map(_read, docs) if t),
    ]
    while sources:
        for source in list(sources):
            document = next(source, None)
            if document is None:
                sources.remove(source)
            elif len(document) > 200:
                yield document


def build_smoke_corpus(max_bytes_per_domain: int = 1_500_000) -> dict[str, dict[str, str]]:
    """{"text"|"code": {"train": str, "val": str}} of at most max_bytes_per_domain UTF-8 bytes per domain."""
    corpus = {}
    for domain, documents in (("text", text_documents()), ("code", code_documents())):
        train, val, used = [], [], 0
        for document in documents:
            size = len(document.encode("utf-8"))
            if used + size > max_bytes_per_domain:
                if used >= 0.9 * max_bytes_per_domain:
                    break
                continue  # too big for what is left of the budget; a smaller document may fit
            accepted = len(train) + len(val)
            (val if accepted % VAL_EVERY == VAL_EVERY - 1 else train).append(document)
            used += size
        if not val and len(train) >= 2:
            val.append(train.pop())  # a small budget holds fewer than VAL_EVERY documents
        if used < max_bytes_per_domain // 10 or not val:
            raise RuntimeError(
                f"smoke corpus: found only {used} bytes of {domain} on this machine (want ~{max_bytes_per_domain}); "
                + ("install man-db/manpages or package docs" if domain == "text" else "is the Python stdlib present?")
            )
        corpus[domain] = {"train": "\n\n".join(train), "val": "\n\n".join(val)}
    return corpus
