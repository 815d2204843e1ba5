"""What no client can do to the server: break it (500s, dropped connections), stall others, keep a
row after hanging up, or get past the API key and the Host check."""

import json
import socket
import subprocess
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from servers import KEY, free_port, output, server_cmd, start, stop  # noqa: E402

from llama.tiny import write_tiny_model  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def slow_dir(tmp_path_factory):
    """A tiny model big enough that a long answer takes seconds on one thread (about 10 ms a step)."""
    return write_tiny_model(tmp_path_factory.mktemp("slow"), dim=512, n_layers=8, n_heads=8, n_kv_heads=4)


@pytest.fixture(scope="module")
def server(slow_dir):
    port = free_port()
    proc = start(server_cmd(slow_dir, port, "--max_seq_len", 1200, "--max_batch_size", 4), port,
                 env={"LLAMA_API_KEY": KEY})
    proc.url = f"http://127.0.0.1:{port}"
    yield proc
    assert stop(proc) == 0


def stats(url) -> dict:
    return httpx.get(f"{url}/stats", headers=AUTH).json()


def wait_idle(url, cancelled: int, deadline: float = 10) -> dict:
    """/stats once `cancelled` requests have been cancelled and no row runs (or the deadline passed)."""
    end = time.time() + deadline
    while True:
        s = stats(url)
        if (s["cancelled"] >= cancelled and s["running"] == 0) or time.time() > end:
            return s
        time.sleep(0.05)


@pytest.mark.parametrize("raw, param", [
    ('{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ('{"prompt": "x", "suffix": "\\udc00", "max_tokens": 2}', "suffix"),
])
def test_lone_surrogate_is_a_400_and_the_connection_stays_usable(server, raw, param):
    with httpx.Client(headers=AUTH, timeout=30) as c:
        r = c.post(f"{server.url}/v1/completions", content=raw)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
        assert "surrogate" in r.json()["error"]["message"]
        assert c.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_chat_content_and_infill_fields_with_surrogates_are_400(server):
    bodies = {"/v1/chat/completions": '{"messages": [{"role": "user", "content": "\\ud800"}]}',
              "/infill": '{"input_prefix": "\\udfff", "n_predict": 2}'}
    for path, raw in bodies.items():
        r = httpx.post(f"{server.url}{path}", content=raw, headers=AUTH)
        assert r.status_code == 400, (path, r.text)


def test_deeply_nested_json_is_a_400(server):
    raw = '{"prompt": "x", "a": ' + "[" * 1000 + "]" * 1000 + "}"
    r = httpx.post(f"{server.url}/v1/completions", content=raw, headers=AUTH)
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]


def test_body_must_be_json_and_not_too_large(server):
    r = httpx.post(f"{server.url}/v1/completions", content='{"prompt": "x"}',
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(f"{server.url}/v1/completions", content='{"prompt": "x"}', headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 415  # no Content-Type: what a cross-site "simple" POST can send
    big = json.dumps({"prompt": "x" * (20 << 20)})
    r = httpx.post(f"{server.url}/v1/completions", content=big, headers=AUTH, timeout=60)
    assert r.status_code == 413 and "max_request_mb" in r.json()["error"]["message"]


def test_many_or_long_stop_strings_are_refused(server):
    for stop_strings in (["s%d" % i for i in range(20_000)], ["x" * 257], ["a"] * 17):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "stop": stop_strings}, headers=AUTH,
                       timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    r = httpx.post(f"{server.url}/v1/completions", headers=AUTH,
                   json={"prompt": "x", "max_tokens": 2, "stop": ["y" * 256] * 16})
    assert r.status_code == 200


def health_latency_while(url, work) -> float:
    """The slowest /health answer while `work` runs on another thread."""
    worker = threading.Thread(target=work)
    worker.start()
    worst = 0.0
    while worker.is_alive():
        t = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        worst = max(worst, time.perf_counter() - t)
        time.sleep(0.01)
    worker.join()
    return worst


def test_a_huge_prompt_does_not_stall_others(server):
    """A 20 MB body is refused as it arrives; a prompt just under the size limit (tokenized off the
    event loop) is refused for its length. Neither holds up a /health check beside it for long
    (the event loop used to tokenize: 2.9 s of stall for 20 MB)."""
    codes = []

    def huge():
        codes.append(httpx.post(f"{server.url}/v1/completions", content=json.dumps({"prompt": "def f(x): " * (2 << 20)}),
                                headers=AUTH, timeout=60).status_code)
        codes.append(httpx.post(f"{server.url}/v1/completions", content=json.dumps({"prompt": "def f(x): " * 7000}),
                                headers=AUTH, timeout=60).status_code)

    assert health_latency_while(server.url, huge) < 1.0
    assert codes == [413, 400]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_that_hangs_up_frees_its_row_at_once(server, stream):
    """1000 tokens take seconds on this model; a client gone after 0.5 s must not keep its row."""
    before = stats(server.url)
    steps_before = sum(before["steps_by_batch_size"].values())
    body = {"prompt": "import os", "max_tokens": 1000, "temperature": 0, "stop": ["\x00"], "stream": stream}
    if stream:  # read for 0.5 s, then close the connection
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=30) as r:
            end = time.time() + 0.5
            for line in r.iter_lines():
                if time.time() > end:
                    break
    else:  # a client timeout, as an editor's cancelled completion
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=0.5)
    after = wait_idle(server.url, before["cancelled"] + 1)
    assert after["cancelled"] == before["cancelled"] + 1 and after["running"] == 0
    assert sum(after["steps_by_batch_size"].values()) - steps_before < 500
    assert "Traceback" not in output(server)


def test_auth_covers_everything_but_health(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for path in ("/stats", "/v1/models"):
        assert httpx.get(f"{server.url}{path}").status_code == 401
        assert httpx.get(f"{server.url}{path}", headers={"x-api-key": KEY}).status_code == 200


def test_unknown_host_is_refused(server):
    r = httpx.get(f"{server.url}/v1/models", headers={**AUTH, "Host": "evil.example"})
    assert r.status_code == 421
    assert httpx.get(f"{server.url}/v1/models", headers={**AUTH, "Host": f"localhost:{server.url.rsplit(':', 1)[1]}"}).status_code == 200


def test_empty_api_key_is_a_start_up_error(tiny_dir):
    proc = subprocess.run(server_cmd(tiny_dir, free_port(), "--api-key", ""), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "API key is empty" in proc.stderr


def test_half_sent_body_does_not_delay_shutdown(tiny_dir):
    port = free_port()
    proc = start(server_cmd(tiny_dir, port, "--max_seq_len", 128), port)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        time.sleep(0.3)
        t = time.time()
        assert stop(proc, timeout=30) == 0
        assert time.time() - t < 8
