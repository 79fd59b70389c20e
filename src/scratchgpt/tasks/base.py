"""The contract between the Trainer and a task, and the pieces tasks share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import tiktoken
import torch
from torch import nn

Batch = tuple[torch.Tensor, ...]  # a task's batch, on the CPU; its `loss` moves it to the device


class Task(ABC):
    """What a task plugs into the Trainer: its examples, how they batch, and its loss.

    The Trainer owns the rest (optimizer, schedule, precision, DDP, checkpoints,
    logs). Examples are numbered: training reads examples `first..first+count-1`
    of an epoch's order, which must depend only on the epoch (and the task's seed).
    """

    #: the `task` entry of checkpoints: what a model trained on this task needs to be used
    #: (e.g. its prompt style or label names); {} for plain language modelling
    meta: dict = {}

    @abstractmethod
    def epoch_size(self) -> int:
        """Training examples per epoch."""

    @abstractmethod
    def train_batch(self, epoch: int, first: int, count: int) -> Batch:
        """Examples `first..first+count-1` of `epoch`'s order, as one batch."""

    @abstractmethod
    def eval_size(self, split: str) -> int:
        """Examples in `split` ("train" or "val") that evaluation may pick from."""

    @abstractmethod
    def eval_batch(self, split: str, indices: Sequence[int]) -> Batch:
        """The examples `indices` of `split`, as one batch (the same every evaluation)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch's scored items, to backpropagate; how many items were scored)."""

    def eval_metrics(self, model: nn.Module, batch: Batch, device: torch.device) -> dict[str, tuple[float, int]]:
        """Sums and counts of what evaluation reports ({"loss": ...} at least), summed over batches."""
        loss, count = self.loss(model, batch, device)
        return {"loss": (loss.item() * count, count)}

    def sample(self, model: nn.Module, tokenizer: tiktoken.Encoding | None, prompt: str,
               max_new_tokens: int, seed: int) -> str | None:
        """A short text showing what the model does now (None: nothing to show)."""
        return None


class ExampleTask(Task):
    """A task whose examples are items of one dataset per split (`self.datasets["train"]`,
    `["val"]`), shuffled each epoch from `self.seed`; subclasses say how items batch (`_batch`)."""

    datasets: dict[str, Sequence]
    seed: int

    @abstractmethod
    def _batch(self, split: str, indices: Sequence[int]) -> Batch:
        """Items `indices` of `split`, collated."""

    def epoch_size(self) -> int:
        return len(self.datasets["train"])

    def train_batch(self, epoch: int, first: int, count: int) -> Batch:
        order = epoch_order(self.epoch_size(), self.seed, epoch)
        return self._batch("train", order[first:first + count].tolist())

    def eval_size(self, split: str) -> int:
        return len(self.datasets[split])

    def eval_batch(self, split: str, indices: Sequence[int]) -> Batch:
        return self._batch(split, indices)


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of `num_examples` that depends only on the seed and the epoch."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=gen)
