"""LoRA adapters traded with Hugging Face PEFT: checked against real `peft` and `transformers`."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from helpers import sharp_model
from scratchgpt import load_adapter, replace_linear_with_lora, save_adapter
from scratchgpt.cli import main
from scratchgpt.gpt2.hf import load_hf_gpt2, save_hf_gpt2
from scratchgpt.gpt2.peft import read_peft_adapter, save_peft_adapter
from scratchgpt.lora import lora_layers, read_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(7))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(ids)
    return getattr(out, "logits", out)


def randomise(params, seed: int) -> None:
    """Random values where training would have put them (LoRA's B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def adapted(tmp_path, targets=("query", "value", "out_proj", "ff_in", "ff_out")):
    """A tiny GPT-2-layout model with a trained-looking LoRA, its adapter file, and its base exported for HF."""
    save_hf_gpt2(sharp_model(tie_weights=True), tmp_path / "hf")
    model = replace_linear_with_lora(sharp_model(tie_weights=True), rank=4, alpha=8, targets=targets)
    randomise([layer.lora.B for layer in lora_layers(model).values()], seed=1)
    save_adapter(tmp_path / "adapter.pt", model, source="tiny")
    return model, tmp_path / "adapter.pt"


def peft_model(hf_folder, adapter_folder):
    base = transformers.GPT2LMHeadModel.from_pretrained(hf_folder, attn_implementation="eager")
    return peft.PeftModel.from_pretrained(base, adapter_folder).eval()


def test_export_loads_in_peft_with_the_same_logits_and_merges_there_too(tmp_path):
    model, adapter = adapted(tmp_path)
    assert main(["convert", str(adapter), str(tmp_path / "peft"), "--to", "peft"]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"]["transformer.h.0.attn.c_attn"] == 8  # query and value: rank 4 + 4

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fan_in_fan_out correction, no unmatched keys
        theirs = peft_model(tmp_path / "hf", tmp_path / "peft")
    ours = logits(model)
    torch.testing.assert_close(logits(theirs), ours, rtol=0, atol=1e-4)
    c_attn_b = theirs.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight
    assert torch.count_nonzero(c_attn_b[48:96]) == 0  # no adapter on key: block-diagonal B, zero rows
    torch.testing.assert_close(logits(theirs.merge_and_unload()), ours, rtol=0, atol=1e-4)  # fan_in_fan_out right


def test_import_of_an_adapter_made_by_peft(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=120, n_positions=24, n_embd=32, n_layer=2, n_head=4)).eval()
    randomise(hf.parameters(), seed=2)
    hf.save_pretrained(tmp_path / "hf")
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                             use_rslora=True, alpha_pattern={"mlp.c_proj": 2})
    theirs = peft.get_peft_model(hf, config)
    randomise([p for name, p in theirs.named_parameters() if "lora_" in name], seed=3)
    theirs.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(4))

    ours = load_hf_gpt2(tmp_path / "hf")
    load_adapter(tmp_path / "peft", ours)  # a PEFT folder is an adapter too
    assert len(lora_layers(ours)) == 2 * 6
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-4)

    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "imported.pt"), "--to", "lora"]) == 0
    again = load_hf_gpt2(tmp_path / "hf")
    load_adapter(tmp_path / "imported.pt", again)
    assert torch.equal(logits(again, ids), logits(ours, ids))


def test_round_trip_keeps_every_tensor_and_the_base_it_checks(tmp_path):
    model, adapter = adapted(tmp_path, targets=("key", "ff_out"))
    save_peft_adapter(read_adapter(adapter), tmp_path / "peft")
    original, back = read_adapter(adapter), read_peft_adapter(tmp_path / "peft")
    assert back["layers"] == original["layers"] and back["base"] == original["base"]
    assert back["adapter_state_dict"].keys() == original["adapter_state_dict"].keys()
    for name, tensor in original["adapter_state_dict"].items():
        assert torch.equal(back["adapter_state_dict"][name], tensor), name
    with pytest.raises(ValueError, match="the adapter was made for another base"):
        load_adapter(tmp_path / "peft", sharp_model(seed=5, tie_weights=True))


def test_what_has_no_peft_counterpart_is_refused(tmp_path):
    _, adapter = adapted(tmp_path, targets=("query", "out_head"))
    with pytest.raises(ValueError, match="a LoRA adapter on out_head has no PEFT GPT-2 counterpart"):
        save_peft_adapter(read_adapter(adapter), tmp_path / "peft")
    head = replace_linear_with_lora(sharp_model(), rank=2, alpha=2, targets=["query"], modules_to_save=["final_norm"])
    save_adapter(tmp_path / "norm.pt", head)
    with pytest.raises(ValueError, match=r"trains \['final_norm.scale', 'final_norm.shift'\] in full"):
        save_peft_adapter(read_adapter(tmp_path / "norm.pt"), tmp_path / "peft")

    _, adapter = adapted(tmp_path)
    save_peft_adapter(read_adapter(adapter), tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    for change, message in [({"use_dora": True}, "unsupported use_dora"),
                            ({"modules_to_save": ["score"]}, "unsupported modules_to_save"),
                            ({"peft_type": "IA3"}, "unsupported peft_type 'IA3'")]:
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            read_peft_adapter(tmp_path / "peft")
        config_path.write_text(json.dumps(config))
