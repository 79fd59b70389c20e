"""Text in, training windows out: the seed's dataset and loader, corpus loading, token files.

Two ways from text to batches:

* the seed's `GPTDatasetV1` / `create_dataloader_v1`, which tokenize one string in memory;
* for the trainer: `load_corpus` reads files, folders or globs (or a built-in corpus)
  and tokenizes them, or `prepare_token_file` tokenizes large corpora in parallel into
  a memory-mapped uint16 file once, so that training streams windows from disk.
  Either way the tokens are split with `split_tokens` (first part train, last part
  validation) and read in windows of the context length (`TokenWindows` here, the
  trainer's shuffled `WindowSampler` for training).
"""

from __future__ import annotations

import codecs
import glob
import itertools
import json
import multiprocessing
import os
import random
import re
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset

from .fileio import atomic_write
from .tokenizer import ENDOFTEXT, get_tokenizer

# Corpora that every CPython ships, so a first run needs no download.
BUILTIN_CORPORA = ("pydoc",)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


class CorpusTooSmall(ValueError):
    """A split holds fewer tokens than one training sample needs."""


# --------------------------------------------------------------------------- windows

class TokenWindows(Dataset):
    """(input, target) pairs of `max_length` tokens from a 1-D token array, `stride` apart.

    The target is the input shifted by one token (next-token prediction). The
    array may be a numpy memmap: windows are read on demand, never all at once.
    """

    def __init__(self, tokens: np.ndarray | Sequence[int], max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length and stride must be >= 1, got {max_length} and {stride}")
        self.tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens, dtype=np.int64)
        self.max_length = max_length
        self.stride = stride
        # as the seed: starts 0, stride, ... while a full target window fits
        self.num_windows = max(0, -(-(len(self.tokens) - max_length) // stride))

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= idx < self.num_windows:
            raise IndexError(f"window {idx} out of range [0, {self.num_windows})")
        start = idx * self.stride
        chunk = torch.from_numpy(self.tokens[start:start + self.max_length + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class GPTDatasetV1(TokenWindows):
    """The seed's dataset: tokenize `txt` (with `<|endoftext|>` allowed) into overlapping windows."""

    def __init__(self, txt: str, tokenizer: tiktoken.Encoding, max_length: int, stride: int):
        super().__init__(tokenizer.encode(txt, allowed_special={ENDOFTEXT}), max_length, stride)


def create_dataloader_v1(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                         shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                         tokenizer: tiktoken.Encoding | None = None) -> DataLoader:
    """The seed's loader over `GPTDatasetV1` (GPT-2 tokenizer unless `tokenizer` is given).

    Text shorter than one sample is a `CorpusTooSmall` error here, not an empty loader.
    """
    dataset = GPTDatasetV1(txt, tokenizer or get_tokenizer(), max_length, stride)
    check_corpus_size({"text": len(dataset.tokens)}, max_length)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers)


def check_corpus_size(split_tokens: dict[str, int], max_length: int,
                      samples_needed: dict[str, int] | None = None) -> None:
    """Raise `CorpusTooSmall` unless each split holds its needed windows of `max_length` tokens.

    Called before any loader is built: the seed's loaders silently come out empty
    (and the loss `nan`) when a split is shorter than one window plus its target.
    `samples_needed` maps a split to the non-overlapping windows it must hold (default 1).
    """
    samples_needed = samples_needed or {}
    needed = {name: max_length * samples_needed.get(name, 1) + 1 for name in split_tokens}
    if all(split_tokens[name] >= needed[name] for name in split_tokens):
        return
    counts = ", ".join(f"{name} {n:,}" for name, n in split_tokens.items())
    batches = "".join(f"; {name} needs {needed[name]:,} for {samples_needed[name]} samples"
                      for name in split_tokens if samples_needed.get(name, 1) > 1)
    raise CorpusTooSmall(
        f"corpus too small: tokens per split: {counts}; one sample at max_length={max_length} needs "
        f"{max_length + 1:,} tokens{batches} (use more text, a shorter context length or a smaller batch)"
    )


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split: the first (1 - val_fraction) of the tokens train, the rest validate."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    return tokens[:cut], tokens[cut:]


# --------------------------------------------------------------------------- reading text

def builtin_corpus(name: str) -> str:
    """The text of a corpus that ships with CPython (`pydoc`: the Python reference topics).

    Topics come in a fixed shuffled order, so that the validation split (the end of
    the text) is a sample of all kinds of topics, not the last ones alphabetically.
    """
    if name != "pydoc":
        raise ValueError(f"unknown built-in corpus {name!r}; choose one of {list(BUILTIN_CORPORA)}")
    from pydoc_data.topics import topics

    keys = sorted(topics)
    random.Random(0).shuffle(keys)
    return "\n\n".join(topics[key] for key in keys)


def resolve_text_files(specs: Iterable[str]) -> list[Path]:
    """Files named by paths, folders (their text files, recursively) or glob patterns, sorted."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{spec}: folder holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"{spec}: pattern matches no files")
            files += found
        else:
            raise FileNotFoundError(f"{spec}: no such file, folder or pattern")
    return files


def iter_text(path: str | os.PathLike, errors: str = "strict", chunk_bytes: int = 1 << 22) -> Iterator[str]:
    """Decode a UTF-8 file piece by piece (so that files larger than memory can stream).

    errors="strict": undecodable bytes raise an error naming the file and byte offset.
    errors="replace": they become U+FFFD, with one warning naming the first offset.
    """
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            final = not chunk
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(chunk, final=final)
            except UnicodeDecodeError as exc:
                where = offset - pending + exc.start
                if errors == "strict":
                    raise ValueError(f"{path}: invalid UTF-8 at byte {where} ({exc.reason}); "
                                     f"fix the file or replace undecodable bytes (--encoding-errors replace)"
                                     ) from None
                warnings.warn(f"{path}: invalid UTF-8 at byte {where}; undecodable bytes replaced by U+FFFD",
                              stacklevel=2)
                pending_state = decoder.getstate()
                decoder = codecs.getincrementaldecoder("utf-8")("replace")  # from here on it cannot fail
                decoder.setstate(pending_state)
                text = decoder.decode(chunk, final=final)
            offset += len(chunk)
            if text:
                yield text
            if final:
                return


def read_text_files(files: Sequence[str | os.PathLike], errors: str = "strict") -> str:
    """The files' texts joined by `<|endoftext|>`, as GPT-2 separates documents."""
    return ENDOFTEXT.join("".join(iter_text(f, errors)) for f in files)


def load_corpus(data: Sequence[str] = (), corpus: str | None = None, errors: str = "strict") -> str:
    """The text of a built-in `corpus` or of the files, folders and globs in `data`."""
    if bool(corpus) == bool(data):
        raise ValueError("give exactly one source of text: a built-in corpus or data files")
    return builtin_corpus(corpus) if corpus else read_text_files(resolve_text_files(data), errors)


# --------------------------------------------------------------------------- token files

# Split points where GPT-2's pre-tokenizer splits anyway, so pieces tokenize exactly as the
# whole: after a newline between two non-space characters, or before a space between two.
_SAFE_SPLITS = (re.compile(r"(?<=\S\n)(?=\S)"), re.compile(r"(?<=\S)(?= \S)"))


def _pieces(texts: Iterable[str], piece_chars: int) -> Iterator[str]:
    """Re-cut a stream of text into pieces of about `piece_chars` at token-safe boundaries."""
    buffer = ""
    for text in texts:
        buffer += text
        while len(buffer) >= 2 * piece_chars:
            cut = 0
            for pattern in _SAFE_SPLITS:
                matches = [m.start() for m in pattern.finditer(buffer, piece_chars // 2, piece_chars)]
                if matches:
                    cut = matches[-1]
                    break
            cut = cut or piece_chars  # no safe point in a whole piece: cut anyway
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


def _encode_piece(piece: str) -> np.ndarray:
    return np.asarray(get_tokenizer().encode(piece, allowed_special={ENDOFTEXT}), dtype=np.uint16)


def _document_stream(files: Sequence[Path], errors: str) -> Iterator[str]:
    for i, path in enumerate(files):
        if i:
            yield ENDOFTEXT
        yield from iter_text(path, errors)


def prepare_token_file(out_path: str | os.PathLike, data: Sequence[str] = (), corpus: str | None = None,
                       errors: str = "strict", workers: int | None = None,
                       piece_chars: int = 1 << 20) -> dict:
    """Tokenize text (files, folders, globs or a built-in corpus) into a uint16 token file.

    Pieces of about `piece_chars` characters are tokenized by `workers` processes,
    a few pieces per worker at a time, and appended in order, so memory stays
    bounded however large the corpus is.
    Writes `out_path` (raw little-endian uint16) and `out_path` + ".json" with the
    metadata; returns that metadata.
    """
    if bool(corpus) == bool(data):
        raise ValueError("give exactly one source of text: a built-in corpus or data files")
    files = [] if corpus else resolve_text_files(data)
    texts = iter([builtin_corpus(corpus)]) if corpus else _document_stream(files, errors)
    tokenizer = get_tokenizer()  # fail here, once, if there is no vocabulary
    out_path = Path(out_path)
    meta_path = Path(str(out_path) + ".json")
    meta_path.unlink(missing_ok=True)  # never leave old metadata beside new tokens, even after a crash
    workers = workers or os.cpu_count() or 1
    count = 0
    pieces = _pieces(texts, piece_chars)
    with atomic_write(out_path) as f, multiprocessing.get_context("spawn").Pool(workers) as pool:
        while batch := list(itertools.islice(pieces, 4 * workers)):
            for ids in pool.map(_encode_piece, batch, chunksize=1):
                f.write(ids.astype("<u2").tobytes())
                count += len(ids)
    meta = {"format": "scratchgpt-tokens-v1", "dtype": "uint16", "tokens": count, "tokenizer": "gpt2",
            "vocab_size": tokenizer.n_vocab, "sources": [corpus] if corpus else [str(p) for p in files]}
    with atomic_write(meta_path) as f:
        f.write((json.dumps(meta, indent=2) + "\n").encode())
    return meta


def open_token_file(path: str | os.PathLike) -> np.memmap:
    """Memory-map a file written by `prepare_token_file` (checked against its metadata)."""
    path = Path(path)
    meta_path = Path(str(path) + ".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: no metadata file {meta_path.name}; "
                                f"make token files with `scratchgpt prepare`")
    meta = json.loads(meta_path.read_text())
    size = path.stat().st_size
    if meta.get("format") != "scratchgpt-tokens-v1" or size != 2 * meta["tokens"]:
        raise ValueError(f"{path}: {size} bytes do not match its metadata ({meta.get('tokens')} uint16 tokens)")
    return np.memmap(path, dtype="<u2", mode="r")


def is_token_file(path: str | os.PathLike) -> bool:
    """True for a token file made by `prepare_token_file` (it has its .json beside it)."""
    return Path(path).is_file() and Path(str(path) + ".json").is_file()
