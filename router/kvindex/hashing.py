"""Chained block hashes: the keys of the KV index.

The hash of block ``i`` depends on the hash of block ``i - 1`` (its parent) and on the block's own
tokens, so equal hashes mean equal prefixes, as in vLLM's prefix cache. The index computes these
itself from token ids; it never needs the engine's own hashes to match a prompt.

Each hash is the 8-byte BLAKE2b digest of the parent hash (8 bytes) followed by the block's
tokens (4 bytes each), all little-endian, read as an unsigned little-endian integer: one
compression per 16-token block. It is stable across processes, machines and Python versions,
unlike ``hash()``. Token ids must lie in ``[0, 2**32)``.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

_DIGEST_BYTES = 8
_TOKEN_BYTES = 4
# Bytes are laid out little-endian on every machine so that hashes agree across them.
_BIG_ENDIAN = sys.byteorder == "big"
# Parent of the first block of a sequence without LoRA (or other extra keys).
ROOT_HASH = 0


def root_hash(lora_id: int | None = None) -> int:
    """Parent hash of the first block: ``ROOT_HASH``, or one root per LoRA adapter."""
    if lora_id is None:
        return ROOT_HASH
    digest = hashlib.blake2b(b"lora:%d" % lora_id, digest_size=_DIGEST_BYTES).digest()
    return int.from_bytes(digest, "little")


def hash_token_blocks(
    token_ids: Sequence[int], block_size: int, parent: int | None = None
) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (a trailing partial block is dropped).

    ``parent`` is the hash of the block just before ``token_ids[0]``; ``None`` means the sequence
    starts at the root. One C-level BLAKE2b call per block, no per-token Python work.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return []
    tokens = array("I", token_ids[: num_blocks * block_size])
    if _BIG_ENDIAN:
        tokens.byteswap()
    data = tokens.tobytes()
    step = block_size * _TOKEN_BYTES
    start = ROOT_HASH if parent is None else parent
    prev = start.to_bytes(_DIGEST_BYTES, "little")
    blake2b = hashlib.blake2b
    digests = []
    append = digests.append
    for offset in range(0, num_blocks * step, step):
        prev = blake2b(prev + data[offset : offset + step], digest_size=_DIGEST_BYTES).digest()
        append(prev)
    hashes = array("Q", b"".join(digests))
    if _BIG_ENDIAN:
        hashes.byteswap()
    return hashes.tolist()
