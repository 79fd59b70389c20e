"""Classification fine-tuning (the walkthrough's chapter 6), for any labels and any file.

The output head becomes `Linear(emb_dim, n_classes)` (`replace_head`) and a text's class
logits are those of its **last real token**: with causal attention that is the only
position that has seen the whole text, and it is unaffected by the padding after it. The
walkthrough reads the last position of padded rows instead, so its predictions change with
the amount of padding; here a text gets the same probabilities alone or in any batch.

Labels may be strings or integers; their names, in class-index order, are the task's `meta`
and so stored in every checkpoint, where `load_model_from_checkpoint` finds them to rebuild
the head and `scratchgpt classify` to name its predictions.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..kernels import Linear
from ..tokenizer import ENDOFTEXT_ID
from .base import Batch, ExampleTask
from .records import DELIMITERS, Records, long_records, read_records, read_text, train_val_records


# --------------------------------------------------------------------------- data

def load_classification_data(path: str | os.PathLike, text_column: str = "text",
                             label_column: str = "label") -> Records:
    """Records {"text", "label"} from the named columns of a CSV, TSV, JSON lines or JSON list
    file. Columns given as numbers ("1", "0") mean a CSV/TSV without a header row (such as the
    walkthrough's SMS spam collection). Errors name the file and line."""
    header = not (text_column.isdigit() and label_column.isdigit())
    records = read_records(path, header=header)
    items = []
    for i, record in enumerate(records.items):
        text, label = _text(records, i, text_column), _column(records, i, label_column)
        if isinstance(label, str):
            label = label.strip()
            if not label:
                raise records.error(i, "empty label")
        elif isinstance(label, bool) or not isinstance(label, int):
            raise records.error(i, f"a label must be a string or an integer, got {label!r}")
        items.append({"text": text, "label": label})
    return Records(records.path, items, records.where)


def _column(records: Records, index: int, column: str) -> Any:
    record = records.items[index]
    if record.get(column) is None:
        raise records.error(index, f"missing column {column!r} (has: {', '.join(record) or 'nothing'})")
    return record[column]


def _text(records: Records, index: int, column: str) -> str:
    text = _column(records, index, column)
    if not isinstance(text, str):
        raise records.error(index, f"the text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise records.error(index, "empty text")
    return text


def read_texts(path: str | os.PathLike, text_column: str = "text") -> list[str]:
    """Texts to classify: the `text_column` of a CSV, TSV or JSON (lines) file, else each
    non-empty line of a text file."""
    path = Path(path)
    if path.suffix.lower() in (*DELIMITERS, ".json", ".jsonl"):
        records = read_records(path, header=not text_column.isdigit())
        return [_text(records, i, text_column) for i in range(len(records))]
    texts = [line for line in read_text(path).splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path}: holds no text")
    return texts


def label_names(train: Records) -> list[str | int]:
    """The classes of a training split, sorted: class i is `label_names(train)[i]`."""
    kinds = [type(item["label"]) for item in train.items]
    for i, kind in enumerate(kinds):
        if kind is not kinds[0]:
            raise train.error(i, f"label {train.items[i]['label']!r} is a {kind.__name__}, but "
                                 f"{train.where[0]}'s is a {kinds[0].__name__}: use one kind of label")
    names = sorted({item["label"] for item in train.items})
    if len(names) < 2:
        raise ValueError(f"{train.path}: a classifier needs at least two classes; the training records "
                         f"have only {names!r}")
    return names


def check_labels(records: Records, labels: Sequence[str | int]) -> None:
    """Raise naming the first record whose label is not one of `labels` (the training split's)."""
    known = set(labels)
    for i, item in enumerate(records.items):
        if item["label"] not in known:
            raise records.error(i, f"label {item['label']!r} does not occur in the training data "
                                   f"(labels: {', '.join(map(str, labels))})")


def balance(records: Records, seed: int) -> Records:
    """The walkthrough's create_balanced_dataset for any number of classes: every class
    undersampled, at random (seeded), to the size of the smallest; file order is kept."""
    by_label: dict[Any, list[int]] = {}
    for i, item in enumerate(records.items):
        by_label.setdefault(item["label"], []).append(i)
    smallest = min(len(indices) for indices in by_label.values())
    gen = torch.Generator().manual_seed(seed)
    kept = []
    for label in sorted(by_label):
        indices = by_label[label]
        kept += [indices[j] for j in torch.randperm(len(indices), generator=gen)[:smallest].tolist()]
    return records.subset(sorted(kept))


class ClassificationDataset(Dataset):
    """The walkthrough's SpamDataset for any labels: each text's token ids and its class index.

    Texts are not padded here (each batch pads to its own longest, `classification_collate_fn`)
    and are encoded as text: a literal "<|endoftext|>" is not the padding token.
    """

    def __init__(self, records: Records, tokenizer: tiktoken.Encoding, labels: Sequence[str | int]):
        index = {name: i for i, name in enumerate(labels)}
        self.encoded_texts = [tokenizer.encode_ordinary(item["text"]) for item in records.items]
        self.labels = [index[item["label"]] for item in records.items]

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.encoded_texts[index], self.labels[index]

    def __len__(self) -> int:
        return len(self.labels)


def classification_collate_fn(batch: Sequence[tuple[Sequence[int], int]], pad_token_id: int = ENDOFTEXT_ID,
                              allowed_max_length: int | None = None) -> Batch:
    """(inputs [B, T] padded with `pad_token_id` to the longest text, lengths [B] of the real
    tokens, labels [B]); texts longer than `allowed_max_length` keep their first tokens."""
    texts = [list(tokens)[:allowed_max_length] for tokens, _ in batch]
    lengths = torch.tensor([len(tokens) for tokens in texts])
    inputs = torch.full((len(batch), int(lengths.max())), pad_token_id, dtype=torch.long)
    for row, tokens in enumerate(texts):
        inputs[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return inputs, lengths, torch.tensor([label for _, label in batch])


# --------------------------------------------------------------------------- the model

def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the output head by a new `Linear(emb_dim, num_classes)` on the model's device (the
    walkthrough's `model.out_head = torch.nn.Linear(...)`); returns the model."""
    weight = model.tok_emb.weight
    model.out_head = Linear(model.cfg.emb_dim, num_classes).to(weight.device, weight.dtype)
    return model


def set_trainable_layers(model: nn.Module, train_layers: str = "last-1") -> None:
    """What fine-tuning updates: "all" parameters, or "last-N": the last N transformer blocks, the
    final norm and the head, everything else frozen ("last-1" is the walkthrough's choice;
    "last-0" trains the norm and head alone)."""
    n_layers = len(model.trf_blocks)
    if train_layers == "all":
        model.requires_grad_(True)
        return
    count = train_layers.removeprefix("last-")
    if not (train_layers.startswith("last-") and count.isdigit() and int(count) <= n_layers):
        raise ValueError(f"--train-layers must be 'all' or 'last-N' with N from 0 to {n_layers}, got {train_layers!r}")
    model.requires_grad_(False)
    for module in [*model.trf_blocks[n_layers - int(count):], model.final_norm, model.out_head]:
        module.requires_grad_(True)


def last_token_logits(model: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Class logits [B, C] of each row's last real token (position `lengths - 1`; the last
    position when `lengths` is None, as for unpadded or equal-length rows)."""
    logits = model(inputs)  # [B, T, C]
    if lengths is None:
        return logits[:, -1, :]
    return logits[torch.arange(inputs.shape[0], device=logits.device), lengths.to(logits.device) - 1]


def _unpack(batch: Sequence[torch.Tensor], device: torch.device | str
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(inputs, lengths or None, labels) on `device` from our 3-tuples or the walkthrough's 2-tuples."""
    inputs, *lengths, labels = batch
    return inputs.to(device), (lengths[0].to(device) if lengths else None), labels.to(device)


def calc_accuracy_loader(data_loader: DataLoader, model: nn.Module, device: torch.device | str,
                         num_batches: int | None = None) -> float:
    """The walkthrough's accuracy over the first `num_batches` batches (all when None), reading
    each row's last real token. Batches are (inputs, lengths, labels) from
    `classification_collate_fn`, or the walkthrough's (inputs, labels) of equal-length rows."""
    was_training = model.training
    model.eval()
    correct, seen = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    with torch.no_grad():
        for i, batch in enumerate(data_loader):
            if i >= num_batches:
                break
            inputs, lengths, labels = _unpack(batch, device)
            predicted = last_token_logits(model, inputs, lengths).argmax(dim=-1)
            correct += int((predicted == labels).sum())
            seen += labels.shape[0]
    model.train(was_training)
    return correct / seen


@torch.no_grad()
def classify_probabilities(texts: Sequence[str], model: nn.Module, tokenizer: tiktoken.Encoding,
                           max_length: int | None = None, batch_size: int = 16) -> torch.Tensor:
    """Class probabilities [N, C] of `texts` (batched; padding changes nothing). Texts longer
    than `max_length` (default: the model's context) keep their first tokens."""
    device = model.tok_emb.weight.device
    max_length = min(max_length or model.cfg.context_length, model.cfg.context_length)
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = [(tokenizer.encode_ordinary(text), 0) for text in texts[start:start + batch_size]]
        if not all(tokens for tokens, _ in batch):
            raise ValueError("cannot classify an empty text")
        inputs, lengths, _ = classification_collate_fn(batch, allowed_max_length=max_length)
        rows.append(torch.softmax(last_token_logits(model, inputs.to(device), lengths).float(), dim=-1))
    return torch.cat(rows).cpu()


def classify_review(text: str, model: nn.Module, tokenizer: tiktoken.Encoding, device: torch.device | str,
                    max_length: int | None = None, labels: Sequence[str | int] = ("not spam", "spam")) -> str | int:
    """The walkthrough's single-text prediction: the name of `text`'s most likely class
    (`labels`: the names in class order, the checkpoint's `task["labels"]`)."""
    model.to(device)
    return labels[int(classify_probabilities([text], model, tokenizer, max_length)[0].argmax())]


# --------------------------------------------------------------------------- the task

class ClassifyTask(ExampleTask):
    """Text classification: cross-entropy of the last real token's class logits; reports accuracy.

    `labels` default to the training split's, sorted; validation labels must be among them.
    Texts longer than `max_length` tokens are truncated or, with on_long="refuse", an error.
    """

    def __init__(self, train: Records, val: Records, tokenizer: tiktoken.Encoding, max_length: int,
                 seed: int = 123, on_long: str = "truncate", labels: Sequence[str | int] | None = None):
        labels = list(labels) if labels is not None else label_names(train)
        check_labels(train, labels)
        check_labels(val, labels)
        self.meta = {"kind": "classify", "labels": labels}
        self.datasets = {"train": ClassificationDataset(train, tokenizer, labels),
                         "val": ClassificationDataset(val, tokenizer, labels)}
        self.max_length, self.seed = max_length, seed
        self.notes = [note for split, recs in (("train", train), ("val", val))
                      for note in long_records(recs, [len(t) for t in self.datasets[split].encoded_texts],
                                               max_length, on_long)]

    @classmethod
    def from_files(cls, data: str | os.PathLike, val_data: str | os.PathLike | None, tokenizer: tiktoken.Encoding,
                   max_length: int, val_fraction: float = 0.1, seed: int = 123, text_column: str = "text",
                   label_column: str = "label", balance_classes: bool = False, on_long: str = "truncate"
                   ) -> "ClassifyTask":
        """The task on a file's records: `val_data`'s for validation, else a seeded `val_fraction` of
        them; with `balance_classes`, each split undersampled to equal classes (`balance`)."""
        load = partial(load_classification_data, text_column=text_column, label_column=label_column)
        train, val = train_val_records(load, data, val_data, val_fraction, seed)
        if balance_classes:
            train, val = balance(train, seed), balance(val, seed)
        return cls(train, val, tokenizer, max_length, seed=seed, on_long=on_long)

    def _batch(self, split: str, indices: Sequence[int]) -> Batch:
        dataset = self.datasets[split]
        return classification_collate_fn([dataset[i] for i in indices], allowed_max_length=self.max_length)


    def _logits(self, model: nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, lengths, labels = _unpack(batch, device)
        return last_token_logits(model, inputs, lengths), labels

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
        logits, labels = self._logits(model, batch, device)
        return F.cross_entropy(logits, labels), labels.shape[0]

    def eval_metrics(self, model: nn.Module, batch: Batch, device: torch.device) -> dict[str, tuple[float, int]]:
        logits, labels = self._logits(model, batch, device)
        count = labels.shape[0]
        loss = F.cross_entropy(logits.float(), labels, reduction="sum").item()
        return {"loss": (loss, count), "accuracy": (float((logits.argmax(-1) == labels).sum()), count)}
