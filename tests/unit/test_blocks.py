"""KVLayout discovery and packing whole KV blocks in and out of paged caches."""

from __future__ import annotations

import msgpack
import pytest
import torch

from kvtransfer.blocks import KVLayout, empty_buffer, gather_blocks, scatter_blocks
from tests.helpers import (
    BLOCK_SIZE,
    HEAD_SIZE,
    NUM_HEADS,
    LayoutKind,
    block_of,
    layer_name,
    make_kv_caches,
)

NUM_BLOCKS = 10
KINDS: list[LayoutKind] = ["cpu", "flash"]
DTYPES = [torch.float32, torch.bfloat16]


def layout_of(caches: dict[str, torch.Tensor], block_size: int = BLOCK_SIZE) -> KVLayout:
    return KVLayout.from_caches(caches, NUM_BLOCKS, block_size)


@pytest.mark.parametrize(
    ("kind", "block_dim", "block_shape"),
    [
        ("cpu", 0, (NUM_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE)),
        ("flash", 1, (2, BLOCK_SIZE, NUM_HEADS, HEAD_SIZE)),
    ],
)
@pytest.mark.parametrize(
    ("dtype", "dtype_name", "itemsize"),
    [(torch.float32, "float32", 4), (torch.bfloat16, "bfloat16", 2)],
)
def test_from_caches_finds_the_block_axis(
    kind: LayoutKind, block_dim: int, block_shape: tuple[int, ...],
    dtype: torch.dtype, dtype_name: str, itemsize: int,
) -> None:
    layout = layout_of(make_kv_caches(kind, NUM_BLOCKS, num_layers=3, dtype=dtype))
    # 2 * heads * block_size * head elements per block and layer, whatever the order.
    per_layer = 2 * NUM_HEADS * BLOCK_SIZE * HEAD_SIZE * itemsize
    assert layout.block_size == BLOCK_SIZE
    assert [ly.name for ly in layout.layers] == [layer_name(i) for i in range(3)]
    for ly in layout.layers:
        assert ly.block_dim == block_dim
        assert ly.block_shape == block_shape
        assert ly.dtype == dtype_name
        assert ly.bytes_per_block == per_layer
    assert layout.bytes_per_block == 3 * per_layer


def test_layers_are_in_name_order() -> None:
    caches = make_kv_caches("cpu", NUM_BLOCKS, num_layers=1)
    tensor = caches.pop(layer_name(0))
    caches = {"b.attn": tensor, "a.attn": tensor.clone(), "c.attn": tensor.clone()}
    assert [ly.name for ly in layout_of(caches).layers] == ["a.attn", "b.attn", "c.attn"]


def test_from_caches_without_a_block_axis_raises() -> None:
    caches = make_kv_caches("cpu", NUM_BLOCKS)
    with pytest.raises(ValueError, match="no axis of size 11"):
        KVLayout.from_caches(caches, 11, BLOCK_SIZE)


def expected_bytes(
    caches: dict[str, torch.Tensor], kind: LayoutKind, block_ids: list[int]
) -> torch.Tensor:
    """The packed form, built by plain indexing: layers in name order, blocks in given order."""
    parts = []
    for name in sorted(caches):
        blocks = torch.stack([block_of(caches[name], kind, b) for b in block_ids])
        parts.append(blocks.contiguous().view(torch.uint8).reshape(-1))
    return torch.cat(parts)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_packs_blocks_in_order(kind: LayoutKind, dtype: torch.dtype) -> None:
    caches = make_kv_caches(kind, NUM_BLOCKS, dtype=dtype, seed=3)
    layout = layout_of(caches)
    block_ids = [6, 2, 9]
    buffer = gather_blocks(caches, layout, block_ids)
    assert buffer.dtype == torch.uint8
    assert buffer.numel() == 3 * layout.bytes_per_block
    assert torch.equal(buffer, expected_bytes(caches, kind, block_ids))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_writes_exactly_the_target_blocks(kind: LayoutKind, dtype: torch.dtype) -> None:
    src = make_kv_caches(kind, NUM_BLOCKS, dtype=dtype, seed=1)
    dst = make_kv_caches(kind, NUM_BLOCKS, dtype=dtype, seed=2)
    before = {name: t.clone() for name, t in dst.items()}
    layout = layout_of(src)
    src_ids, dst_ids = [3, 7, 1, 8], [0, 5, 9, 4]

    buffer = gather_blocks(src, layout, src_ids)
    scatter_blocks(dst, layout, dst_ids, buffer)

    for name in dst:
        for s, d in zip(src_ids, dst_ids, strict=True):
            assert torch.equal(block_of(dst[name], kind, d), block_of(src[name], kind, s))
        for b in set(range(NUM_BLOCKS)) - set(dst_ids):
            assert torch.equal(block_of(dst[name], kind, b), block_of(before[name], kind, b))
    for name in src:  # the source is only read
        assert not torch.equal(src[name], dst[name])


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_of_one_block(kind: LayoutKind) -> None:
    src = make_kv_caches(kind, NUM_BLOCKS, seed=5)
    dst = make_kv_caches(kind, NUM_BLOCKS, fill="zeros")
    layout = layout_of(src)
    scatter_blocks(dst, layout, [9], gather_blocks(src, layout, [0]))
    for name in src:
        assert torch.equal(block_of(dst[name], kind, 9), block_of(src[name], kind, 0))
        assert int(torch.count_nonzero(dst[name])) == int(
            torch.count_nonzero(block_of(src[name], kind, 0))
        )


def test_empty_buffer_fits_the_blocks() -> None:
    caches = make_kv_caches("flash", NUM_BLOCKS, dtype=torch.bfloat16)
    layout = layout_of(caches)
    buffer = empty_buffer(caches, layout, 3)
    assert buffer.dtype == torch.uint8
    assert buffer.numel() == 3 * 2 * (2 * NUM_HEADS * BLOCK_SIZE * HEAD_SIZE * 2)


def test_scatter_refuses_a_buffer_of_the_wrong_size() -> None:
    caches = make_kv_caches("cpu", NUM_BLOCKS)
    layout = layout_of(caches)
    buffer = gather_blocks(caches, layout, [1, 2])
    padded = torch.cat([buffer, torch.zeros(4, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="buffer holds"):
        scatter_blocks(caches, layout, [1, 2], padded)
    with pytest.raises(ValueError, match="out holds"):  # torch.cat would resize it
        gather_blocks(caches, layout, [1, 2], out=padded)


@pytest.mark.parametrize("kind", KINDS)
def test_same_layout_has_no_mismatch_after_the_wire(kind: LayoutKind) -> None:
    ours = layout_of(make_kv_caches(kind, NUM_BLOCKS, seed=0))
    theirs = layout_of(make_kv_caches(kind, NUM_BLOCKS, seed=9, fill="zeros"))
    wire = msgpack.unpackb(msgpack.packb(theirs.to_wire()))  # tuples come back as lists
    assert ours.mismatch(wire) is None


def test_to_wire_form() -> None:
    layout = layout_of(make_kv_caches("cpu", NUM_BLOCKS, num_layers=1))
    assert layout.to_wire() == {
        "block_size": BLOCK_SIZE,
        "layers": [[layer_name(0), [NUM_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE], "float32"]],
    }


def test_mismatch_detects_block_size() -> None:
    ours = layout_of(make_kv_caches("cpu", NUM_BLOCKS))
    theirs = layout_of(make_kv_caches("cpu", NUM_BLOCKS, block_size=8), block_size=8)
    problem = ours.mismatch(theirs.to_wire())
    assert problem is not None
    assert "block size 8 != 4" in problem


@pytest.mark.parametrize(
    "other",
    [
        {"num_layers": 1},
        {"num_layers": 3},
        {"dtype": torch.bfloat16},
        {"num_heads": 1},  # another TP split
        {"head_size": 4},
    ],
    ids=["fewer-layers", "more-layers", "dtype", "heads", "head-size"],
)
def test_mismatch_detects_layer_differences(other: dict) -> None:
    ours = layout_of(make_kv_caches("cpu", NUM_BLOCKS))
    theirs = layout_of(make_kv_caches("cpu", NUM_BLOCKS, **other))
    problem = ours.mismatch(theirs.to_wire())
    assert problem is not None
    assert "layers differ" in problem


def test_mismatch_detects_backend_layout() -> None:
    cpu = layout_of(make_kv_caches("cpu", NUM_BLOCKS))
    flash = layout_of(make_kv_caches("flash", NUM_BLOCKS))
    assert cpu.mismatch(flash.to_wire()) is not None
    assert flash.mismatch(cpu.to_wire()) is not None


def test_mismatch_of_an_empty_wire() -> None:
    ours = layout_of(make_kv_caches("cpu", NUM_BLOCKS))
    assert ours.mismatch({}) is not None
    assert ours.mismatch({"block_size": BLOCK_SIZE}) is not None


# -- head ranges (prefill and decode of different TP sizes) ------------------------------------


def head_of(tensor: torch.Tensor, kind: LayoutKind, block_id: int, head: int) -> torch.Tensor:
    """One head of one block, by plain indexing."""
    return tensor[block_id, head] if kind == "cpu" else tensor[:, block_id, :, head]


def heads_layout(caches: dict[str, torch.Tensor], num_heads: int) -> KVLayout:
    return KVLayout.from_caches(caches, NUM_BLOCKS, BLOCK_SIZE, num_heads=num_heads)


@pytest.mark.parametrize(("kind", "axis"), [("cpu", 0), ("flash", 2)])
def test_the_head_axis_is_found_on_both_layouts(kind: LayoutKind, axis: int) -> None:
    layout = heads_layout(make_kv_caches(kind, NUM_BLOCKS), NUM_HEADS)
    assert [ly.head_axis for ly in layout.layers] == [axis, axis]
    assert layout.num_heads == NUM_HEADS
    assert layout.nbytes(3, 1) * NUM_HEADS == layout.nbytes(3) == 3 * layout.bytes_per_block
    # Not known: no head axis, and only whole blocks move.
    assert layout_of(make_kv_caches(kind, NUM_BLOCKS)).num_heads is None


def test_an_ambiguous_head_axis_is_left_unknown() -> None:
    # K/V outermost, and heads equal to the block size: two axes could be the heads.
    caches = make_kv_caches("flash", NUM_BLOCKS, num_heads=BLOCK_SIZE)
    assert heads_layout(caches, BLOCK_SIZE).num_heads is None


@pytest.mark.parametrize("kind", KINDS)
def test_one_head_moves_into_the_other_sides_head(kind: LayoutKind) -> None:
    """Head 1 of a 2-head worker's blocks goes to a 1-head worker (fan-out), and back into head
    1 of a zeroed 2-head worker (fan-in), leaving head 0 untouched."""
    two = make_kv_caches(kind, NUM_BLOCKS, seed=5)
    one = make_kv_caches(kind, NUM_BLOCKS, num_heads=1, fill="zeros")
    two_layout, one_layout = heads_layout(two, 2), heads_layout(one, 1)
    assert two_layout.mismatch(one_layout.to_wire()) is None  # only the heads differ
    buffer = gather_blocks(two, two_layout, [4, 7], heads=(1, 1))
    assert buffer.numel() == two_layout.nbytes(2, 1)
    scatter_blocks(one, one_layout, [0, 9], buffer)
    back = make_kv_caches(kind, NUM_BLOCKS, fill="zeros")
    scatter_blocks(back, two_layout, [2, 3], gather_blocks(one, one_layout, [0, 9]),
                   heads=(1, 1))
    for name in two:
        for src, mid, dst in ((4, 0, 2), (7, 9, 3)):
            assert torch.equal(head_of(one[name], kind, mid, 0), head_of(two[name], kind, src, 1))
            assert torch.equal(head_of(back[name], kind, dst, 1), head_of(two[name], kind, src, 1))
            assert not torch.any(head_of(back[name], kind, dst, 0))


@pytest.mark.parametrize(("first", "count", "problem"), [
    (0, 2, None), (1, 1, None), (0, 1, None),
    (1, 2, "out of range"), (2, 1, "out of range"), (0, 0, "out of range"), (-1, 1, "out of range"),
])
def test_head_ranges_are_checked(first: int, count: int, problem: str | None) -> None:
    layout = heads_layout(make_kv_caches("cpu", NUM_BLOCKS), NUM_HEADS)
    got = layout.check_heads(first, count)
    assert got is None if problem is None else problem in got
    assert "unknown" in layout_of(make_kv_caches("cpu", NUM_BLOCKS)).check_heads(1, 1)
