"""An HTTP server for Code Llama that editors and the OpenAI client speak.

    python -m llama.server --ckpt_dir CodeLlama-7b/ --tokenizer_path CodeLlama-7b/tokenizer.model
    torchrun --nproc_per_node 2 -m llama.server --ckpt_dir CodeLlama-13b/ --tokenizer_path ...

Endpoints: POST /v1/completions (with `suffix` or <PRE>/<SUF>/<MID> markers: fill-in-the-middle),
POST /v1/chat/completions, GET /v1/models, POST /infill (llama.cpp), GET /health, GET /stats.
Under torchrun, rank 0 serves HTTP and every rank runs the same batches (llama.serving).
Needs the server extra: pip install -e '.[server]'.
"""

import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence, Set

from llama import protocol
from llama.generation import Llama
from llama.prefix_cache import default_budget_bytes
from llama.protocol import APIError
from llama.serving import QueueFull, Scheduler


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
BODY_TIMEOUT_S = 30  # a body not received in this time gets 408
DRAIN_BYTES = 64 << 20  # an oversized body is read (and dropped) up to this much, so the client sees its 413


class State:
    """What the HTTP handlers need; `scheduler` is None until the model is loaded.

    allowed_hosts: the names a request's Host header may give (None: any, for a server bound to a
    public address on purpose); max_body_bytes: the largest request body read."""

    def __init__(self, model_name: str, api_key: Optional[str], allowed_hosts: Optional[Set[str]] = None,
                 max_body_bytes: int = 1 << 20, debug: bool = False):
        self.model_name, self.api_key, self.allowed_hosts = model_name, api_key, allowed_hosts
        self.max_body_bytes, self.debug = max_body_bytes, debug
        self.scheduler = None
        self.tokenizer = None
        self.max_seq_len = 0


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
                rid = uuid.uuid4().hex[:12]
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

    def job_of(raw: bytes, parse: Callable):
        """Decode, check and tokenize a request (CPU work: run off the event loop)."""
        return parse(protocol.parse_json_body(raw), state.tokenizer, state.max_seq_len)

    async def serve(request, parse: Callable):
        if state.scheduler is None:
            raise APIError(503, "the model is loading; try again shortly", type="unavailable_error")
        raw = await read_body(request)
        job = await run_in_threadpool(job_of, raw, parse)
        try:
            handle = state.scheduler.submit(job, asyncio.get_running_loop())
        except QueueFull:
            raise APIError(503, "the server is busy: too many requests are waiting; retry later",
                           type="unavailable_error", code="queue_full") from None
        if job.stream:
            return StreamingResponse(events(handle), media_type="text/event-stream")
        result = await wait(request, handle)
        if result is None:  # the client went away: nobody reads this
            return Response(status_code=499)
        if isinstance(result, APIError):
            return error(result)
        return JSONResponse(protocol.completion_response(job, result, state.model_name))

    async def disconnected(request) -> None:
        """Returns when the client hangs up (the body has been read: the next message says so)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def wait(request, handle):
        """The job's Result, or an APIError; None if the client went away (the job is cancelled)."""
        gone = asyncio.ensure_future(disconnected(request))
        try:
            while True:
                event = asyncio.ensure_future(handle.events.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    handle.cancelled = True
                    return None
                kind, value = event.result()
                if kind == "done":
                    return value
                if kind == "error":
                    return APIError(500, value, type="server_error")
        finally:
            gone.cancel()

    async def events(handle):
        """Server-sent events: a chunk per piece of text, the last with the finish reason."""
        job, first, finished = handle.job, True, False
        try:
            while True:
                kind, value = await handle.events.get()
                if kind == "error":
                    yield f"data: {json.dumps(APIError(500, value, type='server_error').body())}\n\n"
                    finished = True
                    return
                chunk = protocol.stream_chunk(job, state.model_name, value if kind == "text" else "",
                                              finish=value if kind == "done" else None, first=first)
                first = False
                yield f"data: {json.dumps(chunk)}\n\n"
                if kind == "done":
                    finished = True
                    if job.api != "infill":
                        yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:  # the client hung up: free its row at the next step
                handle.cancelled = True

    async def completions(request):
        return await serve(request, protocol.parse_completion)

    async def chat(request):
        return await serve(request, protocol.parse_chat)

    async def infill(request):
        return await serve(request, protocol.parse_infill)

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "meta"}]})

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
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/health", endpoint(health, auth=False), methods=["GET"]),
        Route("/stats", endpoint(stats), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


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
    state = State(Path(a.ckpt_dir).resolve().name, a.api_key, allowed_hosts(a.host, a.allowed_hosts),
                  int(max_mb * 2**20), a.debug)
    server = thread = None
    if rank == 0:
        server, thread = start_http(create_app(state), a.host, a.port)
        print(f"llama.server: listening on http://{a.host}:{a.port} (loading {a.ckpt_dir})", file=sys.stderr)
    generator = Llama.build(a.ckpt_dir, a.tokenizer_path,
                            a.max_seq_len, a.max_batch_size, dtype=a.dtype, compile=a.compile,
                            quantize=a.quantize, group_size=a.group_size)
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
    state.scheduler = scheduler
    if rank == 0:
        print("llama.server: ready", file=sys.stderr)
    scheduler.loop()
    if thread is not None:
        server.should_exit = True
        thread.join(timeout=5)


if __name__ == "__main__":
    main()
