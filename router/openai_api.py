"""The OpenAI surface the router checks before anything reaches an engine.

Every rejection is an OpenAI-style error body with a 4xx status (vLLM's own shape:
``{"error": {"message", "type", "param", "code"}}``), never a 500. In the order the ingress
applies them: the API key (``check_api_key``), the body size (``read_body``), the body itself
(``parse_body``; ``validate_body`` for a body that came by gRPC), a request-supplied chat
template (``check_chat_template``), token ids outside the vocabulary (``check_token_ids``).
``install_openapi`` makes the app's OpenAPI schema describe the request bodies with vLLM's own
models.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cluster.engine import request_model
from cluster.sse import error_body

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

# (path, request kind) of the routes whose request body the OpenAPI schema describes.
BODY_ROUTES = (("/v1/completions", "completion"), ("/v1/chat/completions", "chat"),
               ("/v1/responses", "responses"))


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError",
                 param: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(status, message, type_, param)
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def check_api_key(headers: Mapping[str, str], api_key: str | None) -> None:
    """Raise a 401 unless ``headers`` carry ``Authorization: Bearer <api_key>`` (no key: no
    check). The key is compared in constant time and never appears in a message."""
    if api_key is None:
        return
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), api_key.encode()):
        raise APIError(401, "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                       "AuthenticationError", headers={"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, or a 413 as soon as it exceeds ``max_bytes`` (Content-Length is
    checked before anything is read)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise APIError(400, f"invalid Content-Length header {length[:32]!r}")
        check_size(int(length), max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        check_size(size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def check_size(size: int, max_bytes: int) -> None:
    """A 413 when a request of ``size`` bytes exceeds ``max_bytes``."""
    if size > max_bytes:
        raise APIError(413, f"request body larger than {max_bytes} bytes", "RequestTooLargeError")


def parse_body(raw: bytes, kind: str, model_name: str) -> dict[str, Any]:
    """Check an OpenAI request body; return it as a dict or raise ``APIError``."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return validate_body(body, kind, model_name)


# vLLM's fields that only pdserve sets between its replicas: a client's are dropped (its
# ``kv_transfer_params`` could name another request's blocks, or its own "rendered" prompt).
CLIENT_IGNORED = ("kv_transfer_params", "ec_transfer_params")


def validate_body(body: dict[str, Any], kind: str, model_name: str) -> dict[str, Any]:
    """Check a decoded OpenAI request body (from JSON or from gRPC); return what vLLM's request
    model parsed, or raise ``APIError``."""
    import pydantic
    import pydantic_core
    from vllm.exceptions import VLLMClientError

    try:
        # vLLM's own model parses the body; what it parsed (not the raw JSON) goes on, so the
        # router and the engines read every field alike ("5" is 5, "false" is False). It goes
        # on as plain JSON data: lazily validated iterables and typed objects inside messages
        # become lists and maps, which every replica can receive and parse again. Fields go
        # by the names a body uses (``response_format.json_schema.schema``, not the attribute
        # ``json_schema``), so that it parses again to the same request.
        body = request_model(kind).model_validate(body).model_dump(
            mode="json", exclude_unset=True, by_alias=True)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"],
                       param=param) from None
    except VLLMClientError as e:
        raise APIError(400, str(e), param=getattr(e, "parameter", None)) from None
    except (TypeError, AttributeError, KeyError, IndexError, RecursionError,
            pydantic_core.PydanticSerializationError) as e:
        # vLLM's own validators crash on some wrongly typed fields (``structured_outputs:
        # true``): still the client's error, never a 500.
        raise APIError(400, f"request body could not be validated ({type(e).__name__}: "
                       f"{str(e)[:200]})") from None
    if kind == "completion" and _is_empty_prompt(body.get("prompt")):
        raise APIError(400, "prompt must not be empty", param="prompt")
    for field in CLIENT_IGNORED:
        body.pop(field, None)
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(field)
        if value == 0 and field == "max_tokens" and kind == "completion" and body.get("echo"):
            continue  # the prompt echoed back (with its logprobs), nothing generated
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


def check_chat_template(body: dict[str, Any], allowed: bool) -> None:
    """Refuse a request-supplied chat template unless ``allowed`` (vLLM's
    ``--trust-request-chat-template``): a template is code the server would run."""
    if allowed:
        return
    kwargs = body.get("chat_template_kwargs")
    if body.get("chat_template") is not None or (
            isinstance(kwargs, dict) and kwargs.get("chat_template") is not None):
        raise APIError(400, "a chat template in the request is refused: the server does not "
                       "trust request chat templates", param="chat_template")


def check_token_ids(body: dict[str, Any], vocab_size: int) -> None:
    """A completion prompt given as token ids must stay inside the vocabulary."""
    prompt = body.get("prompt")
    if not isinstance(prompt, list):
        return
    lists = [p for p in prompt if isinstance(p, list)] or [prompt]
    for ids in lists:
        for token_id in ids:
            if isinstance(token_id, int) and not 0 <= token_id < vocab_size:
                raise APIError(400, f"token id {token_id} is outside the vocabulary "
                               f"(0 to {vocab_size - 1})", param="prompt")


def has_several_prompts(kind: str, body: dict[str, Any]) -> bool:
    """Whether a completion carries several prompts (texts or lists of token ids): each
    becomes an engine request of its own, with a transfer of its own."""
    prompt = body.get("prompt")
    return kind == "completion" and isinstance(prompt, list) and len(prompt) > 1 and \
        all(isinstance(p, (str, list)) for p in prompt)


def local_prefill_reason(kind: str, body: dict[str, Any]) -> str | None:
    """Why the request must be prefilled on its decode replica whatever the router knows, or
    None. ``batch``: ``best_of > 1`` or beam search, whose engine requests the engine makes
    itself (beam search's prompts grow with every step), so no prefill's transfer can serve
    them (``n > 1`` is transferred: its n engine requests share one prompt and load it once).
    ``prompt_logprobs``: the prompt's own logprobs (``prompt_logprobs``, or ``echo`` with
    logprobs), which only an engine that computes the whole prompt has; vLLM loads no cached
    or transferred blocks for such a request, so a transfer would be wasted."""
    best_of = body.get("best_of")
    if (isinstance(best_of, int) and best_of > 1) or body.get("use_beam_search") is True:
        return "batch"
    logprobs = body.get("logprobs" if kind == "completion" else "top_logprobs")
    if body.get("prompt_logprobs") is not None or \
            (body.get("echo") is True and (kind == "chat" or logprobs is not None)):
        return "prompt_logprobs"
    return None


def request_body_schemas() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``({path: requestBody}, component schemas)`` from vLLM's own request models."""
    bodies: dict[str, dict[str, Any]] = {}
    components: dict[str, Any] = {}
    for path, kind in BODY_ROUTES:
        model = request_model(kind)
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        if kind == "completion":  # vLLM's validator: one of them must be given
            schema["anyOf"] = [{"required": ["prompt"]}, {"required": ["prompt_embeds"]}]
        components[model.__name__] = schema
        bodies[path] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    return bodies, components


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (served at /openapi.json) describe the request bodies of the
    POST routes, which read their raw body; built on first use (it imports vLLM)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            bodies, components = request_body_schemas()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            for path, body in bodies.items():
                if "post" in schema.get("paths", {}).get(path, {}):
                    schema["paths"][path]["post"]["requestBody"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    """Answer what no route serves (an unknown path, a wrong method) with an OpenAI error body
    instead of the framework's own, so every client reads every error the same way."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def http_error(request: Any, exc: HTTPException) -> JSONResponse:
        type_ = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(exc.status_code,
                                                                    "BadRequestError")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(exc.status_code, message, type_),
                            status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(HTTPException, http_error)  # type: ignore[arg-type]
