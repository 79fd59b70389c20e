"""Checkpoints: the seed's file formats, atomic writes under SIGKILL, and loading that never runs code."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import tiny_config
from scratchgpt import GPTModel, load_checkpoint, save_checkpoint
from scratchgpt.checkpoint import atomic_save, load_model_from_checkpoint, safe_load, save_model


def _models_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _trained_pair(seed: int = 0) -> tuple[GPTModel, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = GPTModel(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 384, (2, 8))).sum().backward()
    optimizer.step()
    return model, optimizer


def test_seed_formats_written_by_seed_code_load_here(tmp_path):
    model, optimizer = _trained_pair()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "model_and_optimizer.pth")

    fresh, fresh_opt = _trained_pair(seed=1)
    assert load_checkpoint(tmp_path / "model.pth", fresh) == {}
    assert _models_equal(fresh, model)
    fresh, fresh_opt = _trained_pair(seed=1)
    load_checkpoint(tmp_path / "model_and_optimizer.pth", fresh, fresh_opt)
    assert _models_equal(fresh, model)
    moments = [opt.state_dict()["state"][0]["exp_avg"] for opt in (fresh_opt, optimizer)]
    assert torch.equal(*moments)


def test_files_written_here_load_with_the_seed_code(tmp_path):
    model, optimizer = _trained_pair()
    save_model(tmp_path / "model.pth", torch.compile(model))  # no _orig_mod. prefix on disk
    save_checkpoint(tmp_path / "model_and_optimizer.pth", model, optimizer, step=7)

    seed_model, seed_opt = _trained_pair(seed=1)
    seed_model.load_state_dict(torch.load(tmp_path / "model.pth"))  # the seed's own lines
    assert _models_equal(seed_model, model)
    checkpoint = torch.load(tmp_path / "model_and_optimizer.pth")
    seed_model.load_state_dict(checkpoint["model_state_dict"])
    seed_opt.load_state_dict(checkpoint["optimizer_state_dict"])
    assert checkpoint["step"] == 7 and checkpoint["config"] == GPTModel(tiny_config()).cfg.to_dict()
    assert _models_equal(load_model_from_checkpoint(tmp_path / "model_and_optimizer.pth"), model)


def test_a_broken_config_beside_a_state_dict_is_named(tmp_path):
    save_model(tmp_path / "model.pth", GPTModel(tiny_config()))
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model\.json: not a JSON model config"):
        load_model_from_checkpoint(tmp_path / "model.pth")


def test_a_stale_config_beside_a_state_dict_is_named_in_the_mismatch(tmp_path):
    save_model(tmp_path / "model.pth", GPTModel(tiny_config()))
    save_model(tmp_path / "other.pth", GPTModel(tiny_config(emb_dim=64)))
    (tmp_path / "other.json").replace(tmp_path / "model.json")
    with pytest.raises(ValueError, match=r"model\.pth \(with the config in model\.json\) does not fit"):
        load_model_from_checkpoint(tmp_path / "model.pth")


def test_save_model_refuses_a_json_name(tmp_path):
    with pytest.raises(ValueError, match="would be overwritten by the config"):
        save_model(tmp_path / "weights.json", GPTModel(tiny_config()))
    assert not list(tmp_path.iterdir())


def test_checkpoint_of_another_config_lists_mismatches(tmp_path):
    save_checkpoint(tmp_path / "small.pt", GPTModel(tiny_config()))
    with pytest.raises(ValueError) as wider:
        load_checkpoint(tmp_path / "small.pt", GPTModel(tiny_config(emb_dim=64)))
    with pytest.raises(ValueError) as deeper:
        load_checkpoint(tmp_path / "small.pt", GPTModel(tiny_config(n_layers=3)))
    for err in (wider, deeper):
        assert "\n" not in str(err.value) and "does not fit this model" in str(err.value)
    assert "tok_emb.weight: checkpoint (384, 48) vs model (384, 64)" in str(wider.value)
    assert "missing trf_blocks.2.att.W_query.weight" in str(deeper.value)


class _RunsCode:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_checkpoint_that_runs_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model_state_dict": {"w": torch.zeros(1)}, "extra": _RunsCode(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        load_checkpoint(path, GPTModel(tiny_config()))
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        load_model_from_checkpoint(path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_RunsCode(str(marker))))  # the payload is live: plain unpickling runs it
    assert marker.exists()


_SLOW_WRITE = """
import sys, torch
from scratchgpt.checkpoint import atomic_save
big = {"model_state_dict": {"w": torch.ones(96, 1024, 1024)}}  # 384 MB: long enough to be killed mid-write
print("writing", flush=True)
atomic_save(big, sys.argv[1])
print("done", flush=True)
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"model_state_dict": {"w": torch.arange(4.0)}, "step": 1}, path)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.monotonic() + 30
    while not any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None, "the write never started"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = safe_load(path)
    assert state["step"] == 1 and torch.equal(state["model_state_dict"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the killed write's leftover
    atomic_save({"step": 2}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the next save clears it away


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt", GPTModel(tiny_config()))
