"""``consa serve`` over real loopback HTTP (127.0.0.1, httpx and the ``openai`` client): OpenAI's
completions and chat answers and streams, greedy tokens equal to ``consa.generate``, a table of bad
requests (each a 4xx with one message, the server still up), 429 + Retry-After past the queue, a client
that disconnects frees its slot, SIGTERM drains and exits 0, and bad command lines are one error line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install 'consa[serve,test]')")
pytest.importorskip("starlette", reason="consa serve needs the serve extra (pip install 'consa[serve]')")
pytest.importorskip("uvicorn", reason="consa serve needs the serve extra (pip install 'consa[serve]')")

import consa  # noqa: E402
from consa.allocation import Allocation  # noqa: E402
from consa.cli import main  # noqa: E402
from consa.commands.serve import servable  # noqa: E402
from consa.serving.scheduler import EngineThread, Scheduler  # noqa: E402
from consa.serving.server import App, BackgroundServer  # noqa: E402
from consa.tiny import tiny_model  # noqa: E402

CONTEXT = 4096
VOCAB = 300
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen3 with a byte-level BPE tokenizer (chat template included) and a head-wise
    hybrid allocation beside it."""
    from consa.data.tokenizer import load_tokenizer, train_tokenizer

    d = tmp_path_factory.mktemp("served")
    train_tokenizer(["The quick brown fox jumps over the lazy dog. Hello world, a tiny corpus."] * 20, VOCAB, d)
    tok = load_tokenizer(d)
    model = tiny_model("qwen3", vocab_size=VOCAB, num_layers=3, max_position_embeddings=CONTEXT)
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(d)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    shape = consa.model_shape(model)
    Allocation("kv_head", shape, 4, ((True, False), (False, True), (False, False)), 1).save(d / "allocation.json")
    return d


def _load(model_dir):
    model = consa.load(model_dir)
    servable(model, model_dir, str(model_dir / "allocation.json"))
    return model


@pytest.fixture(scope="module")
def server(model_dir):
    """An in-process server (2 slots, 2 waiting) on a free loopback port."""
    from consa.data.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    model = _load(model_dir)
    sched = Scheduler(model, num_slots=2, max_len=CONTEXT, prefill_tokens=16, max_queue=2)
    engine = EngineThread(sched).start()
    app = App(engine, model_name="tiny", tokenizer=load_tokenizer(model_dir), eos=(0,), max_len=CONTEXT)
    with BackgroundServer(app.starlette()) as srv:
        yield srv.url
    assert not engine.alive()  # the app's shutdown stopped the engine


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def _events(lines) -> list:
    """The data of an SSE stream: JSON objects, then the literal [DONE]."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- answers -------------------------------------------------------------------------------------------
def test_greedy_tokens_equal_generate_under_concurrency(server, model_dir):
    """Six prompts of mixed lengths at once through 2 slots (the queue and the batch both in play): each
    answer's tokens are ``consa.generate``'s on that prompt alone, and the text is their decoding."""
    from consa.data.tokenizer import load_tokenizer

    ref, tok = _load(model_dir), load_tokenizer(model_dir)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 40, 7, 21, 1, 33)]
    want = []
    for p in prompts:
        out = consa.generate(ref, torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=0, pad_token_id=0)
        want.append(out[0, len(p):].tolist())

    async def ask(client, p):
        for _ in range(200):  # 2 running + 2 waiting: the rest are told to come back
            r = await client.post("/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 12, "temperature": 0})
            if r.status_code != 429:
                return r
            await asyncio.sleep(float(r.headers["Retry-After"]) / 20)
        raise AssertionError("never admitted")

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(*(ask(client, p) for p in prompts))

    for p, w, r in zip(prompts, want, asyncio.run(all_at_once())):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == w
        assert choice["finish_reason"] == ("stop" if w[-1] == 0 and len(w) < 12 else "length")
        assert choice["text"] == tok.decode(w, skip_special_tokens=True)
        assert r.json()["usage"] == {"prompt_tokens": len(p), "completion_tokens": len(w), "total_tokens": len(p) + len(w)}


def test_openai_client_completion_chat_and_streams(server, model_dir):
    openai = pytest.importorskip("openai", reason="needs the openai package (the test extra)")
    from consa.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    whole = client.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0)
    assert whole.choices[0].text == tok.decode(whole.choices[0].token_ids, skip_special_tokens=True)
    assert whole.usage.prompt_tokens == len(tok("Hello world").input_ids)
    parts = list(client.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids
    assert chat.usage.prompt_tokens == len(ids)
    stream = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_stream_wire_format_and_stop_strings(server, model_dir):
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60,
                      json={"prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.iter_lines())
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
    assert sum(len(e["choices"][0]["token_ids"]) for e in events[:-1]) == 5
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]].count("length") == 1
    # a stop string cuts the text before it and ends the request with "stop"
    full = httpx.post(f"{server}/v1/completions", json={"prompt": "Hello", "max_tokens": 20, "temperature": 0, "ignore_eos": True},
                      timeout=60).json()["choices"][0]["text"]
    stop = next((full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2]), None)
    if stop is None:
        pytest.skip("this random model's text has no usable stop string")
    cut = httpx.post(f"{server}/v1/completions", json={"prompt": "Hello", "max_tokens": 20, "temperature": 0, "ignore_eos": True,
                                                       "stop": [stop]}, timeout=60).json()["choices"][0]
    assert (cut["text"], cut["finish_reason"]) == (full[: full.find(stop)], "stop")


def test_seeded_sampling_repeats(server):
    body = {"prompt": [9, 8, 7], "max_tokens": 10, "temperature": 1.5, "seed": 11}
    a, b = (httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]["token_ids"] for _ in range(2))
    assert a == b


# ---- bad requests: each one 4xx, one message, the server still up ---------------------------------------
LONG = list(range(1, 60)) * 70  # 4130 tokens > the 4096 context

BAD = [  # (method, path, body: dict / raw bytes, status, message fragment)
    ("POST", "/v1/completions", b"{bad json", 400, "not valid JSON"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("POST", "/v1/completions", {"max_tokens": 3}, 400, "'prompt' is required"),
    ("POST", "/v1/completions", {"prompt": 123}, 400, "'prompt' must be a string or a list of token ids"),
    ("POST", "/v1/completions", {"prompt": []}, 400, "non-empty list of token ids"),
    ("POST", "/v1/completions", {"prompt": [1, "a"]}, 400, "a string or a non-empty list of token ids"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("POST", "/v1/completions", {"prompt": [5, VOCAB]}, 400, "outside the vocabulary"),
    ("POST", "/v1/completions", {"prompt": "", "max_tokens": 3}, 400, "'prompt' is empty"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' must be at least 1"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "'max_tokens' must be at least 1"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "'max_tokens' must be an integer"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": True}, 400, "'max_tokens' must be an integer"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "'max_tokens' must be an integer"),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "'temperature' must be in [0.0, 2.0]"),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "'top_p' must be in (0.0, 1.0]"),
    ("POST", "/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "'stream' must be true or false"),
    ("POST", "/v1/completions", {"prompt": "hi", "stream_options": 1}, 400, "'stream_options' must be an object"),
    ("POST", "/v1/completions", {"prompt": "hi", "stop": 5}, 400, "'stop' must be a string or a list"),
    ("POST", "/v1/completions", {"prompt": "hi", "seed": "x"}, 400, "'seed' must be an integer"),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 2}, 400, "'n'=2 is not supported"),
    ("POST", "/v1/completions", {"prompt": "hi", "logprobs": 5}, 400, "'logprobs'=5 is not supported"),
    ("POST", "/v1/completions", {"prompt": "hi", "model": 7}, 400, "'model' must be a string"),
    ("POST", "/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "the model 'gpt-4' does not exist"),
    ("POST", "/v1/completions", {"prompt": LONG}, 400, "this model's context is 4096 tokens"),
    ("POST", "/v1/completions", {"prompt": [5] * 4000, "max_tokens": 97}, 400, "exceeds this model's context of 4096"),
    ("POST", "/v1/chat/completions", {"max_tokens": 3}, 400, "'messages' must be a non-empty list"),
    ("POST", "/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "with a string 'role'"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content must be a string"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "only text parts"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "'max_completion_tokens' must be at least 1"),
    ("GET", "/v1/completions", None, 405, "Method Not Allowed"),
    ("GET", "/v2/nothing", None, 404, "Not Found"),
]


@pytest.mark.parametrize("method,path,body,status,fragment", BAD, ids=[f"{i}-{r[3]}" for i, r in enumerate(BAD)])
def test_bad_request(server, method, path, body, status, fragment):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    r = httpx.request(method, f"{server}{path}", timeout=30, **kw)
    assert r.status_code == status
    err = r.json()["error"]
    assert fragment in err["message"] and "\n" not in err["message"]
    assert httpx.get(f"{server}/health", timeout=10).json()["status"] == "ok"


def test_no_tokenizer_and_no_chat_template(model_dir):
    """A model served without a tokenizer takes token ids only; a tokenizer without a chat template
    refuses chat: each one clear 400."""
    from consa.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    tok.chat_template = None
    for tokenizer, fragment in ((None, "no tokenizer"), (tok, "no chat template")):
        sched = Scheduler(_load(model_dir), num_slots=1, max_len=64)
        app = App(EngineThread(sched).start(), model_name="tiny", tokenizer=tokenizer, eos=(0,), max_len=64)
        with BackgroundServer(app.starlette()) as srv:
            r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
            assert r.status_code == 400 and fragment in r.json()["error"]["message"]
            if tokenizer is None:
                r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi"}, timeout=30)
                assert r.status_code == 400 and "send 'prompt' as a list of token ids" in r.json()["error"]["message"]
                r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": [4, 5], "max_tokens": 2}, timeout=30)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == ""


def test_a_stopped_engine_answers_503(model_dir):
    sched = Scheduler(_load(model_dir), num_slots=1, max_len=64)
    engine = EngineThread(sched).start()
    app = App(engine, model_name="tiny", tokenizer=None, eos=(0,), max_len=64)
    with BackgroundServer(app.starlette()) as srv:
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
        engine.stop()
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": [4, 5], "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "stopped" in r.json()["error"]["message"]
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 503


# ---- load ----------------------------------------------------------------------------------------------
def test_full_queue_answers_429_with_retry_after(server):
    """2 slots + 2 waiting: of 8 long requests at once, the ones past capacity get 429 + Retry-After
    at once, the others finish."""

    async def burst():
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            body = {"prompt": [3, 4, 5], "max_tokens": 200, "temperature": 0, "ignore_eos": True}
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(8)))

    codes = [r.status_code for r in asyncio.run(burst())]
    assert codes.count(429) >= 4 and codes.count(200) >= 2 and set(codes) <= {200, 429}
    busy = next(r for r in asyncio.run(burst()) if r.status_code == 429)
    assert busy.headers["Retry-After"] == "1" and "busy" in busy.json()["error"]["message"]
    assert _metric(server, "consa_rejected_requests_total") >= 8


def test_disconnect_frees_the_slot(server):
    """A streaming client that goes away after three chunks: its request is cancelled, its slot free,
    long before its 4000 tokens."""
    before = _metric(server, "consa_generation_tokens_total")
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60,
                      json={"prompt": [3, 4], "max_tokens": 4000, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 5:
                break
    deadline = time.monotonic() + 20
    while httpx.get(f"{server}/health", timeout=10).json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server}/health", timeout=10).json()["running"] == 0
    assert _metric(server, "consa_requests_total{outcome=\"cancelled\"}") >= 1
    assert _metric(server, "consa_generation_tokens_total") - before < 2000


def test_metrics_report_the_engine(server):
    httpx.post(f"{server}/v1/completions", json={"prompt": [7, 8, 9], "max_tokens": 4, "temperature": 0}, timeout=60)
    text = httpx.get(f"{server}/metrics", timeout=10).text
    for name in ("consa_queue_depth", "consa_running_sequences", "consa_kv_slots_used", "consa_kv_slots_total",
                 "consa_generation_tokens_per_second", "consa_time_to_first_token_seconds_bucket",
                 "consa_time_per_output_token_seconds_bucket"):
        assert name in text
    assert _metric(server, "consa_kv_slots_total") == 2
    assert _metric(server, "consa_time_to_first_token_seconds_count") >= 1


# ---- the command ----------------------------------------------------------------------------------------
def _serve(model_dir, *extra, timeout=120):
    """``python -m consa serve`` on a free port; returns (process, url) once it listens."""
    cmd = [sys.executable, "-m", "consa", "serve", "--model", str(model_dir), "--allocation", str(model_dir / "allocation.json"),
           "--port", "0", "--max-batch", "2", "--max-model-len", str(CONTEXT), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on " in line:
            return proc, line.split("listening on ")[1].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"consa serve did not start: {proc.stderr.read()}")


def test_sigterm_finishes_short_requests_cancels_long_ones_and_exits_0(model_dir):
    proc, url = _serve(model_dir, "--shutdown-timeout", "3")
    try:
        short = {"prompt": [3, 4], "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
        long = dict(short, max_tokens=4000)
        with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=60) as rl, \
                httpx.stream("POST", f"{url}/v1/completions", json=short, timeout=60) as rs:
            lines_l, lines_s = rl.iter_lines(), rs.iter_lines()
            next(lines_l), next(lines_s)  # both running
            proc.send_signal(signal.SIGTERM)
            events = _events(lines_s)
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
            with pytest.raises(httpx.TransportError):  # no longer accepting
                httpx.get(f"{url}/health", timeout=5)
            try:
                tail = _events(lines_l)
            except httpx.TransportError:
                tail = []
            assert "[DONE]" not in tail or any("error" in e for e in tail if isinstance(e, dict))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped" in proc.stderr.read()


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


@pytest.mark.parametrize("case", ["missing model", "not a model", "bad allocation file", "allocation of another shape",
                                  "port in use", "bad port", "context too long", "budget too small", "bad max-batch"])
def test_bad_command_line_is_one_error_line(case, model_dir, tmp_path, capsys):
    args = ["serve", "--model", str(model_dir), "--port", "0"]
    held = None
    if case == "missing model":
        args[2] = str(tmp_path / "nowhere")
    elif case == "not a model":
        args[2] = str(tmp_path)
    elif case == "bad allocation file":
        (tmp_path / "a.json").write_text("{not json")
        args += ["--allocation", str(tmp_path / "a.json")]
    elif case == "allocation of another shape":
        Allocation("kv_head", consa.ModelShape(5, 2, 4), 4, ((True, False),) * 5, 0).save(tmp_path / "a.json")
        args += ["--allocation", str(tmp_path / "a.json")]
    elif case == "port in use":
        held = _busy_port()
        args[-1] = str(held.getsockname()[1])
    elif case == "bad port":
        args[-1] = "70000"
    elif case == "context too long":
        args += ["--max-model-len", str(CONTEXT + 1)]
    elif case == "budget too small":
        args += ["--kv-budget-gib", "0.000001"]
    elif case == "bad max-batch":
        args += ["--max-batch", "0"]
    try:
        assert main(args) == 2
    finally:
        if held is not None:
            held.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("consa: error: "), err
