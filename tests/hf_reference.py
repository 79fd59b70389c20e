"""An independent reference: Hugging Face's GPT2LMHeadModel holding a GPTModel's weights.

The mapping is written out by hand here (not imported from scratchgpt) so that
tests compare two implementations, not one with itself. HF's Conv1D keeps
weights as [in, out], the transpose of nn.Linear's; its c_attn is the
query, key and value projections side by side.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from scratchgpt import GPTModel


def hf_model_from_gpt(model: GPTModel, attn_implementation: str = "eager") -> GPT2LMHeadModel:
    """A GPT2LMHeadModel computing what `model` computes (eager attention by default: the
    textbook formula; the benchmarks ask for "sdpa", HF's fast default). A model without
    query/key/value biases gets HF's biases set to zero."""
    cfg = model.cfg
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=cfg.drop_rate, embd_pdrop=cfg.drop_rate,
        attn_pdrop=cfg.drop_rate, layer_norm_epsilon=1e-5, activation_function="gelu_new",
        tie_word_embeddings=cfg.tie_weights, bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1,
    )
    hf_cfg._attn_implementation = attn_implementation
    hf = GPT2LMHeadModel(hf_cfg)
    sd = {"transformer.wte.weight": model.tok_emb.weight,
          "transformer.wpe.weight": model.pos_emb.weight,
          "transformer.ln_f.weight": model.final_norm.scale,
          "transformer.ln_f.bias": model.final_norm.shift,
          "lm_head.weight": model.out_head.weight}
    for i, block in enumerate(model.trf_blocks):
        p = f"transformer.h.{i}."
        att = block.att
        sd[p + "attn.c_attn.weight"] = torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight]).T
        sd[p + "attn.c_attn.bias"] = (torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias])
                                      if cfg.qkv_bias else torch.zeros(3 * cfg.emb_dim))
        sd[p + "attn.c_proj.weight"] = att.out_proj.weight.T
        sd[p + "attn.c_proj.bias"] = att.out_proj.bias
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = block.norm1.scale, block.norm1.shift
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = block.norm2.scale, block.norm2.shift
        sd[p + "mlp.c_fc.weight"] = block.ff.layers[0].weight.T
        sd[p + "mlp.c_fc.bias"] = block.ff.layers[0].bias
        sd[p + "mlp.c_proj.weight"] = block.ff.layers[2].weight.T
        sd[p + "mlp.c_proj.bias"] = block.ff.layers[2].bias
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    # HF registers non-weight buffers (attention bias masks) in some versions; weights must all be set
    assert not unexpected, unexpected
    assert not [k for k in missing if k.endswith(("weight", "bias")) and "attn.bias" not in k], missing
    return hf.eval()


def hf_guide_loss(hf, ids: torch.Tensor, context_size: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop, with each window weighted by the tokens it really
    scores (the guide multiplies by trg_len, one more than the labels the shifted loss counts)."""
    n = len(ids)
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + context_size, n)
        trg_len = end - prev_end
        input_ids = ids[begin:end][None].to(hf.device)
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll_sum += loss.item() * scored
        n_scored += scored
        prev_end = end
        if end == n:
            break
    return nll_sum / n_scored, n_scored
