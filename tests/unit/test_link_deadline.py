"""The link's deadlines without a GPU: fake works, events and process groups drive the NCCL
path's polling and abort; a real Gloo pair checks tags and the timeout end to end."""

from __future__ import annotations

import datetime
import os
import threading
import time
import uuid
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kvtransfer import link as link_module
from kvtransfer.link import (
    DECODE_RANK,
    NCCL_ERROR_HANDLING_ENV,
    PREFILL_RANK,
    DeviceSync,
    LinkError,
    LinkTimeout,
    PollingSync,
    TorchDistLink,
    poll_until,
)

HOST = "127.0.0.1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeWork:
    def __init__(self, clock: FakeClock, done_at: float | None, error: str | None = None):
        self._clock, self._done_at, self._error = clock, done_at, error
        self.num_polls = 0

    def is_completed(self) -> bool:
        self.num_polls += 1
        self._clock.sleep(0.001)  # polling takes time on the fake clock too
        return self._done_at is not None and self._clock() >= self._done_at

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        if self._error is not None:
            raise RuntimeError(self._error)
        return True


class FakeGroup:
    def __init__(self, work_factory: Any) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.num_aborts = 0
        self.num_shutdowns = 0
        self._work_factory = work_factory

    def send(self, tensors: list[torch.Tensor], peer: int, tag: int) -> Any:
        self.calls.append(("send", peer, tag))
        return self._work_factory()

    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int) -> Any:
        self.calls.append(("recv", peer, tag))
        return self._work_factory()

    def abort(self) -> None:
        self.num_aborts += 1

    def shutdown(self) -> None:
        self.num_shutdowns += 1


class NeverVisible(PollingSync):
    """The NCCL kernel finished but the event after it never fires (a stuck stream)."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock

    def completion(self, work: Any) -> Any:
        work.wait()

        def query() -> bool:
            self._clock.sleep(0.001)
            return False

        return query


def make_link(clock: FakeClock, work_factory: Any, sync: DeviceSync | None = None,
              rank: int = DECODE_RANK) -> tuple[TorchDistLink, FakeGroup]:
    group = FakeGroup(work_factory)
    link = TorchDistLink(None, "g", rank, torch.device("cpu"), HOST, 5.0, pg=group,
                         sync=sync or PollingSync(), clock=clock)
    return link, group


def test_poll_until_returns_once_done_and_backs_off() -> None:
    clock = FakeClock()
    pauses: list[float] = []
    flags = iter([False] * 8 + [True])

    def sleep(s: float) -> None:
        pauses.append(s)
        clock.sleep(s)

    poll_until(lambda: next(flags), clock() + 1.0, "x", clock, sleep)
    assert len(pauses) == 8
    assert pauses[0] == pytest.approx(50e-6) and pauses[-1] == pytest.approx(2e-3)
    assert pauses == sorted(pauses)


def test_poll_until_raises_at_the_deadline() -> None:
    clock = FakeClock()
    with pytest.raises(LinkTimeout, match="thing not done"):
        poll_until(lambda: False, clock() + 0.5, "thing", clock, clock.sleep)
    assert 100.5 <= clock() < 100.51


def test_a_transfer_that_completes_passes_the_tag_and_does_not_abort() -> None:
    clock = FakeClock()
    link, group = make_link(clock, lambda: FakeWork(clock, done_at=clock() + 0.01))
    link.recv(torch.zeros(4, dtype=torch.uint8), 123)
    link.send(torch.zeros(4, dtype=torch.uint8), 124)
    assert group.calls == [("recv", PREFILL_RANK, 123), ("send", PREFILL_RANK, 124)]
    assert group.num_aborts == 0 and link.broken is None
    link.close()
    link.close()
    assert group.num_shutdowns == 1


def test_a_transfer_that_never_completes_aborts_the_group_at_the_deadline() -> None:
    clock = FakeClock()
    link, group = make_link(clock, lambda: FakeWork(clock, done_at=None))
    start = clock()
    with pytest.raises(LinkTimeout):
        link.recv(torch.zeros(4, dtype=torch.uint8), 9)
    assert 5.0 <= clock() - start < 5.1  # the link's timeout_s, not longer
    assert group.num_aborts == 1
    assert link.broken is not None
    with pytest.raises(LinkError, match="broken"):  # every later call fails at once
        link.recv(torch.zeros(4, dtype=torch.uint8), 10)
    assert len(group.calls) == 1
    link.close()
    assert group.num_shutdowns == 0  # aborted already


def test_a_stuck_stream_after_the_kernel_also_times_out_and_aborts() -> None:
    clock = FakeClock()
    link, group = make_link(clock, lambda: FakeWork(clock, done_at=clock()), NeverVisible(clock))
    with pytest.raises(LinkTimeout):
        link.send(torch.zeros(4, dtype=torch.uint8), 1)
    assert group.num_aborts == 1


def test_a_failed_work_raises_a_link_error_and_aborts() -> None:
    clock = FakeClock()
    link, group = make_link(clock, lambda: FakeWork(clock, clock(), error="NCCL remote error"))
    with pytest.raises(LinkError, match="NCCL remote error"):
        link.send(torch.zeros(4, dtype=torch.uint8), 1)
    assert group.num_aborts == 1


def test_gloo_style_wait_turns_its_timeout_into_link_timeout() -> None:
    clock = FakeClock()
    link, group = make_link(clock, lambda: FakeWork(clock, None, "Timed out waiting 5000ms"),
                            DeviceSync())
    with pytest.raises(LinkTimeout):
        link.recv(torch.zeros(4, dtype=torch.uint8), 1)
    assert group.num_aborts == 1


def test_an_abort_that_fails_still_breaks_the_link() -> None:
    clock = FakeClock()
    link, group = make_link(clock, lambda: FakeWork(clock, None))

    def bad_abort() -> None:
        raise RuntimeError("already gone")

    group.abort = bad_abort
    with pytest.raises(LinkTimeout):
        link.recv(torch.zeros(4, dtype=torch.uint8), 1)
    assert link.broken is not None


@pytest.mark.parametrize("preset", [None, "3"])
def test_nccl_error_handling_is_set_only_around_our_constructor(
    monkeypatch: pytest.MonkeyPatch, preset: str | None
) -> None:
    if preset is None:
        monkeypatch.delenv(NCCL_ERROR_HANDLING_ENV, raising=False)
    else:
        monkeypatch.setenv(NCCL_ERROR_HANDLING_ENV, preset)
    with link_module._nccl_error_handling():
        inside = os.environ.get(NCCL_ERROR_HANDLING_ENV)
    assert inside == (preset or "2")  # CleanUpOnly unless the engine chose otherwise
    assert os.environ.get(NCCL_ERROR_HANDLING_ENV) == preset


def gloo_pair(timeout_s: float) -> tuple[TorchDistLink, TorchDistLink]:
    master = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)
    client = dist.TCPStore(HOST, master.port, is_master=False,
                           timeout=datetime.timedelta(seconds=10))
    group = f"test/{uuid.uuid4().hex}"
    links: list[Any] = [None, None]
    cpu = torch.device("cpu")

    def build(i: int, store: Any, rank: int) -> None:
        links[i] = TorchDistLink(store, group, rank, cpu, HOST, timeout_s)

    threads = [threading.Thread(target=build, args=(0, master, PREFILL_RANK)),
               threading.Thread(target=build, args=(1, client, DECODE_RANK))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert all(links)
    return links[0], links[1]


def test_gloo_recv_of_another_tag_times_out_instead_of_taking_the_data() -> None:
    sender, receiver = gloo_pair(timeout_s=1.0)
    payload = torch.arange(16, dtype=torch.uint8)
    received = torch.zeros(16, dtype=torch.uint8)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sender.send(payload, 5)
        except LinkError as e:
            errors.append(e)

    thread = threading.Thread(target=send)
    thread.start()
    start = time.monotonic()
    with pytest.raises(LinkTimeout):
        receiver.recv(received, 6)  # a later pull's tag: the stale send must not land here
    assert time.monotonic() - start < 3.0
    assert not torch.any(received)
    thread.join(5)
    assert not thread.is_alive()
    assert receiver.broken is not None
    sender.close()
    receiver.close()
