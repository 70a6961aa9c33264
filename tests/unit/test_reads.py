"""Direct reads of another process's KV cache (``kvtransfer.reads``), with a real second
process: what was read must be exactly the other process's blocks."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from typing import Any

import pytest
import torch

from kvtransfer.blocks import KVLayout
from kvtransfer.reads import IOV_MAX, CacheRegions, Probe, ReadError, probe, read_blocks
from tests.helpers import BLOCK_SIZE, NUM_HEADS, make_kv_caches

NUM_BLOCKS = 12
SEED = 5

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="cross-memory attach is Linux's")


def layout_of(caches: dict[str, torch.Tensor], num_blocks: int = NUM_BLOCKS) -> KVLayout:
    return KVLayout.from_caches(caches, num_blocks, BLOCK_SIZE, num_heads=NUM_HEADS)


def _owner(conn: Any) -> None:
    """A child process: a seeded cache and a probe, published; kept until told to stop."""
    caches = make_kv_caches("cpu", NUM_BLOCKS, seed=SEED)
    regions = CacheRegions.of(caches, layout_of(caches))
    nonce = Probe()
    conn.send((regions.pid, regions.layers, nonce.address, nonce.nonce))
    conn.recv()


@pytest.fixture(scope="module")
def owner() -> Any:
    """(the child's regions, probe address, nonce); the child lives for the module."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_owner, args=(child,), daemon=True)
    process.start()
    try:
        assert parent.poll(60), "the owner process did not start"
        pid, layers, address, nonce = parent.recv()
        yield CacheRegions(pid, layers), address, nonce
    finally:
        parent.send("stop")
        process.join(10)


def test_blocks_of_another_process_arrive_exactly(owner: Any) -> None:
    remote, _, _ = owner
    expected = make_kv_caches("cpu", NUM_BLOCKS, seed=SEED)  # what the child holds
    caches = make_kv_caches("cpu", NUM_BLOCKS, fill="zeros")
    layout = layout_of(caches)
    num_bytes = read_blocks(remote, CacheRegions.of(caches, layout), layout, [9, 0, 4],
                            [1, 2, 11])
    assert num_bytes == 3 * layout.bytes_per_block
    for name, tensor in expected.items():
        for s, t in ((9, 1), (0, 2), (4, 11)):
            assert torch.equal(caches[name][t], tensor[s]), (name, s, t)
        assert not torch.any(caches[name][[0, 3, 5, 6, 7, 8, 9, 10]])


def test_one_head_of_another_process_lands_in_the_chosen_head(owner: Any) -> None:
    remote, _, _ = owner
    expected = make_kv_caches("cpu", NUM_BLOCKS, seed=SEED)
    caches = make_kv_caches("cpu", NUM_BLOCKS, fill="zeros")
    layout = layout_of(caches)
    read_blocks(remote, CacheRegions.of(caches, layout), layout, [7], [3],
                remote_heads=(1, 1), local_heads=(0, 1))
    for name, tensor in expected.items():
        assert torch.equal(caches[name][3, 0], tensor[7, 1])
        assert not torch.any(caches[name][3, 1]) and not torch.any(caches[name][:3])


def test_the_probe_tells_the_right_process_from_the_wrong_one(owner: Any) -> None:
    _, address, nonce = owner
    assert probe(owner[0].pid, address, nonce) is None
    assert probe(owner[0].pid, address, bytes(len(nonce))) == "read another process's memory"
    assert probe(owner[0].pid, 8, nonce) is not None  # an address it does not map
    here = Probe()
    assert probe(os.getpid(), here.address, here.nonce) is None


def test_a_process_that_is_gone_cannot_be_read() -> None:
    ctx = mp.get_context("spawn")
    process = ctx.Process(target=int)
    process.start()
    process.join(30)
    problem = probe(process.pid, 4096, b"x" * 16)
    assert problem is not None and "No such process" in problem


def test_more_regions_than_one_call_takes_are_read_in_several() -> None:
    num_blocks = IOV_MAX // 2 + 8  # two layers: over IOV_MAX regions in all
    src = make_kv_caches("cpu", num_blocks, seed=9)
    dst = make_kv_caches("cpu", num_blocks, fill="zeros")
    layout = layout_of(src, num_blocks)
    ids = list(range(num_blocks))
    here = CacheRegions.of(src, layout)
    read_blocks(here, CacheRegions.of(dst, layout), layout, ids, ids[::-1])
    for name, tensor in src.items():
        assert torch.equal(dst[name], tensor.flip(0))


def test_a_region_past_the_peer_memory_fails_the_read() -> None:
    src = make_kv_caches("cpu", NUM_BLOCKS, seed=3)
    dst = make_kv_caches("cpu", NUM_BLOCKS, fill="zeros")
    layout = layout_of(src)
    here = CacheRegions.of(src, layout)
    bogus = CacheRegions(here.pid, tuple((8, stride) for _, stride in here.layers))
    with pytest.raises(ReadError, match="Bad address"):
        read_blocks(bogus, CacheRegions.of(dst, layout), layout, [1], [1])
    with pytest.raises(ReadError, match="remote blocks"):
        read_blocks(here, CacheRegions.of(dst, layout), layout, [1, 2], [1])


def test_only_block_major_contiguous_cpu_caches_are_readable() -> None:
    flash = make_kv_caches("flash", NUM_BLOCKS)
    assert CacheRegions.of(flash, KVLayout.from_caches(flash, NUM_BLOCKS, BLOCK_SIZE)) is None
    cpu = make_kv_caches("cpu", NUM_BLOCKS)
    strided = {name: t.transpose(1, 2).contiguous().transpose(1, 2) for name, t in cpu.items()}
    assert CacheRegions.of(strided, layout_of(strided)) is None
    assert CacheRegions.of(cpu, layout_of(cpu)) is not None


def test_block_ids_beyond_either_cache_are_refused_before_any_read() -> None:
    src = make_kv_caches("cpu", NUM_BLOCKS, seed=4)
    dst = make_kv_caches("cpu", NUM_BLOCKS, fill="zeros")
    layout = layout_of(src)
    there, here = CacheRegions.of(src, layout), CacheRegions.of(dst, layout)
    assert there.num_blocks == NUM_BLOCKS
    for remote_ids, local_ids in (([NUM_BLOCKS], [0]), ([0], [NUM_BLOCKS]), ([-1], [0])):
        with pytest.raises((ReadError, OverflowError)):
            read_blocks(there, here, layout, remote_ids, local_ids)
    assert not any(torch.any(t) for t in dst.values())
