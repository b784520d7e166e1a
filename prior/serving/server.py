"""An OpenAI-compatible HTTP server for a Cola text pipeline that batches concurrent requests.

``unimodal serve CHECKPOINT`` (FastAPI + uvicorn): ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /v1/models``, ``GET /health``.

Design choices
--------------
* **One sampler batch for concurrent requests.** Handlers put every choice (``n`` of them per
  request) on a bounded queue; one engine thread takes the first, waits up to
  ``batch_window_ms`` for more with the *same generation settings* (up to ``max_batch``), and runs
  them as one :class:`~prior.sampling.block_sampler.BlockSampler` batch. Each row has its own
  generator seeded by the request's ``seed`` (+ the choice index), so its noise and tokens never
  depend on the rest of the batch: **a response equals the same request served alone** (tested).
  Requests with other settings wait for the next batch. ``batching=False`` serves one at a time.
* **Per-request limits and stops**: ``max_tokens`` is the row's ``max_new_tokens`` (requests
  batch only with equal settings); ``stop`` strings (and, for chat, the ``<|im_end|>`` turn end)
  cut the text; a finished row keeps its slot until the batch ends, its later blocks dropped.
* **Streaming** (``stream=true``): server-sent events, one chunk per decoded block, then
  ``data: [DONE]``. A client that disconnects mid-stream cancels its choice: the engine stops
  sending to it and the slot is freed when its batch ends; the server keeps serving.
* **Errors** are OpenAI-style JSON ``{"error": {"message", "type", "param", "code"}}``: 401
  (missing or wrong Bearer key, when a key is configured), 404 (unknown model), 400 (malformed
  JSON, empty ``messages``, a role outside the template, ``max_tokens`` beyond the model
  maximum, a prompt longer than it, ``n`` / ``temperature`` / ``top_p`` out of range), 429 (queue
  full).
* Chat messages are rendered with :func:`unimodal.chat_data.render_prompt` (the SFT rendering).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from prior.pipelines.text_generation import IncrementalDetokenizer
from prior.sampling.block_sampler import BlockSampler
from prior.sampling.config import GenerationConfig
from unimodal.chat_data import IM_END, ROLES, render_prompt


@dataclass
class ServeConfig:
    model_name: str = "cola"
    api_key: str | None = None  # Bearer key required when set
    batching: bool = True
    batch_window_ms: float = 20.0
    max_batch: int = 8
    max_queue: int = 64
    max_n: int = 8


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error"
    )
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


# ----------------------------------------------------------------------------- the engine


@dataclass
class Choice:
    """One row of a sampler batch: a prompt, its settings and seed, and where its text goes."""

    prompt_ids: list[int]
    config: GenerationConfig
    seed: int
    stops: list[str]
    out: queue.Queue = field(default_factory=queue.Queue)  # ("delta", text) ... ("done", text, n, reason)
    cancelled: threading.Event = field(default_factory=threading.Event)


class BatchingEngine:
    """The engine thread: gathers choices with equal settings into one sampler batch."""

    def __init__(self, pipe, cfg: ServeConfig) -> None:
        self.pipe, self.cfg = pipe, cfg
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.max_queue)
        self.deferred: deque = deque()
        self.lock = threading.Lock()  # one batch at a time
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, choices: list[Choice]) -> None:
        for c in choices:
            try:
                self.queue.put_nowait(c)
            except queue.Full as e:
                raise APIError(429, "the server's queue is full; retry later", code="queue_full") from e

    def _next(self, timeout: float | None) -> Choice | None:
        if self.deferred:
            return self.deferred.popleft()
        try:
            return (
                self.queue.get(timeout=timeout) if timeout is None or timeout > 0 else self.queue.get_nowait()
            )
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            batch, skipped = [first], []
            if self.cfg.batching:
                deadline = time.monotonic() + self.cfg.batch_window_ms / 1000
                while len(batch) < self.cfg.max_batch:
                    item = self._next(deadline - time.monotonic())
                    if item is None:
                        break
                    (batch if item.config == first.config else skipped).append(item)
            self.deferred.extend(skipped)
            self._run([c for c in batch if not c.cancelled.is_set()])

    def _run(self, batch: list[Choice]) -> None:
        if not batch:
            return
        text = self.pipe.text_modality
        try:
            sampler = BlockSampler(text, self.pipe.prior, self.pipe.scheduler, batch[0].config)
            gens = [torch.Generator().manual_seed(c.seed) for c in batch]
            detok = IncrementalDetokenizer(
                len(batch), lambda ids: text.detokenize([ids], skip_special_tokens=True)[0]
            )
            shown, done = [0] * len(batch), [False] * len(batch)
            with torch.no_grad():
                for out in sampler.stream([c.prompt_ids for c in batch], generator=gens):
                    for i, c in enumerate(batch):
                        if done[i]:
                            continue
                        detok.add(i, out.token_ids[i])
                        full, cut = detok.texts[i], _first_stop(detok.texts[i], c.stops)
                        end = len(full) if cut is None else cut
                        safe = (
                            end if cut is not None or out.finished[i] else max(shown[i], end - _hold(c.stops))
                        )
                        if safe > shown[i] and not c.cancelled.is_set():
                            c.out.put(("delta", full[shown[i] : safe]))
                            shown[i] = safe
                        if cut is not None or out.finished[i]:
                            done[i] = True
                            c.out.put(("done", full[:end], len(detok.token_ids[i]), "stop"))
            for i, c in enumerate(batch):
                if not done[i]:
                    full = detok.texts[i]
                    if len(full) > shown[i]:
                        c.out.put(("delta", full[shown[i] :]))
                    c.out.put(("done", full, len(detok.token_ids[i]), "length"))
        except Exception as e:  # one batch's failure is reported to its requests, the engine goes on
            for c in batch:
                c.out.put(("error", f"{type(e).__name__}: {e}"))


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and text.find(s) >= 0]
    return min(hits) if hits else None


def _hold(stops: list[str]) -> int:
    """Characters held back while streaming, so a stop string split over blocks is never sent."""
    return max((len(s) - 1 for s in stops), default=0)


# ----------------------------------------------------------------------------- requests


class Message(BaseModel):
    role: str
    content: str


class _Common(BaseModel):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class ChatRequest(_Common):
    messages: list[Message]


class CompletionRequest(_Common):
    prompt: str


def create_app(pipe, cfg: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``pipe`` (a ColaTextPipeline)."""
    cfg = cfg or ServeConfig()
    engine = BatchingEngine(pipe, cfg)
    app = FastAPI(title="unimodal: Cola DLM (OpenAI-compatible)")
    app.state.engine = engine
    max_tokens = pipe.text_modality.max_tokens

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(
            400, f"invalid request: {first.get('msg', 'malformed body')}", where, "invalid_request"
        )

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        wrong_key = request.headers.get("authorization", "") != f"Bearer {cfg.api_key}"
        if cfg.api_key and request.url.path.startswith("/v1") and wrong_key:
            return error_response(
                401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key"
            )
        return await call_next(request)

    def settings(req: _Common, prompt_len: int) -> GenerationConfig:
        if req.model != cfg.model_name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server serves {cfg.model_name!r}",
                "model",
                "model_not_found",
            )
        if not 1 <= req.n <= cfg.max_n:
            raise APIError(400, f"n must be in [1, {cfg.max_n}], got {req.n}", "n")
        if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
            raise APIError(400, f"temperature must be in [0, 2], got {req.temperature}", "temperature")
        if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
            raise APIError(400, f"top_p must be in (0, 1], got {req.top_p}", "top_p")
        if req.max_tokens is not None and not 1 <= req.max_tokens <= max_tokens:
            raise APIError(
                400,
                f"max_tokens must be in [1, {max_tokens}] (the model maximum), got {req.max_tokens}",
                "max_tokens",
            )
        if prompt_len >= max_tokens:
            raise APIError(
                400, f"the prompt is {prompt_len} tokens; the model maximum is {max_tokens}", "messages"
            )
        overrides = {"max_new_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p}
        return pipe.resolve_generation_config(None, **{k: v for k, v in overrides.items() if v is not None})

    def serve(req: _Common, prompt_ids: list[int], extra_stops: list[str], kind: str):
        config = settings(req, len(prompt_ids))
        stops = ([req.stop] if isinstance(req.stop, str) else list(req.stop or [])) + extra_stops
        seed = req.seed if req.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        choices = [Choice(prompt_ids, config, seed + i, stops) for i in range(req.n)]
        engine.submit(choices)
        ident, created = f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(_events(choices, ident, created, kind), media_type="text/event-stream")
        results = [_collect(c) for c in choices]
        completion = sum(r[1] for r in results)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                 "total_tokens": len(prompt_ids) * req.n + completion}  # fmt: skip
        if kind == "chatcmpl":
            items = [{"index": i, "message": {"role": "assistant", "content": t.strip()}, "finish_reason": f}
                     for i, (t, _, f) in enumerate(results)]  # fmt: skip
            return {"id": ident, "object": "chat.completion", "created": created, "model": cfg.model_name,
                    "choices": items, "usage": usage}  # fmt: skip
        items = [
            {"index": i, "text": t, "finish_reason": f, "logprobs": None}
            for i, (t, _, f) in enumerate(results)
        ]
        return {"id": ident, "object": "text_completion", "created": created, "model": cfg.model_name,
                "choices": items, "usage": usage}  # fmt: skip

    def _events(choices: list[Choice], ident: str, created: int, kind: str):
        obj = "chat.completion.chunk" if kind == "chatcmpl" else "text_completion"
        try:
            for i, c in enumerate(choices):
                while True:
                    msg = c.out.get()
                    if msg[0] == "error":
                        yield f"data: {json.dumps({'error': {'message': msg[1], 'type': 'server_error'}})}\n\n"
                        return
                    finished = msg[0] == "done"
                    piece = "" if finished else msg[1]
                    body = (
                        {"delta": {"content": piece}}
                        if kind == "chatcmpl"
                        else {"text": piece, "logprobs": None}
                    )
                    chunk = {"id": ident, "object": obj, "created": created, "model": cfg.model_name,
                             "choices": [{"index": i, **body, "finish_reason": msg[3] if finished else None}]}  # fmt: skip
                    yield f"data: {json.dumps(chunk)}\n\n"
                    if finished:
                        break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): stop feeding these choices
            for c in choices:
                c.cancelled.set()

    @app.get("/health")
    def health():
        return {"status": "ok", "queued": engine.queue.qsize()}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "owned_by": "unimodal"}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        if not req.messages:
            raise APIError(400, "messages must not be empty", "messages")
        bad = [m.role for m in req.messages if m.role not in ROLES]
        if bad:
            raise APIError(400, f"role {bad[0]!r} is not one of {list(ROLES)}", "messages")
        ids = render_prompt(pipe.tokenizer, [m.model_dump() for m in req.messages])
        return serve(req, ids, [IM_END, "<|im_start|>"], "chatcmpl")

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        return serve(req, pipe.text_modality.prompt_ids([req.prompt])[0], [], "cmpl")

    return app


def _collect(choice: Choice) -> tuple[str, int, str]:
    while True:
        msg = choice.out.get()
        if msg[0] == "error":
            raise APIError(500, msg[1], code="server_error")
        if msg[0] == "done":
            return msg[1], msg[2], msg[3]


__all__ = ["BatchingEngine", "ServeConfig", "create_app"]
