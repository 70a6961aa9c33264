"""The transport's environment variables, read in one place.

``PDSERVE_KV_SECRET``: the per-deployment secret every prefill and decode worker shares. Control
messages are signed with it (``kvtransfer.protocol.Codec``); a peer without it is refused. Given
as hex (an even number of hex digits) or as plain text (its UTF-8 bytes). Never logged.
Unset or empty: peers are not authenticated (one warning per process says so).
"""

from __future__ import annotations

import logging
import os
import string

logger = logging.getLogger(__name__)

KV_SECRET_ENV = "PDSERVE_KV_SECRET"
MIN_SECRET_BYTES = 16
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def parse_secret(text: str) -> bytes | None:
    """The secret's bytes from its text form; None when empty."""
    text = text.strip()
    if not text:
        return None
    if len(text) % 2 == 0 and all(c in string.hexdigits for c in text):
        return bytes.fromhex(text)
    return text.encode()


def warn_unauthenticated() -> None:
    """Log, once per process, that the KV transport runs without a secret."""
    _warn_once("unset", f"{KV_SECRET_ENV} is not set: KV transfer peers are not "
               "authenticated; anyone who reaches the KV ports can pull or free held blocks")


def kv_secret_text() -> str | None:
    """``PDSERVE_KV_SECRET`` as set here (where an app is built), or None when unset or
    blank."""
    text = os.environ.get(KV_SECRET_ENV, "").strip()
    return text or None


def kv_secret() -> bytes | None:
    """The deployment's KV transport secret from ``PDSERVE_KV_SECRET``, or None when unset."""
    secret = parse_secret(os.environ.get(KV_SECRET_ENV, ""))
    if secret is None:
        warn_unauthenticated()
    elif len(secret) < MIN_SECRET_BYTES:
        _warn_once("short", f"{KV_SECRET_ENV} is shorter than {MIN_SECRET_BYTES} bytes: "
                   "use a longer random secret")
    return secret
