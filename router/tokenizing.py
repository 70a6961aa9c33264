"""Tokenizing once, at the router, the way the engines would.

The router routes on token ids (the KV index is keyed on token blocks) and passes them on, so
the engines do not tokenize again. A completion's text is tokenized with the model's tokenizer
and both engines run those ids. A chat request is rendered by vLLM's own chat renderer
(``chat_renderer``: the ``OnlineRenderer`` of vLLM's CPU-only render server, built from the
decode engine's flags, so it has the same tokenizer, chat template, content format, tool and
reasoning parsers): tools, tool calls in the history, text parts, documents and reasoning
effort come out exactly as the engines would render them. Its prefill runs on those ids, and
the decode engine of a transferred request takes them too (vLLM's decode-side token reuse,
``prompt_token_ids`` in ``kv_transfer_params``), so the two engines cannot disagree; the
router's renderer is what makes those ids right. A request the router does not render (images
or other non-text parts, a completion's ``suffix`` or truncation, one vLLM refuses, or any chat
where vLLM finds no platform to build the renderer on) is routed without tokens and rendered by
the engines, whose digests the connector then compares. Requests of the Responses API are
rendered the same way (their input and instructions become chat messages), but for one that
continues a stored response (``previous_response_id``), which the engines answer alone.
``vocab_size`` (the model config's, else the tokenizer's) bounds the token ids a client may
send.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


class PromptTokenizer:
    def __init__(self, model: str, engine_flags: Sequence[str] | None = None) -> None:
        """``engine_flags``: the vLLM flags of the engines whose rendering to reproduce
        (``cluster.engine.renderer_flags``); by default the model's own defaults."""
        from transformers import AutoTokenizer, PreTrainedTokenizerBase

        try:
            self._renderer = chat_renderer(tuple(engine_flags or ("--model", model)))
        except Exception as e:  # e.g. a router node where vLLM finds no platform
            logger.warning("cannot build vLLM's chat renderer here (%s: %s); chat requests are "
                           "routed without their tokens and rendered by the engines",
                           type(e).__name__, e)
            self._renderer = None
        # The engines' own tokenizer (their --tokenizer, --revision...) where it is a Hugging
        # Face one, as it is but for --tokenizer-mode mistral and the like.
        tok = getattr(getattr(self._renderer, "renderer", None), "tokenizer", None)
        self._tok = tok if isinstance(tok, PreTrainedTokenizerBase) else \
            AutoTokenizer.from_pretrained(model)
        self.vocab_size = _vocab_size(model, len(self._tok))

    def token_ids(self, body: dict[str, Any]) -> list[int] | None:
        """A completion's prompt as token ids, or None when it has no single prompt to route
        on (several prompts, a suffix) or cannot be tokenized."""
        try:
            return self._completion_ids(body)
        except Exception as e:  # a prompt we cannot tokenize is routed without its tokens
            logger.warning("cannot tokenize a completion at the router: %s", e)
            return None

    async def chat_ids(self, body: dict[str, Any]) -> list[int] | None:
        """A chat request's prompt as the engines would render it, or None (see the module's
        docstring)."""
        from vllm.renderers.chat_utils import has_non_text_content

        from router.openai_api import request_model

        if self._renderer is None:
            return None
        try:
            request = request_model("chat").model_validate(body)
            if has_non_text_content(request.messages):
                return None  # media: fetched and processed by the engines alone
            result = await self._renderer.render_chat(request)
        except Exception as e:  # the engines will answer it (with their own error if any)
            logger.debug("chat request not rendered at the router: %s: %s", type(e).__name__, e)
            return None
        if not isinstance(result, tuple):  # vLLM's ErrorResponse: the engines answer it
            return None
        _, inputs = result
        ids = inputs[0].get("prompt_token_ids") if len(inputs) == 1 else None
        return list(ids) if ids else None

    async def responses_ids(self, body: dict[str, Any]) -> list[int] | None:
        """A Responses request's prompt as the engines would render it, or None: besides what
        ``chat_ids`` leaves to the engines, a request that continues a stored response
        (``previous_response_id``: only the engine that stored it has its history)."""
        from router.openai_api import request_model

        if self._renderer is None or body.get("previous_response_id") is not None or \
                _has_media_input(body.get("input")):
            return None
        try:
            request = request_model("responses").model_validate(body)
            result = await self._renderer.render_responses(request)
        except Exception as e:  # the engines will answer it (with their own error if any)
            logger.debug("Responses request not rendered at the router: %s: %s",
                         type(e).__name__, e)
            return None
        inputs = getattr(result, "engine_input", None)  # else vLLM's ErrorResponse
        ids = inputs.get("prompt_token_ids") if isinstance(inputs, dict) else None
        return list(ids) if ids else None

    def prompts_ids(self, body: dict[str, Any]) -> list[list[int]] | None:
        """Each prompt's token ids for a completion with several prompts (texts or lists of
        token ids), or None when the engines must tokenize them (see ``_completion_ids``)."""
        if _engines_tokenize(body):
            return None
        add_special = body.get("add_special_tokens", True)
        try:
            return [self._tok.encode(p, add_special_tokens=add_special) if isinstance(p, str)
                    else list(p) for p in body["prompt"]]
        except Exception as e:
            logger.warning("cannot tokenize a completion's prompts at the router: %s", e)
            return None

    def _completion_ids(self, body: dict[str, Any]) -> list[int] | None:
        if _engines_tokenize(body):
            return None
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a list of one prompt is that prompt
        if isinstance(prompt, str):
            return self._tok.encode(prompt, add_special_tokens=body.get("add_special_tokens",
                                                                          True))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        return None


# The Responses API's input parts that carry text; any other (an image, a file, audio) is
# media, fetched and processed by the engines alone.
TEXT_PART_TYPES = frozenset({"input_text", "output_text", "text", "refusal", "reasoning_text",
                             "summary_text"})


def _has_media_input(value: Any) -> bool:
    """Whether a Responses ``input`` holds a part that is not text, at any depth."""
    if isinstance(value, list):
        return any(_has_media_input(item) for item in value)
    if isinstance(value, dict):
        part_type = value.get("type")
        if isinstance(part_type, str) and part_type.startswith("input_") and \
                part_type not in TEXT_PART_TYPES:
            return True
        return _has_media_input(value.get("content"))
    return False


def _engines_tokenize(body: dict[str, Any]) -> bool:
    """A completion whose prompt only the engines can turn into the ids they run: a ``suffix``
    (fill-in-the-middle renders prompt and suffix together) or ``truncate_prompt_tokens``
    (a prefill given the router's ids would compute the whole prompt, decode the truncated
    one)."""
    return body.get("suffix") is not None or body.get("truncate_prompt_tokens") is not None


@functools.lru_cache(maxsize=4)
def chat_renderer(flags: tuple[str, ...]) -> Any:
    """vLLM's chat renderer for an engine started with ``flags``, without the engine: built
    as vLLM's CPU-only render server builds it (``init_render_app_state``)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import resolve_default_chat_template_kwargs
    from vllm.renderers import renderer_from_config
    from vllm.renderers.chat_utils import load_chat_template
    from vllm.renderers.online_renderer import OnlineRenderer
    from vllm.usage.usage_lib import UsageContext

    from cluster.engine import parse_flags

    args = parse_flags(list(flags))
    environ = dict(os.environ)
    try:
        config = AsyncEngineArgs.from_cli_args(args).create_engine_config(
            UsageContext.ENGINE_CONTEXT)
    finally:  # the platform sets what engine processes need (LD_PRELOAD...): not for us
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
    renderer = OnlineRenderer(
        model_config=config.model_config, renderer=renderer_from_config(config),
        request_logger=None, chat_template=load_chat_template(args.chat_template),
        chat_template_content_format=args.chat_template_content_format,
        trust_request_chat_template=args.trust_request_chat_template,
        enable_auto_tools=args.enable_auto_tool_choice,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        tool_parser=args.tool_call_parser, tool_strict_level=args.tool_strict_level,
        reasoning_parser=args.reasoning_parser or
        config.structured_outputs_config.reasoning_parser,
        default_chat_template_kwargs=resolve_default_chat_template_kwargs(args))
    renderer.warmup()
    return renderer


def _vocab_size(model: str, tokenizer_size: int) -> int:
    """The model config's ``vocab_size`` (what the engine's embedding holds), else the
    tokenizer's size."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if isinstance(getattr(text_config, "vocab_size", None), int):
            return text_config.vocab_size
    except Exception as e:  # no config.json: the tokenizer knows its own size
        logger.warning("no vocab_size in %s's config (%s); using the tokenizer's %d", model, e,
                       tokenizer_size)
    return tokenizer_size
