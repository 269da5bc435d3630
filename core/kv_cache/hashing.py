"""Content hashes of full KV blocks, chained so a hash names the whole prefix.

    tokens   [t0 t1 t2 t3][t4 t5 t6 t7][t8 t9]
    hashes    h0 = H(b"", block 0, salt)
                           h1 = H(h0, block 1)
                                        (partial: no hash)

``H`` is sha256 over a canonical byte encoding (never Python's ``hash()``,
which is salted per process), so equal prefixes give equal hashes across
processes and a block's hash depends on every token before it. The request's
``cache_salt`` and its LoRA adapter join the first block's extra keys only: the
chain carries them to every later block, isolating tenants and adapters.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..request import Request

BlockHash = bytes


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int],
                      extra_keys: Sequence[str] = ()) -> BlockHash:
    """sha256 of (parent hash or b"", token ids as little-endian int64, extra keys as
    length-prefixed UTF-8); every part is length-prefixed so the encoding is unambiguous."""
    parent = parent_hash or b""
    digest = hashlib.sha256(struct.pack("<I", len(parent)))
    digest.update(parent)
    digest.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    for key in extra_keys:
        encoded = key.encode()
        digest.update(struct.pack("<I", len(encoded)))
        digest.update(encoded)
    return digest.digest()


def update_block_hashes(request: Request, block_size: int) -> None:
    """Append the hashes of the request's full blocks not hashed yet (prompt and
    output tokens alike). Costs O(tokens since the last call)."""
    hashes = request.block_hashes
    start = len(hashes) * block_size
    while start + block_size <= request.num_tokens:
        parent = hashes[-1] if hashes else None
        extra_keys = _first_block_keys(request) if parent is None else ()
        hashes.append(hash_block_tokens(parent, request.all_token_ids[start:start + block_size], extra_keys))
        start += block_size


def _first_block_keys(request: Request) -> tuple[str, ...]:
    """The keys that join the first block's hash (and so, through the chain, every block's): the
    tenant's ``cache_salt`` and the request's adapter, so no block is shared across salts, across
    adapters, or between an adapter and the base model."""
    keys = (request.cache_salt,) if request.cache_salt else ()
    if request.lora_request is not None:
        keys += (request.lora_request.cache_key,)
    return keys
