"""Chaos in CI: up to 20 seconds (2,000 requests) of concurrent good, hostile and hung-up requests against a real server
process (benchmarks/chaos.py runs the long version). Nothing may break, stall or leak."""

import signal
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from chaos import Chaos, rss_mb  # noqa: E402
from servers import KEY, free_port, output, server_cmd, start, stop  # noqa: E402


def test_chaos(tiny_dir):
    port = free_port()
    proc = start(server_cmd(tiny_dir, port, "--max_seq_len", 256, "--max_batch_size", 4), port,
                 env={"LLAMA_API_KEY": KEY})
    try:
        chaos = Chaos(f"http://127.0.0.1:{port}", KEY)
        chaos.expected()  # warm up, so that memory is measured from a running server
        before = rss_mb(proc.pid)
        report = chaos.run(seconds=20, clients=6, seed=1, max_requests=2000)
        idle = chaos.wait_idle()
        after = rss_mb(proc.pid)
    except BaseException:
        stop(proc, signal.SIGKILL)
        raise
    t = time.time()
    assert stop(proc) == 0
    exit_s = time.time() - t
    summary = report.as_dict()
    assert report.kinds["good"] > 20 and report.kinds["bad"] > 10 and report.kinds["mutated"] > 10, summary
    assert report.kinds["hang-up"] > 5, summary
    assert report.failures == [], summary
    assert report.wrong_answers == [], report.wrong_answers[:3]
    assert idle["running"] == 0 and idle["queued"] == 0
    assert idle["cancelled"] >= report.kinds["hang-up"] // 2, (idle, summary)
    assert after - before < 100, f"resident memory grew from {before:.0f} MB to {after:.0f} MB"
    assert exit_s < 10
    assert "Traceback" not in output(proc)
