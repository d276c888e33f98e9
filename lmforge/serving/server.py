"""An OpenAI-compatible HTTP server: a thin layer of decode request -> engine -> encode response.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming with
server-sent events), GET /health, GET /metrics (Prometheus). Errors use OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lmforge.serving import protocol as P
from lmforge.serving.async_engine import AsyncEngine
from lmforge.serving.auth import APIKeyAuth
from lmforge.serving.engine import Engine
from lmforge.serving.guarding import ServerGuard, StreamRedactor, check_user_texts, redact_output
from lmforge.serving.limits import BodySizeLimit, Limits
from lmforge.serving.metrics import Metrics
from lmforge.serving.multi_lora import AdapterRegistry
from lmforge.serving.semantic_cache import CachedCompletion
from lmforge.serving.tool_calls import ToolRequestError, ToolStream, parse_tool_calls, render_messages, request_constraint


@dataclass
class ServerSettings:
    """What the server accepts; every limit answers with a 4xx naming it."""

    model_name: str
    api_key: str | None = None
    limits: Limits = None  # type: ignore[assignment]
    guard: ServerGuard | None = None  # `serve --guard`: input scan, output redaction (guarding.py)
    adapters: AdapterRegistry | None = None  # multi-LoRA serving: requests name model "<served>:<adapter>"
    adapter_dir: str | None = None  # runtime loads (POST /v1/adapters) only from inside this folder

    def __post_init__(self) -> None:
        self.limits = self.limits or Limits()


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def create_app(engine: Engine, settings: ServerSettings, semantic_cache=None) -> FastAPI:
    """The FastAPI app around one engine (the engine thread starts and drains with the app)."""
    metrics = Metrics()
    runner = AsyncEngine(engine, metrics)
    state = {"active": 0}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await asyncio.to_thread(runner.shutdown)  # SIGTERM: uvicorn stops accepting, we finish what runs

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)
    if settings.api_key:  # a guard's trusted keys are API keys too, with the right to switch the guard off
        keys = {settings.api_key} | (settings.guard.trusted_keys if settings.guard else set())
        app.add_middleware(APIKeyAuth, api_keys=keys)  # added last = runs first: before the body is read
    tok = engine.tokenizer
    context = engine.model.config.block_size

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(P.error_body(err.message, err.kind, err.param), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        message = f"{where}: {first.get('msg', 'invalid')}"
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {where!r}; remove it (see the OpenAI API reference for the fields)"
        return JSONResponse(P.error_body(message, param=where), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(P.error_body(str(err.detail), "not_found_error" if err.status_code == 404 else
                                         "invalid_request_error"), status_code=err.status_code)

    def check_model(name: str) -> str | None:
        """The adapter a model name asks for ("<served>:<adapter>" or "base:<adapter>"), None for the base."""
        if name == settings.model_name:
            return None
        base, _, adapter = name.rpartition(":")
        loaded = settings.adapters.names if settings.adapters is not None else {}
        if base in (settings.model_name, "base") and adapter in loaded:
            return adapter
        known = [settings.model_name] + [f"{settings.model_name}:{a}" for a in sorted(loaded)]
        raise APIError(404, f"model {name!r} does not exist; this server serves {known}", "not_found_error", "model")

    def budget(ids: list[int], requested: int | None) -> int:
        lim = settings.limits
        if len(ids) > lim.max_prompt_tokens or len(ids) >= context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the limit is "
                                f"{min(lim.max_prompt_tokens, context - 1)}", param="prompt")
        if requested is not None and requested > lim.max_tokens:
            raise APIError(400, f"max_tokens={requested} is above this server's limit {lim.max_tokens}",
                           param="max_tokens")
        return min(requested or lim.default_max_tokens, context - len(ids))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [settings.model_name] + [f"{settings.model_name}:{a}" for a in
                                         sorted(settings.adapters.names if settings.adapters else {})]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "lmforge", "created": 0,
                                            "max_model_len": context, **({"parent": settings.model_name} if ":" in n
                                                                          else {})} for n in names]}

    @app.post("/v1/adapters")
    async def load_adapter(body: dict) -> dict[str, Any]:
        """Load a LoRA adapter at run time: {"name": ..., "path": ...} (a folder inside --adapter-dir)."""
        if settings.adapters is None or settings.adapter_dir is None:
            raise APIError(403, "run-time adapter loading is off; start the server with --adapter-dir DIR")
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise APIError(400, 'send {"name": "...", "path": "..."}', param="name")
        root = Path(settings.adapter_dir).resolve()
        folder = (root / path).resolve()
        if not folder.is_relative_to(root):
            raise APIError(400, f"{path!r} is outside the adapter folder", param="path")
        try:
            await asyncio.to_thread(runner.locked, settings.adapters.load, name, folder)
        except ValueError as err:
            raise APIError(400, str(err), param="path") from None
        return {"id": f"{settings.model_name}:{name}", "object": "model", "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        if settings.adapters is None or name not in settings.adapters.names:
            raise APIError(404, f"adapter {name!r} is not loaded", "not_found_error", "name")
        await asyncio.to_thread(runner.locked, settings.adapters.unload, name)
        return {"id": f"{settings.model_name}:{name}", "object": "model", "deleted": True}

    def guarded(request: Request, texts: list[str]) -> tuple[list[str], bool]:
        """(texts, whether the output guard runs): user texts scanned, blocked ones refused."""
        if settings.guard is None or not settings.guard.active_for(request.headers):
            return texts, False
        texts, blocked = check_user_texts(settings.guard.guard, metrics, texts)
        if blocked:
            raise APIError(400, f"refused by the guard: {'; '.join(blocked)}", param="messages")
        return texts, True

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        adapter = check_model(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else \
            [p for p in body.prompt if isinstance(p, str)] if isinstance(body.prompt, list) else []
        texts, on = guarded(request, texts)  # token-id prompts: nothing to scan, the output is still guarded
        if texts:
            body.prompt = texts[0] if isinstance(body.prompt, str) else texts
        prompts = _prompt_list(body.prompt, tok)
        return await serve(body, prompts, body.max_tokens, body.logprobs or 0, chat=False, guard_on=on,
                           adapter=adapter)

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatRequest, request: Request):
        adapter = check_model(body.model)
        try:
            constraint = request_constraint(body)
            messages = render_messages(body.messages, body.tools, body.tool_choice)
        except ToolRequestError as err:
            raise APIError(400, str(err), param=err.param) from None
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        texts, on = guarded(request, [messages[i]["content"] for i in users])
        for i, text in zip(users, texts):
            messages[i]["content"] = text
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        k = (body.top_logprobs or 1) if body.logprobs else 0
        return await serve(body, [tok.encode(text, add_special_tokens=False)], body.max_completion_tokens or
                           body.max_tokens, k, chat=True, guard_on=on, constraint=constraint, tools=tools,
                           adapter=adapter)

    async def serve(body, prompts: list[list[int]], requested: int | None, logprobs: int, chat: bool,
                    guard_on: bool = False, constraint=None, tools=None, adapter: str | None = None):
        lim = settings.limits
        if body.n > lim.max_n:
            raise APIError(400, f"n={body.n} is above this server's limit {lim.max_n}", param="n")
        if state["active"] >= lim.max_concurrent:
            raise APIError(429, f"{lim.max_concurrent} requests are already running; retry later",
                           "rate_limit_error")
        plans = [(i, ids, budget(ids, requested)) for i, ids in enumerate(prompts)]
        cache_key = _semantic_key(body, plans, logprobs) if semantic_cache is not None and constraint is None \
            and tools is None and adapter is None else None
        if cache_key is not None:
            hit = await asyncio.to_thread(semantic_cache.lookup, tok.decode(plans[0][1]), cache_key)
            metrics.semantic_lookup(hit is not None)
            if hit is not None:
                return _cached_response(hit, body, chat, len(plans[0][1]), settings.model_name)
        try:
            streams = []
            for p, ids, max_new in plans:
                samples = [body.sampling(max_new, p * body.n + j, constraint) for j in range(body.n)]
                opened = runner.open_parallel(ids, samples, logprobs, adapter)
                streams += [(p * body.n + j, ids, stream) for j, stream in enumerate(opened)]
        except ValueError as err:
            raise APIError(400, str(err)) from None
        state["active"] += 1
        kind = "chat.completion" if chat else "text_completion"
        request_id = P.new_id("chatcmpl" if chat else "cmpl")
        redactor = StreamRedactor(settings.guard.guard, metrics) if guard_on else None
        if body.stream:
            events = _stream_events(streams, tok, chat, logprobs, body, request_id, settings.model_name, kind,
                                    redactor, ToolStream(tools) if tools else None)
            return StreamingResponse(_sse(_release(events, state)), media_type="text/event-stream")
        try:
            choices, n_prompt, n_out = await _collect(streams, tok, chat, logprobs)
        finally:
            state["active"] -= 1
        if guard_on:
            for choice in choices:
                field = choice["message"] if chat else choice
                field["content" if chat else "text"] = redact_output(settings.guard.guard, metrics,
                                                                    field["content" if chat else "text"])
        for choice in choices if tools else []:
            calls = parse_tool_calls(choice["message"]["content"], tools)
            if calls:
                choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
                choice["finish_reason"] = "tool_calls"
        if cache_key is not None:
            text = choices[0]["message"]["content"] if chat else choices[0]["text"]
            entry = CachedCompletion(text, choices[0]["finish_reason"], n_out)
            await asyncio.to_thread(semantic_cache.store, tok.decode(plans[0][1]), cache_key, entry)
        return P.envelope(kind, request_id, settings.model_name, choices, usage=P.usage(n_prompt, n_out))

    app.state.metrics, app.state.runner = metrics, runner
    return app


def _semantic_key(body, plans, logprobs: int) -> str | None:
    """Settings that must match for a semantic-cache hit; None when the request is not cacheable."""
    if body.stream or body.n != 1 or len(plans) != 1 or logprobs or body.temperature != 0:
        return None
    return json.dumps([type(body).__name__, plans[0][2], body.stops(), body.repetition_penalty])


def _cached_response(hit: CachedCompletion, body, chat: bool, n_prompt: int, model: str) -> dict:
    kind = "chat.completion" if chat else "text_completion"
    text = {"message": {"role": "assistant", "content": hit.text}} if chat else {"text": hit.text}
    choice = {"index": 0, **text, "logprobs": None, "finish_reason": hit.finish_reason}
    return P.envelope(kind, P.new_id("chatcmpl" if chat else "cmpl"), model, [choice],
                      usage=P.usage(n_prompt, hit.completion_tokens), system_fingerprint="lmforge-semantic-cache")


def _prompt_list(prompt, tok) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    return [tok.encode(p) for p in prompt]


def _entry(tok, out) -> tuple[str, float, list[tuple[str, float]]]:
    return (tok.decode([out.token]), out.logprob, [(tok.decode([t]), lp) for t, lp in out.top_logprobs])


async def _merge(streams) -> AsyncIterator[tuple[int, Any]]:
    """Outputs of several request streams as they come, tagged with their choice index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, stream):
        try:
            async for out in stream:
                await queue.put((index, out))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(index, stream)) for index, _, stream in streams]
    done = 0
    try:
        while done < len(tasks):
            index, out = await queue.get()
            if out is None:
                done += 1
            else:
                yield index, out
    finally:
        for task in tasks:
            task.cancel()


async def _collect(streams, tok, chat: bool, logprobs: int) -> tuple[list[dict], int, int]:
    texts = {i: "" for i, _, _ in streams}
    entries: dict[int, list] = {i: [] for i, _, _ in streams}
    reasons: dict[int, str] = {}
    n_out = 0
    async for index, out in _merge(streams):
        texts[index] += out.text
        if out.token is not None:
            n_out += 1
            if logprobs:
                entries[index].append(_entry(tok, out))
        if out.finished:
            reasons[index] = out.seq.finish_reason or "stop"
    choices = []
    for index, _, _ in streams:
        lp = (P.chat_logprobs(entries[index]) if chat else P.completion_logprobs(entries[index])) if logprobs else None
        body = {"message": {"role": "assistant", "content": texts[index]}} if chat else {"text": texts[index]}
        choices.append({"index": index, **body, "logprobs": lp, "finish_reason": reasons.get(index, "length")})
    n_prompt = sum(len(ids) for _, ids, _ in streams)
    return choices, n_prompt, n_out


async def _stream_events(streams, tok, chat, logprobs, body, request_id, model, kind, redactor=None,
                         tool_stream: ToolStream | None = None):
    """Chunks for the SSE stream: role first (chat), then text deltas, finish reasons, usage."""
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    if chat:
        for index, _, _ in streams:
            yield P.envelope(chunk_kind, request_id, model,
                             [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    n_out = 0
    async for index, out in _merge(streams):
        n_out += out.token is not None
        lp = None
        if logprobs and out.token is not None:
            entry = [_entry(tok, out)]
            lp = P.chat_logprobs(entry) if chat else P.completion_logprobs(entry)
        text = redactor.feed(index, out.text, out.finished) if redactor is not None else out.text
        if not text and not out.finished and lp is None:
            continue
        reason = (out.seq.finish_reason or "stop") if out.finished else None
        if tool_stream is not None:  # chat with tools: a reply that is a calls object goes out as tool_calls
            deltas, override = tool_stream.feed(index, text, out.finished)
            for delta in deltas:
                yield P.envelope(chunk_kind, request_id, model, [{"index": index, "delta": delta, "logprobs": None,
                                                                  "finish_reason": None}])
            if out.finished:
                yield P.envelope(chunk_kind, request_id, model, [{"index": index, "delta": {}, "logprobs": None,
                                                                  "finish_reason": override or reason}])
            continue
        choice = {"index": index, "logprobs": lp, "finish_reason": reason}
        choice.update({"delta": {"content": text}} if chat else {"text": text})
        yield P.envelope(chunk_kind, request_id, model, [choice])
    if body.stream_options and body.stream_options.include_usage:
        yield P.envelope(chunk_kind, request_id, model, [], usage=P.usage(sum(len(ids) for _, ids, _ in streams),
                                                                          n_out))


async def _release(events, state):
    try:
        async for event in events:
            yield event
    finally:
        state["active"] -= 1


async def _sse(events) -> AsyncIterator[bytes]:
    async for event in events:
        yield f"data: {json.dumps(event)}\n\n".encode()
    yield b"data: [DONE]\n\n"
