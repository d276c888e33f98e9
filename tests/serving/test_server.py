"""A live server on 127.0.0.1 with the real model: the unchanged openai client, and bad requests."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.real_model
KEY = "test-key"
LONG = "1, 2, 3, 4, 5,"  # greedy SmolLM2 keeps counting: never an early EOS


@pytest.fixture(scope="module")
def server(smollm2_gguf, serve_process):
    proc, base = serve_process(smollm2_gguf, "--api-key", KEY, "--max-concurrent", "3", "--max-body-bytes", "40000",
                        "--max-tokens", "256")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["smol"]


def test_completion_and_usage(client):
    out = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert out.choices[0].text.strip() and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 8 and out.usage.total_tokens == 13


def test_chat_streaming_equals_non_streaming(client):
    messages = [{"role": "user", "content": "Name two planets."}]
    full = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_choices_and_stop(client):
    messages = [{"role": "user", "content": "Count to ten."}]
    free = client.chat.completions.create(model="smol", messages=messages, max_tokens=30, temperature=0)
    text = free.choices[0].message.content
    stop = text.split()[len(text.split()) // 2]  # a word from the middle of the greedy answer
    out = client.chat.completions.create(model="smol", messages=messages, max_tokens=30, temperature=0, n=3,
                                         stop=[stop])
    assert len(out.choices) == 3 and {c.index for c in out.choices} == {0, 1, 2}
    assert {c.message.content for c in out.choices} == {text[:text.index(stop)]}  # greedy: identical, cut
    assert out.choices[0].finish_reason == "stop"
    sampled = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=12, n=3,
                                        temperature=1.0, seed=7)
    assert len({c.text for c in sampled.choices}) > 1  # different seeds per choice


def test_logprobs(client):
    out = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)  # greedy picks the best


def _post(server, path, body, key=KEY, raw=None):
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(f"{server}{path}", content=raw if raw is not None else json.dumps(body), headers=headers,
                      timeout=60)


GOOD = {"model": "smol", "prompt": "Hello", "max_tokens": 2}


@pytest.mark.parametrize("body,raw,key,status,words", [
    (None, b"{not json", KEY, 400, "JSON"),
    ({**GOOD, "max_tokens": "ten"}, None, KEY, 400, "max_tokens"),
    ({**GOOD, "max_tokens": -3}, None, KEY, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 10**9}, None, KEY, 400, "max_tokens"),
    ({**GOOD, "temperature": 99}, None, KEY, 400, "temperature"),
    ({**GOOD, "n": 0}, None, KEY, 400, "n"),
    ({**GOOD, "model": "gpt-4"}, None, KEY, 404, "does not exist"),
    ({**GOOD, "frobnicate": True}, None, KEY, 400, "unknown field 'frobnicate'"),
    ({**GOOD, "prompt": "word " * 9000}, None, KEY, 413, "larger than"),
    ({**GOOD, "prompt": [5] * 8200}, None, KEY, 400, "tokens"),
    (GOOD, None, None, 401, "API key"),
    (GOOD, None, "wrong", 401, "API key"),
    (None, b"{not json", None, 401, "API key"),  # the key is checked before the body is read
    ({**GOOD, "frobnicate": True}, None, "wrong", 401, "API key"),  # no schema details without the key
    ({**GOOD, "prompt": "word " * 9000}, None, None, 401, "API key"),
])
def test_bad_requests_get_json_errors_and_server_keeps_serving(server, client, body, raw, key, status, words):
    response = _post(server, "/v1/completions", body, key, raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words.lower() in error["message"].lower() and error["type"]
    assert client.completions.create(**GOOD).choices[0].text is not None


def test_disconnect_aborts_and_frees_blocks(server):
    body = {"model": "smol", "prompt": LONG, "max_tokens": 200, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data:")
    deadline = time.time() + 20
    while time.time() < deadline:
        metrics = httpx.get(f"{server}/metrics").text
        if 'finish_reason="abort"' in metrics and "lmforge_kv_blocks_used 0.0" in metrics:
            break
        time.sleep(0.2)
    assert 'lmforge_requests_total{finish_reason="abort"}' in metrics
    assert "lmforge_kv_blocks_used 0.0" in metrics


def test_too_many_concurrent_requests_get_429(server):
    body = {"model": "smol", "prompt": LONG, "max_tokens": 120, "stream": True, "temperature": 0}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", f"{server}/v1/completions", json=body, headers=headers) for _ in range(3)]
        opened = [s.__enter__() for s in streams]
        try:
            refused = http.post(f"{server}/v1/completions", json={**GOOD}, headers=headers)
            assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        finally:
            for s in streams:
                s.__exit__(None, None, None)


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(**GOOD)
    text = httpx.get(f"{server}/metrics").text
    for name in ("lmforge_time_to_first_token_seconds_bucket", "lmforge_inter_token_latency_seconds_bucket",
                 "lmforge_generated_tokens_total", "lmforge_running_sequences", "lmforge_waiting_sequences",
                 "lmforge_kv_blocks_used", "lmforge_prefix_cache_hit_rate", "lmforge_semantic_cache_hits_total"):
        assert name in text


def test_sigterm_drains_running_streams(smollm2_gguf, serve_process):
    proc, base = serve_process(smollm2_gguf)
    body = {"model": "smol", "prompt": LONG, "max_tokens": 40, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data:")
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status says SIGTERM
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
