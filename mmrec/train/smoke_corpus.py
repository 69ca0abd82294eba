"""The smoke job's corpus: the data pipeline's demo corpus (files found on this machine: Python
stdlib modules as code; man pages, package docs and license texts as prose), read in-process
without Ray or shards, split into train/val per document by the pipeline's own hash rule.
"""
from __future__ import annotations

from core.shards import split_of
from datasets_prep.sources import demo_items, read_item


def build_smoke_corpus(max_mb: float = 3.0, val_fraction: float = 0.05) -> dict[str, dict[str, str]]:
    """{"text"|"code": {"train": str, "val": str}}: documents joined by blank lines, about max_mb in all."""
    documents: dict[str, dict[str, list[str]]] = {d: {"train": [], "val": []} for d in ("text", "code")}
    for item in demo_items(max_mb):
        for document in read_item(item):
            documents[document.domain][split_of(document.text, val_fraction)].append(document.text)
    for domain, splits in documents.items():
        for split, texts in splits.items():
            if not texts:
                raise RuntimeError(
                    f"smoke corpus: no {domain}/{split} documents in a {max_mb} MB demo corpus on this machine; "
                    f"raise max_mb or val_fraction (now {val_fraction}), or install man pages / the Python stdlib"
                )
    return {d: {s: "\n\n".join(texts) for s, texts in splits.items()} for d, splits in documents.items()}
