"""Training-side data: the resumable, world-size-independent shard loader. Never imports Ray."""
from core.shards import CorruptShardError
from mmrec.data.loader import ShardLoader

__all__ = ["ShardLoader", "CorruptShardError"]
