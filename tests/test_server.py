"""The HTTP server on 127.0.0.1, called with the official openai client and plain HTTP."""

import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from device import need_processes  # noqa: E402
from servers import KEY, free_port, output, server_cmd, start, stop  # noqa: E402

PROMPTS = ["def fibonacci(n: int) -> int:", "import os", "The quick brown fox", "x", "for i in range(10):",
           "SELECT name FROM users", "class Stack:", "Hello world"]


@pytest.fixture(scope="module")
def server(tiny_dir):
    port = free_port()
    proc = start(server_cmd(tiny_dir, port, "--max_seq_len", 256, "--max_batch_size", 4, "--served_model_name",
                            tiny_dir.name, "tiny"), port, env={"LLAMA_API_KEY": KEY})
    yield f"http://127.0.0.1:{port}"
    assert stop(proc) == 0, "SIGTERM stops the server cleanly"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def post(server, path, body, key=KEY, **kw):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(f"{server}{path}", content=json.dumps(body) if not isinstance(body, str) else body,
                      headers=headers, timeout=60, **kw)


def stats(server) -> dict:
    r = httpx.get(f"{server}/stats", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    return r.json()


def expected_tokens(generator, tokens, n):
    """Greedy tokens cut where the server always stops: EOS, <EOT> (and <step>)."""
    tok = generator.tokenizer
    out = generator.generate([tokens], n, temperature=0, stop_token=-1)[0][0]
    stops = {tok.eos_id, tok.eot_id, tok.step_id}
    return next((out[:i] for i, t in enumerate(out) if t in stops), out)


def expected_completion(generator, prompt, n):
    return generator.tokenizer.decode(expected_tokens(generator, generator.tokenizer.encode(prompt, True, False), n))


def expected_infill(generator, prefix, suffix, n):
    from llama.formats import infilling_prompt_tokens

    tokens = infilling_prompt_tokens(generator.tokenizer, prefix, suffix)
    return generator.tokenizer.decode_infilling(expected_tokens(generator, tokens, n))


def test_health_and_models(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    models = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["object"] == "list" and models["data"][0]["id"].startswith("tiny_mp1")


def test_completion_with_openai_client(client, generator):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == expected_completion(generator, PROMPTS[0], 12)
    assert r.usage.prompt_tokens == len(generator.tokenizer.encode(PROMPTS[0], True, False))
    assert r.choices[0].finish_reason in ("length", "stop")


def test_streamed_completion_joins_to_the_answer(client, generator):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected_completion(generator, PROMPTS[1], 16)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_suffix_is_fill_in_the_middle(client, generator):
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    r = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=10, temperature=0)
    assert r.choices[0].text == expected_infill(generator, prefix, suffix, 10)


def test_client_built_marker_prompt_is_infilling(server, generator):
    """Editors send "<PRE> {prefix} <SUF>{suffix} <MID>": served as the infilling it stands for."""
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    r = post(server, "/v1/completions", {"prompt": f"<PRE> {prefix} <SUF>{suffix} <MID>", "max_tokens": 10,
                                         "temperature": 0}).json()
    assert r["choices"][0]["text"] == expected_infill(generator, prefix, suffix, 10)
    assert "<EOT>" not in r["choices"][0]["text"]


def test_chat_with_openai_client(client, generator):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    want = generator.chat_completion([messages], temperature=0, max_gen_len=12)[0]["generation"]["content"]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_stop_strings_cut_the_text(client, generator):
    full = expected_completion(generator, PROMPTS[0], 20)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]


def test_echo_and_logprobs(server, generator):
    r = post(server, "/v1/completions", {"prompt": "import os", "max_tokens": 5, "temperature": 0, "echo": True,
                                         "logprobs": 1}).json()
    choice = choice = r["choices"][0]
    assert choice["text"] == "import os" + expected_completion(generator, "import os", 5)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == r["usage"]["completion_tokens"]
    assert all(x < 0 for x in lp["token_logprobs"])


def test_llama_cpp_infill(server, generator):
    body = {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n    return c\n",
            "input_extra": [{"filename": "util.py", "text": "import math"}], "n_predict": 8, "temperature": 0}
    r = post(server, "/infill", body).json()
    assert r["content"] == expected_infill(generator, "import math\ndef add(a, b):\n    ", "\n    return c\n", 8)
    assert r["stop"] is True and r["stop_type"] in ("eos", "limit") and "model" in r
    assert post(server, "/infill", {**body, "n_predict": 0}).json()["content"] == ""
    events = [json.loads(line[6:]) for line in post(server, "/infill", {**body, "stream": True}).text.splitlines()
              if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == r["content"] and events[-1]["stop"] is True


def test_api_key_is_required(server):
    assert post(server, "/v1/completions", {"prompt": "x"}, key=None).status_code == 401
    r = post(server, "/v1/completions", {"prompt": "x"}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),  # n >= 2 is served (issue 18)
    ("/v1/completions", {"prompt": "x " * 400}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "messages"),
    ("/infill", {"input_prefix": 3}, 400, "input_prefix"),
    ("/v1/nothing", {}, 404, None),
])
def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(server, client, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and error["param"] == param and set(error) == {"message", "type", "param", "code"}
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0).choices[0].text is not None


def test_concurrent_clients_share_batches(server, client, generator):
    """Eight clients at once: each gets its own answer, and requests were decoded together."""
    before = stats(server)
    barrier = threading.Barrier(8)

    def ask(prompt):
        barrier.wait()
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, PROMPTS))
    assert answers == [expected_completion(generator, p, 24) for p in PROMPTS]
    after = stats(server)

    def shared_steps(stats):  # decode steps that ran several requests' rows together
        return sum(n for rows, n in stats["steps_by_batch_size"].items() if int(rows) > 1)

    assert shared_steps(after) - shared_steps(before) >= 20
    assert after["largest_batch"] == 4  # max_batch_size


def test_client_hanging_up_frees_its_row(server, client):
    before = stats(server)["cancelled"]
    with httpx.stream("POST", f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "import os", "max_tokens": 240, "temperature": 0, "stream": True,
                            "stop": ["\x00never"]}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 10
    while stats(server)["cancelled"] == before and time.time() < deadline:
        time.sleep(0.05)
    after = stats(server)
    assert after["cancelled"] == before + 1 and after["running"] == 0
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0).choices


def test_load_run_loses_nothing(server, generator):
    """200 requests from 8 clients, streamed and not: every one answered, and answered right."""
    expected = {p: expected_completion(generator, p, 6) for p in PROMPTS}

    def ask(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": i % 3 == 0}
        r = post(server, "/v1/completions", body)
        if body["stream"]:
            chunks = [json.loads(l[6:]) for l in r.text.splitlines() if l.startswith("data: {")]
            text = "".join(c["choices"][0]["text"] for c in chunks)
        else:
            text = r.json()["choices"][0]["text"]
        return r.status_code, text == expected[prompt]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(200)))
    assert results == [(200, True)] * 200


def test_full_queue_answers_503(tiny_dir):
    port = free_port()
    proc = start(server_cmd(tiny_dir, port, "--max_seq_len", 256, "--max_batch_size", 1, "--max_queue", 1), port)
    try:
        def ask(_):
            return httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                              json={"prompt": "x", "max_tokens": 200, "temperature": 0, "stop": ["\x00"]}).status_code

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(ask, range(6)))
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    finally:
        assert stop(proc, signal.SIGINT) == 0, "Ctrl-C stops the server cleanly"


def test_model_parallel_server_under_torchrun(tiny_mp2_dir, generator):
    """torchrun --nproc_per_node 2 -m llama.server: rank 0 serves, both ranks run the batches."""
    need_processes(2)
    port = free_port()
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  *server_cmd(tiny_mp2_dir, port, "--max_seq_len", 256, "--max_batch_size", 4,
                              "--served_model_name", "m")[1:]], port)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda p: c.completions.create(model="m", prompt=p, max_tokens=12, temperature=0)
                                    .choices[0].text, PROMPTS[:4]))
        assert answers == [expected_completion(generator, p, 12) for p in PROMPTS[:4]]
        chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, temperature=0, stream=True))
        want = generator.chat_completion([[{"role": "user", "content": "hi"}]], temperature=0, max_gen_len=8)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want[0]["generation"]["content"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    out = output(proc)
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out, out[-2000:]  # the ranks exit cleanly
