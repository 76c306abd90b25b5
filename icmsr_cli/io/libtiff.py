"""Pillow's libtiff, kept from writing to standard error.

libtiff prints its warnings and errors itself: a damaged TIFF gave lines such as "tempfile.tif:
Using code not yet in table." (naming a file that does not exist) or "ZIPDecode: Decoding error at
scanline 0" before icmsr's own one-line error. Its handlers are process-wide, so the library never
changes them; the CLI, which owns standard error, calls mute().
"""

from __future__ import annotations

import ctypes
from pathlib import Path


def mute() -> None:
    """Clear libtiff's warning and error handlers wherever Pillow's copy can be reached: a null
    handler is libtiff's own way to say nothing. Where it cannot (Windows, where Pillow links it
    in), the lines still show; nothing else changes."""
    for path in _copies():
        try:
            lib = ctypes.CDLL(path)  # the copy already loaded: dlopen hands back the same library
            lib.TIFFSetWarningHandler(None)
            lib.TIFFSetErrorHandler(None)
        except (OSError, AttributeError):  # not loadable here, or not libtiff after all
            continue


def _copies() -> list[str]:
    """Paths of the libtiff copies loaded (Linux), else those Pillow's wheel ships (macOS)."""
    from PIL import _imaging  # loads libtiff with it, where Pillow links it as a library

    try:
        with open("/proc/self/maps") as maps:
            fields = (line.split(None, 5) for line in maps)
            return sorted({f[5].strip() for f in fields if len(f) == 6 and "libtiff" in Path(f[5].strip()).name})
    except OSError:
        here = Path(_imaging.__file__).parent
        return [str(p) for p in (*here.glob(".dylibs/libtiff*"), *here.parent.glob("pillow.libs/libtiff*"))]
