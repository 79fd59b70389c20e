"""The GPT-2 tokenizer: OpenAI's own encodings (TF fixtures), round trips, offline resolution."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import shared_path
from scratchgpt import text_to_token_ids, token_ids_to_text
from scratchgpt.tokenizer import VocabularyNotFound, get_tokenizer, vocab_source


@pytest.mark.parametrize("text", [
    "naïve café — Zürich, 日本語のテキスト, emoji 🤖👍 and 👨‍👩‍👧",
    "tabs\tand\n\n\nnewlines   and   runs      of spaces   ",
    "   ",
    "Every effort moves you<|endoftext|>The end",
])
def test_round_trip(tokenizer, text):
    ids = text_to_token_ids(text, tokenizer)
    assert ids.dtype == torch.long and ids.shape[0] == 1
    assert token_ids_to_text(ids, tokenizer) == text


def test_endoftext_is_one_special_token(tokenizer):
    assert text_to_token_ids("<|endoftext|>", tokenizer).tolist() == [[50256]]
    assert tokenizer.n_vocab == 50257


def test_encodings_equal_openais_encoder():
    reference = json.loads((shared_path("gpt2-tiny-tf") / "reference.json").read_text())
    tokenizer = get_tokenizer(shared_path("gpt2-vocab", "gpt2.tiktoken"))
    for case in reference["texts"]:
        if "disallowed_special=()" in case.get("note", ""):
            ids = tokenizer.encode(case["text"], disallowed_special=())
        else:
            ids = text_to_token_ids(case["text"], tokenizer)[0].tolist()
        assert ids == case["ids"], case["text"]


def test_a_model_folders_encoder_json_gives_the_same_tokenizer(tmp_path, monkeypatch):
    monkeypatch.delenv("SCRATCHGPT_VOCAB", raising=False)
    folder = tmp_path / "124M"
    folder.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(shared_path("gpt2-vocab", name), folder / name)
    from_folder = get_tokenizer(folder)
    from_ranks = get_tokenizer(shared_path("gpt2-vocab", "gpt2.tiktoken"))
    assert from_folder._mergeable_ranks == from_ranks._mergeable_ranks
    text = "Every effort moves you, naïvely 🤖"
    assert from_folder.encode(text) == from_ranks.encode(text)


def test_environment_variable_wins_over_every_other_source(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_VOCAB", str(tmp_path / "nowhere"))
    assert vocab_source(tmp_path / "elsewhere") == tmp_path / "nowhere"
    with pytest.raises(VocabularyNotFound, match=r"nowhere: no gpt2.tiktoken file .* `scratchgpt vocab`"):
        get_tokenizer(tmp_path / "elsewhere")


def test_a_tampered_vocabulary_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("SCRATCHGPT_VOCAB", raising=False)
    source = vocab_source() or shared_path("gpt2-vocab", "gpt2.tiktoken")
    data = bytearray(source.read_bytes())
    data[100] ^= 1
    (tmp_path / "gpt2.tiktoken").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"gpt2.tiktoken: sha256 [0-9a-f]{64} is not GPT-2's"):
        get_tokenizer(tmp_path / "gpt2.tiktoken")


def test_missing_vocabulary_says_which_command_fixes_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SCRATCHGPT_VOCAB", raising=False)
    monkeypatch.setenv("SCRATCHGPT_CACHE", str(tmp_path))
    monkeypatch.setenv("SCRATCHGPT_OFFLINE", "1")
    with pytest.raises(VocabularyNotFound, match="run `scratchgpt vocab`"):
        get_tokenizer()
