"""GPT-2's byte-pair encoding through tiktoken, resolved offline.

tiktoken would download the vocabulary on first use; this module finds it on
disk first, verifying the published sha256 of whatever file it reads:

1. `$SCRATCHGPT_VOCAB`: a `gpt2.tiktoken` file, or a folder holding one or
   holding OpenAI's `encoder.json` + `vocab.bpe` (wins over every other source);
2. `source`: the same kinds of path, e.g. a GPT-2 model folder;
3. the cache, `$SCRATCHGPT_CACHE/gpt2.tiktoken` (default `~/.cache/scratchgpt`),
   filled by `scratchgpt vocab` from the `openai-whisper` package on PyPI;
4. tiktoken's own download (skipped when `SCRATCHGPT_OFFLINE=1`).

Nothing touches the network at import time.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import tiktoken
import torch

from .fileio import atomic_write

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# Published hashes: tiktoken's r50k_base ranks and OpenAI's two data-gym files.
SHA256 = {
    "gpt2.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# The registry package that ships gpt2.tiktoken (as whisper/assets/gpt2.tiktoken), pinned to the
# sha256 of its source archive so that pip checks it before running any of the package's build code.
WHISPER_PACKAGE = "openai-whisper==20250625"
WHISPER_SDIST_SHA256 = "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96"
PROVISION_HINT = "run `scratchgpt vocab` (fetches it from PyPI) or set SCRATCHGPT_VOCAB to a gpt2.tiktoken file"


class VocabularyNotFound(FileNotFoundError):
    """No GPT-2 vocabulary could be found; the message says how to provide one."""


def cache_dir() -> Path:
    """Where `scratchgpt vocab` stores the vocabulary."""
    return Path(os.environ.get("SCRATCHGPT_CACHE", Path.home() / ".cache" / "scratchgpt"))


def _read_verified(path: Path) -> bytes:
    """The file's bytes, if they are GPT-2's (any `*.tiktoken` name holds the BPE ranks)."""
    kind = "gpt2.tiktoken" if path.suffix == ".tiktoken" else path.name
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[kind]:
        raise ValueError(f"{path}: sha256 {digest} is not GPT-2's {kind} ({SHA256[kind]})")
    return data


def _ranks_from_tiktoken_file(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in _read_verified(path).splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters used in encoder.json."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _ranks_from_encoder_json(folder: Path) -> dict[bytes, int]:
    encoder = json.loads(_read_verified(folder / "encoder.json"))
    _read_verified(folder / "vocab.bpe")  # the merges are implied by the ranks; check it is GPT-2's
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    return {bytes(byte_of[c] for c in token): rank for token, rank in encoder.items() if token != ENDOFTEXT}


def _ranks_from_path(path: Path) -> dict[bytes, int]:
    if path.is_file():
        return _ranks_from_tiktoken_file(path)
    if (path / "gpt2.tiktoken").is_file():
        return _ranks_from_tiktoken_file(path / "gpt2.tiktoken")
    if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
        return _ranks_from_encoder_json(path)
    raise VocabularyNotFound(
        f"{path}: no gpt2.tiktoken file and no encoder.json + vocab.bpe pair there; {PROVISION_HINT}"
    )


def _encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
        explicit_n_vocab=50257,
    )


@lru_cache(maxsize=8)
def _load(path: str | None) -> tiktoken.Encoding:
    if path is not None:
        return _encoding(_ranks_from_path(Path(path)))
    if os.environ.get("SCRATCHGPT_OFFLINE") == "1":
        raise VocabularyNotFound(f"no GPT-2 vocabulary on this machine (SCRATCHGPT_OFFLINE=1); {PROVISION_HINT}")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # tiktoken raises whatever its HTTP client raised
        raise VocabularyNotFound(
            f"no GPT-2 vocabulary on this machine and tiktoken could not download it ({exc.__class__.__name__}); "
            f"{PROVISION_HINT}"
        ) from exc


def vocab_source(source: str | os.PathLike | None = None) -> Path | None:
    """The file or folder `get_tokenizer(source)` reads, or None for tiktoken's download."""
    env = os.environ.get("SCRATCHGPT_VOCAB")
    if env:
        return Path(env)
    if source is not None:
        return Path(source)
    cached = cache_dir() / "gpt2.tiktoken"
    return cached if cached.is_file() else None


def get_tokenizer(source: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """The GPT-2 BPE as a `tiktoken.Encoding`, found offline where possible (see module doc)."""
    path = vocab_source(source)
    return _load(None if path is None else str(path.resolve()))


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding) -> torch.Tensor:
    """Encode text (with `<|endoftext|>` allowed) to a [1, T] LongTensor."""
    encoded = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    return torch.tensor(encoded, dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: tiktoken.Encoding) -> str:
    """Decode a [1, T] or [T] tensor (or a list) of ids back to text."""
    ids = token_ids.squeeze(0).tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    return tokenizer.decode(ids)


def decode_stream(token_ids: Iterable[int], tokenizer: tiktoken.Encoding) -> Iterator[str]:
    """Text pieces as the tokens of `token_ids` arrive, for printing while generating: a token
    may end in the middle of a UTF-8 character, whose bytes wait for the next one."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_ids:
        piece = decoder.decode(tokenizer.decode_single_token_bytes(int(token)))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def provision_vocab(dest_dir: str | os.PathLike | None = None) -> Path:
    """Fetch `gpt2.tiktoken` from the openai-whisper source package on PyPI into the cache.

    Uses pip (so any index or proxy pip is configured with applies), verifies the
    sha256, and writes atomically. Returns the path of the file.
    """
    dest = Path(dest_dir) if dest_dir is not None else cache_dir()
    target = dest / "gpt2.tiktoken"
    if target.is_file():
        _read_verified(target)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        requirement = Path(tmp) / "requirements.txt"
        requirement.write_text(f"{WHISPER_PACKAGE} --hash=sha256:{WHISPER_SDIST_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--require-hashes", "--dest", tmp, "-r", str(requirement)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"`pip download {WHISPER_PACKAGE}` failed: {last}")
        archives = list(Path(tmp).glob("*.tar.gz"))
        if len(archives) != 1:
            raise RuntimeError(f"`pip download {WHISPER_PACKAGE}` gave no source archive: {os.listdir(tmp)}")
        archive = archives[0]
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken")]
            if not members:
                raise ValueError(f"{archive.name} holds no whisper/assets/gpt2.tiktoken")
            data = tar.extractfile(members[0]).read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256["gpt2.tiktoken"]:
            raise ValueError(f"{archive.name}: gpt2.tiktoken has sha256 {digest}, expected {SHA256['gpt2.tiktoken']}")
        with atomic_write(target) as f:
            f.write(data)
    return target
