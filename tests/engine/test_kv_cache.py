"""KVCacheManager: allocation, hash chain, prefix hits, reference counts, LRU eviction, reset."""

from __future__ import annotations

import pytest

from openautoglm.engine.kv_cache import NULL_BLOCK_ID, KVCacheManager
from openautoglm.engine.request import Request
from openautoglm.protocol.errors import ConfigError
from openautoglm.protocol.sampling import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams())


def admit(kv: KVCacheManager, req: Request, num_new: int | None = None) -> int:
    """Admit a fresh request the way the scheduler does; return its cached-token count."""
    blocks, num_cached = kv.get_computed_blocks(req)
    n = req.num_tokens - num_cached if num_new is None else num_new
    assert kv.allocate_slots(req, n, (blocks, num_cached))
    req.num_computed_tokens = num_cached + n
    return num_cached


def decode(kv: KVCacheManager, req: Request, token: int) -> None:
    """One simulated step: sample ``token`` for a request whose context is computed, then compute it."""
    req.output_token_ids.append(token)
    assert kv.allocate_slots(req, 1)
    req.num_computed_tokens += 1


def test_rejects_a_pool_without_usable_blocks() -> None:
    with pytest.raises(ConfigError, match="num_blocks"):
        KVCacheManager(1, BS)
    with pytest.raises(ConfigError, match="block_size"):
        KVCacheManager(8, 0)


def test_allocation_grows_by_blocks_and_never_hands_out_the_null_block() -> None:
    kv = KVCacheManager(8, BS)
    assert kv.num_free_blocks == kv.num_usable_blocks == 7
    req = make_request("a", list(range(1, 6)))  # 5 tokens: 2 blocks
    admit(kv, req)
    assert len(kv.get_block_ids(req)) == 2
    assert kv.num_free_blocks == 5
    for t in (6, 7, 8):  # fills block 2 exactly: no new block yet
        decode(kv, req, t)
    assert len(kv.get_block_ids(req)) == 2
    decode(kv, req, 9)
    assert len(kv.get_block_ids(req)) == 3
    assert NULL_BLOCK_ID not in kv.get_block_ids(req)
    assert kv.usage == pytest.approx(3 / 7)
    kv.free(req)
    assert kv.num_free_blocks == 7 and kv.usage == 0.0
    assert kv.get_block_ids(req) == []


def test_failed_allocation_changes_nothing() -> None:
    kv = KVCacheManager(4, BS)  # 3 usable blocks = 12 tokens
    a = make_request("a", list(range(1, 10)))  # 9 tokens: 3 blocks
    admit(kv, a)
    b = make_request("b", [1, 2, 3, 4, 99])  # shares a's first block
    blocks, cached = kv.get_computed_blocks(b)
    assert cached == BS
    assert not kv.allocate_slots(b, b.num_tokens - cached, (blocks, cached))  # needs 1 more block: none
    assert kv.get_block_ids(b) == []
    assert kv.ref_count(blocks[0]) == 1
    assert kv.num_free_blocks == 0
    assert kv.prefix_cache_queries == 9  # only the successful admission counted


def test_hash_chain_is_stored_on_the_request() -> None:
    kv = KVCacheManager(16, BS)
    tokens = list(range(10, 21))  # 11 tokens: 2 full blocks
    req = make_request("a", tokens)
    admit(kv, req)
    h0 = kv.hash_block(None, tokens[0:4])
    h1 = kv.hash_block(h0, tokens[4:8])
    assert req.block_hashes == [h0, h1]
    decode(kv, req, 21)  # fills block 3 (tokens 8..11)
    assert req.block_hashes == [h0, h1, kv.hash_block(h1, [*tokens[8:11], 21])]


def test_same_block_contents_under_different_parents_do_not_match() -> None:
    kv = KVCacheManager(16, BS)
    shared = [7, 7, 7, 7]
    a = make_request("a", [1, 2, 3, 4, *shared, 50])
    b = make_request("b", [9, 9, 9, 9, *shared, 50])
    admit(kv, a)
    assert a.block_hashes[1] != kv.hash_block(None, shared)
    assert admit(kv, b) == 0  # neither its first nor its second block is a hit
    assert a.block_hashes[1] != b.block_hashes[1]
    assert set(kv.get_block_ids(a)).isdisjoint(kv.get_block_ids(b))


def test_prefix_hits_share_blocks_and_count_references() -> None:
    kv = KVCacheManager(16, BS)
    prefix = list(range(1, 9))  # two full blocks
    a = make_request("a", [*prefix, 100, 101])
    b = make_request("b", [*prefix, 200])
    admit(kv, a)
    assert admit(kv, b) == 8
    ta, tb = kv.get_block_ids(a), kv.get_block_ids(b)
    assert ta[:2] == tb[:2] and ta[2] != tb[2]
    assert [kv.ref_count(x) for x in ta[:2]] == [2, 2]
    assert kv.prefix_cache_queries == 10 + 9 and kv.prefix_cache_hits == 8
    kv.free(a)
    assert [kv.ref_count(x) for x in ta] == [1, 1, 0]
    kv.free(b)
    assert all(kv.ref_count(x) == 0 for x in ta + tb)
    assert kv.num_free_blocks == 15
    assert kv.is_cached(ta[0]) and kv.is_cached(ta[1])  # freed, still cached: a third request hits them
    c = make_request("c", [*prefix, 300])
    assert admit(kv, c) == 8
    assert kv.get_block_ids(c)[:2] == ta[:2]


def test_the_last_prompt_token_is_always_computed() -> None:
    kv = KVCacheManager(16, BS)
    a = make_request("a", list(range(1, 9)))  # exactly two blocks
    admit(kv, a)
    b = make_request("b", list(range(1, 9)))
    assert kv.get_computed_blocks(b)[1] == 4  # (8 - 1) // 4 blocks: the second block is recomputed
    c = make_request("c", list(range(1, 10)))
    assert kv.get_computed_blocks(c)[1] == 8


def test_output_blocks_are_cached_once_full() -> None:
    kv = KVCacheManager(16, BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6])
    admit(kv, a)
    decode(kv, a, 7)
    # Block 1 (5, 6, 7, _) is not full: a follower with the same 7 tokens and more hits only block 0.
    probe = make_request("p", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(probe)[1] == 4
    decode(kv, a, 8)
    probe = make_request("q", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    blocks, cached = kv.get_computed_blocks(probe)
    assert cached == 8 and blocks == kv.get_block_ids(a)[:2]


def test_freed_cached_blocks_are_evicted_least_recently_used_first() -> None:
    kv = KVCacheManager(10, BS)  # 9 usable blocks
    a, b, c = (make_request(n, [k * 10 + i for i in range(1, 10)]) for k, n in enumerate("abc", start=1))
    for r in (a, b, c):  # each: 2 full (cached) blocks + 1 partial
        admit(kv, r)
    assert kv.num_free_blocks == 0
    for r in (a, b, c):
        kv.free(r)

    def hits() -> tuple[int, ...]:
        return tuple(kv.get_computed_blocks(make_request("probe", r.prompt_token_ids))[1] for r in (a, b, c))

    assert hits() == (8, 8, 8)
    # A hit on b's prefix makes b the most recently used (its own partial block comes from the free ones).
    again = make_request("b2", b.prompt_token_ids)
    assert admit(kv, again) == 8
    kv.free(again)
    # Eviction order from here: the 3 partial blocks (nothing cached in them), then a's blocks tail first,
    # then c's tail first, then b's. Each single-block request below takes exactly one block.
    expected = [(8, 8, 8), (8, 8, 8), (8, 8, 8), (4, 8, 8), (0, 8, 8), (0, 8, 4), (0, 8, 0), (0, 4, 0)]
    seen = []
    for i, _ in enumerate(expected):
        admit(kv, make_request(f"one{i}", [1000 + i]))
        seen.append(hits())
    assert seen == expected


def test_unregistered_blocks_are_reused_before_cached_ones_are_evicted() -> None:
    kv = KVCacheManager(4, BS)  # 3 usable
    a = make_request("a", [1, 2, 3, 4, 5])  # block 0 cached, block 1 partial
    admit(kv, a)
    kv.free(a)
    b = make_request("b", [9, 9])  # one block: must reuse a's partial block, not evict the cached one
    admit(kv, b)
    c = make_request("c", [8, 8])
    admit(kv, c)  # the never-used block
    assert kv.get_computed_blocks(make_request("x", [1, 2, 3, 4, 5]))[1] == 4


def test_duplicate_blocks_stay_unregistered_and_are_recycled() -> None:
    kv = KVCacheManager(8, BS)
    a = make_request("a", [1, 2, 3, 4])
    b = make_request("b", [1, 2, 3, 4])
    admit(kv, a)
    admit(kv, b)  # no hit (the last token is computed), same hash as a's block
    ta, tb = kv.get_block_ids(a), kv.get_block_ids(b)
    assert ta != tb and kv.is_cached(ta[0]) and not kv.is_cached(tb[0])
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 7 and kv.is_cached(ta[0])


def test_free_with_uncache_drops_unshared_blocks_from_the_cache() -> None:
    kv = KVCacheManager(8, BS)
    a = make_request("a", list(range(1, 10)))
    b = make_request("b", [1, 2, 3, 4, 50])
    admit(kv, a)
    admit(kv, b)  # shares a's first block
    ta = list(kv.get_block_ids(a))
    kv.free(a, uncache=True)
    assert kv.is_cached(ta[0]) and not kv.is_cached(ta[1])  # the shared one is still held by b: kept
    assert kv.get_computed_blocks(make_request("x", list(range(1, 10))))[1] == 4


def test_reset_prefix_cache_only_when_nothing_is_held() -> None:
    kv = KVCacheManager(8, BS)
    a = make_request("a", list(range(1, 10)))
    admit(kv, a)
    assert kv.reset_prefix_cache() is False
    kv.free(a)
    assert kv.reset_prefix_cache() is True
    assert kv.get_computed_blocks(make_request("b", list(range(1, 10))))[1] == 0
    assert kv.num_free_blocks == 7


def test_prefix_caching_off_means_no_hits_and_no_hashing() -> None:
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    a = make_request("a", list(range(1, 10)))
    b = make_request("b", list(range(1, 10)))
    admit(kv, a)
    assert admit(kv, b) == 0
    assert a.block_hashes == [] and kv.prefix_cache_queries == 0
    assert set(kv.get_block_ids(a)).isdisjoint(kv.get_block_ids(b))
