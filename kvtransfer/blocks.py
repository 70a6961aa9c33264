"""Whole KV blocks in and out of vLLM's paged KV cache.

A worker's cache is one tensor per attention layer. ``KVLayout`` finds the block axis from the
number of blocks, and the head axis from this worker's number of KV heads (vLLM's logical
per-layer order is [blocks, heads, tokens, content]; ``_head_axis``). A
transfer packs the chosen blocks of every layer, in layer-name order, into one flat byte buffer;
the receiver unpacks them into its own block ids. A transfer between different TP sizes moves a
range of heads (``kvtransfer.heads``): the buffer then holds only those heads of each block.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    name: str
    block_dim: int
    # Shape of one block of this layer (the tensor's shape without the block axis).
    block_shape: tuple[int, ...]
    dtype: str
    bytes_per_block: int
    head_axis: int | None = None  # axis of ``block_shape`` holding the KV heads

    @property
    def num_heads(self) -> int | None:
        return None if self.head_axis is None else self.block_shape[self.head_axis]

    def nbytes(self, num_blocks: int, num_heads: int | None = None) -> int:
        """Bytes of ``num_blocks`` blocks, of ``num_heads`` heads each (default: all)."""
        if num_heads is None or num_heads == self.num_heads:
            return num_blocks * self.bytes_per_block
        assert self.num_heads is not None
        return num_blocks * self.bytes_per_block // self.num_heads * num_heads


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """What a peer must match to exchange blocks with this worker."""

    layers: tuple[LayerLayout, ...]
    block_size: int

    @property
    def bytes_per_block(self) -> int:
        return sum(layer.bytes_per_block for layer in self.layers)

    @property
    def num_heads(self) -> int | None:
        """KV heads per layer on this worker; None when unknown or not the same in every layer."""
        counts = {layer.num_heads for layer in self.layers}
        return counts.pop() if len(counts) == 1 else None

    def nbytes(self, num_blocks: int, num_heads: int | None = None) -> int:
        """Bytes a transfer of ``num_blocks`` blocks moves, ``num_heads`` heads of each."""
        return sum(layer.nbytes(num_blocks, num_heads) for layer in self.layers)

    def check_heads(self, first_head: int, num_heads: int) -> str | None:
        """Why heads ``[first_head, first_head + num_heads)`` cannot be moved, if they cannot."""
        have = self.num_heads
        if first_head == 0 and num_heads == have:
            return None
        if have is None:
            return "this worker's KV head axis is unknown: only whole blocks move"
        if first_head < 0 or num_heads < 1 or first_head + num_heads > have:
            return f"heads [{first_head}, {first_head + num_heads}) out of range for {have}"
        return None

    @classmethod
    def from_caches(
        cls, kv_caches: dict[str, torch.Tensor], num_blocks: int, block_size: int,
        num_heads: int | None = None,
    ) -> KVLayout:
        """``num_heads``: this worker's KV heads per layer, to find the head axis."""
        layers = []
        for name in sorted(kv_caches):
            tensor = kv_caches[name]
            dims = [d for d, size in enumerate(tensor.shape) if size == num_blocks]
            if not dims:
                raise ValueError(f"layer {name}: no axis of size {num_blocks} in {tensor.shape}")
            block_dim = dims[0]
            block_shape = tuple(s for d, s in enumerate(tensor.shape) if d != block_dim)
            numel = 1
            for s in block_shape:
                numel *= s
            head_axis = _head_axis(block_dim, block_shape, num_heads)
            layers.append(
                LayerLayout(name, block_dim, block_shape, str(tensor.dtype).removeprefix("torch."),
                            numel * tensor.element_size(), head_axis)
            )
        return cls(tuple(layers), block_size)

    def to_wire(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "layers": [[ly.name, _without_heads(ly), ly.dtype] for ly in self.layers],
        }

    def mismatch(self, wire: dict[str, Any]) -> str | None:
        """Why a peer's layout (``to_wire`` form) cannot exchange blocks with ours, if it can't.
        The number of heads may differ (another TP size); heads are checked per pull."""
        ours = self.to_wire()
        if wire.get("block_size") != ours["block_size"]:
            return f"block size {wire.get('block_size')} != {ours['block_size']}"
        if wire.get("layers") != ours["layers"]:
            return "the KV layers differ (model, PP split, dtype or head layout)"
        return None


def _head_axis(block_dim: int, block_shape: tuple[int, ...], num_heads: int | None) -> int | None:
    """Where the heads are in a block, or None when that is not certain (heads then never
    move apart: only equal TP sizes pair)."""
    if num_heads is None:
        return None
    if block_dim == 0:  # vLLM's logical per-layer order: [blocks, heads, tokens, content]
        return 0 if block_shape and block_shape[0] == num_heads else None
    # K and V outermost ([2, blocks, tokens, heads, head_size]): the one other axis that fits.
    axes = [axis for axis, size in enumerate(block_shape) if size == num_heads and axis > 0]
    return axes[0] if len(axes) == 1 else None


def _without_heads(layer: LayerLayout) -> list[int]:
    """A block's shape with the head axis marked -1 (the part two TP sizes share)."""
    return [-1 if axis == layer.head_axis else size
            for axis, size in enumerate(layer.block_shape)]


def _narrowed(tensor: torch.Tensor, ly: LayerLayout,
              heads: tuple[int, int] | None) -> torch.Tensor:
    """A view of ``tensor`` (one layer's cache) with only ``heads`` ``(first, count)``."""
    if heads is None or heads[1] == ly.num_heads:
        return tensor
    assert ly.head_axis is not None
    return tensor.narrow(ly.head_axis + (ly.head_axis >= ly.block_dim), *heads)


def _packed(buffer: torch.Tensor, offset: int, tensor: torch.Tensor, ly: LayerLayout,
            num_blocks: int) -> torch.Tensor:
    """One layer's part of a transfer buffer (from ``offset``), as ``num_blocks`` blocks of
    ``tensor``'s dtype and shape, block axis first: a view, so writing it writes the buffer."""
    shape = [size for axis, size in enumerate(tensor.shape) if axis != ly.block_dim]
    nbytes = num_blocks * math.prod(shape) * tensor.element_size()
    return buffer[offset : offset + nbytes].view(tensor.dtype).view(num_blocks, *shape)


def gather_blocks(
    kv_caches: dict[str, torch.Tensor], layout: KVLayout, block_ids: list[int],
    heads: tuple[int, int] | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy ``block_ids`` of every layer (only heads ``(first, count)`` when given) into one
    flat uint8 tensor on the cache's device: ``out`` (exactly ``layout.nbytes`` long, e.g. a
    link's shared memory), or a new one. Each block is copied once where the block axis comes
    first (vLLM's CPU layout), straight from the cache into the buffer; twice otherwise (the
    blocks, then their transpose)."""
    import torch

    num_heads = None if heads is None else heads[1]
    expected = layout.nbytes(len(block_ids), num_heads)
    if out is None:
        out = empty_buffer(kv_caches, layout, len(block_ids), num_heads)
    elif out.numel() != expected:
        raise ValueError(f"out holds {out.numel()} bytes, {len(block_ids)} blocks need "
                         f"{expected}")
    index = _block_index(kv_caches, block_ids)
    offset = 0
    for ly in layout.layers:
        source = _narrowed(kv_caches[ly.name], ly, heads)
        packed = _packed(out, offset, source, ly, len(block_ids))
        if ly.block_dim == 0:
            torch.index_select(source, 0, index, out=packed)
        else:
            packed.copy_(source.index_select(ly.block_dim, index).movedim(ly.block_dim, 0))
        offset += packed.numel() * packed.element_size()
    return out


def empty_buffer(kv_caches: dict[str, torch.Tensor], layout: KVLayout, num_blocks: int,
                 num_heads: int | None = None):
    import torch

    return torch.empty(layout.nbytes(num_blocks, num_heads), dtype=torch.uint8,
                       device=_device(kv_caches))


def _device(kv_caches: dict[str, torch.Tensor]) -> torch.device:
    """The device of a worker's KV caches (all its layers share one)."""
    return next(iter(kv_caches.values())).device


def _block_index(kv_caches: dict[str, torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    """``block_ids`` as an index tensor on the caches' device, made once per gather or
    scatter rather than once per layer."""
    import torch

    return torch.tensor(block_ids, dtype=torch.long, device=_device(kv_caches))


def scatter_blocks(
    kv_caches: dict[str, torch.Tensor], layout: KVLayout, block_ids: list[int], buffer,
    heads: tuple[int, int] | None = None,
) -> None:
    """Write a buffer made by ``gather_blocks`` into ``block_ids`` of every layer (into local
    heads ``(first, count)`` when given; the sender's head count must equal ``count``)."""
    num_heads = None if heads is None else heads[1]
    expected = layout.nbytes(len(block_ids), num_heads)
    if buffer.numel() != expected:
        raise ValueError(f"buffer holds {buffer.numel()} bytes, {len(block_ids)} blocks need "
                         f"{expected}")
    offset = 0
    index = _block_index(kv_caches, block_ids)
    for ly in layout.layers:
        # Write into a view of only these heads: pulls from several prefill workers fill other
        # heads of the same blocks at the same time.
        target = _narrowed(kv_caches[ly.name], ly, heads)
        packed = _packed(buffer, offset, target, ly, len(block_ids))
        target.index_copy_(ly.block_dim, index, packed.movedim(0, ly.block_dim))
        offset += packed.numel() * packed.element_size()
