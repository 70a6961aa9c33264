"""The gRPC API (router/grpc_api): messages to OpenAI bodies and back, status codes, and the
ingress's gRPC methods over the same fake handles as the HTTP tests (tests/unit/test_router_app)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from router.grpc_api import convert
from router.grpc_api import pdserve_pb2 as pb
from router.grpc_api.service import GrpcError
from router.openai_api import APIError
from tests.unit import test_router_app as ingress

KEY, MODEL = ingress.KEY, ingress.MODEL
model_dir, make, h = ingress.model_dir, ingress.make, ingress.h  # the HTTP tests' fixtures


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


# -- requests ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("request_", "prompt"), [
    (pb.CompletionRequest(prompt="hi"), "hi"),
    (pb.CompletionRequest(prompts=pb.Prompts(texts=["a", "b"])), ["a", "b"]),
    (pb.CompletionRequest(prompt_token_ids=pb.TokenIds(ids=[5, 6])), [5, 6]),
    (pb.CompletionRequest(prompts_token_ids=pb.TokenIdsList(
        prompts=[pb.TokenIds(ids=[5]), pb.TokenIds(ids=[6, 7])])), [[5], [6, 7]]),
])
def test_every_prompt_form(request_: pb.CompletionRequest, prompt: Any) -> None:
    assert convert.completion_body(request_) == {"prompt": prompt}


def test_only_fields_the_client_set_are_sent() -> None:
    """Unset optional fields stay out (the engine's defaults apply); zero values that were set
    go in (temperature 0 is greedy, not "unset")."""
    request = pb.CompletionRequest(
        model=MODEL, prompt="hi", max_tokens=4,
        sampling=pb.Sampling(temperature=0, stop=["\n", "."], seed=7, ignore_eos=False),
        extra=struct({"logit_bias": {"5": -100}, "stream_options": {"include_usage": True}}))
    assert convert.completion_body(request) == {
        "model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": 0.0,
        "stop": ["\n", "."], "seed": 7, "ignore_eos": False, "logit_bias": {"5": -100.0},
        "stream_options": {"include_usage": True}}


def test_chat_messages_carry_their_extra_fields() -> None:
    request = pb.ChatCompletionRequest(
        model=MODEL, max_completion_tokens=3, logprobs=True, messages=[
            pb.ChatMessage(role="system", content="be brief"),
            pb.ChatMessage(role="tool", content="42", extra=struct({"tool_call_id": "c1"})),
            pb.ChatMessage(role="user", extra=struct({"content": [{"type": "text",
                                                                   "text": "hi"}]}))])
    assert convert.chat_body(request) == {
        "model": MODEL, "max_completion_tokens": 3, "logprobs": True, "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}


@pytest.mark.parametrize("extra", [{"max_tokens": 5}, {"prompt": "again"}, {"stream": True}])
def test_extra_cannot_repeat_a_field_or_choose_streaming(extra: dict[str, Any]) -> None:
    request = pb.CompletionRequest(prompt="hi", max_tokens=4, extra=struct(extra))
    with pytest.raises(APIError) as e:
        convert.completion_body(request)
    assert e.value.status == 400 and next(iter(extra)) in str(e.value)


def test_a_message_field_set_twice_is_refused() -> None:
    request = pb.ChatCompletionRequest(messages=[
        pb.ChatMessage(role="user", content="hi", extra=struct({"content": "ho"}))])
    with pytest.raises(APIError, match=r"messages\[0\]: content"):
        convert.chat_body(request)


# -- answers ----------------------------------------------------------------------------------

def test_vllm_answers_become_messages() -> None:
    """vLLM's own answers: nulls and fields the messages lack (stop_reason,
    kv_transfer_params, ...) are left out, everything else kept."""
    completion = {"id": "cmpl-1", "object": "text_completion", "created": 17, "model": MODEL,
                  "choices": [{"index": 0, "text": "def f", "logprobs": None,
                               "finish_reason": "length", "stop_reason": None,
                               "prompt_logprobs": None}],
                  "usage": {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2,
                            "prompt_tokens_details": None},
                  "system_fingerprint": None, "kv_transfer_params": None}
    message = convert.to_message(completion, pb.CompletionResponse)
    assert (message.id, message.created, message.choices[0].text) == ("cmpl-1", 17, "def f")
    assert message.choices[0].finish_reason == "length" and message.usage.total_tokens == 5
    chunk = {"id": "chat-1", "object": "chat.completion.chunk", "created": 3, "model": MODEL,
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "x",
                                                "tool_calls": [{"id": "t", "index": 0}]},
                          "logprobs": {"content": [{"token": "x", "logprob": -0.5}]},
                          "finish_reason": None}], "usage": None}
    message = convert.to_message(chunk, pb.ChatCompletionChunk)
    choice = message.choices[0]
    assert (choice.delta.content, choice.finish_reason) == ("x", "")
    assert choice.delta.tool_calls[0]["id"] == "t"
    assert choice.logprobs["content"][0]["logprob"] == -0.5
    assert not message.HasField("usage")


@pytest.mark.parametrize(("status", "code"), [
    (400, grpc.StatusCode.INVALID_ARGUMENT), (401, grpc.StatusCode.UNAUTHENTICATED),
    (404, grpc.StatusCode.NOT_FOUND), (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (422, grpc.StatusCode.INVALID_ARGUMENT), (500, grpc.StatusCode.INTERNAL),
    (502, grpc.StatusCode.INTERNAL), (503, grpc.StatusCode.UNAVAILABLE)])
def test_status_codes(status: int, code: grpc.StatusCode) -> None:
    assert convert.status_code(status) == code


# -- the ingress's gRPC methods -----------------------------------------------------------------

class FakeContext:
    """What the methods use of Ray Serve's ``RayServegRPCContext``."""

    def __init__(self, metadata: dict[str, str] | None = None) -> None:
        self._metadata = list((metadata or {}).items())
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details


def completion(**kw: Any) -> pb.CompletionRequest:
    return pb.CompletionRequest(**{"model": MODEL, "prompt": "hello world the cat",
                                   "max_tokens": 4, **kw})


async def collect(stream: Any) -> list[Any]:
    return [m async for m in stream]


async def test_unary_goes_through_prefill_and_decode(h) -> None:
    context = FakeContext()
    answer = await h.pd.Completion(completion(), context)
    assert context.code() is None
    assert answer.choices[0].text == "by d0"
    assert (h.prefill.pins, h.decode.pins) == (["p0"], ["d0"])
    assert h.prefill.calls[0]["args"][1]["prompt"] == [3, 4, 5, 6]  # tokenized at the router


async def test_stream_relays_every_chunk(h) -> None:
    context = FakeContext()
    messages = await collect(h.pd.StreamCompletion(completion(), context))
    assert [m.choices[0].text for m in messages] == ["by d0 ", "more"]
    assert context.code() is None
    assert h.decode.calls[0]["args"][1]["stream"] is True


async def test_bad_requests_get_their_codes(h) -> None:
    for request, code in [
            (completion(model="nope"), grpc.StatusCode.NOT_FOUND),
            (pb.CompletionRequest(model=MODEL, max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT),
            (completion(extra=struct({"max_tokens": 2})), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.CompletionRequest(model=MODEL, prompt_token_ids=pb.TokenIds(ids=[999])),
             grpc.StatusCode.INVALID_ARGUMENT)]:
        unary = FakeContext()
        assert await h.pd.Completion(request, unary) == pb.CompletionResponse()
        assert unary.code() == code and unary.details()
        streamed = FakeContext()
        with pytest.raises(GrpcError):
            await collect(h.pd.StreamCompletion(request, streamed))
        assert streamed.code() == code
    assert h.decode.calls == []


async def test_no_decode_replica_left_is_unavailable(h) -> None:
    h.decode.behaviour.update(d0="raise", d1="raise")
    context = FakeContext()
    await h.pd.Completion(completion(), context)
    assert context.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_stream_failing_midway_ends_with_unavailable(h) -> None:
    h.decode.behaviour["d0"] = "midfail"
    context = FakeContext()
    messages = []
    with pytest.raises(GrpcError):
        async for message in h.pd.StreamCompletion(completion(), context):
            messages.append(message)
    assert [m.choices[0].text for m in messages] == ["by d0 "]
    assert context.code() == grpc.StatusCode.UNAVAILABLE


async def test_cancelling_a_stream_cancels_the_decode_call(h, monkeypatch) -> None:
    finished: list[list[str]] = []
    done = h.pd.coordinator.done
    monkeypatch.setattr(h.pd.coordinator, "done",
                        lambda ctx, ids: (finished.append(list(ids)), done(ctx, ids)))
    stream = h.pd.StreamCompletion(completion(), FakeContext())
    await stream.__anext__()
    await stream.aclose()  # what Ray Serve does when the gRPC client cancels
    assert h.decode.calls[0]["stream"].is_cancelled
    assert finished == [["p0", "d0"]]  # the request is over for the router too


async def test_api_key_from_metadata(make) -> None:
    h = make(api_key=KEY)
    for method, request in [(h.pd.Completion, completion()),
                            (h.pd.ListModels, pb.ListModelsRequest())]:
        refused = FakeContext()
        await method(request, refused)
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        allowed = FakeContext({"authorization": f"Bearer {KEY}"})
        assert await method(request, allowed) != type(request)()
        assert allowed.code() is None


async def test_list_models(h) -> None:
    models = await h.pd.ListModels(pb.ListModelsRequest(), FakeContext())
    assert [(m.id, m.max_model_len) for m in models.data] == [(MODEL, 1024)]


def test_checked_in_code_is_what_the_proto_generates(tmp_path) -> None:
    """router/grpc_api/pdserve_pb2*.py are `make proto`'s output for pdserve.proto as it is."""
    from importlib.resources import files
    from pathlib import Path

    from grpc_tools import protoc

    root = Path(__file__).resolve().parents[2]
    proto = "router/grpc_api/pdserve.proto"
    well_known = files("grpc_tools") / "_proto"  # google/protobuf/struct.proto
    assert protoc.main(["protoc", f"-I{root}", f"-I{well_known}", f"--python_out={tmp_path}",
                        f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                        str(root / proto)]) == 0
    for name in ("pdserve_pb2.py", "pdserve_pb2.pyi", "pdserve_pb2_grpc.py"):
        generated = (tmp_path / "router" / "grpc_api" / name).read_text()
        assert generated == (root / "router" / "grpc_api" / name).read_text(), name
