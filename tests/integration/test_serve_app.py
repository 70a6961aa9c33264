"""The whole app on a real local Ray cluster: HTTP in, prefill replica, decode replica."""

from __future__ import annotations

import asyncio
import functools
import json

import httpx
import pytest

from tests.integration.support import (
    assert_all_loaded,
    completion_body,
    deployed,
    differing_outputs,
    make_prompts,
    one_pair_config,
    wait_until,
)

APP = "pdserve-test"


@pytest.fixture(scope="module")
def app(engine_config):
    """Deploy the app once for the module; yield (base_url, config)."""
    cfg = one_pair_config(engine_config, APP)
    with deployed(cfg) as d:
        yield d.url, cfg

async def replica_stats(role: str) -> dict:
    from ray import serve

    return await serve.get_deployment_handle(role, APP).stats.remote()


@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(base_url=app[0], timeout=120) as c:
        yield c


async def test_parity_one_at_a_time(app, client, engine_config, vocab_size, reference_outputs):
    prompts = make_prompts(engine_config, vocab_size, seed=11)
    decode_before = await replica_stats("decode")
    mismatches = await differing_outputs(client, engine_config, prompts, reference_outputs)
    assert not mismatches, f"outputs differ for prompt lengths {mismatches}"
    assert_all_loaded(decode_before, await replica_stats("decode"), len(prompts))


async def test_parity_under_concurrency(app, client, engine_config, vocab_size,
                                        reference_outputs, capsys):
    prompts = make_prompts(engine_config, vocab_size, seed=12)
    bodies = [completion_body(engine_config, p) for p in prompts]
    decode_before = await replica_stats("decode")
    responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    matches = [r.json()["choices"][0]["text"] == await reference_outputs(b)
               for r, b in zip(responses, bodies, strict=True)]
    rate = sum(matches) / len(matches)
    with capsys.disabled():
        print(f"\nexact-match rate under {len(bodies)} concurrent requests: "
              f"{sum(matches)}/{len(matches)} = {rate:.2f}")
    assert rate == 1.0
    assert_all_loaded(decode_before, await replica_stats("decode"), len(bodies))


BAD_BODIES = [
    ("invalid JSON", b"{not json", 400),
    ("not an object", b"[1, 2]", 400),
    ("missing prompt", {"max_tokens": 4}, 400),
    ("wrong-typed prompt", {"prompt": 5.5}, 400),
    ("wrong-typed max_tokens", {"prompt": "hi", "max_tokens": "many"}, 400),
    ("empty prompt", {"prompt": ""}, 400),
    ("max_tokens zero", {"prompt": "hi", "max_tokens": 0}, 400),
    ("max_tokens negative", {"prompt": "hi", "max_tokens": -3}, 400),
    ("prompt too long", {"prompt": [5] * 1100, "max_tokens": 4}, 400),
    ("max_tokens beyond the context", {"prompt": "hi", "max_tokens": 5000}, 400),
    ("unknown model", {"model": "no-such-model", "prompt": "hi"}, 404),
    ("token id outside the vocabulary", {"prompt": [5, 10**6], "max_tokens": 4}, 400),
    ("negative token id", {"prompt": [5, -1], "max_tokens": 4}, 400),
]


@pytest.mark.parametrize(("case", "body", "status"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_input_gets_openai_error(app, client, engine_config, case, body, status):
    if isinstance(body, dict):
        body = json.dumps({"model": engine_config.name, **body}).encode()
    r = await client.post("/v1/completions", content=body,
                          headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    ok = await client.post("/v1/completions", json=completion_body(engine_config, "still up?"))
    assert ok.status_code == 200


async def test_bad_chat_input(app, client, engine_config):
    for body, status in [({"messages": "hello"}, 400), ({"messages": []}, 400),
                         ({"messages": [{"role": "user", "content": "x"}],
                           "max_completion_tokens": 0}, 400),
                         ({"messages": [{"role": "user", "content": "x"}],
                           "chat_template": "{{ 'injected' }}"}, 400)]:
        r = await client.post("/v1/chat/completions", json={"model": engine_config.name, **body})
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == status


async def test_models_and_health(app, client, engine_config):
    r = await client.get("/v1/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == engine_config.name
    assert (await client.get("/health")).status_code == 200
    r = await client.post("/v1/embeddings", json={"input": "x"})  # a route nobody serves
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


async def test_openai_client(app, engine_config, reference_outputs):
    import openai

    oai = openai.AsyncOpenAI(base_url=f"{app[0]}/v1", api_key="unused")
    body = completion_body(engine_config, "The tokenizer was trained on Python's help texts.")
    expected = await reference_outputs(body)
    extra = {"ignore_eos": True}
    done = await oai.completions.create(model=body["model"], prompt=body["prompt"],
                                        max_tokens=body["max_tokens"], temperature=0,
                                        extra_body=extra)
    assert done.choices[0].text == expected
    stream = await oai.completions.create(model=body["model"], prompt=body["prompt"],
                                          max_tokens=body["max_tokens"], temperature=0,
                                          stream=True, extra_body=extra)
    assert "".join([c.choices[0].text async for c in stream]) == expected
    messages = [{"role": "user", "content": "hello there"}]
    chat = await oai.chat.completions.create(model=body["model"], messages=messages,
                                             max_tokens=6, temperature=0, extra_body=extra)
    assert chat.choices[0].message.content
    chunks = await oai.chat.completions.create(model=body["model"], messages=messages,
                                               max_tokens=6, temperature=0, stream=True,
                                               extra_body=extra)
    streamed = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    assert streamed == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        await oai.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert (await oai.models.retrieve(body["model"])).id == body["model"]
    with pytest.raises(openai.NotFoundError):
        await oai.models.retrieve("no-such-model")


async def idle() -> bool:
    """Neither replica runs a request or holds a KV block."""
    stats = [await replica_stats(role) for role in ("prefill", "decode")]
    return all(s["kv_usage"] == 0.0 and s["num_running"] == 0 for s in stats)


async def test_decode_rejection_releases_prefill_blocks(app, client, engine_config, vocab_size):
    """Prefill succeeds, decode refuses (max_tokens beyond the context): the prefill replica
    frees the held blocks at once, not when the lease (20 s here) runs out."""
    assert await wait_until(idle, timeout_s=30)
    prompt = make_prompts(engine_config, vocab_size, seed=14)[12]
    r = await client.post("/v1/completions",
                          json=completion_body(engine_config, prompt, max_tokens=5000))
    assert r.status_code == 400, r.text
    assert await wait_until(idle, timeout_s=5)


@pytest.mark.parametrize("shape", ["one prompt", "two prompts", "responses"])
async def test_client_disconnect_frees_blocks(app, client, engine_config, vocab_size, shape):
    """A stream the client leaves half-way, for each shape of request: one prompt, a list of
    prompts (one transfer each), a Responses stream."""
    assert await wait_until(idle, timeout_s=30)
    prompts = make_prompts(engine_config, vocab_size, seed=13)
    prompt = prompts[15]
    max_tokens = engine_config.max_model_len - len(prompt)
    num_seqs = 1
    path, body = "/v1/completions", completion_body(engine_config, prompt,
                                                    max_tokens=max_tokens, stream=True)
    if shape == "two prompts":
        body["prompt"], num_seqs = [prompt, prompts[14]], 2
    elif shape == "responses":
        text = "Write a long story about a cat who learns to program. " * 8
        path, body = "/v1/responses", {"model": engine_config.name, "input": text,
                                       "max_output_tokens": max_tokens, "stream": True,
                                       "temperature": 0, "ignore_eos": True}
    generated_before = (await replica_stats("decode"))["generation_tokens_total"]
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        num_chunks = 0
        async for line in r.aiter_lines():
            num_chunks += line.startswith("data:")
            if num_chunks >= 6:
                break
    # The client has gone mid-stream: both replicas must drop the request and its blocks,
    # well before the lease (20 s) could free them.
    assert await wait_until(idle, timeout_s=8), [await replica_stats(r) for r in
                                                  ("prefill", "decode")]
    # ... and it was stopped, not run to its end.
    generated = (await replica_stats("decode"))["generation_tokens_total"] - generated_before
    assert 2 <= generated < num_seqs * max_tokens // 2, (generated, max_tokens)


@pytest.mark.parametrize("extra", [
    {},
    # The demo's template prints the tools, as real models' templates do; "none": no tool
    # parser is configured.
    {"tools": [{"type": "function", "function": {
        "name": "add", "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}],
     "tool_choice": "none"},
], ids=["plain", "tools"])
async def test_chat_prompt_is_transferred_not_recomputed(app, client, engine_config, extra):
    """The router renders the chat template once and the prefill runs on those ids; the decode
    engine's own rendering must give the same tokens (the connector checks their digest), so
    its prompt arrives by transfer."""
    before = await replica_stats("decode")
    messages = [{"role": "system", "content": "You answer in Python."},
                {"role": "user", "content": "Write a function that adds two numbers. " * 8}]
    r = await client.post("/v1/chat/completions", json={
        "model": engine_config.name, "messages": messages, "max_tokens": 4, "temperature": 0,
        **extra})
    assert r.status_code == 200, r.text
    num_prompt = r.json()["usage"]["prompt_tokens"]
    after = await wait_until(lambda: _loaded(before), timeout_s=10)
    assert after, await replica_stats("decode")
    assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] <= 1
    assert after["prompt_tokens_external"] - before["prompt_tokens_external"] >= num_prompt - 1


async def test_responses_api_is_disaggregated(app, engine_config, reference_engine):
    """The Responses API through the openai client, plain and streamed: a plain vLLM engine's
    answer, with the prompt the router rendered arriving at decode by transfer."""
    import openai

    oai = openai.AsyncOpenAI(base_url=f"{app[0]}/v1", api_key="unused")
    for i, stream in enumerate((False, True)):
        body = {"model": engine_config.name, "instructions": "You answer in Python.",
                "input": f"Write function number {i} that adds two numbers. " * 6,
                "max_output_tokens": 6, "temperature": 0}
        reference = await reference_engine.call("responses", dict(body))
        expected = reference["output"][0]["content"][0]["text"]
        before = await replica_stats("decode")
        if stream:
            events = [e async for e in await oai.responses.create(**body, stream=True)]
            assert events[-1].type == "response.completed"
            text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            num_prompt = events[-1].response.usage.input_tokens
        else:
            done = await oai.responses.create(**body)
            text, num_prompt = done.output_text, done.usage.input_tokens
        assert text == expected
        after = await wait_until(functools.partial(_loaded, before), timeout_s=10)
        assert after, await replica_stats("decode")
        assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] <= 1
        assert after["prompt_tokens_external"] - before["prompt_tokens_external"] >= \
            num_prompt - 1
    # Stored responses live in the engine that made them (vLLM keeps no store by default).
    with pytest.raises(openai.NotFoundError):
        await oai.responses.create(model=engine_config.name, input="more",
                                   previous_response_id="resp_unknown")
    # Refused by the decode engine after its prefill: the prefill replica frees the blocks.
    with pytest.raises(openai.BadRequestError):
        await oai.responses.create(model=engine_config.name, input="more", background=True)
    assert await wait_until(idle, timeout_s=10)


async def _loaded(before: dict, num_loads: int = 1) -> dict | None:
    stats = await replica_stats("decode")
    return stats if stats["num_loads"] == before["num_loads"] + num_loads else None


async def test_several_prompts_and_n2_are_transferred(app, client, engine_config, vocab_size,
                                                     reference_outputs):
    """A list of prompts (one of them twice) and ``n = 2`` give the plain engine's outputs and
    are disaggregated: each distinct prompt is prefilled on the prefill replica and loaded
    once by decode, which computes no more than each request's last partial block."""
    prompts = make_prompts(engine_config, vocab_size, seed=41)
    first, second = prompts[10], prompts[12]  # 5 blocks + 17 tokens, 8 blocks + 1
    block = engine_config.block_size
    routing = (await client.get("/routing")).json()
    before = await replica_stats("decode")
    r = await client.post("/v1/completions", json=completion_body(
        engine_config, [first, second, first], max_tokens=4))
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert texts == [await reference_outputs(completion_body(engine_config, p, max_tokens=4))
                     for p in (first, second, first)]
    after = await wait_until(lambda: _loaded(before, 2), timeout_s=10)
    assert after, (before, await replica_stats("decode"))
    assert after["num_failed_loads"] == before["num_failed_loads"]
    assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] <= 3 * block

    # vLLM refuses n > 1 with greedy sampling; top_k = 1 samples the greedy token.
    third = make_prompts(engine_config, vocab_size, seed=42)[12]
    before = after
    r = await client.post("/v1/completions", json=completion_body(
        engine_config, third, max_tokens=4, n=2, temperature=1.0, top_k=1))
    assert r.status_code == 200, r.text
    expected = await reference_outputs(completion_body(engine_config, third, max_tokens=4))
    assert [c["text"] for c in r.json()["choices"]] == [expected, expected]
    after = await wait_until(lambda: _loaded(before, 1), timeout_s=10)
    assert after, (before, await replica_stats("decode"))
    assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] <= 2 * block
    assert (await client.get("/routing")).json()["local_prefills"] == routing["local_prefills"]

    before = await replica_stats("decode")
    cold = completion_body(engine_config, "A cold prompt nobody has sent before. " * 6)
    r = await client.post("/v1/completions", json=cold)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == await reference_outputs(cold)
    assert_all_loaded(before, await replica_stats("decode"), 1)


async def test_engine_listeners_bind_the_node_address(app):
    """The transfer endpoint, its TCPStore and the KV-event sockets listen on the node's
    address only, never on every interface."""
    import psutil
    import ray

    host = ray.util.get_node_ip_address()
    for role in ("prefill", "decode"):
        actor = psutil.Process((await replica_stats(role))["pid"])
        listeners = [c.laddr for p in actor.children(recursive=True)
                     for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        assert listeners, f"{role}: no listener found"
        wide = [a for a in listeners if a.ip not in (host, "127.0.0.1")]
        assert not wide, f"{role} engine listens on every interface: {wide}"


def test_generated_requests_never_get_a_5xx_on_the_real_stack(app, engine_config):
    """Schemathesis over the OpenAPI schema the ingress serves, against the real engines:
    valid and invalid bodies for both POST routes; no 5xx, and the app still answers a valid
    request correctly afterwards."""
    from collections import Counter

    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode, openapi

    from tests.unit.test_router_schema import to_httpx

    statuses: Counter[int] = Counter()
    server_errors: list[str] = []
    with httpx.Client(base_url=app[0], timeout=120) as http:
        schema = openapi.from_dict(http.get("/openapi.json").json())

        def check(case) -> None:
            kwargs = to_httpx(case.as_transport_kwargs(base_url=app[0]))
            response = http.request(**kwargs)
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                server_errors.append(f"{response.status_code} {response.text[:300]} for "
                                     f"{kwargs.get('content', b'')[:300]!r}")

        for path in ("/v1/completions", "/v1/chat/completions"):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run = settings(max_examples=FUZZ_CASES, deadline=None, database=None,
                               derandomize=True, suppress_health_check=list(HealthCheck))(
                    given(case=schema[path]["POST"].as_strategy(mode))(check))
                run()
        print(f"\nschemathesis on the real stack: {dict(sorted(statuses.items()))}")
        assert not server_errors, server_errors[:5]
        assert sum(statuses.values()) >= 1000, statuses
        assert statuses[200] > 0, statuses
        body = completion_body(engine_config, "def still_serving():")
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text


FUZZ_CASES = 250
