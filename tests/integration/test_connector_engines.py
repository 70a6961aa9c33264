"""The KV connector between two real vLLM engines (no Ray): parity, real transfer, failures."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from cluster.engine import OpenAIEngine, kv_transfer_config
from tests.integration.support import (
    bytes_per_block,
    completion_body,
    corrupt_held_blocks,
    make_prompts,
    num_blocks,
    wait_until,
)

LEASE_S = 4.0


@pytest.fixture(scope="module")
async def engines(engine_config):
    extra = {"host": "127.0.0.1", "lease_s": LEASE_S, "timeout_s": 10, "unknown_retry_s": 1}
    # Port 0: the prefill worker binds a free port and reports it through vLLM's handshake.
    prefill = await OpenAIEngine.start(
        engine_config, kv_transfer_config("kv_producer", {**extra, "port": 0}), "0",
        kv_events_host="127.0.0.1")
    decode = await OpenAIEngine.start(
        engine_config, kv_transfer_config("kv_consumer", extra), "1")
    yield prefill, decode
    prefill.shutdown()
    decode.shutdown()


async def prefill_then_decode(prefill, decode, body):
    first = await prefill.call("completion", {**body, "max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True, "transfer_id": uuid.uuid4().hex}})
    params = first["kv_transfer_params"]
    out = await decode.call("completion", {**body, "kv_transfer_params": params})
    return params, out


async def test_parity_and_real_transfer(engines, engine_config, vocab_size, reference_outputs):
    prefill, decode = engines
    prompts = make_prompts(engine_config, vocab_size, seed=1)
    before = dict(vars(decode.stats))
    expected_bytes = 0
    mismatches = []
    for prompt in prompts:
        body = completion_body(engine_config, prompt)
        params, out = await prefill_then_decode(prefill, decode, body)
        assert len(params["remote_block_ids"]) == num_blocks(len(prompt), engine_config)
        [(host, port)] = params["remote_addresses"]
        assert host and 0 < port < 65536 and "remote_ports" not in params
        expected_bytes += len(params["remote_block_ids"]) * bytes_per_block(
            engine_config.model, engine_config)
        if out["choices"][0]["text"] != await reference_outputs(body):
            mismatches.append(len(prompt))
    assert not mismatches, f"PD output differs from one engine for prompt lengths {mismatches}"

    total = sum(len(p) for p in prompts)

    def moved():
        s = decode.stats
        return s.num_bytes_received - before["num_bytes_received"] == expected_bytes and \
            s.prompt_tokens_total - before["prompt_tokens_total"] == total

    assert await wait_until(moved), (vars(decode.stats), expected_bytes)
    s = decode.stats
    # The decode engine computed at most the last prompt token of each request itself.
    assert s.prompt_tokens_computed - before["prompt_tokens_computed"] <= len(prompts)
    assert s.prompt_tokens_external - before["prompt_tokens_external"] >= total - len(prompts)
    assert s.num_failed_loads == before["num_failed_loads"]


async def test_corrupted_blocks_change_the_output(engines, engine_config, vocab_size,
                                                  reference_outputs):
    prefill, decode = engines
    prompt = make_prompts(engine_config, vocab_size, seed=2)[9]  # several blocks
    body = completion_body(engine_config, prompt)
    first = await prefill.call("completion", {**body, "max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True, "transfer_id": (tid := uuid.uuid4().hex)}})
    corrupted = await prefill.engine.collective_rpc(corrupt_held_blocks, args=(tid,))
    assert corrupted == [num_blocks(len(prompt), engine_config)]
    out = await decode.call("completion", {**body, "kv_transfer_params":
                                           first["kv_transfer_params"]})
    assert out["choices"][0]["text"] != await reference_outputs(body)


async def test_failed_load_is_recomputed(engines, engine_config, vocab_size, reference_outputs):
    """Transfer parameters naming a transfer the prefill side does not hold: the load fails,
    vLLM recomputes the prompt, and the answer is still right."""
    prefill, decode = engines
    body = completion_body(engine_config, make_prompts(engine_config, vocab_size, seed=3)[10])
    first = await prefill.call("completion", {**body, "max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True, "transfer_id": uuid.uuid4().hex}})
    before = dict(vars(decode.stats))
    bogus = {**first["kv_transfer_params"], "transfer_id": uuid.uuid4().hex}
    out = await decode.call("completion", {**body, "kv_transfer_params": bogus})
    assert out["choices"][0]["text"] == await reference_outputs(body)
    assert await wait_until(lambda: decode.stats.num_failed_loads == before["num_failed_loads"] + 1)
    assert decode.stats.prompt_tokens_computed - before["prompt_tokens_computed"] >= len(
        body["prompt"]) - 1


async def test_other_prompt_tokens_are_not_loaded(engines, engine_config, vocab_size,
                                                  reference_outputs):
    """Transfer parameters of another prompt with as many blocks: the decode side sees the
    token digest differ, computes the prompt itself, and lets the prefill side free its hold
    at once (well before the lease)."""
    prefill, decode = engines
    prompts = make_prompts(engine_config, vocab_size, seed=6)
    other = completion_body(engine_config, prompts[9])
    body = completion_body(engine_config, prompts[9][::-1])  # same length, other tokens
    assert await wait_until(lambda: prefill.stats.kv_usage == 0.0)
    first = await prefill.call("completion", {**other, "max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True, "transfer_id": uuid.uuid4().hex}})
    before = dict(vars(decode.stats))
    out = await decode.call("completion", {**body, "kv_transfer_params":
                                           first["kv_transfer_params"]})
    assert out["choices"][0]["text"] == await reference_outputs(body)
    assert decode.stats.num_loads == before["num_loads"]
    assert await wait_until(lambda: prefill.stats.kv_usage == 0.0, timeout_s=LEASE_S / 2)


async def test_unclaimed_blocks_are_freed_after_the_lease(engines, engine_config, vocab_size):
    prefill, _ = engines
    assert await wait_until(lambda: prefill.stats.kv_usage == 0.0)
    body = completion_body(engine_config, make_prompts(engine_config, vocab_size, seed=5)[12])
    first = await prefill.call("completion", {**body, "max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True, "transfer_id": uuid.uuid4().hex}})
    assert first["kv_transfer_params"]["remote_block_ids"]
    await asyncio.sleep(0.5)
    assert prefill.stats.kv_usage > 0.0  # held for the decode side
    assert await wait_until(lambda: prefill.stats.kv_usage == 0.0, timeout_s=LEASE_S + 10)


async def test_index_follows_real_kv_events(engines, engine_config, vocab_size):
    """The router's index, fed by the prefill engine's own ZMQ publisher, sees the blocks a
    prompt left in its prefix cache, and sees them go when the engine clears its cache."""
    import threading

    from router.kv_events import KVEventSubscriber
    from router.kvindex import KVIndex, hash_token_blocks

    prefill, _ = engines
    index, lock = KVIndex(), threading.Lock()
    subscriber = KVEventSubscriber(index, lock)
    subscriber.sync({"prefill-0": prefill.kv_events_endpoint})
    try:
        await asyncio.sleep(1.0)  # let the subscription reach the publisher
        prompt = make_prompts(engine_config, vocab_size, seed=7)[13]  # 13 full blocks + 3
        hashes = hash_token_blocks(prompt, engine_config.block_size)
        assert len(hashes) == len(prompt) // engine_config.block_size
        await prefill.call("completion", completion_body(engine_config, prompt, max_tokens=1))

        def held() -> int:
            with lock:
                return index.match(hashes).get("prefill-0", 0)

        assert await wait_until(lambda: held() == len(hashes)), (held(), subscriber.num_events)
        with lock:  # vLLM's engine hashes are 64-bit ints: the replica's key map is compiled
            assert index._replicas["prefill-0"].blocks.is_compiled
        other = make_prompts(engine_config, vocab_size, seed=8)[13]
        other_hashes = hash_token_blocks(other, engine_config.block_size)
        with lock:
            assert index.match(other_hashes) == {}
        assert await prefill.engine.reset_prefix_cache()
        # Events leave the engine with its next step: run another prompt.
        await prefill.call("completion", completion_body(engine_config, other, max_tokens=1))
        assert await wait_until(lambda: held() == 0)
        with lock:
            assert index.match(other_hashes) == {"prefill-0": len(other_hashes)}
    finally:
        subscriber.close()


async def test_two_prompts_with_one_transfer_id_do_not_kill_the_prefill_engine(
        engines, engine_config, vocab_size, reference_outputs):
    """One set of transfer parameters sent with a list of two prompts used to kill the prefill
    EngineCore ("transfer ... is already held"): now the second hold is refused, its blocks
    freed at once, and the engine keeps serving."""
    prefill, decode = engines
    assert await wait_until(lambda: prefill.stats.kv_usage == 0.0)
    prompts = make_prompts(engine_config, vocab_size, seed=9)
    both = [prompts[9], prompts[10]]
    first = await prefill.call("completion", {
        **completion_body(engine_config, both), "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True, "transfer_id": uuid.uuid4().hex}})
    assert "error" not in first, first
    assert len(first["choices"]) == 2
    # The engine still serves, and a transfer still works end to end.
    body = completion_body(engine_config, prompts[11])
    _, out = await prefill_then_decode(prefill, decode, body)
    assert out["choices"][0]["text"] == await reference_outputs(body)
    # The refused duplicate did not stay held: only the one accepted hold waits for its lease.
    assert await wait_until(lambda: prefill.stats.kv_usage == 0.0, timeout_s=LEASE_S + 10)


async def test_n2_on_decode_loads_the_transfer_once(engines, engine_config, vocab_size,
                                                    reference_outputs):
    """vLLM fans n=2 out into two requests with the same transfer parameters: one loads, the
    other waits and then finds the loaded blocks in the prefix cache."""
    prefill, decode = engines
    prompt = make_prompts(engine_config, vocab_size, seed=10)[9]  # several blocks
    body = completion_body(engine_config, prompt)
    first = await prefill.call("completion", {**body, "max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True, "transfer_id": uuid.uuid4().hex}})
    params = first["kv_transfer_params"]
    before = dict(vars(decode.stats))
    # vLLM refuses n > 1 with temperature 0; top_k=1 samples the argmax all the same.
    out = await decode.call("completion", {**body, "n": 2, "temperature": 1.0, "top_k": 1,
                                           "kv_transfer_params": params})
    assert "choices" in out, out
    expected = await reference_outputs(body)
    assert [c["text"] for c in out["choices"]] == [expected, expected]
    block_bytes = bytes_per_block(engine_config.model, engine_config)

    def loaded_once():
        s = decode.stats
        return s.num_loads - before["num_loads"] == 1 and \
            s.num_bytes_received - before["num_bytes_received"] == \
            len(params["remote_block_ids"]) * block_bytes

    assert await wait_until(loaded_once), (vars(decode.stats), before)
    assert decode.stats.num_failed_loads == before["num_failed_loads"]
