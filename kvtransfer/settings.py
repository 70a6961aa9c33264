"""The connector's settings, read from vLLM's ``kv_connector_extra_config``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ConnectorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        "127.0.0.1",
        description="Address this worker listens on and advertises to its peers (the node IP).",
    )
    port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Base control port of a prefill engine; worker i (pp_rank * tp + tp_rank) "
        "listens on port + i. Ignored on the decode side.",
    )
    lease_s: float = Field(
        30.0, gt=0, description="How long a prefill worker holds blocks no decode worker pulled."
    )
    timeout_s: float = Field(
        30.0, gt=0, description="Limit for one control reply or one block transfer."
    )
    unknown_retry_s: float = Field(
        2.0,
        ge=0,
        description="How long a decode worker retries a pull for a transfer the prefill worker "
        "has not registered yet (the hold reaches it one engine step after the prefill ends).",
    )

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> ConnectorSettings:
        return cls.model_validate(dict(extra or {}))
