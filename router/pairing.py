"""Joint prefill/decode choice: which pair serves a request, or whether decode prefills itself.

``PairSelector.select(prefill_candidates, decode_candidates, ctx) -> PairChoice`` is called by the
router once per request, on its event loop, with the live replicas of both pools and one
``RoutingContext`` whose ``cached_tokens`` covers prefill and decode replicas alike (the KV index
knows both). It mutates nothing it is given; the two policies keep their own bookkeeping, and the
selector keeps each decode replica's stall budget (``router.stall_budget``).

1. The decode policy picks the decode replica. Given a cache-aware decode policy, that is where
   the prompt is already cached, weighed against decode load.
2. Local prefill (``PairChoice.prefill is None``: the decode replica computes the rest of the
   prompt itself and no KV transfer happens) when the decode replica has a reason to, and its
   running sequences can absorb the stall. The reasons:

   - it holds the prompt: at most ``local_prefill_max_uncached_tokens`` are not cached there
     (and some are);
   - the prefill pool is saturated: every prefill replica has more than
     ``prefill_saturation_s`` of work queued;
   - it holds most of it (at most ``local_prefill_max_uncached_fraction`` is not cached there)
     and much more than the prefill replica the prefill policy chose: that one would compute
     at least ``local_prefill_cost_factor`` times its remainder. This is a conversation whose
     history the prefill pool has evicted but its decode replica still holds, or whose prefill
     replica is too busy and the policy sent it elsewhere: rather than computing its history
     again there, the decode replica computes the new turn. A cold prompt never passes this.
     The prefill replica's tokens are those its policy charged (``charged_tokens``): a hot
     prefix the policy copies to a new replica on purpose counts as shared with the requests
     that will reuse it there.
     The prefill policy is told the request will not run where it chose
     (``on_request_done``).

   The stall: the remainder at the decode replica's measured prefill speed. A replica with no
   running sequence takes it; otherwise it must fit the replica's stall budget, which keeps the
   mean inter-token latency of its sequences within ``itl_target_ms`` (or ``itl_target_factor``
   times its measured step time) over windows of ``itl_window_s``.

   Always local when there is no prefill replica.
3. Otherwise the request goes to the prefill replica the prefill policy picked.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from router.policy import NOMINAL_PREFILL_TOKENS_PER_S, Candidate, RoutingContext, RoutingPolicy
from router.stall_budget import StallBudget


class PairingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enable_local_prefill: bool = Field(
        True,
        description="Let a decode replica prefill a request itself; off, every request goes "
        "through a prefill replica while there is one.",
    )
    local_prefill_max_uncached_tokens: int = Field(
        16, ge=0, description="A decode replica holds a prompt when at most this many of its "
        "tokens are not cached there; it then prefills the rest itself (within its stall budget)."
    )
    local_prefill_cost_factor: float = Field(
        2.0, ge=0, description="Prefill locally (within the stall budget) when every prefill "
        "replica would compute at least this many times the decode replica's uncached remainder "
        "and local_prefill_max_uncached_fraction holds (0 disables this test)."
    )
    local_prefill_max_uncached_fraction: float = Field(
        0.5, ge=0, le=1, description="...and at most this fraction of the prompt is not cached "
        "on the decode replica: it holds most of the prompt, so a cold prompt never passes."
    )
    prefill_saturation_s: float | None = Field(
        30.0, ge=0, description="The prefill pool is saturated when every prefill replica has "
        "more than this many seconds of prefill queued; decode replicas then take cold prompts "
        "too, within their stall budget. None disables this test."
    )
    itl_target_factor: float = Field(
        1.2, ge=1.0, description="Local prefills may raise the mean inter-token latency of a "
        "decode replica's running sequences to this multiple of its measured decode step time "
        "(1: no local prefill while sequences run)."
    )
    itl_target_ms: float | None = Field(
        None, gt=0, description="An absolute inter-token latency target instead of the factor "
        "(the replica must report its decode step time; while it has not, it takes no local "
        "prefill while sequences run)."
    )
    itl_window_s: float = Field(
        2.0, gt=0, description="Window over which the target holds: a decode replica saves up "
        "at most this window's allowance of stall, so one local prefill stalls its sequences "
        "for at most about (1 - 1 / itl_target_factor) * itl_window_s."
    )
    nominal_tokens_per_s: float = Field(
        NOMINAL_PREFILL_TOKENS_PER_S, gt=0,
        description="Prefill speed assumed for a replica that reports none (tokens/s).",
    )


@dataclasses.dataclass(frozen=True)
class PairChoice:
    """Where a request goes: ``prefill`` None means the decode replica prefills it locally."""

    prefill: Candidate | None
    decode: Candidate

    @property
    def is_local_prefill(self) -> bool:
        return self.prefill is None


def is_small_remainder(settings: PairingSettings, decode: Candidate, ctx: RoutingContext) -> bool:
    """Whether the decode replica caches all of the prompt but a small remainder (and some of
    it: a short cold prompt is no exception to cold prompts going to the prefill pool)."""
    remainder = ctx.uncached_tokens(decode.replica_id)
    return remainder <= settings.local_prefill_max_uncached_tokens and (
        remainder < ctx.num_prompt_tokens
    )


def has_cache_advantage(
    settings: PairingSettings, decode: Candidate, prefill_tokens: float, ctx: RoutingContext
) -> bool:
    """Whether the decode replica holds most of the prompt, and the chosen prefill replica
    would compute ``factor`` times the decode replica's remainder (``prefill_tokens``, as the
    prefill policy counts them)."""
    factor = settings.local_prefill_cost_factor
    remainder = ctx.uncached_tokens(decode.replica_id)
    most_cached = remainder <= settings.local_prefill_max_uncached_fraction * ctx.num_prompt_tokens
    if factor <= 0 or not most_cached:
        return False
    return factor * remainder <= prefill_tokens


def is_prefill_saturated(settings: PairingSettings, prefill: Sequence[Candidate]) -> bool:
    """Whether every prefill replica has more queued prefill time than the saturation limit."""
    limit = settings.prefill_saturation_s
    if limit is None:
        return False
    nominal = settings.nominal_tokens_per_s
    return all(
        c.load.queued_prefill_tokens / c.load.prefill_speed(nominal) > limit for c in prefill
    )


def stall_fraction(settings: PairingSettings, decode: Candidate) -> float:
    """The share of its time a decode replica may spend on local prefills (ITL target)."""
    if settings.itl_target_ms is None:
        return 1.0 - 1.0 / settings.itl_target_factor
    step_s = decode.load.decode_step_s
    if step_s <= 0:
        return 0.0
    return max(0.0, 1.0 - step_s / (settings.itl_target_ms / 1000.0))


def predicted_stall_s(settings: PairingSettings, decode: Candidate, ctx: RoutingContext) -> float:
    """How long a local prefill of this request would stall the decode replica's sequences."""
    speed = decode.load.prefill_speed(settings.nominal_tokens_per_s)
    return ctx.uncached_tokens(decode.replica_id) / speed


class PairSelector:
    """Chooses the prefill/decode pair of a request with one policy per pool."""

    def __init__(
        self,
        prefill_policy: RoutingPolicy,
        decode_policy: RoutingPolicy,
        settings: PairingSettings | None = None,
    ) -> None:
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        self.settings = settings or PairingSettings()
        self.stall_budget = StallBudget(self.settings.itl_window_s)

    def select(
        self,
        prefill_candidates: Sequence[Candidate],
        decode_candidates: Sequence[Candidate],
        ctx: RoutingContext,
    ) -> PairChoice:
        if not decode_candidates:
            raise ValueError("no live decode replica")
        s = self.settings
        decode = self.decode_policy.select(decode_candidates, ctx)
        if not prefill_candidates:
            return PairChoice(None, decode)
        local = s.enable_local_prefill
        if local and (is_small_remainder(s, decode, ctx)
                      or is_prefill_saturated(s, prefill_candidates)) \
                and self.takes_stall(decode, ctx):
            return PairChoice(None, decode)
        prefill = self.prefill_policy.select(prefill_candidates, ctx)
        charged = self.prefill_policy.charged_tokens(prefill, ctx)
        if local and has_cache_advantage(s, decode, charged, ctx) \
                and self.takes_stall(decode, ctx):
            self.prefill_policy.on_request_done(prefill.replica_id, ctx)  # it will not run there
            return PairChoice(None, decode)
        return PairChoice(prefill, decode)

    def takes_stall(self, decode: Candidate, ctx: RoutingContext) -> bool:
        """Whether ``decode``'s sequences can absorb the stall of prefilling this request
        there; if so, the stall is spent."""
        s = self.settings
        now_s = time.monotonic() if ctx.now_s is None else ctx.now_s
        stall_s = predicted_stall_s(s, decode, ctx)
        fraction = stall_fraction(s, decode)
        rid = decode.replica_id
        if decode.load.num_running > 0 and not self.stall_budget.can_take(
            rid, stall_s, fraction, now_s
        ):
            return False
        self.stall_budget.take(rid, stall_s, fraction, now_s)
        return True
