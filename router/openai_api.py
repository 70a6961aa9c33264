"""The OpenAI surface the router checks before anything reaches an engine.

Every rejection is an OpenAI-style error body with a 4xx status (vLLM's own shape:
``{"error": {"message", "type", "param", "code"}}``), never a 500.
"""

from __future__ import annotations

import json
from typing import Any

from cluster.engine import error_body, request_model


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(status, message, type_, param)


def parse_body(raw: bytes, kind: str, model_name: str) -> dict[str, Any]:
    """Check an OpenAI request body; return it as a dict or raise ``APIError``."""
    import pydantic
    from vllm.exceptions import VLLMClientError

    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        # vLLM's own model parses the body; what it parsed (not the raw JSON) goes on, so the
        # router and the engines read every field alike ("5" is 5, "false" is False).
        body = request_model(kind).model_validate(body).model_dump(exclude_unset=True)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"],
                       param=param) from None
    except VLLMClientError as e:
        raise APIError(400, str(e), param=getattr(e, "parameter", None)) from None
    if kind == "completion" and _is_empty_prompt(body.get("prompt")):
        raise APIError(400, "prompt must not be empty", param="prompt")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is not None and value < 1:
            raise APIError(400, f"{field} must be at least 1, got {value}", param=field)
    return body


def _is_empty_prompt(prompt: Any) -> bool:
    """True for "", [], [[]], [""] and the like: nothing for an engine to run."""
    if isinstance(prompt, (str, list)) and len(prompt) == 0:
        return True
    return isinstance(prompt, list) and any(
        isinstance(p, (str, list)) and len(p) == 0 for p in prompt)


def status_of(body: Any) -> int:
    """The HTTP status of a response or error body."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        return code if isinstance(code, int) and 400 <= code < 600 else 500
    return 200
