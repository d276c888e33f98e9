"""The Python sandbox runs arithmetic and string code but no network, processes, outside writes or
runaway loops; the file reader stays inside its folder."""

from __future__ import annotations

import os

import pytest

from lmforge.agents.sandbox import SandboxConfig, file_reader, python_sandbox, read_text_file, run_python
from lmforge.agents.tools import ToolError


def test_runs_code_and_returns_what_it_prints() -> None:
    assert run_python("print(sum(i * i for i in range(10)))") == "285"
    assert python_sandbox().run({"code": "import math\nprint(math.comb(10, 3))"}) == "120"
    assert "no output" in run_python("x = 1")


def test_errors_come_back_as_text() -> None:
    assert run_python("1/0").endswith("ZeroDivisionError: division by zero")


@pytest.mark.parametrize("code,words", [
    ("import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)", "does not allow socket"),
    ("import subprocess\nsubprocess.run(['ls'])", "does not allow subprocess.Popen"),
    ("import os\nos.system('ls')", "does not allow os.system"),
    ("import ctypes\nctypes.CDLL(None)", "does not allow ctypes"),
    ("open('/tmp/lmforge-sandbox-escape.txt', 'w').write('x')", "only inside its temporary folder"),
    ("import os\nos.open('/tmp/lmforge-sandbox-escape.txt', os.O_WRONLY | os.O_CREAT)", "only inside"),
    ("import os\nos.remove('/etc/hostname')", "does not allow os.remove"),
])
def test_refuses_network_processes_and_outside_writes(code: str, words: str) -> None:
    out = run_python(code)
    assert "Error" in out and words in out, out
    assert not os.path.exists("/tmp/lmforge-sandbox-escape.txt")


def test_writes_inside_its_folder_and_sees_no_environment() -> None:
    code = "open('note.txt', 'w').write('hi')\nprint(open('note.txt').read())\nimport os\nprint(sorted(os.environ))"
    out = run_python(code).splitlines()
    assert out[0] == "hi" and set(eval(out[1])) <= {"LC_CTYPE"}  # only Python's own locale coercion (PEP 538)


def test_time_and_memory_limits_stop_runaway_code() -> None:
    slow = run_python("while True: pass", SandboxConfig(cpu_seconds=1, wall_seconds=5))
    assert "Error" in slow and ("signal" in slow or "time limit" in slow)
    big = run_python("x = bytearray(2 * 1024**3)", SandboxConfig(memory_mib=256))
    assert "MemoryError" in big or "signal" in big


def test_file_reader_stays_inside_its_folder(tmp_path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha")
    (tmp_path / "secret.txt").write_text("s3cret")
    os.symlink(tmp_path / "secret.txt", tmp_path / "docs" / "link.txt")
    root = tmp_path / "docs"
    assert file_reader(root).run({"path": "a.txt"}) == "alpha"
    for escape in ("../secret.txt", str(tmp_path / "secret.txt"), "link.txt"):
        with pytest.raises(ToolError, match="outside the allowed folder"):
            read_text_file(root, escape)
    with pytest.raises(ToolError, match="no file 'b.txt'"):
        read_text_file(root, "b.txt")
