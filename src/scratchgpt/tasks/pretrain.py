"""Next-token prediction on a token array: pre-training, or fine-tuning on plain text."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tiktoken
import torch
from torch import nn

from ..data import TokenWindows, check_corpus_size
from ..generate import generate
from ..tokenizer import text_to_token_ids, token_ids_to_text
from ..train import calc_loss_batch
from .base import Batch, Task, epoch_order


class LanguageModelTask(Task):
    """Windows of `window` tokens (inputs) and the same shifted by one (targets).

    Each epoch cuts the train tokens into non-overlapping windows from a random
    offset and visits them in a random order, both from the seed and the epoch
    alone. Evaluation reads back-to-back windows of each split. The arrays may
    be numpy memmaps (token files): windows are read on demand.
    """

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, window: int, seed: int):
        check_corpus_size({"train": len(train_tokens), "val": len(val_tokens)}, window)
        self.tokens, self.window, self.seed = train_tokens, window, seed
        self.windows_per_epoch = (len(train_tokens) - 1) // window
        self._slack = len(train_tokens) - 1 - self.windows_per_epoch * window  # tokens an epoch's windows skip
        self._plan: tuple[int, int, torch.Tensor] | None = None  # epoch, first token, window order
        self.eval_sets = {name: TokenWindows(tokens, window, window)
                          for name, tokens in (("train", train_tokens), ("val", val_tokens))}

    def epoch_size(self) -> int:
        return self.windows_per_epoch

    def _epoch_plan(self, epoch: int) -> tuple[int, torch.Tensor]:
        if self._plan is None or self._plan[0] != epoch:
            order = epoch_order(self.windows_per_epoch, self.seed, epoch)
            start = int(torch.randint(self._slack + 1, (1,),
                                      generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)))
            self._plan = (epoch, start, order)
        return self._plan[1], self._plan[2]

    def train_batch(self, epoch: int, first: int, count: int) -> Batch:
        start, order = self._epoch_plan(epoch)
        starts = start + order[first:first + count].numpy() * self.window
        rows = self.tokens[starts[:, None] + np.arange(self.window + 1)].astype(np.int64)
        chunk = torch.from_numpy(rows)
        return chunk[:, :-1], chunk[:, 1:]

    def eval_size(self, split: str) -> int:
        return len(self.eval_sets[split])

    def eval_batch(self, split: str, indices: Sequence[int]) -> Batch:
        windows = [self.eval_sets[split][i] for i in indices]
        return torch.stack([w[0] for w in windows]), torch.stack([w[1] for w in windows])

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
        inputs, targets = batch
        return calc_loss_batch(inputs, targets, model, device), int((targets != -100).sum())

    def sample(self, model: nn.Module, tokenizer: tiktoken.Encoding | None, prompt: str,
               max_new_tokens: int, seed: int) -> str | None:
        """A top-k continuation of `prompt` with a fixed seed (global RNGs untouched)."""
        if tokenizer is None:
            return None
        device = model.tok_emb.weight.device
        out = generate(model, text_to_token_ids(prompt, tokenizer).to(device), max_new_tokens, self.window,
                       temperature=0.8, top_k=40, seed=seed)
        return token_ids_to_text(out, tokenizer)
