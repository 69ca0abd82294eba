"""Training-side data: the resumable, world-size-independent shard loader. Never imports Ray."""
from mmrec.data.loader import ShardLoader
from datasets_prep.shards import CorruptShardError
from datasets_prep.tokenizer import SentencePieceTokenizer

__all__ = ["ShardLoader", "CorruptShardError", "SentencePieceTokenizer"]
