"""The ingress (router/app.py) behind a real FastAPI app, with fake prefill and decode handles.

The fakes mimic Ray Serve's ``DeploymentHandle``: ``handle.prefill.remote(...)`` returns an
awaitable with ``.cancel()``; ``handle.options(stream=True).generate_stream.remote(...)`` an
async iterator with ``.cancel()``. Like ``router.serve_router`` they report their replicas to
the coordinator and honour the ``pin`` keyword, and they record every call, so the tests assert
the route each request took (which replica every call was pinned to), not only the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import router.coordinator
from cluster.config import API_KEY_ENV, RouterConfig
from router.app import MAX_TRANSFER_PROMPTS, ROUTES, PDRouter
from router.openai_api import install_error_handlers, install_openapi

MODEL = "tiny"
VOCAB_SIZE = 64
WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "user", "assistant", ":"]
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }} : {{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant :{% endif %}")
KEY = "sk-test-key"


def build_model_dir(path: Path) -> Path:
    """A tokenizer (word level, with a chat template) and a config.json with vocab_size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", chat_template=TEMPLATE).save_pretrained(path)
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": VOCAB_SIZE, "hidden_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128}))
    return path


# -- fake Ray Serve handles -------------------------------------------------------------------

def chunk(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "text": text}]}) + "\n\n"


def error(status: int) -> dict[str, Any]:
    return {"error": {"message": f"engine says {status}", "type": "X", "param": None,
                      "code": status}}


class FakeResponse:
    """An awaitable with ``cancel()``, like ``DeploymentResponse``."""

    def __init__(self, coro: Any) -> None:
        self._task = asyncio.ensure_future(coro)
        self.is_cancelled = False

    def __await__(self):
        return self._task.__await__()

    def cancel(self) -> None:
        self.is_cancelled = True
        self._task.cancel()


class FakeStream:
    """An async iterator with ``cancel()``, like ``DeploymentResponseGenerator``."""

    def __init__(self, agen: AsyncIterator[Any]) -> None:
        self._agen = agen
        self.is_cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        return await self._agen.__anext__()

    def cancel(self) -> None:
        self.is_cancelled = True


class FakePool:
    """A deployment handle over fake replicas; ``behaviour[replica_id]`` says what each does:
    ok, raise, hang, busy (503), error500, client_error (400), hang_after_first (answers its
    first call, hangs on the others); for streams also midfail (one chunk, then the replica
    dies) and empty."""

    def __init__(self, role: str, loads: dict[str, int], stream: bool = False,
                 shared: FakePool | None = None) -> None:
        self.role = role
        self.loads = loads
        self.stream = stream
        self.behaviour: dict[str, str] = shared.behaviour if shared else dict.fromkeys(loads, "ok")
        self.calls: list[dict[str, Any]] = shared.calls if shared else []
        self._shared = shared

    def options(self, stream: bool = False) -> FakePool:
        return FakePool(self.role, self.loads, stream, shared=self)

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        return _Method(self, method)

    def observe(self) -> None:
        coordinator = router.coordinator.get_coordinator()
        coordinator.observe(self.role, {rid: {"num_running": n} for rid, n in self.loads.items()})

    @property
    def pins(self) -> list[str | None]:
        return [c["pin"] for c in self.calls]


class _Method:
    def __init__(self, pool: FakePool, name: str) -> None:
        self._pool, self._name = pool, name

    def remote(self, *args: Any, pin: str | None = None) -> Any:
        pool = self._pool
        pool.observe()
        replica = pin if pin in pool.loads else min(pool.loads, key=pool.loads.get)
        if self._name == "record_routing_stats":  # the ingress's refresher: not recorded
            return FakeResponse(_value({}))
        call = {"method": self._name, "pin": pin, "replica": replica, "args": args}
        pool.calls.append(call)
        mode = pool.behaviour[replica]
        if mode == "hang_after_first":
            mode = "ok" if sum(c["replica"] == replica for c in pool.calls) == 1 else "hang"
        if pool.stream:
            stream = FakeStream(_stream(mode, replica))
            call["stream"] = stream
            return stream
        response = FakeResponse(_answer(mode, replica, self._name, args))
        call["response"] = response
        return response


async def _value(value: Any) -> Any:
    return value


def replica_died() -> Exception:
    """What a handle call raises when the replica's actor is gone."""
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def request_bug() -> Exception:
    """What a handle call raises when a live replica raised for this request alone."""
    from ray.exceptions import RayTaskError

    return RayTaskError("generate", "traceback", TypeError("bad content")).as_instanceof_cause()


async def _answer(mode: str, replica: str, method: str, args: tuple) -> Any:
    await asyncio.sleep(0)
    if mode == "raise":
        raise replica_died()
    if mode == "bug":
        raise request_bug()
    if mode == "hang":
        await asyncio.sleep(3600)
    if mode in ("busy", "error500", "client_error"):
        return error({"busy": 503, "error500": 500, "client_error": 400}[mode])
    if method == "prefill":
        return {"kv_transfer_params": {"transfer_id": args[2], "from": replica},
                "timing": {"queue_s": 0.125, "compute_s": 0.25}}  # the engine's own times
    return {"choices": [{"index": 0, "text": f"by {replica}"}], "kv": args[2]}


async def _stream(mode: str, replica: str) -> AsyncIterator[Any]:
    await asyncio.sleep(0)
    if mode == "raise":
        raise replica_died()
    if mode == "hang":
        await asyncio.sleep(3600)
    if mode in ("busy", "error500", "client_error"):
        yield error({"busy": 503, "error500": 500, "client_error": 400}[mode])
        return
    if mode == "empty":
        return
    yield chunk(f"by {replica} ")
    if mode == "midfail":
        raise replica_died()
    yield chunk("more")
    yield "data: [DONE]\n\n"


# -- the app ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model"))


def make_app(model_dir: Path, monkeypatch, **ingress: Any):
    """A FastAPI app over a fresh ``PDRouter`` with prefill p0, p1 and decode d0, d1 (the
    *0 replicas less loaded, so chosen first); every cold request goes through prefill."""
    from fastapi import FastAPI

    monkeypatch.setattr(router.coordinator, "_coordinator", None)
    prefill = FakePool("prefill", {"p0": 0, "p1": 5})
    decode = FakePool("decode", {"d0": 0, "d1": 5})
    coordinator = {"block_size": 4, "prefill_policy": "least_loaded",
                   "decode_policy": "least_loaded", "failed_replica_s": 30.0,
                   "busy_replica_s": 0.5,
                   "pairing": {"local_prefill_max_uncached_tokens": 0,
                               "local_prefill_cost_factor": 0}}
    coordinator.update(ingress.pop("coordinator", {}))
    ingress = {"decode_first_token_timeout_s": 0.3, "decode_timeout_s": 0.3, **ingress}
    pd = PDRouter(prefill, decode, MODEL, str(model_dir), 1024, 0.3, 1, coordinator, ingress)
    prefill.observe()
    decode.observe()
    app = FastAPI(title="pdserve")
    for method, path, name in ROUTES:
        app.add_api_route(path, getattr(pd, name), methods=[method])
    install_openapi(app)
    install_error_handlers(app)
    return app, pd, prefill, decode


class Harness:
    def __init__(self, app, pd: PDRouter, prefill: FakePool, decode: FakePool) -> None:
        self.app, self.pd, self.prefill, self.decode = app, pd, prefill, decode
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                        base_url="http://router")

    async def routing(self, **kw: Any) -> dict[str, Any]:
        return (await self.client.get("/routing", **kw)).json()

    async def close(self) -> None:
        await self.client.aclose()
        if self.pd._refresher is not None:
            self.pd._refresher.cancel()
        self.pd.coordinator.events.close()


@pytest.fixture
async def make(model_dir, monkeypatch):
    harnesses: list[Harness] = []

    def factory(**ingress: Any) -> Harness:
        harnesses.append(Harness(*make_app(model_dir, monkeypatch, **ingress)))
        return harnesses[-1]

    yield factory
    for h in harnesses:
        await h.close()


@pytest.fixture
async def h(make) -> Harness:
    return make()


def completion(prompt: Any = "hello world the cat", **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, **kw}


def sse_events(text: str) -> list[Any]:
    return [line[len("data: "):] if line == "data: [DONE]" else json.loads(line[len("data: "):])
            for line in text.split("\n\n") if line.startswith("data: ")]


# -- the route --------------------------------------------------------------------------------

async def test_transfer_path_pins_both_calls(h) -> None:
    r = await h.client.post("/v1/completions", json=completion())
    assert r.status_code == 200, r.text
    assert (h.prefill.pins, h.decode.pins) == (["p0"], ["d0"])
    (_, body, transfer_id), kv = h.prefill.calls[0]["args"], h.decode.calls[0]["args"][2]
    assert body == {"model": MODEL, "prompt": [3, 4, 5, 6]}  # tokenized once, at the router
    assert kv == {"transfer_id": transfer_id, "from": "p0"}
    assert r.json()["choices"][0]["text"] == "by d0"
    assert (await h.routing())["local_prefills"] == {}


async def test_prefill_failure_is_retried_on_the_other_replica(h) -> None:
    h.prefill.behaviour["p0"] = "raise"
    r = await h.client.post("/v1/completions", json=completion())
    assert r.status_code == 200, r.text
    assert h.prefill.pins == ["p0", "p1"] and h.prefill.calls[0]["response"].is_cancelled
    assert h.decode.calls[0]["args"][2]["from"] == "p1"
    state = await h.routing()
    assert set(state["failed_replicas"]["prefill"]) == {"p0"}
    assert 29 < state["failed_replicas"]["prefill"]["p0"] <= 30
    assert state["replica_failures"] == {"prefill": 1} and state["local_prefills"] == {}
    assert set(state["replicas"]["prefill"]) == {"p0", "p1"}  # still listed by Ray Serve
    # The failed replica is left out: the next request goes straight to p1.
    r = await h.client.post("/v1/completions", json=completion("the mat"))
    assert r.status_code == 200 and h.prefill.pins == ["p0", "p1", "p1"]


async def test_prefill_timeout_is_retried(h) -> None:
    h.prefill.behaviour["p0"] = "hang"
    r = await h.client.post("/v1/completions", json=completion())
    assert r.status_code == 200, r.text
    assert h.prefill.pins == ["p0", "p1"] and h.prefill.calls[0]["response"].is_cancelled


@pytest.mark.parametrize(("modes", "reason", "failures"), [
    (("raise", "error500"), "prefill_failed", {"prefill": 2}),
    (("busy", "busy"), "busy", {}),
    (("busy", "raise"), "prefill_failed", {"prefill": 1}),
])
async def test_every_prefill_failing_prefills_on_decode(h, modes, reason, failures) -> None:
    h.prefill.behaviour.update(zip(("p0", "p1"), modes, strict=True))
    r = await h.client.post("/v1/completions", json=completion())
    assert r.status_code == 200, r.text
    assert h.prefill.pins == ["p0", "p1"]
    assert h.decode.pins == ["d0"] and h.decode.calls[0]["args"][2] is None  # no transfer
    state = await h.routing()
    assert state["local_prefills"] == {reason: 1}
    assert state["replica_failures"] == failures


@pytest.mark.parametrize(("mode", "status"), [("raise", 200), ("client_error", 400)])
async def test_a_prefill_given_up_leaves_no_routing_state(make, mode, status) -> None:
    """The prefill policy counted the prompt as on its way to the replica it chose; when no
    prefill replica computes it (every one failed, or the engine refused it), that must not
    linger: a cache-aware policy would send the prompt's followers to a replica that never
    computed it."""
    h = make(coordinator={"prefill_policy": "cache_cost"})
    h.prefill.behaviour.update({"p0": mode, "p1": mode})
    r = await h.client.post("/v1/completions", json=completion())
    assert r.status_code == status, r.text
    assert h.prefill.pins
    assert len(h.pd.coordinator.pairs.prefill_policy._in_flight) == 0


async def test_busy_prefill_replicas_are_left_out_only_briefly(h) -> None:
    h.prefill.behaviour.update(p0="busy", p1="busy")
    await h.client.post("/v1/completions", json=completion())
    left = (await h.routing())["failed_replicas"]["prefill"]
    assert set(left) == {"p0", "p1"} and max(left.values()) <= 0.5
    h.prefill.behaviour.update(p0="ok", p1="ok")
    await h.client.post("/v1/completions", json=completion())  # both still out: local
    await asyncio.sleep(0.55)
    await h.client.post("/v1/completions", json=completion("the mat"))  # not on d0 yet
    assert h.prefill.pins == ["p0", "p1", "p0"]
    assert (await h.routing())["local_prefills"] == {"busy": 1, "no_prefill_replica": 1}


async def test_no_prefill_replica_is_counted(h) -> None:
    h.prefill.loads.clear()
    h.prefill.observe()
    r = await h.client.post("/v1/completions", json=completion())
    assert r.status_code == 200 and h.prefill.pins == [] and h.decode.pins == ["d0"]
    assert (await h.routing())["local_prefills"] == {"no_prefill_replica": 1}


async def test_prefill_client_error_is_returned_as_is(h) -> None:
    h.prefill.behaviour["p0"] = "client_error"
    r = await h.client.post("/v1/completions", json=completion())
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
    assert (h.prefill.pins, h.decode.pins) == (["p0"], [])


# -- decode failures --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["raise", "hang", "error500", "busy"])
async def test_decode_failure_is_retried_with_the_same_transfer(h, mode) -> None:
    h.decode.behaviour["d0"] = mode
    r = await h.client.post("/v1/completions", json=completion())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "by d1"
    assert h.prefill.pins == ["p0"] and h.decode.pins == ["d0", "d1"]
    kv = [c["args"][2] for c in h.decode.calls]
    assert kv[0] == kv[1] and kv[0]["from"] == "p0"
    state = await h.routing()
    assert state["decode_retries"] == 1
    assert state["replica_failures"] == ({} if mode == "busy" else {"decode": 1})
    assert "d0" in state["failed_replicas"]["decode"]


@pytest.mark.parametrize("mode", ["raise", "hang", "error500", "empty"])
async def test_stream_failing_before_its_first_chunk_is_retried(h, mode) -> None:
    h.decode.behaviour["d0"] = mode
    r = await h.client.post("/v1/completions", json=completion(stream=True))
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["by d1 ", "more"]
    assert events[-1] == "[DONE]"
    assert h.decode.pins == ["d0", "d1"]
    assert h.decode.calls[0]["args"][2] == h.decode.calls[1]["args"][2]
    assert h.decode.calls[0]["stream"].is_cancelled or mode == "empty"
    assert (await h.routing())["decode_retries"] == 1


async def test_stream_failing_after_its_first_chunk_ends_with_an_error_event(h) -> None:
    h.decode.behaviour["d0"] = "midfail"
    r = await h.client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[0]["choices"][0]["text"] == "by d0 "
    assert events[1]["error"]["code"] == 503 and "decode replica failed" in \
        events[1]["error"]["message"]
    assert events[2] == "[DONE]" and len(events) == 3
    assert h.decode.pins == ["d0"]  # no retry after the first token
    assert h.decode.calls[0]["stream"].is_cancelled
    assert "d0" in (await h.routing())["failed_replicas"]["decode"]


async def test_responses_request_is_rendered_prefilled_and_transferred(h) -> None:
    """A Responses request is rendered at the router as the engines would (instructions, then
    the input as chat messages): its prefill runs those ids as a completion and its decode
    engine, which answers in the Responses API, takes them with the transfer."""
    r = await h.client.post("/v1/responses", json={
        "model": MODEL, "instructions": "hello", "input": "the cat", "max_output_tokens": 4})
    assert r.status_code == 200, r.text
    (prefill,), (decode,) = h.prefill.calls, h.decode.calls
    kind, body, transfer_id = prefill["args"]
    # <s> system (not in the vocabulary) : hello <s> user : the cat <s> assistant :
    assert (kind, body) == ("completion", {"model": MODEL,
                                           "prompt": [1, 0, 12, 3, 1, 10, 12, 5, 6, 1, 11, 12]})
    assert decode["args"][0] == "responses" and decode["args"][1]["input"] == "the cat"
    assert decode["args"][2] == {"transfer_id": transfer_id, "from": "p0",
                                 "prompt_token_ids": body["prompt"]}
    assert (h.prefill.pins, h.decode.pins) == (["p0"], ["d0"])
    assert (await h.routing())["local_prefills"] == {}


@pytest.mark.parametrize("extra", [
    {"previous_response_id": "resp_1"},
    {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "the cat"},
        {"type": "input_image", "image_url": "http://images.invalid/cat.png"}]}]},
])
async def test_responses_request_the_router_cannot_render_is_prefilled_on_decode(
        h, extra) -> None:
    """Only the engine that stored a response knows its history, and media are the engines'
    to fetch: such a request goes to decode whole, counted."""
    r = await h.client.post("/v1/responses", json={"model": MODEL, "input": "the cat", **extra})
    assert r.status_code == 200, r.text
    assert h.prefill.calls == [] and h.decode.calls[0]["args"][2] is None
    assert (await h.routing())["local_prefills"] == {"unrendered": 1}


async def test_responses_stream_failing_mid_way_ends_with_an_error_event(h) -> None:
    """The Responses API's own error event, and no ``[DONE]``, which its streams never send."""
    h.decode.behaviour["d0"] = "midfail"
    r = await h.client.post("/v1/responses", json={"model": MODEL, "input": "the cat",
                                                   "stream": True})
    assert r.status_code == 200
    *_, last = [e for e in r.text.split("\n\n") if e]
    event, data = last.split("\n")
    assert event == "event: error" and "[DONE]" not in r.text
    error = json.loads(data[len("data: "):])
    assert error["type"] == "error" and error["code"] == "503"
    assert "decode replica failed" in error["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "the cat", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "the cat", "temperature": "hot"}, "temperature"),
    ({"input": "the cat", "model": "other"}, "model"),
])
async def test_bad_responses_request_gets_an_openai_error(h, body, param) -> None:
    r = await h.client.post("/v1/responses", json=body)
    assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param
    assert h.prefill.calls == h.decode.calls == []


async def test_one_model_is_retrieved_by_its_id(make) -> None:
    h = make(api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    r = await h.client.get(f"/v1/models/{MODEL}", headers=auth)
    assert r.status_code == 200 and r.json()["id"] == MODEL and r.json()["object"] == "model"
    r = await h.client.get("/v1/models/other/model", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert (await h.client.get(f"/v1/models/{MODEL}")).status_code == 401


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/v1/embeddings", 404), ("GET", "/v1/chat/completions", 405)])
async def test_what_no_route_serves_gets_an_openai_error(h, method, path, status) -> None:
    r = await h.client.request(method, path)
    assert r.status_code == status
    assert r.json()["error"]["code"] == status and path in r.json()["error"]["message"]


async def test_decode_client_error_in_a_stream_is_returned_as_is(h) -> None:
    h.decode.behaviour["d0"] = "client_error"
    r = await h.client.post("/v1/completions", json=completion(stream=True))
    assert r.status_code == 400 and h.decode.pins == ["d0"]


@pytest.mark.parametrize("stream", [False, True])
async def test_no_decode_replica_left_is_a_503(h, stream) -> None:
    h.decode.behaviour.update(d0="raise", d1="raise")
    r = await h.client.post("/v1/completions", json=completion(stream=stream))
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "ServiceUnavailableError"
    assert h.decode.pins == ["d0", "d1"]


@pytest.mark.parametrize("role", ["prefill", "decode"])
async def test_a_request_that_breaks_a_live_replica_leaves_it_in(h, role) -> None:
    """An exception raised inside a live replica for one request is that request's fault: the
    replica is not left out (else a few bad requests could empty a pool)."""
    pool = h.prefill if role == "prefill" else h.decode
    pool.behaviour[f"{role[0]}0"] = "bug"
    await h.client.post("/v1/completions", json=completion())
    routing = await h.routing()
    assert routing["failed_replicas"][role] == {}, routing
    assert routing["replica_failures"].get(role, 0) == 0, routing


async def test_failed_decode_replica_is_left_out_then_taken_back(make) -> None:
    h = make(coordinator={"failed_replica_s": 0.4})
    h.decode.behaviour["d0"] = "raise"
    await h.client.post("/v1/completions", json=completion())
    h.decode.behaviour["d0"] = "ok"
    await h.client.post("/v1/completions", json=completion())
    assert h.decode.pins == ["d0", "d1", "d1"]  # left out
    await asyncio.sleep(0.45)
    await h.client.post("/v1/completions", json=completion())
    assert h.decode.pins[-1] == "d0"  # taken back after its failed period
    # A replacement (new id) is chosen at once; the replica it replaced is forgotten.
    h.decode.behaviour["d0"] = "raise"
    await h.client.post("/v1/completions", json=completion())
    assert h.decode.pins[-2:] == ["d0", "d1"]
    del h.decode.loads["d0"]
    h.decode.loads["d2"] = 0
    h.decode.behaviour["d2"] = "ok"
    h.decode.observe()
    assert (await h.routing())["failed_replicas"]["decode"] == {}
    await h.client.post("/v1/completions", json=completion())
    assert h.decode.pins[-1] == "d2"


# -- several engine requests ------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{"best_of": 2}, {"use_beam_search": True, "n": 2}])
async def test_engine_made_requests_prefill_on_decode(h, extra) -> None:
    body = {**completion(), **extra}
    r = await h.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert h.prefill.pins == []  # the engine makes these engine requests itself
    (call,) = h.decode.calls
    assert call["pin"] == "d0" and call["args"][2] is None
    assert call["args"][1]["prompt"] == body["prompt"]
    assert (await h.routing())["local_prefills"] == {"batch": 1}


async def test_prompt_logprobs_prefill_on_decode(h) -> None:
    """vLLM computes the whole prompt of a request that asks for the prompt's logprobs: a
    transfer would be wasted."""
    r = await h.client.post("/v1/completions", json=completion(echo=True, logprobs=1,
                                                               max_tokens=0))
    assert r.status_code == 200, r.text
    assert h.prefill.pins == [] and h.decode.calls[0]["args"][2] is None
    assert (await h.routing())["local_prefills"] == {"prompt_logprobs": 1}


@pytest.mark.parametrize("kind", ["completion", "chat"])
async def test_n2_is_prefilled_once_and_transferred(h, kind) -> None:
    if kind == "completion":
        r = await h.client.post("/v1/completions", json=completion(n=2))
    else:
        r = await h.client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "n": 2})
    assert r.status_code == 200, r.text
    (prefill,), (decode,) = h.prefill.calls, h.decode.calls
    assert "n" not in prefill["args"][1]  # one prompt, one sequence, one transfer
    assert decode["args"][1]["n"] == 2
    kv = {"transfer_id": prefill["args"][2], "from": "p0"}
    if kind == "chat":  # the decode engine takes the prompt the router rendered
        kv["prompt_token_ids"] = prefill["args"][1]["prompt"]
    assert decode["args"][2] == kv
    assert (await h.routing())["local_prefills"] == {}


@pytest.mark.parametrize("prompts, tokens", [
    (["hello world", "the cat", "hello world"], [[3, 4], [5, 6], [3, 4]]),
    ([[3, 4], [5, 6, 7]], [[3, 4], [5, 6, 7]]),
])
async def test_several_prompts_are_prefilled_apart_and_decoded_together(
        h, prompts, tokens) -> None:
    r = await h.client.post("/v1/completions", json=completion(prompts, stream=True))
    assert r.status_code == 200, r.text
    distinct = [t for i, t in enumerate(tokens) if t not in tokens[:i]]
    assert sorted(c["args"][1]["prompt"] for c in h.prefill.calls) == sorted(distinct)
    (decode,) = h.decode.calls
    assert decode["args"][1]["prompt"] == tokens  # tokenized once, at the router
    kv = decode["args"][2]
    assert kv["do_remote_prefill"] is True
    assert sorted(e["transfer_id"] for e in kv["batch"]) == \
        sorted(c["args"][2] for c in h.prefill.calls)
    assert (await h.routing())["local_prefills"] == {}
    coordinator = h.pd.coordinator
    assert coordinator.routed.load("p0", coordinator.replicas("prefill")["p0"]) == \
        coordinator.replicas("prefill")["p0"]  # nothing left counted as in flight


async def test_a_prompt_whose_prefill_fails_everywhere_is_computed_on_decode(h) -> None:
    h.prefill.behaviour.update(p0="raise", p1="raise")
    r = await h.client.post("/v1/completions", json=completion(["hello world", "the cat"]))
    assert r.status_code == 200, r.text
    assert h.decode.calls[0]["args"][2] is None  # no transfer left: all computed there
    assert (await h.routing())["local_prefills"] == {"prefill_failed": 2}


@pytest.fixture
def kv_messages(monkeypatch) -> dict[str, list[dict[str, Any]]]:
    """The CLAIM and DONE messages the router sends, by kind (not sent: the fakes' transfer
    parameters name no worker)."""
    import router.app

    sent: dict[str, list[dict[str, Any]]] = {"claim": [], "release": []}
    monkeypatch.setattr(router.app, "claim_transfer", sent["claim"].append)
    monkeypatch.setattr(router.app, "release_transfer", sent["release"].append)
    return sent


async def test_each_prompts_transfer_is_claimed_as_its_prefill_ends(h, kv_messages) -> None:
    r = await h.client.post("/v1/completions", json=completion(["hello world", "the cat"]))
    assert r.status_code == 200, r.text
    assert kv_messages["claim"] == h.decode.calls[0]["args"][2]["batch"]
    assert kv_messages["release"] == []  # the decode side releases what it loaded


async def test_a_client_gone_during_the_prefills_frees_what_was_prefilled(h, kv_messages) -> None:
    h.pd.calls.limits = dataclasses.replace(h.pd.calls.limits, prefill_timeout_s=60.0)
    h.prefill.behaviour["p0"] = "hang_after_first"
    body = completion(["hello world", "the cat"])
    task = asyncio.ensure_future(h.pd.route_body("completion", body, time.monotonic()))
    while len(kv_messages["claim"]) < 1 or len(h.prefill.calls) < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # the cancelled prefills' callbacks
    assert kv_messages["release"] == kv_messages["claim"] and len(kv_messages["claim"]) == 1
    assert h.prefill.calls[1]["response"].is_cancelled
    assert h.decode.calls == []
    assert len(h.pd.coordinator.routed) == 0  # nothing left counted on any replica


async def test_a_client_gone_during_a_prefill_leaves_nothing_counted(h) -> None:
    h.pd.calls.limits = dataclasses.replace(h.pd.calls.limits, prefill_timeout_s=60.0)
    h.prefill.behaviour["p0"] = "hang"
    task = asyncio.ensure_future(h.pd.route_body("completion", completion(),
                                                 time.monotonic()))
    while not h.prefill.calls:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(h.pd.coordinator.routed) == 0


async def test_before_any_replica_is_known_ray_serve_picks_the_prefill_replicas(
        h, monkeypatch) -> None:
    for method in ("choose_prefill", "choose_decode"):  # no replica known yet
        monkeypatch.setattr(h.pd.coordinator, method, lambda ctx, exclude=(): None)
    r = await h.client.post("/v1/completions", json=completion(["hello world", "the cat"]))
    assert r.status_code == 200, r.text
    assert h.prefill.calls[0]["pin"] is None and len(h.prefill.calls) == 2
    assert len(h.decode.calls[0]["args"][2]["batch"]) == 2
    assert (await h.routing())["local_prefills"] == {}


async def test_more_distinct_prompts_than_transfers_prefill_on_decode(h) -> None:
    prompts = [[3, 4, i % 50 + 5, i // 50 + 5] for i in range(MAX_TRANSFER_PROMPTS + 1)]
    r = await h.client.post("/v1/completions", json=completion(prompts))
    assert r.status_code == 200, r.text
    assert h.prefill.calls == [] and h.decode.calls[0]["args"][2] is None
    assert (await h.routing())["local_prefills"] == {"batch": 1}


@pytest.mark.parametrize("prompt", ["hello world", ["hello world", "the cat"]])
async def test_an_echo_gets_its_prompts_back_as_sent(h, prompt) -> None:
    r = await h.client.post("/v1/completions", json=completion(prompt, echo=True))
    assert r.status_code == 200, r.text
    assert h.decode.calls[0]["args"][1]["prompt"] == prompt
    assert h.decode.calls[0]["args"][2] is not None  # still transferred
    assert all(c["args"][1]["prompt"] in ([3, 4], [5, 6]) for c in h.prefill.calls)


async def test_refused_prompts_are_answered_by_the_decode_engine(h) -> None:
    """Prompts a prefill engine refuses (400) have no transfer, and the decode engine answers
    the request: its own 400 for such a prompt would release the other prompts' blocks."""
    h.prefill.behaviour["p0"] = "client_error"
    r = await h.client.post("/v1/completions", json=completion(["hello world", "the cat"]))
    assert r.status_code == 200, r.text
    assert [c["replica"] for c in h.prefill.calls] == ["p0", "p0"]
    assert h.decode.calls[0]["args"][2] is None
    assert r.json()["choices"][0]["text"] == "by d0"


async def test_a_list_of_one_prompt_is_one_prompt(h) -> None:
    r = await h.client.post("/v1/completions", json=completion(["hello world"]))
    assert r.status_code == 200 and h.prefill.pins == ["p0"]
    assert h.prefill.calls[0]["args"][1]["prompt"] == [3, 4]


# -- security and input -----------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
    ("GET", "/routing")])
@pytest.mark.parametrize("header", [None, "Bearer wrong", "sk-test-key", "Basic sk-test-key"])
async def test_api_key_is_required(make, method, path, header) -> None:
    h = make(api_key=KEY)
    headers = {"Authorization": header} if header else {}
    r = await h.client.request(method, path, json=completion(), headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "AuthenticationError"
    assert r.headers["www-authenticate"] == "Bearer"
    assert KEY not in r.text
    assert h.prefill.pins == [] and h.decode.pins == []


async def test_right_api_key_passes_and_health_stays_open(make) -> None:
    h = make(api_key=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    r = await h.client.post("/v1/completions", json=completion(), headers=auth)
    assert r.status_code == 200 and h.decode.pins == ["d0"]
    assert (await h.client.get("/v1/models", headers=auth)).status_code == 200
    assert (await h.client.get("/routing", headers=auth)).status_code == 200
    assert (await h.client.get("/health")).status_code == 200
    assert KEY not in repr(h.pd.settings)


def test_api_key_comes_from_config_or_environment(monkeypatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert RouterConfig().ingress_settings()["api_key"] is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert RouterConfig().ingress_settings()["api_key"] == "from-env"
    config = RouterConfig(api_key="from-config")
    assert config.ingress_settings()["api_key"] == "from-config"
    assert "from-config" not in repr(config) and "from-config" not in str(config.model_dump())


async def test_body_over_the_limit_is_a_413(make) -> None:
    h = make(max_request_bytes=200)
    big = completion("hello " * 100)
    r = await h.client.post("/v1/completions", json=big)  # Content-Length says it
    assert r.status_code == 413 and r.json()["error"]["code"] == 413

    async def chunks():  # no Content-Length: counted while read
        data = json.dumps(big).encode()
        for i in range(0, len(data), 50):
            yield data[i:i + 50]

    r = await h.client.post("/v1/completions", content=chunks(),
                            headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = await h.client.post("/v1/completions", content=b"{}",
                            headers={"Content-Length": "lots"})
    assert r.status_code == 400
    assert (await h.client.post("/v1/completions", json=completion())).status_code == 200
    assert h.prefill.pins == ["p0"]


@pytest.mark.parametrize("template", [{"chat_template": "{{ 'pwned' }}"},
                                      {"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}])
async def test_request_chat_template_is_refused(make, template) -> None:
    h = make()
    body = {"messages": [{"role": "user", "content": "hello"}], **template}
    r = await h.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
    assert h.decode.pins == []
    allowed = make(allow_request_chat_template=True)
    r = await allowed.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and allowed.decode.pins == ["d0"]


@pytest.mark.parametrize("prompt", [[3, VOCAB_SIZE], [[3, 4], [5, 1000]]])
async def test_token_ids_outside_the_vocabulary_are_a_400(h, prompt) -> None:
    r = await h.client.post("/v1/completions", json=completion(prompt))
    assert r.status_code == 400
    bad = prompt[-1] if isinstance(prompt[-1], int) else prompt[-1][-1]
    assert f"token id {bad}" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"
    assert h.prefill.pins == [] and h.decode.pins == []


async def test_openapi_describes_the_request_bodies(h) -> None:
    schema = (await h.client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    assert "input" in components["ResponsesRequest"]["properties"]
    for path, model in (("/v1/completions", "CompletionRequest"),
                        ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/v1/responses", "ResponsesRequest")):
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
        assert {"max_tokens", "max_output_tokens"} & set(components[model]["properties"])
    assert "messages" in components["ChatCompletionRequest"]["required"]
    assert "requestBody" not in schema["paths"]["/v1/models"]["get"]
