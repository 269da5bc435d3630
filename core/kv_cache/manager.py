"""Per-request block tables over the block pool, with prefix caching.

A request's block table covers its computed tokens plus the ones scheduled
this step (spec tokens included):

    block_size 4, 10 known tokens, 2 spec tokens scheduled
    tokens  [t0 t1 t2 t3][t4 t5 t6 t7][t8 t9 s0 s1]
    table    b5           b2           b9
             cached       cached       partial: never cached

Only blocks fully covered by known tokens (never spec tokens, which may be
rejected) are hashed and cached. Hashes live in ``Request.block_hashes`` and
survive preemption, so a resumed request finds its own blocks if they were not
evicted meanwhile.

Sliding window (a model whose every layer attends to the last W positions only):
a step whose first new token sits at position c reads no key before c - W + 1,
so the blocks wholly before it go back to the pool as the request advances and
its entries become the null block; the request holds about W / block_size + 1
blocks whatever its length. A freed block keeps its hash (it was full, so it was
cached) and can still be a prefix-cache hit for another request until evicted;
a hit is always a run of cached blocks from the start, so windows change no
lookup. At admission, hits already outside the window are not taken.

    W = 6, block_size 4, c = 13: keys from position 8 on
    tokens  [0..3][4..7][8..11][12 ..]
    table    null  null  b9     b4
"""
from __future__ import annotations

from ..request import Request
from .block_pool import BlockPool, KVCacheBlock
from .hashing import update_block_hashes


def blocks_per_request(max_model_len: int, block_size: int, sliding_window: int | None = None,
                       max_step_tokens: int | None = None) -> int:
    """The most blocks one request holds at once: its whole context, or with a sliding window
    the blocks a step of up to ``max_step_tokens`` new tokens touches, from the first key its
    first token reads (W - 1 before it) to its last token: at most (W + n - 2) // block_size + 2."""
    whole = -(-max_model_len // block_size)
    if sliding_window is None:
        return whole
    step = min(max_step_tokens or max_model_len, max_model_len)
    return min(whole, (sliding_window + step - 2) // block_size + 2)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, max_model_len: int,
                 sliding_window: int | None = None) -> None:
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(num_blocks)
        self._req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks already offered to the cache
        self.prefix_cache_queries = 0  # tokens looked up, counted at admission
        self.prefix_cache_hits = 0  # of those, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.block_pool.num_usable_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def usage(self) -> float:
        return self.block_pool.usage()

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self._req_to_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of cached full blocks at the start of the request's tokens,
        and the number of tokens they hold. The last token is never a hit (its logits
        must be computed), so at most ``(num_tokens - 1) // block_size`` blocks hit.
        Nothing is touched: ``allocate_slots`` takes the references."""
        if not self._reads_cache(request):
            return [], 0
        update_block_hashes(request, self.block_size)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int, num_new_computed_tokens: int = 0,
                       new_computed_blocks: list[KVCacheBlock] | None = None) -> list[KVCacheBlock] | None:
        """Make room for ``num_new_tokens`` more tokens (spec tokens included) after
        the request's computed ones and its ``new_computed_blocks`` (prefix-cache hits
        from ``get_computed_blocks``, passed at admission). Returns the newly allocated
        blocks (possibly none), or None if too few blocks are free; then nothing changes but
        the release of blocks the sliding window has left behind (no later step reads them)."""
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
        req_blocks = self._req_to_blocks.get(request.request_id, [])
        if req_blocks and not (new_computed_blocks or num_new_computed_tokens or self.sliding_window):
            # the common decode step: the request's blocks still hold its new tokens (the general
            # path below would find no block to allocate and nothing to free)
            num_slots = request.num_computed_tokens + num_new_tokens
            if min(num_slots, self.max_model_len) <= len(req_blocks) * self.block_size:
                if self.enable_caching:
                    self._cache_full_blocks(request, min(num_slots, request.num_tokens))
                return []
        new_computed_blocks = new_computed_blocks or []
        num_computed_tokens = request.num_computed_tokens + num_new_computed_tokens
        num_skipped = self._num_blocks_before_window(num_computed_tokens)
        if num_skipped:
            self._free_before_window(req_blocks, num_skipped)
            # admission: hits wholly before the window are not taken
            num_dropped = min(max(num_skipped - len(req_blocks), 0), len(new_computed_blocks))
            new_computed_blocks = [self.block_pool.null_block] * num_dropped + new_computed_blocks[num_dropped:]
        num_slots = min(num_computed_tokens + num_new_tokens, self.max_model_len)
        num_new_blocks = -(-num_slots // self.block_size) - len(req_blocks) - len(new_computed_blocks)
        # hits on free blocks leave the free queue when touched, so they compete for it
        null = self.block_pool.null_block
        num_revived = sum(1 for block in new_computed_blocks if block.ref_cnt == 0 and block is not null)
        if num_new_blocks > self.block_pool.num_free_blocks - num_revived:
            return None

        if not req_blocks:
            self._req_to_blocks[request.request_id] = req_blocks
            self._num_cached_blocks[request.request_id] = len(new_computed_blocks)
            if self._reads_cache(request):
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += num_new_computed_tokens
        if new_computed_blocks:
            self.block_pool.touch(block for block in new_computed_blocks if block is not null)
            req_blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks) if num_new_blocks > 0 else []
        req_blocks.extend(new_blocks)
        if self.enable_caching:
            self._cache_full_blocks(request, min(num_computed_tokens + num_new_tokens, request.num_tokens))
        return new_blocks

    def free(self, request: Request) -> None:
        """Release the request's blocks, last block first, so its tail is evicted first."""
        blocks = self._req_to_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        null = self.block_pool.null_block
        self.block_pool.free_blocks(block for block in reversed(blocks) if block is not null)

    def _num_blocks_before_window(self, num_computed_tokens: int) -> int:
        """Leading blocks no key of a step starting at position ``num_computed_tokens`` reads."""
        if self.sliding_window is None:
            return 0
        return max(0, num_computed_tokens - self.sliding_window + 1) // self.block_size

    def _free_before_window(self, req_blocks: list[KVCacheBlock], num_skipped: int) -> None:
        null = self.block_pool.null_block
        freed = []
        for index in range(min(num_skipped, len(req_blocks))):
            if req_blocks[index] is not null:
                freed.append(req_blocks[index])
                req_blocks[index] = null
        self.block_pool.free_blocks(freed)

    def _reads_cache(self, request: Request) -> bool:
        # prompt logprobs need every prompt position's logits, so such a request computes them all
        return self.enable_caching and request.sampling_params.prompt_logprobs is None

    def _cache_full_blocks(self, request: Request, num_known_tokens: int) -> None:
        num_full_blocks = num_known_tokens // self.block_size
        num_cached = self._num_cached_blocks[request.request_id]
        if num_full_blocks <= num_cached:
            return
        update_block_hashes(request, self.block_size)
        blocks = self._req_to_blocks[request.request_id]
        for index in range(num_cached, num_full_blocks):
            if blocks[index] is not self.block_pool.null_block:  # a hit not taken (outside the window)
                self.block_pool.cache_block(blocks[index], request.block_hashes[index])
        self._num_cached_blocks[request.request_id] = num_full_blocks
