"""The router's tokenizing (router/tokenizing.py): what it renders the way vLLM does, and what
it leaves to the engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.tokenizing import PromptTokenizer, template_kwargs
from tests.unit.test_router_app import build_model_dir

TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> PromptTokenizer:
    return PromptTokenizer(str(build_model_dir(Path(tmp_path_factory.mktemp("model")))))


def test_template_kwargs_merge_as_vllm_does() -> None:
    kwargs = template_kwargs({
        "messages": MESSAGES, "tools": [TOOL], "reasoning_effort": "low",
        "chat_template_kwargs": {"add_generation_prompt": False, "custom": 1}})
    # The request's own fields win over chat_template_kwargs; unset ones are left out.
    assert kwargs["add_generation_prompt"] is True and kwargs["custom"] == 1
    assert "documents" not in kwargs and kwargs["enable_thinking"] is True
    # Tools as vLLM's request model dumps them: its defaults filled in.
    (tool,) = kwargs["tools"]
    assert tool["function"]["name"] == "add" and "description" in tool["function"]
    assert "tools" not in template_kwargs({"messages": MESSAGES})


def test_a_template_that_prints_tools_sees_them(tokenizer) -> None:
    template = "{% if tools %}{{ tools[0]['function']['name'] }} {% endif %}{{ " \
        "messages[0]['content'] }}"
    body = {"messages": MESSAGES, "chat_template": template}
    plain = tokenizer.token_ids("chat", body)
    with_tools = tokenizer.token_ids("chat", {**body, "tools": [TOOL]})
    assert plain and with_tools and with_tools != plain


@pytest.mark.parametrize(("kind", "body"), [
    ("completion", {"prompt": "hello world", "suffix": "the cat"}),
    ("chat", {"messages": MESSAGES, "truncate_prompt_tokens": 2}),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
])
def test_what_only_the_engines_render_has_no_router_tokens(tokenizer, kind, body) -> None:
    assert tokenizer.token_ids(kind, body) is None


def test_several_prompts_with_a_suffix_have_no_router_tokens(tokenizer) -> None:
    assert tokenizer.prompts_ids({"prompt": ["hello", "world"]}) == [[3], [4]]
    assert tokenizer.prompts_ids({"prompt": ["hello", "world"], "suffix": "cat"}) is None
