"""Starting (or joining) the Ray cluster pdserve runs on."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from cluster.pools import local_resources

if TYPE_CHECKING:
    from deploy.config import PDConfig

logger = logging.getLogger(__name__)


def connect_or_start(cfg: PDConfig, address: str | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a one-machine cluster
    that has the custom resources ``cfg``'s pools ask for."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    resources = local_resources(cfg)
    logger.info("starting a local Ray cluster with resources %s", resources)
    ray.init(resources=resources, include_dashboard=True)
