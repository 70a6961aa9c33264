"""Chaos under load: two prefill and two decode replicas, 200 concurrent requests of mixed
lengths, streaming and not, while one replica's EngineCore, or the replica's own process, is
SIGKILLed (what the kernel's OOM killer does).

What must hold, each time:
- every request succeeds with the plain engine's greedy output, except streams already past
  their first token on a killed decode replica, which must end with an OpenAI error event;
- no KV block is left held or used once the traffic stops, well within twice the lease;
- Ray Serve replaces the killed replica (its health check fails, or its process is gone) and
  the replacement takes traffic again; the seconds that took are printed;
- a killed replica process leaves no engine process behind (its EngineCore and workers).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time

import httpx
import psutil
import pytest

from cluster.config import PDConfig, PoolConfig
from tests.helpers import alive
from tests.integration.support import (
    ALWAYS_TRANSFER,
    completion_body,
    deployed,
    make_prompts,
    wait_until,
)

APP = "pdserve-chaos"
LEASE_S = 10.0
NUM_REQUESTS = 200


@pytest.fixture(scope="module")
def app(engine_config):
    cfg = PDConfig(
        prefill=PoolConfig(engine=engine_config, num_replicas=2, cpu_cores="0"),
        decode=PoolConfig(engine=engine_config, num_replicas=2, cpu_cores="1"),
        kv_transfer={"lease_s": LEASE_S, "claim_lease_s": LEASE_S, "timeout_s": 10},
        router={"pairing": ALWAYS_TRANSFER, "prefill_timeout_s": 20, "failed_replica_s": 5},
        app_name=APP,
    )
    with deployed(cfg) as d:
        yield d.url

@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(base_url=app, timeout=180) as c:
        yield c


async def routing(client: httpx.AsyncClient) -> dict:
    return (await client.get("/routing")).json()


async def replica_stats(role: str, replica_id: str) -> dict:
    from ray import serve

    handle = serve.get_deployment_handle(role, APP)
    return await asyncio.wait_for(handle.stats.remote(pin=replica_id), 10)


async def live_replicas(client: httpx.AsyncClient, role: str, exclude: str | None = None
                        ) -> list[str]:
    """Replica ids of ``role`` the router sees, once it sees two of them (``exclude`` not one
    of them)."""
    async def ready():
        await client.post("/v1/completions", json={"prompt": "warm up", "max_tokens": 1})
        ids = sorted((await routing(client))["replicas"][role])
        return ids if len(ids) == 2 and exclude not in ids else None

    ids = await wait_until(ready, timeout_s=240, interval_s=1.0)
    assert ids, await routing(client)
    return ids


def engine_core_of(actor_pid: int) -> psutil.Process:
    """The EngineCore child process of a replica actor."""
    children = psutil.Process(actor_pid).children(recursive=True)
    cores = [p for p in children if "EngineCore" in " ".join([p.name(), *p.cmdline()])]
    assert len(cores) == 1, [(p.pid, p.name(), p.cmdline()) for p in children]
    return cores[0]


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[str, str]:
    """("ok", text) | ("error_event", text so far) | ("failed", reason)."""
    if not body.get("stream"):
        r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            return "failed", f"{r.status_code} {r.text[:200]}"
        return "ok", r.json()["choices"][0]["text"]
    text = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return "failed", f"{r.status_code} {(await r.aread())[:200]!r}"
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:"):])
            if "error" in chunk:
                return ("error_event", "".join(text)) if text else ("failed", str(chunk))
            text += [c["text"] for c in chunk.get("choices", [])]
    return "ok", "".join(text)


async def run_load_and_kill(client, bodies: list[dict], kill: psutil.Process
                            ) -> tuple[list[tuple[str, str]], float]:
    """Send every body at once; SIGKILL ``kill`` once some answers have come back."""
    done = 0

    async def tracked(body):
        nonlocal done
        result = await one_request(client, body)
        done += 1
        return result

    tasks = [asyncio.create_task(tracked(b)) for b in bodies]
    assert await wait_until(lambda: done >= 10, timeout_s=120, interval_s=0.05)
    killed_at = time.monotonic()
    kill.send_signal(signal.SIGKILL)
    return await asyncio.gather(*tasks), killed_at


def mixed_bodies(engine_config, vocab_size: int, seed: int) -> list[dict]:
    prompts = make_prompts(engine_config, vocab_size, seed=seed)
    rng = random.Random(seed)
    return [completion_body(engine_config, rng.choice(prompts), stream=i % 2 == 1)
            for i in range(NUM_REQUESTS)]


async def check_outputs(results, bodies, reference_outputs, allow_error_events: bool) -> int:
    """Every answer equals the reference; returns how many streams ended with an error event."""
    failed = [(i, r) for i, r in enumerate(results) if r[0] == "failed"]
    assert not failed, failed[:5]
    num_error_events = sum(r[0] == "error_event" for r in results)
    assert allow_error_events or num_error_events == 0
    wrong = [i for i, (status, text) in enumerate(results)
             if status == "ok" and text != await reference_outputs(dict(bodies[i], stream=False))]
    assert not wrong, f"{len(wrong)} outputs differ from the plain engine's: {wrong[:10]}"
    return num_error_events


async def all_idle(client, killed: str) -> bool:
    """No replica (but the killed one, whose figures stopped) runs a request or holds a KV
    block."""
    state = await routing(client)
    for role, replicas in state["replicas"].items():
        for rid in set(replicas) - {killed}:
            s = await replica_stats(role, rid)
            if s["kv_usage"] != 0.0 or s["num_running"] != 0 or s.get("num_held_blocks", 0):
                return False
    return True


async def replaced_and_serving(client, role: str, killed: str, killed_at: float,
                               engine_config, capsys) -> None:
    ids = await live_replicas(client, role, exclude=killed)
    replaced_s = time.monotonic() - killed_at
    (new,) = [rid for rid in ids if rid != killed and rid not in _seen[role]]
    before = await replica_stats(role, new)
    key = "prompt_tokens_total" if role == "prefill" else "generation_tokens_total"
    # Prompts that share no block (the router sends a shared prefix where it is cached, the
    # older replica), concurrent so that load spreads them; a few rounds, until the new
    # replica has taken some.
    for round_ in range(4):
        bodies = [completion_body(engine_config, f"{round_}-{i}: after the {role} replica was "
                                  "replaced") for i in range(12)]
        results = await asyncio.gather(*(one_request(client, b) for b in bodies))
        assert all(status == "ok" for status, _ in results), results
        after = await replica_stats(role, new)
        if after[key] > before[key]:
            break
    assert after[key] > before[key], "the replacement replica took no traffic"
    with capsys.disabled():
        print(f"\n{role} replica replaced and serving {replaced_s:.1f} s after the kill")


_seen: dict[str, set[str]] = {"prefill": set(), "decode": set()}


@pytest.mark.parametrize("role", ["prefill", "decode"])
async def test_engine_core_killed_under_load(app, client, engine_config, vocab_size,
                                             reference_outputs, role, capsys):
    ids = await live_replicas(client, role)
    _seen[role].update(ids)
    victim = ids[0]
    core = engine_core_of((await replica_stats(role, victim))["pid"])
    bodies = mixed_bodies(engine_config, vocab_size, seed=31 if role == "prefill" else 32)
    results, killed_at = await run_load_and_kill(client, bodies, core)
    num_error_events = await check_outputs(results, bodies, reference_outputs,
                                           allow_error_events=role == "decode")
    with capsys.disabled():
        print(f"\nSIGKILL of a {role} EngineCore under {NUM_REQUESTS} concurrent requests: "
              f"{sum(s == 'ok' for s, _ in results)} ok, {num_error_events} streams ended "
              "with an error event after their first token, 0 failed")
    idle = await wait_until(lambda: all_idle(client, victim), timeout_s=2 * LEASE_S,
                            interval_s=0.5)
    assert idle, "KV blocks still held or used after twice the lease"
    await replaced_and_serving(client, role, victim, killed_at, engine_config, capsys)


@pytest.mark.parametrize("role", ["prefill", "decode"])
async def test_replica_process_killed_under_load(app, client, engine_config, vocab_size,
                                                 reference_outputs, role, capsys):
    """The replica's own process SIGKILLed (the OOM killer's usual pick: the biggest
    Python process), not its EngineCore: the same guarantees, and its engine processes (the
    EngineCore and its workers, which no one can ask to stop any more) exit too, instead of
    keeping the pool's cores and KV cache memory."""
    ids = await live_replicas(client, role)
    _seen[role].update(ids)
    victim = ids[0]
    actor = psutil.Process((await replica_stats(role, victim))["pid"])
    engine = actor.children(recursive=True)
    assert any("EngineCore" in " ".join([p.name(), *p.cmdline()]) for p in engine), engine
    bodies = mixed_bodies(engine_config, vocab_size, seed=33 if role == "prefill" else 34)
    results, killed_at = await run_load_and_kill(client, bodies, actor)
    gone = await wait_until(lambda: not any(alive(p) for p in engine), timeout_s=30,
                            interval_s=0.2)
    gone_s = time.monotonic() - killed_at  # at most: the answers came back first
    assert gone, [(p.pid, p.name()) for p in engine if alive(p)]
    num_error_events = await check_outputs(results, bodies, reference_outputs,
                                           allow_error_events=role == "decode")
    with capsys.disabled():
        print(f"\nSIGKILL of a {role} replica process under {NUM_REQUESTS} concurrent "
              f"requests: {sum(s == 'ok' for s, _ in results)} ok, {num_error_events} "
              f"streams ended with an error event, 0 failed; its {len(engine)} engine "
              f"processes had exited {gone_s:.1f} s after the kill")
    idle = await wait_until(lambda: all_idle(client, victim), timeout_s=2 * LEASE_S,
                            interval_s=0.5)
    assert idle, "KV blocks still held or used after twice the lease"
    await replaced_and_serving(client, role, victim, killed_at, engine_config, capsys)
