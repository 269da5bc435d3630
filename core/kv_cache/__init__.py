"""The paged KV cache's bookkeeping: block pool, prefix-cache hashing, per-request block tables."""
from .block_pool import NULL_BLOCK_ID, BlockPool, FreeBlockQueue, KVCacheBlock
from .hashing import BlockHash, hash_block_tokens, update_block_hashes
from .manager import KVCacheManager, blocks_per_request

__all__ = ["NULL_BLOCK_ID", "BlockHash", "BlockPool", "FreeBlockQueue", "KVCacheBlock", "KVCacheManager",
           "blocks_per_request", "hash_block_tokens", "update_block_hashes"]
