"""Feeding the KV index from the engines' own KV cache events.

Every engine publishes vLLM's ``KVEventBatch`` messages (``BlockStored`` / ``BlockRemoved`` /
``AllBlocksCleared``) on a ZMQ PUB socket, numbering its batches, and keeps its last
``buffer_steps`` batches for replay on a ROUTER socket (vLLM's ``kv_events_config``). Each
replica reports both endpoints in its routing stats (``kv_events_endpoint``,
``kv_events_replay_endpoint``). ``KVEventSubscriber`` follows every replica on one thread of its
own and applies each event to the index under the index's lock, so the index mirrors what the
engines really cache, evictions included. ``sync`` (called from the event loop) adds replicas
that appeared and drops those that left.

Guarantee: a block the index credits to a replica was stored by its engine and no removal of it
was missed. Gaps in the batch numbers are filled from the replay socket; when they cannot be
(no replay socket, the buffer moved on, no answer within ``replay_timeout_s``), the replica's
entries are dropped and rebuilt from what follows. On subscribing, a replay from batch 0 teaches
the index what the engine stored within its replay window, which also recovers batches published
before the SUB connection was up (ZMQ's slow joiner). What it cannot learn: blocks stored before
the oldest buffered batch, e.g. by an engine that ran long before the router (re)started. Those
are unknown, never wrongly present; a request that would hit them is routed as if they were not
cached, and they become known once the engine stores them again.

Bad input never stops the thread (``is_alive()`` shows one that died anyway): malformed
messages, undecodable batches and events the index rejects are counted and logged once per
replica and kind. Modules: ``subscriber.py`` (the thread, ``sync``, counters, applying batches),
``feed.py`` (one replica's sockets and the wire format), ``router.kvindex.stream`` (the ordering
decisions: gaps, restarts, replays).
"""

from __future__ import annotations

from router.kv_events.feed import END_SEQ
from router.kv_events.subscriber import KVEventSubscriber, convert

__all__ = ["END_SEQ", "KVEventSubscriber", "convert"]
