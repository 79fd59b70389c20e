"""The command line, run as a user runs it: a real process, real files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from scratchgpt import GPTModel, load_model_from_checkpoint, save_checkpoint
from scratchgpt.checkpoint import save_model


def run_cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scratchgpt.cli", *args], input=stdin, capture_output=True,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, timeout=120)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 2,
                      "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False})
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model)
    return path


def test_generate_from_a_checkpoint_streams_the_continuation(tokenizer, small_checkpoint):
    result = run_cli("generate", "--checkpoint", str(small_checkpoint), "--max-new-tokens", "8",
                     "--device", "cpu", "Every effort moves you")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Every effort moves you")
    assert len(tokenizer.encode(result.stdout.rstrip("\n"), allowed_special="all")) > 4


def test_generate_from_the_seed_model_pth_finds_its_config_beside_it(tmp_path, tokenizer, small_checkpoint):
    model = load_model_from_checkpoint(small_checkpoint)
    save_model(tmp_path / "model.pth", model)
    assert (tmp_path / "model.json").is_file()
    args = ("generate", "--max-new-tokens", "6", "--device", "cpu", "Every effort moves you")
    from_pth, from_pt = run_cli(*args, "--checkpoint", str(tmp_path / "model.pth")), \
        run_cli(*args, "--checkpoint", str(small_checkpoint))
    assert from_pth.returncode == 0, from_pth.stderr
    assert from_pth.stdout == from_pt.stdout  # same weights, same greedy tokens

    (tmp_path / "model.json").unlink()
    lost = run_cli(*args, "--checkpoint", str(tmp_path / "model.pth"))
    assert lost.returncode != 0
    assert "stores no model config and has no model.json beside it" in lost.stderr


def test_generate_reads_the_prompt_from_stdin_and_samples_reproducibly(tokenizer, small_checkpoint):
    args = ("generate", "--checkpoint", str(small_checkpoint), "--max-new-tokens", "8",
            "--temperature", "1.0", "--top-p", "0.9", "--seed", "3")
    first, second = run_cli(*args, stdin="Hello"), run_cli(*args, stdin="Hello")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("Hello")


def test_generate_compile_gives_the_tokens_of_eager_decoding(tokenizer, small_checkpoint):
    """--compile compiles the steps that the native decode step does not take (here fp16, which it
    does not compute), and leaves the native step to the ones it takes."""
    from scratchgpt.kernels import decode_ops

    args = ("generate", "--checkpoint", str(small_checkpoint), "--max-new-tokens", "12", "--device", "cpu",
            "Every effort moves you")
    fp16 = (*args, "--dtype", "fp16")
    compiled, eager = run_cli(*fp16, "--compile", env={"TORCH_LOGS": "dynamo"}), run_cli(*fp16)
    assert compiled.returncode == 0, compiled.stderr
    assert "start tracing _decode_step" in compiled.stderr  # the decode steps were compiled
    assert compiled.stdout == eager.stdout
    native, eager = run_cli(*args, "--compile", env={"TORCH_LOGS": "dynamo"}), run_cli(*args)
    assert native.returncode == 0, native.stderr
    assert ("start tracing _decode_step" in native.stderr) == (decode_ops() is None)
    assert native.stdout == eager.stdout


def test_bad_option_is_one_clear_line_and_a_nonzero_exit(tokenizer, small_checkpoint):
    result = run_cli("generate", "--checkpoint", str(small_checkpoint), "--temperature", "-1", "Hi")
    assert result.returncode == 1
    assert result.stderr.strip() == "scratchgpt generate: error: temperature must be >= 0 (0 = greedy), got -1.0"


def test_debug_shows_the_traceback_before_or_after_the_verb(small_checkpoint):
    for args in (["--debug", "generate"], ["generate", "--debug"]):
        result = run_cli(*args, "--checkpoint", str(small_checkpoint), "--temperature", "-1", "Hi")
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "temperature must be >= 0" in result.stderr


def test_missing_checkpoint_names_the_file(tmp_path):
    result = run_cli("generate", "--checkpoint", str(tmp_path / "none.pt"), "Hi")
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"checkpoint not found: {tmp_path / 'none.pt'}")


def test_every_verb_has_help(capsys):
    import argparse

    from scratchgpt.cli import build_parser, main

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"generate", "vocab", "download", "convert", "train", "prepare", "eval"} <= set(sub.choices)
    for verb in sub.choices:
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--help"])
        assert exit_info.value.code == 0 and "usage: scratchgpt" in capsys.readouterr().out, verb
