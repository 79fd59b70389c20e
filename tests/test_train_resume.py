"""`scratchgpt train` as a user runs it: killed and resumed, interrupted, and under torchrun."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import shared_path
from helpers import TRAIN_ENV as ENV, TrainCLI, train_metrics as metrics
from scratchgpt.checkpoint import safe_load
from scratchgpt.cli import main

TINY = ["--corpus", "pydoc", "--n-layers", "2", "--emb-dim", "32", "--n-heads", "2", "--context-length", "32",
        "--drop-rate", "0.1", "--batch-size", "4", "--lr", "2e-3", "--warmup", "5", "--eval-iters", "2",
        "--sample-tokens", "5", "--device", "cpu", "--deterministic"]
IN_PROCESS = [arg for arg in TINY[2:] if arg != "--deterministic"]  # no corpus; leave pytest's torch as is
TRAIN = TrainCLI(*TINY)
train_command, run_train, start_and_wait_for = TRAIN.command, TRAIN.run, TRAIN.start_and_wait_for


def test_sigkill_and_resume_gives_bitwise_the_same_losses(tmp_path, tokenizer):
    steps = ["--max-steps", "24", "--eval-every", "12"]
    run_train(tmp_path / "straight", *steps)

    proc = start_and_wait_for(tmp_path / "killed", "step     12/24", *steps)  # last.pt of step 12 is on disk
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert safe_load(tmp_path / "killed" / "last.pt")["step"] == 12, "killed too late: the run had finished"
    resumed = run_train(tmp_path / "killed", *steps, "--resume")
    assert "resumed from" in resumed.stdout and "at step 12" in resumed.stdout

    straight, killed = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    assert len(straight) == 24 + 3 and straight == killed  # every loss, bitwise (JSON keeps all digits)


def test_sigint_saves_a_checkpoint_and_exits(tmp_path, tokenizer):
    proc = start_and_wait_for(tmp_path, "step      5/", "--max-steps", "100000", "--eval-every", "5")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "continue with the same command and --resume" in out
    state = safe_load(tmp_path / "last.pt")
    assert state["step"] >= 5 and "optimizer_state_dict" in state and "rng_states" in state


def test_errors_are_one_line(tmp_path, tokenizer, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text \xc3\x28 broken")
    cases = {
        ("--data", str(bad)): f"{bad}: invalid UTF-8 at byte 10",
        ("--corpus", "pydoc", "--val-fraction", "0.0002"): "corpus too small: tokens per split: train ",
        ("--corpus", "pydoc", "--resume"): "cannot resume: ",
    }
    for args, message in cases.items():
        assert main(["train", *args, *IN_PROCESS, "--out-dir", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"scratchgpt train: error: {message}") and err.count("\n") == 1, err


def test_prepare_then_train_from_the_token_file(tmp_path, tokenizer, capsys):
    tokens = tmp_path / "pydoc.bin"
    assert main(["prepare", "--corpus", "pydoc", "--out", str(tokens), "--workers", "2"]) == 0
    assert capsys.readouterr().out.startswith("wrote 139,015 tokens to ")
    assert main(["train", "--data", str(tokens), *IN_PROCESS, "--max-steps", "2", "--eval-every", "2",
                 "--out-dir", str(tmp_path / "run")]) == 0
    assert "125,114 train and 13,901 val tokens" in capsys.readouterr().out  # the same split as from text
    assert safe_load(tmp_path / "run" / "last.pt")["step"] == 2


# about 20-30 s (four Python processes start torch), worth it: it is the only check of DDP
def test_two_gloo_processes_match_one_with_the_same_global_batch(tmp_path, tokenizer):
    common = ["--max-steps", "6", "--eval-every", "3", "--drop-rate", "0", "--grad-accum", "2"]
    run_train(tmp_path / "one", *common, "--batch-size", "8")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = train_command(tmp_path / "two", *common, "--batch-size", "4")
    result = subprocess.run(torchrun + ["-m", "scratchgpt.cli"] + command[3:],
                            capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert safe_load(tmp_path / "two" / "last.pt")["world_size"] == 2
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 6 + 3
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and a["step"] == b["step"] and a["tokens"] == b["tokens"]
        for key in ("loss", "train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (key, a, b)


def test_fine_tunes_gpt2_from_an_openai_folder(tmp_path, tokenizer, capsys):
    folder = shared_path("gpt2-tiny-tf")  # a random-weight GPT-2 written by OpenAI's own TensorFlow code
    assert main(["train", "--corpus", "pydoc", "--init", str(folder), "--n-layers", "4",
                 "--out-dir", str(tmp_path / "refused")]) == 1
    assert "fixes the model's shape; drop the flags that change it: ['n_layers']" in capsys.readouterr().err
    command = [sys.executable, "-m", "scratchgpt.cli", "train", "--corpus", "pydoc", "--init", str(folder),
               "--drop-rate", "0.1",
               "--context-length", "32", "--batch-size", "4", "--max-steps", "2", "--eval-every", "2",
               "--eval-iters", "1", "--sample-tokens", "5", "--warmup", "1", "--lr", "1e-3", "--device", "cpu", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    state = safe_load(tmp_path / "last.pt")
    assert state["step"] == 2 and state["train_config"]["context_length"] == 32
    assert {k: state["config"][k] for k in ("n_layers", "emb_dim", "context_length", "qkv_bias", "drop_rate")} == \
        {"n_layers": 2, "emb_dim": 32, "context_length": 64, "qkv_bias": True, "drop_rate": 0.1}  # GPT-2's shape
