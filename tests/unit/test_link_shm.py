"""The shared-memory link: two ends in two threads, paired through a real TCPStore."""

from __future__ import annotations

import datetime
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kvtransfer import link_shm
from kvtransfer.link import DECODE_RANK, PREFILL_RANK, LinkError, LinkTimeout, TorchDistLink
from kvtransfer.link_shm import ShmLink, same_host_link, shm_files

HOST = "127.0.0.1"
CPU = torch.device("cpu")


def pair(factory: Callable[..., Any] = ShmLink, timeout_s: float = 5.0) -> tuple[Any, Any]:
    """(prefill end, decode end), built at once in two threads as the endpoints do."""
    master = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)
    client = dist.TCPStore(HOST, master.port, is_master=False,
                           timeout=datetime.timedelta(seconds=10))
    group = f"test/{uuid.uuid4().hex}"
    links: list[Any] = [None, None]

    def build(store: Any, rank: int) -> None:
        links[rank] = factory(store, group, rank, CPU, HOST, timeout_s)

    threads = [threading.Thread(target=build, args=(master, PREFILL_RANK)),
               threading.Thread(target=build, args=(client, DECODE_RANK))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert all(links)
    return links[PREFILL_RANK], links[DECODE_RANK]


@pytest.fixture
def no_leaks() -> Iterator[None]:
    before = shm_files()
    yield
    assert shm_files() - before == set()


def files_of(link: ShmLink) -> set[str]:
    return {name for name in shm_files() if name.startswith(os.path.basename(link._base))}


def in_thread(fn: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def payload(num_bytes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, generator=generator)


def transfer(sender: ShmLink, receiver: ShmLink, data: torch.Tensor, tag: int) -> torch.Tensor:
    received = torch.zeros_like(data)
    thread, errors = in_thread(lambda: sender.send(data, tag))
    receiver.recv(received, tag)
    thread.join(10)
    assert not errors
    return received


@pytest.mark.parametrize("num_bytes", [1, 4093, 1 << 20])
def test_the_receiver_gets_exactly_the_bytes_sent(num_bytes: int, no_leaks: None) -> None:
    sender, receiver = pair()
    for tag in (7, 8):  # twice: the second reuses the data region
        data = payload(num_bytes, seed=tag)
        assert torch.equal(transfer(sender, receiver, data, tag), data)
    sender.close()
    receiver.close()


def test_messages_pass_the_other_way_too(no_leaks: None) -> None:
    prefill, decode = pair()
    data = payload(4093, seed=1)
    assert torch.equal(transfer(decode, prefill, data, 3), data)
    prefill.close()
    decode.close()


def test_a_larger_buffer_grows_the_region_and_later_smaller_ones_reuse_it(
        no_leaks: None) -> None:
    sender, receiver = pair()
    for tag, num_bytes in enumerate([1000, 3 << 20, 5 << 20, 2000, 5 << 20], start=1):
        data = payload(num_bytes, seed=tag)
        assert torch.equal(transfer(sender, receiver, data, tag), data)
        assert files_of(sender) == set()  # each region unlinked once the receiver mapped it
    header = sender._header
    assert header[PREFILL_RANK * link_shm._SLOT + link_shm.CAPACITY] == 8 << 20
    assert header[PREFILL_RANK * link_shm._SLOT + link_shm.GEN] == 3  # 1 MiB, 4 MiB, 8 MiB
    sender.close()
    receiver.close()


def test_views_let_the_sender_fill_and_the_receiver_read_shared_memory(no_leaks: None) -> None:
    sender, receiver = pair()
    data = payload(5000, seed=3)

    def send() -> None:
        with sender.send_view(5000, 11) as view:
            view.copy_(data)

    thread, errors = in_thread(send)
    with receiver.recv_view(5000, 11) as view:
        assert torch.equal(view, data)
    thread.join(10)
    assert not errors
    data = payload(5000, seed=4)  # the slot was released: the next message goes through
    assert torch.equal(transfer(sender, receiver, data, 12), data)
    sender.close()
    receiver.close()


def test_a_receiver_polls_briskly_while_its_message_is_written(
        no_leaks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gather into the view that outlasts the spin must not push the receiver into the
    backoff (steps of up to 2 ms): it polls every WRITING_PAUSE_S until the message is in."""
    pauses: list[tuple[str, float | None]] = []
    polling = threading.Event()
    real_poll_until = link_shm.poll_until

    def poll_until(is_done, deadline_s, what, clock, **kw):  # type: ignore[no-untyped-def]
        pauses.append((what, kw.get("max_pause_s")))
        if what == "the message":
            polling.set()
        real_poll_until(is_done, deadline_s, what, clock, **kw)

    monkeypatch.setattr(link_shm, "poll_until", poll_until)
    num_bytes = 8 << 20
    sender, receiver = pair()
    data = payload(num_bytes, seed=9)

    def send() -> None:
        with sender.send_view(num_bytes, 21) as view:
            view.copy_(data)
            polling.wait(10)  # the gather ends only once the receiver's spin has

    thread, errors = in_thread(send)
    with receiver.recv_view(num_bytes, 21) as view:
        assert torch.equal(view, data)
    thread.join(10)
    assert not errors
    assert polling.is_set()
    assert {pause for what, pause in pauses if what == "the message"} == \
        {link_shm.WRITING_PAUSE_S}
    sender.close()
    receiver.close()


def test_the_spin_grows_with_the_message_up_to_a_cap() -> None:
    spin = link_shm.written_spin_s
    assert link_shm.SPIN_S < spin(1 << 20) < spin(2 << 20) <= link_shm.MAX_SPIN_S
    assert spin(64 << 20) == link_shm.MAX_SPIN_S


def test_a_recv_under_another_tag_refuses_the_data_and_breaks(no_leaks: None) -> None:
    sender, receiver = pair()
    sender.send(payload(64, seed=5), 5)
    received = torch.zeros(64, dtype=torch.uint8)
    start = time.monotonic()
    with pytest.raises(LinkError, match="tag 5"):
        receiver.recv(received, 6)
    assert time.monotonic() - start < 1.0  # refused at once, not at the deadline
    assert not torch.any(received)
    assert receiver.broken is not None
    with pytest.raises(LinkError, match="broken"):
        receiver.recv(received, 5)
    sender.close()
    receiver.close()


def test_a_recv_of_another_size_is_refused(no_leaks: None) -> None:
    sender, receiver = pair()
    sender.send(payload(64, seed=5), 5)
    with pytest.raises(LinkError, match="64 bytes"):
        receiver.recv(torch.zeros(65, dtype=torch.uint8), 5)
    sender.close()
    receiver.close()


def test_a_recv_past_its_deadline_times_out_breaks_and_fails_the_peer_fast(
        no_leaks: None) -> None:
    sender, receiver = pair(timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(LinkTimeout):
        receiver.recv(torch.zeros(16, dtype=torch.uint8), 1)
    assert 0.5 <= time.monotonic() - start < 1.5
    assert receiver.broken is not None
    with pytest.raises(LinkError, match="broken"):
        receiver.recv(torch.zeros(16, dtype=torch.uint8), 1)
    sender.send(payload(16, seed=1), 1)  # the slot was free: published, never read
    start = time.monotonic()
    with pytest.raises(LinkError, match="peer closed"):
        sender.send(payload(16, seed=2), 2)
    assert time.monotonic() - start < 0.4  # the peer's abort ends the wait early
    assert sender.broken is not None
    sender.close()
    receiver.close()


def test_a_send_past_its_deadline_times_out(no_leaks: None) -> None:
    sender, receiver = pair(timeout_s=0.3)
    sender.send(payload(16, seed=1), 1)
    with pytest.raises(LinkTimeout):
        sender.send(payload(16, seed=2), 2)  # the first was never read
    assert sender.broken is not None
    sender.close()
    receiver.close()


def test_close_unlinks_every_file_and_is_safe_twice() -> None:
    before = shm_files()
    sender, receiver = pair()
    sender.send(payload(4096, seed=1), 1)  # a data region the receiver never mapped
    assert files_of(sender) and files_of(sender) == shm_files() - before
    sender.close()
    receiver.close()
    sender.close()
    receiver.close()
    assert shm_files() - before == set()
    with pytest.raises(LinkError, match="broken"):
        sender.send(payload(16, seed=1), 2)


def test_files_live_only_until_the_peer_maps_them(no_leaks: None) -> None:
    before = shm_files()
    sender, receiver = pair()
    assert shm_files() - before == set()  # the header: mapped by both, unlinked
    data = payload(4096, seed=1)
    assert torch.equal(transfer(sender, receiver, data, 1), data)
    assert shm_files() - before == set()  # the data region too, once the receiver mapped it
    sender.close()
    receiver.close()


def test_same_host_link_picks_shared_memory_here(no_leaks: None) -> None:
    sender, receiver = pair(same_host_link)
    assert isinstance(sender, ShmLink) and isinstance(receiver, ShmLink)
    sender.close()
    receiver.close()


def test_same_host_link_falls_back_to_gloo_when_the_peer_cannot_map(
        monkeypatch: pytest.MonkeyPatch, no_leaks: None) -> None:
    def elsewhere(path: str) -> Any:
        raise LinkError(f"{path} is not here")

    monkeypatch.setattr(link_shm, "_map_existing", elsewhere)
    sender, receiver = pair(same_host_link)
    assert isinstance(sender, TorchDistLink) and isinstance(receiver, TorchDistLink)
    data = payload(4093, seed=2)
    assert torch.equal(transfer(sender, receiver, data, 4), data)
    sender.close()
    receiver.close()


def test_same_host_link_falls_back_to_gloo_without_a_shared_memory_directory(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr(link_shm, "SHM_DIR", str(tmp_path / "missing"))
    sender, receiver = pair(same_host_link)
    assert isinstance(sender, TorchDistLink) and isinstance(receiver, TorchDistLink)
    data = payload(1000, seed=3)
    assert torch.equal(transfer(sender, receiver, data, 5), data)
    sender.close()
    receiver.close()


def test_a_cuda_device_is_refused() -> None:
    with pytest.raises(LinkError, match="host memory"):
        ShmLink(None, "g", PREFILL_RANK, torch.device("cuda"), HOST, 1.0)
