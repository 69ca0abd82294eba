"""Corpus -> SentencePiece tokenizer -> packed WebDataset shards + manifest.json on a path or s3://.

    from datasets_prep import prepare
    manifest_url = prepare("demo", out="s3://bucket/run", vocab_size=4000, seq_len=256)

Nothing here imports Ray at module level (only prepare() does, when called). The storage layer,
the manifest and the shard format it writes live in `core`, below both this package and the
training loader in mmrec.data; the settings are core.config.PrepConfig (the [prep] section).
Sources, the bring-your-own tokenizer and the atomic publish are described in docs/data.md.
"""
from core.config import PrepConfig
from datasets_prep.pipeline import prepare, run_prep
from datasets_prep.tokenizer_training import check_tokenizer_model, train_tokenizer

__all__ = ["prepare", "run_prep", "PrepConfig", "check_tokenizer_model", "train_tokenizer"]
