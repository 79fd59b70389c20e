"""LoRA: exact at initialisation, a frozen base, a merge equal to the unmerged model, adapter files that
know their base, and the command line (train, resume after SIGKILL, generate/eval --lora, convert)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from helpers import TRAIN_ENV as ENV, TrainCLI, sharp_model, train_metrics as metrics
from scratchgpt import (
    GPT_CONFIG_124M,
    GPTModel,
    LinearWithLoRA,
    LoRALayer,
    load_adapter,
    merge_lora,
    replace_linear_with_lora,
    save_adapter,
    save_checkpoint,
)
from scratchgpt.checkpoint import load_model_from_checkpoint, safe_load, shape_for_task
from scratchgpt.cli import main
from scratchgpt.data import builtin_corpus, split_tokens
from scratchgpt.lora import LORA_TARGETS, base_parameters, lora_layers
from scratchgpt.model import empty_model
from scratchgpt.tasks.classify import classify_probabilities
from scratchgpt.train import TrainConfig, Trainer
from task_data import classification_records, write_csv

IDS = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(7))


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids)


def trained_lookalike(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every LoRA B random values, as training would (at init B = 0 and LoRA changes nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.B.copy_(0.1 * torch.randn(layer.lora.B.shape, generator=gen))
    return model


# --------------------------------------------------------------------------- the layers


def test_at_initialisation_the_logits_are_the_bases_exactly():
    model = sharp_model(tie_weights=True)
    before = logits(model)
    replace_linear_with_lora(model, rank=4, alpha=8)  # every linear layer, as the walkthrough does
    assert len(lora_layers(model)) == 2 * 6 + 1
    assert torch.equal(logits(model), before)


def test_the_side_path_is_alpha_over_rank_times_x_a_b():
    layer = LoRALayer(in_dim=6, out_dim=5, rank=3, alpha=12)
    assert torch.count_nonzero(layer.B) == 0
    assert layer.A.abs().max() <= 1 / 6**0.5  # Kaiming-uniform with fan-in = in_dim, as PEFT's lora_A
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(layer(x), (12 / 3) * (x @ layer.A @ layer.B), rtol=0, atol=0)
    base = nn.Linear(6, 5)
    wrapped = LinearWithLoRA(base, rank=3, alpha=12)
    wrapped.lora.load_state_dict(layer.state_dict())
    torch.testing.assert_close(wrapped(x), base(x) + layer(x), rtol=0, atol=0)


def test_targets_select_layers_and_freeze_everything_else():
    model = replace_linear_with_lora(sharp_model(), rank=2, alpha=2, targets=["query", "value"])
    assert sorted(lora_layers(model)) == [f"trf_blocks.{i}.att.W_{w}" for i in (0, 1) for w in ("query", "value")]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in name for name in trainable)
    one = replace_linear_with_lora(sharp_model(), rank=2, alpha=2, targets=["trf_blocks.1.ff.layers.2"])
    assert list(lora_layers(one)) == ["trf_blocks.1.ff.layers.2"]
    every = replace_linear_with_lora(sharp_model(), rank=2, alpha=2, targets=["all"])
    assert len(lora_layers(every)) == 13 and set(LORA_TARGETS) == {
        "query", "key", "value", "out_proj", "ff_in", "ff_out", "out_head"}


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "LoRA rank must be an integer >= 1, got 0"),
    ({"targets": ["querry"]}, "LoRA target 'querry' matches no linear layer of this model"),
    ({"modules_to_save": ["out_head"], "targets": ["out_head"]}, "out_head is both a LoRA target and trained in full"),
    ({"modules_to_save": ["head"]}, "module to save 'head' has no parameters in this model"),
])
def test_bad_arguments_are_refused_before_any_layer_changes(kwargs, message):
    model = sharp_model()
    with pytest.raises(ValueError, match=message):
        replace_linear_with_lora(model, **{"rank": 2, "alpha": 4, **kwargs})
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    replace_linear_with_lora(model, rank=2, alpha=4, targets=["query"])
    with pytest.raises(ValueError, match="'query' matches no linear layer.*already wrapped"):
        replace_linear_with_lora(model, rank=2, alpha=4, targets=["query"])


def test_merge_gives_the_plain_model_with_the_same_logits_and_unties_an_adapted_head():
    model = trained_lookalike(replace_linear_with_lora(sharp_model(tie_weights=True), rank=4, alpha=8))
    embedding = model.tok_emb.weight.detach().clone()
    unmerged = logits(model)
    merged = merge_lora(model)
    assert type(merged) is GPTModel and not lora_layers(merged)
    assert merged.state_dict().keys() == GPTModel(merged.cfg).state_dict().keys()  # the seed layout again
    torch.testing.assert_close(logits(merged), unmerged, rtol=0, atol=1e-5)
    assert not merged.cfg.tie_weights and merged.out_head.weight is not merged.tok_emb.weight
    assert torch.equal(merged.tok_emb.weight, embedding)  # the tied head was not merged into the embedding
    assert all(p.requires_grad for p in merged.parameters())


# --------------------------------------------------------------------------- training


def byte_tokens() -> tuple[np.ndarray, np.ndarray]:
    """The pydoc corpus as byte ids (< 256): real text without a tokenizer."""
    return split_tokens(np.frombuffer(builtin_corpus("pydoc").encode(), dtype=np.uint8), 0.1)


@pytest.mark.parametrize("dtype, grad_accum", [("fp32", 1), ("bf16", 2)])
def test_training_moves_only_the_adapter_and_the_merge_keeps_its_logits(tmp_path, dtype, grad_accum):
    model = sharp_model(tie_weights=True)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    replace_linear_with_lora(model, rank=4, alpha=8, targets=["query", "value", "ff_out"], dropout=0.1)
    config = TrainConfig(out_dir=str(tmp_path), batch_size=4, grad_accum=grad_accum, context_length=32, max_steps=4,
                         warmup=1, lr=1e-2, eval_every=2, eval_iters=1, device="cpu", dtype=dtype, init="tiny")
    trainer = Trainer(model, byte_tokens(), config)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for name, p in model.named_parameters() if ".lora." in name}
    result = trainer.train()
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))

    after = base_parameters(model)
    assert after.keys() == base.keys() - {"out_head.weight"}  # tied: one tensor
    assert all(torch.equal(after[name], base[name]) for name in after)  # bit-identical
    assert all(torch.count_nonzero(layer.lora.B) for layer in lora_layers(model).values())  # it trained

    assert (tmp_path / "loss.png").is_file() and not (tmp_path / "model.pth").exists()
    for name in ("last.pt", "best.pt", "adapter.pt"):  # a LoRA run's checkpoints are adapters, not models
        state = safe_load(tmp_path / name)
        assert state["format"] == "scratchgpt-lora" and "model_state_dict" not in state
        assert state["base"]["source"] == "tiny"
    unmerged = logits(model)
    reloaded = sharp_model(tie_weights=True)
    load_adapter(tmp_path / "adapter.pt", reloaded)
    assert torch.equal(logits(reloaded), unmerged)
    torch.testing.assert_close(logits(merge_lora(model)), unmerged, rtol=0, atol=1e-5)


def test_a_new_head_keeps_training_and_goes_into_the_adapter(tmp_path):
    def classifier(seed: int) -> GPTModel:  # the walkthrough's spam classifier: a fresh 2-class head
        model = sharp_model()
        torch.manual_seed(seed)
        model.out_head = nn.Linear(48, 2)
        return model

    model = replace_linear_with_lora(classifier(0), rank=2, alpha=4, targets=["query", "value"],
                                     modules_to_save=["out_head"])
    assert {name for name, p in model.named_parameters() if p.requires_grad and ".lora." not in name} == \
        {"out_head.weight", "out_head.bias"}
    trained_lookalike(model)
    with torch.no_grad():
        model.out_head.weight.add_(1.0)
    save_adapter(tmp_path / "spam.pt", model, source="tiny")
    state = safe_load(tmp_path / "spam.pt")
    assert state["trained_in_full"] == ["out_head.weight", "out_head.bias"]

    reloaded = classifier(1)  # another random head: the adapter's replaces it
    load_adapter(tmp_path / "spam.pt", reloaded)
    assert torch.equal(logits(reloaded), logits(model))
    assert reloaded.out_head.weight.requires_grad and not reloaded.tok_emb.weight.requires_grad
    with pytest.raises(ValueError, match=r"out_head.weight is \[2, 48\] in the adapter, \[384, 48\] in this model"):
        load_adapter(tmp_path / "spam.pt", sharp_model())


def test_the_adapter_of_gpt2_124m_at_rank_8_on_query_and_value_is_small(tmp_path):
    model = empty_model(GPT_CONFIG_124M)  # the weights' values do not matter here, only the shapes
    replace_linear_with_lora(model, rank=8, alpha=16, targets=["query", "value"])
    save_adapter(tmp_path / "adapter.pt", model, source="gpt2:124M")
    size = (tmp_path / "adapter.pt").stat().st_size
    assert 12 * 2 * 2 * 768 * 8 * 4 < size < 1.3e6  # the tensors (1.18 MB) and little else; the model is 650 MB


def test_loading_refuses_another_base_other_shapes_and_other_lora_settings(tmp_path):
    model = trained_lookalike(replace_linear_with_lora(sharp_model(), rank=4, alpha=8, targets=["query", "value"]))
    save_adapter(tmp_path / "a.pt", model, source="runs/base/best.pt")
    cases = [
        (sharp_model(seed=1), r"a.pt: the adapter was made for another base \(its base: runs/base/best.pt\): "
                              r"weights hash [0-9a-f]{12}, this model's [0-9a-f]{12}"),
        (sharp_model(emb_dim=32), r"trf_blocks.0.att.W_query is 32 -> 32 in this model, but the adapter's A and B "
                                  r"are \[48, 4\] and \[4, 48\] \(its base: runs/base/best.pt\)"),
        (sharp_model(n_layers=1), "this model has no linear layer trf_blocks.1.att.W_query"),
        (replace_linear_with_lora(sharp_model(), rank=2, alpha=8, targets=["query", "value"]),
         r"the adapter has rank 4, alpha 8 on 4 layers \(query, value\), this model rank 2, alpha 8"),
    ]
    for other, message in cases:
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            load_adapter(tmp_path / "a.pt", other)
        assert other.state_dict().keys() == before.keys()  # nothing changed
    save_checkpoint(tmp_path / "model.pt", sharp_model())
    with pytest.raises(ValueError, match="model.pt: not a LoRA adapter"):
        load_adapter(tmp_path / "model.pt", sharp_model())
    with pytest.raises(ValueError, match=r"a.pt: is a LoRA adapter, not a model: load its base \(runs/base/best.pt\)"):
        load_model_from_checkpoint(tmp_path / "a.pt")


# --------------------------------------------------------------------------- the command line

RUN = ["--corpus", "pydoc", "--context-length", "32", "--drop-rate", "0.1", "--batch-size", "4", "--lr", "2e-3",
       "--warmup", "2", "--eval-iters", "2", "--sample-tokens", "5", "--device", "cpu", "--deterministic"]
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--lora-targets", "query", "value",
        "out_proj"]
TRAIN = TrainCLI(*RUN)
train_command, run_train, start_and_wait_for = TRAIN.command, TRAIN.run, TRAIN.start_and_wait_for


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A small trained-looking base (GPT-2's vocabulary, so the CLI's tokenizer fits)."""
    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
                      "drop_rate": 0.0, "qkv_bias": True})
    path = tmp_path_factory.mktemp("base") / "base.pt"
    save_checkpoint(path, model)
    return path


def test_sigkill_and_resume_of_a_lora_run_gives_bitwise_the_same_losses(tmp_path, tokenizer, base_checkpoint):
    steps = ["--init", str(base_checkpoint), *LORA, "--max-steps", "8", "--eval-every", "4", "--grad-accum", "2"]
    run_train(tmp_path / "straight", *steps)

    proc = start_and_wait_for(tmp_path / "killed", "step      4/8", *steps)  # last.pt of step 4 is on disk
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert safe_load(tmp_path / "killed" / "last.pt")["step"] == 4, "killed too late: the run had finished"
    resumed = run_train(tmp_path / "killed", *steps, "--resume")
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout

    straight, killed = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    assert len(straight) == 8 + 3 and straight == killed  # every loss, bitwise (JSON keeps all digits)
    adapter = safe_load(tmp_path / "killed" / "adapter.pt")
    assert adapter["base"]["source"] == str(base_checkpoint) and len(adapter["layers"]) == 6
    assert (tmp_path / "killed" / "last.pt").stat().st_size < 200_000  # no copy of the 3.2M-parameter base


def test_full_fine_tuning_starts_from_a_checkpoint_given_to_init(tmp_path, tokenizer, base_checkpoint, capsys):
    assert main(["train", *RUN[:-1], "--init", str(base_checkpoint), "--max-steps", "1", "--eval-every", "1",
                 "--out-dir", str(tmp_path)]) == 0
    assert "3,243,968 parameters" in capsys.readouterr().out  # the base's, not the default model's
    state = safe_load(tmp_path / "last.pt")
    assert state["train_config"]["init"] == str(base_checkpoint) and state["config"]["emb_dim"] == 32
    before = safe_load(base_checkpoint)["model_state_dict"]["trf_blocks.0.att.W_query.weight"]
    change = (state["model_state_dict"]["trf_blocks.0.att.W_query.weight"] - before).abs().max()
    assert 0 < change < 5e-3  # one AdamW step (lr 2e-3) away from the base; a fresh init differs by ~0.1


def test_a_lora_classifier_keeps_its_new_head_and_merges_into_a_checkpoint(tmp_path, tokenizer, base_checkpoint,
                                                                           capsys):
    records = classification_records()
    write_csv(tmp_path / "paragraphs.csv", records[:40] + records[-40:])  # docs first, licenses last
    assert main(["train", "--task", "classify", "--data", str(tmp_path / "paragraphs.csv"), "--init",
                 str(base_checkpoint), "--lora-rank", "4", "--context-length", "64", "--batch-size", "8",
                 "--max-steps", "3", "--eval-every", "3", "--eval-iters", "1", "--device", "cpu",
                 "--out-dir", str(tmp_path / "run")]) == 0
    adapter = safe_load(tmp_path / "run" / "adapter.pt")
    assert adapter["trained_in_full"] == ["out_head.weight", "out_head.bias"]  # the new head, not lost
    assert adapter["adapter_state_dict"]["out_head.weight"].shape == (2, 32)
    assert adapter["task"] == {"kind": "classify", "labels": ["docs", "license"]}

    merged = tmp_path / "merged.pt"
    assert main(["convert", str(base_checkpoint), str(merged), "--to", "checkpoint",
                 "--merge-lora", str(tmp_path / "run" / "adapter.pt")]) == 0
    capsys.readouterr()
    text = "Permission is hereby granted, free of charge, to any person obtaining a copy"
    printed = []
    for source in (["--checkpoint", str(base_checkpoint), "--lora", str(tmp_path / "run" / "adapter.pt")],
                   ["--checkpoint", str(merged)]):
        assert main(["classify", *source, "--device", "cpu", text]) == 0
        printed.append(capsys.readouterr().out.strip().split("\t"))
    model = shape_for_task(load_model_from_checkpoint(base_checkpoint), adapter["task"])
    load_adapter(tmp_path / "run" / "adapter.pt", model)
    expected = classify_probabilities([text], model, tokenizer)[0]
    for label, probability in printed:
        assert label == ["docs", "license"][int(expected.argmax())]
        assert float(probability) == pytest.approx(expected.max().item(), abs=1e-4)
    assert main(["convert", str(base_checkpoint), str(tmp_path / "hf"), "--to", "hf",
                 "--merge-lora", str(tmp_path / "run" / "adapter.pt")]) == 1
    assert "a classifier (labels ['docs', 'license']) has no hf GPT-2 layout" in capsys.readouterr().err


def test_train_refuses_bad_lora_flags_in_one_line(tmp_path, tokenizer, base_checkpoint, capsys):
    plain, lora = tmp_path / "plain", tmp_path / "lora"
    plain.mkdir()
    save_checkpoint(plain / "last.pt", GPTModel({**GPT_CONFIG_124M, "n_layers": 1, "emb_dim": 16, "n_heads": 2}))
    model = replace_linear_with_lora(load_model_from_checkpoint(base_checkpoint), rank=4, alpha=8)
    lora.mkdir()
    save_adapter(lora / "last.pt", model, source=str(base_checkpoint))
    init = ["--init", str(base_checkpoint)]
    cases = [
        ([*init, "--lora-rank", "0"], "LoRA rank must be an integer >= 1, got 0"),
        ([*init, "--lora-alpha", "16"], "--lora-alpha needs --lora-rank"),
        (["--lora-rank", "8"], "--lora-rank adapts a trained model: name it with --init"),
        ([*init, "--lora-rank", "8", "--lora-targets", "query", "ffn"], "LoRA target 'ffn' matches no linear layer"),
        (["--lora-rank", "8", "--resume", "--out-dir", str(plain)],
         f"{plain / 'last.pt'} is not a LoRA run: resume it without the --lora-* flags"),
        (["--resume", "--out-dir", str(lora)], f"{lora / 'last.pt'} is a LoRA run (rank 4, alpha 8 on 13 layers"),
    ]
    for args, message in cases:
        assert main(["train", "--corpus", "pydoc", "--device", "cpu", "--out-dir", str(tmp_path / "x"), *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"scratchgpt train: error: {message}") and err.count("\n") == 1, err


def test_generate_eval_and_convert_use_an_adapter_like_its_merged_model(tmp_path, tokenizer, base_checkpoint, capsys):
    model = trained_lookalike(replace_linear_with_lora(load_model_from_checkpoint(base_checkpoint), rank=4, alpha=8,
                                                       targets=["query", "value", "ff_in"]))
    save_adapter(tmp_path / "adapter.pt", model, source=str(base_checkpoint))
    merged = tmp_path / "merged.pt"
    assert main(["convert", str(base_checkpoint), str(merged), "--to", "checkpoint",
                 "--merge-lora", str(tmp_path / "adapter.pt")]) == 0
    capsys.readouterr()
    prompt = ["--max-new-tokens", "8", "--device", "cpu", "The with statement"]
    corpus = tmp_path / "text.txt"
    corpus.write_text(builtin_corpus("pydoc")[:3000])
    results = {}
    for name, source in {"adapter": ["--checkpoint", str(base_checkpoint), "--lora", str(tmp_path / "adapter.pt")],
                         "merged": ["--checkpoint", str(merged)], "base": ["--checkpoint", str(base_checkpoint)]}.items():
        assert main(["generate", *source, *prompt]) == 0
        text = capsys.readouterr().out
        assert main(["eval", *source, "--data", str(corpus), "--device", "cpu", "--json"]) == 0
        results[name] = text, json.loads(capsys.readouterr().out)["loss"]
    assert results["adapter"][0] == results["merged"][0] != results["base"][0]
    assert results["adapter"][1] == pytest.approx(results["merged"][1], abs=1e-5)
    assert results["adapter"][1] != pytest.approx(results["base"][1], abs=1e-3)

    assert main(["generate", "--checkpoint", str(merged), "--lora", str(tmp_path / "adapter.pt"), *prompt]) == 1
    assert "the adapter was made for another base" in capsys.readouterr().err  # the merged model is not its base


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["torchrun", "compile"])
def test_a_lora_run_under_torchrun_or_compile_matches_the_plain_one(tmp_path, tokenizer, base_checkpoint, variant):
    common = ["--init", str(base_checkpoint), *LORA[:4], "--max-steps", "4", "--eval-every", "2", "--drop-rate", "0",
              "--lora-targets", "query", "value", "ff_out"]
    run_train(tmp_path / "plain", *common, "--batch-size", "8")
    if variant == "compile":
        run_train(tmp_path / variant, *common, "--batch-size", "8", "--compile")
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command = train_command(tmp_path / variant, *common, "--batch-size", "4")
        result = subprocess.run(torchrun + ["-m", "scratchgpt.cli"] + command[3:], capture_output=True, text=True,
                                env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert safe_load(tmp_path / variant / "last.pt")["world_size"] == 2
    plain, other = metrics(tmp_path / "plain"), metrics(tmp_path / variant)
    assert len(plain) == len(other) == 4 + 3
    for a, b in zip(plain, other):
        for key in ("loss", "train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (key, a, b)
    assert safe_load(tmp_path / variant / "adapter.pt")["layers"] == safe_load(tmp_path / "plain" / "adapter.pt")["layers"]
