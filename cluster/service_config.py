"""The router's and the KV transfer's parts of pdserve's configuration (``cluster.config``
assembles them into ``PDConfig``)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from kvtransfer.settings import TransferSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


API_KEY_ENV = "PDSERVE_API_KEY"  # the ingress's API key when RouterConfig.api_key is unset


# cache_cost's settings for the decode pool, under whatever decode_policy_kwargs sets.
DECODE_CACHE_COST_DEFAULTS: dict[str, float] = {
    "running_seq_tokens": 1024.0, "kv_usage_tokens": 4096.0, "load_bound_abs_s": 0.2,
    "load_bound_prompts": 0.0, "in_flight_ttl_s": 0.0, "reuse_horizon_s": 0.0,
}


class RouterConfig(_Strict):
    """The ingress: HTTP front door and replica choice."""

    prefill_policy: str = Field(
        "cache_cost", description="Routing policy for prefill (router.policies names)."
    )
    decode_policy: str = Field("cache_cost", description="Routing policy for decode.")
    prefill_policy_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Settings of the prefill policy (its weights; "
        "cache_cost's defaults are the prefill pool's)."
    )
    decode_policy_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings of the decode policy. For cache_cost they are laid over the "
        "decode pool's defaults (DECODE_CACHE_COST_DEFAULTS: what a running sequence and a full "
        "KV cache weigh, in prefill-token equivalents, and a tight load band, since the decode "
        "pool balances running sequences first), so that setting one keeps the others; "
        "policy_kwargs('decode') is what the policy gets.",
    )
    pairing: dict[str, Any] = Field(
        default_factory=dict,
        description="Joint prefill/decode choice (router.pairing.PairingSettings, whose "
        "defaults are shipped): when the decode replica prefills locally.",
    )
    prefill_timeout_s: float = Field(
        120.0, gt=0, description="Limit for one prefill call before it counts as failed."
    )
    prefill_retries: int = Field(
        1, ge=0, description="Other prefill replicas tried after a failed prefill, before the "
        "decode replica prefills locally."
    )
    guess_ttl_s: float = Field(
        120.0, gt=0, description="For replicas that publish no KV events: how long the router "
        "assumes a replica keeps a prompt it routed there."
    )
    failed_replica_s: float = Field(
        30.0, gt=0, description="How long a prefill or decode replica whose call failed or "
        "timed out is left out of routing (a replacement replica, with a new id, is not)."
    )
    busy_replica_s: float = Field(
        1.0, gt=0, description="How long a replica that answered 503 (busy, not failed) is "
        "left out of routing."
    )
    decode_first_token_timeout_s: float = Field(
        120.0, gt=0, description="Limit for a streaming decode call until its first chunk; "
        "past it the call counts as failed and is retried on another decode replica."
    )
    decode_timeout_s: float = Field(
        600.0, gt=0, description="Limit for a whole non-streaming decode call (vLLM's "
        "non-streaming handler shows no first token); past it the call is retried."
    )
    decode_retries: int = Field(
        1, ge=0, description="Other decode replicas tried after a decode call failed or timed "
        "out before its first token; with none left the client gets a 503."
    )
    api_key: SecretStr | None = Field(
        None, description="Key clients must send as `Authorization: Bearer <key>` on /v1/* "
        "and /routing (/health stays open for load balancers). Unset: the environment "
        f"variable {API_KEY_ENV}; neither: no authentication."
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="Largest request body accepted (413 beyond), "
        "checked before parsing, against Content-Length too."
    )
    allow_request_chat_template: bool = Field(
        False, description="Accept a `chat_template` in a chat request (vLLM's "
        "--trust-request-chat-template; the engines need that flag in extra_args too). Off: "
        "such a request gets a 400."
    )

    def policy(self, pool: str) -> str:
        """The name of ``pool``'s routing policy."""
        return self.prefill_policy if pool == "prefill" else self.decode_policy

    def policy_kwargs(self, pool: str) -> dict[str, Any]:
        """The settings ``pool``'s policy is built with: what the config sets, over the decode
        pool's cache_cost defaults where they apply. (The fields keep only what was set, so a
        saved config does not pin today's defaults, and switching policy needs no clean-up.)"""
        if pool == "prefill":
            return dict(self.prefill_policy_kwargs)
        if self.decode_policy == "cache_cost":
            return {**DECODE_CACHE_COST_DEFAULTS, **self.decode_policy_kwargs}
        return dict(self.decode_policy_kwargs)

    def coordinator_settings(self, block_size: int) -> dict[str, Any]:
        return {"block_size": block_size, "prefill_policy": self.prefill_policy,
                "decode_policy": self.decode_policy,
                "prefill_policy_kwargs": self.policy_kwargs("prefill"),
                "decode_policy_kwargs": self.policy_kwargs("decode"), "pairing": self.pairing,
                "guess_ttl_s": self.guess_ttl_s, "failed_replica_s": self.failed_replica_s,
                "busy_replica_s": self.busy_replica_s}

    def resolved_api_key(self) -> str | None:
        """The ingress's API key: ``api_key``, else the environment variable (the one place
        it is read); None when neither is set."""
        if self.api_key is not None:
            return self.api_key.get_secret_value() or None
        return os.environ.get(API_KEY_ENV) or None

    def ingress_settings(self) -> dict[str, Any]:
        """The ingress's own settings (``router.app.IngressSettings``), API key resolved."""
        return {"api_key": self.resolved_api_key(),
                "max_request_bytes": self.max_request_bytes,
                "allow_request_chat_template": self.allow_request_chat_template,
                "decode_timeout_s": self.decode_timeout_s,
                "decode_first_token_timeout_s": self.decode_first_token_timeout_s,
                "decode_retries": self.decode_retries}


class KVTransferConfig(TransferSettings):
    """How KV blocks move from prefill to decode: the connector's settings
    (``kvtransfer.settings``) that do not depend on the replica.

    The transport's secret is not configured here: it comes from ``PDSERVE_KV_SECRET``.
    """
