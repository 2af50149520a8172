"""``encdec serve`` as a user starts it: a subprocess on a free loopback port, called over HTTP,
stopped with SIGINT."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_encdec_serve_starts_answers_and_stops(text_model_dir):
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "encdec.cli",
        "serve",
        "--model",
        str(text_model_dir),
        "--port",
        str(port),
    ]
    command += ["--served-model-name", "tiny", "--api-key", "k", "--no-warmup", "--log-level", "warning"]
    command += ["--num-slots", "2", "--engine", "max_encoder_len=32", "--engine", "max_new_tokens=8"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        out = client.completions.create(model="tiny", prompt="t5 t6 t7", max_tokens=8, temperature=0)
        assert out.choices[0].text and out.usage.completion_tokens <= 8
        with pytest.raises(openai.BadRequestError, match="max_tokens must be in \\[1, 8\\]"):
            client.completions.create(model="tiny", prompt="t5", max_tokens=9)
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "models: tiny" in output


def test_bad_serve_arguments_are_named_errors(text_model_dir):
    from encdec.cli import main

    assert main(["serve", "--model", str(text_model_dir), "--engine", "num_slots"]) == 2
    assert main(["serve", "--model", str(text_model_dir), "--engine", "colour=red", "--no-warmup"]) == 2
    assert main(["serve", "--model", str(text_model_dir), "--adapter", "x=/nonexistent", "--no-warmup"]) == 2
