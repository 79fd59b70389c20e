"""The GPT-2 downloader against a real HTTP server on 127.0.0.1 that misbehaves on purpose."""

from __future__ import annotations

import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import MINI

from scratchgpt.gpt2.download import GPT2_FILES, DownloadError, download_file, download_gpt2_files
from scratchgpt.gpt2.load import download_and_load_gpt2

FAST = {"backoff": 0.001, "progress": False, "timeout": 10}


def served_files() -> dict[str, bytes]:
    """OpenAI's seven files for "124M": the mini checkpoint, plus stand-ins for the tokenizer and graph files."""
    rng = np.random.default_rng(0)
    files = {name: (MINI / name).read_bytes() for name in GPT2_FILES if (MINI / name).is_file()}
    for name in set(GPT2_FILES) - set(files):
        files[name] = rng.bytes(70_000 + len(name))
    return {f"/124M/{name}": data for name, data in files.items()}


class Faults:
    """What the server does wrong, per URL path, and what it was asked."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.fail_500: Counter = Counter()  # path -> answers of 500 still to give
        self.drop: Counter = Counter()  # path -> responses still to cut off half way
        self.short_always: set[str] = set()  # paths whose body is always cut (a lying Content-Length)
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        faults: Faults = self.server.faults
        wanted = self.headers.get("Range")
        faults.requests.append((self.path, wanted))
        if faults.fail_500[self.path] > 0:
            faults.fail_500[self.path] -= 1
            self.send_error(500)
            return
        if self.path not in faults.files:
            self.send_error(404)
            return
        data, start = faults.files[self.path], 0
        if wanted and not faults.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if faults.drop[self.path] > 0 or self.path in faults.short_always:
            faults.drop[self.path] -= 1
            body = body[:len(body) // 2]  # then the connection closes: HTTP/1.0
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.faults = Faults(served_files())
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def assert_complete(folder: Path, files: dict[str, bytes]) -> None:
    for name in GPT2_FILES:
        assert (folder / name).read_bytes() == files[f"/124M/{name}"], name
    assert not list(folder.glob("*.part"))


def test_fresh_download_then_nothing_is_fetched_again_even_offline(server, tmp_path):
    folder = download_gpt2_files("124M", tmp_path, base_url=server.url, **FAST)
    assert folder == tmp_path / "124M"
    assert_complete(folder, server.faults.files)
    assert len(server.faults.requests) == 7
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    offline = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: connection refused
    closed.close()
    assert download_gpt2_files("124M", tmp_path, base_url=offline, retries=0, **FAST) == folder
    assert len(server.faults.requests) == 7


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path):
    path = "/124M/model.ckpt.data-00000-of-00001"
    server.faults.drop[path] = 2
    download_gpt2_files("124M", tmp_path, base_url=server.url, **FAST)
    assert_complete(tmp_path / "124M", server.faults.files)
    size = len(server.faults.files[path])
    asked = [rng for p, rng in server.faults.requests if p == path]
    assert asked == [None, f"bytes={size // 2}-", f"bytes={size // 2 + (size - size // 2) // 2}-"]


def test_server_that_ignores_range_restarts_the_file_cleanly(server, tmp_path):
    path = "/124M/encoder.json"
    server.faults.drop[path] = 1
    server.faults.ignore_range = True
    download_gpt2_files("124M", tmp_path, base_url=server.url, **FAST)
    assert_complete(tmp_path / "124M", server.faults.files)
    assert [rng is not None for p, rng in server.faults.requests if p == path] == [False, True]


def test_one_500_is_retried(server, tmp_path):
    server.faults.fail_500["/124M/hparams.json"] = 1
    download_gpt2_files("124M", tmp_path, base_url=server.url, **FAST)
    assert_complete(tmp_path / "124M", server.faults.files)


def test_404_is_one_clear_error_and_leaves_no_file(server, tmp_path):
    del server.faults.files["/124M/vocab.bpe"]
    with pytest.raises(DownloadError, match=rf"^{server.url}/124M/vocab.bpe: HTTP 404 .*vocab.bpe"):
        download_gpt2_files("124M", tmp_path, base_url=server.url, **FAST)
    assert not (tmp_path / "124M" / "vocab.bpe").exists()
    assert not (tmp_path / "124M" / "vocab.bpe.part").exists()
    assert sum(p == "/124M/vocab.bpe" for p, _ in server.faults.requests) == 1  # a 404 is not retried


def test_retries_exhausted_name_the_url_and_file(server, tmp_path):
    server.faults.fail_500["/124M/checkpoint"] = 100
    with pytest.raises(DownloadError, match=r"124M/checkpoint: giving up on .*124M/checkpoint after 3 retries: "
                                            r"HTTP 500"):
        download_gpt2_files("124M", tmp_path, base_url=server.url, retries=3, **FAST)
    assert sum(p == "/124M/checkpoint" for p, _ in server.faults.requests) == 4


def test_body_shorter_than_content_length_is_never_given_the_final_name(server, tmp_path):
    path = "/124M/model.ckpt.meta"
    server.faults.short_always.add(path)
    with pytest.raises(DownloadError, match=r"model.ckpt.meta after 2 retries: size \d+ does not match "
                                            r"Content-Length \d+"):
        download_gpt2_files("124M", tmp_path, base_url=server.url, retries=2, **FAST)
    assert not (tmp_path / "124M" / "model.ckpt.meta").exists()
    assert (tmp_path / "124M" / "model.ckpt.meta.part").exists()
    server.faults.short_always.clear()  # the server recovers: the next call resumes the .part
    download_gpt2_files("124M", tmp_path, base_url=server.url, **FAST)
    assert_complete(tmp_path / "124M", server.faults.files)
    assert [rng for p, rng in server.faults.requests if p == path][-1] is not None  # resumed, not restarted


def test_stale_part_longer_than_the_file_is_restarted(server, tmp_path):
    dest = tmp_path / "hparams.json"
    dest.with_name("hparams.json.part").write_bytes(b"x" * 10_000)
    download_file(f"{server.url}/124M/hparams.json", dest, **FAST)
    assert dest.read_bytes() == server.faults.files["/124M/hparams.json"]


def test_connection_refused_is_retried_then_reported(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}/124M/checkpoint"
    closed.close()
    with pytest.raises(DownloadError, match=rf"{url}: giving up on .*checkpoint after 1 retries: .*refused"):
        download_file(url, tmp_path / "checkpoint", retries=1, **FAST)


@pytest.mark.parametrize("size", ["125M", "../124M", "124M/../../x", ""])
def test_unknown_sizes_are_rejected_before_any_io(tmp_path, size):
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        download_gpt2_files(size, tmp_path / "models", base_url="http://127.0.0.1:1", **FAST)
    assert not (tmp_path / "models").exists()


def test_download_and_load_gpt2_uses_the_environment_base_url(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_GPT2_BASE_URL", server.url + "/")
    settings, params = download_and_load_gpt2("124M", tmp_path, **FAST)
    assert settings == {"n_vocab": 384, "n_ctx": 32, "n_embd": 16, "n_head": 2, "n_layer": 2}
    assert params["wte"].shape == (384, 16) and len(params["blocks"]) == 2
