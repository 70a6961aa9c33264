"""The router's OpenAI request checks: every rejection is a 4xx with an OpenAI error body."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.openai_api import APIError, local_prefill_reason, parse_body, status_of

MODEL = "demo-llama"
MESSAGES = [{"role": "user", "content": "hello"}]


def raw(body: Any) -> bytes:
    return json.dumps(body).encode()


def rejection(data: bytes, kind: str = "completion") -> APIError:
    with pytest.raises(APIError) as info:
        parse_body(data, kind, MODEL)
    return info.value


def assert_error_body(err: APIError, status: int, param: str | None, type_: str) -> None:
    assert err.status == status
    assert set(err.body) == {"error"}
    error = err.body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert error["type"] == type_
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    assert status_of(err.body) == status


@pytest.mark.parametrize("data", [b"{", b"", b"\xff\xfe", b"{'prompt': 'x'}", b"nul"],
                         ids=["open-brace", "empty", "not-utf8", "single-quotes", "nul"])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_invalid_json(data: bytes, kind: str) -> None:
    err = rejection(data, kind)
    assert_error_body(err, 400, None, "BadRequestError")
    assert "not valid JSON" in err.body["error"]["message"]


def test_json_nested_too_deeply_is_a_400() -> None:
    data = b'{"prompt": "hi", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = rejection(data)
    assert_error_body(err, 400, None, "BadRequestError")
    assert "nested too deeply" in err.body["error"]["message"]


@pytest.mark.parametrize("body", [[], [{"prompt": "x"}], "prompt", 3, None], ids=repr)
def test_non_object_json(body: Any) -> None:
    err = rejection(raw(body))
    assert_error_body(err, 400, None, "BadRequestError")
    assert "JSON object" in err.body["error"]["message"]


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("completion", {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ("completion", {"prompt": "hi", "temperature": "hot"}, "temperature"),
        ("completion", {"prompt": 5}, "prompt"),
        ("completion", {"prompt": "hi", "model": 5}, "model"),
        ("chat", {"messages": "hello"}, "messages"),
        ("chat", {"messages": MESSAGES, "max_completion_tokens": [1]}, "max_completion_tokens"),
    ],
)
def test_wrong_typed_fields(kind: str, body: dict[str, Any], param: str) -> None:
    err = rejection(raw(body), kind)
    assert_error_body(err, 400, param, "BadRequestError")
    assert err.body["error"]["message"].startswith(f"{param}: ")


def test_missing_prompt() -> None:
    assert_error_body(rejection(raw({"max_tokens": 3})), 400, "prompt", "BadRequestError")


def test_missing_messages() -> None:
    err = rejection(raw({"max_tokens": 3}), "chat")
    assert_error_body(err, 400, "messages", "BadRequestError")


def test_empty_prompt() -> None:
    err = rejection(raw({"prompt": "", "max_tokens": 3}))
    assert_error_body(err, 400, "prompt", "BadRequestError")


@pytest.mark.parametrize("prompt", [[], [[]], [""]], ids=["[]", "[[]]", "['']"])
def test_empty_token_list_prompt(prompt: list) -> None:
    err = rejection(raw({"prompt": prompt, "max_tokens": 3}))
    assert_error_body(err, 400, "prompt", "BadRequestError")


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("completion", "max_tokens", 0),
        ("completion", "max_tokens", -5),
        ("chat", "max_tokens", 0),
        ("chat", "max_completion_tokens", 0),
        ("chat", "max_completion_tokens", -1),
    ],
)
def test_non_positive_token_limits(kind: str, field: str, value: int) -> None:
    body: dict[str, Any] = {"prompt": "hi"} if kind == "completion" else {"messages": MESSAGES}
    err = rejection(raw({**body, field: value}), kind)
    assert_error_body(err, 400, field, "BadRequestError")
    assert err.body["error"]["message"] == f"{field} must be at least 1, got {value}"


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_clients_transfer_parameters_are_dropped(kind: str) -> None:
    """Only pdserve sets them: a client's could name another request's blocks, or a prompt
    the router's renderer would take as already rendered."""
    body: dict[str, Any] = {"prompt": "hi"} if kind == "completion" else {"messages": MESSAGES}
    parsed = parse_body(raw({**body, "kv_transfer_params": {"prompt_token_ids": [1, 2]},
                             "ec_transfer_params": {"x": 1}}), kind, MODEL)
    assert "kv_transfer_params" not in parsed and "ec_transfer_params" not in parsed


def test_an_echo_without_generation_is_valid() -> None:
    """``echo`` with ``max_tokens = 0`` (a prompt scored, nothing generated) is a request vLLM
    serves; without ``echo`` it is not."""
    body = parse_body(raw({"prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 1}),
                      "completion", MODEL)
    assert body["max_tokens"] == 0
    err = rejection(raw({"prompt": "hi", "max_tokens": 0, "echo": False}))
    assert_error_body(err, 400, "max_tokens", "BadRequestError")


@pytest.mark.parametrize(("kind", "body", "reason"), [
    ("completion", {"prompt": "hi"}, None),
    ("completion", {"prompt": "hi", "n": 3}, None),
    ("completion", {"prompt": "hi", "echo": True}, None),
    ("completion", {"prompt": "hi", "logprobs": 2}, None),
    ("completion", {"prompt": "hi", "echo": True, "logprobs": 0}, "prompt_logprobs"),
    ("completion", {"prompt": "hi", "prompt_logprobs": 1}, "prompt_logprobs"),
    ("completion", {"prompt": "hi", "use_beam_search": True}, "batch"),
    ("chat", {"messages": MESSAGES, "best_of": 2}, "batch"),
    ("chat", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}, None),
    ("chat", {"messages": MESSAGES, "prompt_logprobs": 0}, "prompt_logprobs"),
    ("chat", {"messages": MESSAGES, "echo": True}, "prompt_logprobs"),
])
def test_local_prefill_reason(kind: str, body: dict[str, Any], reason: str | None) -> None:
    assert local_prefill_reason(kind, body) == reason


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("completion", {"prompt": "hi", "max_tokens": "5"}),
        ("chat", {"messages": MESSAGES, "max_completion_tokens": "5"}),
    ],
    ids=["max_tokens", "max_completion_tokens"],
)
def test_numeric_string_token_limit_is_not_a_server_error(
    kind: str, body: dict[str, Any]
) -> None:
    parsed = parse_body(raw(body), kind, MODEL)
    assert parsed[next(k for k in body if k.startswith("max_"))] == 5


def test_returned_body_agrees_with_the_engine_on_streaming() -> None:
    body = parse_body(raw({"prompt": "hi", "stream": "false"}), "completion", MODEL)
    assert not body.get("stream")


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_unknown_model(kind: str) -> None:
    body: dict[str, Any] = {"prompt": "hi"} if kind == "completion" else {"messages": MESSAGES}
    err = rejection(raw({**body, "model": "gpt-9"}), kind)
    assert_error_body(err, 404, "model", "NotFoundError")
    assert err.body["error"]["message"] == "The model `gpt-9` does not exist."


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "Hello", "max_tokens": 8, "model": MODEL},
        {"prompt": "Hello"},  # model may be left out
        {"prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0.0, "stream": True},
        {"prompt": ["a", "b"], "max_tokens": 1},
    ],
)
def test_valid_completion(body: dict[str, Any]) -> None:
    # Every given field survives as given; vLLM's model may add defaults (max_tokens=16).
    assert body.items() <= parse_body(raw(body), "completion", MODEL).items()


@pytest.mark.parametrize(
    "body",
    [
        {"messages": MESSAGES, "model": MODEL, "max_completion_tokens": 5},
        {"messages": MESSAGES, "max_tokens": 1, "stream": True},
        {"messages": [{"role": "system", "content": "s"}, *MESSAGES]},
    ],
)
def test_valid_chat(body: dict[str, Any]) -> None:
    assert parse_body(raw(body), "chat", MODEL) == body


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize(("kind", "body"), [
    ("chat", {"messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}),
    ("completion", {"prompt": "hi", "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}),
    ("responses", {"input": "hi", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": SCHEMA}}}),
])
def test_fields_keep_the_names_a_body_uses(kind: str, body: dict[str, Any]) -> None:
    """vLLM's models name some fields apart from their attributes (``schema`` is the
    attribute ``json_schema``): what goes on to the engines parses again to the same request."""
    from router.openai_api import request_model

    parsed = parse_body(raw(body), kind, MODEL)
    key = "text" if kind == "responses" else "response_format"
    assert parsed[key] == body[key]
    again = request_model(kind).model_validate(parsed)
    assert again.model_dump(exclude_unset=True) == \
        request_model(kind).model_validate(body).model_dump(exclude_unset=True)


def test_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown request kind"):
        parse_body(raw({"prompt": "hi"}), "embeddings", MODEL)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"choices": []}, 200),
        ({"id": "x", "object": "text_completion"}, 200),
        ([], 200),
        (None, 200),
        ("text", 200),
        ({"error": {"message": "m", "code": 404}}, 404),
        ({"error": {"message": "m", "code": 400}}, 400),
        ({"error": {"message": "m", "code": 503}}, 503),
        ({"error": {"message": "m", "code": 599}}, 599),
        ({"error": {"message": "m", "code": 600}}, 500),
        ({"error": {"message": "m", "code": 200}}, 500),
        ({"error": {"message": "m", "code": "404"}}, 500),
        ({"error": {"message": "m"}}, 500),
        ({"error": "a string, not an object"}, 200),
    ],
)
def test_status_of(body: Any, status: int) -> None:
    assert status_of(body) == status


@pytest.mark.parametrize(("kind", "body"), [
    ("completion", {"prompt": "hi", "structured_outputs": True}),
    ("chat", {"messages": MESSAGES, "structured_outputs": True}),
])
def test_field_that_crashes_vllms_validator_is_a_400(kind: str, body: dict[str, Any]) -> None:
    assert_error_body(rejection(raw(body), kind), 400, None, "BadRequestError")
