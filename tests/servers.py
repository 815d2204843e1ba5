"""Starting and stopping `python -m llama.server` processes on 127.0.0.1 for the server tests."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from device import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, port, env=None) -> subprocess.Popen:
    """Start `cmd` (its output goes to a file: `output(proc)`) and wait until /health answers 200."""
    log = tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=subprocess_env(**(env or {})))
    proc.log_path = log.name
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {output(proc)[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready")


def server_cmd(ckpt_dir, port, *args) -> list:
    """The server on the test device, in float32 like the tests' in-process expectations."""
    return [sys.executable, "-m", "llama.server", "--ckpt_dir", str(ckpt_dir), "--port", str(port),
            "--dtype", "float32", *map(str, args)]


def output(proc: subprocess.Popen) -> str:
    """What the server process has printed so far."""
    return Path(proc.log_path).read_text()


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30) -> int:
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
