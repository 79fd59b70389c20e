"""Hugging Face interop: export that transformers loads, import of what transformers saved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MINI
from safetensors.numpy import load_file, save_file

from scratchgpt import GPTModel
from scratchgpt.gpt2.hf import load_hf_gpt2, save_hf_gpt2
from scratchgpt.gpt2.load import load_gpt2_from_folder

transformers = pytest.importorskip("transformers")


def hf_model(tmp_path: Path, **config) -> tuple["transformers.GPT2LMHeadModel", Path]:
    """A random small GPT2LMHeadModel at 10x init scale (so every weight matters), saved by save_pretrained."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=120, n_positions=24, n_embd=32, n_layer=2, n_head=4, **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(ids).logits


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    model = load_gpt2_from_folder(MINI)
    save_hf_gpt2(model, tmp_path)
    ids = torch.tensor(json.loads((MINI / "reference.json").read_text())["prompts"][0]["ids"])
    with torch.no_grad():
        ours = model(ids)
    theirs = hf_logits(tmp_path, ids)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    np.testing.assert_allclose(theirs[0].numpy(), np.load(MINI / "logits_all.npy"), rtol=0, atol=1e-5)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied: stored once, as HF does


def test_import_of_a_model_saved_by_transformers(tmp_path):
    reference, folder = hf_model(tmp_path)
    model = load_hf_gpt2(folder)
    ids = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=0, atol=1e-5)
    assert model.out_head.weight is model.tok_emb.weight


def test_import_of_the_published_layout_without_the_transformer_prefix(tmp_path):
    reference, folder = hf_model(tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    for i in range(2):  # the published files also carry the old causal-mask buffers
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 24, 24), np.float32))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    ids = torch.arange(24)[None] * 5
    with torch.no_grad():
        torch.testing.assert_close(load_hf_gpt2(folder)(ids), reference(ids).logits, rtol=0, atol=1e-5)


def test_import_of_bfloat16_weights(tmp_path):
    reference, _ = hf_model(tmp_path)
    reference.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = load_hf_gpt2(tmp_path / "bf16")
    assert model.tok_emb.weight.dtype == torch.float32
    ids = torch.arange(24)[None] * 3
    with torch.no_grad():  # the same bf16-rounded weights, computed in fp32 on both sides
        torch.testing.assert_close(model(ids), reference.float()(ids).logits, rtol=0, atol=1e-5)


def test_untied_heads_survive_both_directions(tmp_path):
    reference, folder = hf_model(tmp_path, tie_word_embeddings=False)
    model = load_hf_gpt2(folder)
    assert model.out_head.weight is not model.tok_emb.weight
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, rtol=0, atol=1e-5)
    torch.manual_seed(0)  # a seed-style model: untied head, no qkv biases
    seed_model = GPTModel({"vocab_size": 90, "context_length": 16, "emb_dim": 24, "n_heads": 3, "n_layers": 2,
                           "drop_rate": 0.0, "qkv_bias": False}).eval()
    save_hf_gpt2(seed_model, tmp_path / "seed")
    assert json.loads((tmp_path / "seed" / "config.json").read_text())["tie_word_embeddings"] is False
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "seed", ids[:, :16]), seed_model(ids[:, :16]),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "gelu"}, "unsupported activation_function 'gelu'"),
    ({"n_inner": 100}, "unsupported n_inner 100"),
    ({"model_type": "llama"}, "model_type 'llama' is not gpt2"),
])
def test_configs_gptmodel_cannot_run_are_refused(tmp_path, change, message):
    _, folder = hf_model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        load_hf_gpt2(folder)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        load_hf_gpt2(tmp_path)


def test_an_untied_head_of_the_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = hf_model(tmp_path, tie_word_embeddings=False)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:1].contiguous()  # [1, E]: copy_ would broadcast it
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lm_head.weight has shape \(1, 32\), the model needs \(120, 32\)"):
        load_hf_gpt2(folder)
