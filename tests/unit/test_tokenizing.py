"""The router's tokenizing (router/tokenizing.py): chat requests rendered by vLLM's own
renderer, as the engines would render them, and what is left to the engines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from router.tokenizing import PromptTokenizer, chat_renderer
from tests.unit.test_router_app import build_model_dir

TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
MESSAGES = [{"role": "user", "content": "hello world"}]
CAT = 6  # the test tokenizer's id of "cat"
# Prints the tools and each call's arguments, as real tool-calling templates do (reading them as
# a mapping).
TEMPLATE = ("{% if tools %}{{ tools | tojson }} {% endif %}{% for m in messages %}"
            "{{ m['role'] }} : {% if m['content'] %}{{ m['content'] }} {% endif %}"
            "{% for call in m.get('tool_calls') or [] %}"
            "{{ call['function']['arguments']['a'] }} {% endfor %}{% endfor %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_model_dir(Path(tmp_path_factory.mktemp("model"))))


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> PromptTokenizer:
    return PromptTokenizer(model_dir, ["--model", model_dir, "--max-model-len", "1024",
                                       "--trust-request-chat-template"])


async def test_chat_is_rendered_with_tools_and_tool_calls_as_vllm_does(tokenizer) -> None:
    body = {"messages": [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "add", "arguments": json.dumps({"a": "cat"})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "the mat"}],
        "tools": [TOOL], "tool_choice": "none", "chat_template": TEMPLATE}
    ids = await tokenizer.chat_ids(body)  # a message without content renders too
    assert ids is not None
    without_tools = await tokenizer.chat_ids({**body, "tools": None})
    assert without_tools is not None and len(without_tools) < len(ids)
    # vLLM gives the template the call's arguments as a dict, not the JSON string the client
    # sent: the template finds "cat" in them.
    assert CAT in ids


async def test_plain_chat_uses_the_models_template(tokenizer) -> None:
    ids = await tokenizer.chat_ids({"messages": MESSAGES})
    assert ids == [1, 10, 12, 3, 4, 1, 11, 12]  # <s>user : hello world <s>assistant :


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.invalid/cat.png"}}]}]},
    {"messages": MESSAGES, "tools": [TOOL], "tool_choice": "auto"},  # vLLM: no tool parser
    {"messages": "not a list"},
], ids=["media", "refused", "invalid"])
async def test_what_the_router_does_not_render_has_no_tokens(tokenizer, body) -> None:
    assert await tokenizer.chat_ids(body) is None


@pytest.mark.parametrize("extra", [{"suffix": "the cat"}, {"truncate_prompt_tokens": 1}])
def test_a_completion_only_the_engines_can_tokenize_has_no_router_tokens(tokenizer,
                                                                         extra) -> None:
    assert tokenizer.token_ids({"prompt": "hello world"}) == [3, 4]
    assert tokenizer.token_ids({"prompt": "hello world", **extra}) is None
    assert tokenizer.prompts_ids({"prompt": ["hello", "world"]}) == [[3], [4]]
    assert tokenizer.prompts_ids({"prompt": ["hello", "world"], **extra}) is None


def test_building_a_renderer_leaves_the_environment_as_it_was(model_dir) -> None:
    before = dict(os.environ)
    chat_renderer(("--model", model_dir, "--max-model-len", "512"))
    assert dict(os.environ) == before


async def test_without_a_renderer_chats_are_left_to_the_engines(model_dir, monkeypatch,
                                                                caplog) -> None:
    import router.tokenizing

    def no_platform(flags: tuple[str, ...]) -> None:
        raise RuntimeError("no platform")

    monkeypatch.setattr(router.tokenizing, "chat_renderer", no_platform)
    tokenizer = PromptTokenizer(model_dir)
    assert "rendered by the engines" in caplog.text
    assert await tokenizer.chat_ids({"messages": MESSAGES}) is None
    assert tokenizer.token_ids({"prompt": "hello world"}) == [3, 4]
