"""Scratch space for whole layers that do not fit the memory budget: frame stores in RAM or in temporary files.

A layer kept whole (every frame of a clip at one depth of a network) is written once and read back a few frames
at a time. Up to the budget it stays in RAM; past it, it goes to an unlinked temporary file read and written with
plain file calls, so it lives in the page cache (reclaimable, not the process's resident memory) and is removed
by the OS on exit, Ctrl-C included.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from vaecli.errors import OutputError

_IO_STEP = 1 << 30  # bytes per read/write call: Linux moves at most ~2 GB per call


def _write_at(file, view: memoryview, offset: int) -> None:
    """Write all of `view` into `file` at `offset` (a call moves at most _IO_STEP bytes)."""
    while view:
        done = os.pwrite(file.fileno(), view[:_IO_STEP], offset)
        view, offset = view[done:], offset + done


def _read_at(file, view: memoryview, offset: int) -> None:
    """Fill all of `view` from `file` at `offset`; an OutputError if the file ends first."""
    while view:
        got = os.preadv(file.fileno(), [view[:_IO_STEP]], offset)
        if got <= 0:
            raise OutputError(f"scratch file {file.name}: read past its end")
        view, offset = view[got:], offset + got


class FrameStore:
    """A (T, C, H, W) tensor addressed by frame ranges, held in RAM or in a scratch file; reads come back
    channels_last on `device`."""

    def __init__(self, frames: int, frame_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 file=None):
        self.frames, self.frame_shape, self.dtype, self.device = frames, tuple(frame_shape), dtype, device
        c, h, w = self.frame_shape
        self.frame_bytes = c * h * w * torch.finfo(dtype).bits // 8
        self._file = file
        self._ram = None if file is not None else torch.empty(
            frames, c, h, w, dtype=dtype, device=device, memory_format=torch.channels_last)
        self.capacity = frames * self.frame_bytes  # bytes held: more when it reuses a larger released file

    @property
    def nbytes(self) -> int:
        """Bytes this store holds (RAM or file), what `Scratch` accounts."""
        return self.capacity

    @property
    def in_file(self) -> bool:
        """Whether the frames are in a scratch file."""
        return self._file is not None

    def write(self, start: int, x: torch.Tensor) -> None:
        """Store (k, C, H, W) `x` as frames start .. start + k."""
        if self._ram is not None:
            self._ram[start:start + x.shape[0]] = x
            return
        # Frame-major, each frame (H, W, C): the channels_last layout the convolutions use, so no reorder.
        data = x.detach().to("cpu", self.dtype).permute(0, 2, 3, 1).contiguous().view(torch.uint8).numpy()
        _write_at(self._file, memoryview(data).cast("B"), start * self.frame_bytes)

    def write_region(self, start: int, x: torch.Tensor, top: int, left: int) -> None:
        """Store (k, C, h, w) `x` as rows top .. top + h, columns left .. left + w of frames start .. start + k."""
        k, _, h, w = x.shape
        if self._ram is not None:
            self._ram[start:start + k, :, top:top + h, left:left + w] = x
            return
        c, _, width = self.frame_shape
        data = x.detach().to("cpu", self.dtype).permute(0, 2, 3, 1).contiguous().view(torch.uint8).numpy()
        item = c * torch.finfo(self.dtype).bits // 8
        # A row of the region is one contiguous run of the file; rows as wide as the frame run on into each other.
        run = h if w == width else 1
        size = run * w * item
        flat = memoryview(data).cast("B")
        for f in range(k):
            for r in range(0, h, run):
                _write_at(self._file, flat[(f * h + r) * w * item:][:size],
                          (start + f) * self.frame_bytes + ((top + r) * width + left) * item)

    def read(self, start: int, stop: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Frames start .. stop (only `rows` (first, stop) of each, if given) as a (stop - start, C, H, W)
        channels_last tensor on the store's device."""
        c, h, w = self.frame_shape
        r0, r1 = rows or (0, h)
        if self._ram is not None:
            return self._ram[start:stop, :, r0:r1]
        row = self.frame_bytes // h  # rows of a frame are contiguous in the file: one read per frame
        data = np.empty((stop - start, r1 - r0, row), dtype=np.uint8)  # bytes: numpy has no bfloat16
        for f in range(stop - start):
            _read_at(self._file, memoryview(data[f]).cast("B"), (start + f) * self.frame_bytes + r0 * row)
        out = torch.from_numpy(data).view(self.dtype).view(stop - start, r1 - r0, w, c)
        return out.permute(0, 3, 1, 2).to(self.device)

    def frame_rows(self, frame: int) -> RowStore:
        """Frame `frame` as a RowStore sharing this store's RAM or file (never close it: the file is this store's)."""
        if self._ram is not None:
            return RowStore.wrap(self._ram[frame:frame + 1])
        return RowStore(*self.frame_shape, self.dtype, self.device, file=self._file,
                        offset=frame * self.frame_bytes)

    def close(self) -> None:
        """Free the layer (RAM) or drop its file."""
        self._ram = None
        if self._file is not None:
            self._file.close()
            self._file = None


class Scratch:
    """Hands out frame stores and row stores: in RAM while they fit `budget` bytes together, else as files in
    `directory`. A `dry` Scratch hands out row stores without data, to plan a run (its peak file bytes) first."""

    def __init__(self, budget: int, device: torch.device, directory: str | Path | None = None, dry: bool = False):
        self.budget, self.device, self.dry = budget, device, dry
        self.directory = Path(directory or tempfile.gettempdir())
        self.in_ram = self.peak_ram_bytes = 0
        self.peak_file_bytes = self.file_bytes = 0  # scratch-file bytes held (spare files included)
        self._open: list[FrameStore | RowStore] = []
        self._spare: list[tuple] = []  # (file or None when dry, bytes) of released stores, for reuse

    def frames(self, frames: int, frame_shape: tuple[int, ...], dtype: torch.dtype) -> FrameStore:
        """A new store for `frames` frames of `frame_shape` (C, H, W)."""
        c, h, w = frame_shape
        size = frames * c * h * w * torch.finfo(dtype).bits // 8
        if self.in_ram + size <= self.budget:
            store = FrameStore(frames, frame_shape, dtype, self.device)
            self.in_ram += size
            self.peak_ram_bytes = max(self.peak_ram_bytes, self.in_ram)
        else:
            file, held = self._spare_file(size)
            store = FrameStore(frames, frame_shape, dtype, self.device, file=file)
            store.capacity = max(size, held)
        self._open.append(store)
        return store

    def rows(self, channels: int, height: int, width: int, dtype: torch.dtype) -> RowStore:
        """A new row store for a (1, `channels`, `height`, `width`) image: in RAM while it fits, else a file."""
        size = RowStore(channels, height, width, dtype, self.device).nbytes
        if self.in_ram + size <= self.budget:
            ram = None if self.dry else torch.empty(size // (torch.finfo(dtype).bits // 8), dtype=dtype,
                                                    device=self.device)
            store = RowStore(channels, height, width, dtype, self.device, ram=ram)
            self.in_ram += size
            self.peak_ram_bytes = max(self.peak_ram_bytes, self.in_ram)
        else:
            file, held = self._spare_file(size)
            store = RowStore(channels, height, width, dtype, self.device, file=file, capacity=max(size, held))
            store.planned_file = self.dry
        self._open.append(store)
        return store

    def _spare_file(self, size: int) -> tuple:
        """A file for `size` bytes and the bytes it already holds: a released store's when there is one (the
        smallest that fits, else the largest), else a new one (None when dry).

        Released files are reused: rewriting pages already in the page cache runs at memory speed, while fresh
        pages of a new file cost block allocation and writeback (~10x slower here)."""
        fits = [s for s in self._spare if s[1] >= size]
        spare = min(fits, key=lambda s: s[1]) if fits else max(self._spare, key=lambda s: s[1], default=None)
        if spare is not None:
            self._spare.remove(spare)
            file, held = spare
            self.file_bytes += max(0, size - held)
        else:
            file, held = None if self.dry else self._file(size), 0
            self.file_bytes += size
        self.peak_file_bytes = max(self.peak_file_bytes, self.file_bytes)
        return file, held

    def recast(self, store: RowStore, channels: int) -> RowStore:
        """`store.recast(channels)`, keeping the account: the new store holds the old one's bytes."""
        new = store.recast(channels)
        if store in self._open:
            self._open[self._open.index(store)] = new
        return new

    def check_space(self, size: int) -> None:
        """Raise an OutputError when the scratch folder has less than `size` bytes free."""
        if size <= 0:
            return
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError as exc:
            raise OutputError(f"scratch folder {self.directory}: {exc.strerror or exc}") from None
        if free < size:
            raise OutputError(f"scratch folder {self.directory}: this needs about {size / 2**30:.1f} GB of scratch "
                              f"space, {free / 2**30:.1f} GB are free (use --scratch DIR or a larger --max-memory)")

    def _file(self, size: int):
        self.check_space(size)
        try:
            return tempfile.TemporaryFile(dir=self.directory, prefix="vaecli-scratch-")
        except OSError as exc:
            raise OutputError(f"scratch folder {self.directory}: cannot create a file: "
                              f"{exc.strerror or exc}") from None

    def release(self, store: FrameStore | RowStore) -> None:
        """Close `store` and return its bytes to the budget."""
        if store in self._open:
            self._open.remove(store)
            if store.in_file:
                self._spare.append((store._file, store.nbytes))  # kept for the next store (see `_spare_file`)
                store._file = None
            else:
                self.in_ram -= store.nbytes
        store.close()

    def close(self) -> None:
        """Close every store still open, and the spare files."""
        for store in list(self._open):
            self.release(store)
        for file, size in self._spare:
            if file is not None:
                file.close()
            self.file_bytes -= size
        self._spare = []


class RowStore:
    """A (1, C, H, W) image addressed by row ranges, held in RAM or in a scratch file.

    Row-major, each row (W, C): the channels_last layout the convolutions use, so a band of rows is one contiguous
    read or write and nothing is reordered. Reads come back channels_last on `device` (views of the RAM copy, or the
    file's bytes read into a reusable buffer). A store made by a dry `Scratch` has no data: it only plans.
    """

    def __init__(self, channels: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
                 file=None, ram: torch.Tensor | None = None, capacity: int | None = None, offset: int = 0):
        self.channels, self.height, self.width, self.dtype, self.device = channels, height, width, dtype, device
        self.offset = offset  # where row 0 starts in the file (a frame of a FrameStore's)
        self.itemsize = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else torch.iinfo(dtype).bits // 8
        self.row_bytes = width * channels * self.itemsize
        self.capacity = capacity if capacity is not None else height * self.row_bytes
        self._file, self._flat = file, ram  # _flat: 1-D tensor of `dtype` holding the rows, (H, W, C) order
        self.planned_file = False  # a dry Scratch's store that would be a file

    @classmethod
    def wrap(cls, x: torch.Tensor) -> RowStore:
        """A RAM store over (1, C, H, W) `x` itself (channels_last, or made so by a copy): writes land in `x`."""
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        _, c, h, w = x.shape
        return cls(c, h, w, x.dtype, x.device, ram=x.permute(0, 2, 3, 1).reshape(-1))

    @property
    def nbytes(self) -> int:
        """Bytes this store holds (RAM or file), what `Scratch` accounts."""
        return self.capacity

    @property
    def in_file(self) -> bool:
        """Whether the rows are (or, planned, would be) in a scratch file."""
        return self._file is not None or self.planned_file

    @property
    def ram(self) -> torch.Tensor | None:
        """The whole image as a (1, C, H, W) channels_last tensor when the store is in RAM, else None."""
        if self._flat is None:
            return None
        n = self.height * self.width * self.channels
        return self._flat[:n].view(1, self.height, self.width, self.channels).permute(0, 3, 1, 2)

    def write(self, row: int, x: torch.Tensor) -> None:
        """Store (1, C, k, W) `x` as rows row .. row + k."""
        if self._flat is not None:
            self.ram[:, :, row:row + x.shape[-2]] = x
            return
        data = x.detach().permute(0, 2, 3, 1)
        if data.device.type != "cpu":
            data = data.to("cpu")
        data = data.contiguous().reshape(-1).view(torch.uint8).numpy()
        _write_at(self._file, memoryview(data).cast("B"), self.offset + row * self.row_bytes)

    def read(self, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start .. stop as a (1, C, stop - start, W) channels_last tensor on the store's device: a view in RAM,
        else read from the file into `buffer` (a CPU uint8 tensor, reused by the caller; allocated if too small)."""
        if self._flat is not None:
            return self.ram[:, :, start:stop]
        n = (stop - start) * self.row_bytes
        if buffer is None or buffer.numel() < n:
            buffer = torch.empty(n, dtype=torch.uint8)
        buffer = buffer[:n]
        _read_at(self._file, memoryview(buffer.numpy()).cast("B"), self.offset + start * self.row_bytes)
        out = buffer.view(self.dtype).view(1, stop - start, self.width, self.channels).permute(0, 3, 1, 2)
        return out if self.device.type == "cpu" else out.to(self.device)

    def recast(self, channels: int) -> RowStore:
        """The same storage as a store of `channels` (at most this one's) channels, for an output written over the
        rows of this input already consumed: row r of the new store ends where row r of this one does or before.
        Both share the storage (this one can still be read); close only the new one."""
        if channels * self.width * self.itemsize * self.height > self.capacity:
            raise ValueError("a recast store must fit the storage it reuses")
        store = RowStore(channels, self.height, self.width, self.dtype, self.device, self._file, self._flat,
                         self.capacity, self.offset)
        store.planned_file = self.planned_file
        return store

    def close(self) -> None:
        """Free the rows (RAM) or drop the file."""
        self._flat = None
        if self._file is not None:
            self._file.close()
            self._file = None

