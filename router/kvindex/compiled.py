"""``compiled``: numba's ``njit`` with an explicit signature, cached on disk when it can be.

The signature makes numba compile at import, so no request waits for a compile. The compiled
code is cached next to the module (or in numba's user-wide cache directory), so a later process
loads it instead; where neither directory can be written (a read-only install without a home),
numba refuses ``cache=True`` at import, and the function is compiled without a cache instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from numba import njit

logger = logging.getLogger(__name__)


def compiled(signature: Any, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``njit(signature, cache=True, **options)``, or without ``cache`` where it cannot be."""

    def wrap(fn: Callable[..., Any]) -> Any:
        try:
            return njit(signature, cache=True, **options)(fn)
        except RuntimeError as e:  # numba: "cannot cache function ...: no locator available"
            if "cannot cache" not in str(e):
                raise
            logger.info("numba cannot cache %s here (%s); compiling it in each process",
                        fn.__qualname__, e)
            return njit(signature, **options)(fn)

    return wrap
