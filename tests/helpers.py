"""Helpers the unit and integration tests share: fake KV caches, bounded waits, keys that
collide in the KV index's tables."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    import psutil
    import torch

T = TypeVar("T")
LayoutKind = Literal["cpu", "flash"]

# Small default shapes. None of them equals a realistic test num_blocks (use e.g. 10), so
# the block axis is unambiguous to ``KVLayout.from_caches``.
NUM_HEADS = 2
HEAD_SIZE = 8
BLOCK_SIZE = 4


def layer_name(index: int) -> str:
    return f"model.layers.{index}.self_attn.attn"


def cache_shape(
    layout_kind: LayoutKind, num_blocks: int, block_size: int = BLOCK_SIZE,
    num_heads: int = NUM_HEADS, head_size: int = HEAD_SIZE,
) -> tuple[int, ...]:
    """One layer's KV cache shape as an attention backend lays it out.

    ``cpu``: [num_blocks, heads, block_size, 2 * head] (block axis first).
    ``flash``: [2, num_blocks, block_size, heads, head] (K/V axis first, block axis second).
    """
    if layout_kind == "cpu":
        return (num_blocks, num_heads, block_size, 2 * head_size)
    if layout_kind == "flash":
        return (2, num_blocks, block_size, num_heads, head_size)
    raise ValueError(f"unknown layout kind {layout_kind!r}")


def block_axis(layout_kind: LayoutKind) -> int:
    return 0 if layout_kind == "cpu" else 1


def make_kv_caches(
    layout_kind: LayoutKind,
    num_blocks: int,
    *,
    num_layers: int = 2,
    block_size: int = BLOCK_SIZE,
    num_heads: int = NUM_HEADS,
    head_size: int = HEAD_SIZE,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    fill: Literal["random", "zeros"] = "random",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A worker's paged KV cache: one tensor per attention layer, keyed by layer name."""
    import torch

    dtype = dtype or torch.float32
    shape = cache_shape(layout_kind, num_blocks, block_size, num_heads, head_size)
    generator = torch.Generator().manual_seed(seed)
    caches = {}
    for i in range(num_layers):
        if fill == "random":
            tensor = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
        else:
            tensor = torch.zeros(shape, dtype=dtype)
        caches[layer_name(i)] = tensor.to(device)
    return caches


def block_of(tensor: torch.Tensor, layout_kind: LayoutKind, block_id: int) -> torch.Tensor:
    """One block of one layer, read by plain indexing (independent of ``kvtransfer.blocks``)."""
    return tensor[block_id] if layout_kind == "cpu" else tensor[:, block_id]


def wait_until(
    predicate: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.01,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); fail after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(interval_s)


def alive(process: psutil.Process) -> bool:
    """The process runs (not gone, not a zombie waiting to be reaped)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def keys_at_home(home: int, count: int, capacity: int) -> list[int]:
    """``count`` distinct 64-bit keys whose home position in a KV index table of ``capacity``
    positions (``router.kvindex.table``: Fibonacci hashing) is ``home``."""
    from router.kvindex.table import SPREAD, home_shift

    inverse = pow(int(SPREAD), -1, 2**64)  # SPREAD is odd
    shift = int(home_shift(capacity))
    return [((home << shift) + j) * inverse % 2**64 for j in range(count)]
