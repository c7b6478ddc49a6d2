"""An ``attncache serve`` child process on loopback, for the load test and the soak."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], port: int, log: Path, wait_s: float = 300) -> subprocess.Popen:
    """``attncache serve ARGS --port PORT``, its output in ``log``; returns once /health answers.
    The child leads its own process session (a SIGKILL reaches it alone)."""
    cmd = [sys.executable, "-m", "attncache", "serve", *args, "--port", str(port)]
    out = open(log, "a")  # noqa: SIM115 - the child writes it for its whole life
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            time.sleep(0.3)
        if p.poll() is not None:
            raise SystemExit(f"server exited: {Path(log).read_text()[-2000:]}")
    p.kill()
    raise SystemExit(f"server did not come up in {wait_s:.0f} s")
