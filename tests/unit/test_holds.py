"""The prefill side's HoldTable: HELD -> SENDING -> SENT -> released, leases, bad pulls."""

from __future__ import annotations

import threading

import pytest

from kvtransfer.holds import HoldError, HoldTable

LEASE_S = 30.0


class FakeClock:
    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table(clock: FakeClock) -> HoldTable:
    table = HoldTable(clock=clock)
    table.add("t1", "req-1", [7, 3, 9, 4], LEASE_S)
    return table


def test_full_cycle_releases_once(table: HoldTable) -> None:
    assert len(table) == 1
    assert table.start_send("t1", 0, 4) == [7, 3, 9, 4]
    table.finish_send("t1", ok=True)
    assert table.take_released() == set()  # SENT but not yet confirmed
    assert table.confirm("t1") is True
    assert len(table) == 0
    assert table.take_released() == {"req-1"}
    assert table.take_released() == set()


@pytest.mark.parametrize(
    ("first", "count", "expected"),
    [(0, 1, [7]), (1, 2, [3, 9]), (3, 1, [4]), (2, 2, [9, 4]), (4, 0, [])],
)
def test_start_send_returns_the_requested_range(
    table: HoldTable, first: int, count: int, expected: list[int]
) -> None:
    assert table.start_send("t1", first, count) == expected


@pytest.mark.parametrize(("first", "count"), [(0, 5), (3, 2), (4, 1), (-1, 2), (1, -1)])
def test_out_of_range_pull_raises_and_keeps_the_hold(
    table: HoldTable, first: int, count: int
) -> None:
    with pytest.raises(HoldError, match="out of range"):
        table.start_send("t1", first, count)
    # Still HELD: a valid pull works afterwards.
    assert table.start_send("t1", 0, 4) == [7, 3, 9, 4]


def test_unknown_transfer_raises(table: HoldTable) -> None:
    with pytest.raises(HoldError, match="not held"):
        table.start_send("nope", 0, 1)


@pytest.mark.parametrize("sent", [False, True], ids=["sending", "sent"])
def test_second_pull_in_wrong_state_raises(table: HoldTable, sent: bool) -> None:
    table.start_send("t1", 0, 4)
    if sent:
        table.finish_send("t1", ok=True)
    with pytest.raises(HoldError, match="sent" if sent else "sending"):
        table.start_send("t1", 0, 4)


def test_duplicate_add_raises(table: HoldTable) -> None:
    with pytest.raises(HoldError, match="already held"):
        table.add("t1", "req-2", [1], LEASE_S)
    assert table.start_send("t1", 0, 4) == [7, 3, 9, 4]  # the first hold is unchanged


def test_failed_send_goes_back_to_held(table: HoldTable) -> None:
    table.start_send("t1", 0, 4)
    table.finish_send("t1", ok=False)
    assert table.start_send("t1", 1, 2) == [3, 9]  # pullable again


def test_held_expires_after_lease(table: HoldTable, clock: FakeClock) -> None:
    clock.advance(LEASE_S - 0.001)
    assert table.take_released() == set()
    assert len(table) == 1
    clock.advance(0.001)
    assert table.take_released() == {"req-1"}
    assert len(table) == 0
    with pytest.raises(HoldError):
        table.start_send("t1", 0, 1)


def test_sent_expires_after_lease(table: HoldTable, clock: FakeClock) -> None:
    table.start_send("t1", 0, 4)
    table.finish_send("t1", ok=True)
    clock.advance(LEASE_S + 1)
    assert table.take_released() == {"req-1"}
    assert table.confirm("t1") is False  # already gone; a late DONE is harmless
    assert table.take_released() == set()


def test_sending_never_expires(table: HoldTable, clock: FakeClock) -> None:
    table.start_send("t1", 0, 4)
    clock.advance(LEASE_S * 100)
    assert table.take_released() == set()
    assert len(table) == 1
    table.finish_send("t1", ok=True)  # now SENT and past its lease
    assert table.take_released() == {"req-1"}


def test_confirm_while_sending_is_refused(table: HoldTable) -> None:
    table.start_send("t1", 0, 4)
    assert table.confirm("t1") is False
    assert table.take_released() == set()
    table.finish_send("t1", ok=True)
    assert table.confirm("t1") is True
    assert table.take_released() == {"req-1"}


def test_confirm_of_held_releases_without_data(table: HoldTable) -> None:
    assert table.confirm("t1") is True  # a release-only DONE
    assert table.take_released() == {"req-1"}


def test_confirm_unknown_is_false(table: HoldTable) -> None:
    assert table.confirm("nope") is False
    assert table.take_released() == set()


def test_finish_send_of_unknown_or_held_is_ignored(table: HoldTable) -> None:
    table.finish_send("nope", ok=True)
    table.finish_send("t1", ok=True)  # HELD, not SENDING: must not become SENT
    assert table.start_send("t1", 0, 1) == [7]


def test_many_holds_release_independently(clock: FakeClock) -> None:
    table = HoldTable(clock=clock)
    table.add("a", "req-a", [1], 10.0)
    table.add("b", "req-b", [2], 20.0)
    table.add("c", "req-c", [3], 20.0)
    table.start_send("c", 0, 1)
    assert table.confirm("b") is True
    clock.advance(15.0)
    assert table.take_released() == {"req-a", "req-b"}
    clock.advance(10.0)
    assert table.take_released() == set()  # c is SENDING
    assert len(table) == 1


def test_block_ids_are_copied(clock: FakeClock) -> None:
    block_ids = [5, 6]
    table = HoldTable(clock=clock)
    table.add("t", "r", block_ids, LEASE_S)
    block_ids.append(7)
    with pytest.raises(HoldError, match="out of range"):
        table.start_send("t", 0, 3)
    assert table.start_send("t", 0, 2) == [5, 6]


def test_concurrent_adds_and_confirms(clock: FakeClock) -> None:
    table = HoldTable(clock=clock)
    num_threads, per_thread = 4, 200

    def work(t: int) -> None:
        for i in range(per_thread):
            tid = f"{t}-{i}"
            table.add(tid, f"req-{tid}", [i], LEASE_S)
            assert table.start_send(tid, 0, 1) == [i]
            table.finish_send(tid, ok=True)
            assert table.confirm(tid)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    released = table.take_released()
    assert released == {f"req-{t}-{i}" for t in range(num_threads) for i in range(per_thread)}
    assert len(table) == 0
