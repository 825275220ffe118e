"""``lmlab serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) and a web chat page.

Routes: ``GET /`` (the chat page), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` answers with server-sent
events), ``GET /health``. Every request becomes one or more
:class:`~lmlab.serving.engine.GenerationRequest` (one per prompt and choice)
for the continuous-batching :class:`~lmlab.serving.engine.Engine`, which runs
in its own thread; the tokens of each decode step travel back to the asyncio
handlers together, in one ``call_soon_threadsafe`` per step (one per token
would wake the event loop, and pay a system call, for every token). A client that disconnects cancels its sequences,
which leave the batch before the next decode step.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:
400 for invalid parameters (unknown fields are ignored, as OpenAI does for
ones it does not support), 413 for a body over ``--max_body_bytes``, 429
when ``--max_queue`` requests already wait, 404 for an unknown model or route.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at definition

import asyncio
import json
import threading
import time
import uuid
from importlib import resources
from typing import Any, Literal, Optional

from lmlab.errors import ConfigError

MAX_N = 8
MAX_STOP = 4


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, kind=float, lo=None, hi=None):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}", name, "invalid_type")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name, "invalid_value")
    return kind(value)


class Service:
    """What the routes share: the engine, the prompter and the limits."""

    def __init__(self, model, tokenizer, stage: Optional[str], model_id: str, max_batch: int = 16,
                 max_queue: int = 64, max_tokens_limit: int = 1024, max_body_bytes: int = 1_000_000,
                 compile: bool = False):
        from lmlab.serving.engine import Engine
        from lmlab.serving.prompts import Prompter

        self.events = _StepEvents()
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, compile=compile,
                             on_step=self.events.flush)
        self.prompter = Prompter(tokenizer, stage)
        self.model_id = model_id
        self.capacity = model.config.max_seq_len
        self.max_tokens_limit = min(max_tokens_limit, self.capacity - 1)
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    # -- request parsing -----------------------------------------------------------------------------
    def sampling(self, body: dict, prompt_len: int, default_max: Optional[int]):
        from lmlab.serving.engine import SamplingParams

        room = self.capacity - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the model's context holds {self.capacity}",
                           "messages" if "messages" in body else "prompt", "context_length_exceeded")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, default_max or min(room, self.max_tokens_limit), int, 1, self.max_tokens_limit)
        if prompt_len + max_tokens > self.capacity:
            raise APIError(400, f"prompt ({prompt_len} tokens) + {key} ({max_tokens}) exceeds the model's context "
                                f"of {self.capacity} tokens", key, "context_length_exceeded")
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP:
            raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop", "invalid_type")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, "'seed' must be an integer", "seed", "invalid_type")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
            # top_p=0 keeps only the likeliest token (the nucleus filter always keeps the first one above 0)
            top_p=max(_number(body, "top_p", 1.0, float, 0.0, 1.0), 1e-6),
            top_k=_number(body, "top_k", 0, int, 0, None),
            stop=[s for s in stop if s],
            seed=seed,
        )

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.model_id:
            raise APIError(404, f"model '{name}' is not served here (this server has '{self.model_id}')", "model",
                           "model_not_found")

    def completion_prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, (str, list)) for p in prompt):
            raise APIError(400, "'prompt' must be a string, a list of strings or a list of token ids", "prompt",
                           "invalid_type")
        return [self.prompter.completion_ids(p) if isinstance(p, str) else list(p) for p in prompt]

    def chat_prompt(self, body: dict) -> list[int]:
        from lmlab.data.posttrain.chat import validate_messages

        if not self.prompter.can_chat:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages",
                           "no_chat_template")
        messages = body.get("messages")
        try:
            validate_messages(messages or None)
        except ConfigError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None
        if not messages:
            raise APIError(400, "'messages' must be a non-empty list", "messages", "invalid_value")
        return self.prompter.chat_ids([{"role": m["role"], "content": m["content"]} for m in messages])


def _parse_body(raw: bytes, limit: int) -> dict:
    if len(raw) > limit:
        raise APIError(413, f"request body of {len(raw)} bytes exceeds the limit of {limit}", None, "request_too_large")
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the body is not valid JSON", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", None, "invalid_json")
    return body


class _StepEvents:
    """Events the engine thread produced during one step, handed to their event loops in one call per loop.

    Only the engine thread appends and flushes; a list swap needs no lock under the GIL.
    """

    def __init__(self):
        self.pending: list = []

    def add(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
        self.pending.append((loop, queue, item))

    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        by_loop: dict = {}
        for loop, queue, item in batch:
            by_loop.setdefault(loop, []).append((queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
                pass


def _deliver(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class _Run:
    """The sequences of one HTTP request and the asyncio queue their events arrive on."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop):
        self.service, self.loop = service, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests: list = []
        self.prompt_tokens = 0

    def submit(self, prompts: list[list[int]], params, n: int, stop_ids) -> None:
        from dataclasses import replace

        from lmlab.serving.engine import GenerationRequest, QueueFull

        events, loop, queue = self.service.events, self.loop, self.queue

        def on_event(req, delta):
            events.add(loop, queue, (req, delta))

        for ids in prompts:
            self.prompt_tokens += len(ids)
            for c in range(n):
                p = replace(params, seed=None if params.seed is None else params.seed + c)
                req = GenerationRequest(ids, p, stop_ids=stop_ids, on_event=on_event)
                req.index = len(self.requests)
                try:
                    self.service.engine.submit(req)
                except QueueFull as e:
                    self.cancel()
                    raise APIError(429, f"the server is busy ({e}); retry later", None, "queue_full",
                                   "rate_limit_error") from None
                except ValueError as e:
                    self.cancel()
                    raise APIError(400, str(e), "max_tokens", "context_length_exceeded") from None
                self.requests.append(req)

    def cancel(self) -> None:
        for r in self.requests:
            if not r.done:
                r.cancel()

    async def batches(self):
        """``(request, delta)`` pairs until every sequence has finished, grouped as they arrived: each group is
        everything queued when the handler woke."""
        pending = len(self.requests)
        while pending:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            pending -= sum(delta is None for _, delta in batch)
            yield batch

    def usage(self) -> dict:
        completion = sum(len(r.token_ids) for r in self.requests)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


def _finish(req) -> Optional[str]:
    return {"stop": "stop", "length": "length"}.get(req.finish_reason, req.finish_reason)


def create_app(service: Service):
    """The FastAPI application over ``service``."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()

    app = FastAPI(title="lmlab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse(APIError(exc.status_code, str(exc.detail), None, "not_found").body(), status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("lmlab.serving").joinpath("static/chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        e = service.engine
        return {"status": "ok", "active": len(e.rows), "waiting": len(e.waiting), "max_batch": e.max_batch}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": service.created,
                                            "owned_by": "lmlab", "max_model_len": service.capacity,
                                            "chat": service.prompter.chat}]}

    async def body_of(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > service.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {service.max_body_bytes}",
                           None, "request_too_large")
        return _parse_body(await request.body(), service.max_body_bytes)

    async def respond(request: Request, body: dict, prompts: list[list[int]], chat: bool, default_max):
        n = _number(body, "n", 1, int, 1, MAX_N)
        stream = bool(body.get("stream", False))
        params = service.sampling(body, max(len(p) for p in prompts), default_max)
        run = _Run(service, asyncio.get_running_loop())
        run.submit(prompts, params, n, service.prompter.stop_ids(chat))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(run, rid, obj + (".chunk" if chat else ""), created, chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            async for _ in run.batches():  # the whole texts are read from run.requests below
                pass
        finally:
            run.cancel()
        if chat:
            choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text},
                        "finish_reason": _finish(r), "logprobs": None} for r in run.requests]
        else:
            choices = [{"index": r.index, "text": r.text, "finish_reason": _finish(r), "logprobs": None}
                       for r in run.requests]
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": service.model_id,
                             "choices": choices, "usage": run.usage()})

    async def _stream(run: _Run, rid: str, obj: str, created: int, chat: bool, include_usage: bool):
        # the fields every chunk repeats are serialized once; a chunk serializes only its choices (and usage)
        head = "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": service.model_id})[:-1]

        def chunk(choices, usage=None):
            tail = f', "usage": {json.dumps(usage)}' if include_usage else ""
            return f'{head}, "choices": {json.dumps(choices)}{tail}}}\n\n'

        def event(req, delta):
            if delta is not None:
                payload = {"content": delta} if chat else None
                return chunk([{"index": req.index, "finish_reason": None, "logprobs": None,
                               **({"delta": payload} if chat else {"text": delta})}])
            return chunk([{"index": req.index, "finish_reason": _finish(req), "logprobs": None,
                           **({"delta": {}} if chat else {"text": ""})}])

        try:
            if chat:
                yield chunk([{"index": r.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for r in run.requests])
            # one write for the events that arrived together (still one server-sent event per token)
            async for batch in run.batches():
                yield "".join(event(req, delta) for req, delta in batch)
            yield (chunk([], run.usage()) if include_usage else "") + "data: [DONE]\n\n"
        finally:
            run.cancel()  # a client that went away frees its rows

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        service.check_model(body)
        return await respond(request, body, service.completion_prompts(body), False, 16)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        service.check_model(body)
        return await respond(request, body, [service.chat_prompt(body)], True, None)

    return app


class ServerThread:
    """Run the app with uvicorn in a background thread (tests, benchmarks); ``port=0`` picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def build_service(ckpt: str, tokenizer: Optional[str] = None, device: Optional[str] = None,
                  quantize: Optional[str] = None, model_name: Optional[str] = None, **limits: Any) -> Service:
    """Open ``ckpt`` (any path ``open_checkpoint`` reads) and wrap it in a :class:`Service`."""
    from pathlib import Path

    from lmlab.serving.prompts import load_model

    model, tok, source = load_model(ckpt, tokenizer, device, quantize)
    name = model_name or Path(str(source.path)).stem or "lmlab"
    return Service(model, tok, source.stage, name, **limits)


def serve(
    ckpt: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    tokenizer: Optional[str] = None,
    model_name: Optional[str] = None,
    max_batch: int = 16,
    max_queue: int = 64,
    max_tokens_limit: int = 1024,
    max_body_bytes: int = 1_000_000,
    device: Optional[str] = None,
    quantize: Optional[Literal["int8"]] = None,
    compile: bool = False,
) -> int:
    """Serve a checkpoint over an OpenAI-compatible HTTP API, with a web chat page at /.

    Concurrent requests are decoded together (continuous batching over one KV
    cache: finished sequences leave and waiting ones join between decode steps).

    Args:
        ckpt: Lightning .ckpt, lmlab export or HF export directory.
        host: Address to bind (127.0.0.1: this computer only; 0.0.0.0 exposes it to the network).
        port: TCP port (0: any free port).
        tokenizer: Tokenizer directory (default: the one the checkpoint records or has beside it).
        model_name: The model id clients name (default: the checkpoint's file or directory name).
        max_batch: Sequences decoded together.
        max_queue: Sequences allowed to wait for a batch slot; more are refused with 429.
        max_tokens_limit: Largest max_tokens a request may ask for.
        max_body_bytes: Largest request body; larger ones are refused with 413.
        device: cpu, cuda, ... (default: cuda when available).
        quantize: int8: dynamic int8 quantization of the Linear layers (CPU).
        compile: Compile the decode step with torch.compile before listening (a one-time warm-up of tens of
            seconds on CPU, no request waits for it); faster steps, logits equal to eager up to the last bits.
    """
    import uvicorn

    for name, value in (("--max_batch", max_batch), ("--max_queue", max_queue), ("--max_tokens_limit", max_tokens_limit),
                        ("--max_body_bytes", max_body_bytes)):
        if value < 1:
            raise ConfigError(name, f"must be at least 1, got {value}", "use a positive number")
    service = build_service(ckpt, tokenizer, device, quantize, model_name, max_batch=max_batch, max_queue=max_queue,
                            max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes, compile=compile)
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError("--port", f"cannot listen on {host}:{port} ({e.strerror})", "choose another --port (0: any free one)") from None
    port = sock.getsockname()[1]  # the real one when --port 0
    print(f"lmlab serve: model '{service.model_id}' at http://{host}:{port}/ (OpenAI API under /v1)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning"))
    server.run(sockets=[sock])
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``lmlab serve``."""
    from lmlab.verbs import run

    return run("lmlab serve", serve, argv)
