"""The prefill side's HoldTable: HELD -> SENDING -> SENT -> released, leases, claims, bad pulls
and the error codes a refused pull gets."""

from __future__ import annotations

import threading

import pytest

from kvtransfer.holds import HoldError, HoldTable
from kvtransfer.protocol import ErrorCode

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
    with pytest.raises(HoldError, match="out of range") as info:
        table.start_send("t1", first, count)
    assert info.value.code is ErrorCode.RANGE
    # Still HELD: a valid pull works afterwards.
    assert table.start_send("t1", 0, 4) == [7, 3, 9, 4]


def test_unknown_transfer_raises(table: HoldTable) -> None:
    with pytest.raises(HoldError, match="not held") as info:
        table.start_send("nope", 0, 1)
    assert info.value.code is ErrorCode.UNKNOWN


@pytest.mark.parametrize("sent", [False, True], ids=["sending", "sent"])
def test_second_pull_in_wrong_state_raises(table: HoldTable, sent: bool) -> None:
    table.start_send("t1", 0, 4)
    if sent:
        table.finish_send("t1", ok=True)
    with pytest.raises(HoldError, match="sent" if sent else "sending") as info:
        table.start_send("t1", 0, 4)
    assert info.value.code is ErrorCode.STATE


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
    assert table.num_expired == 0
    clock.advance(0.001)
    assert table.take_released() == {"req-1"}
    assert len(table) == 0 and table.num_expired == 1
    with pytest.raises(HoldError, match="expired") as info:
        table.start_send("t1", 0, 1)
    assert info.value.code is ErrorCode.EXPIRED


def test_sent_expires_after_lease(table: HoldTable, clock: FakeClock) -> None:
    table.start_send("t1", 0, 4)
    table.finish_send("t1", ok=True)
    clock.advance(LEASE_S + 1)
    assert table.take_released() == {"req-1"}
    assert table.confirm("t1") is False  # already gone; a late DONE is harmless
    assert table.take_released() == set() and table.num_expired == 1


def test_sending_never_expires(table: HoldTable, clock: FakeClock) -> None:
    table.start_send("t1", 0, 4)
    clock.advance(LEASE_S * 100)
    assert table.take_released() == set()
    assert len(table) == 1
    table.finish_send("t1", ok=True)  # now SENT and past its lease
    assert table.take_released() == {"req-1"}


@pytest.mark.parametrize("ok", [True, False], ids=["sent", "failed"])
def test_confirm_while_sending_releases_when_the_send_ends(table: HoldTable, ok: bool) -> None:
    table.start_send("t1", 0, 4)
    assert table.confirm("t1") is True  # the decode side got the bytes before we returned
    assert table.take_released() == set()  # still SENDING: the blocks are being read
    assert len(table) == 1
    table.finish_send("t1", ok=ok)
    assert len(table) == 0
    assert table.take_released() == {"req-1"}
    assert table.confirm("t1") is False


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


# -- error codes of refused pulls --------------------------------------------------------------


def test_pull_after_release_is_a_state_error(table: HoldTable) -> None:
    assert table.confirm("t1")
    with pytest.raises(HoldError, match="released") as info:
        table.start_send("t1", 0, 1)
    assert info.value.code is ErrorCode.STATE


@pytest.mark.parametrize(("first", "count"), [(0.0, 1), (0, 1.0), (True, 1), (0, None)])
def test_non_int_range_is_refused_and_leaves_the_hold_held(
    table: HoldTable, first: object, count: object
) -> None:
    with pytest.raises(HoldError) as info:
        table.start_send("t1", first, count)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.RANGE
    assert table.start_send("t1", 0, 4) == [7, 3, 9, 4]


def test_expired_ids_are_forgotten_after_a_while(clock: FakeClock) -> None:
    table = HoldTable(clock=clock, remember_s=100.0)
    table.add("t", "r", [1], 10.0)
    clock.advance(10.0)
    assert table.take_released() == {"r"}
    clock.advance(99.0)
    table.take_released()
    with pytest.raises(HoldError) as info:
        table.start_send("t", 0, 1)
    assert info.value.code is ErrorCode.EXPIRED
    clock.advance(2.0)
    table.take_released()
    with pytest.raises(HoldError) as info:
        table.start_send("t", 0, 1)
    assert info.value.code is ErrorCode.UNKNOWN


def test_remembered_ids_are_bounded(clock: FakeClock) -> None:
    table = HoldTable(clock=clock, max_remembered=3)
    for i in range(5):
        table.add(f"t{i}", f"r{i}", [i], LEASE_S)
        table.confirm(f"t{i}")
    codes = []
    for i in range(5):
        with pytest.raises(HoldError) as info:
            table.start_send(f"t{i}", 0, 1)
        codes.append(info.value.code)
    assert codes == [ErrorCode.UNKNOWN] * 2 + [ErrorCode.STATE] * 3
    assert len(table._gone) == 3


def test_adding_again_after_release_makes_it_pullable(table: HoldTable) -> None:
    table.confirm("t1")
    table.add("t1", "req-1b", [5], LEASE_S)
    assert table.start_send("t1", 0, 1) == [5]


# -- claims and the held-blocks gauge ------------------------------------------------------------


def test_claim_extends_the_lease(table: HoldTable, clock: FakeClock) -> None:
    clock.advance(LEASE_S - 1)
    assert table.claim("t1", 300.0) is True
    clock.advance(2)
    assert table.take_released() == set()  # the original lease has run out
    clock.advance(297)
    assert table.take_released() == set()
    clock.advance(1)
    assert table.take_released() == {"req-1"}


def test_claim_never_shortens_the_lease(table: HoldTable, clock: FakeClock) -> None:
    assert table.claim("t1", 1.0) is True
    clock.advance(2.0)
    assert table.take_released() == set()
    clock.advance(LEASE_S)
    assert table.take_released() == {"req-1"}


def test_claim_of_unknown_is_false(table: HoldTable) -> None:
    assert table.claim("nope", 300.0) is False
    assert len(table) == 1


def test_num_held_blocks_counts_every_state(clock: FakeClock) -> None:
    table = HoldTable(clock=clock)
    assert table.num_held_blocks == 0
    table.add("a", "ra", [1, 2, 3], LEASE_S)
    table.add("b", "rb", [4, 5], LEASE_S)
    table.add("c", "rc", [6], LEASE_S)
    table.start_send("b", 0, 2)
    table.start_send("c", 0, 1)
    table.finish_send("c", ok=True)
    assert table.num_held_blocks == 6
    table.confirm("a")
    assert table.num_held_blocks == 3
    table.confirm("b")  # SENDING: released when the send ends
    assert table.num_held_blocks == 3
    table.finish_send("b", ok=True)
    assert table.num_held_blocks == 1


def test_a_further_range_is_given_only_to_the_puller_whose_send_is_in_flight(
        table: HoldTable) -> None:
    table.add("t", "req", [5, 6, 7, 8], 60.0)
    with pytest.raises(HoldError) as e:
        table.blocks_in_flight("t", 2, 2, "p")  # no send in flight yet
    assert e.value.code is ErrorCode.STATE
    assert table.start_send("t", 0, 2, "p") == [5, 6]
    assert table.blocks_in_flight("t", 2, 2, "p") == [7, 8]
    with pytest.raises(HoldError) as e:
        table.blocks_in_flight("t", 2, 2, "q")  # another puller
    assert e.value.code is ErrorCode.STATE
    with pytest.raises(HoldError) as e:
        table.blocks_in_flight("t", 3, 2, "p")
    assert e.value.code is ErrorCode.RANGE
    assert table.num_sending == 1  # unchanged by the further ranges
