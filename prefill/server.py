"""The prefill server: runs a prompt once, keeps its KV blocks for the decode side.

A plain class holding an engine whose connector is the ``kv_producer``; ``deploy/`` turns it
into a Ray Serve deployment. ``prefill`` computes the prompt with ``max_tokens=1`` and returns
the transfer parameters (where the blocks are, under which transfer id) that the decode server
needs; the blocks stay allocated until the decode side confirms or the lease expires.

What it refuses, never running the prompt:

- anything but exactly one prompt with ``n == 1`` and ``best_of <= 1`` (400: one transfer
  carries one prompt's blocks; the router sends each prompt of several apart, and ``n > 1``
  without its ``n``);
- any prompt while the engine holds ``max_held_blocks`` KV blocks for decode (503, busy).

A prompt the scheduler would not hold blocks for (``{"busy": true}`` transfer parameters, or
none) is answered busy too: the router tries another replica or prefills on decode.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cluster.engine import TIMED_REQUEST_PREFIX, EngineServer, OpenAIEngine, is_error
from cluster.sse import error_body

# Fields that only shape the output; a prefill produces none worth keeping.
DROPPED_FIELDS = ("stream_options", "logprobs", "top_logprobs", "echo", "min_tokens", "n",
                  "best_of", "max_completion_tokens", "stop", "stop_token_ids")


def prefill_body(body: dict[str, Any], transfer_id: str) -> dict[str, Any]:
    """The request body a prefill engine runs for ``body``: one token, no streaming."""
    out = {k: v for k, v in body.items() if k not in DROPPED_FIELDS}
    out.update(max_tokens=1, stream=False, request_id=TIMED_REQUEST_PREFIX + transfer_id,
               kv_transfer_params={"do_remote_decode": True, "transfer_id": transfer_id})
    return out


def engine_request_id(kind: str, transfer_id: str) -> str:
    """The id vLLM's OpenAI layer gives the engine request ``prefill_body`` makes."""
    base = TIMED_REQUEST_PREFIX + transfer_id
    return f"cmpl-{base}-0" if kind == "completion" else f"chatcmpl-{base}"


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and \
        all(type(t) is int for t in value)


def is_single_prompt(prompt: Any) -> bool:
    """One text or one list of token ids, bare or as the only item of a list."""
    if isinstance(prompt, str) or _is_token_ids(prompt):
        return True
    return isinstance(prompt, list) and len(prompt) == 1 and \
        (isinstance(prompt[0], str) or _is_token_ids(prompt[0]))


def refusal(kind: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """A 400 error body when ``body`` is not exactly one prompt with n == 1, best_of <= 1."""
    n, best_of = body.get("n"), body.get("best_of")
    if n is not None and (type(n) is not int or n != 1):
        problem, param = f"n = {n!r}", "n"
    elif best_of is not None and (type(best_of) is not int or best_of > 1):
        problem, param = f"best_of = {best_of!r}", "best_of"
    elif kind == "completion" and not is_single_prompt(body.get("prompt")):
        problem, param = "a prompt that is not exactly one text or one list of token ids", \
            "prompt"
    else:
        return None
    return error_body(
        400, f"a prefill replica runs exactly one prompt with n == 1 and best_of <= 1, and got "
        f"{problem}. The router sends each prompt apart and without n, so this one reached "
        "prefill by mistake (a routing bug).", "BadRequestError", param)


def busy_body(reason: str) -> dict[str, Any]:
    return error_body(503, f"prefill replica busy: {reason}; try another prefill replica or "
                      "prefill on decode", "ServiceUnavailableError")


class PrefillServer(EngineServer):
    def __init__(self, engine: OpenAIEngine, max_held_blocks: int | None = None) -> None:
        super().__init__(engine)
        if max_held_blocks is not None and max_held_blocks < 1:
            raise ValueError(f"max_held_blocks must be >= 1 or None, not {max_held_blocks}")
        self.max_held_blocks = max_held_blocks

    def is_busy(self) -> bool:
        """The engine holds ``max_held_blocks`` KV blocks for decode (as of its last step)."""
        return self.max_held_blocks is not None and \
            self.engine.stats.num_held_blocks >= self.max_held_blocks

    async def prefill(self, kind: str, body: dict[str, Any], transfer_id: str,
                      pin: str | None = None) -> dict[str, Any]:
        """Prefill ``body``; return ``{"kv_transfer_params": ...}`` or an OpenAI error body
        (400 for what prefill never runs, 503 when busy).

        ``pin`` is the replica the router chose; Ray Serve's request router reads it."""
        refused = refusal(kind, body)
        if refused is not None:
            self.count_failure("refused", f"prefill refused a request: "
                               f"{refused['error']['message']}")
            return refused
        if self.is_busy():
            return self._busy(f"it holds {self.engine.stats.num_held_blocks} KV blocks for "
                              f"decode (max_held_blocks {self.max_held_blocks})")
        result = await self._run(kind, body, transfer_id)
        if is_error(result):
            return result
        params = result.get("kv_transfer_params")
        if not params or params.get("busy"):
            return self._busy("its scheduler did not hold the prompt's KV blocks "
                              f"(max_held_blocks {self.max_held_blocks} reached)" if params
                              else "its engine returned no transfer parameters")
        answer: dict[str, Any] = {"kv_transfer_params": params}
        await asyncio.sleep(0)  # the engine's stat loggers record the finished request
        timing = self.engine.stats.take_timing(engine_request_id(kind, transfer_id))
        if timing is not None:  # where its time went, for the router's TTFT breakdown
            answer["timing"] = {"queue_s": timing.queue_s, "compute_s": timing.compute_s}
        return answer

    async def _run(self, kind: str, body: dict[str, Any], transfer_id: str) -> Any:
        prompt = body.get("prompt")
        num_tokens = len(prompt) if _is_token_ids(prompt) else 0
        self.num_in_flight += 1
        self.queued_prefill_tokens += num_tokens
        try:
            return await self.engine.call(kind, prefill_body(body, transfer_id))
        finally:
            self.num_in_flight -= 1
            self.queued_prefill_tokens -= num_tokens

    def _busy(self, reason: str) -> dict[str, Any]:
        self.count_failure("busy", f"prefill answered busy: {reason}")
        return busy_body(reason)
