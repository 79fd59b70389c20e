"""`scratchgpt download`, `convert` and `generate --gpt2/--hf`, run through the real entry point."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import ThreadingHTTPServer

import pytest
from conftest import MINI, shared_path
from test_gpt2_download import GPT2_FILES, Faults, Handler, served_files

from scratchgpt.cli import main
from scratchgpt.gpt2.tf_checkpoint import TFCheckpointReader



@pytest.fixture
def serve():
    """Start a loopback HTTP server for a {url path: bytes} dict; returns its base URL."""
    servers = []

    def start(files: dict[str, bytes]) -> str:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.faults = Faults(files)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_download_verb_fetches_the_seven_files(serve, tmp_path, capsys):
    files = served_files()
    url = serve(files)
    assert main(["download", "124M", "--models-dir", str(tmp_path), "--base-url", url]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "124M")
    for name in GPT2_FILES:
        assert (tmp_path / "124M" / name).read_bytes() == files[f"/124M/{name}"]


def test_download_of_a_missing_file_is_one_line_and_status_1(serve, tmp_path, capsys):
    url = serve({})
    assert main(["download", "355M", "--models-dir", str(tmp_path), "--base-url", url]) == 1
    err = capsys.readouterr().err
    assert err == f"scratchgpt download: error: {url}/355M/checkpoint: HTTP 404 Not Found " \
                  f"(fetching {tmp_path / '355M' / 'checkpoint'})\n"


def test_generate_with_gpt2_size_downloads_then_continues_the_prompt_greedily(serve, tmp_path, capsys):
    tiny = shared_path("gpt2-tiny-tf")
    url = serve({f"/124M/{name}": (tiny / name).read_bytes() for name in GPT2_FILES})
    case = json.loads((tiny / "reference.json").read_text())["greedy"][0]
    args = ["generate", "--gpt2", "124M", "--models-dir", str(tmp_path), "--base-url", url, "--device", "cpu",
            "--max-new-tokens", str(case["n_new"]), case["text"]]
    assert main(args) == 0
    from scratchgpt.gpt2.load import tokenizer_for_folder

    tokenizer = tokenizer_for_folder(tiny)
    expected = b"".join(tokenizer.decode_single_token_bytes(t) for t in case["new_ids"]).decode("utf-8", "replace")
    assert capsys.readouterr().out == case["text"] + expected + "\n"


def test_convert_round_trip_openai_hf_checkpoint_openai_is_lossless(tmp_path, capsys):
    steps = [(MINI, tmp_path / "hf", "hf"), (tmp_path / "hf", tmp_path / "model.pt", "checkpoint"),
             (tmp_path / "model.pt", tmp_path / "openai", "openai")]
    for src, dst, fmt in steps:
        assert main(["convert", str(src), str(dst), "--to", fmt]) == 0, capsys.readouterr().err
    assert (tmp_path / "openai" / "model.ckpt.data-00000-of-00001").read_bytes() == \
        (MINI / "model.ckpt.data-00000-of-00001").read_bytes()
    assert json.loads((tmp_path / "openai" / "hparams.json").read_text()) == \
        json.loads((MINI / "hparams.json").read_text())
    assert len(TFCheckpointReader(tmp_path / "openai")) == 28


def test_generate_from_a_converted_hf_folder_uses_its_vocabulary(tmp_path, capsys):
    tiny = shared_path("gpt2-tiny-tf")
    assert main(["convert", str(tiny), str(tmp_path / "hf"), "--from", "openai", "--to", "hf"]) == 0
    assert (tmp_path / "hf" / "encoder.json").is_file()
    case = json.loads((tiny / "reference.json").read_text())["greedy"][0]
    capsys.readouterr()
    assert main(["generate", "--hf", str(tmp_path / "hf"), "--device", "cpu", "--max-new-tokens", "20",
                 case["text"]]) == 0
    via_hf = capsys.readouterr().out
    assert main(["generate", "--gpt2", str(tiny), "--device", "cpu", "--max-new-tokens", "20", case["text"]]) == 0
    assert capsys.readouterr().out == via_hf


def test_convert_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out"), "--to", "hf"]) == 1
    assert capsys.readouterr().err.strip().endswith("neither a checkpoint file, an OpenAI folder (hparams.json) "
                                                    "nor an HF folder (config.json + model.safetensors)")
    shutil.copytree(MINI, tmp_path / "mini")
    assert main(["convert", str(tmp_path / "mini"), str(tmp_path / "mini"), "--to", "openai"]) == 1
    assert "source and destination are the same" in capsys.readouterr().err
