"""The TensorFlow-free checkpoint reader and writer, against files real TensorFlow wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import MINI, gpt2_fixture

from scratchgpt.gpt2.tf_checkpoint import (
    CheckpointError,
    TFCheckpointReader,
    TensorEntry,
    build_index,
    checkpoint_prefix,
    crc32c,
    encode_entry,
    mask_crc,
    parse_entry,
    read_index,
    release_pages,
    write_tf_checkpoint,
)



def test_crc32c_and_its_mask_match_the_published_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert mask_crc(0) == 0xA282EAD8
    assert crc32c(np.arange(10, dtype=np.float32)) == crc32c(np.arange(10, dtype=np.float32).tobytes())


@pytest.mark.parametrize("name", ["gpt2-mini-tf", "gpt2-tiny-tf"])
def test_reader_gives_the_entries_and_values_tensorflow_saved(name):
    folder = gpt2_fixture(name)
    reference = json.loads((folder / "reference.json").read_text())
    reader = TFCheckpointReader(folder)
    assert sorted(reader) == sorted(reference["index_entries"])
    for tensor, e in reference["index_entries"].items():
        entry = reader.entries[tensor]
        assert (entry.tf_dtype, list(entry.shape), entry.shard_id, entry.offset, entry.size, entry.crc32c_masked) \
            == (e["dtype_enum"], e["shape"], e["shard_id"], e["offset"], e["size"], e["crc32c_masked"])
    for tensor, v in reference["variables"].items():
        array = reader[tensor]
        assert array.dtype == np.float32 and list(array.shape) == v["shape"]
        assert array.ravel()[:4].tolist() == v["first4"]
        assert array.astype(np.float64).sum() == pytest.approx(v["sum"], rel=1e-9, abs=1e-9)
        assert (array.astype(np.float64) ** 2).sum() == pytest.approx(v["sum_sq"], rel=1e-9)


@pytest.mark.parametrize("name", ["gpt2-mini-tf", "gpt2-tiny-tf"])
def test_index_rebuilt_from_parsed_entries_is_byte_identical_to_tensorflows(name):
    index = gpt2_fixture(name) / "model.ckpt.index"
    header, raw = read_index(index)
    entries = [(key, encode_entry(parse_entry(key.decode(), value, "test"))) for key, value in raw]
    assert [value for _, value in entries] == [value for _, value in raw]
    assert build_index(header, entries) == index.read_bytes()


def test_checkpoint_written_by_our_writer_reproduces_the_fixture_files(tmp_path):
    reader = TFCheckpointReader(MINI)
    write_tf_checkpoint(tmp_path / "model.ckpt", reader.read_all())
    for name in ("checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        assert (tmp_path / name).read_bytes() == (MINI / name).read_bytes(), name


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int8", "int16", "int32", "int64",
                                   "uint8", "uint16", "uint32", "uint64", "bool", ">f4", ">i8"])
def test_round_trip_of_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {
        "matrix": (rng.standard_normal((3, 5)) * 100).astype(dtype),
        "scalar": np.asarray(7, dtype=dtype),
        "empty": np.zeros((0, 4), dtype=dtype),
        "strided": (rng.standard_normal((4, 6)) * 100).astype(dtype).T,
    }
    write_tf_checkpoint(tmp_path / "ck", tensors)
    reader = TFCheckpointReader(tmp_path / "ck")
    for name, array in tensors.items():
        got = reader[name]
        assert got.shape == array.shape and got.dtype == array.dtype.newbyteorder("<")
        assert np.array_equal(got, array)


def test_many_tensors_across_many_blocks_with_awkward_names(tmp_path):
    names = [f"model/h{i}/w" for i in range(40)] + ["ünïcode/név", "a" * 300, "z/\u2603"]
    tensors = {name: np.full((i % 3 + 1, 2), i, dtype=np.float32) for i, name in enumerate(names)}
    write_tf_checkpoint(tmp_path / "ck", tensors, block_size=128)  # tiny blocks: dozens of data blocks
    reader = TFCheckpointReader(tmp_path)
    assert list(reader) == sorted(names, key=str.encode)  # bytewise: h10 before h2
    for name, array in tensors.items():
        assert np.array_equal(reader[name], array)


def test_checkpoint_prefix_comes_from_the_checkpoint_file(tmp_path):
    odd = tmp_path / "sub" / "odd 'näme\\\"x"
    write_tf_checkpoint(odd, {"t": np.ones(2, np.float32)})
    assert checkpoint_prefix(odd.parent) == odd  # the writer C-escapes the name in its `checkpoint` file
    write_tf_checkpoint(tmp_path / "sub" / "odd name\"x", {"t": np.ones(2, np.float32)}, state_file=False)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "sub/odd name\\"x"\n')
    assert checkpoint_prefix(tmp_path) == tmp_path / "sub" / 'odd name"x'
    assert checkpoint_prefix(tmp_path / "sub" / 'odd name"x.index') == tmp_path / "sub" / 'odd name"x'
    (tmp_path / "checkpoint").write_text(f'model_checkpoint_path: "{tmp_path}/sub/odd name\\"x"\n')
    assert np.array_equal(TFCheckpointReader(tmp_path)["t"], np.ones(2))


def test_release_pages_leaves_the_array_readable():
    reader = TFCheckpointReader(MINI)
    array = reader["model/wte"]
    before = array.copy()
    release_pages(array)
    release_pages(before)  # not a memory map: nothing to do
    assert np.array_equal(array, before)


# --------------------------------------------------------------------------- untrusted files

@pytest.fixture
def mini_copy(tmp_path) -> Path:
    for name in ("checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        shutil.copyfile(MINI / name, tmp_path / name)
    return tmp_path


def rewrite_entry(folder: Path, name: str, **changes) -> None:
    """Re-encode one index entry with some fields changed (valid table, valid block CRCs)."""
    index = folder / "model.ckpt.index"
    header, raw = read_index(index)
    entries = []
    for key, value in raw:
        entry = parse_entry(key.decode(), value, "test")
        if key.decode() == name:
            entry = TensorEntry(**{**entry.__dict__, **changes})
        entries.append((key, encode_entry(entry)))
    index.write_bytes(build_index(header, entries))


def test_flipped_data_byte_names_the_file_and_tensor(mini_copy):
    reader = TFCheckpointReader(mini_copy)
    entry = reader.entries["model/h1/mlp/c_fc/w"]
    data = mini_copy / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 100] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.data-00000-of-00001: tensor 'model/h1/mlp/c_fc/w': "
                                              r"checksum does not match"):
        TFCheckpointReader(mini_copy)["model/h1/mlp/c_fc/w"]
    assert TFCheckpointReader(mini_copy)["model/h1/mlp/c_fc/b"].shape == (64,)  # the others still read


@pytest.mark.parametrize("where", [10, 300, 700])
def test_flipped_index_byte_fails_the_block_checksum(mini_copy, where):
    index = mini_copy / "model.ckpt.index"
    raw = bytearray(index.read_bytes())
    raw[where] ^= 0x20
    index.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{index}: block at byte 0 fails its checksum"):
        TFCheckpointReader(mini_copy)


def test_truncated_data_file_is_an_error_naming_the_tensor(mini_copy):
    data = mini_copy / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-1000])
    reader = TFCheckpointReader(mini_copy)
    assert reader["model/h0/attn/c_attn/b"].shape == (48,)
    with pytest.raises(CheckpointError, match=r"tensor 'model/wte': bytes 28416\.\.52992 lie past the end of the "
                                              r"51992-byte file"):
        reader["model/wte"]


def test_entry_pointing_far_past_the_end_is_an_error_not_an_allocation(mini_copy):
    rewrite_entry(mini_copy, "model/wpe", offset=2**62)
    with pytest.raises(CheckpointError, match="tensor 'model/wpe': .* past the end"):
        TFCheckpointReader(mini_copy)["model/wpe"]


def test_size_that_contradicts_the_shape_is_an_error(mini_copy):
    rewrite_entry(mini_copy, "model/wpe", shape=(2**40, 2**40))
    with pytest.raises(CheckpointError, match=r"tensor 'model/wpe': stored size 2048 does not match shape"):
        TFCheckpointReader(mini_copy)["model/wpe"]


@pytest.mark.parametrize("cut", [0, 20, 47, 500, 937])
def test_truncated_index_is_an_error_naming_the_file(mini_copy, cut):
    index = mini_copy / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match=str(index)):
        TFCheckpointReader(mini_copy)


def test_missing_files_are_named(tmp_path, mini_copy):
    (mini_copy / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.data-00000-of-00001: cannot open data file"):
        TFCheckpointReader(mini_copy)["model/wte"]
    with pytest.raises(CheckpointError, match="cannot read the index"):
        TFCheckpointReader(tmp_path / "nothing" / "model.ckpt")


def test_unsupported_dtype_and_partitioned_tensors_are_refused(mini_copy):
    rewrite_entry(mini_copy, "model/wpe", tf_dtype=7)  # DT_STRING
    with pytest.raises(CheckpointError, match="tensor 'model/wpe': unsupported TensorFlow dtype enum 7"):
        TFCheckpointReader(mini_copy)


def test_tensors_spread_over_two_shards_are_read_from_the_right_files(tmp_path):
    a, b = np.arange(4, dtype=np.float32), np.arange(6, dtype=np.int64).reshape(2, 3)
    (tmp_path / "ck.data-00000-of-00002").write_bytes(a.tobytes())
    (tmp_path / "ck.data-00001-of-00002").write_bytes(b"junk" + b.tobytes())
    entries = [(b"a", encode_entry(TensorEntry("a", 1, (4,), 0, 0, 16, mask_crc(crc32c(a))))),
               (b"b", encode_entry(TensorEntry("b", 9, (2, 3), 1, 4, 48, mask_crc(crc32c(b)))))]
    (tmp_path / "ck.index").write_bytes(build_index(b"\x08\x02\x1a\x02\x08\x01", entries))  # num_shards 2
    reader = TFCheckpointReader(tmp_path / "ck")
    assert np.array_equal(reader["a"], a) and np.array_equal(reader["b"], b)
    (tmp_path / "ck.index").write_bytes(build_index(b"\x08\x02\x10\x01", entries))  # endianness BIG
    with pytest.raises(CheckpointError, match="big-endian checkpoints are not supported"):
        TFCheckpointReader(tmp_path / "ck")
