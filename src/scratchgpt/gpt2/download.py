"""Fetching OpenAI's GPT-2 model folders, resumably and verifiably.

Each file streams to `<file>.part`; an interrupted transfer resumes with an
HTTP Range request (and starts over cleanly when the server ignores Range);
connection errors and 5xx answers are retried with bounded exponential
backoff; only a file whose size matches what the server announced is renamed
to its final name. So a final name always holds a complete file, files
already present are never fetched again, and a complete folder needs no network.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..config import GPT2_SIZES

DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BASE_URL_ENV = "SCRATCHGPT_GPT2_BASE_URL"
GPT2_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
              "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the URL and the file."""


class _Retryable(Exception):
    """A failure worth another attempt (connection trouble, 5xx, a short body)."""


def base_url_for(base_url: str | None = None) -> str:
    """The base URL to fetch from: the argument, else $SCRATCHGPT_GPT2_BASE_URL, else OpenAI's bucket."""
    return (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def download_gpt2_files(model_size: str, models_dir: str | os.PathLike, base_url: str | None = None, *,
                        retries: int = 5, backoff: float = 1.0, timeout: float = 60.0,
                        progress: bool = True) -> Path:
    """Make `models_dir/model_size` hold OpenAI's seven GPT-2 files; return that folder.

    Files already there are kept as they are (a final name only ever holds a
    complete download), so with all seven present nothing touches the network.
    """
    if model_size not in GPT2_SIZES:  # also keeps "../x" and other path tricks out of the URL and the disk
        raise ValueError(f"unknown GPT-2 size {model_size!r}; choose one of {list(GPT2_SIZES)}")
    folder = Path(models_dir) / model_size
    folder.mkdir(parents=True, exist_ok=True)
    base = base_url_for(base_url)
    for name in GPT2_FILES:
        dest = folder / name
        if not dest.is_file():
            download_file(f"{base}/{model_size}/{name}", dest, retries=retries, backoff=backoff,
                          timeout=timeout, progress=progress)
    return folder


def download_file(url: str, dest: str | os.PathLike, *, retries: int = 5, backoff: float = 1.0,
                  timeout: float = 60.0, progress: bool = True) -> None:
    """Fetch `url` to `dest` through `dest.part`, resuming and retrying (see module doc).

    Waits `backoff * 2**k` seconds (at most 30) before retry k; raises
    DownloadError naming the URL and the file on a 4xx answer or once
    `retries` retries are spent.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        try:
            _fetch_into(url, dest, part, timeout, progress)
            break
        except _Retryable as exc:
            failures += 1
            if failures > retries:
                raise DownloadError(f"{url}: giving up on {dest} after {retries} retries: {exc}") from None
            time.sleep(min(backoff * 2 ** (failures - 1), 30.0))
    os.replace(part, dest)


def _fetch_into(url: str, dest: Path, part: Path, timeout: float, progress: bool) -> None:
    """One attempt: append the rest of `url` to `part` (or rewrite it); raise _Retryable on transient trouble."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "scratchgpt"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:  # our .part is not a prefix of this file: start over
            part.unlink()
            raise _Retryable(f"HTTP 416 resuming {part.name}; restarting it") from None
        if exc.code >= 500:
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason} (fetching {dest})") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Retryable(f"{exc.__class__.__name__}: {getattr(exc, 'reason', exc)}") from None
    with response:
        if response.status == 206:
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != have:
                part.unlink()
                raise _Retryable(f"unusable Content-Range {response.headers.get('Content-Range')!r}; restarting")
            total: int | None = int(match.group(2))
            mode = "ab"
        else:  # 200: the whole file, whether or not we asked for a range
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        try:
            with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                             unit_divisor=1024, desc=dest.name, disable=not progress,
                                             leave=False) as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as exc:
            raise _Retryable(f"connection lost after {part.stat().st_size} bytes ({exc.__class__.__name__})") from None
    size = part.stat().st_size
    if total is not None and size != total:
        if size > total:
            part.unlink()
        raise _Retryable(f"size {size} does not match Content-Length {total}")
