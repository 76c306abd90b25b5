"""Many images through one loaded model: finding inputs, planning outputs, running the batch.

Reading the next image and encoding finished ones overlap with the model's work on the current
one, and the model loads only once an input has been read. Every job ends in a JobResult (done, skipped or failed with a one-line reason); one bad file
never stops the batch, a full disk does.
"""

from __future__ import annotations

import glob
import os
import queue
import stat
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .atomic import is_no_space, name_too_long, no_space_error
from ..errors import DiskFullError, IcmsrError, ImageError, SetupError, unexpected
from ..choices import DEFAULT_MAX_PIXELS, FORMATS
from .images import (IMAGE_SUFFIXES, WRITABLE_FORMATS, Picture, byte_limit, check_output_size, encode_image, fit_to_format, format_for,
                     read_image, read_upto, write_bytes)

STDIO = "-"


@dataclass(frozen=True)
class Job:
    source: Path | None  # None: standard input
    target: Path | None  # None: standard output
    name: str  # how messages name the input
    key: str = ""  # the input's path relative to its argument: what --shard splits by
    missing: bool = False  # an input argument that matched nothing: it has no output at all


@dataclass(frozen=True)
class JobResult:
    job: Job
    status: str  # done | skipped | failed
    seconds: float = 0.0
    input_size: tuple[int, int] | None = None
    output_size: tuple[int, int] | None = None
    error: str | None = None
    data: bytes | None = None  # the encoded image when the target is standard output
    error_kind: str | None = None  # "disk-full": the batch stops after it

    def as_json(self) -> dict:
        return {
            "input": self.job.name,
            "output": None if self.job.missing else str(self.job.target) if self.job.target else STDIO,
            "status": self.status,
            "input_size": list(self.input_size) if self.input_size else None,
            "output_size": list(self.output_size) if self.output_size else None,
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }


def _is_candidate(path: Path, root: Path, exclude: Path | None) -> bool:
    """Folders yield image files only, nothing hidden (no dot-files or dot-folders), and nothing
    under `exclude` (the output folder, so a rerun never upscales earlier outputs)."""
    rel = path.relative_to(root)
    visible = not any(p.startswith(".") for p in rel.parts)
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and visible and _outside(path, exclude)


def _outside(path: Path, exclude: Path | None) -> bool:
    return exclude is None or not path.resolve().is_relative_to(exclude)


def discover(inputs: list[str], *, recursive: bool, exclude: Path | None = None) -> tuple[list[tuple[Path | None, Path]], list[str]]:
    """Expand files, folders and globs into (source, relative output path) pairs; folders and globs
    skip what lies under `exclude`, and a file named twice is taken once.

    Returns the pairs and the inputs that matched nothing (reported as failures, not fatal).
    """
    found: list[tuple[Path | None, Path]] = []
    missing: list[str] = []
    for arg in inputs:
        if arg == STDIO:
            found.append((None, Path("stdin.png")))
            continue
        path = Path(arg).expanduser()
        if path.is_dir():
            walk = path.rglob("*") if recursive else path.glob("*")
            found.extend((p, p.relative_to(path)) for p in sorted(walk) if _is_candidate(p, path, exclude))
        elif path.exists():
            found.append((path, Path(path.name)))
        elif glob.has_magic(arg):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(arg), recursive=recursive)) if Path(m).is_file() and _outside(Path(m), exclude)]
            found.extend((m, Path(m.name)) for m in matches)
            if not matches:
                missing.append(arg)
        else:
            missing.append(arg)
    # a file reached twice is taken once, under its own name rather than a link's: with -r, a
    # link sorted first (Best/x.jpg -> ../raw/x.jpg) took raw/x.jpg's place in the output tree
    chosen: dict[object, int] = {}
    for i, (source, rel) in enumerate(found):
        key = source.resolve() if source is not None else i
        if key not in chosen or (found[chosen[key]][0].is_symlink() and not source.is_symlink()):
            chosen[key] = i
    return [found[i] for i in sorted(chosen.values())], missing


def plan(inputs: list[str], output: str, *, recursive: bool = False, fmt: str | None = None) -> tuple[list[Job], list[str]]:
    """Jobs for the inputs; a folder output mirrors the input tree with the same names (and formats
    unless `fmt` says otherwise). Raises SetupError for contradictions no file can fix."""
    # an unset shell variable ("$IN", "$OUT") reads as the current folder: every image in it upscaled,
    # or outputs mirrored into it ("the output would overwrite the input")
    if not output:
        raise SetupError("the output is empty; name a file or folder, or - for standard output")
    if any(not arg for arg in inputs):
        raise SetupError("an input is empty; name a file, folder or glob (. for the current folder)")
    to_stdout = output == STDIO
    out = Path(output).expanduser()
    if not to_stdout and (why := _not_for_files(out)):
        raise SetupError(f"{out}: {why}; to discard the image or pipe it on, use -o - and redirect standard output")
    many_args = len(inputs) > 1 or any(Path(a).is_dir() or glob.has_magic(a) for a in inputs if a != STDIO)
    # an output folder inside an input folder must not feed earlier outputs back in
    exclude = out.resolve() if not to_stdout and (many_args or out.is_dir()) else None
    if exclude is not None and any(Path(a).expanduser().resolve() == exclude for a in inputs if a != STDIO and Path(a).is_dir()):
        raise SetupError(f"{out}: the output folder is an input folder; choose another output folder")
    found, missing = discover(inputs, recursive=recursive, exclude=exclude)
    suffix = FORMATS[fmt] if fmt else None
    many = len(found) + len(missing) > 1 or any(Path(a).is_dir() for a in inputs if a != STDIO)
    if to_stdout and many:
        raise SetupError("-o - writes one image to standard output; give exactly one input")
    if (None, Path("stdin.png")) in found and not to_stdout and (many or out.is_dir()):
        raise SetupError("- (standard input) needs an output file or -o -, not a directory")
    # a glob means a folder however many files it matches today: what -o names must not change
    # with the data (one match wrote a file named like the folder, or failed for want of a suffix)
    # (a name that matches nothing stays a missing file: "holiday [1].png" is more often a name than a glob)
    globbed = any(glob.has_magic(a) and not Path(a).expanduser().exists() and glob.glob(os.path.expanduser(a), recursive=recursive)
                  for a in inputs if a != STDIO)
    folder = not to_stdout and (many or globbed or out.is_dir() or output.endswith(("/", "\\")))
    why = "several inputs need" if len(found) + len(missing) > 1 else "a folder input needs" if many else "a glob needs"
    if folder and out.exists() and not out.is_dir():
        raise SetupError(f"{out}: {why} an output directory, and this is a file")
    if folder and not out.exists() and out.suffix.lower() in IMAGE_SUFFIXES and not output.endswith(("/", "\\")):
        # `a.png b.png -o big.png` is a slip more often than a wish for a folder named big.png
        raise SetupError(f"{out}: {why} an output directory, and this names an image file; "
                         f"give a directory (end it with / for one named {out.name})")
    if not folder and not to_stdout:
        if not out.parent.is_dir():
            raise SetupError(f"{out}: the output folder {out.parent} does not exist")
        try:
            format_for(out if not suffix else out.with_suffix(suffix))
        except ImageError as exc:  # the whole run's output, not one file's: a usage error
            # `-o results` for one image: a folder was meant as often as a file
            folder_hint = f", or end it with / for a folder named {out.name}" if not out.suffix else ""
            raise SetupError(f"{exc}{folder_hint}") from exc
    jobs = []
    mirrored = {os.path.normcase(out / rel) for _, rel in found}  # the names a folder output gives as they are
    for source, rel in found:
        name = str(source) if source else "<stdin>"
        if to_stdout:
            target = None
        elif folder:
            target = out / rel if suffix else _writable(out / rel, mirrored)  # --format names every output
        else:
            target = out
        if target is not None and suffix:
            target = target.with_suffix(suffix)
        jobs.append(Job(source, target, name, rel.as_posix()))
    _refuse_collisions(jobs)
    return jobs, missing


def _not_for_files(out: Path) -> str | None:
    """Why `out` cannot take an image file: a device or pipe (-o /dev/null: the file went beside it
    as /dev/null.png), or a place in /dev or /proc (-o /dev/stdout into a file: the atomic rename,
    run as root, replaced /dev/stdout itself). /dev/shm is a file system like any other."""
    try:
        mode = out.stat().st_mode
    except OSError:
        mode = None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is a device or a pipe, not a file or folder"
    parts = Path(os.path.abspath(out)).parts
    if os.name != "nt" and parts[1:2] in (("dev",), ("proc",)) and parts[1:3] != ("dev", "shm"):
        return f"lies in /{parts[1]}, which holds devices, not image files"
    return None


def _writable(target: Path, mirrored: set[str]) -> Path:
    """A mirrored name icmsr cannot write (an iPhone's .HEIC, a .gif, none) becomes a PNG, as on
    standard output: each such file failed after the model had loaded. PNG keeps alpha and 16 bits.
    Where another input has that PNG's name (logo.gif beside logo.png), the suffix is kept too
    (logo.gif.png) rather than the two refused as one output."""
    try:
        format_for(target)
        return target
    except ImageError:
        png = target.with_suffix(".png")
        return target.with_name(target.name + ".png") if os.path.normcase(png) in mirrored else png


def _refuse_collisions(jobs: list[Job]) -> None:
    """Two inputs with one output (x.png from two folders, or a.png and a.jpg with --format) would
    overwrite each other: refuse before any work, naming both."""
    claimed: dict[str, Job] = {}
    for job in jobs:
        if job.target is None:
            continue
        key = os.path.normcase(os.path.abspath(job.target))
        if key in claimed:
            first = claimed[key]
            raise SetupError(f"{first.name} and {job.name} would both be written to {job.target}; "
                             "upscale them into separate output folders")
        claimed[key] = job


@dataclass(frozen=True)
class BatchSettings:
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    stdout_format: str | None = None  # Pillow format for -o - (--format; default: the input's, else PNG)
    png_compression: int = 1  # zlib level of PNG outputs: 1 encodes a photo ~4x faster than 6 for ~4% more bytes (benchmarks/encode.py)
    writers: int = 2  # threads encoding and writing finished images while the model runs (a PNG's strips use every core: io/png.py)
    #: an unexpected exception (a bug) reading or writing one file fails that file, said as a bug, and
    #: the batch goes on: a file that trips it would otherwise end every rerun at the same place.
    #: False raises it (the CLI's --debug, for the traceback)
    contain_bugs: bool = True
    #: the output size of an input size (upscaler.output_size at the run's scale), to refuse outputs
    #: their format cannot hold before the model runs; None: not checked
    output_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None
    #: the size the model runs at for an output size (upscaler.processing_size), to say when that
    #: dwarfs the output; None: not said
    run_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None
    #: raises where an output and its run size cannot fit in memory (upscaler.check_host_memory):
    #: refused as the file is read, before the model loads for it; None: checked later, as it runs
    check_memory: Callable[[tuple[int, int], tuple[int, int]], None] | None = None


class Reader:
    """Inputs decoded one job ahead, on a thread of their own, for run().

    Reading starts when the Reader is made: the CLI makes it, waits for a file that reads
    (any_readable; a stream counts at once), then loads the model.
    With `prepare`, the thread also passes each picture through it, and run's `upscale` gets what
    it returns instead of the picture: work that needs no model (upscaler.prepare_picture's resize)
    then overlaps the model's work on the previous file.

    `jobs` is consumed lazily, one job ahead of the model: with claims.claimed, a worker claims a
    file only when it is about to read it. Close it (or use it as a context manager) to stop.
    """

    def __init__(self, jobs: Iterable[Job], settings: BatchSettings, *, prepare: Callable[[Picture], Any] | None = None,
                 read_stdin: Callable[[int], bytes] | None = None):
        self.settings = settings
        self._stream = iter(jobs)
        self._prepare = prepare
        self._read_stdin = read_stdin or _stdin_bytes
        self._tasks: queue.SimpleQueue[tuple[Future, Job] | None] = queue.SimpleQueue()
        # a daemon: a read blocked on a pipe (standard input whose writer is slow) must never hold
        # up the exit after Ctrl-C or SIGTERM; it only reads, so stopping it mid-way loses nothing
        threading.Thread(target=self._work, name="icmsr-read", daemon=True).start()
        # jobs taken from the stream, in order: one read ahead, or more after any_readable()
        self._ahead: deque[tuple[Job, Future | None]] = deque()
        self._pull()

    def next(self) -> tuple[Job, Future | None] | None:
        """The next job and its read (None for the read: skipped), the one after it started; None at the end."""
        if not self._ahead:
            return None
        current = self._ahead.popleft()
        if not self._ahead:
            self._pull()
        return current

    def any_readable(self) -> bool:
        """Whether a job still to come reads, waiting for the reads it takes to know: jobs skipped or
        failed on the way are held, in order, for next(). Asked before the model loads, so that a
        batch none of whose files can be read (one HEIC without pillow-heif, a folder of damaged
        files) fails at once instead of after loading the model, or downloading it first. A
        stream (standard input, a pipe such as bash's `<(curl ...)`) counts as readable unread: its
        bytes come when their producer sends them, and the model loads meanwhile."""
        while self._ahead:
            job, future = self._ahead[-1]
            if future is not None and (_streamed(job) or not future.exception()):
                return True
            if not self._pull():
                return False
        return False

    def close(self) -> None:
        """Stop: reads not yet started are dropped; one in progress is left to end on its own."""
        for _, future in self._ahead:
            if future is not None:
                future.cancel()
        self._ahead.clear()
        self._tasks.put(None)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pull(self) -> bool:
        """Take the stream's next job (starting its read); False at the end of the stream."""
        job = next(self._stream, None)
        if job is None:
            return False
        future: Future | None = None
        if not is_skipped(job, self.settings.overwrite):
            future = Future()
            self._tasks.put((future, job))
        self._ahead.append((job, future))
        return True

    def _work(self) -> None:
        """The reader thread: reads in job order, one at a time, until close()."""
        while (task := self._tasks.get()) is not None:
            future, job = task
            if not future.set_running_or_notify_cancel():
                continue  # cancelled by close()
            try:
                future.set_result(_read(job, self.settings, self._read_stdin, self._prepare))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, which raises it
                future.set_exception(exc)


def run(
    reader: Reader,
    upscale: Callable[[Any], Picture],
    *,
    notify: Callable[[str], None] = lambda message: None,
    on_stopped: Callable[[JobResult], None] | None = None,
    started: Callable[[Job], None] | None = None,
) -> Iterator[JobResult]:
    """Run the reader's jobs, yielding one result each in job order. The model works on one image
    while the reader decodes the next and a few writer threads encode and write finished ones.

    A failure of one file (unreadable, out of memory, NaN) is its result and the batch goes on; a
    full disk would fail every later file too, so the batch stops after the writes in flight.
    Conversions an output format forces (16 to 8 bits, ...) are told to `notify` once each.
    When the batch is stopped (an interrupt, or the generator's close()), the writes in flight
    still finish, and their results go to `on_stopped`, so that every file written is told.
    `started` is told each job whose model work begins. The reader is closed at the end.
    """
    settings = reader.settings
    told: set[str] = set()
    writers = max(1, settings.writers)
    with reader, ThreadPoolExecutor(max_workers=writers, thread_name_prefix="icmsr-write") as writer:
        in_flight: deque[tuple[Job, float, Future | JobResult]] = deque()  # results not yet yielded, in job order
        stopped = False

        def settle(job: Job, t0: float, item: Future | JobResult) -> JobResult | None:
            """The entry's result (waiting for its write), or None for a full disk already told."""
            nonlocal stopped
            result = item if isinstance(item, JobResult) else _written(job, t0, item, settings.contain_bugs)
            if result.error_kind == "disk-full":
                if stopped:
                    return None  # a write that was in flight: said once, counted as not started
                stopped = True
            return result

        def drain(limit: int) -> Iterator[JobResult]:
            """Yield finished results from the front until at most `limit` remain in flight."""
            while in_flight and (len(in_flight) > limit or _ready(in_flight[0][2])):
                if (result := settle(*in_flight.popleft())) is not None:
                    yield result

        try:
            while not stopped and (current := reader.next()) is not None:
                job, future = current  # the reader has started on the next file while the model works on this one
                if future is None:
                    in_flight.append((job, 0.0, JobResult(job, "skipped")))
                    yield from drain(writers)
                    continue
                t0 = time.perf_counter()
                try:
                    picture, fmt, notes, work = _read_result(future, job, settings.contain_bugs)
                    for note in notes:
                        if note not in told:
                            told.add(note)
                            notify(note)
                    if started is not None:
                        started(job)
                    try:
                        upscaled = upscale(work)
                    except IcmsrError as exc:
                        raise _named(exc, job) from exc
                except IcmsrError as exc:
                    in_flight.append((job, t0, _failure(job, t0, exc)))
                else:
                    in_flight.append((job, t0, writer.submit(_write, job, t0, upscaled, fmt, picture.size, settings.png_compression)))
                yield from drain(writers)
            yield from drain(0)
        except BaseException:  # an interrupt: the files being written are finished all the same (never half-written)
            while on_stopped is not None and in_flight:
                if (result := settle(*in_flight.popleft())) is not None:
                    on_stopped(result)
            raise


def _streamed(job: Job) -> bool:
    """Whether the input is a stream (standard input, a pipe), not a file read at once."""
    if job.source is None:
        return True
    try:
        return stat.S_ISFIFO(os.stat(job.source).st_mode)
    except OSError:
        return False


def _stdin_bytes(limit: int) -> bytes:
    """Standard input to its end, or its first limit + 1 bytes (images.byte_limit), read from its
    file descriptor where it has one: the reader thread is a daemon, and a read cut short by the
    exit must not hold sys.stdin.buffer's lock, which the interpreter takes on its way out (a fatal
    error otherwise)."""
    stream = sys.stdin.buffer
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # a stand-in with no descriptor (a test runner's, a notebook's)
        return stream.read(limit + 1)
    return read_upto(fd, limit)


def _ready(item: Future | JobResult) -> bool:
    return isinstance(item, JobResult) or item.done()


def _named(exc: IcmsrError, job: Job) -> IcmsrError:
    """An error of the model's side (NaN, out of memory, an empty output size), which knows no file,
    as the same kind of error naming the file."""
    return type(exc)(f"{job.name}: {exc}")


def _failure(job: Job, t0: float, exc: IcmsrError) -> JobResult:
    kind = "disk-full" if isinstance(exc, DiskFullError) else None
    return JobResult(job, "failed", time.perf_counter() - t0, error=str(exc), error_kind=kind)


def _read_result(future: Future, job: Job, contain_bugs: bool):
    """What the reader thread made of the job (see BatchSettings.contain_bugs)."""
    try:
        return future.result()
    except IcmsrError:
        raise
    except Exception as exc:
        if not contain_bugs:
            raise
        raise ImageError(f"{job.name}: {unexpected(exc, 'reading it')}") from exc


def _written(job: Job, t0: float, future: Future, contain_bugs: bool) -> JobResult:
    try:
        return future.result()
    except IcmsrError as exc:
        return _failure(job, t0, exc)
    except OSError as exc:  # making the output folder: a file in the way, no permission, no space
        if is_no_space(exc):
            return _failure(job, t0, no_space_error(job.target))
        return _failure(job, t0, ImageError(f"{job.target}: cannot write ({exc.strerror or exc})"))
    except Exception as exc:  # see BatchSettings.contain_bugs
        if not contain_bugs:
            raise
        return _failure(job, t0, ImageError(f"{job.name}: {unexpected(exc, 'writing its output')}"))


def _write(job: Job, t0: float, picture: Picture, fmt: str, in_size, png_compression: int) -> JobResult:
    """Encode and write one output (a writer thread); for standard output, keep the bytes. Its
    seconds run from the model's start (t0) to the file written, clocked here: the batch collects
    results only between model calls, and the next file's call is not this file's time."""
    data = encode_image(picture, fmt, str(job.target or job.name), png_compression=png_compression)
    if job.target is not None:
        job.target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(data, job.target)
        data = None
    return JobResult(job, "done", time.perf_counter() - t0, in_size, picture.size, data=data)


def check_writable(jobs: Iterable[Job]) -> None:
    """Refuse, before any model work, outputs whose folder cannot be made or written: each file
    would run through the model and then fail. Checked on the nearest folder that exists (the
    rest is made at write time) with the permissions writes will run under."""
    effective = os.access in os.supports_effective_ids
    seen: set[Path] = set()
    for job in jobs:
        if job.target is None or job.target.parent in seen:
            continue
        seen.add(job.target.parent)
        existing = job.target.parent
        while not existing.exists():  # ends: "/" and "." exist
            existing = existing.parent
        if not existing.is_dir():
            raise SetupError(f"{job.target}: cannot be written: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK, effective_ids=effective):
            why = "is on a read-only file system" if _read_only(existing) else "is not writable by this user"
            raise SetupError(f"{job.target}: cannot be written: {existing} {why}")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs (Windows)
        return False


def needs_model(job: Job, overwrite: bool) -> bool:
    """Whether the job will reach the model: not skipped, and not refused for writing over its input."""
    return not is_skipped(job, overwrite) and not _same_file(job)


def is_skipped(job: Job, overwrite: bool) -> bool:
    """An existing output is kept (a rerun resumes) unless overwriting; an input is never its own output."""
    return job.target is not None and job.target.exists() and not overwrite and not _same_file(job)


def _same_file(job: Job) -> bool:
    return job.source is not None and job.target is not None and job.target.exists() and job.source.resolve() == job.target.resolve()


_DWARFED = 16  # a run this many times the output's pixels is said (a short side under 128 px) ...
_LARGE_RUN = 4 * 512 * 512  # ... where the run is a large one (a small image's 512 x 683 run is quick anyway)


def _read(job: Job, settings: BatchSettings, read_stdin: Callable[[int], bytes],
          prepare: Callable[[Picture], Any] | None) -> tuple[Picture, str, list[str], Any]:
    """Decode one input and settle its output format before any model work: the format (for
    standard output: --format, else the input's), and the notes of what that format converts.
    An input the format cannot hold (alpha to JPEG) fails here, not after the model ran.
    Returns the picture, the format, the notes and what `upscale` takes (prepare(picture), or the
    picture itself)."""
    if _same_file(job):
        raise ImageError(f"{job.name}: the output would overwrite the input; choose another output")
    if job.target is not None and (why := name_too_long(job.target)):
        raise ImageError(f"{job.name}: its output cannot be written: {why}; rename the input or choose another output")
    source = read_stdin(byte_limit(settings.max_pixels)) if job.source is None else job.source
    picture = read_image(source, name=job.name, max_pixels=settings.max_pixels)
    if job.target is not None:
        fmt = format_for(job.target)  # plan() made every target writable
    else:
        fmt = settings.stdout_format or (picture.format if picture.format in WRITABLE_FORMATS else "PNG")
    fitted, notes = fit_to_format(picture, fmt, job.name)
    if settings.output_size is not None:
        try:
            size = settings.output_size(picture.size)
        except IcmsrError as exc:  # an empty output: said here, before the model, as the model would
            raise _named(exc, job) from exc
        check_output_size(fmt, size, fitted.pixels.shape[2], job.name)
        run_at = settings.run_size(size) if settings.run_size else size
        if settings.check_memory is not None:
            try:
                settings.check_memory(size, run_at)
            except IcmsrError as exc:
                raise _named(exc, job) from exc
        if run_at[0] * run_at[1] > max(_DWARFED * size[0] * size[1], _LARGE_RUN):  # a thin strip: said, as it is slow for its size
            notes.append(f"{job.name}: its {size[0]}x{size[1]} output runs through the model at {run_at[0]}x{run_at[1]}, "
                         f"{run_at[0] * run_at[1] / (size[0] * size[1]):.0f} times its pixels (the model's short side is at least "
                         f"{min(run_at)} px)")
    notes = [*notes, *(f"{job.name}: {note}" for note in picture.notes)]
    if picture.frames > 1 and picture.format == "JPEG":  # a multi-picture JPEG: most cameras' own, so said once a run
        notes = [*notes, "multi-picture JPEGs hold more pictures after the photo (a camera's preview, an HDR gain map, "
                         "a stereo pair's other eye); only the photo is upscaled"]
    elif picture.frames > 1:  # said, not done silently: the other frames are not in the output
        notes = [*notes, f"{job.name}: has {picture.frames} frames or pages; only the first is upscaled"]
    if picture.clipped:  # float (HDR, scientific) or 32-bit samples beyond what any output here holds
        notes = [*notes, f"{job.name}: {100 * picture.clipped:.3g}% of its values lie outside 0-1 (float samples) or "
                         f"0-65535 (integer samples) and were clipped to that range"]
    if prepare is None:
        return picture, fmt, notes, picture
    try:
        return picture, fmt, notes, prepare(picture)
    except IcmsrError as exc:
        raise _named(exc, job) from exc
