"""An HTTP server for Code Llama that editors and the OpenAI client speak.

    python -m llama.server --ckpt_dir CodeLlama-7b/ --tokenizer_path CodeLlama-7b/tokenizer.model
    torchrun --nproc_per_node 2 -m llama.server --ckpt_dir CodeLlama-13b/ --tokenizer_path ...

Endpoints: POST /v1/completions (with `suffix` or <PRE>/<SUF>/<MID> markers: fill-in-the-middle),
POST /v1/chat/completions, GET /v1/models, llama.cpp's POST /completion, /infill, /tokenize,
/detokenize and GET /props, GET /health, GET /stats, GET /metrics (Prometheus, llama.metrics).
Every answer carries an X-Request-Id header; the log names requests by it.
Under torchrun, rank 0 serves HTTP and every rank runs the same batches (llama.serving).
Needs the server extra: pip install -e '.[server]'.
"""

import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Set

try:  # the request models and the metrics need these (the server extra)
    import prometheus_client  # noqa: F401
    import pydantic  # noqa: F401
except ImportError as e:
    raise ImportError(f"llama.server needs its extra ({e.name} is missing): pip install -e '.[server]'") from e

from llama import protocol
from llama.cli import reports_user_errors
from llama.generation import Llama
from llama.metrics import CONTENT_TYPE, Metrics
from llama.prefix_cache import default_budget_bytes
from llama.protocol import APIError
from llama.serving import QueueFull, Scheduler
from llama.speculative import UNSUPPORTED, unsupported_field


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
BODY_TIMEOUT_S = 30  # a body not received in this time gets 408
DRAIN_BYTES = 64 << 20  # an oversized body is read (and dropped) up to this much, so the client sees its 413
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # an X-Request-Id a client may choose
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/completion", "/infill", "/tokenize",
             "/detokenize", "/props", "/health", "/stats", "/metrics")
QUIET_PATHS = {"/health", "/metrics", "/stats"}  # polled: their successful answers are not logged


class State:
    """What the HTTP handlers need; `scheduler` is None until the model is loaded.

    allowed_hosts: the names a request's Host header may give (None: any, for a server bound to a
    public address on purpose); max_body_bytes: the largest request body read."""

    def __init__(self, model_name: str, api_key: Optional[str], allowed_hosts: Optional[Set[str]] = None,
                 max_body_bytes: int = 1 << 20, debug: bool = False, cors_origins: Sequence[str] = (),
                 max_seq_len: int = 0, max_batch_size: int = 0, aliases: Sequence[str] = ()):
        self.model_name, self.api_key, self.allowed_hosts = model_name, api_key, allowed_hosts
        self.served_names = [model_name] + [a for a in aliases if a != model_name]  # what `model` may say
        self.max_body_bytes, self.debug, self.cors_origins = max_body_bytes, debug, list(cors_origins)
        self.scheduler = None
        self.tokenizer = None
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.metrics = Metrics(ENDPOINTS)
        self.metrics.watch(lambda: self.scheduler.running if self.scheduler else 0,
                           lambda: self.scheduler.queue.qsize() if self.scheduler else 0)


class RequestIds:
    """ASGI middleware: every HTTP request gets an id (the client's X-Request-Id if it is a plain
    token, else a new one) in `request.state.request_id` and the X-Request-Id response header, is
    counted in the metrics by endpoint and status, and gets one log line (but the polls of
    QUIET_PATHS that succeed)."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:24]
        scope.setdefault("state", {})["request_id"] = rid
        status, start = [0], time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.state.metrics.request(scope["path"], status[0])
            if status[0] == 200 and scope["path"] in QUIET_PATHS:
                return
            print(f"llama.server: request {rid} {scope['method']} {scope['path'][:100]} {status[0]} "
                  f"{time.perf_counter() - start:.3f} s", file=sys.stderr)


class Watch:
    """The events of a request's jobs merged into one queue as (job index, event), with the
    metrics of each finished answer recorded as it finishes."""

    def __init__(self, req: protocol.Request, handles: list, arrived: float, metrics: Metrics):
        self.req, self.handles, self.arrived, self.metrics = req, handles, arrived, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.first: List[Optional[float]] = [None] * len(handles)
        self.tasks = [asyncio.ensure_future(self._forward(i, h)) for i, h in enumerate(handles)]

    async def _forward(self, i: int, handle) -> None:
        while True:
            kind, value = await handle.events.get()
            now = time.perf_counter() - self.arrived
            if kind == "text" and self.first[i] is None:
                self.first[i] = now
            if kind == "done":
                self.metrics.answer(value.prompt_tokens, value.completion_tokens,
                                    now if self.first[i] is None else self.first[i], now)
            await self.queue.put((i, (kind, value)))
            if kind != "text":
                return

    def cancel(self) -> None:
        """The client went away: free the rows still running, stop forwarding."""
        for h in self.handles:
            h.cancelled = True
        for t in self.tasks:
            t.cancel()


def allowed_hosts(host: str, extra: Sequence[str]) -> Optional[Set[str]]:
    """The Host names a server bound to `host` answers: the loopback names for a loopback address,
    plus `extra`; None (any) for a public address bound with no --allowed_hosts."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not extra:
        return None
    return LOOPBACK_NAMES | {host} | {h.lower() for h in extra}


def host_name(header: str) -> str:
    """The name of a Host header without its port: "[::1]:8000" -> "::1", "a.b:80" -> "a.b"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def create_app(state: State):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def gate(request, auth: bool = True) -> None:
        """Raise the APIError of a request from an unexpected Host or without the API key."""
        if state.allowed_hosts is not None and host_name(request.headers.get("host", "")) not in state.allowed_hosts:
            raise APIError(421, "this server does not answer for that Host; start it with --allowed_hosts NAME "
                                "to serve that name", type="invalid_request_error", code="misdirected_request")
        if auth and state.api_key:
            given = request.headers.get("authorization", "")
            given = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), state.api_key.encode()):
                raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>' "
                                    "(or 'x-api-key: <key>')", code="invalid_api_key")

    def endpoint(handler: Callable, auth: bool = True) -> Callable:
        """A route: the gate first; any unexpected exception answers a JSON 500 with a request id
        (and one log line) instead of a traceback and a dropped connection."""
        async def route(request):
            try:
                gate(request, auth)
                return await handler(request)
            except APIError as e:
                return error(e)
            except ClientDisconnect:  # it went away while sending: nobody reads an answer
                return Response(status_code=499)
            except Exception as e:  # a bug of ours: never the client's fault, never a plain-text 500
                rid = request.state.request_id
                print(f"llama.server: request {rid} ({request.method} {request.url.path}) failed: "
                      f"{type(e).__name__}: {e}", file=sys.stderr)
                if state.debug:
                    traceback.print_exc()
                return error(APIError(500, f"internal server error (request id {rid}; see the server's log)",
                                      type="server_error", code=rid))
        return route

    async def read_body(request) -> bytes:
        """The body, if it is JSON (415), arrives in time (408) and is not too large (413)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, f"send the request body as JSON with 'Content-Type: application/json' (got "
                                f"{kind or 'none'!r})", type="invalid_request_error")
        limit, chunks, size = state.max_body_bytes, [], 0

        async def receive():
            nonlocal size
            async for chunk in request.stream():  # ClientDisconnect if the client hangs up: see endpoint()
                size += len(chunk)
                if size <= limit:
                    chunks.append(chunk)
                elif size > DRAIN_BYTES:
                    break

        try:
            await asyncio.wait_for(receive(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S} s") from None
        if size > limit:
            raise APIError(413, f"the request body is {size} bytes, more than this server's limit of {limit} "
                                "(start it with a larger --max_request_mb)", code="request_too_large")
        return b"".join(chunks)

    def request_of(raw: bytes, parse: Callable, rid: str) -> protocol.Request:
        """Decode, check and tokenize a request (CPU work: run off the event loop)."""
        req = parse(protocol.parse_json_body(raw), state.tokenizer, state.max_seq_len, state.served_names)
        req.id = rid
        for job in req.jobs:
            job.id = rid
            field = state.scheduler.engine.speculator and unsupported_field(job.params)
            if field:
                raise APIError(400, f"{field}: {UNSUPPORTED}", param=field)
        return req

    def loaded() -> None:
        if state.scheduler is None:
            raise APIError(503, "the model is loading; try again shortly", type="unavailable_error")

    async def serve(request, parse: Callable):
        loaded()
        arrived = time.perf_counter()
        raw = await read_body(request)
        req = await run_in_threadpool(request_of, raw, parse, request.state.request_id)
        handles = []
        try:
            for job in req.jobs:
                handles.append(state.scheduler.submit(job, asyncio.get_running_loop()))
        except QueueFull:
            for h in handles:
                h.cancelled = True
            raise APIError(503, "the server is busy: too many requests are waiting; retry later",
                           type="unavailable_error", code="queue_full") from None
        watch = Watch(req, handles, arrived, state.metrics)
        if req.stream:
            return StreamingResponse(events(watch), media_type="text/event-stream")
        results = await wait(request, watch)
        if results is None:  # the client went away: nobody reads this
            return Response(status_code=499)
        if isinstance(results, APIError):
            return error(results)
        return JSONResponse(protocol.completion_response(req, results, state.model_name))

    async def disconnected(request) -> None:
        """Returns when the client hangs up (the body has been read: the next message says so)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def wait(request, watch: Watch):
        """Each job's Result, or an APIError; None if the client went away (the jobs are cancelled)."""
        gone = asyncio.ensure_future(disconnected(request))
        results: List[Optional[object]] = [None] * len(watch.handles)
        try:
            while any(r is None for r in results):
                event = asyncio.ensure_future(watch.queue.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    watch.cancel()
                    return None
                i, (kind, value) = event.result()
                if kind == "done":
                    results[i] = value
                if kind == "error":
                    watch.cancel()
                    return APIError(500, value, type="server_error")
            return results
        finally:
            gone.cancel()

    async def events(watch: Watch):
        """Server-sent events: a chunk per piece of text of any choice, each choice's last with its
        finish reason; then the usage chunk if asked (stream_options.include_usage), then [DONE]."""
        req, finished = watch.req, False
        first = [True] * len(watch.handles)
        results: List[Optional[object]] = [None] * len(watch.handles)
        try:
            while any(r is None for r in results):
                i, (kind, value) = await watch.queue.get()
                if kind == "error":
                    yield f"data: {json.dumps(APIError(500, value, type='server_error').body())}\n\n"
                    finished = True
                    return
                chunk = protocol.stream_chunk(req, req.jobs[i], state.model_name, value if kind == "text" else "",
                                              finish=value if kind == "done" else None, first=first[i])
                first[i] = False
                if kind == "done":
                    results[i] = value
                yield f"data: {json.dumps(chunk)}\n\n"
            finished = True
            if req.include_usage:
                yield f"data: {json.dumps(protocol.usage_chunk(req, results, state.model_name))}\n\n"
            if req.api not in ("infill", "completion"):
                yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client hung up: free its rows at the next step
                watch.cancel()

    async def answer_off_loop(request, handle: Callable) -> JSONResponse:
        """The JSON answer of handle(body, tokenizer), decoded and run off the event loop."""
        loaded()
        raw = await read_body(request)
        return JSONResponse(await run_in_threadpool(lambda: handle(protocol.parse_json_body(raw), state.tokenizer)))

    async def completions(request):
        return await serve(request, protocol.parse_completion)

    async def chat(request):
        return await serve(request, protocol.parse_chat)

    async def infill(request):
        return await serve(request, protocol.parse_infill)

    async def llama_completion(request):
        return await serve(request, protocol.parse_llama_completion)

    async def tokenize(request):
        return await answer_off_loop(request, protocol.tokenize)

    async def detokenize(request):
        return await answer_off_loop(request, protocol.detokenize)

    async def props(request):
        """llama.cpp's /props: the context, the slots (rows), the defaults of /completion and /infill."""
        return JSONResponse({
            "default_generation_settings": {"n_ctx": state.max_seq_len, "params": {
                "temperature": 0.8, "top_p": 0.95, "top_k": 0, "min_p": 0.0, "n_predict": -1, "n_probs": 0,
                "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": -1}},
            "total_slots": state.max_batch_size, "model_path": state.model_name,
            "is_loading": state.scheduler is None,
        })

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "meta",
             "max_model_len": state.max_seq_len, "context_length": state.max_seq_len}]})

    async def metrics(request):
        return Response(state.metrics.text(), media_type=CONTENT_TYPE)

    async def health(request):
        if state.scheduler is None:
            return JSONResponse({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    async def stats(request):
        s = state.scheduler
        if s is None:
            return JSONResponse({"status": "loading"})
        return JSONResponse({"requests": s.stats.requests, "largest_batch": s.stats.largest_batch,
                             "steps_by_batch_size": s.stats.steps_by_rows, "cancelled": s.stats.cancelled,
                             "queued": s.queue.qsize(), "running": s.running,
                             "prefill_chunks": s.stats.prefill_chunks,
                             "prefix_cache": s.engine.prefix_cache.stats() if s.engine.prefix_cache else None})

    async def http_error(request, exc: HTTPException):
        return error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              type="invalid_request_error"))

    routes = [
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
        Route("/infill", endpoint(infill), methods=["POST"]),
        Route("/completion", endpoint(llama_completion), methods=["POST"]),
        Route("/tokenize", endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize), methods=["POST"]),
        Route("/props", endpoint(props), methods=["GET"]),
        Route("/metrics", endpoint(metrics), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/health", endpoint(health, auth=False), methods=["GET"]),
        Route("/stats", endpoint(stats), methods=["GET"]),
    ]
    middleware = [Middleware(RequestIds, state=state)]
    if state.cors_origins:  # browsers may call from these origins (preflights are answered before the gate)
        middleware.append(Middleware(CORSMiddleware, allow_origins=state.cors_origins, allow_methods=["*"],
                                     allow_headers=["*"], expose_headers=["X-Request-Id"]))
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, middleware=middleware)


def start_http(app, host: str, port: int):
    """uvicorn on a background thread; returns the server once it listens (exits if it cannot)."""
    import uvicorn

    # Idle keep-alive connections close after 5 s; at shutdown, connections still open (a client
    # that sent half a body and went silent) are dropped after 3 s.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_keep_alive=5, timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            sys.exit(f"llama.server: could not listen on {host}:{port} (is the port in use?)")
        time.sleep(0.02)
    return server, thread


# Prompt tokens per chunk of a prefill beside running streams: measured on the CPU study model
# (benchmarks/server.py --editor times chunk sizes; see BENCHMARKS.md): larger chunks buy little
# more prefill throughput for a proportionally longer wait of every running stream.
PREFILL_CHUNK = 512


@reports_user_errors("python -m llama.server")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--tokenizer_path", default=None,
                        help="default: the tokenizer the checkpoint carries (tokenizer.model, tokenizer.json, "
                             "or the GGUF's own vocabulary)")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_seq_len", type=int, default=4096, help="prompt + answer, in tokens")
    parser.add_argument("--max_batch_size", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max_queue", type=int, default=64, help="waiting requests beyond which 503 is answered")
    parser.add_argument("--api-key", "--api_key", dest="api_key", default=os.environ.get("LLAMA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' or 'x-api-key: KEY' on every endpoint but "
                             "/health (default: $LLAMA_API_KEY)")
    parser.add_argument("--allowed_hosts", nargs="*", default=[],
                        help="Host names to answer besides the bound address (others get 421; a server bound "
                             "to a public address with none given answers any)")
    parser.add_argument("--max_request_mb", type=float, default=None,
                        help="largest request body (413 beyond); default: room for a prompt of max_seq_len")
    parser.add_argument("--debug", action="store_true", help="log tracebacks of internal errors")
    parser.add_argument("--cors_origins", nargs="*", default=[],
                        help="origins whose browser pages may call the server (CORS), e.g. http://localhost:3000 "
                             "or '*'; default: none")
    parser.add_argument("--served_model_name", nargs="+", default=None, metavar="NAME",
                        help="the names a request's `model` may give, the first one reported by /v1/models "
                             "(default: the checkpoint's folder name, and --ckpt_dir as given); others get 404")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--compile", action="store_true", help="compile the decode step (see README)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="weight-only quantization of the projections (see README)")
    parser.add_argument("--group_size", type=int, default=None, help="int4 group size (default: see README)")
    parser.add_argument("--prefix_cache_mb", type=float, default=None,
                        help="MiB per process of prompts' keys and values kept for prompts that start alike "
                             "(default: a quarter of a full batch's KV cache; 0: off)")
    parser.add_argument("--prefill_chunk", type=int, default=PREFILL_CHUNK,
                        help="prompt tokens prefilled per decode step while other requests stream "
                             f"(default {PREFILL_CHUNK})")
    parser.add_argument("--speculative", default=None,
                        help='speculative decoding: "ngram" (prompt lookup) or a draft checkpoint (see README)')
    parser.add_argument("--speculative_tokens", type=int, default=None,
                        help="tokens proposed per step (default: adaptive)")
    a = parser.parse_args(argv)
    if a.prefix_cache_mb is not None and not a.prefix_cache_mb >= 0:
        parser.error(f"--prefix_cache_mb must be >= 0 (0 turns the prefix cache off), not {a.prefix_cache_mb}")
    if a.prefill_chunk < 1:
        parser.error(f"--prefill_chunk must be a positive number of tokens, not {a.prefill_chunk}")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        sys.exit("llama.server needs its extra: pip install -e '.[server]'")

    if a.api_key is not None and not a.api_key.strip():
        sys.exit("llama.server: the API key is empty (--api-key or LLAMA_API_KEY); give a real key, or leave "
                 "both unset to serve without one")
    max_mb = a.max_request_mb if a.max_request_mb is not None else max(1.0, a.max_seq_len * 64 / 2**20)
    rank = int(os.environ.get("RANK", 0))
    names = a.served_model_name or [Path(a.ckpt_dir).resolve().name, a.ckpt_dir]
    state = State(names[0], a.api_key, allowed_hosts(a.host, a.allowed_hosts), int(max_mb * 2**20), a.debug,
                  a.cors_origins, a.max_seq_len, a.max_batch_size, aliases=names[1:])
    server = thread = None
    if rank == 0:
        server, thread = start_http(create_app(state), a.host, a.port)
        print(f"llama.server: listening on http://{a.host}:{a.port} (loading {a.ckpt_dir})", file=sys.stderr)
    generator = Llama.build(a.ckpt_dir, a.tokenizer_path,
                            a.max_seq_len, a.max_batch_size, dtype=a.dtype, compile=a.compile,
                            quantize=a.quantize, group_size=a.group_size,
                            speculative=a.speculative, speculative_tokens=a.speculative_tokens)
    if a.prefix_cache_mb is None:  # the same on every rank: each holds its shard of the same blocks
        budget = default_budget_bytes(generator.model.new_cache().nbytes(a.max_batch_size, a.max_seq_len))
    else:
        budget = int(a.prefix_cache_mb * 2**20)
    generator.engine.use_prefix_cache(budget)
    scheduler = Scheduler(generator.engine, generator.tokenizer, max_queue=a.max_queue, prefill_chunk=a.prefill_chunk)

    def stop(signum, frame):
        scheduler.shutdown()  # rank 0 tells the others at the end of the current step
        if server is not None:
            server.should_exit = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    state.tokenizer, state.max_seq_len = generator.tokenizer, a.max_seq_len
    scheduler.metrics = state.metrics
    cache = generator.engine.prefix_cache
    if cache is not None and state.metrics is not None:  # read when /metrics is scraped
        state.metrics.prefix_cache_hit_ratio.set_function(lambda: cache.hit_tokens / max(cache.lookup_tokens, 1))
        state.metrics.kv_blocks_in_use.set_function(lambda: cache.blocks)
    spec = generator.engine.speculative_stats
    if spec is not None and state.metrics is not None:
        state.metrics.speculative_acceptance_rate.set_function(lambda: spec.acceptance_rate)
        state.metrics.speculative_tokens_per_forward.set_function(lambda: spec.tokens_per_forward)
    state.scheduler = scheduler
    if rank == 0:
        print("llama.server: ready", file=sys.stderr)
    scheduler.loop()
    if thread is not None:
        server.should_exit = True
        thread.join(timeout=5)


if __name__ == "__main__":
    main()
