"""What a file carries besides its pixels and ICC/EXIF, and where each format keeps it: XMP
(ratings, keywords, captions, edit history) and a PNG's text chunks (captions, and the prompt and
workflow Stable Diffusion front ends store there). images.read_image gathers them into a
Picture's info; the encoders put them back where the output format keeps them.
"""

from __future__ import annotations

import re

from PIL import Image

#: XMP's place in each format: a PNG text chunk's keyword, a JPEG APP1 segment's prefix, a TIFF tag
XMP_PNG_KEY = "XML:com.adobe.xmp"
XMP_JPEG_PREFIX = b"http://ns.adobe.com/xap/1.0/\0"
XMP_TIFF_TAG = 700


def png_text(image: Image.Image) -> dict[str, str]:
    """A PNG's text chunks (tEXt, zTXt, iTXt), wherever they lie in the file; {} for other formats."""
    if image.format != "PNG":
        return {}
    return {str(k): str(v) for k, v in image.text.items()}


def xmp(image: Image.Image, text: dict[str, str]) -> bytes | None:
    """The XMP packet of a JPEG, PNG, WebP or TIFF, as bytes; a PNG's is taken out of `text`
    (png_text's), so that it is written once."""
    if image.format in ("JPEG", "MPO"):  # MPO: a JPEG with more pictures after it (a camera's preview, a gain map)
        found = next((content[len(XMP_JPEG_PREFIX):] for marker, content in getattr(image, "applist", [])
                      if marker == "APP1" and content.startswith(XMP_JPEG_PREFIX)), None)
    elif image.format == "PNG":
        found = text.pop(XMP_PNG_KEY, None)
    elif image.format == "WEBP":
        found = image.info.get("xmp")
    elif image.format == "TIFF":
        found = image.tag_v2.get(XMP_TIFF_TAG)
    else:
        found = None
    return packet_bytes(found)


def packet_bytes(found) -> bytes | None:
    """An XMP packet as bytes, however the reader handed it over: a TIFF tag of BYTE type may
    come back as a tuple of ints, a text chunk as str."""
    if isinstance(found, tuple):
        found = bytes(found)
    return found.encode("utf-8") if isinstance(found, str) else found or None


RAW_PROFILE_EXIF = "Raw profile type exif"


def raw_profile_exif(text: dict[str, str]) -> bytes | None:
    """The EXIF block ImageMagick 6 writes into a PNG as a text chunk ("Raw profile type exif":
    a name, the byte count, then hex), taken out of `text` (png_text's) so that it travels as EXIF
    does: upright when the orientation is applied (left in the text, it still said 6 and readers
    turned the upright output again) and into JPEG, WebP and TIFF outputs. None where there is none
    or it does not parse (it then stays a text chunk)."""
    profile = text.get(RAW_PROFILE_EXIF)
    if profile is None:
        return None
    try:
        block = bytes.fromhex("".join(profile.split("\n")[3:]))  # as Pillow's getexif reads it
    except ValueError:
        return None
    if not block:
        return None
    del text[RAW_PROFILE_EXIF]
    return block


def png_text_with_xmp(info: dict) -> dict[str, str]:
    """The text chunks a PNG output carries: the source PNG's, and the XMP packet under its keyword."""
    packet = info.get("xmp")
    return {**info.get("text", {}), **({XMP_PNG_KEY: packet.decode("utf-8", "replace")} if packet else {})}


def jpeg_with_xmp(jpeg: bytes, packet: bytes) -> bytes:
    """The JPEG with an APP1 XMP segment after its leading APP0/APP1 segments (JFIF, EXIF), where
    Adobe's XMP specification puts it (Pillow writes XMP into JPEG only from 11.0 on). A packet
    longer than one segment holds (extended XMP, rare) is left out."""
    payload = XMP_JPEG_PREFIX + packet
    if len(payload) + 2 > 0xFFFF:
        return jpeg
    at = 2  # after SOI
    while jpeg[at] == 0xFF and jpeg[at + 1] in (0xE0, 0xE1):
        at += 2 + int.from_bytes(jpeg[at + 2 : at + 4], "big")
    return jpeg[:at] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[at:]


_EXIF_IFD, _PIXEL_X, _PIXEL_Y = 0x8769, 0xA002, 0xA003  # the Exif IFD's pointer; PixelX/YDimension
_GPS_IFD, _INTEROP_IFD = 0x8825, 0xA005
#: what a TIFF's main directory says of the photo rather than of the file's layout, as an EXIF
#: block's IFD0 carries it: description, make, model, software, date, artist, host, copyright,
#: Windows' rating and XP title/comment/author/keywords/subject. Left out: the layout, resolution
#: (dpi travels on its own), ICC and XMP (each has its own place), and Photoshop's resources and
#: layers (tags 34377 and 37724, often megabytes, and only Photoshop's).
_TIFF_PHOTO_TAGS = (270, 271, 272, 305, 306, 315, 316, 33432, 0x4746, 0x4749, 0x9C9B, 0x9C9C, 0x9C9D, 0x9C9E, 0x9C9F)


def tiff_exif(source: Image.Exif) -> bytes | None:
    """An EXIF block for a TIFF source, from its tags (`source`: the image's getexif()): its main
    directory's photo tags and its Exif and GPS sub-directories (exposure, date taken, lens,
    place), which a TIFF keeps among its own tags rather than in a block of their own. None where
    it has none. (Every TIFF input lost them.)"""
    exif = Image.Exif()
    for tag in _TIFF_PHOTO_TAGS:
        if tag in source:
            exif[tag] = as_written(source[tag])
    for pointer in (_EXIF_IFD, _GPS_IFD):
        if pointer in source and (sub := directory(source, pointer)):
            exif[pointer] = sub  # assigned whole: Pillow 10 serialises no edits made through get_ifd
    return exif.tobytes() if len(exif) else None


def directory(source: Image.Exif, pointer: int) -> dict:
    """A sub-directory (Exif, GPS) of `source` as a dict Pillow writes back whole: its strings as
    they were read (as_written), and the Exif directory's Interop pointer, which get_ifd gives as
    the number it was in the source (written so, it pointed into the pixels), replaced by the
    Interop directory itself."""
    sub = dict(source.get_ifd(pointer))
    if pointer == _EXIF_IFD and _INTEROP_IFD in sub:
        interop = dict(source.get_ifd(_INTEROP_IFD))
        sub = {k: v for k, v in sub.items() if k != _INTEROP_IFD} | ({_INTEROP_IFD: interop} if interop else {})
    return as_written(sub)


def as_written(value):
    """A tag value Pillow parsed, made to serialise as it was read: Pillow decodes ASCII tags as
    Latin-1 but encodes them as ASCII, so the UTF-8 that cameras and editors put there ("Jörg",
    "Café") came out as "J??rg". Strings that are not plain ASCII go back as the bytes they were
    read from; dictionaries (sub-directories) are walked."""
    if isinstance(value, dict):
        return {k: as_written(v) for k, v in value.items()}
    if isinstance(value, str) and not value.isascii():
        return _AsRead(value)
    return value


class _AsRead(str):
    """A string that Pillow's tag writer encodes back to the bytes it decoded it from. It stays a
    str so that Pillow still gives a tag it has no type for (LensModel, among others) the ASCII
    type; bytes would make it UNDEFINED."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return str.encode(self, "latin-1", "replace")


_SHORT, _LONG = 3, 4
_ORIENTATION = 0x0112


class _InPlace:
    """An EXIF block's directories, read and patched in place: re-serialising moves entries and
    breaks the offsets inside cameras' MakerNotes (Canon's and others' count from the block's start)."""

    def __init__(self, exif: bytes):
        self.start = 6 if exif.startswith(b"Exif\0\0") else 0  # JPEG's APP1 prefix; PNG's eXIf and WebP's have none
        self.order = {b"II": "little", b"MM": "big"}.get(exif[self.start : self.start + 2])
        self.out = bytearray(exif)

    def number(self, at: int, width: int) -> int | None:
        at += self.start
        if self.order is None or at < 0 or at + width > len(self.out):
            return None
        return int.from_bytes(self.out[at : at + width], self.order)

    def put(self, at: int, data: bytes) -> None:
        self.out[self.start + at : self.start + at + len(data)] = data

    def entries(self, ifd: int):
        """(offset, tag, type) of each entry of the directory at `ifd`, as far as the block holds them."""
        for i in range((self.number(ifd, 2) or 0) if ifd >= 8 else 0):  # a directory lies after the 8-byte header
            at = ifd + 2 + 12 * i
            tag, kind = self.number(at, 2), self.number(at + 2, 2)
            if tag is None or kind is None:
                return
            yield at, tag, kind

    def first(self) -> int:
        return self.number(4, 4) or 0


def exif_with_size(exif: bytes, size: tuple[int, int]) -> bytes:
    """The EXIF block with its PixelXDimension/PixelYDimension set to `size` (width, height): the
    copied block still gave the input's size. Patched in place, byte for byte otherwise. A block
    that lacks the tags, or that does not parse, is returned as it was."""
    block = _InPlace(exif)
    exif_ifd = next((block.number(at + 8, 4) for at, tag, kind in block.entries(block.first()) if tag == _EXIF_IFD and kind in (_LONG, 13)), None)
    if not exif_ifd:
        return exif
    for at, tag, kind in block.entries(exif_ifd):
        if tag in (_PIXEL_X, _PIXEL_Y) and kind in (_SHORT, _LONG) and block.number(at + 4, 4) == 1:
            value = size[0] if tag == _PIXEL_X else size[1]
            kind = _SHORT if kind == _SHORT and value <= 0xFFFF else _LONG  # a SHORT too small for the new size widens in place
            block.put(at + 2, kind.to_bytes(2, block.order))
            block.put(at + 8, value.to_bytes(2, block.order) + bytes(2) if kind == _SHORT else value.to_bytes(4, block.order))
    return bytes(block.out)


def exif_upright(exif: bytes) -> bytes:
    """The EXIF block of a picture whose orientation has been applied: Orientation set to 1 (top
    left) and the thumbnail directory unlinked (its thumbnail still lies the old way), in place,
    byte for byte otherwise. Pillow's exif_transpose rewrote the whole block instead, moving a
    MakerNote away from what its offsets count on. A block that does not parse is returned as it was."""
    block = _InPlace(exif)
    first = block.first()
    entries = list(block.entries(first))
    for at, tag, kind in entries:
        if tag == _ORIENTATION and kind in (_SHORT, _LONG) and block.number(at + 4, 4) == 1:  # LONG: some editors' (readers take it)
            block.put(at + 8, (1).to_bytes(2 if kind == _SHORT else 4, block.order))
    if entries and block.number(first + 2 + 12 * len(entries), 4) is not None:
        block.put(first + 2 + 12 * len(entries), bytes(4))  # IFD1, the thumbnail's: no longer linked
    return bytes(block.out)


_XMP_ORIENTATION = re.compile(rb"(tiff:Orientation\s*=\s*[\"'])\s*[0-9]\s*([\"'])|(<tiff:Orientation>)\s*[0-9]\s*(</tiff:Orientation>)")


def xmp_upright(packet: bytes) -> bytes:
    """The XMP packet of a picture whose orientation has been applied: its tiff:Orientation (as
    Adobe's applications write it) says 1. Left at 6, Photoshop and Pillow (which falls back to
    XMP where EXIF says nothing) turned the upright output again."""
    return _XMP_ORIENTATION.sub(lambda m: (m[1] or m[3]) + b"1" + (m[2] or m[4]), packet)
