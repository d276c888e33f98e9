"""Tools that touch the machine, fenced: Python code in a limited child process, and file reading
inside one allowed folder.

The Python sandbox runs `python -I` (isolated: no site, no user paths, no PYTHON* variables) in
an empty temporary folder with an empty environment, under rlimits (CPU seconds, address space,
file size, open files), a wall-clock timeout, and an audit hook (PEP 578) installed before the
code runs that refuses sockets, new processes, ctypes and writes outside the temporary folder.
Where the kernel allows it, the child also gets its own empty network namespace. It is a fence
for a model's arithmetic and string code, not a security boundary against a determined attacker
(CPython's own docs say audit hooks are not a sandbox); run the agent in a container for that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.agents.tools import Tool, ToolError

CLONE_NEWNET = 0x40000000  # <sched.h>

# runs first inside the child: every event below raises, so the model's code cannot reach them
PRELUDE = r'''
import sys
def _fence(event, args, _root=sys.argv[1]):
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "subprocess.Popen",
                 "os.system", "os.exec", "os.posix_spawn", "os.fork", "os.forkpty", "os.spawn", "os.kill",
                 "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "sys.setprofile", "sys.settrace"):
        raise PermissionError(f"the sandbox does not allow {event}")
    if event == "open" and ((args[1] and any(c in str(args[1]) for c in "wax+")) or (args[2] or 0) & 0o3103):
        import os.path  # mode "w"/"a"/"x"/"+", or flags O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND
        if not os.path.realpath(str(args[0])).startswith(_root):
            raise PermissionError("the sandbox writes only inside its temporary folder")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.chmod"):
        import os.path
        if not os.path.realpath(str(args[0])).startswith(_root):
            raise PermissionError(f"the sandbox does not allow {event} outside its temporary folder")
sys.addaudithook(_fence)
del _fence
'''


@dataclass
class SandboxConfig:
    """Limits of one run of model-written Python."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_mib: int = 512
    max_output_chars: int = 4000
    max_code_chars: int = 20_000


def _limit(config: SandboxConfig):
    """preexec_fn: rlimits, then (best effort) an empty network namespace."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (config.cpu_seconds, config.cpu_seconds))
        memory = config.memory_mib << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            libc.unshare(CLONE_NEWNET)  # fails without privileges: the audit hook still refuses sockets
        except (OSError, AttributeError):
            pass
    return apply


def run_python(code: str, config: SandboxConfig | None = None) -> str:
    """Run `code`, return what it printed (stdout, then stderr's last lines on an error)."""
    config = config or SandboxConfig()
    if not isinstance(code, str) or not code.strip():
        raise ToolError("python needs non-empty code")
    if len(code) > config.max_code_chars:
        raise ToolError(f"code of {len(code)} characters is over the sandbox's {config.max_code_chars}")
    with tempfile.TemporaryDirectory(prefix="lmforge-sandbox-") as folder:
        root = os.path.realpath(folder)
        program = PRELUDE + f"\nexec(compile({code!r}, '<agent>', 'exec'), {{'__name__': '__main__'}})\n"
        try:
            done = subprocess.run([sys.executable, "-I", "-c", program, root], cwd=root, env={},
                                  capture_output=True, text=True, timeout=config.wall_seconds,
                                  preexec_fn=_limit(config))
        except subprocess.TimeoutExpired:
            return f"Error: the code ran past the {config.wall_seconds:g} s time limit"
    out = done.stdout[-config.max_output_chars:]
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        if done.returncode < 0:
            reason = f"killed by signal {-done.returncode} (CPU or memory limit)"
        return (out + f"\nError: {reason}").strip()
    return out.strip() or "(no output; print the result)"


def python_sandbox(config: SandboxConfig | None = None) -> Tool:
    return Tool("python", "Run Python code and return what it prints; no network, files or processes.",
                lambda code: run_python(code, config),
                {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]})


def read_text_file(root: str | Path, path: str, max_chars: int = 8000) -> str:
    """The text of `path` inside `root` (relative or absolute); anything that resolves outside is refused."""
    base = Path(root).resolve()
    target = (base / path).resolve()  # symlinks and '..' resolved before the check
    if not target.is_relative_to(base):
        raise ToolError(f"{path!r} is outside the allowed folder")
    if not target.is_file():
        listing = sorted(p.name for p in base.iterdir())[:20] if base.is_dir() else []
        raise ToolError(f"no file {path!r}; the folder holds {listing}")
    data = target.read_bytes()[:max_chars * 4]
    if b"\x00" in data[:1024]:
        raise ToolError(f"{path!r} is not a text file")
    return data.decode("utf-8", errors="replace")[:max_chars]


def file_reader(root: str | Path, max_chars: int = 8000) -> Tool:
    if not Path(root).is_dir():
        raise ValueError(f"file_reader: {root} is not a folder")
    return Tool("read_file", f"Read a text file from the folder {Path(root).name}/ (give a relative path).",
                lambda path: read_text_file(root, path, max_chars),
                {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]})
