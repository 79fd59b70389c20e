"""TensorFlow V2 checkpoints ("tensor bundles") read and written without TensorFlow.

A checkpoint with prefix P is two files (byte-level notes: shared/notes/tf-checkpoint-format.md):

- `P.index`: a LevelDB-style table mapping tensor names to `BundleEntryProto`s
  (dtype, shape, shard, offset, size, masked CRC32C of the bytes), under a
  `BundleHeaderProto` stored at the empty key;
- `P.data-00000-of-00001`: the raw little-endian tensor bytes, back to back.

The reader treats both files as untrusted: every length and offset is checked
against the bytes that are really there before anything is sliced or
allocated, every table block and every tensor is checked against its CRC32C,
and every error names the file (and the tensor). Tensors are read as
read-only numpy views of a memory map, so a 500 MB checkpoint is never copied
into Python bytes. The writer produces the exact bytes TensorFlow's
`BundleWriter` does, so real TensorFlow reads what it writes.
"""

from __future__ import annotations

import codecs
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import crc32c as _crc32c
import numpy as np

from ..fileio import atomic_write

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two BlockHandles padded to 40 bytes, then the 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked CRC32C
BLOCK_SIZE = 262144  # TensorFlow's table block size: every GPT-2 index is one data block
RESTART_INTERVAL = 16
HEADER_VALUE = b"\x08\x01\x1a\x02\x08\x01"  # BundleHeaderProto: num_shards 1, little-endian, producer 1

# TensorFlow DataType enum -> numpy dtype (always little-endian on disk).
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 4: np.dtype("u1"),
    5: np.dtype("<i2"), 6: np.dtype("i1"), 9: np.dtype("<i8"), 10: np.dtype("?"),
    17: np.dtype("<u2"), 19: np.dtype("<f2"), 22: np.dtype("<u4"), 23: np.dtype("<u8"),
}
TF_DTYPE_OF = {dtype: enum for enum, dtype in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or of an unsupported kind."""


# --------------------------------------------------------------------------- CRC32C

def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """CRC32C (Castagnoli) of a buffer, in C with the CPU's CRC instruction where it has one."""
    return _crc32c.crc32c(data)


def mask_crc(crc: int) -> int:
    """TensorFlow/LevelDB's masking of a stored CRC (so CRCs of CRCs stay useful)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --------------------------------------------------------------------------- varints and protobuf

def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int, end: int, what: str) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`; never reads at or past `end`."""
    value = shift = 0
    while shift < 64:
        if pos >= end:
            raise CheckpointError(f"{what}: truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise CheckpointError(f"{what}: varint longer than 10 bytes")


def _proto_fields(buf: bytes, what: str) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a serialised protobuf message."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = decode_varint(buf, pos, end, what)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = decode_varint(buf, pos, end, what)
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if pos + width > end:
                raise CheckpointError(f"{what}: truncated fixed-width field {field}")
            value = int.from_bytes(buf[pos:pos + width], "little")
            pos += width
        elif wire == 2:
            length, pos = decode_varint(buf, pos, end, what)
            if length > end - pos:
                raise CheckpointError(f"{what}: field {field} claims {length} bytes, {end - pos} remain")
            value = bytes(buf[pos:pos + length])
            pos += length
        else:
            raise CheckpointError(f"{what}: unsupported protobuf wire type {wire}")
        yield field, wire, value


@dataclass(frozen=True)
class TensorEntry:
    """Where and how one tensor is stored: a parsed `BundleEntryProto`."""

    name: str
    tf_dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c_masked: int

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.tf_dtype]


def parse_entry(name: str, value: bytes, what: str) -> TensorEntry:
    """Parse a BundleEntryProto; fields may come in any order, unknown ones are skipped."""
    what = f"{what}: tensor {name!r}"
    fields = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc": None}
    for field, wire, v in _proto_fields(value, what):
        if field == 1 and wire == 0:
            fields["dtype"] = v
        elif field == 2 and wire == 2:
            fields["shape"] = _parse_shape(v, what)
        elif field == 3 and wire == 0:
            fields["shard_id"] = v
        elif field == 4 and wire == 0:
            fields["offset"] = v
        elif field == 5 and wire == 0:
            fields["size"] = v
        elif field == 6 and wire == 5:
            fields["crc"] = v
        elif field == 7:
            raise CheckpointError(f"{what}: partitioned (sliced) tensors are not supported")
    if fields["dtype"] not in DTYPES:
        raise CheckpointError(f"{what}: unsupported TensorFlow dtype enum {fields['dtype']}")
    if fields["crc"] is None:
        raise CheckpointError(f"{what}: entry has no crc32c")
    return TensorEntry(name, fields["dtype"], fields["shape"], fields["shard_id"], fields["offset"],
                       fields["size"], fields["crc"])


def _parse_shape(buf: bytes, what: str) -> tuple[int, ...]:
    dims = []
    for field, wire, v in _proto_fields(buf, what):
        if field == 2 and wire == 2:
            size = 0
            for dim_field, dim_wire, dim_value in _proto_fields(v, what):
                if dim_field == 1 and dim_wire == 0:
                    size = dim_value
            if size >= 1 << 63:  # int64 -1 is "unknown", meaningless in a saved tensor
                raise CheckpointError(f"{what}: negative dimension in shape")
            dims.append(size)
        elif field == 3 and wire == 0 and v:
            raise CheckpointError(f"{what}: shape of unknown rank")
    return tuple(dims)


def encode_entry(entry: TensorEntry) -> bytes:
    """Serialise a BundleEntryProto exactly as TensorFlow does (field order, defaults omitted)."""
    shape = b"".join(b"\x12" + _len_prefixed(b"\x08" + encode_varint(d) if d else b"") for d in entry.shape)
    out = b"\x08" + encode_varint(entry.tf_dtype) + b"\x12" + _len_prefixed(shape)
    if entry.shard_id:
        out += b"\x18" + encode_varint(entry.shard_id)
    if entry.offset:
        out += b"\x20" + encode_varint(entry.offset)
    if entry.size:
        out += b"\x28" + encode_varint(entry.size)
    return out + b"\x35" + struct.pack("<I", entry.crc32c_masked)


def _len_prefixed(payload: bytes) -> bytes:
    return encode_varint(len(payload)) + payload


# --------------------------------------------------------------------------- the table (.index)

def _read_block(data: bytes, offset: int, size: int, what: str) -> bytes:
    """The contents of the block at `offset` (excluding its trailer), checksum verified."""
    if offset + size + BLOCK_TRAILER_SIZE > len(data) - FOOTER_SIZE:
        raise CheckpointError(f"{what}: block at {offset} of {size} bytes runs past the end of the file")
    contents = data[offset:offset + size]
    kind = data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if mask_crc(crc32c(data[offset:offset + size + 1])) != stored:
        raise CheckpointError(f"{what}: block at byte {offset} fails its checksum (corrupt file)")
    if kind != 0:
        raise CheckpointError(f"{what}: block at byte {offset} is compressed (type {kind}); only "
                              "uncompressed tables are supported (TensorFlow writes them since 1.2)")
    return contents


def _block_entries(block: bytes, what: str) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs of a table block, undoing the shared-prefix key compression."""
    if len(block) < 4:
        raise CheckpointError(f"{what}: block of {len(block)} bytes is too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    if num_restarts == 0 or 4 * (num_restarts + 1) > len(block):
        raise CheckpointError(f"{what}: block has an impossible restart count {num_restarts}")
    end = len(block) - 4 * (num_restarts + 1)
    pos, key = 0, b""
    while pos < end:
        shared, pos = decode_varint(block, pos, end, what)
        non_shared, pos = decode_varint(block, pos, end, what)
        value_len, pos = decode_varint(block, pos, end, what)
        if shared > len(key) or non_shared + value_len > end - pos:
            raise CheckpointError(f"{what}: block entry at byte {pos} runs past its block")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_len]
        pos += value_len


def _decode_handle(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int, int]:
    offset, pos = decode_varint(buf, pos, end, what)
    size, pos = decode_varint(buf, pos, end, what)
    return offset, size, pos


def read_index(path: str | os.PathLike) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """(header value, [(tensor name, BundleEntryProto bytes), ...]) of a `.index` file, in key order."""
    path = Path(path)
    what = str(path)
    try:
        data = path.read_bytes()  # a GPT-2 index is a few KB
    except OSError as exc:
        raise CheckpointError(f"{what}: cannot read the index ({exc.strerror})") from None
    if len(data) < FOOTER_SIZE:
        raise CheckpointError(f"{what}: {len(data)} bytes is too short for a checkpoint index")
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != TABLE_MAGIC:
        raise CheckpointError(f"{what}: not a TensorFlow checkpoint index (bad magic number)")
    footer_end = len(data) - 8
    _, _, pos = _decode_handle(data, len(data) - FOOTER_SIZE, footer_end, what)  # metaindex: unused
    index_offset, index_size, _ = _decode_handle(data, pos, footer_end, what)
    entries: list[tuple[bytes, bytes]] = []
    for _, handle in _block_entries(_read_block(data, index_offset, index_size, what), what):
        offset, size, _ = _decode_handle(handle, 0, len(handle), what)
        for key, value in _block_entries(_read_block(data, offset, size, what), what):
            if entries and key <= entries[-1][0]:
                raise CheckpointError(f"{what}: keys out of order at {key!r} (corrupt index)")
            entries.append((key, value))
    if not entries or entries[0][0] != b"":
        raise CheckpointError(f"{what}: index has no bundle header entry")
    return entries[0][1], entries[1:]


def _check_header(value: bytes, what: str) -> int:
    """The number of data shards, after checking the bundle is little-endian."""
    num_shards, endianness = 1, 0
    for field, wire, v in _proto_fields(value, f"{what}: bundle header"):
        if field == 1 and wire == 0:
            num_shards = v
        elif field == 2 and wire == 0:
            endianness = v
    if endianness != 0:
        raise CheckpointError(f"{what}: big-endian checkpoints are not supported")
    if not 1 <= num_shards <= 100000:
        raise CheckpointError(f"{what}: impossible number of data shards {num_shards}")
    return num_shards


def shortest_separator(start: bytes, limit: bytes) -> bytes:
    """LevelDB's FindShortestSeparator: a short key k with start <= k < limit."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def short_successor(key: bytes) -> bytes:
    """LevelDB's FindShortSuccessor: a short key >= key (first byte below 0xff, incremented)."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


class _BlockBuilder:
    """Accumulates sorted (key, value) entries into one table block."""

    def __init__(self, restart_interval: int):
        self.restart_interval = restart_interval
        self.buf = bytearray()
        self.restarts = [0]
        self.count = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count < self.restart_interval:
            n = min(len(key), len(self.last_key))
            while shared < n and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.count = 0
        self.buf += encode_varint(shared) + encode_varint(len(key) - shared) + encode_varint(len(value))
        self.buf += key[shared:] + value
        self.last_key = key
        self.count += 1

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        return bytes(self.buf) + struct.pack(f"<{len(self.restarts) + 1}I", *self.restarts, len(self.restarts))

    def empty(self) -> bool:
        return not self.buf


def build_index(header: bytes, entries: list[tuple[bytes, bytes]], block_size: int = BLOCK_SIZE) -> bytes:
    """The bytes of a `.index` table holding `header` at key "" and `entries` (sorted by key).

    Follows TensorFlow's table builder step by step (restart interval 16, a block
    cut once its estimated size reaches `block_size`, LevelDB's shortest
    separators in the index block), so it reproduces TensorFlow's files byte for byte.
    """
    keys = [key for key, _ in entries]
    if any(a >= b for a, b in zip(keys, keys[1:])) or b"" in keys:
        raise ValueError("index keys must be non-empty, unique and sorted bytewise")
    out = bytearray()
    index = _BlockBuilder(restart_interval=1)
    data = _BlockBuilder(RESTART_INTERVAL)
    pending: tuple[int, int] | None = None  # handle of the last data block, awaiting its separator

    def write_block(block: bytes) -> tuple[int, int]:
        handle = (len(out), len(block))
        out.extend(block + b"\x00" + struct.pack("<I", mask_crc(crc32c(block + b"\x00"))))
        return handle

    def encode_handle(handle: tuple[int, int]) -> bytes:
        return encode_varint(handle[0]) + encode_varint(handle[1])

    last_key = b""
    for key, value in [(b"", header), *entries]:
        if pending is not None:
            index.add(shortest_separator(last_key, key), encode_handle(pending))
            pending = None
        data.add(key, value)
        last_key = key
        if data.size_estimate() >= block_size:
            pending = write_block(data.finish())
            data = _BlockBuilder(RESTART_INTERVAL)
    if not data.empty():
        pending = write_block(data.finish())
    if pending is not None:
        index.add(short_successor(last_key), encode_handle(pending))
    metaindex_handle = write_block(_BlockBuilder(RESTART_INTERVAL).finish())
    index_handle = write_block(index.finish())
    handles = encode_handle(metaindex_handle) + encode_handle(index_handle)
    out += handles + bytes(40 - len(handles)) + struct.pack("<Q", TABLE_MAGIC)
    return bytes(out)


# --------------------------------------------------------------------------- checkpoint prefix

def data_file(prefix: str | os.PathLike, shard: int = 0, num_shards: int = 1) -> Path:
    """The path of one data shard of the checkpoint `prefix`."""
    return Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")


def checkpoint_prefix(path: str | os.PathLike) -> Path:
    """The checkpoint prefix named by a folder (through its `checkpoint` file), a prefix or a `.index` file."""
    path = Path(path)
    if path.is_dir():
        state = path / "checkpoint"
        if not state.is_file():
            found = sorted(path.glob("*.index"))
            if len(found) == 1:
                return found[0].with_suffix("")
            raise CheckpointError(f"{path}: no `checkpoint` file and not exactly one *.index file")
        match = re.search(rb'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', state.read_bytes(), re.M)
        if match is None:
            raise CheckpointError(f"{state}: has no model_checkpoint_path line")
        prefix = Path(os.fsdecode(codecs.escape_decode(match.group(1))[0]))  # text protos C-escape strings
        return prefix if prefix.is_absolute() else path / prefix
    if path.suffix == ".index":
        return path.with_suffix("")
    return path


# --------------------------------------------------------------------------- reader

class TFCheckpointReader:
    """Tensors of a TensorFlow V2 checkpoint, read from memory maps of its data shards.

    `reader[name]` is a read-only numpy array viewing the mapped file (no copy),
    returned only after its size, bounds and CRC32C have been checked.
    """

    def __init__(self, path: str | os.PathLike):
        self.prefix = checkpoint_prefix(path)
        self.index_path = Path(f"{self.prefix}.index")
        header, raw = read_index(self.index_path)
        self.num_shards = _check_header(header, str(self.index_path))
        self.entries: dict[str, TensorEntry] = {}
        for key, value in raw:
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(f"{self.index_path}: tensor name {key!r} is not UTF-8") from None
            entry = parse_entry(name, value, str(self.index_path))
            if entry.shard_id >= self.num_shards:
                raise CheckpointError(f"{self.index_path}: tensor {name!r} is in shard {entry.shard_id} "
                                      f"of {self.num_shards}")
            self.entries[name] = entry
        self._maps: dict[int, mmap.mmap | bytes] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def _map(self, shard: int) -> mmap.mmap | bytes:
        if shard not in self._maps:
            path = data_file(self.prefix, shard, self.num_shards)
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    # mmap keeps its own handle; an empty file cannot be mapped (and holds nothing)
                    self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot open data file ({exc.strerror})") from None
        return self._maps[shard]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise KeyError(f"{self.index_path}: no tensor named {name!r}")
        entry = self.entries[name]
        path = data_file(self.prefix, entry.shard_id, self.num_shards)
        where = f"{path}: tensor {name!r}"
        count = 1
        for dim in entry.shape:
            count *= dim
        if entry.size != count * entry.dtype.itemsize:
            raise CheckpointError(f"{where}: stored size {entry.size} does not match shape {list(entry.shape)} "
                                  f"of {entry.dtype} ({count * entry.dtype.itemsize} bytes)")
        buf = self._map(entry.shard_id)
        if entry.offset + entry.size > len(buf):
            raise CheckpointError(f"{where}: bytes {entry.offset}..{entry.offset + entry.size} lie past the end "
                                  f"of the {len(buf)}-byte file (truncated or corrupt)")
        array = np.frombuffer(buf, dtype=entry.dtype, count=count, offset=entry.offset).reshape(entry.shape)
        if mask_crc(crc32c(array)) != entry.crc32c_masked:
            raise CheckpointError(f"{where}: checksum does not match (corrupt data file)")
        release_pages(array)  # verified: let the kernel drop the pages until they are used
        return array

    def read_all(self) -> dict[str, np.ndarray]:
        """Every tensor, by name (each a checked, read-only view of the mapped files)."""
        return {name: self[name] for name in self.entries}


def release_pages(array: np.ndarray) -> None:
    """Let the kernel drop the resident pages behind a view of a memory-mapped file.

    The array stays valid (touching it again reads the pages back from the page
    cache); this only keeps a process that streams a large checkpoint into a
    model from holding the file's pages and the model's memory at the same time.
    Does nothing for arrays that do not view a memory map, or where the OS lacks madvise.
    """
    base = array
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base
    if not isinstance(base, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or array.nbytes == 0 or base.closed:
        return
    start = array.__array_interface__["data"][0] - np.frombuffer(base, np.uint8, count=1).__array_interface__["data"][0]
    first = start - start % mmap.PAGESIZE
    base.madvise(mmap.MADV_DONTNEED, first, start + array.nbytes - first)


# --------------------------------------------------------------------------- writer

def write_tf_checkpoint(prefix: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                        block_size: int = BLOCK_SIZE, state_file: bool = True) -> Path:
    """Write `tensors` as a TensorFlow V2 checkpoint `prefix.index` + `prefix.data-00000-of-00001`.

    Tensors are stored sorted by name, back to back, little-endian, as
    TensorFlow's Saver does; with `state_file`, a `checkpoint` file beside them
    names the prefix (relative) so the folder can be given to any reader. Each
    file is written under a temporary name and renamed into place.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    entries: list[tuple[bytes, bytes]] = []
    data_path = data_file(prefix)
    offset = 0
    with atomic_write(data_path) as f:
        for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
            array = np.asarray(tensors[name])
            dtype = array.dtype.newbyteorder("<")
            if dtype not in TF_DTYPE_OF:
                raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no TensorFlow equivalent here")
            array = np.asarray(array, dtype=dtype, order="C")
            f.write(array)
            entry = TensorEntry(name, TF_DTYPE_OF[dtype], tuple(array.shape), 0, offset, array.nbytes,
                                mask_crc(crc32c(array)))
            entries.append((name.encode("utf-8"), encode_entry(entry)))
            offset += array.nbytes
    index_bytes = build_index(HEADER_VALUE, entries, block_size)
    with atomic_write(Path(f"{prefix}.index")) as f:
        f.write(index_bytes)
    if state_file:
        name = _c_escape(os.fsencode(prefix.name))
        with atomic_write(prefix.parent / "checkpoint") as f:
            f.write(b'model_checkpoint_path: "%s"\nall_model_checkpoint_paths: "%s"\n' % (name, name))
    return prefix


def _c_escape(raw: bytes) -> bytes:
    """Quote bytes for a text-format protobuf string as TensorFlow does (octal for the unprintable)."""
    special = {ord("\\"): b"\\\\", ord('"'): b'\\"', ord("'"): b"\\'", ord("\n"): b"\\n"}
    return b"".join(special.get(c) or (bytes([c]) if 32 <= c < 127 else b"\\%03o" % c) for c in raw)
