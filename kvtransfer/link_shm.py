"""A link through shared memory, for a (prefill worker, decode worker) pair on one host whose
KV caches are in CPU memory. It keeps the ``Link`` contract of ``kvtransfer.link``.

Memory. Files in ``/dev/shm`` mapped by both processes (``numpy.memmap``): a small header,
made by the prefill side (rank 0) when the link is built, and one data region per sending
rank, made by the sender and replaced by a larger one when a buffer does not fit. The side
that maps a file second unlinks it at once, so a file lives in ``/dev/shm`` only until the
peer has mapped it; ``close()`` unlinks whatever is still there. A process that dies leaves
nothing behind but a file its peer had not mapped yet.

Pairing. Rank 0 makes the header and puts its name in the TCPStore (under ``group``); rank 1
maps and unlinks it, then says so in the store. A peer on another host finds no such file,
says that instead, and both constructors raise ``LinkError`` (``same_host_link`` then builds a
``TorchDistLink``).

Header. Per sending rank, int64 fields with one writer each: ``SEQ`` (messages published),
``TAG``, ``NUM_BYTES``, ``WRITTEN`` (bytes of the message written so far), ``GEN`` and
``CAPACITY`` (the data region in use) and ``CLOSED``, all written by the sender; ``ACK`` (the
last message read) written by the receiver. One message is in flight per direction:

    send:  wait ACK == SEQ; grow the region if needed; TAG, NUM_BYTES, WRITTEN = 0; SEQ += 1;
           copy the buffer in chunks, raising WRITTEN after each (the receiver copies out the
           chunks already there meanwhile); return (the buffer may be reused).
    recv:  wait SEQ == ACK + 1; refuse another TAG or size (``LinkError``); copy out as
           WRITTEN grows; ACK = SEQ.

Waits spin for up to ``SPIN_S`` (yielding the core at each turn), then poll with
``kvtransfer.link.poll_until``'s backoff up to the deadline (``LinkTimeout``). A receiver
waiting for bytes of a message being written spins longer (``written_spin_s``: the time a slow
writer, at 2 GB/s, takes for the whole message, up to a millisecond; each such wait spins
anew), then polls every ``WRITING_PAUSE_S`` without backing off: a 4 MiB gather takes longer
than ``SPIN_S``, and the sleeps of the backoff would add up to a millisecond to a transfer
that takes a fifth of that. A failure breaks
the link and sets ``CLOSED``, so the peer fails at once rather than at its own deadline. Stores
to the header are ordered as written on x86 (TSO): data before ``WRITTEN``, fields before
``SEQ``; on weaker memory models this needs fences.

Besides ``send`` and ``recv``, ``send_view(num_bytes, tag)`` and ``recv_view(num_bytes, tag)``
are context managers that yield the message's bytes in shared memory, to fill (gather into) or
to read (scatter from) without a copy of their own; the message is published, or released to
the sender, when the block exits. A view must not be used after its block.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from kvtransfer.link import POLL_MAX_S, Link, LinkError, LinkTimeout, TorchDistLink, poll_until

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
NAME_PREFIX = "pdserve-link-"
SEQ, TAG, NUM_BYTES, WRITTEN, GEN, CAPACITY, ACK, CLOSED = range(8)
_SLOT = 8  # int64 fields per sending rank
MIN_CAPACITY_BYTES = 1 << 20
# The sender writes a message in chunks of a quarter of it, at least MIN_CHUNK_BYTES and at most
# MAX_CHUNK_BYTES; the receiver copies out chunk i while the sender writes chunk i + 1.
MIN_CHUNK_BYTES = 256 << 10
MAX_CHUNK_BYTES = 1 << 20
CHUNKS_PER_MESSAGE = 4
SPIN_S = 200e-6  # poll without sleeping (yielding the core) this long, then back off
# While a message is being written, the receiver spins longer: SPIN_S plus the time a slow
# writer takes for the message at SPIN_BYTES_PER_S (gathers run at 10 to 45 GB/s here), at most
# MAX_SPIN_S (the spin takes CPU from the engine's own threads on its core), then polls every
# WRITING_PAUSE_S without backing off (a backoff step would add up to 2 ms to the transfer).
SPIN_BYTES_PER_S = 2e9
MAX_SPIN_S = 1e-3
WRITING_PAUSE_S = 50e-6
_STORE_KEY = "shm"
_ATTACHED_KEY = "shm-attached"


def written_spin_s(num_bytes: int) -> float:
    """How long a receiver spins, in each wait for bytes of a message of ``num_bytes`` being
    written, before it polls with sleeps."""
    return min(SPIN_S + num_bytes / SPIN_BYTES_PER_S, MAX_SPIN_S)


def shm_files() -> set[str]:
    """Names of this module's files now in ``SHM_DIR`` (for leak checks)."""
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(NAME_PREFIX)}
    except FileNotFoundError:
        return set()


class ShmLink(Link):
    """A link whose two ends share memory; rank 0 is the prefill worker. CPU tensors only."""

    def __init__(
        self,
        store: torch.distributed.Store,
        group: str,
        rank: int,
        device: torch.device,
        host: str,
        timeout_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if device.type != "cpu":
            raise LinkError(f"a shared-memory link moves host memory, not {device}")
        self._rank = rank
        self._peer = 1 - rank
        self._timeout_s = timeout_s
        self._clock = clock
        self.broken: str | None = None
        self._data: dict[int, Any] = {}  # sending rank -> uint8 tensor over its region
        self._gen = {0: 0, 1: 0}
        self._own_path: str | None = None  # our data region, until the peer unlinks it
        self._base, self._header = _pair(_prefixed(store, group), rank, timeout_s)

    # -- the Link contract ---------------------------------------------------------------------

    def send(self, buffer: torch.Tensor, tag: int) -> None:
        num_bytes = buffer.numel()
        with self._sending(num_bytes, tag) as (view, set_written):
            chunk = min(max(num_bytes // CHUNKS_PER_MESSAGE, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
            for start in range(0, num_bytes, chunk):
                end = min(start + chunk, num_bytes)
                view[start:end].copy_(buffer[start:end])
                set_written(end)

    def recv(self, buffer: torch.Tensor, tag: int) -> None:
        num_bytes = buffer.numel()
        with self._receiving(num_bytes, tag) as (view, wait_written):
            done = 0
            while done < num_bytes:
                ready = wait_written(done)
                buffer[done:ready].copy_(view[done:ready])
                done = ready

    @contextlib.contextmanager
    def send_view(self, num_bytes: int, tag: int) -> Iterator[torch.Tensor]:
        """Yield ``num_bytes`` of shared memory to fill; they go to the peer on exit."""
        with self._sending(num_bytes, tag) as (view, set_written):
            yield view
            set_written(num_bytes)

    @contextlib.contextmanager
    def recv_view(self, num_bytes: int, tag: int) -> Iterator[torch.Tensor]:
        """Yield the peer's message under ``tag`` (``num_bytes`` long), in shared memory;
        the sender may overwrite it once the block exits."""
        with self._receiving(num_bytes, tag) as (view, wait_written):
            wait_written(num_bytes - 1)
            yield view

    def close(self) -> None:
        if self._header is not None:
            self._header[self._rank * _SLOT + CLOSED] = 1
        if self.broken is None:
            self.broken = "closed"
        _unlink(self._own_path)
        self._own_path = None
        self._header = None
        self._data.clear()

    # -- one message -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _sending(self, num_bytes: int, tag: int) -> Iterator[tuple[Any, Callable[[int], None]]]:
        with self._failing(f"send of {num_bytes} bytes (tag {tag})") as deadline:
            h, mine = self._header, self._rank * _SLOT
            self._wait(lambda: h[mine + ACK] == h[mine + SEQ], deadline,
                       "the peer's read of the previous message")
            view = self._own_region(num_bytes)
            h[mine + TAG], h[mine + NUM_BYTES], h[mine + WRITTEN] = tag, num_bytes, 0
            h[mine + SEQ] += 1

            def set_written(num_written: int) -> None:
                h[mine + WRITTEN] = num_written

            yield view, set_written

    @contextlib.contextmanager
    def _receiving(self, num_bytes: int, tag: int) -> Iterator[tuple[Any, Callable[[int], int]]]:
        with self._failing(f"recv of {num_bytes} bytes (tag {tag})") as deadline:
            h, theirs = self._header, self._peer * _SLOT
            self._wait(lambda: h[theirs + SEQ] != h[theirs + ACK], deadline, "a message")
            sent_tag, sent_bytes = int(h[theirs + TAG]), int(h[theirs + NUM_BYTES])
            if sent_tag != tag or sent_bytes != num_bytes:
                raise LinkError(f"the peer sent {sent_bytes} bytes under tag {sent_tag}")
            view = self._peer_region()[:num_bytes]

            spin_s = written_spin_s(num_bytes)

            def wait_written(num_done: int) -> int:
                self._wait(lambda: h[theirs + WRITTEN] > num_done, deadline, "the message",
                           spin_s, WRITING_PAUSE_S)
                return int(h[theirs + WRITTEN])

            yield view, wait_written
            h[theirs + ACK] = h[theirs + SEQ]

    @contextlib.contextmanager
    def _failing(self, what: str) -> Iterator[float]:
        """Yield the deadline; on any failure break the link and raise ``LinkError``."""
        if self.broken is not None:
            raise LinkError(f"link is broken: {self.broken}")
        try:
            yield self._clock() + self._timeout_s
        except BaseException as e:
            self._abort(f"{what}: {e}")
            if isinstance(e, LinkError):
                raise
            raise LinkError(f"{what} failed: {e}") from e

    def _abort(self, reason: str) -> None:
        self.close()
        self.broken = reason

    def _wait(self, is_done: Callable[[], bool], deadline_s: float, what: str,
              spin_s: float = SPIN_S, max_pause_s: float = POLL_MAX_S) -> None:
        peer_closed = self._peer * _SLOT + CLOSED
        header = self._header

        def check() -> bool:
            if is_done():
                return True
            if header[peer_closed]:
                raise LinkError(f"the peer closed the link while we waited for {what}")
            return False

        spin_until = time.perf_counter() + spin_s
        while time.perf_counter() < spin_until:
            if check():
                return
            os.sched_yield()  # the peer may share our core
        poll_until(check, deadline_s, what, self._clock, max_pause_s=max_pause_s)

    # -- data regions ----------------------------------------------------------------------------

    def _own_region(self, num_bytes: int) -> Any:
        """Our data region, grown to hold ``num_bytes``; the header names it for the peer."""
        import torch

        h, mine = self._header, self._rank * _SLOT
        if num_bytes > h[mine + CAPACITY]:
            capacity = max(MIN_CAPACITY_BYTES, 1 << (num_bytes - 1).bit_length())
            gen = int(h[mine + GEN]) + 1
            path = f"{self._base}-{self._rank}-{gen}"
            region = np.memmap(path, dtype=np.uint8, mode="w+", shape=(capacity,))
            _unlink(self._own_path)  # the peer's mapping of the old region stays valid
            self._own_path = path
            self._data[self._rank] = torch.from_numpy(region)
            h[mine + GEN], h[mine + CAPACITY] = gen, capacity
        return self._data[self._rank][:num_bytes]

    def _peer_region(self) -> Any:
        """The peer's data region, mapped (and unlinked) when it names a new one."""
        import torch

        gen = int(self._header[self._peer * _SLOT + GEN])
        if gen != self._gen[self._peer]:
            path = f"{self._base}-{self._peer}-{gen}"
            self._data[self._peer] = torch.from_numpy(_map_existing(path))
            _unlink(path)
            self._gen[self._peer] = gen
        return self._data[self._peer]


def _pair(store: Any, rank: int, timeout_s: float) -> tuple[str, Any]:
    """Make (rank 0) or map (rank 1) the header; return the files' common name and it."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        base = os.path.join(SHM_DIR, f"{NAME_PREFIX}{uuid.uuid4().hex}")
        try:
            header = np.memmap(base + "-header", dtype=np.int64, mode="w+", shape=(2 * _SLOT,))
        except OSError as e:  # no usable SHM_DIR here: tell the peer, so both use Gloo
            store.set(_STORE_KEY, "")
            raise LinkError(f"cannot make shared memory in {SHM_DIR}: {e}") from e
        try:
            store.set(_STORE_KEY, base)
            _store_wait(store, _ATTACHED_KEY, timeout)
            if store.get(_ATTACHED_KEY) != b"1":
                raise LinkError("the peer cannot map our shared memory: it is on another host")
        finally:
            _unlink(base + "-header")  # mapped by the peer by now, or never to be
        return base, header
    _store_wait(store, _STORE_KEY, timeout)
    base = store.get(_STORE_KEY).decode()
    if not base:
        raise LinkError("the peer has no shared memory to offer")
    try:
        header = _map_existing(base + "-header").view(np.int64)
    except LinkError:
        store.set(_ATTACHED_KEY, "0")
        raise
    _unlink(base + "-header")
    store.set(_ATTACHED_KEY, "1")
    return base, header


def _map_existing(path: str) -> Any:
    try:
        return np.memmap(path, dtype=np.uint8, mode="r+")
    except FileNotFoundError as e:
        raise LinkError(f"{path} is not here: the peer is on another host") from e


def _store_wait(store: Any, key: str, timeout: datetime.timedelta) -> None:
    try:
        store.wait([key], timeout)
    except RuntimeError as e:  # torch's DistStoreError and friends
        raise LinkTimeout(f"the peer did not pair within {timeout.total_seconds()} s: {e}") from e


def _prefixed(store: Any, group: str) -> Any:
    import torch.distributed as dist

    return dist.PrefixStore(f"pdserve/{group}", store)


def _unlink(path: str | None) -> None:
    if path is None:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def same_host_link(
    store: Any, group: str, rank: int, device: torch.device, host: str, timeout_s: float
) -> Link:
    """A ``link_factory``: a ``ShmLink`` when the KV caches are in host memory and the peer
    shares this host's ``/dev/shm``, else a ``TorchDistLink``. Both sides agree through the
    store: rank 1 says whether it could map rank 0's header."""
    if device.type != "cpu":
        return TorchDistLink(store, group, rank, device, host, timeout_s)
    try:
        return ShmLink(store, group, rank, device, host, timeout_s)
    except LinkTimeout:
        raise
    except LinkError as e:
        logger.info("no shared memory with the peer of group %s (%s): using Gloo", group, e)
    return TorchDistLink(store, group, rank, device, host, timeout_s)
