"""Property tests of the KV index against a brute-force model.

The model knows nothing of hashes: a block is the tuple of all tokens up to its end (its whole
prefix), and each replica is a set of such prefixes. A replica matches a prompt for ``k`` blocks
when it holds all of the prompt's first ``k`` prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from router.kvindex import AllCleared, KVIndex, RemovedBlocks, StoredBlocks, hash_token_blocks

BLOCK = 2
REPLICAS = ("r0", "r1", "r2", "r3")
# A tiny alphabet and short prompts make shared prefixes (and so real tree sharing) common.
prompts = st.lists(st.integers(0, 2), min_size=0, max_size=5 * BLOCK)
replica_ids = st.sampled_from(REPLICAS)
SETTINGS = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def prefixes(tokens: Sequence[int]) -> list[tuple[int, ...]]:
    """The model's blocks of a prompt: one tuple per full block, holding the whole prefix."""
    return [tuple(tokens[: (i + 1) * BLOCK]) for i in range(len(tokens) // BLOCK)]


def model_match(model: dict[str, set[tuple[int, ...]]], tokens: Sequence[int]) -> dict[str, int]:
    result = {}
    for replica, held in model.items():
        depth = 0
        for block in prefixes(tokens):
            if block not in held:
                break
            depth += 1
        if depth:
            result[replica] = depth
    return result


class DirectUpdates(RuleBasedStateMachine):
    """insert / remove / clear_replica / remove_replica with the index's own hashes."""

    def __init__(self) -> None:
        super().__init__()
        self.index = KVIndex()
        self.model: dict[str, set[tuple[int, ...]]] = {}
        self.seen: list[list[int]] = [[]]

    @rule(replica=replica_ids, tokens=prompts)
    def insert(self, replica: str, tokens: list[int]) -> None:
        self.index.insert(replica, hash_token_blocks(tokens, BLOCK))
        self.model.setdefault(replica, set()).update(prefixes(tokens))
        self.seen.append(tokens)

    @rule(replica=replica_ids, data=st.data())
    def remove_some(self, replica: str, data: st.DataObject) -> None:
        tokens = data.draw(st.sampled_from(self.seen))
        blocks = prefixes(tokens)
        indices = st.sampled_from(range(len(blocks))) if blocks else st.nothing()
        picked = data.draw(st.lists(indices, unique=True))
        hashes = hash_token_blocks(tokens, BLOCK)
        self.index.remove(replica, [hashes[i] for i in picked])
        if replica in self.model:
            self.model[replica].difference_update(blocks[i] for i in picked)

    @rule(replica=replica_ids)
    def clear_replica(self, replica: str) -> None:
        self.index.clear_replica(replica)
        if replica in self.model:
            self.model[replica] = set()

    @rule(replica=replica_ids)
    def remove_replica(self, replica: str) -> None:
        self.index.remove_replica(replica)
        self.model.pop(replica, None)

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        tokens = data.draw(st.one_of(st.sampled_from(self.seen), prompts))
        assert self.index.match(hash_token_blocks(tokens, BLOCK)) == model_match(self.model, tokens)

    @invariant()
    def block_counts_agree(self) -> None:
        assert self.index.num_blocks == len(set().union(*self.model.values()))
        for replica, held in self.model.items():
            assert self.index.num_blocks_of(replica) == len(held)


class EngineEvents(RuleBasedStateMachine):
    """StoredBlocks / RemovedBlocks / AllCleared as engines publish them, opaque hashes."""

    def __init__(self) -> None:
        super().__init__()
        self.index = KVIndex()
        self.model: dict[str, set[tuple[int, ...]]] = {}
        self.engine_ids: dict[tuple[int, ...], int] = {}  # content -> engine hash (same everywhere)
        self.seen: list[list[int]] = [[]]

    def engine_hash(self, block: tuple[int, ...]) -> int:
        return self.engine_ids.setdefault(block, 7_000_000 + 13 * len(self.engine_ids))

    @rule(replica=replica_ids, tokens=prompts, data=st.data())
    def store(self, replica: str, tokens: list[int], data: st.DataObject) -> None:
        blocks = prefixes(tokens)
        held = self.model.setdefault(replica, set())
        # An engine stores blocks after a prefix it holds (or from the root).
        starts = [0] + [i + 1 for i, b in enumerate(blocks) if b in held]
        start = data.draw(st.sampled_from(starts))
        if start == len(blocks):
            return
        parent = self.engine_hash(blocks[start - 1]) if start else None
        event = StoredBlocks(
            [self.engine_hash(b) for b in blocks[start:]],
            parent,
            tokens[start * BLOCK : len(blocks) * BLOCK],
            BLOCK,
        )
        self.index.apply(replica, event)
        held.update(blocks[start:])
        self.seen.append(tokens)

    @rule(replica=replica_ids, data=st.data())
    def evict(self, replica: str, data: st.DataObject) -> None:
        held = sorted(self.model.get(replica, ()))
        if not held:
            return
        gone = data.draw(st.lists(st.sampled_from(held), unique=True, max_size=4))
        self.index.apply(replica, RemovedBlocks([self.engine_hash(b) for b in gone]))
        self.model[replica].difference_update(gone)

    @rule(replica=replica_ids)
    def clear_all(self, replica: str) -> None:
        self.index.apply(replica, AllCleared())
        self.model[replica] = set()

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data())
    def replica_dies(self, data: st.DataObject) -> None:
        replica = data.draw(st.sampled_from(sorted(self.model)))
        self.index.remove_replica(replica)
        del self.model[replica]

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        tokens = data.draw(st.one_of(st.sampled_from(self.seen), prompts))
        assert self.index.match(hash_token_blocks(tokens, BLOCK)) == model_match(self.model, tokens)

    @invariant()
    def nothing_orphaned(self) -> None:
        assert self.index.stats().num_orphan_blocks == 0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class GuessedEntries(RuleBasedStateMachine):
    """record_routed with expiry, against a model keeping each block's latest expiry."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.index = KVIndex(clock=self.clock)
        self.expiry: dict[str, dict[tuple[int, ...], float]] = {}
        self.seen: list[list[int]] = [[]]

    @rule(
        replica=st.sampled_from(REPLICAS[:2]),
        ttl=st.sampled_from([1.0, 2.5, 5.0, float("inf")]),
        data=st.data(),
    )
    def route(self, replica: str, ttl: float, data: st.DataObject) -> None:
        tokens = data.draw(st.one_of(st.sampled_from(self.seen[-3:]), prompts))
        self.index.record_routed(replica, hash_token_blocks(tokens, BLOCK), ttl)
        held = self.expiry.setdefault(replica, {})
        for block in prefixes(tokens):
            held[block] = max(held.get(block, 0.0), self.clock.now + ttl)
        self.seen.append(tokens)

    @rule(dt=st.sampled_from([0.5, 1.0, 2.5, 4.0]))
    def tick(self, dt: float) -> None:
        self.clock.now += dt

    @rule(replica=replica_ids)
    def remove_replica(self, replica: str) -> None:
        self.index.remove_replica(replica)
        self.expiry.pop(replica, None)

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        tokens = data.draw(st.sampled_from(self.seen[-3:]))
        live = {
            r: {b for b, until in held.items() if until > self.clock.now}
            for r, held in self.expiry.items()
        }
        assert self.index.match(hash_token_blocks(tokens, BLOCK)) == model_match(live, tokens)


class BytesEngineEvents(EngineEvents):
    """Engine hashes as bytes (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``): the dict maps."""

    def engine_hash(self, block: tuple[int, ...]) -> bytes:  # type: ignore[override]
        return repr(block).encode()


class MixedEngineEvents(EngineEvents):
    """Ints for the first blocks ever seen, bytes after: a replica's map moves to a dict with
    entries in it."""

    def engine_hash(self, block: tuple[int, ...]) -> int | bytes:  # type: ignore[override]
        number = super().engine_hash(block)  # the block's order of first sight, encoded
        is_early = (number - 7_000_000) // 13 < 6
        return number if is_early else number.to_bytes(8, "big")


TestDirectUpdates = DirectUpdates.TestCase
TestEngineEvents = EngineEvents.TestCase
TestBytesEngineEvents = BytesEngineEvents.TestCase
TestMixedEngineEvents = MixedEngineEvents.TestCase
TestGuessedEntries = GuessedEntries.TestCase
TestDirectUpdates.settings = SETTINGS
TestEngineEvents.settings = SETTINGS
TestBytesEngineEvents.settings = SETTINGS
TestMixedEngineEvents.settings = SETTINGS
TestGuessedEntries.settings = settings(SETTINGS, max_examples=150)
