"""`scratchgpt serve` as a real server process on 127.0.0.1, driven by the official openai client,
raw HTTP and headless Chromium, against a small model trained here for a few seconds."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the openai client is a dev dependency: pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx", reason="httpx is a dev dependency: pip install -e '.[dev]'")

from helpers import one_thread, sharp_model  # noqa: E402
from pydoc_data.topics import topics  # noqa: E402
from scratchgpt import GPTModel, generate, save_checkpoint  # noqa: E402
from scratchgpt.serve.text import token_text  # noqa: E402

KEY = "sk-test-0123456789"
SRC = Path(__file__).resolve().parents[1] / "src"
STOPS = ["\nUser:", "\nSystem:", "\nAssistant:"]  # the transcript template's


PASSAGE = " ".join(topics["while"].split())  # the Python docs on `while`, whitespace folded


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A 2-layer GPT trained for a few seconds to recite the start of the docs' `while` section: its
    greedy choices are real, varied text and not near-ties of random weights. Saved for the server."""
    passage = tokenizer.encode(PASSAGE)[:120]
    ids = torch.tensor(passage * 40)
    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 50257, "context_length": 1024, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
                      "drop_rate": 0.0, "qkv_bias": True})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with one_thread():
        for _ in range(40):
            starts = torch.randint(0, len(ids) - 33, (8,))
            batch = torch.stack([ids[s:s + 33] for s in starts])
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert loss.item() < 3  # it has learned the passage: a uniform guess scores 10.8
    path = tmp_path_factory.mktemp("serve") / "tiny.pt"
    save_checkpoint(path, model)
    return model.eval(), path


class Server:
    """A `scratchgpt serve` process and the ways the tests talk to it."""

    def __init__(self, args: list[str]):
        # OpenMP workers that spin between parallel regions fight the test's own threads for the cores
        # (2 on CI): each barrier can then cost a scheduler time slice. Passive workers sleep instead.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               "OMP_WAIT_POLICY": "passive"}
        self.proc = subprocess.Popen([sys.executable, "-m", "scratchgpt.cli", "serve", "--port", "0", *args],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if " ready at " in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120):
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        self.url = re.search(r"ready at (http://\S+)", "".join(self.lines)).group(1)
        self.http = httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = self.http.get("/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """The metrics once nothing runs or waits."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["scratchgpt_requests_running"] == 0 and m["scratchgpt_requests_waiting"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server still busy after {timeout}s: {m}")
            time.sleep(0.01)

    def stop(self) -> int:
        self.proc.send_signal(2)  # Ctrl-C
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def server(trained):
    _, path = trained
    server = Server(["--checkpoint", str(path), "--max-batch", "8", "--max-queue", "32", "--api-key", KEY])
    yield server
    assert server.stop() == 0, "".join(server.lines)


def sse(response) -> list:
    """The data payloads of an event stream: dicts, and the final "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected stream line {line!r}"
    return events


def reference(model, prompt_ids, max_tokens, **sampling) -> list[int]:
    """What scratchgpt.generate produces alone (stopping at <|endoftext|>, as the server does)."""
    with one_thread():
        out = generate(model, torch.tensor([prompt_ids]), max_tokens, model.cfg.context_length, eos_id=50256,
                       **sampling)
    return out[0, len(prompt_ids):].tolist()


# --------------------------------------------------------------------------- completions and chat

def test_completions_through_the_openai_client_equal_generate(server, trained, tokenizer):
    model, _ = trained
    prompt = "The with statement is used to"
    expected = reference(model, tokenizer.encode(prompt), 20, temperature=0.0)
    whole = server.client.completions.create(model=str(trained[1]), prompt=prompt, max_tokens=20, temperature=0)
    assert whole.choices[0].text == tokenizer.decode(expected)
    assert whole.choices[0].finish_reason == ("length" if len(expected) == 20 else "stop")
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert whole.usage.completion_tokens == 20
    assert whole.object == "text_completion" and whole.model == str(trained[1])

    chunks = list(server.client.completions.create(model=str(trained[1]), prompt=prompt, max_tokens=20,
                                                   temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert len(chunks) > 5  # it streamed, token by token


def test_the_stream_protocol_on_the_wire(server):
    body = {"prompt": "In Python,", "max_tokens": 12, "temperature": 0, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
    assert all("usage" not in e for e in events[:-1])  # no usage chunk unless asked for
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] == "length"

    body["stream_options"] = {"include_usage": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        events = sse(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 12,
                                                                   "total_tokens": 15}
    assert all(e["usage"] is None for e in events[:-2])


def test_chat_uses_the_transcript_template(server, trained, tokenizer):
    model, _ = trained
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a list?"}]
    prompt = "System: Answer briefly.\nUser: What is a list?\nAssistant:"
    tokenized = server.http.post("/tokenize", json={"messages": messages}).json()
    assert tokenized["tokens"] == tokenizer.encode(prompt)

    chat = server.client.chat.completions.create(model=str(trained[1]), messages=messages, max_tokens=30,
                                                 temperature=0)
    completion = server.client.completions.create(model=str(trained[1]), prompt=prompt, max_tokens=30,
                                                  temperature=0, stop=STOPS)
    text = tokenizer.decode(reference(model, tokenizer.encode(prompt), 30, temperature=0.0))
    expected = min((text.find(s) for s in STOPS if s in text), default=len(text))
    assert chat.choices[0].message.content == completion.choices[0].text == text[:expected]
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"

    chunks = list(server.client.chat.completions.create(model=str(trained[1]), messages=messages, max_tokens=30,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_n_logprobs_echo_stop_and_seed(server, trained, tokenizer):
    model, path = trained
    prompt = "A class definition"
    ids = tokenizer.encode(prompt)
    create = server.client.completions.create

    many = create(model=str(path), prompt=[ids, ids], n=2, max_tokens=10, temperature=1.0, seed=7)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    for c in many.choices:  # choice i of a prompt samples with seed + i
        assert c.text == tokenizer.decode(reference(model, ids, 10, temperature=1.0, seed=7 + c.index % 2))
    assert many.choices[0].text != many.choices[1].text
    again = create(model=str(path), prompt=prompt, max_tokens=10, temperature=1.0, seed=7)
    assert again.choices[0].text == many.choices[0].text

    scored = create(model=str(path), prompt=prompt, max_tokens=6, temperature=0, logprobs=2).choices[0]
    lp = scored.logprobs
    assert "".join(lp.tokens) == scored.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and top[token] == logprob and 2 <= len(top) <= 3
        assert max(top.values()) == logprob  # greedy picked the most likely token

    echoed = create(model=str(path), prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=0).choices[0]
    assert echoed.text == prompt + scored.text
    assert echoed.logprobs.tokens[:len(ids)] == [token_text(tokenizer, t) for t in ids]
    assert echoed.logprobs.token_logprobs[0] is None and echoed.logprobs.token_logprobs[1] < 0
    assert echoed.logprobs.text_offset[len(ids)] == len(prompt)
    scoring = create(model=str(path), prompt=prompt, max_tokens=0, echo=True, logprobs=0).choices[0]
    assert scoring.text == prompt and scoring.finish_reason == "length"
    assert scoring.logprobs.token_logprobs == echoed.logprobs.token_logprobs[:len(ids)]

    long = create(model=str(path), prompt=prompt, max_tokens=40, temperature=0).choices[0].text
    stop = long[len(long) // 2:len(long) // 2 + 3]
    cut = create(model=str(path), prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "zzzz"]).choices[0]
    assert cut.text == long[:long.index(stop)] and cut.finish_reason == "stop"
    streamed = create(model=str(path), prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_split_characters_stream_as_the_whole_answer(server, trained, tokenizer):
    """GPT-2's BPE splits characters across tokens; a stream never sends half of one."""
    prompt = "Unicode: café, naïve, 日本語, emoji 🎉 and"
    for seed in range(8):  # near-uniform sampling meets tokens holding part of a character
        body = dict(prompt=prompt, max_tokens=300, temperature=50.0, seed=seed, logprobs=0, echo=True)
        whole = server.client.completions.create(model=str(trained[1]), **body).choices[0]
        if any(t.startswith("bytes:") for t in whole.logprobs.tokens[len(tokenizer.encode(prompt)):]):
            break
    else:
        pytest.fail("no generated token held part of a character")
    chunks = list(server.client.completions.create(model=str(trained[1]), stream=True, **body))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert whole.text.startswith(prompt)
    # no chunk ends in the middle of a character: each one is valid text on its own
    for c in chunks:
        assert c.choices[0].text.encode("utf-8").decode("utf-8") == c.choices[0].text


# --------------------------------------------------------------------------- batching

def test_concurrent_sequences_equal_each_alone(server, trained, tokenizer):
    """Prompts of different lengths decode in one batch; each equals `generate` alone, token for token,
    with log-probabilities within 1e-4."""
    model, path = trained
    words = PASSAGE.split()
    prompts = [" ".join(words[:n]) for n in (2, 9, 23, 40, 5)]
    options = [dict(temperature=0.0)] * 5 + [dict(temperature=0.9, seed=s) for s in range(5)]
    jobs = [(p, o) for p, o in zip(prompts * 2, options)]
    before = server.wait_idle()

    def ask(job):
        prompt, option = job
        return server.client.completions.create(model=str(path), prompt=prompt, max_tokens=24, logprobs=1,
                                                **option).choices[0]

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    after = server.wait_idle()
    for (prompt, option), answer in zip(jobs, answers):
        ids = tokenizer.encode(prompt)
        expected = reference(model, ids, 24, **option)
        assert answer.logprobs.tokens == [token_text(tokenizer, t) for t in expected]
        with torch.no_grad(), one_thread():
            logprobs = model(torch.tensor([ids + expected]))[0].float().log_softmax(-1)
        want = [logprobs[len(ids) - 1 + i, t].item() for i, t in enumerate(expected)]
        assert answer.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    generated = after["scratchgpt_generation_tokens_total"] - before["scratchgpt_generation_tokens_total"]
    steps = after["scratchgpt_decode_steps_total"] - before["scratchgpt_decode_steps_total"]
    assert generated == 240 and steps < 0.75 * generated  # they really shared decode steps


def test_32_concurrent_mixed_requests_all_complete(server, trained):
    path = str(trained[1])
    prompts = ["Each item", "The module", "An exception is raised when", "Variables"]

    def ask(i):
        prompt, seed = prompts[i % 4], (None if i % 3 == 0 else i)
        sampling = dict(max_tokens=8 + i % 5, temperature=0 if seed is None else 0.8, seed=seed)
        chat, stream = i % 2 == 1, i % 4 >= 2
        if chat:
            result = server.client.chat.completions.create(
                model=path, messages=[{"role": "user", "content": prompt}], stream=stream, **sampling)
            text = ("".join(c.choices[0].delta.content or "" for c in result) if stream
                    else result.choices[0].message.content)
        else:
            result = server.client.completions.create(model=path, prompt=prompt, stream=stream, **sampling)
            text = "".join(c.choices[0].text for c in result) if stream else result.choices[0].text
        return (chat, prompt, tuple(sorted(sampling.items()))), text

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(32)))
    server.wait_idle()
    for (chat, prompt, sampling), text in results:  # each equals the same request made alone
        sampling = dict(sampling)
        if chat:
            alone = server.client.chat.completions.create(
                model=path, messages=[{"role": "user", "content": prompt}], **sampling).choices[0].message.content
        else:
            alone = server.client.completions.create(model=path, prompt=prompt, **sampling).choices[0].text
        assert text == alone
    assert server.http.get("/health").json() == {"status": "ok"}


# --------------------------------------------------------------------------- disconnects

def test_a_disconnect_mid_stream_frees_the_slot(server):
    before = server.wait_idle()
    body = {"prompt": "The for statement", "max_tokens": 1000, "temperature": 0, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines)]
        assert sum(line.startswith("data: ") for line in received) == 3
    after = server.wait_idle()  # closing the response closed the connection
    assert after["scratchgpt_requests_finished_total{finish_reason=\"cancelled\"}"] == \
        before["scratchgpt_requests_finished_total{finish_reason=\"cancelled\"}"] + 1
    assert after["scratchgpt_generation_tokens_total"] - before["scratchgpt_generation_tokens_total"] < 1000
    # freed within one decode step of the cancellation (the engine's own count)
    assert after["scratchgpt_cancel_delay_steps_bucket{le=\"1\"}"] == after["scratchgpt_cancel_delay_steps_count"]


def test_a_client_that_leaves_a_plain_request_is_cancelled(server):
    before = server.wait_idle()
    body = json.dumps({"prompt": "A function", "max_tokens": 1000, "temperature": 0}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while server.metrics()["scratchgpt_requests_running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    after = server.wait_idle()
    assert after["scratchgpt_requests_finished_total{finish_reason=\"cancelled\"}"] == \
        before["scratchgpt_requests_finished_total{finish_reason=\"cancelled\"}"] + 1
    assert after["scratchgpt_generation_tokens_total"] - before["scratchgpt_generation_tokens_total"] < 1000


# --------------------------------------------------------------------------- bad input

COMPLETION_ERRORS = [
    ({"prompt": "x", "foo": 1, "bar": 2}, "foo", "unsupported parameters: foo, bar"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "only 0 (no effect)"),
    ({"prompt": "x", "temperature": -1}, "temperature", "temperature must be a number >= 0"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "temperature must be a number >= 0"),
    ({"prompt": "x", "top_p": 0}, "top_p", "top_p must be a number in (0, 1]"),
    ({"prompt": "x", "top_k": 0}, "top_k", "top_k must be an integer >= 1"),
    ({"prompt": "x", "n": 0}, "n", "n must be an integer in 1..128"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "max_tokens must be an integer >= 0"),
    ({"prompt": "x", "max_tokens": 5000}, "max_tokens",
     "the prompt's 1 tokens plus max_tokens 5000 exceed the model's context of 1024 tokens"),
    ({"prompt": [1] * 1024}, "prompt", "the prompt's 1024 tokens fill the model's context of 1024 tokens"),
    ({"prompt": [5, 50257]}, "prompt", "token id 50257 is outside the vocabulary of 50257 tokens"),
    ({"prompt": [[1, "a"]]}, "prompt", "prompt must be a string, a list of strings, a list of token ids"),
    ({"prompt": []}, "prompt", "prompt must be a string"),
    ({"max_tokens": 3}, "prompt", "prompt is required"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "a list of up to 4"),
    ({"prompt": "x", "logprobs": 6}, "logprobs", "logprobs must be an integer in 0..5"),
    ({"prompt": "x", "logprobs": True}, "logprobs", "logprobs must be an integer"),
    ({"prompt": "x", "echo": "yes"}, "echo", "echo must be a boolean"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
    ({"prompt": "x", "seed": 1.5}, "seed", "seed must be an integer"),
    ({"prompt": "x", "model": 3}, "model", "model must be a string"),
]
CHAT_ERRORS = [
    ({"messages": []}, "messages", "messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "messages[0].content[0] must be a text part"),
    ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo", "unsupported parameter: echo"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "max_completion_tokens": 2},
     "max_completion_tokens", "not both"),
]


@pytest.mark.parametrize("path,body,param,message",
                         [("/v1/completions", *case) for case in COMPLETION_ERRORS]
                         + [("/v1/chat/completions", *case) for case in CHAT_ERRORS])
def test_bad_values_get_400_naming_the_parameter(server, path, body, param, message):
    for stream in (False, True):
        response = server.http.post(path, json={**body, "stream": stream} if "stream_options" not in body else body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert message in error["message"]


def test_every_other_error_is_openai_shaped(server):
    http, url = server.http, server.url

    def error(response, status):
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]

    assert "not valid JSON" in error(http.post("/v1/completions", content=b'{"prompt": '), 400)["message"]
    assert "JSON object" in error(http.post("/v1/completions", json=["prompt"]), 400)["message"]
    assert "API key" in error(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 401)["message"]
    wrong = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer sk-no"})
    assert error(wrong, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert error(http.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404)["code"] == \
        "model_not_found"
    assert error(http.get("/v1/nothing"), 404)["code"] == "unknown_url"
    assert error(http.get("/v1/completions"), 405)
    huge = {"prompt": "x" * (5 * 2**20)}
    assert error(http.post("/v1/completions", json=huge), 413)["code"] == "request_too_large"
    chunked = http.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * (5 * 2**20), b'"}']))
    assert error(chunked, 413)["code"] == "request_too_large"
    assert error(http.post("/detokenize", json={"tokens": [1, 99999]}), 400)["param"] == "tokens"
    with pytest.raises(openai.BadRequestError, match="top_k must be an integer >= 1"):
        server.client.completions.create(model=str(server.client.models.list().data[0].id), prompt="x",
                                         extra_body={"top_k": -2})

    # a full queue: 8 running + 32 waiting fill the server; the next request gets 429
    flood = {"prompt": "x", "n": 40, "max_tokens": 500, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=flood) as response:
        next(response.iter_lines())  # the flood is in
        assert error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}), 429)["code"] == "queue_full"
    assert "41 sequences" in error(http.post("/v1/completions", json={**flood, "n": 41}), 400)["message"]
    server.wait_idle()
    assert http.get("/health").json() == {"status": "ok"}  # nothing above disturbed the server
    assert server.client.completions.create(model=str(server.client.models.list().data[0].id), prompt="x",
                                            max_tokens=2).choices[0].finish_reason in ("length", "stop")


def test_models_tokenize_detokenize_and_metrics(server, trained, tokenizer):
    path = str(trained[1])
    models = server.client.models.list()
    assert [m.id for m in models.data] == [path]
    assert server.client.models.retrieve(path).id == path
    tokens = server.http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens == {"tokens": tokenizer.encode("Hello world"), "count": 2, "max_model_len": 1024}
    assert server.http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    text = httpx.get(server.url + "/metrics").text  # open, as scrapers expect
    for name in ("requests_running", "requests_waiting", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "time_per_output_token_seconds_sum",
                 "request_latency_seconds_count", "requests_finished_total{finish_reason=\"length\"}"):
        assert f"scratchgpt_{name}" in text


@pytest.mark.slow
def test_an_instruction_tuned_checkpoint_chats_in_its_prompt_style(trained, tmp_path, tokenizer):
    from scratchgpt.tasks.instruct import format_prompt

    model, _ = trained
    path = tmp_path / "instruct.pt"
    save_checkpoint(path, model, task={"kind": "instruct", "prompt_style": "alpaca"})
    server = Server(["--checkpoint", str(path), "--api-key", KEY])
    try:
        messages = [{"role": "user", "content": "Reverse these words: a b c"}]
        tokens = server.http.post("/tokenize", json={"messages": messages}).json()["tokens"]
        assert tokens == tokenizer.encode(format_prompt({"instruction": "Reverse these words: a b c"}, "alpaca"))
        refused = server.http.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
        assert refused.status_code == 400 and "'alpaca' instruction prompt" in refused.json()["error"]["message"]
    finally:
        assert server.stop() == 0


def test_a_model_that_fails_to_load_stops_the_server_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    missing = tmp_path / "nope.pt"
    result = subprocess.run([sys.executable, "-m", "scratchgpt.cli", "serve", "--checkpoint", str(missing),
                             "--port", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"scratchgpt serve: error: checkpoint not found: {missing}"]


def test_a_classifier_is_not_served(trained, tmp_path):
    from scratchgpt.checkpoint import shape_for_task

    task = {"kind": "classify", "labels": ["docs", "license"]}
    classifier = shape_for_task(GPTModel(trained[0].cfg), task)  # its head has one output per label
    path = tmp_path / "classifier.pt"
    save_checkpoint(path, classifier, task=task)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "scratchgpt.cli", "serve", "--checkpoint", str(path),
                             "--port", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"scratchgpt serve: error: {path} is a classifier (labels: docs, license); use `scratchgpt classify`"]


# --------------------------------------------------------------------------- loading and mid-stream errors

def test_health_is_503_until_loaded_and_a_mid_stream_error_is_an_event(tokenizer):
    """An in-process server on 127.0.0.1: the model attached late, and one that emits a token id the
    tokenizer does not have (a padded vocabulary) after four good ones."""
    import uvicorn

    from scratchgpt.serve import Engine
    from scratchgpt.serve.api import ServeState, create_app

    model = sharp_model(seed=2, vocab_size=50304, context_length=32, emb_dim=16, n_heads=2, n_layers=1)
    with torch.no_grad():
        for p in model.trf_blocks.parameters():
            p.zero_()  # the blocks add nothing: the logits depend on the position alone
        model.tok_emb.weight.zero_()
        model.pos_emb.weight.zero_()
        model.pos_emb.weight[:4, 0] = 1.0
        model.pos_emb.weight[4:, 1] = 1.0
        model.out_head.weight.zero_()
        model.out_head.weight[64] = model.final_norm(model.pos_emb.weight[0])  # "a" at positions 0..3
        model.out_head.weight[50300] = model.final_norm(model.pos_emb.weight[4])  # then an unknown id
    state = ServeState("crafted")
    uv = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
        assert httpx.get(url + "/health").status_code == 503
        loading = httpx.post(url + "/v1/completions", json={"prompt": "a"})
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "model_loading"
        state.engine = Engine(model, tokenizer)
        assert httpx.get(url + "/health").json() == {"status": "ok"}

        body = {"prompt": [64], "max_tokens": 10, "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            events = sse(response)
        assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "aaaa"
        assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2])
        assert events[-2]["error"]["type"] == "server_error"
        assert "token id 50300, which the tokenizer cannot decode" in events[-2]["error"]["message"]
        assert events[-1] == "[DONE]"
        whole = httpx.post(url + "/v1/completions", json=body)
        assert whole.status_code == 500 and "token id 50300" in whole.json()["error"]["message"]
        assert httpx.post(url + "/v1/completions", json={**body, "max_tokens": 3}).json()["choices"][0]["text"] == "aaa"
    finally:
        uv.should_exit = True
        thread.join(10)
        if state.engine is not None:
            state.engine.close()


# --------------------------------------------------------------------------- the playground, in Chromium

def chromium() -> str:
    for name in (os.environ.get("SCRATCHGPT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium here (apt-get install -y chromium, or set SCRATCHGPT_CHROMIUM)")


def test_the_playground_streams_and_stop_cancels_on_the_server(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    executable = chromium()
    before = server.wait_idle()
    cancelled = 'scratchgpt_requests_finished_total{finish_reason="cancelled"}'

    # seven other users share the batch all along (and slow each step down, so Stop lands mid-answer)
    others_in, others_done = threading.Event(), threading.Event()

    def others():
        body = {"prompt": "x", "n": 7, "max_tokens": 1000, "temperature": 0, "stream": True}
        while not others_done.is_set():
            with server.http.stream("POST", "/v1/completions", json=body) as response:
                for _ in response.iter_lines():
                    others_in.set()
                    if others_done.is_set():
                        return

    load = threading.Thread(target=others)
    load.start()
    assert others_in.wait(60)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 760})
                page.goto(server.url + "/")
                page.fill("#key", KEY)
                page.dispatch_event("#key", "change")
                page.wait_for_function("document.getElementById('model').textContent.includes('context 1024')")

                # errors reach the person
                page.fill("#max_tokens", "5000")
                page.click("#generate")
                page.wait_for_function("document.getElementById('error').textContent.length > 0")
                shown_error = page.text_content("#error")
                assert "400: the prompt's" in shown_error and "max_tokens 5000" in shown_error

                page.fill("#prompt", "The while statement is used")
                page.fill("#max_tokens", "1000")
                page.fill("#temperature", "0")
                page.evaluate("""() => {
                    const completion = document.getElementById('completion');
                    window.lengths = [];
                    new MutationObserver(() => window.lengths.push(completion.textContent.length))
                        .observe(completion, {childList: true, characterData: true, subtree: true});
                }""")
                page.click("#generate")
                page.wait_for_function("window.lengths.length >= 8")
                page.click("#stop")
                page.wait_for_function("document.getElementById('status').textContent.includes('stopped')")
                lengths = page.evaluate("window.lengths")
                assert len(set(lengths)) >= 8 and lengths == sorted(lengths)  # tokens arrived one after another
                assert re.search(r"\d+ tokens · [\d.]+ tokens/s", page.text_content("#status"))
                page.screenshot(path=str(tmp_path / "playground.png"))
                assert page.text_content("#completion").startswith(" for repeated execution")
            finally:
                browser.close()
        deadline = time.monotonic() + 30  # the browser's request was cancelled; the others finish or run on
        while server.metrics()[cancelled] != before[cancelled] + 1:
            assert time.monotonic() < deadline, server.metrics()
            time.sleep(0.01)
    finally:
        others_done.set()
        load.join(60)
    server.wait_idle()
    print(f"screenshot: {tmp_path / 'playground.png'}")
