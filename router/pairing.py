"""Joint prefill/decode choice: which pair serves a request, or whether decode prefills itself.

``PairSelector.select(prefill_candidates, decode_candidates, ctx) -> PairChoice`` is called by the
router once per request, on its event loop, with the live replicas of both pools and one
``RoutingContext`` whose ``cached_tokens`` covers prefill and decode replicas alike (the KV index
knows both). It mutates nothing it is given; the two policies keep their own bookkeeping.

1. The decode policy picks the decode replica. Given a cache-aware decode policy, that is where
   the prompt is already cached, weighed against decode load.
2. Local prefill (``PairChoice.prefill is None``: the decode replica computes the rest of the
   prompt itself and no KV transfer happens) when the decode replica is not itself backed up
   with local prefills (at most ``local_prefill_max_queued_tokens`` queued) and

   - it holds most of the prompt: the uncached remainder is at most
     ``local_prefill_max_uncached_tokens`` and at most ``local_prefill_max_uncached_fraction``
     of the prompt; or
   - it holds much more of the prompt than any prefill replica: the remainder is at most
     ``local_prefill_max_advantage_tokens`` and every prefill replica would compute at least
     ``local_prefill_cost_factor`` times as much (the case of a conversation whose last turns
     were prefilled locally); or
   - every prefill replica is saturated (more than ``prefill_saturation_tokens`` queued);

   and always when there is no prefill replica.
3. Otherwise the prefill policy picks the prefill replica.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from router.policy import Candidate, RoutingContext, RoutingPolicy


class PairingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enable_local_prefill: bool = Field(
        True,
        description="Let a decode replica prefill a request itself; off, every request goes "
        "through a prefill replica while there is one.",
    )
    local_prefill_max_uncached_tokens: int = Field(
        2048,
        ge=0,
        description="Prefill locally when at most this many prompt tokens are not cached on the "
        "chosen decode replica: about one conversation turn, so that a conversation's history "
        "is kept on its decode replica only instead of on both replicas of a pair.",
    )
    local_prefill_max_uncached_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="...and at most this fraction of the prompt is not cached there (the decode "
        "replica holds most of the prompt; 1.0 also sends short cold prompts to decode).",
    )
    local_prefill_cost_factor: float = Field(
        2.0,
        ge=0,
        description="Prefill locally when every prefill replica would compute at least this many "
        "times the decode replica's uncached remainder (0 disables this test). The factor prices "
        "the stall a local prefill causes to the decode replica's running sequences.",
    )
    local_prefill_max_advantage_tokens: int = Field(
        8192,
        ge=0,
        description="Largest remainder the cost-factor test sends to a decode replica.",
    )
    local_prefill_max_queued_tokens: int = Field(
        4096,
        ge=0,
        description="A decode replica with more prefill tokens than this already queued takes no "
        "further local prefill (saturation of the prefill pool aside).",
    )
    prefill_saturation_tokens: int | None = Field(
        None,
        ge=0,
        description="The prefill pool is saturated when every prefill replica has more than this "
        "many prefill tokens queued; decode then prefills locally. None disables this test.",
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
    """Whether the decode replica caches all of the prompt but a small remainder."""
    uncached = ctx.uncached_tokens(decode.replica_id)
    return (
        uncached <= settings.local_prefill_max_uncached_tokens
        and uncached <= settings.local_prefill_max_uncached_fraction * ctx.num_prompt_tokens
    )


def has_cache_advantage(
    settings: PairingSettings,
    decode: Candidate,
    prefill: Sequence[Candidate],
    ctx: RoutingContext,
) -> bool:
    """Whether every prefill replica would compute ``factor`` times the decode remainder."""
    factor = settings.local_prefill_cost_factor
    remainder = ctx.uncached_tokens(decode.replica_id)
    if factor <= 0 or remainder > settings.local_prefill_max_advantage_tokens:
        return False
    return all(factor * remainder <= ctx.uncached_tokens(c.replica_id) for c in prefill)


def is_prefill_saturated(settings: PairingSettings, prefill: Sequence[Candidate]) -> bool:
    """Whether every prefill replica has more queued prefill work than the saturation limit."""
    limit = settings.prefill_saturation_tokens
    if limit is None:
        return False
    return all(c.load.queued_prefill_tokens > limit for c in prefill)


def prefills_locally(
    settings: PairingSettings,
    decode: Candidate,
    prefill: Sequence[Candidate],
    ctx: RoutingContext,
) -> bool:
    """The local-prefill rule of the module docstring (given at least one prefill replica)."""
    if not settings.enable_local_prefill:
        return False
    if is_prefill_saturated(settings, prefill):
        return True
    if decode.load.queued_prefill_tokens > settings.local_prefill_max_queued_tokens:
        return False
    return is_small_remainder(settings, decode, ctx) or has_cache_advantage(
        settings, decode, prefill, ctx
    )


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

    def select(
        self,
        prefill_candidates: Sequence[Candidate],
        decode_candidates: Sequence[Candidate],
        ctx: RoutingContext,
    ) -> PairChoice:
        if not decode_candidates:
            raise ValueError("no live decode replica")
        decode = self.decode_policy.select(decode_candidates, ctx)
        if not prefill_candidates or prefills_locally(
            self.settings, decode, prefill_candidates, ctx
        ):
            return PairChoice(None, decode)
        return PairChoice(self.prefill_policy.select(prefill_candidates, ctx), decode)
