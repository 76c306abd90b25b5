"""The command line: arguments -> options, messages and progress on stderr, exit codes.

Exit codes: 0 all done, 1 some inputs failed, 2 usage or setup error, 3 an unexpected error (a
bug), 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM). `--debug` (anywhere on the line) or
ICMSR_DEBUG=1 shows tracebacks instead of one-line messages.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial, wraps
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.text import Text

from . import __version__
from .choices import COLOR_FIXES, DEFAULT_MAX_PIXELS, FORMATS, LEAST_TILE
from .errors import IcmsrError, RanksLostError, SetupError, unexpected

if TYPE_CHECKING:  # imported where used: the light commands do not pay for numpy and Pillow
    from .io import batch

#: control characters as escapes (\n, \x1b): a file name holding a newline split its message in
#: two, and one holding ESC sequences recoloured or rewrote the user's terminal. C1 too (0x9b is a
#: CSI to some terminals). A name's bytes that are not UTF-8 (Python holds them as surrogates, which
#: printed as \udce9) show as the byte, \xe9. --json keeps names exact.
_CONTROLS = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09} | {
    0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)}


def _shown(text: str) -> str:
    """`text` safe to print on a terminal or a log line (see _CONTROLS)."""
    return text.translate(_CONTROLS)


class _Console(Console):
    """rich's Console, printing strings through _shown; and names as they are (no markup)."""

    def print(self, *objects, **kwargs) -> None:
        super().print(*(_shown(o) if isinstance(o, str) else o for o in objects), **kwargs)


console = _Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

app = typer.Typer(
    name="icmsr",
    help="One-step diffusion super-resolution for photos (ICM-SR / OSEDiff on Stable Diffusion 2.1-base).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
weights_app = typer.Typer(help="List, download, verify and convert model weights.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


def _command(group: typer.Typer, name: str | None = None):
    """group.command, each docstring paragraph made one line: Typer keeps a docstring's line
    breaks (0.2x on), so help wrapped for the source came out ragged in an 80-column terminal."""
    def register(func):
        func.__doc__ = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(func.__doc__ or "").split("\n\n"))

        @wraps(func)
        def checked(icmsr_context: typer.Context, **values):
            _no_option_as_a_value(icmsr_context.command, values)
            return func(**values)

        # Typer reads the parameters from the signature: func's, and a context it hands over
        own = inspect.signature(func)
        context = inspect.Parameter("icmsr_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        checked.__signature__ = own.replace(parameters=[*own.parameters.values(), context])
        checked.__annotations__ = {**func.__annotations__, "icmsr_context": typer.Context}
        return group.command(name)(checked)
    return register


def _no_option_as_a_value(command, values: dict) -> None:
    """Refuse an option whose value is the next option: `--prompt --overwrite` (the prompt left
    out) prompted with "--overwrite" and did not overwrite, and `-o --json` went on to look for an
    output named --json. No real value is spelled as one of the command's own options."""
    names = {"--debug", "--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
    for param in command.params:
        value = values.get(param.name)
        if param.param_type_name == "option" and isinstance(value, str) and value in names:
            flag = max(param.opts, key=len)
            raise typer.BadParameter(f"none given; it took the next option, {value}, for its value", param_hint=flag)


EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 128  # + the signal number, as shells report it


def _debugging() -> bool:
    return bool(os.environ.get("ICMSR_DEBUG"))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"icmsr {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", metavar="", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", metavar="", help="Show tracebacks instead of one-line errors (also ICMSR_DEBUG=1); may be given anywhere on the line."),
) -> None:
    """Exit codes: 0 all done, 1 some inputs failed, 2 usage or setup error, 3 unexpected error, 130/143 interrupted."""
    if debug:
        os.environ["ICMSR_DEBUG"] = "1"
    # Pillow warns (two lines naming its own source) about damage it then fails on, or reads past:
    # a file's one error line says what matters. Set here, for every command, before any thread starts.
    warnings.filterwarnings("ignore", module=r"PIL\.")


def _say(text: str, label: str, style: str) -> None:
    """A labelled line on stderr ("error: ..."); the text is never read as rich markup, so a file
    named like a style tag ("[bold].png") prints as it is."""
    console.print(Text.assemble((label, style), " " if text else "", _shown(text)))


def _notify(message: str) -> None:
    _say(message, "note:", "yellow")


def _given(value: str | None, hint: str) -> str | None:
    """`value`, refused where empty: an unset shell variable ("--base $BASE") was taken for the
    option left out, and fetched the registry's model (or, for --shard, took every file)."""
    if value == "":
        raise typer.BadParameter("is empty; give a value, or leave it out", param_hint=hint)
    return value


def _fail(exc: IcmsrError) -> None:
    if _debugging():
        raise exc
    _say(str(exc), "error:", "red")
    raise typer.Exit(exc.exit_code)


def _parse_tile(value: str) -> int | None | str:
    """--tile: "auto", None for off (the whole image at once), or a latent tile size."""
    value = value.strip().lower()
    if value in ("auto", "off"):
        return None if value == "off" else value
    if value.isdigit() and int(value) >= LEAST_TILE:
        return int(value)
    raise typer.BadParameter(f"{value!r}: expected auto, off, or a latent tile size of at least {LEAST_TILE}", param_hint="--tile")


def _parse_scale(value: str) -> float:
    """--scale: a positive finite factor; "4x" and "x4", as other upscalers name their factors, read as 4."""
    text = value.strip().lower().removesuffix("x").removeprefix("x")
    try:
        scale = float(text)
    except ValueError:
        scale = math.nan
    if not 0 < scale < math.inf:
        raise typer.BadParameter(f"{value!r}: must be a positive finite number (such as 4, 2.5 or 4x)", param_hint="--scale")
    return scale


@contextmanager
def _loading(label: str, quiet: bool = False):
    """One live display on stderr for a "loading" line and huggingface_hub's download bars; yields the
    tqdm class to hand to the downloads: a silent one off a terminal and with --quiet (left to
    itself, huggingface_hub draws its bars into logs too, a carriage-return line per update).

    Not tqdm.rich: it starts a rich live display per bar, huggingface_hub leaves two of its bars open,
    and the leftover refresh threads are a hazard at interpreter exit. Here one Progress holds every bar
    and is stopped when loading ends, whatever the downloads left open.
    """
    from tqdm import tqdm

    if quiet or not console.is_terminal:
        class Silent(tqdm):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "disable": True})

        yield Silent
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"),
                        TimeElapsedColumn(), console=console, transient=True)
    progress.add_task(label, total=None, amount="")

    class Bar(tqdm):
        def __init__(self, *args, name=None, disable=False, **kwargs):
            # huggingface_hub releases before its PR 4056 (April 2026; our floor, 1.1, among them) hand
            # a custom class their own name= and disable=None. Plain tqdm raises on name= wherever it
            # draws (every download failed in a terminal), and disable=None has tqdm ask sys.stderr,
            # which rich 13.0's live display answers "not a terminal" (the bars went silent). This
            # display is on a terminal; hub's switches (HF_HUB_DISABLE_PROGRESS_BARS) still hold.
            from huggingface_hub.utils import are_progress_bars_disabled

            disable = bool(disable) or are_progress_bars_disabled(name)
            super().__init__(*args, **kwargs, disable=disable, gui=True)  # gui: tqdm draws nothing itself, display() does
            if not self.disable:
                self._task = progress.add_task(self.desc or "", total=None, amount="")
                self.display()

        def display(self, *_, **__):
            if not hasattr(self, "_task"):
                return
            n, total = self.n, self.total or None
            if self.unit == "B":
                amount = self.format_sizeof(n, "B", 1024) + (f"/{self.format_sizeof(total, 'B', 1024)}" if total else "")
            else:
                amount = f"{n}/{total}" if total else str(n)
            progress.update(self._task, completed=n, total=total, description=self.desc or "", amount=amount)

        def clear(self, *_, **__):
            pass

        def close(self):
            self.display()
            super().close()

    with progress:
        yield Bar


@_command(app)
def upscale(
    inputs: list[str] = typer.Argument(..., metavar="INPUT", help="Image files, directories, globs, or - for standard input."),
    output: str = typer.Option(..., "-o", "--output", metavar="PATH", help="Output file, directory (mirrors the input tree; always one for several inputs, a folder or a glob), or - for standard output."),
    scale: str = typer.Option("4", "-s", "--scale", metavar="FACTOR", help="Scale factor (4, 2.5; 4x reads as 4); the output is exactly round(W*s) x round(H*s)."),
    model: Optional[str] = typer.Option(None, "--model", metavar="NAME", help="Model name from weights.toml (see `icmsr weights list`)."),
    base: Optional[str] = typer.Option(None, "--base", metavar="REPO_OR_DIR", help="Base SD-2.1 model: a local diffusers folder or a Hub repo id, owner/name[@revision]."),
    lora: Optional[str] = typer.Option(None, "--lora", metavar="FILE_OR_REF", help="LoRA checkpoint: a .pkl/.safetensors file, hf://owner/repo[@revision]/path, or an https URL."),
    prompt: str = typer.Option("", "--prompt", metavar="TEXT", help="Text prompt for the UNet (default empty, as trained)."),
    color_fix: str = typer.Option("adain", "--color-fix", metavar="|".join(COLOR_FIXES), help=f"Colour fix against the input: {', '.join(COLOR_FIXES)}."),
    device: str = typer.Option("auto", "--device", metavar="NAME", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", metavar="auto|fp32|fp16|bf16", help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16."),
    tile: str = typer.Option("auto", "--tile", metavar="auto|off|N", help="Tiles for large images: auto (whole when it fits in free memory), off (always whole), or N: at most N latent px (8N image px) a side."),
    recursive: bool = typer.Option(False, "-r", "--recursive", metavar="", help="Descend into subfolders of directory inputs."),
    fmt: Optional[str] = typer.Option(None, "--format", metavar="NAME", help="Output format png, jpg (or jpeg), webp, tiff (or tif) or bmp; the outputs get that suffix (default: the input's format; PNG for formats icmsr only reads: GIF, AVIF, HEIC)."),
    png_compression: int = typer.Option(1, "--png-compression", min=0, max=9, metavar="N",
                                        help="zlib level of PNG outputs, 0-9: 1 (default) is fast, 9 the smallest files."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Replace existing outputs (default: skip them, so a rerun resumes)."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, metavar="N", help="Refuse inputs with more pixels than this (decompression-bomb guard), and files or streams over 16 bytes a pixel of it plus 64 MiB."),
    json_lines: bool = typer.Option(False, "--json", metavar="", help="One JSON line per file on stdout (input, output, sizes, seconds, status, error; rank under torchrun)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", metavar="", help="Print only errors."),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="I/N", help="I/N: upscale only shard I (0-based) of N, split by relative path: "
                                                              "for Slurm arrays and indexed jobs sharing one filesystem."),
) -> None:
    """Upscale images with the one-step diffusion model.

    Under torchrun or `accelerate launch` every process takes its own GPU (LOCAL_RANK) and claims
    files one at a time from a shared counter; rank 0 prints the summary, and every rank exits 1 if
    any file failed anywhere.

    Exit codes: 0 all done (or skipped), 1 some inputs failed (or a full disk stopped the batch),
    2 usage or setup error, 3 unexpected error, 130/143 interrupted (finished files are complete).

    Environment: ICMSR_CACHE_DIR (prompt embeddings and merged weights; default: the user cache
    folder), ICMSR_MERGED_CACHE=0 (do not keep merged weights on disk), ICMSR_DEBUG=1 (tracebacks),
    HF_HOME / HF_HUB_OFFLINE / HF_TOKEN / HF_ENDPOINT (downloads).
    """
    from .io import batch
    from .upscaler import UpscaleOptions

    for value, flag in ((model, "--model"), (base, "--base"), (lora, "--lora"), (shard, "--shard")):
        _given(value, flag)
    tile_size = _parse_tile(tile)
    color_fix = color_fix.strip().lower()  # as --format, --device and --dtype take any case
    if color_fix not in COLOR_FIXES:
        raise typer.BadParameter(f"{color_fix!r}: expected one of {', '.join(COLOR_FIXES)}", param_hint="--color-fix")
    scale = _parse_scale(scale)
    if fmt is not None and fmt.lower().removeprefix(".") not in FORMATS:
        raise typer.BadParameter(f"{fmt!r}: expected one of {', '.join(FORMATS)}", param_hint="--format")
    fmt = fmt.lower().removeprefix(".") if fmt else None
    if json_lines and output == batch.STDIO:
        raise typer.BadParameter("--json writes to stdout, which -o - already carries the image on", param_hint="--json")
    if batch.STDIO in inputs and sys.stdin.isatty():  # it would wait, after loading the model, for an image typed in
        raise typer.BadParameter("standard input is a terminal; pipe or redirect an image into it (< in.png)", param_hint="INPUT -")
    if output == batch.STDIO and sys.stdout.isatty():  # image bytes would garble the terminal, as gzip refuses too
        raise typer.BadParameter("standard output is a terminal; redirect it to a file or a pipe (> out.png)", param_hint="-o -")
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="%(message)s", stream=sys.stderr)
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # Slurm preemption and `timeout` send SIGTERM
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _interrupt)
    tally = Tally()
    try:
        _run_upscale(
            tally, inputs, output, model=model, base=base, lora=lora, prompt=prompt, device=device, dtype=dtype,
            options=UpscaleOptions(scale=scale, color_fix=color_fix, tile=tile_size), recursive=recursive, fmt=fmt,
            overwrite=overwrite, max_pixels=max_pixels, json_lines=json_lines, quiet=quiet, png_compression=png_compression,
            shard=shard,
        )
    except Interrupted as exc:
        _say(f"{tally}; finished outputs are complete, rerun to resume", "interrupted:", "red")
        raise typer.Exit(EXIT_INTERRUPTED + exc.signum)
    if tally.failed or tally.left:
        raise typer.Exit(1)


@dataclass
class Tally:
    """What happened to the files of one run, for the summary line and the exit code."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0

    @property
    def left(self) -> int:
        return self.total - self.done - self.skipped - self.failed

    def __str__(self) -> str:
        text = f"{self.done} done, {self.skipped} skipped, {self.failed} failed"
        return text + (f", {self.left} not started" if self.left > 0 else "")


def _run_upscale(tally: Tally, inputs, output, *, model, base, lora, prompt, device, dtype, options, recursive, fmt,
                 overwrite, max_pixels, json_lines, quiet, png_compression, shard) -> None:
    from .io import batch
    from .engines import claims
    from .io.images import format_for
    from .engines.ranks import Ranks
    from .upscaler import check_host_memory, load_upscaler, output_size, prepare_picture, processing_size

    ranks = Ranks.from_env()
    lead = ranks is None or ranks.rank == 0  # says what is said once: missing inputs, the summary
    tag = f"[rank {ranks.rank}] " if ranks else ""
    settings = batch.BatchSettings(overwrite=overwrite, max_pixels=max_pixels, png_compression=png_compression,
                                   contain_bugs=not _debugging(),
                                   stdout_format=format_for("stdout" + FORMATS[fmt]) if fmt else None,
                                   output_size=partial(output_size, scale=options.scale),
                                   run_size=partial(processing_size, min_side=options.min_side), check_memory=check_host_memory)
    try:
        if ranks:
            ranks.join()
            ranks.share_cpu()
            device = ranks.device(device)
        jobs, missing = batch.plan(inputs, output, recursive=recursive, fmt=fmt)
        if not jobs and not missing:  # in every shard alike
            raise SetupError(f"no images found in the inputs (folders yield {' '.join(batch.IMAGE_SUFFIXES)} files)")
        if shard:
            index, count = claims.parse_shard(shard)
            everything = len(jobs)
            jobs = claims.take_shard(jobs, lambda job: job.key or job.name, index, count)
            missing = missing if index == 0 else []
            if not jobs and not missing and not quiet:  # more shards than files, or an unlucky split: not an error
                console.print(f"shard {shard}: no image falls in this shard ({everything} in all); nothing to do")
        if ranks:
            ranks.check_same_plan([str(j.target) for j in jobs])
        tally.total = len(jobs) + len(missing)
        start = time.perf_counter()
        upscaler, progress = None, None
        bar = _progress() if not quiet and console.is_terminal and ranks is None else None  # ranks share a terminal
        pending = [j for j in jobs if batch.needs_model(j, overwrite)]
        work = bool(pending)
        batch.check_writable(pending)
        ahead = work and _prepares_ahead(device)  # (torch is imported only when there is work)
        # reading starts now; the model loads once a file has read (Reader.any_readable)
        reader = batch.Reader(jobs if ranks is None else claims.claimed(jobs, ranks.next_index), settings,
                              prepare=partial(prepare_picture, options=options) if ahead else None)
    except IcmsrError as exc:
        _fail(exc)
    try:
        # the model waits for an input that reads: inputs that all fail (an HEIC without pillow-heif,
        # damaged files) fail at once, not after a load or a multi-gigabyte download. Under a
        # launcher the ranks meet around the load, so every rank loads
        if work and (ranks is not None or reader.any_readable()):
            # under a launcher, each machine's first rank loads (and merges and caches) first, then the rest
            # map the cached weights instead of merging and writing the same cache at once
            if ranks and ranks.local_rank != 0:
                ranks.barrier()
            if bar:
                progress = _tile_progress(bar)
            else:  # ranks in a terminal share it: no progress; in a log, a line now and then
                progress = None if quiet or console.is_terminal else _LogProgress(tag)
            with _loading("loading model", quiet or not lead) as bars:
                upscaler = load_upscaler(
                    model, base=base, lora=lora, device=device, dtype=dtype, prompt=prompt, options=options,
                    reuse_freed_memory=True,  # this process is ours: see devices.freed_memory_reused
                    notify=_notify, progress=progress, tqdm_class=bars,
                )
            if ranks and ranks.local_rank == 0:
                ranks.barrier()
            if not quiet:
                pipe = upscaler.pipe
                console.print(f"{tag}model ready on {pipe.device} ({str(pipe.dtype).removeprefix('torch.')}) in {time.perf_counter() - start:.1f} s")
    except BaseException as exc:
        reader.close()
        if isinstance(exc, IcmsrError):
            _fail(exc)
        raise

    def report(result: batch.JobResult) -> None:
        if result.data is not None:  # delivered before it is said to be: a reader that ends early gets no "-> stdout"
            result = _delivered(result)
        setattr(tally, result.status, getattr(tally, result.status) + 1)
        if result.status == "failed":
            _say(f"{tag}{result.error}", "error:", "red")
        elif not quiet:  # above the bars in a terminal (rich keeps them at the bottom)
            if result.status == "done":
                w, h = result.output_size
                console.print(f"{tag}{result.job.name} -> {result.job.target or 'stdout'} ({w}x{h}, {result.seconds:.1f} s)")
            else:
                console.print(f"{tag}{result.job.name}: {result.job.target} exists, skipped (--overwrite replaces it)")
        if json_lines:
            sys.stdout.write(json.dumps({**result.as_json(), **({"rank": ranks.rank} if ranks else {})}) + "\n")
            sys.stdout.flush()

    for arg in missing if lead else []:
        report(batch.JobResult(batch.Job(None, None, arg, missing=True), "failed", error=f"{arg}: no such file, folder or matching image"))
    try:
        with bar or nullcontext():
            task = bar.add_task("images", total=len(jobs)) if bar else None
            upscale = None if upscaler is None else upscaler.upscale_prepared if ahead else upscaler.upscale_picture
            # closing: an interrupt between files still has the writes in flight told (on_stopped)
            started = progress.image if isinstance(progress, _LogProgress) else None
            with closing(batch.run(reader, upscale, notify=_notify, on_stopped=report, started=started)) as results:
                for result in results:
                    report(result)
                    if bar:
                        bar.advance(task)
        if ranks:  # every rank learns the whole run's counts, so every rank exits 1 if a file failed anywhere
            tally.done, tally.skipped, tally.failed = ranks.total([tally.done, tally.skipped, tally.failed])
            ranks.leave()
    except RanksLostError as exc:  # the other ranks are gone: no summary to sum
        _say(f"{tag}{exc}", "error:", "red")
        raise typer.Exit(exc.exit_code)
    if not lead:
        return
    if tally.left:
        _say(str(tally), "stopped:", "red")
    elif not quiet and tally.total > 1:
        console.print(str(tally))


def _delivered(result: batch.JobResult) -> batch.JobResult:
    """The image written to standard output, or a failure where its reader ended first (`| head -c`,
    a viewer closed): the run said "-> stdout" and exited 1 without a word."""
    try:
        sys.stdout.buffer.write(result.data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        # the rest of the buffer could never be flushed either: stdout goes nowhere from here on,
        # so that the interpreter's own flush at exit does not print a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return replace(result, status="failed", data=None,
                       error=f"{result.job.name}: standard output was closed before the whole image was written "
                             "(the program reading it ended early)")
    return result


def _prepares_ahead(device: str) -> bool:
    """Whether the reader thread also resizes each image to the model's size. On a GPU that resize
    (tens of ms for a 2048^2 output) then overlaps the model's work; on the CPU the model takes
    seconds, and a second whole-image float copy would only add to the resident memory."""
    from .model.devices import resolve_device

    return resolve_device(device).type != "cpu"


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP: the batch stops between or inside files, never inside a write."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


_LOG_EVERY = 30.0  # seconds between progress lines in a log


class _LogProgress:
    """Off a terminal (a log, nohup, a scheduler's output file) no bars are drawn; a long image says
    how far it has come, a line at most every _LOG_EVERY seconds, naming the image (its own line
    comes when it is written, after these). A 6000x4000 output took 13 minutes on a 2-core CPU with
    nothing in the log until its file was written."""

    def __init__(self, tag: str):
        self.tag, self.name, self.last = tag, "", time.monotonic()

    def image(self, job: batch.Job) -> None:
        """The image the model starts on (batch.run's `started`)."""
        self.name = job.name

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= _LOG_EVERY:
            self.last = now
            console.print(f"{self.tag}  {self.name}: {stage}" + (f" tiles {done}/{total}" if total > 1 else (" done" if done else " running")))


def _tile_progress(bar):
    """Progress of the current image, one bar per stage (its tiles, or one step when whole),
    replaced image by image: a stage's report after it finished, or one that went back (an
    out-of-memory retry with smaller tiles), starts its bar afresh."""
    tasks: dict[str, tuple[int, int, int]] = {}  # stage: (task id, done, total) as last reported

    def update(stage: str, done: int, total: int) -> None:
        task, last, last_total = tasks.get(stage, (None, 0, 0))
        if task is None or last >= last_total or done < last:
            if task is not None:
                bar.remove_task(task)
            task = bar.add_task(f"  {stage}" + (" tiles" if total > 1 else ""), total=total)
        bar.update(task, completed=done, total=total)
        tasks[stage] = (task, done, total)

    return update


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


@_command(app, "eval")
def evaluate(
    sr: str = typer.Argument(..., metavar="SR", help="Super-resolved image, or a folder of them."),
    ref: str = typer.Option(..., "--ref", metavar="PATH", help="Reference (ground-truth) image, or a folder of them; paired with SR by file stem."),
    metric_list: str = typer.Option("psnr,ssim", "--metrics", metavar="LIST",
                                    help="Comma-separated: psnr, ssim (Y channel, as the papers' tables), and with pyiqa "
                                         "installed lpips, dists, clipiqa, musiq, maniqa, niqe."),
    crop_border: int = typer.Option(0, "--crop-border", min=0, metavar="PX", help="Pixels cut from each side before psnr/ssim (papers often use the scale)."),
    suffix: Optional[str] = typer.Option(None, "--suffix", metavar="TEXT", help="What SR names add to the reference stem, e.g. _x4 pairs 0001_x4.png with 0001.png "
                                                                "(default: equal stems, or the stem then _ - . and anything)."),
    device: str = typer.Option("auto", "--device", metavar="NAME", help="Device of the learned metrics: auto, cpu, cuda, cuda:N or mps."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, metavar="N", help="Refuse images with more pixels than this, as upscale does (an upscale's output can pass the default: raise it for those)."),
    json_lines: bool = typer.Option(False, "--json", metavar="", help='One JSON line per pair on stdout (with "error" for a pair that failed or a file left unpaired), then {"mean": {...}, "count": N}.'),
) -> None:
    """Score SR images against references: PSNR and SSIM on the Y channel, plus pyiqa's learned metrics.

    PSNR and SSIM are computed on BT.601 luma, as pyiqa does with test_y_channel=True and
    color_space=ycbcr; LPIPS, DISTS and the no-reference metrics come from pyiqa when it is installed.
    A pair with a size mismatch, a missing partner or an unreadable file is one line on stderr; the others
    are still scored and the exit code is 1. Exit codes: 0 all pairs scored, 1 some failed, 2 usage error.
    """
    from .scoring import evaluation

    try:
        names = evaluation.parse_metrics(metric_list)
        pairs, problems = evaluation.pair_files(sr, ref, suffix=suffix)
        if not pairs and not problems:
            raise SetupError(f"{sr}: no images found (folders yield {' '.join(evaluation.IMAGE_SUFFIXES)} files)")
        for problem in problems:
            _say(str(problem), "error:", "red")
            if json_lines:
                sys.stdout.write(json.dumps(problem.as_json()) + "\n")
        scoring = evaluation.score_pairs(pairs, names, crop_border=crop_border, device=device, max_pixels=max_pixels,
                                         contain_bugs=not _debugging())
        results = []
        bar = _progress() if console.is_terminal and len(pairs) > 1 else None
        with bar or nullcontext():
            task = bar.add_task("scoring", total=len(pairs)) if bar else None
            for result in scoring:  # the learned metrics' setup errors surface on the first step
                results.append(result)
                if result.error:
                    _say(result.error, "error:", "red")
                if json_lines:
                    sys.stdout.write(json.dumps(result.as_json()) + "\n")
                    sys.stdout.flush()
                if bar:
                    bar.advance(task)
    except IcmsrError as exc:
        _fail(exc)
    scored = [r for r in results if r.error is None]
    mean = evaluation.means(results, names)
    if json_lines:
        sys.stdout.write(json.dumps({"mean": mean, "count": len(scored)}) + "\n")
    elif scored:  # no table of headers alone when every pair failed: the errors above said why
        _score_table(scored, names, mean)
    if problems or len(scored) < len(results):
        raise typer.Exit(1)


def _score_table(scored, names: list[str], mean: dict[str, float]) -> None:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    table.add_column("SR")
    table.add_column("reference")
    for name in names:
        table.add_column(name.upper() if name in ("psnr", "ssim") else name, justify="right")
    for result in scored:
        table.add_row(Text(_shown(str(result.pair.sr))), Text(_shown(str(result.pair.ref))), *(f"{result.scores[n]:.4f}" for n in names))
    if mean:
        table.add_row(f"mean of {len(scored)}", "", *(f"{mean[n]:.4f}" for n in names), style="bold")
    Console(highlight=False, soft_wrap=True).print(table)


@_command(weights_app, "list")
def weights_list() -> None:
    """List the registry's models and the merged weights kept by earlier runs. Needs no network.

    Per model: its name, whether it is cached, its size on disk and its description."""
    from .cache import cache_dir, merged_usage
    from .weights.hub import cache_state
    from .weights.registry import load_registry

    try:
        registry = load_registry()
        rows = []
        for name, spec in registry.models.items():
            state = cache_state(spec)
            if spec.lora is None:
                cached = "weights not published"
            elif state.base and state.lora:
                cached = "cached"
            else:
                cached = "partly cached" if state.base or state.lora else "not cached"
            label = f"{name} (default)" if name == registry.default else name
            rows.append((label, cached, _human_size(state.size_bytes) if state.size_bytes else "-", spec.description))
    except IcmsrError as exc:
        _fail(exc)
    widths = [max(len(r[i]) for r in rows + [("NAME", "STATUS", "SIZE", "")]) for i in range(3)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(("NAME", "STATUS", "SIZE"), widths)) + "  DESCRIPTION")
    for row in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    root = cache_dir() / "merged"
    entries, size = merged_usage(root)
    if entries:
        typer.echo(f"merged weights: {entries} cached {'entry' if entries == 1 else 'entries'}, {_human_size(size)} in {root} "
                   "(safe to delete; ICMSR_MERGED_CACHE=0 stops keeping them)")


@_command(weights_app, "download")
def weights_download(
    name: Optional[str] = typer.Argument(None, metavar="NAME", help="Model name from weights.toml (default: the registry's default)."),
    dtype: str = typer.Option("auto", "--dtype", metavar="auto|fp32|fp16", help="Which weights: fp32, or fp16 (also used for bf16); auto: fp16 when CUDA is present."),
) -> None:
    """Download a model's base weights and LoRA checkpoint into the Hugging Face cache."""
    name = _given(name, "NAME")
    import torch

    from .model.devices import resolve_device, resolve_dtype
    from .weights.hub import resolve_weights
    from .weights.registry import load_registry

    try:
        registry = load_registry()
        spec = registry.get(name or registry.default)
        dt = resolve_dtype(dtype, resolve_device("auto") if dtype == "auto" else torch.device("cpu"))
        with _loading(f"downloading {spec.name}") as bars:
            paths = resolve_weights(spec, fp16=dt != torch.float32, notify=_notify, tqdm_class=bars)
    except IcmsrError as exc:
        _fail(exc)
    console.print(f"{spec.name}: base model in {paths.base}")
    console.print(f"{spec.name}: LoRA checkpoint {paths.lora}")


@_command(weights_app, "verify")
def weights_verify(name: Optional[str] = typer.Argument(None, metavar="NAME", help="Model name; default: every cached model.")) -> None:
    """Re-hash cached weights (Hub blobs against their sha256 names, the LoRA against its pin). Offline.

    A corrupt file is removed, so that `icmsr weights download` fetches it again."""
    name = _given(name, "NAME")
    from .weights.hub import cache_state, verify_cached
    from .weights.registry import load_registry

    try:
        registry = load_registry()
        specs = [registry.get(name)] if name else [s for s in registry.models.values() if cache_state(s).base or cache_state(s).lora]
    except IcmsrError as exc:
        _fail(exc)
    problems = [p for spec in specs for p in verify_cached(spec)]
    for problem in problems:
        _say(problem, "error:", "red")
    if problems:
        raise typer.Exit(1)
    console.print(f"verified: {', '.join(s.name for s in specs) or 'nothing cached'}")


@_command(weights_app, "convert")
def weights_convert(
    source: Path = typer.Argument(..., metavar="SOURCE", help="OSEDiff-format .pkl checkpoint."),
    target: Path = typer.Argument(..., metavar="TARGET", help="Output .safetensors file (same tensors; ranks and module lists in metadata); its folder is made if needed."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="", help="Replace an existing TARGET (default: keep it and skip)."),
) -> None:
    """Convert an OSEDiff .pkl LoRA checkpoint to safetensors (loads without unpickling)."""
    from .model.lora import load_lora_checkpoint, save_lora_safetensors

    if target.suffix != ".safetensors":
        raise typer.BadParameter(f"{target}: the output must end in .safetensors", param_hint="TARGET")
    if target.is_dir():
        raise typer.BadParameter(f"{target}: is a folder; name the .safetensors file to write", param_hint="TARGET")
    if target.exists() and not overwrite:  # as upscale treats its outputs: a rerun keeps what is there
        console.print(f"{target} exists, skipped (--overwrite replaces it)")
        return
    try:
        checkpoint = load_lora_checkpoint(source)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            save_lora_safetensors(checkpoint, target)
        except OSError as exc:  # a full disk is a DiskFullError already, with what it needed
            raise SetupError(f"{target}: cannot write ({exc.strerror or exc})") from None
    except IcmsrError as exc:
        _fail(exc)
    console.print(f"{source} -> {target}")


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def main(argv: list[str] | None = None) -> None:
    """The `icmsr` command. Every exception ends as one line on stderr and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # huggingface_hub logs each retry of a failing download to stderr ("Error while downloading ...",
    # eleven lines for one unreachable host); a failure ends in our one line. HF_HUB_VERBOSITY still rules.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")  # likewise OpenCV's decoder errors: we name the file and why
    if "--debug" in argv:  # a root option, accepted anywhere: users append it to the failing line
        argv = ["--debug", *(a for a in argv if a != "--debug")]
    elif not _debugging():  # likewise libtiff's lines on a damaged TIFF; --debug keeps them, as detail
        from .io import libtiff

        libtiff.mute()
    try:
        app(args=argv, prog_name="icmsr")
    except SystemExit:
        raise
    except KeyboardInterrupt:  # before the batch installed its handlers (imports, argument parsing)
        _say("", "interrupted", "red")
        sys.exit(EXIT_INTERRUPTED + signal.SIGINT)
    except Exception as exc:  # noqa: BLE001 - the edge of the program: a bug still gets one line
        if _debugging():
            raise
        _say(unexpected(exc), "error:", "red")
        sys.exit(EXIT_INTERNAL)
