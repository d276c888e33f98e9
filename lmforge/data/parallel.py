"""Run one task per process, a few at a time, with a hard time limit per task.

A process per file (forked, so the parent's loaded tokenizer and imports come for free)
rather than a pool: a file that hangs inside C code or crashes the interpreter can be killed
or lost on its own, recorded with a reason, and the run goes on. Fork costs ~5 ms a file.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable


def _child(fn: Callable[[Any], dict], task: Any, conn: Connection) -> None:
    """Run `fn(task)` and send its result dict (or the error) back to the parent."""
    try:
        result = fn(task)
    except BaseException as err:  # noqa: BLE001 -- report anything, the parent decides
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=5)}
    conn.send(result)
    conn.close()


def run_tasks(fn: Callable[[Any], dict], tasks: Iterable[Any], on_done: Callable[[Any, dict], None],
              workers: int = 2, timeout: float = 600.0) -> None:
    """Call `on_done(task, result)` for each task as it finishes, failed or timed out included."""
    ctx = mp.get_context("fork")
    pending = list(tasks)
    running: dict[Connection, tuple[Any, Any, float]] = {}
    while pending or running:
        while pending and len(running) < max(workers, 1):
            task = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(fn, task, send), daemon=True)
            proc.start()
            send.close()
            running[recv] = (proc, task, time.monotonic())
        for conn in wait(list(running), timeout=0.2):
            proc, task, _ = running.pop(conn)
            on_done(task, _receive(conn, proc))
        _kill_overdue(running, timeout, on_done)


def _receive(conn: Connection, proc: Any) -> dict:
    """The child's result, or why there is none (it died)."""
    try:
        result = conn.recv()
    except (EOFError, OSError):
        proc.join(5)
        result = {"error": f"worker process died (exit code {proc.exitcode})"}
    conn.close()
    proc.join(5)
    return result


def _kill_overdue(running: dict, timeout: float, on_done: Callable[[Any, dict], None]) -> None:
    """Kill tasks past `timeout` and report each as a timeout."""
    now = time.monotonic()
    for conn, (proc, task, started) in list(running.items()):
        if now - started > timeout:
            proc.kill()
            proc.join(5)
            conn.close()
            del running[conn]
            on_done(task, {"error": f"timeout: file took longer than {timeout:g} s and was stopped"})
