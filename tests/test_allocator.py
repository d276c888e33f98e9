"""keep_freed_memory takes glibc's settings once per process, and LMFORGE_KEEP_FREED_MEMORY=0 opts out."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "from lmforge.allocator import keep_freed_memory as k; print(k(), k())"


def _run(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_the_settings_once() -> None:
    assert _run({}) == "True True"


def test_environment_opts_out() -> None:
    assert _run({"LMFORGE_KEEP_FREED_MEMORY": "0"}) == "False False"
