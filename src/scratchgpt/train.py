"""Training: the seed's simple loop for reading, and the `Trainer` for running.

The seed's functions (`calc_loss_batch`, `calc_loss_loader`, `evaluate_model`,
`train_model_simple`) keep its names, printed lines and return values.

`Trainer` is what `scratchgpt train` runs: AdamW with weight decay on 2-D
weights only, linear warm-up then cosine decay, gradient clipping and
accumulation, mixed precision, optional `torch.compile`, DistributedDataParallel
under `torchrun`, periodic evaluation with a sample, JSON-lines metrics, a loss
plot, and checkpoints that resume exactly (model, optimizer, scheduler, scaler,
every RNG state and the data position).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import atomic_save, load_checkpoint, save_checkpoint, save_model, unwrap_model
from .devices import resolve_dtype
from .fileio import atomic_write
from .distributed import all_reduce_sum, any_process, gather_objects, init_distributed
from .generate import generate
from .lora import adapter_checkpoint, base_identity, load_adapter, lora_layers, trained_in_full
from .losses import chunked_head_cross_entropy, logits_cross_entropy, vocab_head
from .plot import plot_history
from .tasks.base import Task
from .tokenizer import text_to_token_ids, token_ids_to_text


# --------------------------------------------------------------------------- the seed's loop

def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device | str) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token predictions over a batch; targets of -100 are skipped.

    Where the model's head is a plain Linear onto the vocabulary (`losses.vocab_head`), the loss
    comes from the final hidden states in chunks (`losses.chunked_head_cross_entropy`): the same
    value and gradients as logits + `F.cross_entropy`, without the [B, T, vocab] logits. The
    forward still goes through `model` itself, so torch.compile and DDP wrappers keep working.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    head = vocab_head(unwrap_model(model))
    if head is None:
        return logits_cross_entropy(model(input_batch), target_batch)
    hidden = model(input_batch, return_hidden=True)
    return chunked_head_cross_entropy(hidden, head.weight, target_batch)


def calc_loss_loader(data_loader: DataLoader, model: nn.Module, device: torch.device | str,
                     num_batches: int | None = None) -> float:
    """Mean of `calc_loss_batch` over the first `num_batches` batches (all when None).

    An empty loader is an error, not the seed's silent `nan`.
    """
    if len(data_loader) == 0:
        raise ValueError("data loader yields no batches: its text is shorter than one sample "
                         "(max_length + 1 tokens) or than batch_size samples with drop_last=True")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total / num_batches


def evaluate_model(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
                   device: torch.device | str, eval_iter: int) -> tuple[float, float]:
    """Train and validation loss over `eval_iter` batches each, without dropout or gradients."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model: nn.Module, tokenizer: tiktoken.Encoding,
                              device: torch.device | str, start_context: str, max_new_tokens: int = 50) -> None:
    """Print the model's greedy continuation of `start_context` on one line, as the seed does."""
    model.eval()
    plain = unwrap_model(model)  # generate needs the GPTModel itself (its cfg and KV cache), not a wrapper
    context_size = plain.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate(plain, encoded, max_new_tokens, context_size)
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))
    model.train()


def train_model_simple(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
                       optimizer: torch.optim.Optimizer, device: torch.device | str, num_epochs: int,
                       eval_freq: int, eval_iter: int, start_context: str,
                       tokenizer: tiktoken.Encoding) -> tuple[list[float], list[float], list[int]]:
    """The seed's loop: evaluate every `eval_freq` steps, print a sample after each epoch.

    Returns (train_losses, val_losses, tokens_seen), one entry per evaluation.
    """
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch + 1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


# --------------------------------------------------------------------------- the trainer's parts

def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW decaying only 2-D weights (matmuls, embeddings), not biases or norms; fused where available."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu", "mps")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at `step`: linear warm-up, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `name` on `device` (None = full fp32).

    auto: bf16 on CUDA where supported, else fp16 (with a gradient scaler); fp32 on CPU and MPS.
    """
    if name == "auto":
        if device.type != "cuda":
            return None
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = resolve_dtype(name)
    return None if dtype == torch.float32 else dtype


def rng_state() -> dict[str, Any]:
    """Every random number generator training touches, in a form `weights_only` loading accepts."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's `random` and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@dataclass
class TrainConfig:
    """Everything about a run except the model and the data."""

    out_dir: str = "runs/train"
    batch_size: int = 8  # sequences per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    context_length: int | None = None  # tokens per training window (default: the model's)
    max_steps: int = 1000  # optimizer steps; the learning-rate schedule spans them
    max_minutes: float | None = None  # stop earlier (with a checkpoint) after this long
    lr: float = 4e-4
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    dtype: str = "auto"  # autocast: auto, fp32, bf16 or fp16
    compile: bool = False
    eval_every: int = 100  # evaluate, sample, plot and checkpoint every this many steps
    eval_iters: int = 10  # batches per split per evaluation
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 40
    seed: int = 123
    deterministic: bool = False
    device: str = "auto"
    resume: bool = False
    init: str | None = None  # where the starting weights came from (gpt2:SIZE, a path): a LoRA run's base

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.lr <= 0:
            raise ValueError(f"need lr > 0 and warmup >= 0, got lr={self.lr}, warmup={self.warmup}")


@dataclass
class TrainResult:
    """How a run ended."""

    step: int
    tokens_seen: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    interrupted: bool
    checkpoint: Path | None
    losses: list[float] = field(default_factory=list)  # training loss of each step run here


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so it can save before leaving;
    a second signal interrupts at once (for a step or evaluation that will not finish)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- the trainer

class Trainer:
    """Trains `model` on a task's data and loss for `config.max_steps` steps.

    `data` is a `tasks.base.Task` (instruction or classification fine-tuning,
    say) or a pair of token arrays (train, val; numpy, possibly memory-mapped)
    for language modelling on windows of `config.context_length` tokens.
    Under `torchrun` each process reads its own share of every batch and only
    rank 0 writes. The output folder holds `last.pt` and `best.pt` (checkpoints),
    `metrics.jsonl`, `loss.png` and, at the end, the seed's `model.pth`.

    A model with LoRA layers (`lora.replace_linear_with_lora`) trains only what
    requires gradients, and its checkpoints hold only that: `last.pt` and
    `best.pt` are adapter files (plus the training state), its base is named by
    `config.init` and checked by a hash of its weights on resume, and the run
    ends with `adapter.pt` instead of `model.pth`.
    """

    def __init__(self, model: nn.Module, data: Task | tuple[np.ndarray, np.ndarray],
                 config: TrainConfig, tokenizer: tiktoken.Encoding | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.dist, self.device = init_distributed(config.device)
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        seed_everything(config.seed + self.dist.rank)

        self.raw_model = unwrap_model(model).to(self.device)
        self.lora_base = (base_identity(self.raw_model, config.init, exclude=trained_in_full(self.raw_model))
                          if lora_layers(self.raw_model) else None)  # the frozen base, hashed once
        self.micro_batches = config.batch_size * self.dist.world_size  # examples per micro-step, all processes
        self.global_batch = self.micro_batches * config.grad_accum  # examples per optimizer step
        self.task = data if isinstance(data, Task) else self._language_model_task(*data)
        if self.task.epoch_size() < self.global_batch:
            raise ValueError(f"{self.task.epoch_size():,} training examples are fewer than one step's "
                             f"{self.global_batch} (batch size x grad accumulation x processes)")

        self.optimizer = make_optimizer(self.raw_model, config.lr, config.weight_decay, config.betas, self.device)
        schedule = (config.warmup, config.max_steps, config.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, *schedule))
        self.amp_dtype = autocast_dtype(config.dtype, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.model: nn.Module = torch.compile(self.raw_model) if config.compile else self.raw_model
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

        self.out_dir = Path(config.out_dir)
        self.step, self.tokens_seen, self.epoch, self.offset = 0, 0, 0, 0
        self.last_step_tokens = 0
        self.best_val_loss: float | None = None
        self.history: dict[str, list] = {"tokens": [], "train": [], "val": []}
        self.last_checkpoint: Path | None = None
        if config.resume:
            self._resume(self.out_dir / "last.pt")
        elif (self.out_dir / "last.pt").exists():  # never overwrite another run's checkpoints by accident
            raise FileExistsError(f"{self.out_dir / 'last.pt'} exists: add --resume to continue that run, "
                                  f"or choose another --out-dir")
        elif self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "metrics.jsonl").write_text("")

    def _language_model_task(self, train_tokens: np.ndarray, val_tokens: np.ndarray) -> Task:
        from .tasks.pretrain import LanguageModelTask  # it builds on this module's calc_loss_batch

        window = self.config.context_length or self.raw_model.cfg.context_length
        if window > self.raw_model.cfg.context_length:
            raise ValueError(f"context_length {window} exceeds the model's "
                             f"{self.raw_model.cfg.context_length} positions")
        return LanguageModelTask(train_tokens, val_tokens, window, self.config.seed)

    # ----------------------------------------------------------------- steps

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_step(self) -> float:
        """One optimizer step over the global batch; returns its mean loss over all processes."""
        cfg, rank = self.config, self.dist.rank
        if self.offset + self.global_batch > self.task.epoch_size():
            self.epoch, self.offset = self.epoch + 1, 0
        self.model.train()
        total = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(cfg.grad_accum):
            first = self.offset + micro * self.micro_batches + rank * cfg.batch_size
            batch = self.task.train_batch(self.epoch, first, cfg.batch_size)
            last = micro == cfg.grad_accum - 1
            sync = nullcontext() if last or not self.dist.enabled else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss, _ = self.task.loss(self.model, batch, self.device)
                self.scaler.scale(loss / cfg.grad_accum).backward()
            total += loss.detach()
            tokens += batch[0].numel()
        mean_loss = all_reduce_sum(total / cfg.grad_accum, self.dist).item() / self.dist.world_size
        if not math.isfinite(mean_loss):
            kept = (f"last good checkpoint {self.last_checkpoint}" if self.last_checkpoint
                    else "no checkpoint was saved yet")
            raise FloatingPointError(f"loss is {mean_loss} at step {self.step + 1}; stopped ({kept}); "
                                     f"try a lower --lr, more --warmup or --dtype fp32")
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.offset += self.global_batch
        self.step += 1
        self.tokens_seen += tokens * self.dist.world_size
        self.last_step_tokens = tokens * self.dist.world_size
        return mean_loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics ("train_loss", "val_loss", ...) over `eval_iters` batches of examples
        spread evenly across each split: the same examples every time (so that evaluations
        compare), shared among the processes, weighted by what each batch scored."""
        self.raw_model.eval()
        results = {}
        for split in ("train", "val"):
            count = min(self.task.eval_size(split), self.config.eval_iters * self.micro_batches)
            picks = np.linspace(0, self.task.eval_size(split) - 1, count).round().astype(int).tolist()
            mine = picks[self.dist.rank::self.dist.world_size]
            sums: dict[str, list[float]] = {}
            for i in range(0, len(mine), self.config.batch_size):
                batch = self.task.eval_batch(split, mine[i:i + self.config.batch_size])
                with self._autocast():
                    metrics = self.task.eval_metrics(self.raw_model, batch, self.device)
                for name, (total, n) in metrics.items():
                    acc = sums.setdefault(name, [0.0, 0.0])
                    acc[0], acc[1] = acc[0] + total, acc[1] + n
            for name in sorted(sums):  # every process reports the same names in the same order
                total = all_reduce_sum(torch.tensor(sums[name], dtype=torch.float64, device=self.device),
                                       self.dist)
                results[f"{split}_{name}"] = (total[0] / total[1]).item()
        self.raw_model.train()
        return results

    def sample(self) -> str | None:
        """What the task shows of the model now (for language models: a seeded top-k continuation)."""
        self.raw_model.eval()
        text = self.task.sample(self.raw_model, self.tokenizer, self.config.sample_prompt,
                                self.config.sample_tokens, self.config.seed)
        self.raw_model.train()
        return text

    # ----------------------------------------------------------------- checkpoints and logs

    def save(self, path: Path) -> None:
        """Write a resumable checkpoint (all processes call this: it gathers their RNG states)."""
        rng_states = gather_objects(rng_state(), self.dist)
        if not self.dist.is_main:
            return
        self._write(path, self.optimizer, task=self.task.meta,
                    train_config=asdict(self.config), step=self.step, tokens_seen=self.tokens_seen,
                    best_val_loss=self.best_val_loss, history=self.history,
                    scheduler_state_dict=self.scheduler.state_dict(),
                    scaler_state_dict=self.scaler.state_dict(), rng_states=rng_states,
                    data_position={"epoch": self.epoch, "offset": self.offset},
                    world_size=self.dist.world_size)
        self.last_checkpoint = path

    def _write(self, path: Path, optimizer: torch.optim.Optimizer | None = None, **extra: Any) -> None:
        """A checkpoint of the whole model, or for a LoRA run only of its adapter (the base
        stays where it came from: copying a large frozen model at every evaluation is the cost
        LoRA avoids)."""
        if self.lora_base is None:
            save_checkpoint(path, self.raw_model, optimizer, **extra)
            return
        state = adapter_checkpoint(self.raw_model, self.lora_base)
        if optimizer is not None:
            state["optimizer_state_dict"] = optimizer.state_dict()
        atomic_save({**state, **extra}, path)

    def _resume(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: {path} not found (run without --resume to start)")
        load = load_adapter if self.lora_base is not None else load_checkpoint
        extra = load(path, self.raw_model, self.optimizer)
        if extra.get("task", {}) != self.task.meta:
            raise ValueError(f"cannot resume: {path} was trained on task {extra.get('task', {})}, "
                             f"not {self.task.meta}")
        self.scheduler.load_state_dict(extra["scheduler_state_dict"])
        self.scaler.load_state_dict(extra["scaler_state_dict"])
        self.step, self.tokens_seen = extra["step"], extra["tokens_seen"]
        self.best_val_loss, self.history = extra["best_val_loss"], extra["history"]
        self.epoch, self.offset = extra["data_position"]["epoch"], extra["data_position"]["offset"]
        if extra["world_size"] == self.dist.world_size:
            set_rng_state(extra["rng_states"][self.dist.rank])
        else:  # a different number of processes: data order is kept, dropout masks cannot be
            seed_everything(self.config.seed + self.dist.rank + self.step)
        self.last_checkpoint = path
        if self.dist.is_main:  # forget the log lines written after this checkpoint
            metrics = self.out_dir / "metrics.jsonl"
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            kept = [line for line in lines if json.loads(line)["step"] <= self.step]
            with atomic_write(metrics) as f:  # a crash here must not lose the whole log
                f.write("".join(line + "\n" for line in kept).encode())
            print(f"resumed from {path} at step {self.step} ({self.tokens_seen:,} tokens seen)")

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _evaluate(self, bar: tqdm, save: bool) -> dict[str, float]:
        """Evaluate and log; with `save`, checkpoint; then plot, print and sample (rank 0).

        The printed line comes last, so once it shows, the checkpoint is on disk.
        """
        metrics = self.evaluate()
        self.history["tokens"].append(self.tokens_seen)
        self.history["train"].append(metrics["train_loss"])
        self.history["val"].append(metrics["val_loss"])
        for name, value in metrics.items():  # the task's other metrics (accuracy, ...), by name
            if not name.endswith("_loss"):
                self.history.setdefault(name, []).append(value)
        self._log({"step": self.step, "tokens": self.tokens_seen, **metrics})
        if save:
            self._save_last_and_best(metrics["val_loss"])
        if self.dist.is_main:
            plot_history(self.history, self.out_dir / "loss.png")
            others = "".join(f" | {name.replace('_', ' ')} {value:.3f}" for name, value in metrics.items()
                             if not name.endswith("_loss"))
            bar.write(f"step {self.step:>6}/{self.config.max_steps} | train loss {metrics['train_loss']:.3f}"
                      f" | val loss {metrics['val_loss']:.3f}{others} | {self.tokens_seen:,} tokens seen")
            sample = self.sample()
            if sample is not None:
                bar.write(f"  sample: {sample!r}")
        return metrics

    def _save_last_and_best(self, val_loss: float) -> None:
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
        self.save(self.out_dir / "last.pt")
        if improved and self.dist.is_main:
            self._write(self.out_dir / "best.pt", task=self.task.meta, step=self.step, val_loss=val_loss,
                        tokens_seen=self.tokens_seen)

    # ----------------------------------------------------------------- the loop

    def train(self) -> TrainResult:
        """Run until `max_steps` (or `max_minutes`, or SIGINT/SIGTERM), evaluating and checkpointing."""
        cfg = self.config
        losses: list[float] = []
        last_eval: dict[str, float] = {}
        started = time.monotonic()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.dist.is_main,
                   dynamic_ncols=True, unit="step")
        interrupted = False
        with _StopSignals() as signals, bar:
            if self.step == 0:  # where the curves start: about ln(vocab_size) for a fresh model
                last_eval = self._evaluate(bar, save=False)
            while self.step < cfg.max_steps:
                step_start = time.monotonic()
                lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
                loss = self._train_step()
                losses.append(loss)
                tokens_per_s = self.last_step_tokens / (time.monotonic() - step_start)
                self._log({"step": self.step, "tokens": self.tokens_seen, "loss": loss, "lr": lr,
                           "tokens_per_s": round(tokens_per_s, 1)})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
                out_of_time = cfg.max_minutes is not None and time.monotonic() - started > 60 * cfg.max_minutes
                interrupted, out_of_time = any_process([signals.received is not None, out_of_time],
                                                       self.dist, self.device)
                if interrupted:  # save and leave at once
                    self.save(self.out_dir / "last.pt")
                    break
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps or out_of_time:
                    last_eval = self._evaluate(bar, save=True)
                if out_of_time:
                    break
        if interrupted and self.dist.is_main:
            print(f"interrupted at step {self.step}: saved {self.out_dir / 'last.pt'}; "
                  f"continue with the same command and --resume")
        if not interrupted and self.dist.is_main:
            if self.lora_base is None:
                save_model(self.out_dir / "model.pth", self.raw_model, task=self.task.meta)
            else:
                self._write(self.out_dir / "adapter.pt", task=self.task.meta)
        return TrainResult(self.step, self.tokens_seen, last_eval.get("train_loss"), last_eval.get("val_loss"),
                           self.best_val_loss, interrupted, self.last_checkpoint, losses)
