"""`unimodal serve`: the official openai client on loopback, batching == alone, OpenAI-style errors."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import tiny_pipeline

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from prior.sampling.block_sampler import BlockSampler  # noqa: E402
from prior.sampling.config import GenerationConfig  # noqa: E402
from prior.serving.server import ServeConfig, create_app  # noqa: E402
from unimodal.chat_data import render_prompt  # noqa: E402

KEY = "sk-test"


@pytest.fixture(scope="module")
def server():
    pipe = tiny_pipeline(
        ["Repeat: red cat", "What is 3 + 4?", "Spell: cat", "the cat sat"], perturb_scale=0.05
    )
    pipe.generation_config = GenerationConfig(num_inference_steps=2, max_new_tokens=8)
    app = create_app(pipe, ServeConfig(api_key=KEY, batch_window_ms=50))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield pipe, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def _client(url: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_openai_client_chat_stream_and_completion_match_the_pipeline(server):
    pipe, url = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["cola"]
    messages = [{"role": "user", "content": "Spell: cat"}]
    chat = client.chat.completions.create(
        model="cola", messages=messages, seed=3, temperature=0.8, max_tokens=8
    )
    config = pipe.resolve_generation_config(None, temperature=0.8, max_new_tokens=8)
    ref = BlockSampler(pipe.text_modality, pipe.prior, pipe.scheduler, config).sample(
        [render_prompt(pipe.tokenizer, messages)], generator=[torch.Generator().manual_seed(3)]
    )
    ref_text = pipe.text_modality.detokenize(ref.token_ids)[0].split("<|im_end|>")[0].split("<|im_start|>")[0]
    assert chat.choices[0].message.content == ref_text.strip() and len(ref.token_ids[0]) > 0
    stream = client.chat.completions.create(model="cola", messages=messages, seed=3, temperature=0.8,
                                            max_tokens=8, stream=True)  # fmt: skip
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream).strip() == chat.choices[0].message.content
    )
    done = client.completions.create(model="cola", prompt="the cat", seed=5, temperature=0.7, max_tokens=8)
    want = pipe(
        "the cat", generator=[torch.Generator().manual_seed(5)], temperature=0.7, max_new_tokens=8
    ).texts[0]
    assert done.choices[0].text == want and want
    two = client.completions.create(
        model="cola", prompt="the cat", seed=5, temperature=0.7, max_tokens=8, n=2
    )
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == want


def test_concurrent_requests_batch_and_each_equals_alone(server):
    _, url = server
    client = _client(url)
    prompts = [("the cat", 1), ("What is 3", 2), ("Spell", 3), ("Repeat: red", 4)]

    def ask(p):
        return client.completions.create(model="cola", prompt=p[0], seed=p[1], temperature=0.9, max_tokens=8)

    alone = [ask(p).choices[0].text for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = [r.choices[0].text for r in pool.map(ask, prompts)]
    assert together == alone


def test_bad_requests_get_openai_style_errors(server):
    _, url = server
    before = (
        _client(url).completions.create(model="cola", prompt="the cat", seed=5, max_tokens=4).choices[0].text
    )

    def post(path: str, body, key: str | None = KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if body is not None:
            kw["json"] = body
        return httpx.post(f"{url}/v1/{path}", headers=headers, timeout=30, **kw)

    ok = {"model": "cola", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        (post("chat/completions", ok, key=None), 401),
        (post("chat/completions", ok, key="wrong"), 401),
        (post("chat/completions", None, content=b"{not json"), 400),
        (post("chat/completions", {**ok, "model": "gpt-9"}), 404),
        (post("chat/completions", {**ok, "messages": []}), 400),
        (post("chat/completions", {**ok, "messages": [{"role": "robot", "content": "x"}]}), 400),
        (post("chat/completions", {**ok, "max_tokens": 10_000}), 400),
        (post("completions", {"model": "cola", "prompt": "cat " * 400, "max_tokens": 4}), 400),
        (post("chat/completions", {**ok, "n": 99}), 400),
        (post("chat/completions", {**ok, "temperature": 5.0}), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"]
    # a client that disconnects mid-stream: the server keeps serving
    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                      json={"model": "cola", "prompt": "the cat", "max_tokens": 8, "stream": True}) as r:  # fmt: skip
        next(r.iter_lines())
    after = _client(url).completions.create(model="cola", prompt="the cat", seed=5, max_tokens=4)
    assert after.choices[0].text == before  # the same answer as before the sweep
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


def test_unimodal_serve_command_starts_a_server(tmp_path):
    import os
    import subprocess
    import sys

    pipe = tiny_pipeline(["the cat sat", "a dog ran"])
    pipe.save_pretrained(tmp_path / "pipe")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "prior.cli", "serve", str(tmp_path / "pipe"), "--port", str(port), "--api-key", KEY,
           "--steps", "2", "--max-new-tokens", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        out = _client(f"http://127.0.0.1:{port}").completions.create(model="cola", prompt="the cat", seed=1)
        assert out.usage.completion_tokens <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=20)
