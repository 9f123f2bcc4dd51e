"""Image headers read without decoding: the format, the size and the frame count of a JPEG,
PNG, GIF or WebP file, for `CustomImageDataset`'s limits. Internal: not part of the public API.

Every function reads from an open binary file (or its first bytes) and raises `ValueError` or
`struct.error` for a header that is cut short or makes no sense; the caller names the file.
"""

from __future__ import annotations

import io
import struct

# How far into a JPEG the frame header is looked for: metadata (EXIF, XMP, ICC) comes first,
# and no camera or editor writes more than this.
METADATA_BYTES = 64 * 2**20


def dimensions(file: io.BufferedReader, kind: str, head: bytes) -> tuple[int, int]:
    """Width and height from the header, without decoding (a bad header: ValueError)."""
    if kind == "PNG":
        if len(head) < 24:
            raise ValueError("the header ends early")
        if head[12:16] != b"IHDR":
            raise ValueError("no IHDR chunk after the signature")
        width, height = _fields(">II", head[16:24])
        return width, height
    if kind == "GIF":
        width, height = _fields("<HH", head[6:10])
        return width, height
    if kind == "WebP":
        chunk = head[12:16]
        if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
            width, height = _fields("<HH", head[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L" and head[20:21] == b"\x2f":
            (bits,) = _fields("<I", head[21:25])
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X" and len(head) >= 30:
            return _le24(head[24:27]) + 1, _le24(head[27:30]) + 1
        raise ValueError(f"no VP8, VP8L or VP8X chunk where expected (found {chunk!r})")
    # JPEG: walk the marker segments up to the frame header (SOFn), skipping their contents
    file.seek(2)
    while file.tell() <= METADATA_BYTES:
        marker = file.read(2)
        for _ in range(_MAX_FILL):  # fill bytes may precede a marker
            if marker != b"\xff\xff":
                break
            marker = marker[1:] + file.read(1)
        if len(marker) < 2 or marker[0] != 0xFF or marker[1] == 0xFF:
            raise ValueError(f"no marker at byte {file.tell() - len(marker)}")
        code = marker[1]
        if code == 0x01 or 0xD0 <= code <= 0xD7:  # markers without a segment
            continue
        if code in (0xD9, 0xDA):
            raise ValueError("no frame header (SOF) before the image data")
        (length,) = _fields(">H", file.read(2))
        if code in _SOF:
            _, height, width = _fields(">BHH", file.read(5))
            return width, height
        file.seek(length - 2, io.SEEK_CUR)
    raise ValueError(f"no frame header (SOF) in the first {METADATA_BYTES:,} bytes")


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_MAX_FILL = 1024  # fill bytes before one JPEG marker; encoders write a few at most


def _fields(layout: str, data: bytes) -> tuple[int, ...]:
    if len(data) != struct.calcsize(layout):
        raise ValueError("the header ends early")
    return tuple(int(value) for value in struct.unpack(layout, data))


def _le24(data: bytes) -> int:
    return int.from_bytes(data, "little")


def count_frames(
    file: io.BufferedReader, kind: str, head: bytes, width: int, height: int
) -> tuple[int, int, int]:
    """The frame count, and the size that holds every frame (a GIF's frames may be larger)."""
    frames = 1
    if kind == "PNG":  # an APNG gives its frame count in an acTL chunk before the image data
        file.seek(8)
        while len(chunk := file.read(8)) == 8:
            length, name = struct.unpack(">I4s", chunk)
            if name in (b"IDAT", b"IEND"):
                break
            if name == b"acTL":
                (frames,) = _fields(">I", file.read(4))
                break
            file.seek(length + 4, io.SEEK_CUR)  # the chunk's data and its CRC
    elif kind == "WebP" and head[12:16] == b"VP8X" and head[20] & 0x02:  # the animation flag
        frames, pos = 0, 12
        while file.seek(pos) == pos and len(chunk := file.read(8)) == 8:
            name, length = struct.unpack("<4sI", chunk)
            frames += name == b"ANMF"
            pos += 8 + length + (length & 1)
    elif kind == "GIF":  # count the image descriptors, skipping every block's data
        frames = 0
        file.seek(10)
        flags = file.read(3)[0]
        if flags & 0x80:  # a global colour table
            file.seek(3 << ((flags & 7) + 1), io.SEEK_CUR)
        while (block := file.read(1)) not in (b"", b";"):
            if block == b"!":  # an extension: its label, then data sub-blocks
                file.read(1)
            elif block == b",":  # an image: descriptor, colour table, LZW code size, data
                x, y, w, h, flags = _fields("<HHHHB", file.read(9))
                frames += 1
                width, height = max(width, x + w), max(height, y + h)
                if flags & 0x80:
                    file.seek(3 << ((flags & 7) + 1), io.SEEK_CUR)
                file.read(1)
            else:
                break  # not a GIF block: the decoder says what is wrong
            while (n := file.read(1)) not in (b"", b"\0"):
                file.seek(n[0], io.SEEK_CUR)
    return max(frames, 1), width, height


def image_kind(data: bytes) -> str | None:
    """What the file's first bytes say it is, among the formats CustomImageDataset reads."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None
