"""The block pool: LRU free queue through the blocks, ref counts, hash -> block map;
and the chained content hash of full blocks."""
import os
import subprocess
import sys

import pytest

from tokenmill.kv_cache import BlockPool, FreeBlockQueue, KVCacheBlock, hash_block_tokens


def free_ids(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_queue]


def test_free_queue_pops_from_the_head_and_appends_at_the_tail():
    blocks = [KVCacheBlock(i) for i in range(4)]
    queue = FreeBlockQueue(blocks)
    assert queue.popleft() is blocks[0]
    queue.append(blocks[0])
    assert [b.block_id for b in queue] == [1, 2, 3, 0]
    assert len(queue) == 4


def test_free_queue_removes_from_the_middle():
    blocks = [KVCacheBlock(i) for i in range(4)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    assert [b.block_id for b in queue] == [0, 1, 3]
    assert (blocks[2].prev_free, blocks[2].next_free) == (None, None)
    assert len(queue) == 3


def test_free_queue_popleft_on_empty_raises():
    with pytest.raises(IndexError, match="empty free block queue"):
        FreeBlockQueue([]).popleft()


def test_block_zero_is_the_null_block_and_never_free():
    pool = BlockPool(5)
    assert pool.null_block.block_id == 0
    assert free_ids(pool) == [1, 2, 3, 4]
    assert (pool.num_usable_blocks, pool.num_free_blocks) == (4, 4)


def test_a_pool_needs_a_usable_block():
    with pytest.raises(ValueError, match="num_blocks must be >= 2 .*null block.*got 1"):
        BlockPool(1)


def test_allocation_takes_the_least_recently_freed_blocks():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [1, 2, 3]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert free_ids(pool) == [4, 5]
    assert pool.usage() == pytest.approx(3 / 5)


def test_allocating_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(3)
    with pytest.raises(ValueError, match="cannot allocate 3 blocks, only 2 are free"):
        pool.get_new_blocks(3)
    assert free_ids(pool) == [1, 2]


def test_freed_blocks_join_the_tail_in_the_given_order():
    pool = BlockPool(5)
    first, second = pool.get_new_blocks(2)
    pool.free_blocks([second, first])
    assert free_ids(pool) == [3, 4, 2, 1]
    assert (first.ref_cnt, second.ref_cnt) == (0, 0)


def test_a_shared_block_is_free_only_when_its_last_reference_goes():
    pool = BlockPool(3)
    [block] = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert (block.ref_cnt, free_ids(pool)) == (1, [2])
    pool.free_blocks([block])
    assert (block.ref_cnt, free_ids(pool)) == (0, [2, 1])


def test_touching_a_free_cached_block_takes_it_out_of_the_free_queue():
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(2)
    pool.cache_block(blocks[1], b"h2")
    pool.free_blocks(blocks)
    assert free_ids(pool) == [3, 4, 1, 2]
    pool.touch([pool.get_cached_block(b"h2")])
    assert free_ids(pool) == [3, 4, 1]
    assert blocks[1].ref_cnt == 1


def test_reallocating_a_cached_block_evicts_its_hash():
    pool = BlockPool(2)
    [block] = pool.get_new_blocks(1)
    pool.cache_block(block, b"h")
    pool.free_blocks([block])
    assert pool.get_cached_block(b"h") is block
    [again] = pool.get_new_blocks(1)
    assert again is block
    assert (block.block_hash, pool.get_cached_block(b"h")) == (None, None)


def test_a_second_block_with_cached_content_stays_uncached():
    pool = BlockPool(3)
    first, second = pool.get_new_blocks(2)
    pool.cache_block(first, b"h")
    pool.cache_block(second, b"h")
    assert pool.get_cached_block(b"h") is first
    assert second.block_hash is None


def test_block_hash_is_a_sha256_digest():
    assert len(hash_block_tokens(None, [1, 2, 3, 4])) == 32


def test_block_hash_depends_on_the_parent():
    assert hash_block_tokens(b"a" * 32, [1, 2]) != hash_block_tokens(b"b" * 32, [1, 2])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(b"a" * 32, [1, 2])


def test_block_hash_depends_on_tokens_and_extra_keys():
    base = hash_block_tokens(None, [1, 2, 3])
    assert base == hash_block_tokens(None, (1, 2, 3))
    assert base != hash_block_tokens(None, [1, 2, 4])
    assert base != hash_block_tokens(None, [1, 2, 3], extra_keys=("tenant-a",))
    assert hash_block_tokens(None, [1], ("ab", "c")) != hash_block_tokens(None, [1], ("a", "bc"))


def test_block_hash_is_the_same_in_another_process():
    code = "from tokenmill.kv_cache import hash_block_tokens; print(hash_block_tokens(None, [5, 6], ('s',)).hex())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == hash_block_tokens(None, [5, 6], ("s",)).hex()
