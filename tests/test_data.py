"""Data: the seed's dataset and loader, corpus loading and its errors, token files made in parallel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scratchgpt.data import (
    CorpusTooSmall,
    GPTDatasetV1,
    TokenWindows,
    builtin_corpus,
    check_corpus_size,
    create_dataloader_v1,
    iter_text,
    load_corpus,
    open_token_file,
    prepare_token_file,
    read_text_files,
    resolve_text_files,
    split_tokens,
)


def test_dataset_matches_the_seed(tokenizer):
    text = builtin_corpus("pydoc")[:5000]
    ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    dataset = GPTDatasetV1(text, tokenizer, max_length=16, stride=8)
    starts = list(range(0, len(ids) - 16, 8))  # the seed's loop
    assert len(dataset) == len(starts)
    for i in (0, 1, len(starts) - 1):
        inputs, targets = dataset[i]
        assert inputs.tolist() == ids[starts[i]:starts[i] + 16]
        assert targets.tolist() == ids[starts[i] + 1:starts[i] + 17]


def test_dataloader_batches(tokenizer):
    loader = create_dataloader_v1(builtin_corpus("pydoc")[:20000], batch_size=4, max_length=32, stride=32,
                                  shuffle=False, tokenizer=tokenizer)
    inputs, targets = next(iter(loader))
    assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_windows_stream_from_a_memmap(tmp_path):
    np.arange(100, dtype="<u2").tofile(tmp_path / "t.bin")
    windows = TokenWindows(np.memmap(tmp_path / "t.bin", dtype="<u2", mode="r"), max_length=10, stride=10)
    assert len(windows) == 9  # the seed's rule: a window needs its target token after it
    assert windows[8][1].tolist() == list(range(81, 91))


def test_corpus_too_small_states_tokens_per_split_and_need():
    check_corpus_size({"train": 257, "val": 257}, 256)
    with pytest.raises(CorpusTooSmall) as err:
        check_corpus_size({"train": 1_000, "val": 120}, 256)
    message = str(err.value)
    assert "\n" not in message
    assert "train 1,000, val 120" in message and "max_length=256 needs 257 tokens" in message
    with pytest.raises(CorpusTooSmall, match="train needs 2,049 for 8 samples"):
        check_corpus_size({"train": 2_000, "val": 300}, 256, {"train": 8})


def test_split_is_deterministic():
    tokens = np.arange(1000)
    train, val = split_tokens(tokens, 0.1)
    assert len(train) == 900 and val[0] == 900 and val[-1] == 999
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens(tokens, 1.5)


def test_files_folders_and_globs(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b" / "c.md").write_text("second")
    (tmp_path / "b" / "skip.bin").write_bytes(b"\x00")
    assert resolve_text_files([str(tmp_path / "b")]) == [tmp_path / "b" / "c.md"]
    files = resolve_text_files([str(tmp_path / "*.txt"), str(tmp_path / "b")])
    assert read_text_files(files) == "first<|endoftext|>second"
    for missing in ("nope.txt", "*.nope"):
        with pytest.raises(FileNotFoundError, match="no such file|matches no files"):
            resolve_text_files([str(tmp_path / missing)])
    with pytest.raises(ValueError, match="exactly one source"):
        load_corpus([str(tmp_path / "a.txt")], corpus="pydoc")


def test_bad_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo wörld ".encode() * 10 + b"\xff tail")  # the bad byte lies past several chunks
    with pytest.raises(ValueError) as err:
        "".join(iter_text(path, chunk_bytes=7))
    assert str(err.value).startswith(f"{path}: invalid UTF-8 at byte 140 ")
    with pytest.warns(UserWarning, match="invalid UTF-8 at byte 140"):
        text = "".join(iter_text(path, errors="replace", chunk_bytes=7))
    assert text == "héllo wörld " * 10 + "\ufffd tail"


def test_prepare_tokenizes_in_parallel_exactly_as_one_piece(tmp_path, tokenizer):
    (tmp_path / "one.txt").write_text(builtin_corpus("pydoc")[:60000])
    (tmp_path / "two.txt").write_text("Second document.\n")
    out = tmp_path / "tokens.bin"
    meta = prepare_token_file(out, [str(tmp_path / "*.txt")], workers=2, piece_chars=4000)
    expected = tokenizer.encode(read_text_files(sorted(tmp_path.glob("*.txt"))), allowed_special={"<|endoftext|>"})
    tokens = open_token_file(out)
    assert isinstance(tokens, np.memmap) and tokens.tolist() == expected
    assert meta["tokens"] == len(expected) and json.loads((tmp_path / "tokens.bin.json").read_text()) == meta

    with open(out, "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ValueError, match="do not match its metadata"):
        open_token_file(out)
