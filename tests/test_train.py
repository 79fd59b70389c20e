"""Training: the seed's loop, and the Trainer really learning, stopping on NaN and refusing bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import tiny_config
from scratchgpt import GPTModel
from scratchgpt.checkpoint import safe_load
from scratchgpt.data import CorpusTooSmall, builtin_corpus, create_dataloader_v1, split_tokens
from scratchgpt.train import (
    TrainConfig,
    Trainer,
    calc_loss_loader,
    lr_factor,
    make_optimizer,
    train_model_simple,
)


def byte_tokens() -> tuple[np.ndarray, np.ndarray]:
    """The pydoc corpus as byte ids (< 256, so any vocab_size >= 256 fits): real text, no tokenizer."""
    return split_tokens(np.frombuffer(builtin_corpus("pydoc").encode(), dtype=np.uint8), 0.1)


def tiny_run(tmp_path, **overrides) -> TrainConfig:
    settings = dict(out_dir=str(tmp_path / "run"), batch_size=8, context_length=32, max_steps=20, warmup=5,
                    lr=3e-3, eval_every=10, eval_iters=2, device="cpu", seed=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_seed_loop_prints_its_lines_and_returns_its_lists(tokenizer, capsys):
    text = builtin_corpus("pydoc")[:6000]
    cut = int(0.9 * len(text))
    train_loader = create_dataloader_v1(text[:cut], batch_size=2, max_length=32, stride=32, tokenizer=tokenizer)
    val_loader = create_dataloader_v1(text[cut:], batch_size=2, max_length=32, stride=32, shuffle=False,
                                      drop_last=False, tokenizer=tokenizer)
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=50257))
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, "cpu", num_epochs=1, eval_freq=5, eval_iter=2,
        start_context="Every effort moves you", tokenizer=tokenizer)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Ep 1 (Step 000000): Train loss ") and ", Val loss " in lines[0]
    assert lines[1].startswith("Ep 1 (Step 000005)")
    assert lines[-1].startswith("Every effort moves you")  # the sample after the epoch
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == len(lines) - 1
    assert tokens_seen[:2] == [64, 6 * 64]


def test_short_text_and_empty_loader_are_errors_not_nan(tokenizer):
    with pytest.raises(CorpusTooSmall, match=r"tokens per split: text 3; one sample at max_length=32 needs 33"):
        create_dataloader_v1("far too short", batch_size=2, max_length=32, tokenizer=tokenizer)
    one_sample = builtin_corpus("pydoc")[:200]  # about 40 tokens: one window, less than a batch of 2
    loader = create_dataloader_v1(one_sample, batch_size=2, max_length=32, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="yields no batches"):
        calc_loss_loader(loader, GPTModel(tiny_config(vocab_size=50257)), "cpu")


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup=10, max_steps=110, min_ratio=0.1) for s in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[60] == pytest.approx(0.55) and factors[110] == factors[119] == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = GPTModel(tiny_config())
    decayed, plain = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu")).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_tiny_model_learns_real_text(tmp_path):
    train_tokens, val_tokens = byte_tokens()
    torch.manual_seed(0)
    model = GPTModel(tiny_config(context_length=64, emb_dim=64))
    config = tiny_run(tmp_path, batch_size=16, context_length=64, max_steps=150, warmup=10, eval_every=50,
                      eval_iters=4)
    result = Trainer(model, (train_tokens, val_tokens), config).train()
    uniform = math.log(384)
    assert result.losses[0] > 0.9 * uniform
    assert result.train_loss < 0.55 * uniform and result.val_loss < 0.6 * uniform, result
    run = tmp_path / "run"
    for name in ("last.pt", "best.pt", "model.pth", "model.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    assert safe_load(run / "last.pt")["step"] == 150


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    train_tokens, val_tokens = byte_tokens()
    model = GPTModel(tiny_config())
    Trainer(model, (train_tokens, val_tokens), tiny_run(tmp_path, max_steps=4, eval_every=4)).train()
    trainer = Trainer(model, (train_tokens, val_tokens), tiny_run(tmp_path, max_steps=8, eval_every=4, resume=True))
    with torch.no_grad():
        trainer.raw_model.final_norm.scale.fill_(float("nan"))  # what a diverged step leaves behind
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    assert str(err.value).startswith("loss is nan at step 5; stopped (last good checkpoint ")
    state = safe_load(tmp_path / "run" / "last.pt")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model_state_dict"].values())


def test_corpus_too_small_fails_before_training(tmp_path):
    train_tokens, val_tokens = byte_tokens()
    expected = r"train [0-9,]+, val 20; one sample at max_length=32 needs 33 tokens"
    with pytest.raises(CorpusTooSmall, match=expected):
        Trainer(GPTModel(tiny_config()), (train_tokens, val_tokens[:20]), tiny_run(tmp_path))
    assert not (tmp_path / "run").exists()


def test_resume_into_another_config_lists_the_mismatch(tmp_path):
    train_tokens, val_tokens = byte_tokens()
    Trainer(GPTModel(tiny_config()), (train_tokens, val_tokens), tiny_run(tmp_path, max_steps=2)).train()
    with pytest.raises(ValueError, match=r"tok_emb.weight: checkpoint \(384, 48\) vs model \(384, 64\)"):
        Trainer(GPTModel(tiny_config(emb_dim=64)), (train_tokens, val_tokens), tiny_run(tmp_path, resume=True))


def test_trains_from_a_memory_mapped_token_file(tmp_path):
    train_tokens, val_tokens = byte_tokens()
    np.concatenate([train_tokens, val_tokens]).astype("<u2").tofile(tmp_path / "tokens.bin")
    mapped = np.memmap(tmp_path / "tokens.bin", dtype="<u2", mode="r")
    torch.manual_seed(0)
    model = GPTModel(tiny_config())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    from_disk = Trainer(model, split_tokens(mapped, 0.1), tiny_run(tmp_path / "a")).train()
    model.load_state_dict(state)
    in_memory = Trainer(model, (train_tokens, val_tokens), tiny_run(tmp_path / "b")).train()
    assert from_disk.losses == in_memory.losses


def test_a_new_run_never_overwrites_a_previous_runs_checkpoints(tmp_path):
    train_tokens, val_tokens = byte_tokens()
    Trainer(GPTModel(tiny_config()), (train_tokens, val_tokens), tiny_run(tmp_path, max_steps=2)).train()
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.suffix in (".pt", ".jsonl")}
    with pytest.raises(FileExistsError, match=r"run/last.pt exists: add --resume to continue that run"):
        Trainer(GPTModel(tiny_config()), (train_tokens, val_tokens), tiny_run(tmp_path, max_steps=2))
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before
