"""OpenAI-compatible API: `GET /v1/models` and `POST /v1/chat/completions` (plain and SSE streaming).

    instructglm serve --model_name_or_path THUDM/chatglm-6b --adapter output/alpaca --port 8000
    instructglm serve ... --web true          # the Gradio chat too, at /web/, on the same loaded model

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="instructglm", messages=[{"role": "user", "content": "你好"}])

Conversation mapping (`instructglm.infer.prompts.Prompter`, the loaded model's family and the run's
template): `system` (and `developer`), `user`, `assistant` (with `tool_calls`) and `tool` messages and
the request's `tools` become the model family's conversation:

- ChatGLM3-6B: its roles — `tools` the first system message (ChatGLM3's tools prompt and the functions
  as indented JSON), `system` a system message, a `tool` result an `<|observation|>` message, an assistant
  tool call an assistant message whose metadata is the tool's name and whose content is ChatGLM3's
  ```python tool_call(k=v)``` text;
- GLM-4 and other chat-template models: the tokenizer's chat template, `tools` passed to it (GLM-4's
  template: a call is an assistant turn `{tool name}\n{JSON arguments}`, a result an `observation` turn);
- text families (ChatGLM-6B, ChatGLM2-6B, plain causal LMs) and runs trained on a text template: the
  rounds go through the template (the last message must come from the user; earlier user/assistant
  messages pair up into history rounds, consecutive messages of one role joined with a newline; the
  system messages on the line before, as `convert` writes them). They cannot show tools: a request with
  `tools`, tool calls or tool results is a 400 that names the model family.

A reply that is a tool call (ChatGLM3's, GLM-4's) comes back, when the request offered `tools`, as
OpenAI's `tool_calls` (`{"id", "type": "function", "function": {"name", "arguments": "<JSON>"}}`) with
`finish_reason: "tool_calls"`, plain and streaming (one `tool_calls` delta after any text); without
`tools` it is the reply's text. `tool_choice: "none"` offers no tools; any other value is treated as
"auto". A tool result names its tool through `tool_call_id` (the assistant call with that id; an id
no earlier call has is a 400 naming it) or `name`.

Concurrent requests share the model's forward passes (`instructglm.infer.engine.BatchEngine`):
a new request joins the running batch at the next decode step, up to `--max_batch_size` rows;
beyond that, requests wait, in arrival order, and `--max_queue` bounds the waiting line (503
past it, which clients retry). Every request is answered as if it ran alone: greedy answers are
the one-at-a-time answers, and a `seed` makes a sampled answer reproducible whatever else runs
beside it. A client that disconnects, streaming or not, frees its row before the next decode
step (a waiting plain request checks for it every quarter second); a request that fails (its
prompt's forward, its sampling, its text) gets a 500 and the rest of its batch goes on.
`model` in a request is not checked: every name is answered by the loaded model, so clients
with a hard-coded name work.

Parameters are checked strictly: `max_tokens`, `max_completion_tokens`, `n` and `seed` must be
JSON integers (not `true`, `"5"` or `5.5`), `seed` one a 64-bit generator takes (-2**63 to
2**64 - 1), `temperature` and `top_p` numbers, `stream` a boolean; anything else is a 400 naming the
parameter. `--port` is 0..65535 (0: any free port, logged); `--max_tokens_limit` and
`--max_request_bytes` are at least 1. A temperature below 1e-5 (0 included)
decodes greedily (see `MIN_SAMPLING_TEMPERATURE`).

Limits and errors: `--api_key` (or INSTRUCTGLM_API_KEY) requires `Authorization: Bearer <key>`
on every route — `/openapi.json`, `/web/` and unknown paths included — (401 otherwise); a
browser opening `/web/` is asked for a login instead, any user name with the key as password
(HTTP Basic). Bodies over `--max_request_bytes` get 413, bodies nested too deeply to parse 400;
`max_tokens` over `--max_tokens_limit`, or a prompt plus `max_tokens` longer than the model's
context, get 400. Every error has OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`; an internal error is logged with its traceback and a request id, and the client gets
only that id.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at
# run time, and `Request` is imported inside `create_app`, not at module level.
import asyncio
import base64
import collections
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from instructglm.errors import BadValue
from instructglm.infer.generate import EngineArguments, GenerationArguments, context_limit
from instructglm.infer.load import ModelArguments, load_from_args
from instructglm.serve.web import check_port

logger = logging.getLogger(__name__)

# How often a plain (non-streaming) request that waits for its answer checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.25
# Where `--web` mounts the Gradio chat.
WEB_PATH = "/web"


@dataclass
class ServeArguments:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; 0.0.0.0 exposes the API to the network."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    api_key: Optional[str] = field(
        default=None,
        metadata={"help": "Require `Authorization: Bearer <key>`. Default: $INSTRUCTGLM_API_KEY if set, else no key."},
    )
    model_id: Optional[str] = field(
        default=None, metadata={"help": "Model name shown by /v1/models and in responses (default: `instructglm`)."}
    )
    max_tokens_limit: int = field(default=2048, metadata={"help": "Largest `max_tokens` a request may ask for."})
    max_request_bytes: int = field(default=1_000_000, metadata={"help": "Largest request body in bytes."})
    max_queue: int = field(default=256, metadata={"help": "Requests allowed to wait for a batch row; more get 503."})
    web: bool = field(default=False, metadata={"help": f"Also serve the Gradio chat at {WEB_PATH}/, from the same loaded model and batch."})

    def __post_init__(self):
        check_port(self.port)
        for name in ("max_tokens_limit", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise BadValue(f"--{name} must be at least 1, got {getattr(self, name)}: the server would refuse every request")
        if self.max_queue < 0:
            raise BadValue(f"--max_queue must be 0 or more, got {self.max_queue}")


ARGUMENTS = (ModelArguments, ServeArguments, EngineArguments, GenerationArguments)


# --- errors -------------------------------------------------------------------------------------


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error(request_id: str) -> APIError:
    """What a client is told of a bug: nothing of its text, which stays in the server log with this id."""
    return APIError(500, f"internal server error (request id {request_id}); the server log has the details", type="server_error")


def _new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


def _unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")


class RequireKey:
    """ASGI middleware: every HTTP request needs the key, before any routing, so no route (the OpenAPI
    schema, unknown paths, the web chat, and any added later) answers without it.

    The key comes as `Authorization: Bearer <key>` (API clients) or as the password of HTTP Basic
    (browsers, which cannot add a bearer header to a page load: under `/web/` a 401 asks them to log in).
    """

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    def authorized(self, scope: dict) -> bool:
        given = next((value for name, value in scope.get("headers", []) if name == b"authorization"), b"")
        scheme, _, token = given.partition(b" ")
        scheme, token = scheme.lower(), token.strip()
        if scheme == b"basic":
            try:
                token = base64.b64decode(token, validate=True).partition(b":")[2]
            except ValueError:
                return False
        elif scheme != b"bearer":
            return False
        return hmac.compare_digest(token, self.api_key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        from fastapi.responses import JSONResponse

        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        path = scope.get("path", "")
        web = path == WEB_PATH or path.startswith(WEB_PATH + "/")
        challenge = 'Basic realm="instructglm", charset="UTF-8"' if web else "Bearer"
        response = JSONResponse(_unauthorized().body(), status_code=401, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)


# --- request schema -----------------------------------------------------------------------------


def _schemas():
    """Pydantic models, built on first use so importing this module stays light."""
    from pydantic import BaseModel, ConfigDict, Field

    # strict: no coercion, so `max_tokens: true`, `"5"` or `5.5` and `stream: "yes"` are 400s, not 1, 5 and True.
    class TextPart(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        type: Literal["text"]
        text: str

    class FunctionCall(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        name: str
        arguments: str = ""  # a JSON object, as a string (OpenAI's)

    class ToolCall(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        id: Optional[str] = None
        type: Literal["function"] = "function"
        function: FunctionCall

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        role: str
        content: Union[str, list[TextPart], None] = None
        tool_calls: Optional[list[ToolCall]] = None
        tool_call_id: Optional[str] = None
        name: Optional[str] = None

    class Function(BaseModel):
        # kept whole (description, parameters, strict, ...): the family's prompt shows the function as given
        model_config = ConfigDict(extra="allow", strict=True)
        name: str = Field(min_length=1)

    class Tool(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        type: Literal["function"]
        function: Function

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        include_usage: bool = False

    class ChatCompletionRequest(BaseModel):
        # Parameters this server does not implement (penalties, logit_bias, ...) are ignored.
        model_config = ConfigDict(extra="ignore", strict=True)
        model: str = "instructglm"
        messages: list[Message] = Field(min_length=1)
        max_tokens: Optional[int] = Field(default=None, ge=1)
        max_completion_tokens: Optional[int] = Field(default=None, ge=1)
        temperature: Optional[float] = Field(default=None, ge=0, le=2)
        top_p: Optional[float] = Field(default=None, ge=0, le=1)
        n: int = Field(default=1, ge=1, le=1)
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        stop: Union[str, list[str], None] = None
        seed: Optional[int] = None
        tools: Optional[list[Tool]] = None
        tool_choice: Union[str, dict, None] = None

    return ChatCompletionRequest


# What a torch.Generator takes as its seed.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def request_messages(messages: list) -> list[dict]:
    """OpenAI chat messages as the message dicts `instructglm.data.messages.Message.from_dict` reads:
    `developer` is `system`, a `tool` result gets the name of the call its `tool_call_id` answers.

    Raises:
        APIError: a role other than system, developer, user, assistant or tool (400 naming the message).
    """
    call_names: dict[str, str] = {}
    out = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(
                400, f"messages[{i}].role {message.role!r} is not supported; use system, user, assistant or tool", param=f"messages[{i}].role"
            )
        entry: dict[str, Any] = {"role": role, "content": _text(message.content)}
        if message.tool_calls:
            entry["tool_calls"] = [{"name": call.function.name, "arguments": call.function.arguments} for call in message.tool_calls]
            call_names.update({call.id: call.function.name for call in message.tool_calls if call.id})
        if role == "tool":
            if message.tool_call_id and message.tool_call_id not in call_names:
                raise APIError(
                    400,
                    f"messages[{i}].tool_call_id {message.tool_call_id!r} matches no tool call of an earlier assistant message "
                    f"(their ids: {', '.join(map(repr, call_names)) or 'none'}); answer a call the conversation made",
                    param=f"messages[{i}].tool_call_id",
                )
            name = message.name or call_names.get(message.tool_call_id or "", "")
            if name:
                entry["name"] = name
        out.append(entry)
    return out


def conversation_of_request(req: Any) -> tuple[list, list | None]:
    """(`Message` records, tools or None) of a chat completion request.

    Raises:
        APIError: a bad message (unknown role, tool calls that are not JSON objects, ...), 400 naming it.
    """
    from instructglm.data.messages import Message
    from instructglm.data.records import BadRow

    messages = []
    for i, entry in enumerate(request_messages(req.messages)):
        try:
            messages.append(Message.from_dict(entry, f"messages[{i}]"))
        except BadRow as bad:
            raise APIError(400, bad.detail, param=f"messages[{i}]") from None
    offered = req.tools and req.tool_choice != "none"
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools] if offered else None
    return messages, tools


def prompt_ids_of(prompter: Any, messages: list, tools: list | None) -> list[int]:
    """The prompt ids of a request's conversation; what the run's format cannot show is a 400.

    Raises:
        APIError: tools (or tool calls, tool results) for a text prompt — naming the model family —, or a
            conversation the format refuses.
    """
    from instructglm.errors import BadValue

    uses_tools = bool(tools) or any(m.tool_calls or m.role == "observation" for m in messages)
    if uses_tools and not prompter.uses_tools:
        raise APIError(400, prompter.no_tools_reason(), param="tools" if tools else "messages", code="tools_not_supported")
    try:
        return prompter.prompt_ids(messages, tools)
    except BadValue as err:
        raise APIError(400, str(err), param="messages") from None


def openai_tool_calls(calls: Any) -> list[dict]:
    """Parsed tool calls in OpenAI's shape, each with a fresh id."""
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(dict(call.arguments), ensure_ascii=False)},
        }
        for call in calls
    ]


# --- one request on the engine ------------------------------------------------------------------


class LoopDispatch:
    """Hands events from the engine's thread to one event loop, waking it once per engine step: a decode
    step gives every running request a token, and one wake-up (not one per token) delivers them all."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: collections.deque = collections.deque()

    def put(self, queue: asyncio.Queue, event: Any) -> None:
        """Called on the engine's thread, during a step."""
        if self.loop.is_closed():
            raise RuntimeError("the event loop is closed")
        self.pending.append((queue, event))

    def flush(self) -> None:
        """Called on the engine's thread after each step."""
        if self.pending:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop closed (server shutting down): nobody listens any more
                self.pending.clear()

    def _deliver(self) -> None:
        while self.pending:
            queue, event = self.pending.popleft()
            queue.put_nowait(event)


class Job:
    """A request's events, handed from the engine's thread to the event loop of its handler."""

    def __init__(self, dispatch: LoopDispatch):
        self.dispatch = dispatch
        self.events: asyncio.Queue = asyncio.Queue()
        self.handle: Any = None

    def sink(self, event: Any) -> None:
        """Called on the engine's thread."""
        try:
            self.dispatch.put(self.events, event)
        except RuntimeError:
            # The event loop is gone (server shutting down); nobody is listening any more.
            if self.handle is not None:
                self.handle.cancel()


def submit(engine: Any, request: Any, job: Job) -> Any:
    """Queue `request` for `job`; a full queue is a 503, a request past the context a 400."""
    from instructglm.errors import BadValue
    from instructglm.infer.engine import QueueFull

    try:
        job.handle = engine.submit(request, job.sink)
    except QueueFull:
        raise APIError(503, "the server is busy: too many requests waiting; retry shortly", type="server_error", code="overloaded") from None
    except BadValue as err:
        raise APIError(400, str(err), param="messages", code="context_length_exceeded") from None
    return job.handle


# --- the app ------------------------------------------------------------------------------------


def create_app(
    engine: Any,
    prompter: Any,
    model_id: str = "instructglm",
    api_key: str | None = None,
    defaults: GenerationArguments | None = None,
    max_tokens_limit: int = 2048,
    max_request_bytes: int = 1_000_000,
    web: bool = False,
):
    """The FastAPI app over a `BatchEngine` (whose thread starts and stops with the app); `prompter` (the
    loaded model's `instructglm.infer.prompts.Prompter`) turns a conversation into the prompt and reads the
    reply; `web` mounts the Gradio chat at /web/ on the same engine."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from instructglm.infer.engine import GenerationRequest

    defaults = defaults or GenerationArguments()
    ChatCompletionRequest = _schemas()
    created = int(time.time())
    limit = context_limit(engine.model)
    tokenizer = engine.tokenizer

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="InstructGLM OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(APIError(err.status_code, message, type=kind).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        request_id = _new_request_id()
        logger.error("request %s: %s %s failed", request_id, request.method, request.url.path, exc_info=err)
        return JSONResponse(internal_error(request_id).body(), status_code=500)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {max_request_bytes}", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                raise APIError(413, f"request body exceeds the limit of {max_request_bytes} bytes", code="request_too_large")
        return bytes(body)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "instructglm"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name != model_id:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {model_id!r}", param="model", code="model_not_found")
        return model_card()

    def parse(body: bytes):
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({err})") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply to parse; send a chat completion request") from None
        seed = payload.get("seed") if isinstance(payload, dict) else None
        if isinstance(seed, int) and not isinstance(seed, bool) and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise APIError(400, f"seed is {seed}, outside the range {SEED_RANGE[0]}..{SEED_RANGE[1]} (a 64-bit seed)", param="seed")
        try:
            return ChatCompletionRequest.model_validate(payload)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(part) for part in first["loc"]) or None
            raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None

    def engine_request(req, prompt_ids: list[int]) -> GenerationRequest:
        """The engine request: the asked (or the largest fitting) budget, sampling settings, stops, seed."""
        prompt_tokens = len(prompt_ids)
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if asked is not None and asked > max_tokens_limit:
            raise APIError(400, f"{param} is {asked}, above this server's limit of {max_tokens_limit}", param=param, code="max_tokens_exceeded")
        room = max_tokens_limit if limit is None else min(max_tokens_limit, limit - prompt_tokens)
        if room < 1 or (asked is not None and limit is not None and prompt_tokens + asked > limit):
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens and {param} asks for {asked or room}; the model's context is "
                f"{limit} tokens. Shorten the messages or lower {param}",
                param="messages",
                code="context_length_exceeded",
            )
        temperature = defaults.temperature if req.temperature is None else req.temperature
        settings = GenerationArguments(
            max_new_tokens=asked or room,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            temperature=temperature,
            do_sample=defaults.do_sample and temperature > 0,
        )
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} if settings.samples else {}
        return GenerationRequest(
            prompt_ids=prompt_ids, max_new_tokens=settings.max_new_tokens, stop_strings=tuple(stops),
            seed=req.seed, stream=req.stream, stop_ids=frozenset(prompter.stop_ids),
            skip_special_tokens=prompter.skip_special_tokens, **sampling,
        )

    def usage(c) -> dict:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "total_tokens": c.prompt_tokens + c.completion_tokens}

    async def next_event(job: Job, request: Request) -> Any:
        """The job's next event; None once the client has disconnected (the job is then cancelled)."""
        waiting = asyncio.ensure_future(job.events.get())
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_SECONDS)
                if done:
                    return waiting.result()
                if await request.is_disconnected():
                    job.handle.cancel()
                    return None
        finally:
            waiting.cancel()

    dispatches: dict = {}

    def dispatch_for(loop: asyncio.AbstractEventLoop) -> LoopDispatch:
        if loop not in dispatches:
            dispatches[loop] = LoopDispatch(loop)
            engine.step_listeners.append(dispatches[loop].flush)
        return dispatches[loop]

    def failed(ident: str, event: Any) -> APIError:
        logger.error("request %s: generation failed", ident, exc_info=event.error)
        return internal_error(ident)

    def plain_text(handle: Any) -> str:
        """A reply's text without special tokens (a tool call shown as text when the request offered no tools)."""
        return tokenizer.decode(handle.token_ids, skip_special_tokens=True).strip()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(await read_body(request))
        messages, tools = conversation_of_request(req)
        prompt_ids = prompt_ids_of(prompter, messages, tools)
        generation = engine_request(req, prompt_ids)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        job = Job(dispatch_for(asyncio.get_running_loop()))
        handle = submit(engine, generation, job)

        if not req.stream:
            try:
                while True:
                    event = await next_event(job, request)
                    if event is None:
                        # Nobody reads this any more; 499 is nginx's "client closed request".
                        return Response(status_code=499)
                    if event.kind == "error":
                        raise failed(ident, event)
                    if event.kind == "done":
                        break
            finally:
                handle.cancel()  # no-op when finished; stops the work if the handler is left early
            completion = event.completion
            reply = prompter.reply(completion.text)
            finish = completion.finish_reason
            if reply.tool_calls and tools:
                message = {"role": "assistant", "content": reply.content or None, "tool_calls": openai_tool_calls(reply.tool_calls)}
                finish = "tool_calls"
            else:
                message = {"role": "assistant", "content": plain_text(handle) if reply.tool_calls else reply.content}
            return {
                "id": ident,
                "object": "chat.completion",
                "created": now,
                "model": model_id,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage(completion),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        # A content chunk is this with the text's JSON string in the middle (built once: one per token).
        before, after = chunk({"content": "\0"}).split(json.dumps("\0"))

        def content(text: str) -> str:
            return before + json.dumps(text, ensure_ascii=False) + after

        reply_stream = prompter.stream()

        def close(event: Any) -> str:
            """The last chunks: the rest of the reply (its tool calls), the finish reason, the usage if asked,
            [DONE]; or the error."""
            if event.kind == "error":
                return f"data: {json.dumps(failed(ident, event).body())}\n\ndata: [DONE]\n\n"
            shown = reply_stream.shown
            rest, reply = reply_stream.finish()
            finish = event.completion.finish_reason
            if reply.tool_calls and tools:
                calls = [{"index": i, **call} for i, call in enumerate(openai_tool_calls(reply.tool_calls))]
                out = (content(rest) if rest else "") + chunk({"tool_calls": calls})
                finish = "tool_calls"
            elif reply.tool_calls:
                text = plain_text(handle)  # no tools offered: the call as the model wrote it
                missing = text[len(shown) :] if text.startswith(shown) else text
                out = content(missing) if missing else ""
            else:
                out = content(rest) if rest else ""
            out += chunk({}, finish)
            if include_usage:
                body = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": model_id, "choices": [], "usage": usage(event.completion)}
                out += f"data: {json.dumps(body)}\n\n"
            return out + "data: [DONE]\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    # Every event already here goes out in one write (when the loop fell behind the engine).
                    batch = [await job.events.get()]
                    while not job.events.empty():
                        batch.append(job.events.get_nowait())
                    pieces = (reply_stream.feed(e.text) for e in batch if e.kind == "tokens" and e.text)
                    out = "".join(content(piece) for piece in pieces if piece)
                    last = batch[-1]
                    if last.kind != "tokens":
                        yield out + close(last)
                        break
                    if out:
                        yield out
            finally:
                handle.cancel()  # client disconnected mid-stream: free its row at once

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    if web:
        import gradio as gr

        from instructglm.serve.web import build_app

        gr.mount_gradio_app(app, build_app(engine, prompter, defaults), path=WEB_PATH)
    if api_key is not None:
        app.add_middleware(RequireKey, api_key=api_key)
    return app


def main(model_args: ModelArguments, args: ServeArguments, engine_args: EngineArguments, defaults: GenerationArguments) -> int:
    import uvicorn

    from instructglm.infer.engine import BatchEngine

    model, tokenizer, prompter = load_from_args(model_args)
    engine = BatchEngine(
        model, tokenizer, max_batch_size=engine_args.max_batch_size, max_queue=args.max_queue, decode=engine_args.decode,
        stop_ids=prompter.stop_ids,
    )
    app = create_app(
        engine,
        prompter,
        model_id=args.model_id or "instructglm",
        api_key=args.api_key or os.environ.get("INSTRUCTGLM_API_KEY") or None,
        defaults=defaults,
        max_tokens_limit=args.max_tokens_limit,
        max_request_bytes=args.max_request_bytes,
        web=args.web,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
