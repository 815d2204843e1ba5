"""Tests for download.sh against a local fake of Meta's signed-URL download server."""

import hashlib
import json
import os
import random
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "download.sh"
BASH = shutil.which("bash")
SECRET = "good-sig-s3cr3t"  # the only accepted Signature; must never be printed

# Models served by the fake server and their number of shards.
SERVED = {"7b": 1, "13b-Python": 2}
DOWNLOADERS = [d for d in ("wget", "curl") if shutil.which(d)]


def build_release(seed=0):
    rng = random.Random(seed)
    files = {
        "LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT (test copy)\n",
        "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy (test copy)\n",
    }
    for model, shards in SERVED.items():
        folder = f"CodeLlama-{model}"
        model_files = {
            f"consolidated.{i:02d}.pth": b"PK\x03\x04" + rng.randbytes(40_000 + 1000 * i)
            for i in range(shards)
        }
        model_files["params.json"] = json.dumps({"dim": 64, "n_layers": 2}).encode()
        model_files["tokenizer.model"] = rng.randbytes(5_000)
        checklist = "".join(
            f"{hashlib.md5(data).hexdigest()}  {name}\n" for name, data in model_files.items()
        )
        model_files["checklist.chk"] = checklist.encode()
        for name, data in model_files.items():
            files[f"{folder}/{name}"] = data
    return files


class FakeServer:
    """State shared with the request handler: files, faults and a request log."""

    def __init__(self):
        self.files = build_release()
        self.corrupt = set()  # paths served with flipped bytes
        self.html = set()  # paths answered with a 200 text/html page
        self.head_allowed = True
        self.ranges = True  # False: ignore Range and always answer 200
        self.log = []  # (method, path, Range header or None)
        self.lock = threading.Lock()
        self.url = ""

    def signed_url(self, signature=SECRET):
        return f"{self.url}/*?Policy=eyJTdGF0ZW1lbnQiOltdfQ__&Signature={signature}&Key-Pair-Id=K2TESTKEY"

    def gets(self, path=None):
        return [e for e in self.log if e[0] == "GET" and (path is None or e[1] == path)]


def make_handler(state):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _send(self, code, headers, data=b"", body=True):
            self.send_response(code)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _serve(self, body):
            parts = urlsplit(self.path)
            path = unquote(parts.path).lstrip("/")
            with state.lock:
                state.log.append((self.command, path, self.headers.get("Range")))
            if not body and not state.head_allowed:
                return self._send(405, {}, body=False)
            query = parse_qs(parts.query)
            if not query.get("Policy") or not query.get("Key-Pair-Id") or query.get("Signature") != [SECRET]:
                xml = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code></Error>'
                return self._send(403, {"Content-Type": "text/xml"}, xml, body)
            if path in state.html:
                page = b"<!DOCTYPE html><html><body>Redirecting...</body></html>"
                return self._send(200, {"Content-Type": "text/html"}, page, body)
            if path not in state.files:
                return self._send(404, {"Content-Type": "text/plain"}, b"not found", body)
            data = state.files[path]
            if path in state.corrupt:
                data = bytes(b ^ 0xFF for b in data[:100]) + data[100:]
            size = len(data)
            headers = {"Content-Type": "binary/octet-stream", "Accept-Ranges": "bytes"}
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and state.ranges:
                start_s, _, end_s = rng[len("bytes="):].partition("-")
                start = int(start_s)
                end = int(end_s) if end_s else size - 1
                if start >= size:
                    headers["Content-Range"] = f"bytes */{size}"
                    return self._send(416, headers, b"", body)
                end = min(end, size - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                return self._send(206, headers, data[start:end + 1], body)
            return self._send(200, headers, data, body)

    return Handler


@pytest.fixture
def server():
    state = FakeServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(params=DOWNLOADERS or [pytest.param(None, marks=pytest.mark.skip("no wget/curl"))])
def downloader(request):
    return request.param


def run(args=(), *, env=None, downloader=None, stdin=None, cwd=REPO, path=None, tmp=None):
    full_env = {
        "PATH": path if path is not None else os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp) if tmp else os.environ.get("HOME", "/tmp"),  # no ~/.wgetrc, ~/.curlrc
        "LC_ALL": "C",
        "no_proxy": "*",
        "NO_PROXY": "*",
    }
    if downloader:
        full_env["DOWNLOADER"] = downloader
    full_env.update(env or {})
    return subprocess.run(
        [BASH, str(SCRIPT), *args],
        cwd=cwd,
        env=full_env,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_tree(server, target, models):
    assert (target / "LICENSE").read_bytes() == server.files["LICENSE"]
    assert (target / "USE_POLICY.md").read_bytes() == server.files["USE_POLICY.md"]
    for model in models:
        folder = f"CodeLlama-{model}"
        expected = {p: d for p, d in server.files.items() if p.startswith(folder + "/")}
        assert len(expected) == SERVED[model] + 3
        for rel, data in expected.items():
            assert (target / rel).read_bytes() == data, rel
    assert not list(target.rglob("*.error.html"))


def test_help():
    res = run(["--help"])
    assert res.returncode == 0
    for flag in ("--url", "--models", "--target", "--help", "PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER"):
        assert flag in res.stdout


def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed")
    res = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_flags_non_interactive(server, downloader, tmp_path):
    target = tmp_path / "weights"
    res = run(["--url", server.signed_url(), "--models", "7b,13b-Python", "--target", str(target)],
              downloader=downloader, stdin=None, tmp=tmp_path)
    assert res.returncode == 0, res.stderr
    assert_tree(server, target, ["7b", "13b-Python"])
    assert "Enter the" not in res.stderr  # no prompt when everything is given
    assert SECRET not in res.stdout + res.stderr
    assert "consolidated.01.pth: OK" in res.stderr


def test_env_vars_and_stdin_closed(server, downloader, tmp_path):
    target = tmp_path / "w"
    res = subprocess.run(
        [BASH, str(SCRIPT)], cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "no_proxy": "*", "DOWNLOADER": downloader,
             "PRESIGNED_URL": server.signed_url(), "MODEL_SIZE": "7b", "TARGET_FOLDER": str(target)},
    )
    assert res.returncode == 0, res.stderr
    assert_tree(server, target, ["7b"])
    assert not (target / "CodeLlama-13b-Python").exists()


def test_interactive_case_insensitive_names(server, downloader, tmp_path):
    res = run(env={"TARGET_FOLDER": str(tmp_path)}, downloader=downloader, tmp=tmp_path,
              stdin=f"{server.signed_url()}\nCodeLlama-7B, 13b-python\n")
    assert res.returncode == 0, res.stderr
    assert "Enter the URL from email: " in res.stderr
    assert_tree(server, tmp_path, ["7b", "13b-Python"])


def test_default_target_is_current_dir(server, downloader, tmp_path):
    res = run(["--url", server.signed_url(), "--models", "7b"], downloader=downloader, cwd=tmp_path, tmp=tmp_path)
    assert res.returncode == 0, res.stderr
    assert_tree(server, tmp_path, ["7b"])


def test_resume_partial_file(server, downloader, tmp_path):
    rel = "CodeLlama-13b-Python/consolidated.01.pth"
    k = 12_345
    (tmp_path / "CodeLlama-13b-Python").mkdir()
    (tmp_path / rel).write_bytes(server.files[rel][:k])
    res = run(["--url", server.signed_url(), "--models", "13b-python", "--target", str(tmp_path)],
              downloader=downloader, tmp=tmp_path)
    assert res.returncode == 0, res.stderr
    assert [g[2] for g in server.gets(rel)] == [f"bytes={k}-"]
    assert_tree(server, tmp_path, ["13b-Python"])


def test_partial_file_when_server_ignores_range(server, downloader, tmp_path):
    server.ranges = False
    rel = "CodeLlama-7b/consolidated.00.pth"
    (tmp_path / "CodeLlama-7b").mkdir()
    (tmp_path / rel).write_bytes(server.files[rel][:999])
    res = run(["--url", server.signed_url(), "--models", "7b", "--target", str(tmp_path)],
              downloader=downloader, tmp=tmp_path)
    assert res.returncode == 0, res.stderr
    assert_tree(server, tmp_path, ["7b"])


def test_second_run_fetches_nothing(server, downloader, tmp_path):
    args = ["--url", server.signed_url(), "--models", "7b,13b-Python", "--target", str(tmp_path)]
    assert run(args, downloader=downloader, tmp=tmp_path).returncode == 0
    n_files = len(server.gets())
    assert n_files == len(server.files)
    server.log.clear()
    res = run(args, downloader=downloader, tmp=tmp_path)
    assert res.returncode == 0, res.stderr
    assert server.gets() == []  # only HEAD requests
    assert "Already complete" in res.stderr
    assert_tree(server, tmp_path, ["7b", "13b-Python"])


def test_complete_file_when_head_unsupported(server, downloader, tmp_path):
    # Without HEAD the script falls back to a Range GET; 416 means "already complete".
    args = ["--url", server.signed_url(), "--models", "7b", "--target", str(tmp_path)]
    assert run(args, downloader=downloader, tmp=tmp_path).returncode == 0
    server.head_allowed = False
    server.log.clear()
    res = run(args, downloader=downloader, tmp=tmp_path)
    assert res.returncode == 0, res.stderr
    rel = "CodeLlama-7b/consolidated.00.pth"
    assert [g[2] for g in server.gets(rel)] == [f"bytes={len(server.files[rel])}-"]
    assert_tree(server, tmp_path, ["7b"])


def test_expired_link(server, downloader, tmp_path):
    res = run(["--url", server.signed_url("expired-s3cr3t"), "--models", "7b", "--target", str(tmp_path)],
              downloader=downloader, tmp=tmp_path)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "403" in out and "expired" in out
    assert "https://ai.meta.com/resources/models-and-libraries/llama-downloads/" in out
    assert "s3cr3t" not in out


@pytest.mark.parametrize("kind", ["facebook", "safelinks", "no_star"])
def test_redirect_wrapper_rejected_without_network(server, kind, tmp_path):
    real = server.signed_url()
    url = {
        "facebook": "https://l.facebook.com/l.php?u=" + quote(real, safe="") + "&h=AT0abc",
        "safelinks": "https://nam12.safelinks.protection.outlook.com/?url=" + quote(real, safe="") + "&data=x",
        "no_star": real.replace("/*?", "/?"),
    }[kind]
    res = run(["--url", url, "--models", "7b", "--target", str(tmp_path)], tmp=tmp_path)
    assert res.returncode != 0
    assert "copy the URL text" in res.stderr
    assert server.log == []
    assert SECRET not in res.stderr


def test_unknown_model(server, tmp_path):
    res = run(["--url", server.signed_url(), "--models", "7b,8b,13b-Chat", "--target", str(tmp_path)], tmp=tmp_path)
    assert res.returncode != 0
    assert "8b" in res.stderr and "13b-Chat" in res.stderr
    for name in ("7b", "70b", "34b-Python", "13b-Instruct"):
        assert name in res.stderr
    assert server.log == []


def test_checksum_failure_names_file(server, downloader, tmp_path):
    bad = "CodeLlama-13b-Python/consolidated.01.pth"
    server.corrupt.add(bad)
    res = run(["--url", server.signed_url(), "--models", "13b-Python,7b", "--target", str(tmp_path)],
              downloader=downloader, tmp=tmp_path)
    assert res.returncode != 0
    assert "consolidated.01.pth: FAILED" in res.stderr
    assert str(tmp_path / bad) in res.stderr
    assert "Delete" in res.stderr
    # The other model was still downloaded and verified.
    assert_tree(server, tmp_path, ["7b"])


def test_html_page_instead_of_shard(server, downloader, tmp_path):
    rel = "CodeLlama-7b/consolidated.00.pth"
    server.html.add(rel)
    res = run(["--url", server.signed_url(), "--models", "7b", "--target", str(tmp_path)],
              downloader=downloader, tmp=tmp_path)
    assert res.returncode != 0
    assert "HTML" in res.stderr and rel in res.stderr
    assert not (tmp_path / rel).exists()
    assert (tmp_path / (rel + ".error.html")).exists()


def test_missing_downloader(server, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "cat", "head", "tr", "wc", "mkdir", "rm", "mv", "md5sum"):
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    res = run(["--url", server.signed_url(), "--models", "7b", "--target", str(tmp_path / "w")],
              path=str(bindir), tmp=tmp_path)
    assert res.returncode != 0
    assert "wget" in res.stderr and "curl" in res.stderr
    assert server.log == []


def test_forced_downloader_must_exist(server, tmp_path):
    res = run(["--url", server.signed_url(), "--models", "7b"], env={"DOWNLOADER": "aria2c"}, tmp=tmp_path)
    assert res.returncode != 0
    assert "DOWNLOADER" in res.stderr


def test_no_url_and_nothing_on_stdin(tmp_path):
    res = subprocess.run([BASH, str(SCRIPT), "--models", "7b", "--target", str(tmp_path)], cwd=REPO,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert res.returncode != 0
    assert "--url" in res.stderr and "PRESIGNED_URL" in res.stderr


def test_unknown_flag():
    res = run(["--size", "7b"])
    assert res.returncode != 0
    assert "--help" in res.stderr
