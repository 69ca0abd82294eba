"""Corpus -> SentencePiece tokenizer -> packed WebDataset shards + manifest.json on a path or s3://.

    from datasets_prep import prepare
    manifest_url = prepare("demo", out="s3://bucket/run", vocab_size=4000, seq_len=256)

Nothing here imports Ray at module level (only prepare() does, when called). The storage layer,
the manifest and the shard format it writes live in `core`, below both this package and the
training loader in mmrec.data.
"""
from datasets_prep.pipeline import PrepConfig, prepare
from datasets_prep.tokenizer_training import train_tokenizer

__all__ = ["prepare", "PrepConfig", "train_tokenizer"]
