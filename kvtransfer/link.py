"""The data plane of one (prefill worker, decode worker) pair.

Contract, for every link implementation. Both ends are built by the transfer code of one worker
process (never shared across processes) and used from one thread at a time:

``send(buffer, tag)``  prefill side. Returns once ``buffer`` (a flat uint8 tensor on the KV
                       cache's device) has been handed to the peer and may be reused or freed.
``recv(buffer, tag)``  decode side. Returns once ``buffer`` holds exactly what the peer sent
                       with the same ``tag`` (an int in [1, 2**31 - 1], one per pull).
``close()``            releases the link; safe to call twice and after an abort.

Every wait has a deadline (``timeout_s`` per call): past it the link aborts its process group
and raises ``LinkTimeout``; any other failure raises ``LinkError``. Either way the link is
``broken`` from then on (every later call raises ``LinkError``) and the owner drops it and pairs
again. A link never kills the process it runs in.

``TorchDistLink`` is the implementation: a two-rank torch.distributed process group built for
the pair alone from a TCPStore rendezvous (no global world, so replicas come and go freely).

- Gloo (KV cache in CPU memory): ``tag`` is passed to Gloo, so a late send of an aborted pull
  never lands in a later pull's buffer. The caller waits in ``work.wait`` for at most the time
  left before the deadline; on timeout the group is aborted.
- NCCL (KV cache on a CUDA device): NCCL has no tags (the control plane's SENDING echo of
  transfer id and tag stands in). Each link has its own CUDA stream, which first waits for the
  caller's current stream (the buffer was written there); the send or recv is issued on it, and
  a CUDA event recorded after it is polled until done or the deadline, so the caller's thread
  never blocks inside CUDA or NCCL. On timeout the communicator is aborted
  (``ProcessGroupNCCL.abort``), which ends the pending kernel. The group is built with
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` (CleanUpOnly: on an error the NCCL watchdog aborts the
  communicator but does not tear the process down; the default, 3, would kill the engine when a
  peer dies mid-transfer) and a watchdog timeout ``WATCHDOG_GRACE`` longer than ours, so our own
  deadline always fires first. The variable is read once per process group, in its
  constructor, so it is set only around our constructor and restored after: vLLM's own groups
  keep the engine's setting. Set ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` in the engine's
  environment to choose otherwise (an explicit setting is respected, and also avoids changing
  the environment at run time).
"""

from __future__ import annotations

import abc
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PREFILL_RANK = 0
DECODE_RANK = 1
NCCL_ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
NCCL_CLEAN_UP_ONLY = "2"
WATCHDOG_GRACE_S = 60.0
_POLL_MIN_S = 50e-6
POLL_MAX_S = 2e-3  # the longest sleep of poll_until's backoff
_env_lock = threading.Lock()


class LinkError(Exception):
    """The link failed; it is broken and must be dropped."""


class LinkTimeout(LinkError):
    """A send or recv did not finish before its deadline; the link was aborted."""


class Link(abc.ABC):
    @abc.abstractmethod
    def send(self, buffer: torch.Tensor, tag: int) -> None:
        """Hand ``buffer`` to the peer under ``tag``; return once it may be reused."""

    @abc.abstractmethod
    def recv(self, buffer: torch.Tensor, tag: int) -> None:
        """Fill ``buffer`` with what the peer sends under ``tag``."""

    def close(self) -> None:  # noqa: B027
        """Release the link."""


def poll_until(
    is_done: Callable[[], bool], deadline_s: float, what: str,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    max_pause_s: float = POLL_MAX_S,
) -> None:
    """Poll ``is_done`` (backing off from 50 us to ``max_pause_s``, 2 ms by default) until it
    is true; raise ``LinkTimeout`` once ``clock()`` passes ``deadline_s``. ``is_done`` raising
    propagates."""
    pause = min(_POLL_MIN_S, max_pause_s)
    while not is_done():
        if clock() >= deadline_s:
            raise LinkTimeout(f"{what} not done by its deadline")
        sleep(pause)
        pause = min(2 * pause, max_pause_s)


def wait_for_device(device: torch.device, deadline_s: float) -> None:
    """Wait, polling with a deadline, until the work queued so far on the calling thread's
    current stream of ``device`` is done (a no-op for host memory)."""
    if device.type != "cuda":
        return
    import torch

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    poll_until(event.query, deadline_s, f"work on {device}")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class DeviceSync:
    """How a transfer is issued and awaited. This one (host memory, Gloo): issue on the calling
    thread and block in ``work.wait`` for at most the time left (Gloo's send and recv works
    complete only inside ``wait``)."""

    def issue(self, start: Callable[[], Any]) -> Any:
        return start()

    def finish(self, work: Any, deadline_s: float, what: str,
               clock: Callable[[], float] = time.monotonic) -> None:
        """Return once ``work`` is done and its result visible; raise ``LinkTimeout`` past
        ``deadline_s``, ``LinkError`` when the work failed."""
        left_s = deadline_s - clock()
        if left_s <= 0:
            raise LinkTimeout(f"{what} not done by its deadline")
        try:
            work.wait(datetime.timedelta(seconds=left_s))
        except RuntimeError as e:
            if "timed out" in str(e).lower():
                raise LinkTimeout(f"{what} not done by its deadline") from e
            raise LinkError(f"{what} failed: {e}") from e


class PollingSync(DeviceSync):
    """Poll ``work.is_completed`` and then ``completion(work)`` until the deadline, never
    blocking inside the backend (NCCL: ``wait`` without a timeout only orders streams)."""

    def finish(self, work: Any, deadline_s: float, what: str,
               clock: Callable[[], float] = time.monotonic) -> None:
        poll_until(work.is_completed, deadline_s, what, clock)
        poll_until(self.completion(work), deadline_s, what, clock)

    def completion(self, work: Any) -> Callable[[], bool]:
        """After ``work`` completed: raise its error, if any, and return a predicate that is
        true once its results are visible to the caller."""
        work.wait()
        return lambda: True


class CudaStreamSync(PollingSync):
    """Issue on the link's own stream after the caller's stream; observe with a CUDA event."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self._device = device
        self._stream = torch.cuda.Stream(device)

    def issue(self, start: Callable[[], Any]) -> Any:
        import torch

        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            return start()

    def completion(self, work: Any) -> Callable[[], bool]:
        import torch

        with torch.cuda.stream(self._stream):
            work.wait()  # raises the work's error; else orders the stream, without blocking
            event = torch.cuda.Event()
            event.record(self._stream)
        return event.query


class TorchDistLink(Link):
    """A two-rank process group over a TCPStore prefix; rank 0 is the prefill worker.

    ``pg``, ``sync`` and ``clock`` replace the process group, the device handling and the clock
    (tests drive the deadline logic with fakes through them).
    """

    def __init__(
        self,
        store: torch.distributed.Store | None,
        group: str,
        rank: int,
        device: torch.device,
        host: str,
        timeout_s: float,
        *,
        pg: Any = None,
        sync: DeviceSync | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._peer = 1 - rank
        self._timeout_s = timeout_s
        self._clock = clock
        self.broken: str | None = None
        self._pending: list[Any] = []  # works (and their buffers) of aborted transfers
        if pg is None:
            pg = _make_process_group(store, group, rank, device, host, timeout_s)
        self._pg = pg
        if sync is None:
            sync = CudaStreamSync(device) if backend_for(device) == "nccl" else DeviceSync()
        self._sync = sync

    def send(self, buffer: torch.Tensor, tag: int) -> None:
        self._transfer("send", buffer, tag)

    def recv(self, buffer: torch.Tensor, tag: int) -> None:
        self._transfer("recv", buffer, tag)

    def _transfer(self, op: str, buffer: torch.Tensor, tag: int) -> None:
        if self.broken is not None:
            raise LinkError(f"link is broken: {self.broken}")
        deadline = self._clock() + self._timeout_s
        what = f"{op} of {buffer.numel()} bytes (tag {tag})"
        work = None
        try:
            work = self._sync.issue(lambda: getattr(self._pg, op)([buffer], self._peer, tag))
            self._sync.finish(work, deadline, what, self._clock)
        except BaseException as e:
            if work is not None:
                self._pending.append((work, buffer))  # keep the buffer alive past the abort
            self._abort(f"{what}: {e}")
            if isinstance(e, LinkError):
                raise
            raise LinkError(f"{what} failed: {e}") from e

    def _abort(self, reason: str) -> None:
        self.broken = reason
        try:
            self._pg.abort()
        except Exception as e:  # the group may already be gone
            logger.debug("aborting a link's process group failed: %s", e)

    def close(self) -> None:
        if self.broken is None:
            self.broken = "closed"
            shutdown = getattr(self._pg, "shutdown", None)
            try:
                if shutdown is not None:
                    shutdown()
            except Exception as e:
                logger.debug("shutting a link's process group down failed: %s", e)
        self._pending.clear()


def _make_process_group(
    store: Any, group: str, rank: int, device: torch.device, host: str, timeout_s: float
) -> Any:
    import torch.distributed as dist

    prefix = dist.PrefixStore(f"pdserve/{group}", store)
    if backend_for(device) == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = datetime.timedelta(seconds=timeout_s + WATCHDOG_GRACE_S)
        with _nccl_error_handling():
            return dist.ProcessGroupNCCL(prefix, rank, 2, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(prefix, rank, 2, opts)


class _nccl_error_handling:  # noqa: N801 - used as a context manager
    """Set CleanUpOnly error handling around one ProcessGroupNCCL constructor (see above)."""

    def __enter__(self) -> None:
        _env_lock.acquire()
        self._set = NCCL_ERROR_HANDLING_ENV not in os.environ
        if self._set:
            os.environ[NCCL_ERROR_HANDLING_ENV] = NCCL_CLEAN_UP_ONLY

    def __exit__(self, *exc: object) -> None:
        if self._set:
            os.environ.pop(NCCL_ERROR_HANDLING_ENV, None)
        _env_lock.release()
