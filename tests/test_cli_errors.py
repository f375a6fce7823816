"""The real `hotswap` command, run as a subprocess: a user-caused error is one line on stderr
(`hotswap: error: ...`) and a non-zero exit, never a traceback; path mistakes fail before the model
loads; and a running server or admin command prints no third-party library chatter."""
from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from loadtests.servers import free_port

REPO = Path(__file__).resolve().parent.parent
# Loggers of libraries that must stay quiet at --log-level info (as named in a log line, or the
# "[transformers]" prefix of transformers' own handler).
LIBRARY_LOGGERS = ("httpx", "httpcore", "urllib3", "filelock", "transformers", "huggingface_hub", "sentence_transformers")
LIBRARY_LINE = re.compile(rf"(DEBUG|INFO|WARNING|ERROR|CRITICAL) ({'|'.join(LIBRARY_LOGGERS)})[.:]|\[({'|'.join(LIBRARY_LOGGERS)})\]")


def hotswap(*args: str, env: dict[str, str] | None = None, timeout: float = 15) -> subprocess.CompletedProcess:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    proc.seconds = time.monotonic() - started
    return proc


def text_lines(text: str) -> list[str]:
    """Non-empty lines, without the progress bars of model loading and quantization (tqdm redraws them with \\r; they stay)."""
    return [line for line in text.splitlines() if line.strip() and "tensor/s]" not in line and "linear/s]" not in line]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, nothing on stdout, exactly one non-empty stderr line `hotswap: error: ...` holding `needles`."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    lines = text_lines(proc.stderr)
    assert proc.returncode == 1, output
    assert len(lines) == 1 and lines[0].startswith("hotswap: error: "), output
    assert proc.stdout == "", output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_usage_error(proc: subprocess.CompletedProcess, prog: str, needle: str) -> None:
    """argparse's own format: `usage: ...` first, `<prog>: error: ...` last, exit 2."""
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[0].startswith(f"usage: {prog}") and lines[-1].startswith(f"{prog}: error: ") and needle in lines[-1], proc.stderr


# ---------- serve: paths checked before the model loads ----------

@pytest.fixture
def adapters(tmp_path) -> Path:
    """Adapter directories that cannot be served, each wrong in one way the start-up checks catch."""
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text('{"r": 8}')
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    bad_config = tmp_path / "collection" / "bad"
    bad_config.mkdir(parents=True)
    (bad_config / "adapter_config.json").write_text('{"r": 8,')
    (bad_config / "adapter_model.safetensors").write_bytes(b"")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("args, needles", [
    (["--adapters-dir", "/does/not/exist"], ["--adapters-dir /does/not/exist does not exist"]),
    (["--adapter", "foo=/missing/dir"], ["--adapter foo=/missing/dir", "does not exist"]),
    (["--adapter", "foo={tmp}/pickled"], ["adapter_model.bin", "never loaded", "convert it to safetensors"]),
    (["--adapter", "foo={tmp}/no_config"], ["no adapter_config.json"]),
    (["--adapters-dir", "{tmp}/collection"], ["bad", "adapter_config.json is not valid JSON"]),
    (["--adapters-dir", "{tmp}/pickled/adapter_model.bin"], ["is not a directory"]),
    (["--model", "/does/not/exist"], ["--model /does/not/exist does not exist"]),
    (["--model", "{tmp}/collection"], ["has no config.json"]),
    (["--store", "{tmp}/pickled/adapter_model.bin/store"], ["--store", "cannot create store directory"]),
    (["--store", "ftp://example.com/x"], ["unsupported store URL"]),
])
def test_serve_refuses_bad_paths_in_one_line_before_loading_the_model(adapters, args, needles):
    proc = hotswap("serve", "--port", "1", *(a.replace("{tmp}", str(adapters)) for a in args))
    # One line also proves the model never loaded: loading logs "loaded ..." and draws a progress bar.
    assert_one_line_error(proc, *needles)
    assert proc.seconds < 15


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda would serve")
@pytest.mark.parametrize("device, needle", [("cuda", "--device cuda: "), ("cuda:3", "--device cuda:3: "), ("tpu", "is not a device")])
def test_serve_on_a_device_this_machine_lacks_is_one_line(device, needle):
    proc = hotswap("serve", "--port", "1", "--device", device)
    assert_one_line_error(proc, needle)
    assert proc.seconds < 15  # refused before the model loads
    env_proc = hotswap("serve", "--port", "1", env={"HOTSWAP_DEVICE": device})  # the images set it
    assert_one_line_error(env_proc, needle)


def test_serve_refuses_a_model_dir_that_is_not_a_supported_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_one_line_error(hotswap("serve", "--model", str(tmp_path)), "model_type 'gpt2' is not supported")
    (tmp_path / "config.json").write_text("{not json")
    assert_one_line_error(hotswap("serve", "--model", str(tmp_path)), "config.json")


def test_an_embedded_model_that_cannot_be_fetched_is_one_line(tmp_path):
    env = {"HOTSWAP_HOME": str(tmp_path / "home"), "HOTSWAP_EMBEDDED_GGUF": str(tmp_path / "missing.gguf")}
    for command in (["fetch-model"], ["serve", "--port", "1"]):
        proc = hotswap(*command, env=env)
        # The fetch announces itself ("embedded model ... not found ...; fetching"): our own INFO log.
        announced = [line for line in text_lines(proc.stderr) if " INFO server.models.embedded: " in line]
        proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if line not in announced)
        assert len(announced) == 1
        assert_one_line_error(proc, "HOTSWAP_EMBEDDED_GGUF=", "does not point to a file")


def test_an_adapter_the_engine_refuses_is_one_line(model_dir, tmp_path):
    """Errors found only while loading (here modules_to_save) reach the user the same way, just later."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "modules_to_save": ["lm_head"]}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    proc = hotswap("serve", "--port", "1", "--log-level", "warning", "--adapter", f"saver={tmp_path}", timeout=60)
    assert_one_line_error(proc, "saver: modules_to_save")


def test_serve_usage_errors_keep_argparse_format():
    assert_usage_error(hotswap("serve", "--adapter", "foo"), "hotswap serve", "expected NAME=PATH")
    proc = hotswap("serve", "--host", "0.0.0.0")  # open server on the network: refused, a usage error
    assert proc.returncode == 2 and proc.stderr.startswith("hotswap: error: refusing to bind") and "Traceback" not in proc.stderr


# ---------- convert ----------

def test_convert_help_works_at_both_levels():
    top = hotswap("convert", "--help")
    assert top.returncode == 0 and top.stdout.startswith("usage: hotswap convert") and "s2ft" in top.stdout, top.stderr
    s2ft = hotswap("convert", "s2ft", "--help")
    assert s2ft.returncode == 0 and s2ft.stdout.startswith("usage: hotswap convert s2ft"), s2ft.stderr
    for flag in ("--base", "--finetuned", "--out", "--atol", "--delta-dtype"):
        assert flag in s2ft.stdout
    assert_usage_error(hotswap("convert"), "hotswap convert", "KIND")
    assert_usage_error(hotswap("convert", "s2ft", "--base", "x"), "hotswap convert s2ft", "--finetuned")


def test_convert_of_a_missing_checkpoint_is_one_line(tmp_path):
    proc = hotswap("convert", "s2ft", "--base", str(tmp_path / "nope"), "--finetuned", str(tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"hotswap convert s2ft: error: base checkpoint {tmp_path / 'nope'} is not a directory"]


# ---------- admin commands against unreachable, foreign or refusing servers ----------

@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: nothing listens there


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's `status`, `content_type` and `body`, after reading the
    request body (so an upload sees the answer, not a reset connection)."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = self.server.body.encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", self.server.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


def _canned_server(status: int, content_type: str, body: str) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    server.status, server.content_type, server.body = status, content_type, body
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def refusing_server() -> Iterator[str]:
    """A server that answers 401 like hotswap does to a missing or wrong admin key."""
    body = json.dumps({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "code": "invalid_api_key"}})
    yield from _canned_server(401, "application/json", body)


@pytest.fixture
def foreign_server() -> Iterator[str]:
    """Some other web server: 200 with an HTML page."""
    yield from _canned_server(200, "text/html", "<html>\n<body>hello</body>\n</html>\n")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return tmp_path


ADMIN_COMMANDS = [
    ["adapters", "ls"],
    ["adapters", "rm", "acme/support"],
    ["adapters", "push", "{adapter}", "--tenant", "acme", "--name", "support"],
    ["tenants", "create", "acme"],
    ["tenants", "key", "acme"],
    ["tenants", "show", "acme"],
    ["tenants", "set", "acme", "--requests-per-minute", "60"],
]


def _admin(command: list[str], adapter_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return hotswap(*(a.replace("{adapter}", str(adapter_dir)) for a in command), *extra, env=env)


@pytest.mark.parametrize("command", ADMIN_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_admin_command_against_a_closed_port(command, adapter_dir, closed_port):
    url = f"http://127.0.0.1:{closed_port}"
    assert_one_line_error(_admin(command, adapter_dir, "--url", url), f"cannot connect to a hotswap server at {url}", "HOTSWAP_URL")


@pytest.mark.parametrize("command", ADMIN_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_admin_command_refused_for_its_key(command, adapter_dir, refusing_server):
    no_key = {"HOTSWAP_ADMIN_KEY": ""}
    assert_one_line_error(_admin(command, adapter_dir, "--url", refusing_server, env=no_key), "needs an admin key", "401", "HOTSWAP_ADMIN_KEY")
    wrong = _admin(command, adapter_dir, "--url", refusing_server, env={"HOTSWAP_ADMIN_KEY": "wrong"})
    assert_one_line_error(wrong, "refused the admin key", "401", "HOTSWAP_ADMIN_KEY")
    not_ascii = _admin(command, adapter_dir, "--url", refusing_server, env={"HOTSWAP_ADMIN_KEY": "kéy"})
    assert_one_line_error(not_ascii, "printable ASCII", "HOTSWAP_ADMIN_KEY")


def test_admin_commands_against_a_server_that_is_not_hotswap(adapter_dir, foreign_server):
    for command in (["adapters", "ls"], ["tenants", "key", "acme"]):
        assert_one_line_error(_admin(command, adapter_dir, "--url", foreign_server), "text/html", "is --url (or HOTSWAP_URL) a hotswap server?")


def test_admin_command_timeout_and_bad_urls(adapter_dir, silent_port):
    proc = hotswap("adapters", "ls", "--url", f"http://127.0.0.1:{silent_port}", "--timeout", "0.5")
    assert_one_line_error(proc, "did not answer within 0.5 s", "--timeout")
    assert_one_line_error(hotswap("adapters", "ls", "--url", "127.0.0.1:8000"), "is not an http(s) address")
    assert_one_line_error(hotswap("adapters", "rm", "support"), "TENANT/NAME")
    missing = adapter_dir / "nope"
    assert_one_line_error(hotswap("adapters", "push", str(missing), "--tenant", "acme", "--name", "x"), f"{missing} is not a directory")


# ---------- no library chatter from a real server and a real admin command ----------

def test_serve_and_admin_commands_print_no_library_chatter(model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--store", "memory://", "--kv-cache-tokens", "4096"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.communicate()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 60 s"
            time.sleep(0.25)
        ls = hotswap("adapters", "ls", "--url", url)
        assert ls.returncode == 0 and ls.stdout.startswith("ADAPTER"), ls.stderr
        assert ls.stderr == "", ls.stderr  # no "HTTP Request: GET ..." line from httpx
        # A prompt longer than the tokenizer's model_max_length: transformers would advise about it.
        too_long = httpx.post(f"{url}/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "hello " * 9000, "max_tokens": 1}, timeout=30)
        assert too_long.status_code == 400
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
    assert server.returncode in (0, -signal.SIGTERM), err  # uvicorn re-raises the signal once it has shut down
    lines = text_lines(out + err)
    assert "Traceback" not in out + err
    chatter = [line for line in lines if LIBRARY_LINE.search(line)]
    assert chatter == [], chatter
    assert any("INFO server.engine.llm_engine: loaded" in line for line in lines), lines  # our own INFO logs stay
    assert any("Uvicorn running on" in line for line in lines) and any('"GET /health HTTP/1.1" 200' in line for line in lines), lines
