"""The command line as a user runs it: real model end to end, and clear errors on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_every_command():
    out = run("--help").stdout
    for command in ("pull", "list", "generate", "chat", "info", "bench"):
        assert command in out


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "hi", "--model", "/no/such/model.gguf"], "neither an existing path nor a known model name"),
    (["info", "nonexistent-model"], "known names"),
    (["pull", "gpt-17"], "unknown model 'gpt-17'"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_not_a_gguf_file_is_named(tmp_path):
    fake = tmp_path / "weights.gguf"
    fake.write_text("hello")
    result = run("info", str(fake))
    assert result.returncode == 2 and "not a GGUF file" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.real_model
def test_generate_streams_an_answer(smollm2_gguf):
    result = run("generate", "What is the capital of France?", "--model", str(smollm2_gguf), "--temperature", "0",
                 "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.real_model
def test_chat_keeps_history(smollm2_gguf):
    flags = ["--temperature", "0", "--max-tokens", "32"]
    both = run("chat", str(smollm2_gguf), *flags, stdin="My name is Ada.\nWhat is my name?\n/exit\n")
    alone = run("chat", str(smollm2_gguf), *flags, stdin="What is my name?\n/exit\n")
    assert both.returncode == 0 and alone.returncode == 0, both.stderr
    second_reply = both.stdout.split("> ")[2]
    first_reply_alone = alone.stdout.split("> ")[1]
    assert second_reply.strip() and second_reply != first_reply_alone  # the earlier turn changed the answer


@pytest.mark.real_model
def test_info_describes_the_real_model(smollm2_gguf):
    out = run("info", str(smollm2_gguf)).stdout
    assert "134.5 M" in out and "Q4_1" in out and "8192" in out
