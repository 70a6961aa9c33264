"""Whole KV blocks in and out of vLLM's paged KV cache.

A worker's cache is one tensor per attention layer. Where the block axis sits depends on the
attention backend (the CPU backend puts it first, FlashAttention second), so ``KVLayout`` finds
it from the number of blocks. A transfer packs the chosen blocks of every layer, in layer-name
order, into one flat byte buffer; the receiver unpacks them into its own block ids.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """What a peer must match to exchange blocks with this worker."""

    layers: tuple[LayerLayout, ...]
    block_size: int

    @property
    def bytes_per_block(self) -> int:
        return sum(layer.bytes_per_block for layer in self.layers)

    @classmethod
    def from_caches(
        cls, kv_caches: dict[str, torch.Tensor], num_blocks: int, block_size: int
    ) -> KVLayout:
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
            layers.append(
                LayerLayout(name, block_dim, block_shape, str(tensor.dtype).removeprefix("torch."),
                            numel * tensor.element_size())
            )
        return cls(tuple(layers), block_size)

    def to_wire(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "layers": [[ly.name, list(ly.block_shape), ly.dtype] for ly in self.layers],
        }

    def mismatch(self, wire: dict[str, Any]) -> str | None:
        """Why a peer's layout (``to_wire`` form) cannot exchange blocks with ours, if it can't."""
        ours = self.to_wire()
        if wire.get("block_size") != ours["block_size"]:
            return f"block size {wire.get('block_size')} != {ours['block_size']}"
        if wire.get("layers") != ours["layers"]:
            return "the KV layers differ (model, TP/PP split, dtype or head layout)"
        return None


def gather_blocks(
    kv_caches: dict[str, torch.Tensor], layout: KVLayout, block_ids: list[int]
) -> torch.Tensor:
    """Copy ``block_ids`` of every layer into one new flat uint8 tensor on the cache's device."""
    import torch

    parts = []
    for ly in layout.layers:
        tensor = kv_caches[ly.name]
        index = torch.tensor(block_ids, dtype=torch.long, device=tensor.device)
        picked = tensor.index_select(ly.block_dim, index).movedim(ly.block_dim, 0)
        parts.append(picked.contiguous().view(torch.uint8).reshape(-1))
    return torch.cat(parts)


def empty_buffer(kv_caches: dict[str, torch.Tensor], layout: KVLayout, num_blocks: int):
    import torch

    device = next(iter(kv_caches.values())).device
    return torch.empty(num_blocks * layout.bytes_per_block, dtype=torch.uint8, device=device)


def scatter_blocks(
    kv_caches: dict[str, torch.Tensor], layout: KVLayout, block_ids: list[int], buffer
) -> None:
    """Write a buffer made by ``gather_blocks`` into ``block_ids`` of every layer."""
    import torch

    if buffer.numel() != layout.bytes_per_block * len(block_ids):
        raise ValueError(f"buffer holds {buffer.numel()} bytes, {len(block_ids)} blocks need "
                         f"{layout.bytes_per_block * len(block_ids)}")
    offset = 0
    for ly in layout.layers:
        tensor = kv_caches[ly.name]
        nbytes = ly.bytes_per_block * len(block_ids)
        chunk = buffer[offset : offset + nbytes].view(tensor.dtype)
        blocks = chunk.reshape((len(block_ids), *ly.block_shape)).movedim(0, ly.block_dim)
        index = torch.tensor(block_ids, dtype=torch.long, device=tensor.device)
        tensor.index_copy_(ly.block_dim, index, blocks)
        offset += nbytes
