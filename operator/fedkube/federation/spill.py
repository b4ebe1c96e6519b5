"""Where received chunks wait when too many updates arrive at once: one anonymous temporary
file per aggregator, written at its end and read back a piece at a time.

The file lives in the page cache (the kernel writes it out only under memory pressure), so
the aggregator's own memory stays bounded however many uploads are in flight, and one file
descriptor serves them all. A folded update's regions are punched out of the file, and the
file starts over whenever nothing in it is still waiting.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from typing import BinaryIO

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _punch_hole(fd: int, position: int, size: int) -> None:
    """Give a region's disk space back (Linux); elsewhere it waits for the file to start over."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                       ctypes.c_long(position), ctypes.c_long(size))
    except (OSError, AttributeError):
        pass


class SpillFile:
    """Regions of one temporary file: :meth:`write` one, :meth:`read_into` it, and
    :meth:`release` it once folded. Writes and releases come from one thread (the event loop);
    reads of live regions may come from any."""

    def __init__(self) -> None:
        self._file: BinaryIO | None = None
        self._end = 0
        self._live = 0

    def write(self, data: bytes | memoryview) -> int:
        """Store ``data``; its position in the file."""
        if self._file is None:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        position = self._end
        os.pwrite(self._file.fileno(), data, position)
        self._end += len(data)
        self._live += len(data)
        return position

    def read_into(self, buffer: memoryview, position: int) -> None:
        assert self._file is not None
        if os.preadv(self._file.fileno(), [buffer], position) != len(buffer):
            raise OSError("the spill file is shorter than what was written to it")

    def release(self, position: int, size: int) -> None:
        """The region is no longer needed."""
        assert self._file is not None
        self._live -= size
        if self._live == 0:
            self._file.truncate(0)
            self._end = 0
        else:
            _punch_hole(self._file.fileno(), position, size)

    @property
    def size(self) -> int:
        """Bytes of the regions still waiting."""
        return self._live

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
