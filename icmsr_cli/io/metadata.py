"""What a file carries besides its pixels and ICC/EXIF, and where each format keeps it: XMP
(ratings, keywords, captions, edit history) and a PNG's text chunks (captions, and the prompt and
workflow Stable Diffusion front ends store there). images.read_image gathers them into a
Picture's info; the encoders put them back where the output format keeps them.
"""

from __future__ import annotations

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
    if image.format == "JPEG":
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
    if isinstance(found, tuple):  # a TIFF tag of BYTE type may come back as a tuple of ints
        found = bytes(found)
    return found.encode("utf-8") if isinstance(found, str) else found or None


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


def tiff_exif(image: Image.Image) -> bytes | None:
    """An EXIF block for a TIFF source: its main directory's photo tags and its Exif and GPS
    sub-directories (exposure, date taken, lens, place), which a TIFF keeps among its own tags
    rather than in a block of their own. None where it has none. (Every TIFF input lost them.)"""
    source = image.getexif()
    exif = Image.Exif()
    for tag in _TIFF_PHOTO_TAGS:
        if tag in source:
            exif[tag] = source[tag]
    for pointer in (_EXIF_IFD, _GPS_IFD):
        sub = dict(source.get_ifd(pointer)) if pointer in source else {}
        if pointer == _EXIF_IFD and _INTEROP_IFD in sub:  # its pointer, as a number, would point into nothing
            interop = dict(source.get_ifd(_INTEROP_IFD))
            sub = {k: v for k, v in sub.items() if k != _INTEROP_IFD} | ({_INTEROP_IFD: interop} if interop else {})
        if sub:
            exif[pointer] = sub  # assigned whole: Pillow 10 serialises no edits made through get_ifd
    return exif.tobytes() if len(exif) else None


_SHORT, _LONG = 3, 4


def exif_with_size(exif: bytes, size: tuple[int, int]) -> bytes:
    """The EXIF block with its PixelXDimension/PixelYDimension set to `size` (width, height): the
    copied block still gave the input's size. Patched in place, byte for byte otherwise, since
    re-serialising moves entries and breaks the offsets inside cameras' MakerNotes. A block that
    lacks the tags, or that does not parse, is returned as it was."""
    start = 6 if exif.startswith(b"Exif\0\0") else 0  # JPEG's APP1 prefix; PNG's eXIf and WebP's have none
    order = {b"II": "little", b"MM": "big"}.get(exif[start : start + 2])
    if order is None:
        return exif
    out = bytearray(exif)

    def number(at: int, width: int) -> int | None:
        at += start
        return int.from_bytes(out[at : at + width], order) if 0 <= at and at + width <= len(out) else None

    def entries(ifd: int):
        count = number(ifd, 2)
        for i in range(count or 0):
            at = ifd + 2 + 12 * i
            tag, kind = number(at, 2), number(at + 2, 2)
            if tag is None or kind is None:
                return
            yield at, tag, kind

    exif_ifd = next((number(at + 8, 4) for at, tag, kind in entries(number(4, 4) or 0) if tag == _EXIF_IFD and kind in (_LONG, 13)), None)
    if not exif_ifd:
        return exif
    for at, tag, kind in entries(exif_ifd):
        if tag in (_PIXEL_X, _PIXEL_Y) and kind in (_SHORT, _LONG) and number(at + 4, 4) == 1:
            value = size[0] if tag == _PIXEL_X else size[1]
            kind = _SHORT if kind == _SHORT and value <= 0xFFFF else _LONG  # a SHORT too small for the new size widens in place
            at += start
            out[at + 2 : at + 4] = kind.to_bytes(2, order)
            out[at + 8 : at + 12] = value.to_bytes(2, order) + bytes(2) if kind == _SHORT else value.to_bytes(4, order)
    return bytes(out)
