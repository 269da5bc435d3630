"""KVCacheManager: block tables, prefix-cache hits and writes, eviction order.

Block size 4 throughout; ``make_manager()`` has 10 usable blocks (ids 1..10).
"""
import pytest

from tokenmill.kv_cache import KVCacheManager
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_manager(num_blocks: int = 11, enable_caching: bool = True, max_model_len: int = 1024) -> KVCacheManager:
    return KVCacheManager(num_blocks, BLOCK_SIZE, enable_caching, max_model_len)


def make_request(req_id: str, token_ids, cache_salt: str | None = None, prompt_logprobs: int | None = None) -> Request:
    return Request(req_id, list(token_ids), SamplingParams(prompt_logprobs=prompt_logprobs), cache_salt=cache_salt)


def admit(manager: KVCacheManager, request: Request) -> list[int]:
    """What the scheduler does at admission, then the whole prompt counts as computed."""
    hits, num_hit_tokens = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - num_hit_tokens, num_hit_tokens, hits) is not None
    request.num_computed_tokens = request.num_tokens
    return manager.get_block_ids(request.request_id)


def num_hit_tokens(manager: KVCacheManager, token_ids, **kwargs) -> int:
    return manager.get_computed_blocks(make_request("probe", token_ids, **kwargs))[1]


def free_ids(manager: KVCacheManager) -> list[int]:
    return [block.block_id for block in manager.block_pool.free_queue]


def ref_counts(manager: KVCacheManager, block_ids) -> list[int]:
    return [manager.block_pool.blocks[i].ref_cnt for i in block_ids]


def test_admission_allocates_blocks_for_the_whole_prompt():
    manager = make_manager()
    assert admit(manager, make_request("a", range(10))) == [1, 2, 3]
    assert manager.num_free_blocks == 7
    assert manager.usage() == pytest.approx(0.3)


def test_full_prompt_blocks_are_cached_and_the_partial_one_is_not():
    manager = make_manager()
    request = make_request("a", range(10))
    admit(manager, request)
    assert len(request.block_hashes) == 2
    assert [manager.block_pool.get_cached_block(h).block_id for h in request.block_hashes] == [1, 2]
    assert manager.block_pool.blocks[3].block_hash is None


def test_a_request_with_the_same_prefix_shares_cached_blocks():
    manager = make_manager()
    admit(manager, make_request("a", range(10)))
    shared = make_request("b", [*range(8), 50, 51, 52])
    assert manager.get_computed_blocks(shared)[1] == 8
    assert admit(manager, shared) == [1, 2, 4]
    assert ref_counts(manager, [1, 2, 3, 4]) == [2, 2, 1, 1]


def test_the_last_prompt_token_is_never_a_hit():
    manager = make_manager()
    admit(manager, make_request("a", range(8)))
    blocks, num_tokens = manager.get_computed_blocks(make_request("b", range(8)))
    assert ([b.block_id for b in blocks], num_tokens) == ([1], 4)


def test_a_block_hash_depends_on_every_block_before_it():
    manager = make_manager()
    first = make_request("a", range(9))
    admit(manager, first)
    other_first_block = make_request("b", [99, 1, 2, 3, 4, 5, 6, 7, 8])
    assert manager.get_computed_blocks(other_first_block) == ([], 0)
    assert other_first_block.block_hashes[1] != first.block_hashes[1]


def test_a_partial_block_is_never_a_hit():
    manager = make_manager()
    admit(manager, make_request("a", range(10)))
    assert num_hit_tokens(manager, [*range(10), 10, 11, 12]) == 8


def test_decoded_tokens_that_fill_a_block_cache_it():
    manager = make_manager()
    request = make_request("a", range(6))
    admit(manager, request)
    for token_id in (6, 7):  # sample, then compute the sampled token next step
        request.append_output_token_ids([token_id])
        assert manager.allocate_slots(request, 1) == []
        request.num_computed_tokens += 1
    assert len(request.block_hashes) == 2
    assert manager.block_pool.blocks[2].block_hash == request.block_hashes[1]
    assert num_hit_tokens(manager, range(9)) == 8


def test_spec_tokens_get_slots_but_are_never_cached():
    manager = make_manager()
    request = make_request("a", range(6))
    admit(manager, request)
    request.append_output_token_ids([6])
    request.spec_token_ids = [7, 8, 9]
    new_blocks = manager.allocate_slots(request, 1 + 3)  # the sampled token and 3 drafts: 10 slots
    assert [b.block_id for b in new_blocks] == [3]
    assert len(request.block_hashes) == 1
    assert manager.block_pool.blocks[2].block_hash is None


def test_slots_are_capped_at_max_model_len():
    manager = make_manager(max_model_len=8)
    request = make_request("a", range(6))
    admit(manager, request)
    request.append_output_token_ids([6])
    assert manager.allocate_slots(request, 1 + 3) == []  # 10 slots asked, 8 needed at most
    assert manager.get_block_ids("a") == [1, 2]


def test_freed_blocks_are_evicted_lru_with_a_requests_tail_first():
    manager = make_manager()
    first = make_request("a", range(12))
    admit(manager, first)
    manager.free(first)
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 10, 3, 2, 1]
    assert admit(manager, make_request("b", range(100, 132))) == [4, 5, 6, 7, 8, 9, 10, 3]
    assert num_hit_tokens(manager, range(13)) == 8  # block 3 (tokens 8..11) was evicted


def test_a_hit_on_a_free_block_takes_it_back_from_the_free_queue():
    manager = make_manager()
    first = make_request("a", range(9))
    admit(manager, first)
    manager.free(first)
    assert admit(manager, make_request("b", range(9))) == [1, 2, 4]
    assert ref_counts(manager, [1, 2, 3, 4]) == [1, 1, 0, 1]
    assert free_ids(manager) == [5, 6, 7, 8, 9, 10, 3]


def test_free_drops_one_reference_from_shared_blocks():
    manager = make_manager()
    first, second = make_request("a", range(9)), make_request("b", range(9))
    admit(manager, first)
    admit(manager, second)
    manager.free(first)
    assert ref_counts(manager, [1, 2, 3, 4]) == [1, 1, 0, 1]
    assert free_ids(manager)[-1] == 3
    assert manager.get_block_ids("a") == []


def test_allocation_fails_when_hits_on_free_blocks_leave_too_few_and_changes_nothing():
    manager = make_manager(num_blocks=6)  # 5 usable
    first = make_request("a", range(9))
    admit(manager, first)
    manager.free(first)  # free: [4, 5, 3, 2, 1], blocks 1 and 2 cached
    admit(manager, make_request("b", range(100, 108)))  # takes 4, 5
    request = make_request("c", range(16))
    hits, num_hits = manager.get_computed_blocks(request)
    assert [b.block_id for b in hits] == [1, 2]
    # 2 more blocks needed, 3 free, but 2 of those are the hits themselves
    assert manager.allocate_slots(request, 16 - num_hits, num_hits, hits) is None
    assert free_ids(manager) == [3, 2, 1]
    assert ref_counts(manager, [1, 2, 3]) == [0, 0, 0]
    assert manager.get_block_ids("c") == []


def test_cache_salt_isolates_tenants():
    manager = make_manager()
    admit(manager, make_request("a", range(9), cache_salt="tenant-a"))
    assert num_hit_tokens(manager, range(9), cache_salt="tenant-a") == 8
    assert num_hit_tokens(manager, range(9), cache_salt="tenant-b") == 0
    assert num_hit_tokens(manager, range(9)) == 0


def test_a_prompt_logprobs_request_does_not_read_the_cache_but_writes_it():
    manager = make_manager()
    admit(manager, make_request("a", range(9)))
    wants_logprobs = make_request("b", [*range(100, 109)], prompt_logprobs=1)
    admit(manager, wants_logprobs)
    assert manager.get_computed_blocks(make_request("c", range(9), prompt_logprobs=0)) == ([], 0)
    assert manager.get_block_ids("b") == [4, 5, 6]
    assert num_hit_tokens(manager, range(100, 109)) == 8
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (9, 0)


def test_prefix_caching_disabled_neither_hashes_nor_hits():
    manager = make_manager(enable_caching=False)
    first = make_request("a", range(9))
    admit(manager, first)
    second = make_request("b", range(9))
    assert admit(manager, second) == [4, 5, 6]
    assert (first.block_hashes, second.block_hashes, manager.block_pool.cached_blocks) == ([], [], {})
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (0, 0)


def test_queries_and_hits_count_tokens_at_admission():
    manager = make_manager()
    admit(manager, make_request("a", range(9)))
    manager.get_computed_blocks(make_request("probe", range(9)))  # a lookup alone counts nothing
    admit(manager, make_request("b", [*range(8), 77, 78]))
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (9 + 10, 8)
    assert manager.prefix_cache_hit_rate == pytest.approx(8 / 19)


def test_num_new_tokens_must_be_positive():
    with pytest.raises(ValueError, match="num_new_tokens must be >= 1, got 0"):
        make_manager().allocate_slots(make_request("a", range(3)), 0)


# ---------------------------------------------------------------- sliding window

def held_ids(manager: KVCacheManager, request: Request) -> list[int]:
    return [i for i in manager.get_block_ids(request.request_id) if i != 0]


def decode(manager: KVCacheManager, request: Request, num_steps: int) -> None:
    for step in range(num_steps):
        request.append_output_token_ids([1000 + step])
        assert manager.allocate_slots(request, 1) is not None
        request.num_computed_tokens += 1


def test_blocks_wholly_before_the_window_are_freed_as_the_request_advances():
    window = 6
    manager = KVCacheManager(11, BLOCK_SIZE, True, 1024, sliding_window=window)
    request = make_request("a", range(13))
    admit(manager, request)  # 13 tokens computed; the next step (position 13) reads keys 8..13
    decode(manager, request, 1)
    table = manager.get_block_ids("a")
    assert table[:2] == [0, 0] and 0 not in table[2:]  # blocks of positions 0..7 freed, entries null

    decode(manager, request, 40)  # 54 tokens: far more blocks than the pool has if none were freed
    held = held_ids(manager, request)
    # the last step started at 53 and read keys from 48: blocks 12 (48..51) and 13 (52..55)
    assert len(held) == -(-window // BLOCK_SIZE) == 2
    assert manager.num_free_blocks == 10 - len(held)
    manager.free(request)
    assert manager.num_free_blocks == 10 and manager.block_pool.null_block.ref_cnt == 0


def test_freed_window_blocks_stay_cached_and_hits_outside_the_window_are_not_taken():
    manager = KVCacheManager(11, BLOCK_SIZE, True, 1024, sliding_window=6)
    first = make_request("a", range(17))
    admit(manager, first)
    decode(manager, first, 1)  # blocks 0..2 (positions 0..11) left the window of a step at 17
    freed = [i for i in range(1, 11) if manager.block_pool.blocks[i].block_hash is not None and
             manager.block_pool.blocks[i].ref_cnt == 0]
    assert len(freed) == 3  # back in the pool, content still cached

    second = make_request("b", list(range(17)) + [99])
    hits, num_hit_tokens = manager.get_computed_blocks(second)
    assert num_hit_tokens == 16  # four full blocks found, as without a window
    assert manager.allocate_slots(second, second.num_tokens - num_hit_tokens, num_hit_tokens, hits) is not None
    table = manager.get_block_ids("b")
    assert table[:2] == [0, 0]  # a step from 16 reads keys from 11: blocks 0 and 1 are not taken
    assert table[2:4] == [h.block_id for h in hits[2:4]] and len(table) == 5
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 10


def test_without_a_window_no_block_is_freed_early():
    manager = make_manager()
    request = make_request("a", range(13))
    admit(manager, request)
    decode(manager, request, 10)
    assert 0 not in manager.get_block_ids("a") and len(held_ids(manager, request)) == 6
