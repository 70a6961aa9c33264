"""One replica's sockets: the SUB socket of its publisher and the DEALER of a replay in flight.

Wire format (vLLM ``ZmqEventPublisher``): the PUB socket sends ``(topic, seq, payload)``, ``seq``
an 8-byte big-endian batch number. Replay: a DEALER sends ``(b"", start_seq)``; the ROUTER
answers ``(b"", topic, seq, payload)`` for each buffered batch numbered ``>= start_seq``, then
``(b"", b"", END_SEQ, b"")``. A ``ReplicaFeed`` only moves frames; what to do with a batch is
its ``ReplicaStream``'s decision and the subscriber's job. Every socket is read without
blocking, and a replay that stops answering is given up after ``replay_timeout_s``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import zmq

from router.kvindex.stream import ReplicaStream

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # vLLM's end-of-replay marker
MAX_MESSAGES_PER_POLL = 512  # per socket, so that one busy replica cannot starve the others

# What ``recv_live`` / ``recv_replay`` yield for a message that does not follow the format.
MALFORMED = (-1, b"")


class ReplicaFeed:
    """Owned by the subscriber's thread; registers its sockets with the thread's poller."""

    def __init__(self, ctx: zmq.Context, poller: zmq.Poller, replica_id: str, endpoint: str,
                 replay_endpoint: str | None, stream: ReplicaStream,
                 replay_timeout_s: float) -> None:
        """Connect the SUB socket (raises ``zmq.ZMQError`` for an address zmq refuses)."""
        self.replica_id = replica_id
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.stream = stream
        self.replay: zmq.Socket | None = None  # the DEALER of the replay in flight
        self.replayed: list[tuple[int, bytes]] = []  # what it delivered so far
        self._ctx = ctx
        self._poller = poller
        self._replay_timeout_s = replay_timeout_s
        self._deadline = 0.0
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            self.sub.connect(endpoint)
        except zmq.ZMQError:
            self.sub.close(linger=0)
            raise
        poller.register(self.sub, zmq.POLLIN)

    def recv_live(self) -> Iterator[tuple[int, bytes]]:
        """The ``(seq, payload)`` of each waiting message (``MALFORMED`` for a bad one)."""
        for _ in range(MAX_MESSAGES_PER_POLL):
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[1]) != 8:
                yield MALFORMED
            else:
                yield int.from_bytes(frames[1], "big"), frames[2]

    def start_replay(self, start: int) -> None:
        """Ask for every batch from ``start`` on (replacing a replay in flight).

        Raises ``zmq.ZMQError`` if the request cannot be sent; the replay is then closed.
        """
        self.close_replay()
        if self.replay_endpoint is None:
            raise ValueError(f"replica {self.replica_id} has no replay endpoint")
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)  # take the whole replay in, whatever its size
        self.replay = sock
        self._poller.register(sock, zmq.POLLIN)
        self._deadline = time.monotonic() + self._replay_timeout_s
        try:
            sock.connect(self.replay_endpoint)
            sock.send_multipart([b"", start.to_bytes(8, "big")], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.close_replay()
            raise

    def recv_replay(self) -> Iterator[tuple[int, bytes]]:
        """Collect waiting replay messages into ``replayed``; yields ``MALFORMED`` for each bad
        one. Returns once nothing waits or the end marker came (then ``is_replay_done``)."""
        for _ in range(MAX_MESSAGES_PER_POLL):
            if self.replay is None:
                return
            try:
                frames = self.replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._deadline = time.monotonic() + self._replay_timeout_s  # it is answering
            if len(frames) != 4 or frames[0] != b"" or len(frames[2]) != 8:
                yield MALFORMED
            elif frames[2] == END_SEQ:
                self._deadline = 0.0
                return
            else:
                self.replayed.append((int.from_bytes(frames[2], "big"), frames[3]))

    @property
    def is_replay_done(self) -> bool:
        """The end marker came (``_deadline`` is then 0)."""
        return self.replay is not None and self._deadline == 0.0

    def is_replay_overdue(self, now: float) -> bool:
        return self.replay is not None and self._deadline != 0.0 and now > self._deadline

    def take_replayed(self) -> list[tuple[int, bytes]]:
        """End the replay in flight: what it delivered, in order."""
        batches = self.replayed
        self.close_replay()
        return batches

    def close_replay(self) -> None:
        sock, self.replay, self.replayed = self.replay, None, []
        if sock is not None:
            self._poller.unregister(sock)
            sock.close(linger=0)

    def close(self) -> None:
        self.close_replay()
        self._poller.unregister(self.sub)
        self.sub.close(linger=0)
