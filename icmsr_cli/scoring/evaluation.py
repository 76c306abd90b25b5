"""Scoring super-resolved images against references: pairing files, reading them, the metrics.

PSNR and SSIM come from metrics.py (numpy, exact to the papers' definitions). Learned metrics
(LPIPS, DISTS, CLIPIQA, MUSIQ, MANIQA, NIQE) come from pyiqa when the user has installed it; pyiqa's
licence is non-commercial, so it is never a dependency and never imported unless asked for.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import metrics
from ..choices import DEFAULT_MAX_PIXELS
from ..errors import ImageError, SetupError, unexpected
from ..io.images import IMAGE_SUFFIXES, read_image

OWN_METRICS = {"psnr": metrics.psnr_y, "ssim": metrics.ssim_y}
LEARNED_METRICS = ("lpips", "dists", "clipiqa", "musiq", "maniqa", "niqe")  # through pyiqa
METRIC_NAMES = (*OWN_METRICS, *LEARNED_METRICS)
_SEPARATORS = "_-. "  # 0001.png pairs with 0001_x4.png, 0001-out.png, 0001.sr.png; never with 00010.png


@dataclass(frozen=True)
class Pair:
    sr: Path
    ref: Path


@dataclass(frozen=True)
class Unpaired:
    """A file left without a partner (an SR image, or a reference no SR image pairs with)."""

    sr: Path | None
    ref: Path | None
    why: str

    def __str__(self) -> str:
        return f"{self.sr or self.ref}: {self.why}"

    def as_json(self) -> dict:  # the keys of a pair that failed, so --json lists every failure
        return {"sr": self.sr and str(self.sr), "ref": self.ref and str(self.ref), "error": str(self)}


@dataclass
class Scored:
    pair: Pair
    scores: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def as_json(self) -> dict:
        return {"sr": str(self.pair.sr), "ref": str(self.pair.ref), **self.scores, **({"error": self.error} if self.error else {})}


def parse_metrics(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown or not names:
        raise SetupError(f"unknown metric {', '.join(unknown) or '(none given)'}: expected some of {', '.join(METRIC_NAMES)}")
    return list(dict.fromkeys(names))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def pair_files(sr: str | Path, ref: str | Path, *, suffix: str | None = None) -> tuple[list[Pair], list[Unpaired]]:
    """Pair SR images with references by file stem: exact stems, or the reference's stem followed by a
    separator and anything (0001 with 0001_x4), or with --suffix the SR stem minus that suffix.

    Returns the pairs and the files left without a partner (both sides are checked)."""
    if "" in (sr, ref):  # an unset shell variable: Path("") is the current folder, where the SR image was its own reference
        raise SetupError(f"the {'SR' if sr == '' else 'reference'} path is empty; name an image or a folder of them")
    sr, ref = Path(sr), Path(ref)
    for path, role in ((sr, "SR"), (ref, "reference")):
        if not path.exists():
            raise SetupError(f"{path}: no such {role} file or folder")
    if sr.resolve() == ref.resolve():  # every image scored against itself: 80 dB and SSIM 1, a perfect-looking table
        raise SetupError(f"{ref}: is the SR {'folder' if sr.is_dir() else 'image'} itself; --ref takes the reference (ground-truth) images")
    if sr.is_file() and ref.is_file():
        return [Pair(sr, ref)], []
    if sr.is_dir() and not ref.is_dir():
        raise SetupError(f"{ref}: the SR input {sr} is a folder, so the reference must be a folder too")
    refs = {p.stem: p for p in ([ref] if ref.is_file() else _images(ref))}
    pairs, problems, taken = [], [], {}
    for path in [sr] if sr.is_file() else _images(sr):
        partner, why = _partner(path.stem, refs, suffix)
        if partner is None:
            problems.append(Unpaired(path, None, why))
        elif partner.resolve() == path.resolve():  # --ref names the SR image's own folder: 80 dB, SSIM 1
            problems.append(Unpaired(path, None, f"its reference would be the image itself ({partner}); "
                                                 "--ref takes the reference (ground-truth) images"))
        elif partner in taken:
            problems.append(Unpaired(path, None, f"pairs with {partner}, already paired with {taken[partner]}; name the SR suffix with --suffix"))
        else:
            taken[partner] = path
            pairs.append(Pair(path, partner))
    if sr.is_dir():
        problems += [Unpaired(None, p, f"no SR image in {sr} pairs with this reference") for p in refs.values() if p not in taken]
    return pairs, problems


def _partner(stem: str, refs: dict[str, Path], suffix: str | None) -> tuple[Path | None, str]:
    if suffix:
        if not stem.endswith(suffix):
            return None, f"the name does not end in the suffix {suffix!r}"
        key = stem[: -len(suffix)]
        return (refs[key], "") if key in refs else (None, f"no reference named {key}.*")
    if stem in refs:
        return refs[stem], ""
    # the longest reference stem that the SR stem starts with, followed by a separator
    matches = [s for s in refs if stem.startswith(s) and stem[len(s)] in _SEPARATORS]
    if matches:
        return refs[max(matches, key=len)], ""
    head = re.split(f"[{re.escape(_SEPARATORS)}]", stem)[0]
    return None, f"no reference named {stem}.*" + (f" or {head}.*" if head != stem else "")


class LearnedMetrics:
    """pyiqa's networks for the learned metrics, created once (their weights download on first use)."""

    def __init__(self, names: list[str], device: str = "auto"):
        if importlib.util.find_spec("pyiqa") is None:
            raise SetupError(f"{', '.join(names)} need{'s' if len(names) == 1 else ''} pyiqa, which is not installed: "
                             "pip install pyiqa (its licence is non-commercial; psnr and ssim need nothing)")
        import pyiqa
        import torch

        from ..model.devices import resolve_device

        self.torch = torch
        self.device = resolve_device(device)
        self.nets = {n: pyiqa.create_metric(n, device=self.device) for n in names}

    def score(self, sr: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        torch = self.torch

        def tensor(pixels: np.ndarray):  # pyiqa wants N x 3 x H x W RGB in [0, 1]
            rgb = pixels[..., :3] if pixels.shape[2] >= 3 else np.repeat(pixels[..., :1], 3, axis=2)
            return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None].to(self.device)

        x, y = tensor(sr), tensor(ref)
        with torch.no_grad():
            return {n: float(net(x, y) if net.metric_mode == "FR" else net(x)) for n, net in self.nets.items()}


def score_pairs(pairs: list[Pair], names: list[str], *, crop_border: int = 0, device: str = "auto",
                max_pixels: int = DEFAULT_MAX_PIXELS, contain_bugs: bool = True) -> Iterator[Scored]:
    """Score each pair in order; a pair that cannot be scored yields its one-line error and the rest go on.
    Images over `max_pixels` are refused, as upscale's inputs are (images.read_image).
    As in a batch (batch.BatchSettings.contain_bugs), an unexpected exception reading a pair's files
    is that pair's error, said as a bug, unless `contain_bugs` is False."""
    learned = [n for n in names if n in LEARNED_METRICS]
    nets = LearnedMetrics(learned, device) if learned else None
    for pair in pairs:
        try:
            sr, ref = (read_image(path, max_pixels=max_pixels).pixels for path in (pair.sr, pair.ref))
        except ImageError as exc:
            yield Scored(pair, error=str(exc))
            continue
        except Exception as exc:
            if not contain_bugs:
                raise
            yield Scored(pair, error=f"{pair.sr}: {unexpected(exc, 'reading it or its reference')}")
            continue
        if sr.shape[:2] != ref.shape[:2]:
            yield Scored(pair, error=f"{pair.sr}: {sr.shape[1]}x{sr.shape[0]}, but the reference {pair.ref} is {ref.shape[1]}x{ref.shape[0]}")
            continue
        try:
            scores = {n: OWN_METRICS[n](sr, ref, crop_border=crop_border) for n in names if n in OWN_METRICS}
        except ValueError as exc:
            yield Scored(pair, error=f"{pair.sr}: {exc}")
            continue
        if nets is not None:
            scores.update(nets.score(sr, ref))
        yield Scored(pair, {n: scores[n] for n in names})


def means(results: list[Scored], names: list[str]) -> dict[str, float]:
    """Per-image scores averaged, as the papers' tables report them."""
    good = [r for r in results if r.error is None]
    return {n: float(np.mean([r.scores[n] for r in good])) for n in names} if good else {}
