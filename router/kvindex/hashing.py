"""Chained block hashes: the keys of the KV index.

The hash of block ``i`` depends on the hash of block ``i - 1`` (its parent) and on the block's own
tokens, so equal hashes mean equal prefixes, as in vLLM's prefix cache. The index computes these
itself from token ids; it never needs the engine's own hashes to match a prompt.

The construction, all arithmetic modulo 2**64 on unsigned 64-bit integers::

    content(block) = fmix64(C + sum over k of token[k] * R[k])  C, R: fixed 64-bit constants
    hash(block i)  = hash(block i - 1) * M + content(block i)  M: a fixed odd constant

``fmix64`` is MurmurHash3's 64-bit finalizer (a bijection that spreads every input bit over the
output; ``C`` keeps a block of zeros from hashing to the fixed point 0). The content hash is a
multilinear hash of the tokens, the chain step a multiply-add, so a whole prompt is hashed in one
compiled loop (numba; a multiply-add per token) instead of one digest per block: no per-block
Python work. The hashes are stable across processes, machines and Python versions, unlike
``hash()``. Token ids must lie in ``[0, 2**32)``. It is a routing key, not a cryptographic hash:
a collision costs a cache miss.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

import numpy as np
from numba import types

from router.kvindex.compiled import compiled

_DIGEST_BYTES = 8
_MASK = (1 << 64) - 1
# Parent of the first block of a sequence without LoRA (or other extra keys).
ROOT_HASH = 0
_CHAIN = 0x9E3779B97F4A7C15  # M: odd
_CONTENT_OFFSET = 0x2545F4914F6CDD1D  # C


def root_hash(lora_id: int | None = None) -> int:
    """Parent hash of the first block: ``ROOT_HASH``, or one root per LoRA adapter."""
    if lora_id is None:
        return ROOT_HASH
    digest = hashlib.blake2b(b"lora:%d" % lora_id, digest_size=_DIGEST_BYTES).digest()
    return int.from_bytes(digest, "little")


def _splitmix64(state: int) -> tuple[int, int]:
    """One step of SplitMix64: (next state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return state, z ^ (z >> 31)


class _Tables:
    """Token multipliers R, grown on demand (replaced whole: thread-safe)."""

    def __init__(self) -> None:
        self.multipliers = np.zeros(0, dtype=np.uint64)

    def token_multipliers(self, block_size: int) -> np.ndarray:
        multipliers = self.multipliers  # read once: another thread may replace it
        if len(multipliers) < block_size:
            state, values = 0x5DEECE66D, []
            for _ in range(block_size):
                state, value = _splitmix64(state)
                values.append(value | 1)
            self.multipliers = multipliers = np.array(values, dtype=np.uint64)
        return multipliers[:block_size]


_TABLES = _Tables()


def token_multipliers(block_size: int) -> list[int]:
    """The constants ``R`` of the construction for blocks of ``block_size`` tokens."""
    return _TABLES.token_multipliers(block_size).tolist()


_U64 = types.uint64


@compiled(_U64[::1](types.uint32[::1], types.int64, _U64[::1], _U64))
def _chain_hashes(tokens, block_size, multipliers, parent):  # pragma: no cover - compiled
    """The chained hashes of ``len(tokens) // block_size`` whole blocks (uint64 arithmetic;
    ``multipliers`` holds at least ``block_size`` values)."""
    num_blocks = tokens.shape[0] // block_size
    hashes = np.empty(num_blocks, dtype=np.uint64)
    shift = np.uint64(33)
    chain = parent
    for block in range(num_blocks):
        x = np.uint64(_CONTENT_OFFSET)
        base = block * block_size
        for k in range(block_size):
            x += np.uint64(tokens[base + k]) * multipliers[k]
        x ^= x >> shift  # fmix64
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> shift
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> shift
        chain = chain * np.uint64(_CHAIN) + x
        hashes[block] = chain
    return hashes


def _token_array(token_ids: Sequence[int], count: int) -> np.ndarray:
    """The first ``count`` token ids as uint32 (no copy for an ``array('I')``)."""
    if isinstance(token_ids, array) and token_ids.typecode == "I":
        return np.frombuffer(token_ids, dtype=np.uint32, count=count)
    return np.frombuffer(array("I", token_ids[:count]), dtype=np.uint32)


def hash_token_blocks(
    token_ids: Sequence[int], block_size: int, parent: int | None = None
) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (a trailing partial block is dropped).

    ``parent`` is the hash of the block just before ``token_ids[0]``; ``None`` means the sequence
    starts at the root. Hashing ``a + b`` equals hashing ``a``, then ``b`` with the last hash of
    ``a`` as parent.
    """
    return hash_token_blocks_array(token_ids, block_size, parent).tolist()


def hash_token_blocks_array(
    token_ids: Sequence[int], block_size: int, parent: int | None = None
) -> np.ndarray:
    """``hash_token_blocks`` as a ``uint64`` array."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return np.zeros(0, dtype=np.uint64)
    tokens = _token_array(token_ids, num_blocks * block_size)
    start = ROOT_HASH if parent is None else parent
    return _chain_hashes(tokens, block_size, _TABLES.token_multipliers(block_size),
                         np.uint64(start))
