"""A minimal reader of Qt binary resource files (``.rcc``, as written by ``rcc -binary``), for data read by path.

Some data packages (GCompris) ship their images only inside ``.rcc`` archives. We never load Qt; this reads the
format directly. All integers are big-endian.

Header (24 bytes; 20 before format version 3)::

    "qres"  magic
    u32     format version (1, 2 or 3)
    u32     tree offset       -- start of the node table
    u32     data offset       -- start of the data blobs
    u32     names offset      -- start of the name table
    u32     overall flags     -- version >= 3 only (which compression algorithms occur); not needed here

Tree: a table of fixed-size nodes, 14 bytes each (22 from version 2, which appends a u64 last-modified time in ms).
Node 0 is the root directory. Each node starts ``u32 name offset, u16 flags``; then

* directory (flags & 0x02): ``u32 child count, u32 index of the first child`` (children are contiguous nodes);
* file: ``u16 territory, u16 language, u32 data offset``.

Names (at names offset + name offset): ``u16 length, u32 hash, length x UTF-16BE code units``.

Data (at data offset + data offset): ``u32 size`` then ``size`` bytes, which are, by the file node's flags:

* 0x00: the file as is;
* 0x01 (zlib): ``qCompress`` output, i.e. a u32 uncompressed size followed by a zlib stream;
* 0x04 (zstd, Qt >= 5.13): a zstd frame (needs the ``zstandard`` module, which we do not otherwise require).

Any other flag bit is an error rather than silently wrong data.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"qres"
DIRECTORY = 0x02
COMPRESSED_ZLIB = 0x01
COMPRESSED_ZSTD = 0x04
_KNOWN_FLAGS = DIRECTORY | COMPRESSED_ZLIB | COMPRESSED_ZSTD


class QtResourceError(ValueError):
    """A file that is not a Qt resource archive we can read, or an entry we cannot decode."""


@dataclass(frozen=True)
class _Entry:
    flags: int
    data_offset: int  # relative to the header's data offset


class QtResources:
    """The files of one ``.rcc`` archive, by their resource path (``"gcompris/src/.../x.webp"``, no leading ``:/``).

    The archive is read into memory once (they are a few MB); :meth:`read` decompresses one entry on demand.
    """

    def __init__(self, data: bytes) -> None:
        if len(data) < 16 or data[:4] != MAGIC:
            raise QtResourceError("not a Qt resource file (no 'qres' magic)")
        self.version, tree, self._data, names = struct.unpack_from(">IIII", data, 4)
        if self.version not in (1, 2, 3):
            raise QtResourceError(f"unsupported Qt resource format version {self.version}")
        self._bytes = data
        node_size = 14 if self.version == 1 else 22
        self.entries: dict[str, _Entry] = {}

        def name(offset: int) -> str:
            (length,) = struct.unpack_from(">H", data, names + offset)
            start = names + offset + 6  # skip the length and the u32 hash
            return data[start : start + 2 * length].decode("utf-16-be")

        def walk(index: int, prefix: str, depth: int) -> None:
            if depth > 64:  # a malformed (cyclic) tree would otherwise recurse forever
                raise QtResourceError("resource tree is deeper than 64 levels (corrupt file?)")
            at = tree + index * node_size
            name_offset, flags = struct.unpack_from(">IH", data, at)
            path = prefix + (name(name_offset) if index else "")
            if flags & DIRECTORY:
                count, first = struct.unpack_from(">II", data, at + 6)
                for child in range(first, first + count):
                    walk(child, f"{path}/" if index else "", depth + 1)
            else:
                (data_offset,) = struct.unpack_from(">I", data, at + 10)
                self.entries[path] = _Entry(flags, data_offset)

        try:
            walk(0, "", 0)
        except (struct.error, UnicodeDecodeError) as error:
            raise QtResourceError(f"truncated or corrupt Qt resource tree: {error}") from error

    @classmethod
    def open(cls, path: str | Path) -> QtResources:
        """Read the archive at ``path``."""
        return cls(Path(path).read_bytes())

    def names(self) -> list[str]:
        """Every file's resource path, sorted."""
        return sorted(self.entries)

    def read(self, name: str) -> bytes:
        """The (decompressed) bytes of the file ``name``; :class:`KeyError` when the archive has no such file."""
        entry = self.entries[name]
        unknown = entry.flags & ~_KNOWN_FLAGS
        if unknown:
            raise QtResourceError(f"{name}: unknown resource flags 0x{entry.flags:02x}")
        at = self._data + entry.data_offset
        (size,) = struct.unpack_from(">I", self._bytes, at)
        blob = self._bytes[at + 4 : at + 4 + size]
        if len(blob) != size:
            raise QtResourceError(f"{name}: data runs past the end of the file")
        if entry.flags & COMPRESSED_ZLIB:
            (expected,) = struct.unpack_from(">I", blob, 0)  # qCompress prefixes the uncompressed size
            out = zlib.decompress(blob[4:])
            if len(out) != expected:
                raise QtResourceError(f"{name}: inflated to {len(out)} bytes, the entry says {expected}")
            return out
        if entry.flags & COMPRESSED_ZSTD:
            try:
                import zstandard
            except ImportError as error:
                raise QtResourceError(f"{name} is zstd-compressed and the zstandard module is missing") from error
            return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
        return blob
