"""Starting (or joining) the Ray cluster pdserve runs on."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from cluster.pools import local_num_cpus, local_resources

if TYPE_CHECKING:
    from cluster.config import PDConfig

logger = logging.getLogger(__name__)


RAY_ADDRESS_ENV = "RAY_ADDRESS"
START_ATTEMPTS = 2  # a local cluster whose start fails is started once more


def cluster_address(address: str | None = None) -> str | None:
    """The running cluster to join: ``address``, else ``RAY_ADDRESS`` (which ``ray job
    submit`` sets for its entrypoint); None means start one here."""
    return address or os.environ.get(RAY_ADDRESS_ENV) or None


def connect_or_start(cfg: PDConfig, address: str | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a one-machine cluster
    that has the custom resources ``cfg``'s pools ask for."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(address)
    if address:
        ray.init(address=address)
        return
    resources = local_resources(cfg)
    # Logical CPUs: at least what the replicas' workers reserve, even past the cores there are.
    num_cpus = max(os.cpu_count() or 1, math.ceil(local_num_cpus(cfg)))
    logger.info("starting a local Ray cluster with %d CPUs and resources %s", num_cpus, resources)
    with affinity(parse_cores(cfg.serving_cores) if cfg.serving_cores else None):
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                ray.init(num_cpus=num_cpus, resources=resources, include_dashboard=True)
                return
            except Exception as e:
                if attempt == START_ATTEMPTS:
                    raise
                # Seen once in CI: Ray's dashboard process aborted at start (return code -6,
                # before writing a log), and ray.init raised.
                logger.warning("starting the local Ray cluster failed (%s: %s); starting it "
                               "again", type(e).__name__, e)
                ray.shutdown()


def parse_cores(text: str) -> set[int]:
    """'1-3,6' -> {1, 2, 3, 6}."""
    cores = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


@contextlib.contextmanager
def affinity(cores: set[int] | None) -> Iterator[None]:
    """Run the block on ``cores`` (None: unchanged), then restore the calling thread's
    affinity; the processes it started keep ``cores`` and hand them down to theirs."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    logger.info("Ray's processes, the router and the replicas run on cores %s",
                sorted(cores))
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
