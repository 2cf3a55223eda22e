"""Paged KV cache bookkeeping: the block pool, one block table per sequence, and the prefix cache.

This module moves no tensors; it decides which block of the runner's KV tensors holds which token. A token at
position ``p`` of a sequence lives in block ``table[p // block_size]`` at offset ``p % block_size``.

Prefix cache. A *full* block is identified by a hash chain: ``hash(parent block's hash, the block's token
ids)``, so equal contents under different prefixes never match. Hashes are computed once per block, when the
sequence's token list fills it, and kept in ``request.block_hashes``. A block is registered in the cache when
it is full *after the step being scheduled* (the attention backend writes keys/values before attending, so a
second sequence scheduled in the same step may already read it). Blocks carry reference counts; a block whose
count drops to 0 stays cached and joins the free queue, from which blocks are taken least recently used first.
Freed blocks that hold nothing reusable go to the front of that queue, so they are reused before any cached
block is evicted.

Block 0 is reserved (the *null block*): it is never handed out, so the runner may point padding slots and
padded block-table entries at it. ``num_blocks`` counts it; ``num_usable_blocks`` does not.

Hashes are keyed BLAKE2b (64 bits) with a random per-manager key, so one user cannot craft token blocks that
collide with another user's cached prefix.
"""

from __future__ import annotations

import os
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from hashlib import blake2b

from openautoglm.engine.request import Request
from openautoglm.protocol.errors import ConfigError, InternalError

NULL_BLOCK_ID = 0

# What get_computed_blocks returns: the cached block ids of the prompt's leading full blocks, and the number
# of tokens they hold (len(block_ids) * block_size).
ComputedBlocks = tuple[list[int], int]


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    """Token ids [start, end) without concatenating the whole sequence."""
    prompt = request.prompt_token_ids
    p = len(prompt)
    if end <= p:
        return prompt[start:end]
    if start >= p:
        return request.output_token_ids[start - p : end - p]
    return prompt[start:] + request.output_token_ids[: end - p]


class KVCacheManager:
    """Allocates KV blocks to sequences and shares full blocks between them through the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ConfigError(
                f"cache.num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}", param="num_blocks"
            )
        if block_size < 1:
            raise ConfigError(f"cache.block_size must be >= 1, got {block_size}", param="block_size")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._caching = enable_prefix_caching
        self._key = os.urandom(16)
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        # Blocks with ref 0, in eviction order (front first). Values unused: an OrderedDict gives O(1) removal
        # from the middle (a cached block revived by a hit) and O(1) pops from either end.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._tables: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}  # leading blocks of a table already considered for caching
        self._queries = 0
        self._hits = 0

    # ---- properties ---------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Size of the pool, the reserved null block included (the runner's KV tensors have this many)."""
        return self._num_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self._num_blocks - 1

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def enable_prefix_caching(self) -> bool:
        return self._caching

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: never used, freed, or cached but held by no sequence (evictable)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks held by live sequences."""
        return 1.0 - len(self._free) / self.num_usable_blocks

    @property
    def prefix_cache_queries(self) -> int:
        """Tokens looked up in the prefix cache, counted once per admission (including resumptions)."""
        return self._queries

    @property
    def prefix_cache_hits(self) -> int:
        """Of those, tokens found cached (their computation was skipped)."""
        return self._hits

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_cached(self, block_id: int) -> bool:
        return self._hash[block_id] is not None

    def get_block_ids(self, request: Request) -> list[int]:
        """The request's block table. It is the live list: read it, never modify it; it grows as the request
        does and is dropped when the request's blocks are freed."""
        return self._tables.get(request.request_id, [])

    # ---- hashing ------------------------------------------------------------------------------------------

    def hash_block(self, parent: int | None, token_ids: Sequence[int]) -> int:
        """The chain hash of a full block given its parent block's hash (None for the first block)."""
        h = blake2b(digest_size=8, key=self._key)
        if parent is not None:
            h.update(parent.to_bytes(8, "little", signed=True))
        h.update(array("q", token_ids).tobytes())
        return int.from_bytes(h.digest(), "little", signed=True)

    def _update_hashes(self, request: Request) -> None:
        """Extend ``request.block_hashes`` over every block the token list has filled since the last call."""
        hashes = request.block_hashes
        bs = self._block_size
        n_full = request.num_known_tokens // bs  # a pending placeholder's block is hashed once it is read
        while len(hashes) < n_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(self.hash_block(parent, _token_slice(request, i * bs, (i + 1) * bs)))

    # ---- allocation ---------------------------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """The longest cached prefix of a request that holds no blocks. The last token is always computed (its
        logits are needed), so hits stop at ``num_tokens - 1`` rounded down to a block boundary."""
        if not self._caching:
            return [], 0
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self._block_size
        hashes = request.block_hashes
        hits: list[int] = []
        for i in range(min(max_blocks, len(hashes))):
            block_id = self._cached.get(hashes[i])
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self._block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: ComputedBlocks | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens after ``request.num_computed_tokens`` (plus, for a
        request being admitted, after its ``computed_blocks``). Returns False, changing nothing, when the pool
        is short. Blocks that are full once these tokens are computed join the prefix cache."""
        table = self._tables.get(request.request_id)
        hits = computed_blocks[0] if computed_blocks else []
        if hits and (table or request.num_computed_tokens):
            raise InternalError(f"computed blocks given for request {request.request_id}, which holds blocks")
        bs = self._block_size
        total = request.num_computed_tokens + len(hits) * bs + num_new_tokens
        have = len(table) if table else 0
        need = -(-total // bs) - have - len(hits)
        if need > 0 or hits:
            revived = sum(1 for b in hits if self._ref[b] == 0)  # cached-but-free hits leave the free queue
            if need > len(self._free) - revived:
                return False
        if table is None:
            table = self._tables[request.request_id] = []
            if self._caching:
                self._queries += request.num_tokens
                self._hits += len(hits) * bs
                self._num_registered[request.request_id] = len(hits)
        for block_id in hits:
            if self._ref[block_id] == 0:
                del self._free[block_id]
            self._ref[block_id] += 1
        table.extend(hits)
        for _ in range(need):
            table.append(self._take_free_block())
        if self._caching:
            self._register_full_blocks(request, table, total // bs)
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        h = self._hash[block_id]
        if h is not None:  # evict it from the prefix cache
            del self._cached[h]
            self._hash[block_id] = None
        self._ref[block_id] = 1
        return block_id

    def _register_full_blocks(self, request: Request, table: list[int], n_full: int) -> None:
        rid = request.request_id
        done = self._num_registered.get(rid, 0)
        if n_full <= done:
            return
        self._update_hashes(request)
        hashes = request.block_hashes
        n_full = min(n_full, len(hashes))  # a block ending on a pending placeholder joins at the next call
        for i in range(done, n_full):
            block_id = table[i]
            h = hashes[i]
            # A block with the same hash may already be cached (two sequences computed the same block): keep
            # the first; this one stays unregistered and is recycled as soon as it is freed.
            if self._hash[block_id] is None and h not in self._cached:
                self._cached[h] = block_id
                self._hash[block_id] = h
        self._num_registered[rid] = n_full

    # ---- freeing ------------------------------------------------------------------------------------------

    def free(self, request: Request, uncache: bool = False) -> None:
        """Return every block of the request at once. Cached blocks stay cached (evictable) unless
        ``uncache``: then those that no other sequence holds leave the prefix cache (their contents may be
        invalid, e.g. after a failed model step)."""
        table = self._tables.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        if not table:
            return
        # Tail blocks first: they are the least likely to be shared, so they are evicted before the prefix.
        for block_id in reversed(table):
            self._ref[block_id] -= 1
            if self._ref[block_id]:
                continue
            h = self._hash[block_id]
            if h is not None and uncache:
                del self._cached[h]
                self._hash[block_id] = None
                h = None
            self._free[block_id] = None
            if h is None:
                self._free.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (e.g. after new weights). Only possible while no sequence holds blocks;
        returns whether it happened."""
        if len(self._free) != self.num_usable_blocks:
            return False
        self._cached.clear()
        self._hash = [None] * self._num_blocks
        return True
