"""OpenAI GPT-2 weights into GPTModel: logits and greedy tokens equal what OpenAI's TensorFlow code produced."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import MINI, gpt2_fixture, shared_path

from scratchgpt import GPTModel, generate
from scratchgpt.gpt2.load import (
    gpt2_config_from_hparams,
    load_gpt2,
    load_gpt2_from_folder,
    load_gpt2_params_from_tf_ckpt,
    load_weights_into_gpt,
    params_from_gpt,
    read_hparams,
    save_gpt2_tf,
)
from scratchgpt.gpt2.tf_checkpoint import TFCheckpointReader, write_tf_checkpoint
from scratchgpt.model import empty_model



@pytest.fixture(scope="module")
def mini_params():
    settings = read_hparams(MINI)
    return settings, load_gpt2_params_from_tf_ckpt(MINI / "model.ckpt", settings)


def build(settings, **overrides) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(gpt2_config_from_hparams(settings, **overrides)).eval()


@pytest.mark.parametrize("name", ["gpt2-mini-tf", "gpt2-tiny-tf"])
def test_logits_match_openais_tensorflow_code(name):
    folder = gpt2_fixture(name)
    reference = json.loads((folder / "reference.json").read_text())
    settings = read_hparams(folder)
    model = build(settings)  # the seed's way: build, then load_weights_into_gpt
    load_weights_into_gpt(model, load_gpt2_params_from_tf_ckpt(folder, settings))
    logits_last = np.load(folder / "logits_last.npy")
    with torch.no_grad():
        for prompt in reference["prompts"]:
            out = model(torch.tensor(prompt["ids"]))
            for row, logits in zip(prompt["logits_last_rows"], out[:, -1]):
                np.testing.assert_allclose(logits.numpy(), logits_last[row], rtol=0, atol=1e-5)
        # logits_all.npy holds every position of one prompt: mini's full_ctx, tiny's all_positions
        all_positions = next(p for p in reference["prompts"] if p["name"] == ("full_ctx" if name == "gpt2-mini-tf"
                                                                               else "all_positions"))
        out = model(torch.tensor(all_positions["ids"]))[0]
        np.testing.assert_allclose(out.numpy(), np.load(folder / "logits_all.npy"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2-mini-tf", "gpt2-tiny-tf"])
def test_greedy_tokens_match_openais_tensorflow_code(name):
    folder = gpt2_fixture(name)
    model = load_gpt2_from_folder(folder)
    for case in json.loads((folder / "reference.json").read_text())["greedy"]:
        prompt = torch.tensor([case["prompt_ids"]])
        out = generate(model, prompt, case["n_new"], context_size=model.cfg.context_length)
        assert out[0, prompt.shape[1]:].tolist() == case["new_ids"], case["name"]


def test_tiny_logits_at_every_position_of_the_full_context():
    folder = shared_path("gpt2-tiny-tf")
    subset = json.loads((folder / "reference.json").read_text())["full_ctx_all_positions_subset"]
    prompt = next(p for p in json.loads((folder / "reference.json").read_text())["prompts"] if p["name"] == "full_ctx")
    with torch.no_grad():
        logits = load_gpt2_from_folder(folder)(torch.tensor(prompt["ids"]))[0]
    assert logits.argmax(-1).tolist() == subset["argmax"]
    np.testing.assert_allclose(logits[:, subset["vocab_ids"]].numpy(), np.array(subset["logits"]), rtol=0, atol=1e-5)


def test_params_have_the_documented_layout(mini_params):
    settings, params = mini_params
    e, v, c = settings["n_embd"], settings["n_vocab"], settings["n_ctx"]
    assert set(params) == {"wte", "wpe", "g", "b", "blocks"} and len(params["blocks"]) == settings["n_layer"]
    assert params["wte"].shape == (v, e) and params["wpe"].shape == (c, e) and params["g"].shape == (e,)
    block = params["blocks"][1]
    assert set(block) == {"attn", "ln_1", "ln_2", "mlp"}
    assert block["attn"]["c_attn"]["w"].shape == (e, 3 * e) and block["attn"]["c_attn"]["b"].shape == (3 * e,)
    assert block["mlp"]["c_proj"]["w"].shape == (4 * e, e) and block["ln_2"]["g"].shape == (e,)
    reader = TFCheckpointReader(MINI)
    assert np.array_equal(block["mlp"]["c_fc"]["w"], reader["model/h1/mlp/c_fc/w"][0])


def test_untied_seed_style_model_gets_wte_in_both_places(mini_params):
    settings, params = mini_params
    model = build(settings, tie_weights=False)
    load_weights_into_gpt(model, params)
    assert model.out_head.weight is not model.tok_emb.weight
    assert torch.equal(model.out_head.weight, torch.from_numpy(params["wte"]))
    assert torch.equal(model.tok_emb.weight, model.out_head.weight)


@pytest.mark.parametrize("overrides, message", [
    ({"context_length": 16}, r"wpe have shape \[32, 16\], the model expects \[16, 16\]"),
    ({"vocab_size": 400}, r"wte have shape \[384, 16\], the model expects \[400, 16\]"),
    ({"n_layers": 3}, "GPT-2 weights have 2 layers, the model has 3"),
    ({"qkv_bias": False}, "build the model with qkv_bias=True"),
])
def test_a_model_that_does_not_fit_is_refused_clearly(mini_params, overrides, message):
    settings, params = mini_params
    with pytest.raises(ValueError, match=message):
        load_weights_into_gpt(build(settings, **overrides), params)


def test_shape_mismatch_inside_a_layer_names_the_tensor(mini_params):
    settings, params = mini_params
    bad = {**params, "blocks": [dict(b) for b in params["blocks"]]}
    bad["blocks"][1]["mlp"] = {"c_fc": {"w": np.zeros((16, 60), np.float32), "b": np.zeros(60, np.float32)},
                               "c_proj": params["blocks"][1]["mlp"]["c_proj"]}
    with pytest.raises(ValueError, match=r"h1/mlp/c_fc/w have shape \[16, 60\] \(transposed \[60, 16\]\), "
                                         r"the model expects \[64, 16\]"):
        load_weights_into_gpt(build(settings), bad)


def test_missing_tensor_is_named(tmp_path):
    tensors = TFCheckpointReader(MINI).read_all()
    del tensors["model/h1/ln_2/g"]
    write_tf_checkpoint(tmp_path / "model.ckpt", tensors)
    with pytest.raises(ValueError, match="has no tensor 'model/h1/ln_2/g'"):
        load_gpt2_params_from_tf_ckpt(tmp_path, read_hparams(MINI))


def test_model_for_weights_is_filled_by_the_loader(mini_params):
    settings, params = mini_params
    model = empty_model(gpt2_config_from_hparams(settings))
    load_weights_into_gpt(model, params)
    reference = build(settings)
    load_weights_into_gpt(reference, params)
    assert not model.training and model.out_head.weight is model.tok_emb.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_export_to_openai_layout_round_trips_exactly(tmp_path):
    model = load_gpt2_from_folder(MINI)
    save_gpt2_tf(model, tmp_path / "out")
    assert read_hparams(tmp_path / "out") == read_hparams(MINI)
    for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001", "checkpoint"):  # TF's own bytes again
        assert (tmp_path / "out" / name).read_bytes() == (MINI / name).read_bytes(), name
    again = load_gpt2_from_folder(tmp_path / "out")
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_export_refuses_an_untied_head_and_fills_missing_qkv_biases_with_zeros(tmp_path):
    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 50, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1,
                      "drop_rate": 0.0, "qkv_bias": False}).eval()
    with pytest.raises(ValueError, match="ties the output head to wte"):
        save_gpt2_tf(model, tmp_path / "untied")
    assert not np.any(params_from_gpt(model)["blocks"][0]["attn"]["c_attn"]["b"])


def test_load_gpt2_from_a_folder_returns_model_and_its_tokenizer():
    folder = shared_path("gpt2-tiny-tf")
    model, tokenizer = load_gpt2(folder, device="cpu")
    greedy = json.loads((folder / "reference.json").read_text())["greedy"][0]
    assert tokenizer.encode(greedy["text"]) == greedy["prompt_ids"]
    assert model.tok_emb.weight.device.type == "cpu" and not model.training


def test_load_gpt2_rejects_what_is_neither_size_nor_folder(tmp_path):
    with pytest.raises(ValueError, match="neither a GPT-2 size"):
        load_gpt2("125M", models_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="hparams.json: not found"):
        load_gpt2(tmp_path)
