"""model.safetensors_stream: the threaded reader infer.py's standalone load reads the base with.

Generated files (every dtype the format names here, empty and scalar shapes, metadata) read in
pieces of every size, by one to four threads: the same bytes as safetensors' own loader, in file
order, only the wanted tensors. Generated damage to a file: an InputError naming the file on one
line, never another exception and never a partial read passed on.
"""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from model.safetensors_stream import DTYPES, read_header, stream_tensors
from plumbing.errors import InputError

CPU = torch.device("cpu")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _random_tensor(draw: st.DrawFn, dtype: torch.dtype) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    raw = torch.randint(0, 256, (torch.Size(shape).numel() * dtype.itemsize,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))  # fmt: skip
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


@st.composite
def tensor_files(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.from_regex(r"[a-z]{1,3}(\.[a-z0-9]{1,3}){0,2}", fullmatch=True), max_size=8, unique=True))
    return {name: _random_tensor(draw, draw(st.sampled_from(sorted(DTYPES.values(), key=str)))) for name in names}


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))  # fmt: skip


@FAST
@given(
    tensors=tensor_files(),
    piece=st.integers(1, 200),
    readers=st.integers(1, 4),
    ahead=st.integers(0, 300),
    keep=st.integers(0, 2**8 - 1),
    shuffle=st.randoms(use_true_random=False),
)
def test_streamed_tensors_are_the_file_s_bytes_in_file_order(
    tmp_path_factory, tensors, piece, readers, ahead, keep, shuffle
):
    """The header's entries in any order (the format does not fix it): read in the order of
    their bytes in the file."""
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    _shuffle_header(path, shuffle)
    want = load_file(str(path))
    kept = {name for i, name in enumerate(sorted(tensors)) if keep >> (i % 8) & 1}
    got = list(
        stream_tensors(path, lambda e: e.name in kept, CPU, piece_bytes=piece, readers=readers, ahead_bytes=ahead)
    )
    assert [e.name for e, _ in got] == [e.name for e in read_header(path) if e.name in kept]
    assert [e.start for e, _ in got] == sorted(e.start for e, _ in got)
    for entry, tensor in got:
        assert entry.dtype == want[entry.name].dtype and entry.shape == tuple(want[entry.name].shape)
        assert _same_bytes(tensor, want[entry.name]), entry.name


def _shuffle_header(path, rng) -> None:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = list(json.loads(data[8 : 8 + length]).items())
    rng.shuffle(header)
    text = json.dumps(dict(header), separators=(",", ":")).encode()
    assert len(text) <= length
    text += b" " * (length - len(text))  # the same length: the offsets after the header hold
    path.write_bytes(data[:8] + text + data[8 + length :])


def test_a_check_in_wanted_stops_the_stream_before_anything_is_read(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3), "b": torch.ones(2, 2)}, str(path))
    from model import safetensors_stream

    reads = []
    monkeypatch.setattr(safetensors_stream._PieceReader, "read", lambda *args: reads.append(args))

    def wanted(entry):
        if entry.name == "b":
            raise InputError("b has the wrong shape", path)
        return True

    with pytest.raises(InputError, match="b has the wrong shape"):
        next(stream_tensors(path, wanted, CPU))
    assert reads == []


def test_closing_the_stream_early_waits_for_its_readers(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({f"t{i}": torch.full((1000,), float(i)) for i in range(20)}, str(path))
    stream = stream_tensors(path, lambda e: True, CPU, piece_bytes=100, readers=3, ahead_bytes=10**6)
    entry, first = next(stream)
    stream.close()
    assert entry.name == "t0" and torch.equal(first, torch.zeros(1000))


def _valid_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, str(path))  # fmt: skip
    return path


def _with_header(path, header: object, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    ("header", "data", "words"),
    [
        ([1, 2], b"", "not a JSON object"),
        ({"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, b"0000", "a: dtype 'F7'"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"0000", "a: shape [-1]"),
        ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"0000", "a: shape [1.0]"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"0000", "a: 4 bytes for shape [2] of F32"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"0000", "a: data_offsets [4, 0]"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"0000", "a: data_offsets [0]"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"0000", "a: ends past the end of the file"),
        ({"a": "F32"}, b"", "a: not a tensor entry"),
    ],
)
def test_malformed_headers_name_the_file_and_the_problem(tmp_path, header, data, words):
    path = tmp_path / "w.safetensors"
    _with_header(path, header, data)
    with pytest.raises(InputError, match=re.escape(words)) as err:
        list(stream_tensors(path, lambda e: True, CPU))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@FAST
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), max_size=4))
def test_damaged_files_are_input_errors_or_the_bytes_they_hold(tmp_path_factory, cut, flips):
    """Truncated anywhere and bytes overwritten anywhere: an InputError naming the file, or (where
    the damage left a valid file) tensors of exactly the sizes the header names."""
    path = _valid_file(tmp_path_factory.mktemp("st"))
    data = bytearray(path.read_bytes())
    for at, value in flips:
        if at < len(data):
            data[at] ^= value
    path.write_bytes(bytes(data[: len(data) - cut % len(data)]))
    try:
        got = list(stream_tensors(path, lambda e: True, CPU, piece_bytes=5, readers=2))
    except InputError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    for entry, tensor in got:
        assert tensor.dtype == entry.dtype and tuple(tensor.shape) == entry.shape


def test_a_file_shorter_than_its_header_says_is_an_input_error(tmp_path):
    path = _valid_file(tmp_path)
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(InputError, match="shorter than a safetensors header"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(InputError, match="header length runs past the file"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(InputError, match=r"header: JSONDecodeError"):
        read_header(path)
    deep = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(InputError, match=r"header: RecursionError"):
        read_header(path)
