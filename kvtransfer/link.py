"""The data plane of one (prefill worker, decode worker) pair.

Contract, for every link implementation. Both ends are built by the transfer code of one worker
process (never shared across processes) and used from one thread at a time:

``send(buffer)``   prefill side. Blocks until ``buffer`` (a flat uint8 tensor on the KV
                   cache's device) has been handed to the peer and may be reused or freed.
``recv(buffer)``   decode side. Blocks until ``buffer`` holds exactly what the peer sent.
``close()``        optional; releases the link's resources.

Errors (peer gone, timeout) raise; the caller turns them into a failed transfer.

``TorchDistLink`` is the implementation: a two-rank torch.distributed process group built for
the pair alone from a TCPStore rendezvous (no global world, so replicas come and go freely).
One code path serves both devices: ProcessGroupNCCL when the KV cache lives on a CUDA device,
ProcessGroupGloo when it lives in CPU memory.
"""

from __future__ import annotations

import abc
import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PREFILL_RANK = 0
DECODE_RANK = 1


class Link(abc.ABC):
    @abc.abstractmethod
    def send(self, buffer: torch.Tensor) -> None:
        """Hand ``buffer`` to the peer; return once it may be reused."""

    @abc.abstractmethod
    def recv(self, buffer: torch.Tensor) -> None:
        """Fill ``buffer`` with what the peer sends."""

    def close(self) -> None:  # noqa: B027
        """Release the link."""


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class TorchDistLink(Link):
    """A two-rank process group over a TCPStore prefix; rank 0 is the prefill worker."""

    def __init__(
        self,
        store: torch.distributed.Store,
        group: str,
        rank: int,
        device: torch.device,
        host: str,
        timeout_s: float,
    ) -> None:
        import torch.distributed as dist

        self._rank = rank
        self._peer = 1 - rank
        self._device = device
        timeout = datetime.timedelta(seconds=timeout_s)
        prefix = dist.PrefixStore(f"pdserve/{group}", store)
        if backend_for(device) == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self._pg = dist.ProcessGroupNCCL(prefix, rank, 2, opts)
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self._pg = dist.ProcessGroupGloo(prefix, rank, 2, opts)

    def send(self, buffer: torch.Tensor) -> None:
        self._pg.send([buffer], self._peer, 0).wait()
        self._sync()

    def recv(self, buffer: torch.Tensor) -> None:
        self._pg.recv([buffer], self._peer, 0).wait()
        self._sync()

    def _sync(self) -> None:
        # NCCL's wait() only orders the current stream after the transfer; the caller is
        # about to report the blocks as sent or loaded, so wait for the stream itself.
        if self._device.type == "cuda":
            import torch

            torch.cuda.current_stream(self._device).synchronize()

    def close(self) -> None:
        shutdown = getattr(self._pg, "shutdown", None)
        if shutdown is not None:
            shutdown()
