"""The server's OpenAI and llama.cpp fields (issue 18): top logprobs against the model's own
log-softmax, n, seed, stream usage, token-id and list prompts, logit processors, llama.cpp's
/completion, /tokenize, /detokenize, /props; /metrics, X-Request-Id and CORS; bad input on every
new field. One tiny server on 127.0.0.1, a bounded number of requests."""

import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

from device import need_processes  # noqa: E402
from servers import KEY, free_port, output, server_cmd, start, stop  # noqa: E402

from llama.formats import chat_prompt_tokens  # noqa: E402
from llama.server import State, create_app  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "def fibonacci(n: int) -> int:"
DIALOG = [{"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def server(tiny_dir):
    port = free_port()
    proc = start(server_cmd(tiny_dir, port, "--max_seq_len", 256, "--max_batch_size", 4, "--served_model_name",
                            tiny_dir.name, "tiny"), port, env={"LLAMA_API_KEY": KEY})
    proc.url = f"http://127.0.0.1:{port}"
    yield proc
    assert stop(proc) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def post(server, path, body, headers=None) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers={**AUTH, **(headers or {})}, timeout=60)


def greedy(generator, tokens, n):
    """Greedy tokens by the library, cut where the server always stops."""
    tok = generator.tokenizer
    out = generator.generate([tokens], n, temperature=0, stop_token=-1)[0][0]
    stops = {tok.eos_id, tok.eot_id, tok.step_id}
    return next((out[:i] for i, t in enumerate(out) if t in stops), out)


def model_top(generator, tokens, steps, k):
    """[(chosen id, {id: logprob} of the k most likely)] per greedy step, from model.forward on the
    whole sequence each step (no cache, no sampling code)."""
    tokens, out = list(tokens), []
    for _ in range(steps):
        logits = generator.model.forward(torch.tensor([tokens]), 0)[0, -1]
        lp = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(lp, k)
        chosen = int(torch.argmax(lp))
        out.append((chosen, dict(zip(top.indices.tolist(), top.values.tolist()))))
        tokens.append(chosen)
    return out


def assert_close_dicts(got: dict, want: dict):
    assert set(got) == set(want), (got, want)
    for key in want:
        assert math.isclose(got[key], want[key], abs_tol=1e-4), (key, got[key], want[key])


# Top logprobs -----------------------------------------------------------------------------------


def test_completion_top_logprobs_are_the_models_own(server, generator):
    tok = generator.tokenizer
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3}).json()
    lp = r["choices"][0]["logprobs"]
    want = model_top(generator, tok.encode(PROMPT, True, False), len(lp["tokens"]), 3)
    assert len(lp["tokens"]) == r["usage"]["completion_tokens"] > 0
    for step, (chosen, top) in enumerate(want):
        assert lp["tokens"][step] == tok.token_piece(chosen)
        assert math.isclose(lp["token_logprobs"][step], top[chosen], abs_tol=1e-4)
        assert_close_dicts(lp["top_logprobs"][step], {tok.token_piece(i): v for i, v in top.items()})
    text = r["choices"][0]["text"]
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(o <= len(text) for o in lp["text_offset"])


def test_chat_top_logprobs_are_the_models_own(client, generator):
    tok = generator.tokenizer
    r = client.chat.completions.create(model="tiny", messages=DIALOG, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    want = model_top(generator, chat_prompt_tokens(tok, DIALOG), len(content), 2)
    assert len(content) == r.usage.completion_tokens > 0
    for entry, (chosen, top) in zip(content, want):
        assert entry.token == tok.token_piece(chosen)
        assert_close_dicts({a.token: a.logprob for a in entry.top_logprobs},
                           {tok.token_piece(i): v for i, v in top.items()})


def test_streamed_logprobs_come_with_the_last_chunk(server, client):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2}
    whole = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    events = [json.loads(line[6:]) for line in post(server, "/v1/completions", {**body, "stream": True}).text.splitlines()
              if line.startswith("data: {")]
    assert [e["choices"][0]["logprobs"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1]["choices"][0]["logprobs"] == whole
    chat = dict(model="tiny", messages=DIALOG, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    want = client.chat.completions.create(**chat).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert chunks[-1].choices[0].logprobs.content == want


def test_llama_cpp_completion_with_n_probs(server, generator):
    tok = generator.tokenizer
    tokens = tok.encode(PROMPT, True, False)
    r = post(server, "/completion", {"prompt": tokens, "n_predict": 4, "temperature": 0, "n_probs": 2}).json()
    assert r["content"] == tok.decode(greedy(generator, tokens, 4)) and r["tokens_evaluated"] == len(tokens)
    probs = r["completion_probabilities"]
    for entry, (chosen, top) in zip(probs, model_top(generator, tokens, len(probs), 2)):
        assert entry["id"] == chosen
        assert_close_dicts({a["id"]: a["logprob"] for a in entry["top_logprobs"]}, top)
    text = post(server, "/completion", {"prompt": PROMPT, "n_predict": 4, "temperature": 0}).json()
    assert text["content"] == r["content"] and "completion_probabilities" not in text
    infill = post(server, "/infill", {"input_prefix": "def f(x):\n    ", "input_suffix": "\n    return y",
                                      "n_predict": 3, "temperature": 0, "n_probs": 1}).json()
    probs = infill["completion_probabilities"]
    assert len(probs) == infill["tokens_predicted"] and all(len(p["top_logprobs"]) == 1 for p in probs)
    assert all(p["top_logprobs"][0]["id"] == p["id"] for p in probs)  # greedy: the most likely one


# n, seed, prompts -------------------------------------------------------------------------------


def test_n_greedy_gives_equal_choices(client, generator):
    tokens = greedy(generator, generator.tokenizer.encode(PROMPT, True, False), 8)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [generator.tokenizer.decode(tokens)] * 3
    assert r.usage.prompt_tokens == len(generator.tokenizer.encode(PROMPT, True, False))  # counted once
    assert r.usage.completion_tokens == 3 * len(tokens)


def test_seed_gives_the_same_choices_again(client):
    def ask(seed):
        r = client.chat.completions.create(model="tiny", messages=DIALOG, max_tokens=12, temperature=1, n=3,
                                           seed=seed)
        return [c.message.content for c in r.choices]

    first = ask(1234)
    assert ask(1234) == first
    assert len(set(first)) > 1, "the n choices of one seed differ from each other"
    assert ask(99) != first


def test_seeded_answer_does_not_depend_on_other_requests(client):
    def seeded():
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1, seed=7).choices[0].text

    def other(i):
        return client.completions.create(model="tiny", prompt=f"x{i}", max_tokens=24, temperature=1).choices[0].text

    alone = seeded()
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(other, i) for i in range(3)]
        together = pool.submit(seeded).result()
        [f.result() for f in others]
    assert together == alone


def test_seeded_choices_under_model_parallelism(tiny_mp2_dir, server):
    """torchrun --nproc_per_node 2: every rank draws a seeded row's tokens from its own generator
    alike, so the answer is the single-process server's (a rank that drew otherwise would feed its
    half of the model other tokens, and the text would change)."""
    need_processes(2)
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1, "n": 2, "seed": 11}
    want = [c["text"] for c in post(server, "/v1/completions", body).json()["choices"]]
    port = free_port()
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  *server_cmd(tiny_mp2_dir, port, "--max_seq_len", 256, "--max_batch_size", 4)[1:]], port)
    try:
        proc.url = f"http://127.0.0.1:{port}"
        got = [c["text"] for c in post(proc, "/v1/completions", body).json()["choices"]]
    finally:
        stop(proc, timeout=60)
    assert got == want and want[0] != want[1]


def test_best_of_answers_the_likeliest_candidates(server):
    """best_of=3, n=1 with a seed draws the same three candidates as n=3 with that seed, and
    answers the one of the highest mean token log-probability."""
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1, "seed": 5}
    three = post(server, "/v1/completions", {**body, "n": 3, "logprobs": 0}).json()["choices"]
    means = [sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"]) for c in three]
    r = post(server, "/v1/completions", {**body, "best_of": 3}).json()
    assert [c["index"] for c in r["choices"]] == [0] and r["choices"][0]["logprobs"] is None
    assert r["choices"][0]["text"] == three[means.index(max(means))]["text"]
    assert len(set(c["text"] for c in three)) > 1
    two = post(server, "/v1/completions", {**body, "best_of": 3, "n": 2, "logprobs": 1}).json()["choices"]
    order = sorted(range(3), key=lambda i: -means[i])
    assert [c["text"] for c in two] == [three[i]["text"] for i in order[:2]]
    assert two[0]["logprobs"]["token_logprobs"] == three[order[0]]["logprobs"]["token_logprobs"]


def test_token_and_list_prompts_in_openai_order(server, generator):
    tok = generator.tokenizer
    prompts = ["import os", "class Stack:"]
    ids = [tok.encode(p, True, False) for p in prompts]
    want = [tok.decode(greedy(generator, t, 6)) for t in ids]
    r = post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0, "n": 2}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in r["choices"]] == [want[0], want[0], want[1], want[1]]
    assert r["usage"]["prompt_tokens"] == sum(len(t) for t in ids)
    r = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0}).json()
    assert [c["text"] for c in r["choices"]] == want
    r = post(server, "/v1/completions", {"prompt": ids[0], "max_tokens": 6, "temperature": 0, "echo": True}).json()
    assert r["choices"][0]["text"] == tok.decode(ids[0]) + want[0]


# Logit processors -------------------------------------------------------------------------------


def test_logit_bias_forces_a_token(server, generator):
    tok = generator.tokenizer
    forced = tok.encode("x", False, False)[-1]
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 1, "seed": 3,
                                         "logit_bias": {str(forced): 100}}).json()
    assert r["choices"][0]["text"] == tok.decode([forced] * 5)


def test_top_k_one_and_min_p_one_are_greedy(server, generator):
    want = generator.tokenizer.decode(greedy(generator, generator.tokenizer.encode(PROMPT, True, False), 10))
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 10, "temperature": 1, **extra}).json()
        assert r["choices"][0]["text"] == want, extra


def test_penalties_follow_their_definitions(server, generator):
    """Greedy with a penalty equals greedy over the logits penalised by hand, step by step."""
    tok = generator.tokenizer
    prompt = tok.encode(PROMPT, True, False)
    plain = tok.decode(greedy(generator, prompt, 8))
    for field, value in (("frequency_penalty", 2.0), ("presence_penalty", 2.0), ("repetition_penalty", 3.0)):
        tokens, made = list(prompt), []
        for _ in range(8):
            logits = generator.model.forward(torch.tensor([tokens]), 0)[0, -1].float().clone()
            for t in set(made if field != "repetition_penalty" else tokens):
                if field == "frequency_penalty":
                    logits[t] -= value * made.count(t)
                elif field == "presence_penalty":
                    logits[t] -= value
                else:  # HF/vLLM: prompt and output tokens
                    logits[t] = logits[t] / value if logits[t] > 0 else logits[t] * value
            t = int(torch.argmax(logits))
            if t in (tok.eos_id, tok.eot_id):
                break
            made.append(t)
            tokens.append(t)
        r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, field: value})
        assert r.json()["choices"][0]["text"] == tok.decode(made) != plain, field


# Streams ----------------------------------------------------------------------------------------


def test_usage_chunk_arrives_last(client, generator):
    stream = client.chat.completions.create(model="tiny", messages=DIALOG, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, n=2)
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    want = generator.chat_completion([DIALOG], temperature=0, max_gen_len=6)[0]["generation"]["content"]
    for i in (0, 1):
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1] if ch.choices[0].index == i) == want
    assert chunks[-1].usage.prompt_tokens == len(chat_prompt_tokens(generator.tokenizer, DIALOG))
    text = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
    assert text[-1].choices == [] and text[-1].usage.total_tokens > 0


# llama.cpp endpoints, models --------------------------------------------------------------------


def test_tokenize_detokenize_props_models(server, generator):
    tok = generator.tokenizer
    r = post(server, "/tokenize", {"content": PROMPT}).json()
    assert r["tokens"] == tok.encode(PROMPT, False, False)
    assert post(server, "/tokenize", {"content": PROMPT, "add_special": True}).json()["tokens"] == \
        tok.encode(PROMPT, True, False)
    pieces = post(server, "/tokenize", {"content": "import os", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == tok.encode("import os", False, False)
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {"content": tok.decode(r["tokens"])}
    props = httpx.get(f"{server.url}/props", headers=AUTH).json()
    assert props["default_generation_settings"]["n_ctx"] == 256 and props["total_slots"] == 4
    model = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"][0]
    assert model["max_model_len"] == 256


# Operations -------------------------------------------------------------------------------------


def metrics(server) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample, parsed by prometheus_client."""
    r = httpx.get(f"{server.url}/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_move_as_requests_are_served(server, generator):
    before = metrics(server)
    key = ("llama_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    made = 0
    for i in range(3):
        r = post(server, "/v1/completions", {"prompt": f"print({i})", "max_tokens": 5, "temperature": 0}).json()
        made += r["usage"]["completion_tokens"]
    post(server, "/v1/completions", {"prompt": "x", "n": -1})
    after = metrics(server)
    assert after[key] - before.get(key, 0) == 3
    bad = ("llama_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))
    assert after[bad] - before.get(bad, 0) == 1
    assert after[("llama_generation_tokens_total", ())] - before[("llama_generation_tokens_total", ())] == made
    assert after[("llama_prompt_tokens_total", ())] > before[("llama_prompt_tokens_total", ())]
    ttft = ("llama_time_to_first_token_seconds_count", ())
    assert after[ttft] - before[ttft] == 3
    for name in ("llama_requests_running", "llama_requests_waiting", "llama_prefix_cache_hit_ratio",
                 "llama_kv_blocks_in_use", "llama_time_per_output_token_seconds_count"):
        assert (name, ()) in after, name


def test_prefix_cache_gauges_follow_the_cache(server):
    """The same long prompt twice: the second is served from the prefix cache, and /metrics says
    so (blocks held; the hit ratio equals /stats' hit tokens over looked-up tokens)."""
    prompt = "def add(a, b):\n    return a + b\n" * 8  # several 16-token blocks
    for _ in range(2):
        post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})
    after = metrics(server)
    stats = httpx.get(f"{server.url}/stats", headers=AUTH).json()["prefix_cache"]
    assert stats["hit_tokens"] > 0 and after[("llama_kv_blocks_in_use", ())] == stats["blocks"] > 0
    assert after[("llama_prefix_cache_hit_ratio", ())] == pytest.approx(stats["hit_tokens"] / stats["lookup_tokens"])


def test_request_id_header_and_log(server):
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1})
    rid = r.headers["x-request-id"]
    assert len(rid) >= 12 and r.json()["id"] == f"cmpl-{rid}"
    mine = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    assert post(server, "/v1/completions", {"n": 0, "prompt": "x"}).headers["x-request-id"]
    assert f"request {rid} POST /v1/completions 200" in output(server)


def test_cors_is_off_unless_origins_are_given():
    origin = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    from starlette.testclient import TestClient

    closed = TestClient(create_app(State("m", None)))
    assert "access-control-allow-origin" not in closed.options("/v1/completions", headers=origin).headers
    open_ = TestClient(create_app(State("m", None, cors_origins=["http://localhost:3000"])))
    r = open_.options("/v1/completions", headers=origin)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = open_.options("/v1/completions", headers={**origin, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# Bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"prompt": "x", "n": -1}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 100}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": DIALOG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": DIALOG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "seed": "7"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, -3]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "model": "tin"}, 404, "model"),  # a part of a served name is not it
    ("/v1/chat/completions", {"messages": DIALOG, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "best_of": 1, "n": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 3, "stream": True}, 400, "best_of"),
    ("/v1/completions", {"prompt": [1, 5], "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "no_such_field": 1}, 400, "no_such_field"),
    ("/v1/chat/completions", {"messages": DIALOG, "tools": []}, 400, "tools"),
    ("/completion", {"prompt": [], "n_predict": 2}, 400, "prompt"),
    ("/completion", {"prompt": "x", "n_probs": -1}, 400, "n_probs"),
    ("/completion", {"prompt": "x", "seed": "1"}, 400, "seed"),
    ("/completion", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/infill", {"input_prefix": "x", "n_probs": 99}, 400, "n_probs"),
    ("/tokenize", {"content": 5}, 400, "content"),
    ("/detokenize", {"tokens": [10**7]}, 400, "tokens"),
])
def test_bad_new_fields_are_refused_and_the_server_keeps_serving(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["param"] == param and set(error) == {"message", "type", "param", "code"}
    assert param in error["message"]
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200


def test_user_and_huge_seeds_are_accepted(server):
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "user": "someone"}).status_code == 200
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/completion", {"prompt": "x"})):
        for seed in (-10**30, 10**30):
            assert post(server, path, {**body, "max_tokens" if path[1] == "v" else "n_predict": 2,
                                       "seed": seed}).status_code == 200


def test_llama_cpp_completion_stream(server):
    """A stream of /completion chunks ends with stop: true and the whole answer's fields."""
    r = post(server, "/completion", {"prompt": "x", "n_predict": 3, "temperature": 0, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["stop"] is True and "[DONE]" not in r.text
