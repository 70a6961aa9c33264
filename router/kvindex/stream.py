"""One replica's stream of numbered KV event batches: order, gaps, restarts and replays.

vLLM's ZMQ publisher numbers its batches 0, 1, 2, ... and keeps the last ``buffer_steps`` of
them for replay. ``ReplicaStream`` decides, for each batch that arrives, what the subscriber must
do, and returns it as a list of ``Action``s for the subscriber to carry out in order; it touches
no socket and no index, so every decision can be tested on its own.

Rules (``next_seq`` is the number of the next batch the index needs):

* A batch numbered ``next_seq`` is applied; one below it was applied already (a replay overlaps
  the live stream) and is skipped.
* A batch above ``next_seq`` reveals a gap (counted in ``num_gaps``). With a replay socket the
  stream asks for every batch from ``next_seq`` on and holds live batches until the replay is
  done. Without one, or when the replay could not supply ``next_seq`` (its buffer had moved on,
  it timed out), the replica's entries are dropped (``RESET``, counted in ``num_resyncs``) and
  the index is rebuilt from the batches that follow: a removal the index missed would otherwise
  leave a block it believes cached forever, and a hint that may be wrong is worse than none.
* A live batch numbered at or below the last live one means the publisher started counting
  again (the engine restarted): ``RESET``, then learn from its replay buffer as on subscribing.
* On subscribing (``start``) the stream asks for a replay from 0, which returns everything the
  publisher still buffers; the index learns what the engine stored recently, and batches
  published before the SUB socket was connected (ZMQ's slow joiner) come back the same way.
  Blocks stored before the oldest buffered batch stay unknown: they are never wrongly present,
  merely not credited (a later block stored on top of one is dropped as an orphan by the index).
"""

from __future__ import annotations

import dataclasses
import enum


class Step(enum.Enum):
    """What the subscriber must do for one ``Action``."""

    APPLY = "apply"  # decode ``payload`` (batch number ``seq``) and apply its events
    RESET = "reset"  # drop everything the index holds for the replica; it stays registered
    REPLAY = "replay"  # ask the replay socket for every batch from ``seq`` on


@dataclasses.dataclass(frozen=True, slots=True)
class Action:
    step: Step
    seq: int = 0
    payload: bytes = b""


@dataclasses.dataclass
class StreamCounters:
    """Totals across replicas; shared by the streams of one subscriber (one thread writes)."""

    num_gaps: int = 0  # discontinuities in a replica's batch numbers
    num_replays: int = 0  # replay requests sent
    num_resyncs: int = 0  # times a replica's entries were dropped and rebuilt from what followed
    num_restarts: int = 0  # publishers that started numbering again


class ReplicaStream:
    """The ordering state of one replica's publisher; owned by the subscriber's thread.

    ``has_replay`` says whether the publisher has a replay socket. Call ``start`` once, then
    ``on_live`` for each batch of the SUB socket and ``on_replay_done`` when a requested replay
    ended (end marker) or was given up (timeout), with the batches it delivered, in order.
    """

    def __init__(self, has_replay: bool, counters: StreamCounters) -> None:
        self.has_replay = has_replay
        self.counters = counters
        self.next_seq: int | None = None  # None: nothing applied yet, any batch may come first
        self.replaying_from: int | None = None  # the start of the replay in flight, if any
        self._last_live: int | None = None
        self._held: list[tuple[int, bytes]] = []  # batches waiting for the replay to finish

    @property
    def is_replaying(self) -> bool:
        return self.replaying_from is not None

    @property
    def num_held(self) -> int:
        return len(self._held)

    def start(self) -> list[Action]:
        """Just subscribed: learn what the publisher still buffers (if it can replay)."""
        return self._request(0) if self.has_replay else []

    def on_live(self, seq: int, payload: bytes) -> list[Action]:
        """A batch from the SUB socket."""
        if self._last_live is not None and seq <= self._last_live:
            return self._restart(seq, payload)
        self._last_live = seq
        if self.replaying_from is not None:
            self._held.append((seq, payload))
            return []
        return self._advance([(seq, payload)])

    def on_replay_done(self, batches: list[tuple[int, bytes]]) -> list[Action]:
        """The replay in flight ended; ``batches`` are what it delivered, in order."""
        start, self.replaying_from = self.replaying_from, None
        held, self._held = self._held, []
        return self._advance(batches + held, replay_start=start)

    def _advance(self, batches: list[tuple[int, bytes]],
                 replay_start: int | None = None) -> list[Action]:
        actions: list[Action] = []
        for i, (seq, payload) in enumerate(batches):
            expected = self.next_seq
            if expected is not None and seq < expected:
                continue
            if expected is not None and seq > expected:
                if expected != replay_start:  # a new gap; the one replayed was counted already
                    self.counters.num_gaps += 1
                    if self.has_replay:
                        self._held = [b for b in batches[i:] if b[0] > expected]
                        return actions + self._request(expected)
                actions.append(self._reset())
            actions.append(Action(Step.APPLY, seq, payload))
            self.next_seq = seq + 1
        return actions

    def _restart(self, seq: int, payload: bytes) -> list[Action]:
        self.counters.num_restarts += 1
        self.next_seq = None
        self.replaying_from = None
        self._last_live = seq
        self._held = []
        actions = [self._reset()]
        if self.has_replay:
            self._held.append((seq, payload))
            return actions + self._request(0)
        return actions + self._advance([(seq, payload)])

    def _request(self, start: int) -> list[Action]:
        self.replaying_from = start
        self.counters.num_replays += 1
        return [Action(Step.REPLAY, start)]

    def _reset(self) -> Action:
        self.counters.num_resyncs += 1
        return Action(Step.RESET)
