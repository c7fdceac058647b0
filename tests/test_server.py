"""python -m mlx_flash.server driven by the official `openai` client, on the bundled demo model.

One server for the module (a subprocess on a free loopback port, with an API key); every
request is bounded (small max_tokens, client timeouts)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

import mlx_flash
from mlx_flash import mlx_lm_server
from mlx_flash.api import resolve_flash_folder

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-123"
PROMPT = "The for statement"


class Server:
    """A server subprocess and the lines it printed."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_flash.server", "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for(r"serving .* on http://", timeout=120)
        self.url = re.search(r"(http://\S+)/v1", line).group(1)

    def _read(self):
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self._new.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                for line in self.lines[start:]:
                    if re.search(pattern, line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reading()):
                    raise AssertionError(
                        f"no line matching {pattern!r}; the server printed:\n" + "\n".join(self.lines)
                    )
                self._new.wait(min(left, 0.5))

    def _reading(self) -> bool:
        return not self.proc.stdout.closed and self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The demo model's flash folder, copied, with a chat template (chat requests go through it)."""
    out = tmp_path_factory.mktemp("served") / "demo-chat"
    shutil.copytree(resolve_flash_folder(None), out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def local(folder):
    """The model loaded in this process: what the server must answer."""
    model, tokenizer = mlx_flash.load(folder)
    assert tokenizer.has_chat_template
    yield model, tokenizer
    model.flash.close()


@pytest.fixture(scope="module")
def model_id(folder):
    return str(folder)


@pytest.fixture(scope="module")
def server(local, folder):
    s = Server("--model", str(folder), "--api-key", KEY, "--verify")
    yield s
    s.stop()
    if os.environ.get("SERVER_LOG"):
        print("\n".join(s.lines))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60, max_retries=0)


def raw(server, path: str, body: bytes | None = None, key: str | None = KEY, method: str | None = None):
    """(status, parsed JSON body) of a request sent without the openai client."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(server.url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def raw_text(server, path: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(
        server.url + path,
        data=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.read().decode()


def expected(local, prompt: str, max_tokens: int) -> str:
    model, tokenizer = local
    return mlx_flash.generate(model, tokenizer, prompt, max_tokens=max_tokens)


def test_mlx_lm_server_contract():
    """What mlx_flash/mlx_lm_server.py relies on in mlx_lm.server is still there."""
    assert mlx_lm_server.check_contract() == []


def test_completion_equals_generate(server, client, local, model_id):
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == expected(local, PROMPT, 24)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 24
    flash = r.usage.model_extra["flash"]
    assert flash["bytes_read"] > 0 and flash["reads"] > 0 and flash["io_ms"] > 0
    assert 0 < flash["cache_hit_rate"] < 1 and flash["mode"] == "flash"


def test_chat_uses_the_template_and_equals_generate(client, local, model_id):
    model, tokenizer = local
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The with statement"}]
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, temperature=0)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.choices[0].message.content == mlx_flash.generate(model, tokenizer, prompt, max_tokens=12)


def test_stream_joins_to_answer(client, model_id):
    for kind in ("completion", "chat"):
        if kind == "completion":
            make = client.completions.create
            kwargs = dict(prompt="The while statement", max_tokens=20, temperature=0)

            def text(c):
                return c.choices[0].text if c.choices else ""
        else:
            make = client.chat.completions.create
            kwargs = dict(
                messages=[{"role": "user", "content": "What is a class?"}], max_tokens=20, temperature=0
            )

            def text(c):
                return (c.choices[0].delta.content or "") if c.choices else ""

        whole = make(model=model_id, **kwargs)
        chunks = list(make(model=model_id, stream=True, stream_options={"include_usage": True}, **kwargs))
        answer = whole.choices[0].text if kind == "completion" else whole.choices[0].message.content
        assert len(chunks) > 3
        assert "".join(text(c) for c in chunks) == answer
        usage = chunks[-1].usage
        assert usage.completion_tokens == whole.usage.completion_tokens == 20
        assert usage.model_extra["flash"]["bytes_read"] > 0


def test_models_and_health(server, client, model_id):
    assert [m.id for m in client.models.list()] == [model_id]  # mlx-lm's scans the Hugging Face cache
    assert client.models.retrieve(model_id).id == model_id
    assert raw(server, "/v1/models/other-model")[0] == 404
    assert raw(server, "/health") == (200, {"status": "ok"})


def test_api_key(server, client, model_id):
    for key in (None, "wrong"):
        for path, body in (("/v1/completions", b'{"prompt": "a", "max_tokens": 2}'), ("/v1/models", None)):
            status, answer = raw(server, path, body, key=key)
            assert status == 401 and "API key" in answer["error"]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=model_id, prompt="a", max_tokens=2)


@pytest.mark.parametrize(
    "path, body, says",
    [
        ("/v1/completions", b'{"prompt": "a", "max_tokens": ', "Invalid JSON"),
        ("/v1/completions", b"[1, 2]", "JSON dictionary"),
        ("/v1/completions", {"prompt": "a", "max_tokens": "ten"}, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "max_tokens": -5}, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": 42}, "prompt"),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": "a", "stop": 7}, "stop"),
        ("/v1/completions", {"prompt": "a", "seed": -1}, "seed"),
        ("/v1/completions", {"prompt": "a", "seed": 2**70}, "seed"),
        ("/v1/completions", {"prompt": "word " * 600, "max_tokens": 4}, "context"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 600}, "context"),
        ("/v1/completions", {"prompt": "a", "model": "gpt-4o"}, "serves one model"),
        ("/v1/completions", {"prompt": "a", "adapters": "some/adapter"}, "adapters"),
        ("/v1/chat/completions", {"max_tokens": 3}, "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "role"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y"}}]}
                ]
            },
            "text parts",
        ),
    ],
)
def test_bad_requests_are_400(server, path, body, says):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = raw(server, path, data)
    assert status == 400, answer
    assert says in answer["error"]


def test_serving_goes_on_after_bad_requests(server, client, local, model_id):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="another/model", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=[], max_tokens=2)
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected(local, PROMPT, 8)


def test_two_concurrent_requests(client, local, model_id):
    prompts = ["The if statement", "The try statement"]
    answers: dict[str, str] = {}

    def ask(p):
        answers[p] = (
            client.completions.create(model=model_id, prompt=p, max_tokens=16, temperature=0).choices[0].text
        )

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == {p: expected(local, p, 16) for p in prompts}


def test_client_disconnect_stops_generation(server, client, local, model_id):
    """A client that goes away mid-stream stops its generation (the server says after how many
    forward passes, far fewer than the max_tokens asked), and the next request is answered."""
    max_tokens = 500  # about 6 s of decoding on the demo model here, if it were not stopped
    start = len(server.lines)
    body = json.dumps(
        {
            "model": model_id,
            "prompt": "The",
            "max_tokens": max_tokens,
            "stream": True,
            "logit_bias": {"0": -100},  # no end-of-text: only the disconnect can stop it early
        }
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        got = b""
        while b"data:" not in got:
            got += s.recv(4096)
    line = server.wait_for(rf"decode passes \(max_tokens {max_tokens}\)", timeout=60, start=start)
    passes = int(re.search(r"(\d+) decode passes", line).group(1))
    assert passes < max_tokens // 2, line
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == expected(local, PROMPT, 4)


def test_a_failed_read_is_a_500_and_serving_goes_on(server, client, folder, local, model_id):
    """A shard corrupted under the running server (loaded with --verify): the request that reads
    it gets a 500 with a one-line error, unstreamed or streamed (an error event); the server goes on."""
    shard = folder / "ffn" / "layer_001.safetensors"
    original = shard.read_bytes()
    damaged = bytearray(original)
    for i in range(len(damaged) - 4096, len(damaged), 7):
        damaged[i] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    try:
        with pytest.raises(openai.InternalServerError) as failed:
            client.completions.create(model=model_id, prompt="A long new prompt " * 8, max_tokens=4)
        assert "FlashChecksumError" in failed.value.response.json()["error"]
        body = json.dumps(
            {"model": model_id, "prompt": "Another prompt " * 8, "max_tokens": 4, "stream": True}
        )
        status, text = raw_text(server, "/v1/completions", body.encode())
        assert status == 200 and "checksum" in text and "[DONE]" not in text
    finally:
        shard.write_bytes(original)
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == expected(local, PROMPT, 4)


def test_startup_errors_are_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "mlx_flash.server", "--port", "0"]
    r = subprocess.run(
        cmd + ["--model", str(tmp_path / "nothing")], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "error" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            cmd[:-2] + ["--port", str(port)], capture_output=True, text=True, env=env, timeout=120
        )
    assert r.returncode == 1 and "Traceback" not in r.stderr and f"127.0.0.1:{port}" in r.stderr


def test_sigterm_cancels_the_running_request_and_exits_0(server, model_id):
    """Last test of the module: SIGTERM while a request streams; the server cancels it, closes
    the flash reader and exits 0."""
    start = len(server.lines)
    stream_client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60, max_retries=0)
    stream = stream_client.completions.create(
        model=model_id, prompt="The", max_tokens=500, stream=True, logit_bias={"0": -100}
    )
    next(iter(stream))
    assert server.stop() == 0
    server.wait_for("decode passes \\(max_tokens 500\\)", start=start)
    passes = int(re.search(r"(\d+) decode passes", server.wait_for("max_tokens 500", start=start)).group(1))
    assert passes < 250
    server.wait_for("flash reader closed", start=start)
    server.wait_for("stopped$", start=start)
    stream.close()
