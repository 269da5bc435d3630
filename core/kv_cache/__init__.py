"""The paged KV cache's bookkeeping: block pool, prefix-cache hashing, per-request block tables."""
from .block_pool import NULL_BLOCK_ID, BlockPool, FreeBlockQueue, KVCacheBlock
from .hashing import BlockHash, hash_block_tokens, update_block_hashes
from .manager import KVCacheManager

__all__ = ["NULL_BLOCK_ID", "BlockHash", "BlockPool", "FreeBlockQueue", "KVCacheBlock", "KVCacheManager",
           "hash_block_tokens", "update_block_hashes"]
