"""Prefill and decode engines of several TP x PP layouts on the real stack (two real vLLM
engines, no Ray): greedy parity with one plain engine, and each worker moved exactly its share
of the KV bytes (its heads of its stage's layers).

vLLM's CPU build runs TP and PP with its multiprocessing executor on one node (it has no Ray
executor), so the stages here share a node; across nodes the same transfer code runs with each
worker bound on its own node's address (test_multinode.py, tests/unit/test_transfer.py).
PP on the CPU needs the compiled mode (``enforce_eager: false``, see cluster.config).
"""

from __future__ import annotations

import uuid
from fractions import Fraction
from typing import Any

import pytest

from cluster.engine import OpenAIEngine, kv_transfer_config
from tests.integration.support import (
    bytes_per_block,
    completion_body,
    make_prompts,
    wait_until,
)

# (prefill TP, PP), (decode TP, PP), then the share of a block's bytes (all heads, all layers)
# each prefill worker sends and each decode worker receives, in worker order (pp * tp + tp).
LAYOUTS = {
    "tp2-tp2": ((2, 1), (2, 1), [Fraction(1, 2)] * 2, [Fraction(1, 2)] * 2),
    "pp2-pp2": ((1, 2), (1, 2), [Fraction(1, 2)] * 2, [Fraction(1, 2)] * 2),
    "tp2-tp1": ((2, 1), (1, 1), [Fraction(1, 2)] * 2, [Fraction(1)]),  # fan-in
    "tp1-tp2": ((1, 1), (2, 1), [Fraction(1)], [Fraction(1, 2)] * 2),  # fan-out: both halves
    # Fan-in again, through shared memory (kv_transfer.shared_memory): the two parts are
    # gathered into and scattered from /dev/shm.
    "tp2-tp1-shm": ((2, 1), (1, 1), [Fraction(1, 2)] * 2, [Fraction(1)]),
    # And with direct reads (kv_transfer.direct_reads): the decode worker copies each prefill
    # worker's head straight out of that worker's cache; no link on either side.
    "tp2-tp1-reads": ((2, 1), (1, 1), [Fraction(1, 2)] * 2, [Fraction(1)]),
    # Fan-out with direct reads: decode rank 1 reads the second half of each block's heads.
    "tp1-tp2-reads": ((1, 1), (2, 1), [Fraction(1)], [Fraction(1, 2)] * 2),
}
LINKS = {"shm": "ShmLink", "reads": "reads"}  # by layout suffix; else TorchDistLink
NUM_PROMPTS = 6

pytestmark = pytest.mark.slow


def worker_bytes(worker: Any) -> tuple[int, int, int, list[str]]:
    """Runs inside each engine worker (``collective_rpc``): (worker index, bytes sent, bytes
    received, the kinds of link it holds) of its KV connector."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    side = get_kv_transfer_group().worker_side
    place = side.consumer.place if side.consumer is not None else None
    sent = side.producer.counts["num_bytes_sent"] if side.producer is not None else 0
    received = side.consumer.counts["num_bytes_received"] if side.consumer is not None else 0
    if place is None:
        from kvtransfer.worker import worker_place

        place = worker_place(None)
    links = [type(p._link).__name__ if hasattr(p, "_link") else "reads"
             for p in side.producer._peers.values()] if side.producer is not None else \
        ["reads" if c._remote is not None else type(c._link).__name__
         for c in side.consumer._channels.values()]
    return place.pp_rank * place.tp_size + place.tp_rank, sent, received, sorted(links)


def cores(tp: int, pp: int, single: str) -> str:
    return "0|1" if tp * pp == 2 else single


async def start_pair(engine_config, prefill: tuple[int, int], decode: tuple[int, int],
                     shared_memory: bool = False, direct_reads: bool = False):
    extra = {"host": "127.0.0.1", "lease_s": 20, "timeout_s": 10, "unknown_retry_s": 2,
             "shared_memory": shared_memory, "direct_reads": direct_reads}
    engines = []
    for role, (tp, pp), core, options in (("kv_producer", prefill, "0", {"port": 0}),
                                          ("kv_consumer", decode, "1", {})):
        cfg = engine_config.model_copy(update={
            "tensor_parallel_size": tp, "pipeline_parallel_size": pp, "enforce_eager": pp == 1,
            "distributed_executor_backend": "mp" if tp * pp > 1 else None})
        engines.append(await OpenAIEngine.start(
            cfg, kv_transfer_config(role, {**extra, **options}), cores(tp, pp, core),
            export_metrics=False))
    return engines


@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_layout_parity_and_each_workers_share(layout, engine_config, vocab_size,
                                                    reference_outputs):
    prefill_layout, decode_layout, sent_share, received_share = LAYOUTS[layout]
    from kvtransfer.link_shm import shm_files

    files_before = shm_files()
    suffix = layout.rsplit("-", 1)[1]
    prefill, decode = await start_pair(engine_config, prefill_layout, decode_layout,
                                       shared_memory=suffix == "shm",
                                       direct_reads=suffix == "reads")
    try:
        block_bytes = bytes_per_block(engine_config.model, engine_config)
        num_blocks = 0
        mismatches = []
        prompts = make_prompts(engine_config, vocab_size, seed=7)
        for prompt in prompts[::len(prompts) // NUM_PROMPTS][:NUM_PROMPTS]:
            body = completion_body(engine_config, prompt)
            first = await prefill.call("completion", {**body, "max_tokens": 1,
                                                      "kv_transfer_params": {
                                                          "do_remote_decode": True,
                                                          "transfer_id": uuid.uuid4().hex}})
            params = first["kv_transfer_params"]
            assert params["tp_size"] == prefill_layout[0]
            assert len(params["remote_addresses"]) == prefill_layout[0] * prefill_layout[1]
            num_blocks += len(params["remote_block_ids"])
            out = await decode.call("completion", {**body, "kv_transfer_params": params})
            if out["choices"][0]["text"] != await reference_outputs(body):
                mismatches.append(len(prompt))
        assert not mismatches, f"{layout}: output differs from one engine for {mismatches}"

        expected_sent = [int(share * num_blocks * block_bytes) for share in sent_share]
        expected_received = [int(share * num_blocks * block_bytes) for share in received_share]

        async def moved():
            sent = sorted(await prefill.engine.collective_rpc(worker_bytes))
            received = sorted(await decode.engine.collective_rpc(worker_bytes))
            return ([s for _, s, _, _ in sent] == expected_sent and
                    [r for _, _, r, _ in received] == expected_received), sent, received

        async def settled():
            return (await moved())[0]

        await wait_until(settled, timeout_s=10)
        ok, sent, received = await moved()
        assert ok, (layout, sent, expected_sent, received, expected_received)
        assert decode.stats.num_failed_loads == 0
        assert decode.stats.num_loads == NUM_PROMPTS * len(received_share)  # one per worker
        link = LINKS.get(suffix, "TorchDistLink")
        assert all(set(links) == {link} for *_, links in sent + received), (sent, received)
        if layout.endswith("-shm"):  # the links mapped their files and removed them
            assert shm_files() == files_before
    finally:
        prefill.shutdown()
        decode.shutdown()
