"""Direct reads: a decode worker copies held blocks straight out of a prefill worker's KV cache.

For a pair on one host whose caches are in CPU memory, Linux's cross-memory attach
(``process_vm_readv``, the syscall MPI libraries use between processes of one node) copies
bytes from another process's memory into ours in one call per 1,024 regions, without the GIL
(``ctypes`` releases it) and with nothing to do on the prefill side: no gather, no link, no
thread of the prefill engine's process woken for the data. The decode worker reads each
block's bytes (only its heads, with another TP size) straight into its own cache blocks.

Who may read. The kernel allows it where the reader may ptrace the prefill worker: same user,
and, under Yama's ``ptrace_scope`` 1, a prefill worker that said so (``allow_readers``, done
when a decode worker first offers to read it). A pair that cannot (another host, another PID
namespace, scope 2 or 3, a seccomp filter) finds out at pairing: the decode worker reads a
random nonce the prefill worker published and compares it (``probe``); if that fails it pairs
over a link.

Safety. A read is only correct while the prefill worker holds the blocks. The prefill worker
marks the pull's send in flight until the decode worker's DONE or ``timeout_s`` after the
PULL reached it, whichever comes first (a send in flight keeps the hold). The decode worker
started its clock before sending the PULL, and it keeps the bytes only if its read ended
within the prefill worker's ``timeout_s`` (sent with the offer, rounded down to a
millisecond; its own when shorter) of that start (``CLOCK_MONOTONIC`` is one clock for the
whole host); a read that ends later may have overlapped a release and is refused: vLLM
recomputes.

Layouts. Only caches with the block axis first and contiguous blocks (vLLM's CPU layout,
[blocks, heads, tokens, content]) are read; a head range is then one run of bytes per block.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import os
import secrets
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from kvtransfer.blocks import KVLayout

logger = logging.getLogger(__name__)

IOV_MAX = 1024  # regions per process_vm_readv call (Linux's UIO_MAXIOV)
NONCE_BYTES = 16
PR_SET_PTRACER = 0x59616D61
PR_SET_PTRACER_ANY = -1
YAMA_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"


class ReadError(Exception):
    """A direct read failed or cannot be done; the load fails (or pairs over a link)."""


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if not hasattr(libc, "process_vm_readv"):
        raise ReadError("this C library has no process_vm_readv")
    fn = libc.process_vm_readv
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                   ctypes.c_ulong, ctypes.c_ulong]
    return libc


def is_supported() -> bool:
    """Whether this process can make the syscall at all (Linux, a C library that has it)."""
    try:
        _libc()
    except (OSError, ReadError):
        return False
    return True


def allow_readers() -> None:
    """Let same-user processes read this one under Yama's ``ptrace_scope`` 1 (else a no-op)."""
    try:
        with open(YAMA_SCOPE) as f:
            scope = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return
    if scope == 1:
        _libc().prctl(PR_SET_PTRACER, ctypes.c_ulong(PR_SET_PTRACER_ANY & 0xFFFFFFFFFFFFFFFF),
                      0, 0, 0)


@dataclasses.dataclass(frozen=True)
class CacheRegions:
    """Where one worker's KV blocks sit in its memory: per layer (layout order) the address of
    block 0 and the bytes from one block to the next."""

    pid: int
    layers: tuple[tuple[int, int], ...]

    num_blocks: int = 0  # blocks per layer (a peer's block ids are checked against it)

    @classmethod
    def of(cls, kv_caches: dict[str, torch.Tensor], layout: KVLayout) -> CacheRegions | None:
        """This process's caches, or None when they cannot be read directly (not in CPU
        memory, block axis not first, or blocks not contiguous)."""
        layers = []
        for ly in layout.layers:
            tensor = kv_caches[ly.name]
            if tensor.device.type != "cpu" or ly.block_dim != 0 or not tensor.is_contiguous():
                return None
            layers.append((tensor.data_ptr(), tensor.stride(0) * tensor.element_size()))
        num_blocks = {kv_caches[ly.name].shape[0] for ly in layout.layers}
        if len(num_blocks) != 1:
            return None
        return cls(os.getpid(), tuple(layers), num_blocks.pop())

    def to_wire(self) -> list[list[int]]:
        return [list(layer) for layer in self.layers]


def own_regions(kv_caches: dict[str, torch.Tensor], layout: KVLayout,
                role: str) -> CacheRegions | None:
    """This worker's cache for direct reads (read from as a prefill ``role``, read into as a
    decode one), or None, logged, when it cannot take part."""
    regions = CacheRegions.of(kv_caches, layout) if is_supported() else None
    if regions is None:
        logger.info("KV %s: direct reads are on, but this worker's cache cannot take part (not "
                    "in CPU memory, not block-major, or no process_vm_readv); using links", role)
    return regions


class Probe:
    """A random nonce at a known address of the prefill worker, for a reader to check that it
    really reads this process (same host, same PID namespace, permitted)."""

    def __init__(self) -> None:
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self._array = np.frombuffer(bytearray(self.nonce), dtype=np.uint8)

    @property
    def address(self) -> int:
        return int(self._array.ctypes.data)


def read_bytes(pid: int, address: int, out_address: int, num_bytes: int) -> None:
    """Copy ``num_bytes`` at ``address`` of process ``pid`` to ``out_address`` of ours."""
    _read(pid, np.array([[out_address, num_bytes]], dtype=np.uint64),
          np.array([[address, num_bytes]], dtype=np.uint64), num_bytes)


def probe(pid: int, address: int, nonce: bytes) -> str | None:
    """Read ``len(nonce)`` bytes at ``address`` of process ``pid``: None when they are
    ``nonce``, else why direct reads cannot be used with it."""
    buffer = np.zeros(len(nonce), dtype=np.uint8)
    try:
        read_bytes(pid, address, buffer.ctypes.data, len(nonce))
    except (OSError, ReadError) as e:
        return str(e)
    return None if buffer.tobytes() == nonce else "read another process's memory"


def read_blocks(
    remote: CacheRegions, local: CacheRegions, layout: KVLayout, remote_ids: list[int],
    local_ids: list[int], remote_heads: tuple[int, int] | None = None,
    local_heads: tuple[int, int] | None = None,
) -> int:
    """Copy ``remote_ids`` of every layer of ``remote``'s cache into ``local_ids`` of ours
    (heads ``(first, count)`` of theirs into heads ``(first, count)`` of ours, when given).
    Returns the bytes read; raises ``ReadError`` unless every byte was."""
    if len(remote_ids) != len(local_ids) or len(remote.layers) != len(layout.layers):
        raise ReadError(f"{len(remote_ids)} remote blocks for {len(local_ids)} local ones, "
                        f"{len(remote.layers)} remote layers for {len(layout.layers)}")
    for regions, ids, where in ((remote, remote_ids, "there"), (local, local_ids, "here")):
        if ids and regions.num_blocks and not 0 <= min(ids) <= max(ids) < regions.num_blocks:
            raise ReadError(f"block ids out of range for the {regions.num_blocks} blocks {where}")
    remote_rows, local_rows = [], []
    theirs = np.asarray(remote_ids, dtype=np.uint64)
    ours = np.asarray(local_ids, dtype=np.uint64)
    for (r_base, r_stride), (l_base, l_stride), ly in zip(remote.layers, local.layers,
                                                           layout.layers, strict=True):
        r_offset, length = _head_run(ly, remote_heads, is_local=False)
        l_offset, l_length = _head_run(ly, local_heads, is_local=True)
        if length != l_length or r_offset + length > r_stride or l_offset + length > l_stride:
            raise ReadError(f"layer {ly.name}: {length} bytes per block there from "
                            f"{r_offset} of {r_stride}, {l_length} here from {l_offset}")
        remote_rows.append(_regions(r_base + r_offset, r_stride, theirs, length))
        local_rows.append(_regions(l_base + l_offset, l_stride, ours, length))
    remote_iov, local_iov = np.concatenate(remote_rows), np.concatenate(local_rows)
    total = int(remote_iov[:, 1].sum())
    for start in range(0, len(remote_iov), IOV_MAX):
        end = start + IOV_MAX
        _read(remote.pid, local_iov[start:end], remote_iov[start:end],
              int(remote_iov[start:end, 1].sum()))
    return total


def _head_run(ly: Any, heads: tuple[int, int] | None, is_local: bool) -> tuple[int, int]:
    """(offset in a block, length) of the bytes of ``heads`` (None: all of them) in a block of
    layer ``ly`` (our layout) here, or there: the peer's blocks hold another number of heads
    of the same size, so all of ours is not all of theirs."""
    if heads is None or (is_local and heads[1] == ly.num_heads):
        return 0, ly.bytes_per_block
    if ly.head_axis != 0 or ly.num_heads is None:
        raise ReadError(f"layer {ly.name}: heads are not the block's first axis")
    per_head = ly.bytes_per_block // ly.num_heads
    return heads[0] * per_head, heads[1] * per_head


def _regions(base: int, stride: int, block_ids: np.ndarray, length: int) -> np.ndarray:
    """One ``struct iovec`` (address, length) per block."""
    rows = np.empty((len(block_ids), 2), dtype=np.uint64)
    rows[:, 0] = np.uint64(base) + block_ids * np.uint64(stride)
    rows[:, 1] = length
    return rows


def _read(pid: int, local_iov: np.ndarray, remote_iov: np.ndarray, expected: int) -> None:
    local_iov, remote_iov = np.ascontiguousarray(local_iov), np.ascontiguousarray(remote_iov)
    got = _libc().process_vm_readv(pid, local_iov.ctypes.data, len(local_iov),
                                   remote_iov.ctypes.data, len(remote_iov), 0)
    if got < 0:
        errno = ctypes.get_errno()
        raise ReadError(f"process_vm_readv from pid {pid}: {os.strerror(errno)}")
    if got != expected:
        raise ReadError(f"process_vm_readv from pid {pid} read {got} of {expected} bytes")
