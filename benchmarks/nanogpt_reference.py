"""nanoGPT's GPT-2 as its users train it (github.com/karpathy/nanoGPT, model.py and train.py),
restated compactly for the training benchmark's "as users get it" rows.

What matters for speed is kept as nanoGPT has it: one fused query/key/value Linear
(`c_attn`), `scaled_dot_product_attention(is_causal=True)`, PyTorch's exact-erf
`nn.GELU()`, LayerNorm with biases, the head tied to the token embedding, the loss
as `F.cross_entropy` over the full logits, and `configure_optimizers` as written
there (decay on >= 2-D parameters; fused AdamW only when `device_type == "cuda"`,
so a CPU user gets the for-loop AdamW). Its train.py runs CPU training in fp32
(`ctx = nullcontext()` when device_type is "cpu") and clips gradients at 1.0. Dropout
is left out: the benchmark's shapes have none. Its MLP is an `nn.Sequential` here
(nanoGPT names the two Linears c_fc and c_proj).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 bias: bool = True):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd, bias=bias)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay: float, learning_rate: float,
                             betas: tuple[float, float], device_type: str) -> torch.optim.AdamW:
        params = [p for p in self.parameters() if p.requires_grad]
        optim_groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        extra_args = dict(fused=True) if use_fused else dict()
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)


def nanogpt_from_gpt(model) -> GPT:
    """A nanoGPT `GPT` holding a tied, fully biased scratchgpt GPTModel's weights."""
    cfg = model.cfg
    if not (cfg.tie_weights and cfg.qkv_bias):
        raise ValueError("nanoGPT's GPT-2 has a tied head and query/key/value biases")
    gpt = GPT(cfg.vocab_size, cfg.context_length, cfg.n_layers, cfg.n_heads, cfg.emb_dim)
    sd = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight,
          "transformer.ln_f.weight": model.final_norm.scale, "transformer.ln_f.bias": model.final_norm.shift,
          "lm_head.weight": model.out_head.weight}
    for i, block in enumerate(model.trf_blocks):
        p, att = f"transformer.h.{i}.", block.att
        sd[p + "attn.c_attn.weight"] = torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight])
        sd[p + "attn.c_attn.bias"] = torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias])
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = att.out_proj.weight, att.out_proj.bias
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = block.norm1.scale, block.norm1.shift
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = block.norm2.scale, block.norm2.shift
        for j in (0, 2):  # c_fc and c_proj
            sd[p + f"mlp.{j}.weight"], sd[p + f"mlp.{j}.bias"] = block.ff.layers[j].weight, block.ff.layers[j].bias
    gpt.load_state_dict({k: v.detach().clone() for k, v in sd.items()})
    return gpt
