"""Tensors of a safetensors file streamed onto a device by several reader threads.

``safe_open(..., device="cuda")`` copies each tensor into a host buffer while holding the GIL
and then sends it from pageable memory: 1.8 s for the 8 GB of Qwen3-4B's bf16 base from a warm
page cache on the H200 machine, most of infer.py's base step (BENCHMARKS.md, tenth pass).
:func:`stream_tensors` reads the file's bytes with ``os.preadv`` (which releases the GIL) from
a few threads into pinned buffers, each sent on its own CUDA stream while the next piece is
read; on a CPU the threads read straight into the tensors. Only the wanted tensors are read,
and the tensors read ahead of the caller hold at most ``ahead_bytes`` plus one tensor of device
memory (512 MiB and the largest tensor by default).

The header is the format's (8 bytes of little-endian length, then JSON naming each tensor's
dtype, shape and byte range after the header); a header that is not that, or a range past the
end of the file, is an InputError naming the file, before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plumbing.errors import InputError

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
HEADER_LIMIT = 100 * 2**20  # safetensors refuses longer headers
PIECE_BYTES = 64 * 2**20  # one pinned buffer: long enough for the disk, short enough to pipeline
READERS = 4
AHEAD_BYTES = 512 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its name, dtype, shape and absolute byte range."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> list[TensorEntry]:
    """The tensors of the safetensors file at ``path`` in file order, checked against the file's
    size (InputError naming the file and the problem otherwise)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise InputError("unreadable weights (shorter than a safetensors header)", path)
            length = int.from_bytes(head, "little")
            if length > min(HEADER_LIMIT, size - 8):
                raise InputError("unreadable weights (the header length runs past the file)", path)
            raw = json.loads(f.read(length).decode("utf-8"))
    except InputError:
        raise
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested past Python's limit
        raise InputError(f"unreadable weights (header: {type(err).__name__})", path) from None
    if not isinstance(raw, dict):
        raise InputError("unreadable weights (the header is not a JSON object)", path)
    entries = [_entry(name, spec, 8 + length, size, path) for name, spec in raw.items() if name != "__metadata__"]
    return sorted(entries, key=lambda e: (e.start, e.end))


def _entry(name: str, spec: Any, data_start: int, size: int, path: Path) -> TensorEntry:
    def bad(problem: str) -> InputError:
        return InputError(f"unreadable weights ({name}: {problem})", path)

    if not isinstance(spec, dict):
        raise bad("not a tensor entry")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPES:
        raise bad(f"dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets {offsets!r}")
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise bad(f"{end - begin} bytes for shape {shape} of {dtype}")
    if data_start + end > size:
        raise bad("ends past the end of the file")
    return TensorEntry(name, DTYPES[dtype], tuple(shape), data_start + begin, data_start + end)


def stream_tensors(
    path: Path,
    wanted: Callable[[TensorEntry], bool],
    device: torch.device,
    *,
    piece_bytes: int = PIECE_BYTES,
    readers: int = READERS,
    ahead_bytes: int = AHEAD_BYTES,
) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """(entry, tensor on ``device``) for each wanted tensor of the file at ``path``, in file
    order. A CUDA tensor is ready on the caller's current stream when yielded. ``wanted`` sees
    every entry before anything is read and may raise (a shape check)."""
    entries = [e for e in read_header(path) if wanted(e)]
    with open(path, "rb") as f:
        largest = max((e.nbytes for e in entries), default=1)
        reader = _PieceReader(f.fileno(), path, device, max(1, min(piece_bytes, largest)), readers)
        pool = ThreadPoolExecutor(readers, thread_name_prefix="safetensors")
        pending: list[tuple[TensorEntry, torch.Tensor, list[Future[Any]]]] = []
        queued_bytes, next_up = 0, 0
        try:
            while next_up < len(entries) or pending:
                while next_up < len(entries) and (not pending or queued_bytes < ahead_bytes):
                    entry = entries[next_up]
                    flat = torch.empty(entry.nbytes, dtype=torch.uint8, device=device)
                    jobs = [pool.submit(reader.read, flat, entry.start, at, min(piece_bytes, entry.nbytes - at))
                            for at in range(0, entry.nbytes, piece_bytes)]  # fmt: skip
                    pending.append((entry, flat, jobs))
                    queued_bytes += entry.nbytes
                    next_up += 1
                entry, flat, jobs = pending.pop(0)
                for job in jobs:
                    reader.wait_on_caller_stream(job.result())
                queued_bytes -= entry.nbytes
                yield entry, flat.view(entry.dtype).view(entry.shape)
        finally:  # the readers stopped, then their copies finished, before the buffers go
            pool.shutdown(wait=True, cancel_futures=True)
            reader.close()


class _PieceReader:
    """Reads byte ranges of an open file into a flat uint8 tensor: straight into it on a CPU;
    through a ring of pinned buffers, each with its own stream, on CUDA."""

    def __init__(self, fd: int, path: Path, device: torch.device, piece_bytes: int, buffers: int):
        self.fd, self.path, self.device = fd, path, device
        self.free: queue.Queue[tuple[torch.Tensor, Any, Any]] = queue.Queue()
        self.lock = threading.Lock()  # where the platform has no preadv: seek + read under it
        if device.type == "cuda":
            for _ in range(buffers):
                pinned = torch.empty(piece_bytes, dtype=torch.uint8, pin_memory=True)
                self.free.put((pinned, torch.cuda.Stream(device), None))  # type: ignore[no-untyped-call]  # torch leaves Stream.__new__ unannotated

    def read(self, flat: torch.Tensor, file_start: int, at: int, n: int) -> Any:
        if self.device.type != "cuda":
            self._pread(flat[at : at + n], file_start + at)
            return None
        pinned, stream, last_copy = self.free.get()
        try:
            if last_copy is not None:
                last_copy.synchronize()  # the buffer's previous piece has left for the GPU
            self._pread(pinned[:n], file_start + at)
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                flat[at : at + n].copy_(pinned[:n], non_blocking=True)
                last_copy = torch.cuda.Event()  # type: ignore[no-untyped-call]  # unannotated in torch
                last_copy.record(stream)
        finally:
            self.free.put((pinned, stream, last_copy))
        return last_copy

    def _pread(self, into: torch.Tensor, offset: int) -> None:
        view, done = into.numpy().data, 0
        while done < len(view):  # a read may return less than asked; 0 is the end of the file
            if hasattr(os, "preadv"):
                got = os.preadv(self.fd, [view[done:]], offset + done)
            else:  # pragma: no cover - platforms without preadv
                with self.lock:
                    os.lseek(self.fd, offset + done, os.SEEK_SET)
                    got = os.readv(self.fd, [view[done:]])
            if got == 0:
                raise InputError("unreadable weights (the file ended early)", self.path)
            done += got

    @staticmethod
    def wait_on_caller_stream(copied: Any) -> None:
        if copied is not None:
            torch.cuda.current_stream().wait_event(copied)

    def close(self) -> None:
        while not self.free.empty():
            _, stream, last_copy = self.free.get()
            if last_copy is not None:
                last_copy.synchronize()  # the pinned buffers outlive every copy from them
