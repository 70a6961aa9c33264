"""The prefill server: runs a prompt once, keeps its KV blocks for the decode side.

A plain class holding an engine whose connector is the ``kv_producer``; ``deploy/`` turns it
into a Ray Serve deployment. ``prefill`` computes the prompt with ``max_tokens=1`` and returns
the transfer parameters (where the blocks are, under which transfer id) that the decode server
needs; the blocks stay allocated until the decode side confirms or the lease expires.
"""

from __future__ import annotations

from typing import Any

from cluster.engine import EngineServer, is_error

# Fields that only shape the output; a prefill produces none worth keeping.
DROPPED_FIELDS = ("stream_options", "logprobs", "top_logprobs", "echo", "min_tokens", "n",
                  "best_of", "max_completion_tokens", "stop", "stop_token_ids")


def prefill_body(body: dict[str, Any], transfer_id: str) -> dict[str, Any]:
    """The request body a prefill engine runs for ``body``: one token, no streaming."""
    out = {k: v for k, v in body.items() if k not in DROPPED_FIELDS}
    out.update(max_tokens=1, stream=False, kv_transfer_params={
        "do_remote_decode": True, "transfer_id": transfer_id})
    return out


class PrefillServer(EngineServer):
    async def prefill(self, kind: str, body: dict[str, Any], transfer_id: str,
                      pin: str | None = None) -> dict[str, Any]:
        """Prefill ``body``; return ``{"kv_transfer_params": ...}`` or an OpenAI error body.

        ``pin`` is the replica the router chose; Ray Serve's request router reads it."""
        prompt = body.get("prompt")
        num_tokens = len(prompt) if isinstance(prompt, list) and prompt and \
            isinstance(prompt[0], int) else 0
        self.num_in_flight += 1
        self.queued_prefill_tokens += num_tokens
        try:
            result = await self.engine.call(kind, prefill_body(body, transfer_id))
        finally:
            self.num_in_flight -= 1
            self.queued_prefill_tokens -= num_tokens
        if is_error(result):
            return result
        return {"kv_transfer_params": result.get("kv_transfer_params")}
