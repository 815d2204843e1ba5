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
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from llama import protocol
from llama.generation import Llama
from llama.protocol import APIError
from llama.serving import QueueFull, Scheduler


class State:
    """What the HTTP handlers need; `scheduler` is None until the model is loaded."""

    def __init__(self, model_name: str, api_key: Optional[str]):
        self.model_name, self.api_key = model_name, api_key
        self.scheduler = None
        self.tokenizer = None
        self.max_seq_len = 0


def create_app(state: State):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def authorized(request) -> bool:
        if not state.api_key:
            return True
        given = request.headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), state.api_key.encode())

    async def serve(request, parse: Callable):
        if not authorized(request):
            return error(APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key"))
        if state.scheduler is None:
            return error(APIError(503, "the model is loading; try again shortly", type="unavailable_error"))
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(APIError(400, f"the request body is not valid JSON: {e}"))
        try:
            job = parse(body, state.tokenizer, state.max_seq_len)
            handle = state.scheduler.submit(job, asyncio.get_running_loop())
        except APIError as e:
            return error(e)
        except QueueFull:
            return error(APIError(503, "the server is busy: too many requests are waiting; retry later",
                                  type="unavailable_error", code="queue_full"))
        if job.stream:
            return StreamingResponse(events(request, handle), media_type="text/event-stream")
        result = await wait(request, handle)
        if isinstance(result, APIError):
            return error(result)
        return JSONResponse(protocol.completion_response(job, result, state.model_name))

    async def wait(request, handle):
        """The job's Result, or an APIError; None if the client went away."""
        while True:
            try:
                kind, value = await asyncio.wait_for(handle.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    handle.cancelled = True
                    return None
                continue
            if kind == "done":
                return value
            if kind == "error":
                return APIError(500, value, type="server_error")

    async def events(request, handle):
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
        if not authorized(request):
            return error(APIError(401, "invalid or missing API key", code="invalid_api_key"))
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
                             "queued": s.queue.qsize(), "running": s.running})

    async def http_error(request, exc: HTTPException):
        return error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              type="invalid_request_error"))

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/infill", infill, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def start_http(app, host: str, port: int):
    """uvicorn on a background thread; returns the server once it listens (exits if it cannot)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            sys.exit(f"llama.server: could not listen on {host}:{port} (is the port in use?)")
        time.sleep(0.02)
    return server, thread


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--tokenizer_path", default=None, help="default: CKPT_DIR/tokenizer.model")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_seq_len", type=int, default=4096, help="prompt + answer, in tokens")
    parser.add_argument("--max_batch_size", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max_queue", type=int, default=64, help="waiting requests beyond which 503 is answered")
    parser.add_argument("--api-key", "--api_key", dest="api_key", default=os.environ.get("LLAMA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $LLAMA_API_KEY)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--compile", action="store_true", help="compile the decode step (see README)")
    a = parser.parse_args(argv)
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        sys.exit("llama.server needs its extra: pip install -e '.[server]'")

    rank = int(os.environ.get("RANK", 0))
    state = State(Path(a.ckpt_dir).resolve().name, a.api_key)
    server = thread = None
    if rank == 0:
        server, thread = start_http(create_app(state), a.host, a.port)
        print(f"llama.server: listening on http://{a.host}:{a.port} (loading {a.ckpt_dir})", file=sys.stderr)
    generator = Llama.build(a.ckpt_dir, a.tokenizer_path or str(Path(a.ckpt_dir) / "tokenizer.model"),
                            a.max_seq_len, a.max_batch_size, dtype=a.dtype, compile=a.compile)
    scheduler = Scheduler(generator.engine, generator.tokenizer, max_queue=a.max_queue)

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
        thread.join(timeout=10)


if __name__ == "__main__":
    main()
