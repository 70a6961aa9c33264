"""Schemathesis over the ingress's served OpenAPI schema (``GET /openapi.json``).

Cases are generated from vLLM's own request models (the schema the ingress serves), valid and
invalid ones, for every POST route, and sent to the real FastAPI app with fake replicas in front
(``test_router_app``'s fakes). No case may get a 5xx, and afterwards the app still answers a
valid request through a prefill replica and a decode replica.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.unit.test_router_app import MODEL, Harness, build_model_dir, make_app

schemathesis = pytest.importorskip("schemathesis")
NUM_CASES = 170


def to_httpx(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A schemathesis case's transport arguments (requests style) as httpx arguments."""
    out = {"method": kwargs["method"], "url": kwargs["url"], "headers": kwargs["headers"],
           "params": kwargs.get("params") or None}
    if "json" in kwargs:
        out["content"] = json.dumps(kwargs["json"]).encode()
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        out["content"] = data if isinstance(data, bytes) else str(data).encode()
    return out


def test_generated_requests_never_get_a_5xx(tmp_path, monkeypatch) -> None:
    from schemathesis import GenerationMode

    loop = asyncio.new_event_loop()
    harness = Harness(*make_app(build_model_dir(tmp_path), monkeypatch))
    statuses: Counter[int] = Counter()
    server_errors: list[str] = []
    try:
        served = loop.run_until_complete(harness.client.get("/openapi.json")).json()
        schema = schemathesis.openapi.from_dict(served)

        def check(case: Any) -> None:
            kwargs = to_httpx(case.as_transport_kwargs(base_url="http://router"))
            response = loop.run_until_complete(harness.client.request(**kwargs))
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                server_errors.append(f"{response.status_code} {response.text[:300]} "
                                     f"for {kwargs.get('content', b'')[:300]!r}")

        for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
            operation = schema[path]["POST"]
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run = settings(max_examples=NUM_CASES, deadline=None, database=None,
                               derandomize=True, suppress_health_check=list(HealthCheck))(
                    given(case=operation.as_strategy(mode))(check))
                run()
        assert not server_errors, server_errors[:5]
        assert sum(statuses.values()) >= 1000, statuses
        assert statuses[200] > 0 and any(400 <= s < 500 for s in statuses), statuses
        # Still serving: a valid request goes through a prefill replica and a decode replica.
        harness.prefill.calls.clear()
        harness.decode.calls.clear()
        r = loop.run_until_complete(harness.client.post("/v1/completions", json={
            "model": MODEL, "prompt": "the cat sat on the mat", "max_tokens": 4}))
        assert r.status_code == 200, r.text
        assert len(harness.prefill.pins) == 1 and len(harness.decode.pins) == 1
        assert r.json()["choices"][0]["text"] == f"by {harness.decode.calls[0]['replica']}"
    finally:
        loop.run_until_complete(harness.close())
        loop.close()


def test_httpx_arguments_keep_the_body() -> None:
    kwargs = {"method": "POST", "url": "http://x/v1/completions", "headers": {}, "json": {"a": 1}}
    assert to_httpx(kwargs)["content"] == b'{"a": 1}'
    assert to_httpx({**kwargs, "json": None})["content"] == b"null"
    del kwargs["json"]
    assert to_httpx({**kwargs, "data": b"\x00"})["content"] == b"\x00"
    assert isinstance(httpx.Request(**to_httpx(kwargs)), httpx.Request)
