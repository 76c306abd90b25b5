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
