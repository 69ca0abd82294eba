"""Corpus -> SentencePiece tokenizer -> packed WebDataset shards + manifest.json on a path or s3://.

    from datasets_prep import prepare, SentencePieceTokenizer
    manifest_url = prepare("demo", out="s3://bucket/run", vocab_size=4000, seq_len=256)

Nothing here imports Ray at module level (only prepare() does, when called), so the training
loader in mmrec.data can use the storage, manifest and shard modules without Ray installed.
"""
from datasets_prep.manifest import Manifest, ShardInfo, load_manifest
from datasets_prep.pipeline import PrepConfig, prepare
from datasets_prep.shards import CorruptShardError
from datasets_prep.storage import StorageError, StorageNotFound
from datasets_prep.tokenizer import SentencePieceTokenizer, train_tokenizer

__all__ = ["prepare", "PrepConfig", "SentencePieceTokenizer", "train_tokenizer", "Manifest",
           "ShardInfo", "load_manifest", "CorruptShardError", "StorageError", "StorageNotFound"]
