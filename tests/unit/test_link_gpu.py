"""The pair link over NCCL: CUDA tensors between two ranks on two GPUs of one machine."""

from __future__ import annotations

import datetime
import threading
import uuid

import pytest
import torch

from kvtransfer.link import DECODE_RANK, PREFILL_RANK, TorchDistLink

HOST = "127.0.0.1"
TIMEOUT_S = 30.0

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="NCCL needs two ranks on two different GPUs",
    ),
]


@pytest.mark.parametrize("num_bytes", [1, 4093, 16 << 20])
def test_nccl_link_delivers_identical_bytes(num_bytes: int) -> None:
    import torch.distributed as dist

    master = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)
    client = dist.TCPStore(HOST, master.port, is_master=False,
                           timeout=datetime.timedelta(seconds=TIMEOUT_S))
    group = f"test-gpu/{uuid.uuid4().hex}"
    send_dev, recv_dev = torch.device("cuda:0"), torch.device("cuda:1")
    expected = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(num_bytes))
    payload = expected.to(send_dev)
    received = torch.zeros(num_bytes, dtype=torch.uint8, device=recv_dev)
    errors: list[BaseException] = []

    def run(store: dist.Store, rank: int, device: torch.device) -> None:
        try:
            torch.cuda.set_device(device)
            link = TorchDistLink(store, group, rank, device, HOST, TIMEOUT_S)
            if rank == PREFILL_RANK:
                link.send(payload, 1)
            else:
                link.recv(received, 1)
            link.close()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=(master, PREFILL_RANK, send_dev), daemon=True),
        threading.Thread(target=run, args=(client, DECODE_RANK, recv_dev), daemon=True),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=2 * TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a link end hung"
    if errors:
        raise errors[0]
    assert torch.equal(received.cpu(), expected)
    assert torch.equal(payload.cpu(), expected)
