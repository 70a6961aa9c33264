"""Tokenizing once, at the router, with the model's own tokenizer and chat template.

The router routes on token ids (the KV index is keyed on token blocks) and passes them on, so
a completion's prefill and decode engines do not tokenize again. A chat request is rendered
with the model's chat template the way vLLM renders it (template to text, then tokens without
special tokens); its prefill runs on those ids, and the decode engine's own rendering is
checked against them by the connector (``prompt_hash``): the template gets what vLLM gives it
(``template_kwargs``: tools, documents, reasoning effort), and a request the router cannot
render the same way (non-text parts, truncation, a completion's ``suffix``) is routed without
tokens and rendered by the engines alone. ``vocab_size`` (the model config's, else the
tokenizer's) bounds the token ids a client may send.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class PromptTokenizer:
    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(model)
        self.vocab_size = _vocab_size(model, len(self._tok))

    def token_ids(self, kind: str, body: dict[str, Any]) -> list[int] | None:
        """The prompt's token ids, or None when the request has no single prompt to route on
        (several prompts, non-text message parts) or cannot be rendered."""
        try:
            if kind == "completion":
                return self._completion_ids(body)
            return self._chat_ids(body)
        except Exception as e:  # a prompt we cannot tokenize is routed without its tokens
            logger.warning("cannot tokenize a %s request at the router: %s", kind, e)
            return None

    def prompts_ids(self, body: dict[str, Any]) -> list[list[int]] | None:
        """Each prompt's token ids for a completion with several prompts (texts or lists of
        token ids), or None when one of them cannot be tokenized."""
        if body.get("suffix") is not None:
            return None
        add_special = body.get("add_special_tokens", True)
        try:
            return [self._tok.encode(p, add_special_tokens=add_special) if isinstance(p, str)
                    else list(p) for p in body["prompt"]]
        except Exception as e:
            logger.warning("cannot tokenize a completion's prompts at the router: %s", e)
            return None

    def _completion_ids(self, body: dict[str, Any]) -> list[int] | None:
        if body.get("suffix") is not None:
            return None  # fill-in-the-middle: the engines render prompt and suffix together
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a list of one prompt is that prompt
        if isinstance(prompt, str):
            return self._tok.encode(prompt, add_special_tokens=body.get("add_special_tokens",
                                                                          True))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        return None

    def _chat_ids(self, body: dict[str, Any]) -> list[int] | None:
        messages = body.get("messages") or []
        if not all(isinstance(m.get("content"), str) for m in messages) or \
                body.get("truncate_prompt_tokens") is not None:
            return None  # rendered by the engines alone (parts, truncation)
        template = {"chat_template": body["chat_template"]} if body.get("chat_template") else {}
        text = self._tok.apply_chat_template(messages, tokenize=False, **template,
                                             **template_kwargs(body))
        return self._tok.encode(text, add_special_tokens=body.get("add_special_tokens", False))


def template_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """The chat template's keyword arguments for a chat body, as vLLM makes them
    (``ChatCompletionRequest.build_chat_params``): the request's own fields over its
    ``chat_template_kwargs``, unset ones left out, and ``tools`` dumped by vLLM's request model
    (a template that prints them must see the same dicts the engines see)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam

    user = dict(body.get("chat_template_kwargs") or {})
    own = {"add_generation_prompt": body.get("add_generation_prompt", True),
           "continue_final_message": body.get("continue_final_message", False),
           "documents": body.get("documents"), "reasoning_effort": body.get("reasoning_effort")}
    if own["reasoning_effort"] is not None and "enable_thinking" not in user:
        own["enable_thinking"] = own["reasoning_effort"] != "none"
    kwargs = user | {k: v for k, v in own.items() if v not in (None, "auto")}
    if body.get("tools") is not None:
        kwargs["tools"] = [ChatCompletionToolsParam.model_validate(tool).model_dump()
                           for tool in body["tools"]]
    return kwargs


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
