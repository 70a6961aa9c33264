"""The gRPC API on the real stack: a grpcio client through Ray Serve's gRPC proxy, the same
router, prefill and decode replicas as HTTP."""

from __future__ import annotations

import grpc
import httpx
import pytest

from router.grpc_api import pdserve_pb2 as pb
from router.grpc_api import pdserve_pb2_grpc
from tests.integration.support import (
    MAX_TOKENS,
    completion_body,
    completion_request,
    deployed,
    make_prompts,
    one_pair_config,
    wait_until,
)

APP = "pdserve-grpc"


@pytest.fixture(scope="module")
def app(engine_config):
    cfg = one_pair_config(engine_config, APP)
    with deployed(cfg) as d:
        yield d


@pytest.fixture
async def stub(app):
    async with grpc.aio.insecure_channel(app.grpc_target) as channel:
        yield pdserve_pb2_grpc.PDServeStub(channel)


@pytest.fixture
async def http(app):
    async with httpx.AsyncClient(base_url=app.url, timeout=120) as c:
        yield c


async def replica_stats(role: str) -> dict:
    from ray import serve

    return await serve.get_deployment_handle(role, APP).stats.remote()


async def test_completions_equal_http(app, stub, http, engine_config, vocab_size):
    """Greedy outputs by gRPC, unary and streamed, equal HTTP's; the gRPC call, sent first,
    went through the prefill replica (the decode replica loaded its blocks)."""
    prompts = [p for p in make_prompts(engine_config, vocab_size, seed=31)[::3]
               if len(p) > engine_config.block_size] + ["def grpc_works(): " * 12]
    before = await replica_stats("decode")
    for prompt in prompts:
        request = completion_request(engine_config.name, prompt)
        unary = await stub.Completion(request)
        chunks = [c async for c in stub.StreamCompletion(request)]
        r = await http.post("/v1/completions", json=completion_body(engine_config, prompt))
        assert r.status_code == 200, r.text
        expected = r.json()["choices"][0]["text"]
        assert unary.choices[0].text == expected
        assert unary.choices[0].finish_reason == "length"
        assert unary.usage.completion_tokens == MAX_TOKENS
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    after = await replica_stats("decode")
    assert after["num_loads"] - before["num_loads"] >= len(prompts), (before, after)
    assert after["num_failed_loads"] == before["num_failed_loads"]


async def test_chat_equals_http(app, stub, http, engine_config):
    messages = [{"role": "system", "content": "You answer in Python."},
                {"role": "user", "content": "Write a function that adds two numbers."}]
    r = await http.post("/v1/chat/completions", json={
        "model": engine_config.name, "messages": messages, "max_tokens": 6, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    expected = r.json()["choices"][0]["message"]["content"]
    request = pb.ChatCompletionRequest(
        model=engine_config.name, messages=[pb.ChatMessage(**m) for m in messages],
        max_tokens=6, sampling=pb.Sampling(temperature=0, ignore_eos=True))
    unary = await stub.ChatCompletion(request)
    assert unary.choices[0].message.content == expected
    assert unary.choices[0].message.role == "assistant"
    streamed = [c async for c in stub.StreamChatCompletion(request)]
    assert "".join(c.choices[0].delta.content for c in streamed if c.choices) == expected


async def test_several_prompts_and_extra_fields(app, stub, http, engine_config):
    """A list of prompts, and vLLM fields given through ``extra``, behave as over HTTP."""
    from google.protobuf import struct_pb2

    extra = struct_pb2.Struct()
    extra.update({"stream_options": {"include_usage": True}})
    request = pb.CompletionRequest(
        model=engine_config.name, prompts=pb.Prompts(texts=["def hello():", "import os"]),
        max_tokens=4, sampling=pb.Sampling(temperature=0, ignore_eos=True), extra=extra)
    body = completion_body(engine_config, ["def hello():", "import os"], max_tokens=4)
    r = await http.post("/v1/completions", json=body)
    expected = sorted((c["index"], c["text"]) for c in r.json()["choices"])
    chunks = [c async for c in stub.StreamCompletion(request)]
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert sorted(texts.items()) == expected
    assert chunks[-1].usage.completion_tokens == 8  # include_usage reached the engine


async def test_list_models(stub, engine_config):
    models = await stub.ListModels(pb.ListModelsRequest())
    assert [m.id for m in models.data] == [engine_config.name]
    assert models.data[0].max_model_len == engine_config.max_model_len


def bad_requests(model: str) -> list[tuple[str, object, grpc.StatusCode]]:
    sampling = pb.Sampling(temperature=0)
    return [
        ("no prompt", pb.CompletionRequest(model=model, max_tokens=4),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("empty prompt", pb.CompletionRequest(model=model, prompt="", max_tokens=4),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("max_tokens zero", pb.CompletionRequest(model=model, prompt="hi", max_tokens=0),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("max_tokens beyond the context",
         pb.CompletionRequest(model=model, prompt="hi", max_tokens=5000),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("token id outside the vocabulary",
         pb.CompletionRequest(model=model, prompt_token_ids=pb.TokenIds(ids=[5, 10**6]),
                              max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT),
        ("prompt too long",
         pb.CompletionRequest(model=model, prompt_token_ids=pb.TokenIds(ids=[5] * 1100),
                              max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT),
        ("negative temperature", pb.CompletionRequest(
            model=model, prompt="hi", max_tokens=4, sampling=pb.Sampling(temperature=-1)),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown model", pb.CompletionRequest(model="no-such-model", prompt="hi",
                                               sampling=sampling),
         grpc.StatusCode.NOT_FOUND),
        ("no messages", pb.ChatCompletionRequest(model=model, max_tokens=4),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("chat template", pb.ChatCompletionRequest(
            model=model, messages=[pb.ChatMessage(role="user", content="x")],
            extra=_struct({"chat_template": "{{ 'injected' }}"})),
         grpc.StatusCode.INVALID_ARGUMENT),
        ("field twice", pb.CompletionRequest(model=model, prompt="hi", max_tokens=4,
                                             extra=_struct({"max_tokens": 5})),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]


def _struct(data: dict) -> object:
    from google.protobuf import struct_pb2

    s = struct_pb2.Struct()
    s.update(data)
    return s


async def test_bad_input_gets_status_codes(stub, engine_config):
    """Each bad request gets its status code by both the unary and the streaming method; the
    app still answers afterwards."""
    wrong = []
    for case, request, code in bad_requests(engine_config.name):
        chat = isinstance(request, pb.ChatCompletionRequest)
        unary = stub.ChatCompletion if chat else stub.Completion
        stream = stub.StreamChatCompletion if chat else stub.StreamCompletion
        for name, call in (("unary", lambda r=request, u=unary: u(r)),
                           ("stream", lambda r=request, s=stream: _drain(s(r)))):
            try:
                await call()
                wrong.append(f"{case} ({name}): no error")
            except grpc.aio.AioRpcError as e:
                if e.code() != code or not e.details():
                    wrong.append(f"{case} ({name}): {e.code()} {e.details()!r}")
    assert not wrong, wrong
    ok = await stub.Completion(completion_request(engine_config.name, "still up?"))
    assert ok.choices[0].text


async def _drain(call) -> list:
    return [m async for m in call]


async def idle() -> bool:
    """Neither replica runs a request or holds a KV block."""
    stats = [await replica_stats(role) for role in ("prefill", "decode")]
    return all(s["kv_usage"] == 0.0 and s["num_running"] == 0 for s in stats)


async def test_cancelled_stream_frees_blocks(app, stub, engine_config, vocab_size):
    """A client that cancels a stream mid-way: both replicas drop the request and its blocks,
    well before the lease (20 s) could free them, and the request was stopped, not run out.

    Ray Serve's gRPC proxy drops a cancel that arrives while it writes a message to the client
    (the README says so): that request runs out. So another stream is tried when one ran out,
    up to four: a CI run met the race twice in a row, four in a row would not be that race."""
    # 95 tokens (3 blocks), so up to 929 may be generated: the cancel has a few seconds to
    # arrive before half of them are out, even on a loaded machine.
    prompt = make_prompts(engine_config, vocab_size, seed=33)[8]
    max_tokens = engine_config.max_model_len - len(prompt)
    for _ in range(4):
        assert await wait_until(idle, timeout_s=30)
        generated_before = (await replica_stats("decode"))["generation_tokens_total"]
        call = stub.StreamCompletion(completion_request(engine_config.name, prompt, max_tokens))
        num_messages = 0
        async for _ in call:
            num_messages += 1
            if num_messages >= 3:
                break
        call.cancel()
        assert await wait_until(idle, timeout_s=8), [await replica_stats(r) for r in
                                                      ("prefill", "decode")]
        assert call.cancelled()
        generated = (await replica_stats("decode"))["generation_tokens_total"] - \
            generated_before
        assert generated >= 3
        if generated < max_tokens // 2:
            return
    raise AssertionError(f"four cancelled streams ran out: {generated} of {max_tokens}")


def test_readme_client_runs_as_is(app, engine_config):
    """The README's gRPC example, run as a user would (only the port differs), prints the
    greedy completion twice: unary, then streamed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    section = (root / "README.md").read_text().split("### Over gRPC", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"127.0.0.1:9000"' in code
    run = subprocess.run([sys.executable, "-c", code.replace("127.0.0.1:9000", app.grpc_target)],
                         capture_output=True, text=True, timeout=120, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    with grpc.insecure_channel(app.grpc_target) as channel:
        expected = pdserve_pb2_grpc.PDServeStub(channel).Completion(pb.CompletionRequest(
            model=engine_config.name, prompt="def hello():", max_tokens=8,
            sampling=pb.Sampling(temperature=0))).choices[0].text
    assert expected and run.stdout == f"{expected}\n{expected}"
