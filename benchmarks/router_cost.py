"""What the router's KV index costs: decision time, event ingestion rate, memory per block.

``python -m benchmarks.router_cost [--blocks 1048576] [--replicas 16] [--queries 2000]``

Builds a ``KVIndex`` of about ``--blocks`` distinct 16-token blocks spread over ``--replicas``
replicas by applying ``StoredBlocks`` events as vLLM publishes them (one event per 2048-token
prefill chunk, 128 blocks), then times 8192-token prompts (512 blocks): hashing, ``match``, and
the whole routing decision (hash, match, context, ``PairSelector`` over 8 prefill and 8 decode
candidates with the router's shipped policies and settings, ``cluster.config.RouterConfig``;
each request is reported done 64 decisions later, so the policies track as many in flight).
It also times the ingress's whole work for one request of ``serve_compare``'s size, the text
of 1,024 random token ids as vLLM's random dataset makes it (about 1,210 tokens once
tokenized again): parsing the JSON body with vLLM's request model, tokenizing with the demo
model's tokenizer, and the routing decision in the same index; and a chat request of the same
text, parsed and rendered by vLLM's renderer (``router/tokenizing.py``). Memory is measured with
tracemalloc in a second build. Prints one table; garbage collection stays on, as in a real
router.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from cluster.config import RouterConfig
from router.kvindex import (
    KVIndex,
    RemovedBlocks,
    StoredBlocks,
    hash_token_blocks,
    hash_token_blocks_array,
)
from router.pairing import PairChoice, PairingSettings, PairSelector
from router.policies import make_policy
from router.policy import Candidate, ReplicaLoad, RoutingContext

BLOCK_SIZE = 16
PROMPT_TOKENS = 8192
CHUNK_BLOCKS = 128  # blocks per StoredBlocks event: one 2048-token prefill chunk
SYSTEM_BLOCKS = 32  # every document starts with one of a few shared system prompts
NUM_SYSTEM_PROMPTS = 32

Event = tuple[str, StoredBlocks]


def random_tokens(rng: random.Random, n: int) -> array:
    return array("I", rng.randbytes(4 * n))


def make_documents(rng: random.Random, num_blocks: int) -> list[array]:
    """8192-token documents behind shared system prompts, ~num_blocks distinct blocks in all."""
    systems = [random_tokens(rng, SYSTEM_BLOCKS * BLOCK_SIZE) for _ in range(NUM_SYSTEM_PROMPTS)]
    unique_blocks = PROMPT_TOKENS // BLOCK_SIZE - SYSTEM_BLOCKS
    count = max(1, (num_blocks - NUM_SYSTEM_PROMPTS * SYSTEM_BLOCKS) // unique_blocks)
    rest = PROMPT_TOKENS - SYSTEM_BLOCKS * BLOCK_SIZE
    return [systems[i % NUM_SYSTEM_PROMPTS] + random_tokens(rng, rest) for i in range(count)]


def make_events(rng: random.Random, docs: Sequence[array], num_replicas: int) -> list[Event]:
    """Each document is prefilled on one replica, in chunks; engine hashes are opaque ints."""
    events: list[Event] = []
    for i, doc in enumerate(docs):
        replica = f"replica-{i % num_replicas}"
        parent = None
        for start in range(0, len(doc) // BLOCK_SIZE, CHUNK_BLOCKS):
            hashes = [rng.getrandbits(63) for _ in range(CHUNK_BLOCKS)]
            tokens = doc[start * BLOCK_SIZE : (start + CHUNK_BLOCKS) * BLOCK_SIZE]
            events.append((replica, StoredBlocks(hashes, parent, tokens, BLOCK_SIZE)))
            parent = hashes[-1]
    return events


def ingest(index: KVIndex, events: Sequence[Event]) -> tuple[float, float]:
    """Apply the events; (wall seconds, CPU seconds of this thread)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for replica, event in events:
        index.apply(replica, event)
    return time.perf_counter() - wall, time.thread_time() - cpu


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)]


Timing = tuple[float, float, float, float]  # wall p50, wall p99, CPU p50, CPU p99


def time_each(fn: Callable[[Any], object], prompts: Sequence[Any]) -> Timing:
    """Per-call wall time and CPU time of this thread (the latter ignores other processes)."""
    wall, cpu = [], []
    for prompt in prompts:
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        fn(prompt)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.thread_time() - start_cpu)
    return (*percentiles(wall), *percentiles(cpu))


class Decisions:
    """Routing decisions as the router makes them, each request done ``IN_FLIGHT`` later."""

    IN_FLIGHT = 64

    def __init__(self, index: KVIndex, loads: list[Candidate]) -> None:
        config = RouterConfig()
        self.index = index
        self.loads = loads
        self.selector = PairSelector(
            make_policy(config.prefill_policy, **config.policy_kwargs("prefill")),
            make_policy(config.decode_policy, **config.policy_kwargs("decode")),
            PairingSettings(**config.pairing),
        )
        self.in_flight: deque[tuple[RoutingContext, PairChoice]] = deque()
        self.num_decisions = 0

    def decide(self, prompt: array) -> None:
        chains = hash_token_blocks_array(prompt, BLOCK_SIZE)  # as router/coordinator.py does
        cached = {rid: n * BLOCK_SIZE for rid, n in self.index.match(chains).items()}
        self.num_decisions += 1
        ctx = RoutingContext(str(self.num_decisions), len(prompt), BLOCK_SIZE, prompt, cached,
                             chains.tolist())
        choice = self.selector.select(self.loads[:8], self.loads[8:], ctx)
        self.in_flight.append((ctx, choice))
        if len(self.in_flight) > self.IN_FLIGHT:
            self.done(*self.in_flight.popleft())

    def done(self, ctx: RoutingContext, choice: PairChoice) -> None:
        if choice.prefill is not None:
            self.selector.prefill_policy.on_request_done(choice.prefill.replica_id, ctx)
        self.selector.decode_policy.on_request_done(choice.decode.replica_id, ctx)


INGRESS_PROMPT_TOKENS = 1024
INGRESS_REQUESTS = 500  # timed requests of that size (at most --queries)


def ingress_rows(decisions: Decisions, rng: random.Random, n: int
                 ) -> list[tuple[str, Timing]]:
    """The ingress's work for one request: parse, tokenize, decide (``router/app.py``); for
    a chat request of the same text, parse and render with vLLM's renderer."""
    import asyncio
    import json

    from transformers import AutoTokenizer

    from cluster.config import DEMO_MODEL_DIR
    from deploy.demo_model import ensure_demo_model
    from router.openai_api import parse_body
    from router.tokenizing import PromptTokenizer

    model = str(ensure_demo_model(DEMO_MODEL_DIR))  # built here if it is not there yet
    tokenizer = PromptTokenizer(model)
    # Prompts as vLLM's random dataset makes them: random token ids turned into text.
    decode = AutoTokenizer.from_pretrained(model).decode
    vocab = tokenizer.vocab_size
    bodies, chats = [], []
    for _ in range(n):
        text = decode([rng.randrange(3, vocab) for _ in range(INGRESS_PROMPT_TOKENS)])
        bodies.append(json.dumps({"model": "m", "prompt": text, "max_tokens": 128,
                                  "stream": True}).encode())
        chats.append(json.dumps({"model": "m", "messages": [{"role": "user", "content": text}],
                                 "max_tokens": 128, "stream": True}).encode())
    loop = asyncio.new_event_loop()

    def render(raw: bytes) -> list[int] | None:
        return loop.run_until_complete(tokenizer.chat_ids(parse_body(raw, "chat", "m")))

    def parse(raw: bytes) -> dict:
        return parse_body(raw, "completion", "m")

    def tokenize(raw: bytes) -> list[int] | None:
        return tokenizer.token_ids(parse(raw))

    def whole(raw: bytes) -> None:
        decisions.decide(array("I", tokenize(raw) or []))

    rows = [("ingress: parse the body", time_each(parse, bodies)),
            ("ingress: parse + tokenize", time_each(tokenize, bodies)),
            ("ingress: parse + tokenize + decide", time_each(whole, bodies)),
            ("ingress: parse + render a chat", time_each(render, chats))]
    loop.close()
    return rows


def make_queries(rng: random.Random, docs: Sequence[array], n: int) -> list[array]:
    """Half repeat a whole indexed document (the longest walk), half share only a system prompt."""
    queries = []
    for i in range(n):
        doc = docs[rng.randrange(len(docs))]
        if i % 2:
            shared = SYSTEM_BLOCKS * BLOCK_SIZE
            doc = doc[:shared] + random_tokens(rng, len(doc) - shared)
        queries.append(doc)
    return queries


def measure_memory(events: Sequence[Event]) -> tuple[int, int]:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = KVIndex()
    ingest(index, events)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used, index.num_blocks


Rates = tuple[float, float]  # blocks per wall second, per CPU second


def ingestion_rates(events: Sequence[Event]) -> tuple[KVIndex, Rates, Rates]:
    """Build the index from the events; blocks/s for stores, then for removals."""
    index = KVIndex()
    stored_wall, stored_cpu = ingest(index, events)
    num_stored = sum(len(e.block_hashes) for _, e in events)
    victims = [(r, RemovedBlocks(e.block_hashes[-16:])) for r, e in events[::10]]
    removed_wall, removed_cpu = ingest(index, victims)  # type: ignore[arg-type]
    num_removed = sum(len(e.block_hashes) for _, e in victims)
    for replica, event in events[::10]:  # put the removed blocks back
        index.apply(replica, event)
    stored = (num_stored / stored_wall, num_stored / stored_cpu)
    return index, stored, (num_removed / removed_wall, num_removed / removed_cpu)


def decision_rows(
    index: KVIndex, prompts: Sequence[array], num_replicas: int, rng: random.Random
) -> tuple[Decisions, list[tuple[str, Timing]]]:
    loads = [
        Candidate(f"replica-{i}", ReplicaLoad(rng.randrange(8), 0, rng.randrange(50_000), 0.5))
        for i in range(num_replicas)
    ]
    decisions = Decisions(index, loads)
    hashed = {id(p): hash_token_blocks_array(p, BLOCK_SIZE) for p in prompts}
    return decisions, [
        (
            f"hash an {PROMPT_TOKENS}-token prompt (list)",
            time_each(lambda p: hash_token_blocks(p, BLOCK_SIZE), prompts),
        ),
        ("match in the index", time_each(lambda p: index.match(hashed[id(p)]), prompts)),
        (
            "whole decision: hash + match + pair",
            time_each(decisions.decide, prompts),
        ),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1 << 20)
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    docs = make_documents(rng, args.blocks)
    events = make_events(rng, docs, args.replicas)
    index, stored, removed = ingestion_rates(events)
    decisions, rows = decision_rows(index, make_queries(rng, docs, args.queries),
                                    args.replicas, rng)
    rows += ingress_rows(decisions, rng, min(args.queries, INGRESS_REQUESTS))
    memory_bytes, memory_blocks = measure_memory(events)
    print(
        f"KV index: {index.num_blocks:,} distinct blocks of {BLOCK_SIZE} tokens on "
        f"{args.replicas} replicas; {args.queries} prompts of {PROMPT_TOKENS} tokens "
        f"({PROMPT_TOKENS // BLOCK_SIZE} blocks)"
    )
    header = f"{'routing cost':<36} {'wall p50':>9} {'wall p99':>9} {'CPU p50':>9} {'CPU p99':>9}"
    print(header)
    for label, timing in rows:
        print(f"{label:<36}" + "".join(f" {t * 1e3:>7.3f}ms" for t in timing))
    for label, (wall, cpu) in (("Stored, 128/event", stored), ("Removed, 16/event", removed)):
        print(f"{'ingest ' + label:<36} {wall:>9,.0f}/s wall {cpu:>9,.0f}/s CPU (blocks)")
    per_block = memory_bytes / memory_blocks
    print(f"{'memory per indexed block (tracemalloc)':<36} {per_block:>9,.0f} bytes")
    estimate = index.estimate_memory_bytes() / index.num_blocks
    print(f"{'estimate_memory_bytes() per block':<36} {estimate:>9,.0f} bytes")


if __name__ == "__main__":
    main()
