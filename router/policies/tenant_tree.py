"""The approximate prefix tree that SGLang's and Ray Serve's prefix-aware routers keep.

Both routers remember, per replica ("tenant"), the prompts they sent there, never hearing about
evictions; both count a tenant's size and evict by least recent access. They store characters in a
radix tree; this version stores blocks keyed by chained block hash (so the tree is a dict) and
counts sizes in tokens (``block_size`` per block). Each node maps tenant -> last access time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.policy import Candidate


class _Node:
    __slots__ = ("depth", "tenants")

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.tenants: dict[str, float] = {}


class TenantTree:
    """Blocks routed to each tenant, with last access times; owned by one policy instance."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._nodes: dict[int, _Node] = {}
        # tenant -> tokens held, in the order tenants were added (the routers' map order).
        self.sizes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def add_tenant(self, tenant: str) -> None:
        self.sizes.setdefault(tenant, 0)

    def remove_tenant(self, tenant: str) -> None:
        for chain in [c for c, node in self._nodes.items() if tenant in node.tenants]:
            self._detach(chain, tenant)
        self.sizes.pop(tenant, None)

    def insert(self, hashes: Sequence[int], tenant: str, now: float) -> None:
        """Record that ``tenant`` was sent this prompt; refresh access times along the path."""
        self.add_tenant(tenant)
        nodes = self._nodes
        for depth, chain in enumerate(hashes):
            node = nodes.get(chain)
            if node is None:
                node = nodes[chain] = _Node(depth)
            if tenant not in node.tenants:
                self.sizes[tenant] += self.block_size
            node.tenants[tenant] = now

    def walk(
        self, hashes: Sequence[int], available: Collection[str] | None = None
    ) -> tuple[int, int | None]:
        """Follow the prompt down the tree: ``(blocks matched, hash of the deepest node)``.

        With ``available``, stop at the first node none of those tenants holds (Ray); without,
        at the first node no tenant holds (SGLang).
        """
        nodes = self._nodes
        depth, last = 0, None
        for chain in hashes:
            node = nodes.get(chain)
            if node is None:
                break
            if available is not None and not any(t in node.tenants for t in available):
                break
            depth, last = depth + 1, chain
        return depth, last

    def tenants_at(self, chain: int) -> dict[str, float]:
        return self._nodes[chain].tenants

    def touch(self, hashes: Sequence[int], tenant: str, now: float) -> None:
        """Refresh the tenant's access time on the nodes of this path it holds."""
        for chain in hashes:
            node = self._nodes.get(chain)
            if node is not None and tenant in node.tenants:
                node.tenants[tenant] = now

    def evict(self, tenant: str, is_done: Callable[[int], bool], group_equal_times: bool) -> int:
        """Drop the tenant's least recently used blocks, leaves first, until ``is_done(removed)``.

        With ``group_equal_times`` every block sharing the oldest access time goes together
        (Ray); otherwise one block at a time (SGLang). Returns the tokens removed.
        """
        owned = [
            (node.tenants[tenant], -node.depth, chain)
            for chain, node in self._nodes.items()
            if tenant in node.tenants
        ]
        owned.sort()
        removed, start = 0, 0
        while start < len(owned) and not is_done(removed):
            end = start + 1
            if group_equal_times:
                while end < len(owned) and owned[end][0] == owned[start][0]:
                    end += 1
            for _, _, chain in owned[start:end]:
                self._detach(chain, tenant)
                removed += self.block_size
            start = end
        return removed

    def _detach(self, chain: int, tenant: str) -> None:
        node = self._nodes[chain]
        del node.tenants[tenant]
        if tenant in self.sizes:
            self.sizes[tenant] -= self.block_size
        if not node.tenants:
            del self._nodes[chain]


def tree_with_tenants(
    tree: TenantTree | None, block_size: int, candidates: Sequence[Candidate]
) -> TenantTree:
    """``tree`` (made on first use) with every candidate registered as a tenant."""
    if tree is None:
        tree = TenantTree(block_size)
    for candidate in candidates:
        if candidate.replica_id not in tree.sizes:
            tree.add_tenant(candidate.replica_id)
    return tree
