"""Getting weights onto disk: Hub snapshots with mirror fallback, LoRA files by Hub path or URL,
sha256 checks, offline mode. The only module that imports huggingface_hub.

Everything goes through huggingface_hub, so HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN and
HF_ENDPOINT behave as users expect, and interrupted downloads resume.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from ..io import atomic
from ..errors import IntegrityError, ModelNotFoundError, SetupError
from .registry import HubSource, LoraSource, ModelSpec

logger = logging.getLogger(__name__)

#: called with one line for the user (mirror fall-through, verification); the CLI prints it
Notify = Callable[[str], None]

_CONFIGS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
]
_WEIGHTS = {"text_encoder": "model", "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_files(fp16: bool) -> list[str]:
    """What the pipeline reads of an SD-2.1-base repo (~2.6 GB in fp16 instead of the repo's ~15 GB)."""
    variant = ".fp16" if fp16 else ""
    return _CONFIGS + [f"{sub}/{stem}{variant}.safetensors" for sub, stem in _WEIGHTS.items()]


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _complete(folder: Path, fp16: bool) -> bool:
    return all(any(folder.glob(p)) for p in base_files(fp16))


def _cached_base(src: HubSource, fp16: bool) -> Path | None:
    """A complete cached snapshot of `src` for these weights, found with no network request."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(src.repo, revision=src.revision, allow_patterns=base_files(fp16), local_files_only=True))
    except Exception:
        return None
    return folder if _complete(folder, fp16) else None


def _cached_lora(src: LoraSource) -> Path | None:
    """The cached LoRA file of `src`, found with no network request."""
    if src.repo:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(src.repo, src.path, revision=src.revision, local_files_only=True))
        except Exception:
            return None
    path = url_cache_path(src) if src.url else None
    return path if path and path.is_file() else None


def fetch_base(sources: tuple[HubSource, ...], *, fp16: bool, what: str, notify: Notify, tqdm_class=None) -> Path:
    """A local SD-2.1-base snapshot: from the cache with no request if complete, else the first mirror that answers."""
    from huggingface_hub import snapshot_download

    patterns = base_files(fp16)
    for src in sources:  # a complete cached snapshot of any mirror needs no network at all
        if folder := _cached_base(src, fp16):
            return folder
    if is_offline():
        raise _offline(what, f"base model {sources[0].repo}" if what.startswith("--") else "base model")  # --base names one repo
    reasons: dict[str, str] = {}  # repo: why it could not be used
    for i, src in enumerate(sources):
        then = "; trying the next mirror" if i + 1 < len(sources) else ""  # not said after the last one
        try:
            folder = Path(
                snapshot_download(src.repo, revision=src.revision, allow_patterns=patterns, tqdm_class=tqdm_class)
            )
        except Exception as exc:  # missing repo, refused, network: fall through to the next mirror
            reasons[src.repo] = _reason(exc)
            if then:
                notify(f"base model source {src.repo} failed ({reasons[src.repo]}){then}")
            continue
        if _complete(folder, fp16):
            return folder
        reasons[src.repo] = f"the repo lacks {', '.join(p for p in patterns if not any(folder.glob(p)))}"
        if then:
            notify(f"base model source {src.repo} is incomplete{then}")
    if len(set(reasons.values())) == 1:  # one cause (no network): said once
        raise ModelNotFoundError(f"{what}: no base model source could be used: {next(iter(reasons.values()))} "
                                 f"(tried {', '.join(reasons)})")
    raise ModelNotFoundError(f"{what}: no base model source could be used ({'; '.join(f'{r}: {why}' for r, why in reasons.items())})")


def fetch_lora(src: LoraSource, *, what: str, notify: Notify, tqdm_class=None) -> Path:
    """A local copy of the LoRA checkpoint, sha256-verified when the source pins one."""
    if src.repo:
        path = _fetch_hub_file(src, what=what, tqdm_class=tqdm_class)
    elif src.url:
        path = _fetch_url(src, what=what, tqdm_class=tqdm_class)
    else:
        raise SetupError(f"{what}: LoRA source names neither a Hub file nor a URL")
    for kind, expected, actual in _pin_checks(src, path):
        if actual != expected:
            _delete(path)
            raise IntegrityError(f"{what}: {path.name} failed verification (expected {kind} {expected}, got {actual}); the file was deleted")
    return path


def _fetch_hub_file(src: LoraSource, *, what: str, tqdm_class) -> Path:
    from huggingface_hub import hf_hub_download

    if cached := _cached_lora(src):
        return cached
    if is_offline():
        raise _offline(what, f"LoRA checkpoint {_hub_ref(src)}")
    try:
        return Path(hf_hub_download(src.repo, src.path, revision=src.revision, tqdm_class=tqdm_class))
    except Exception as exc:
        raise ModelNotFoundError(f"{what}: cannot download {_hub_ref(src)} ({_reason(exc)})") from exc


def _hub_ref(src: LoraSource) -> str:
    """The hf:// form a user types, naming the revision when it is not the default branch."""
    at = "" if src.revision == "main" else f"@{src.revision}"
    return f"hf://{src.repo}{at}/{src.path}"


def url_cache_path(src: LoraSource) -> Path:
    """URL downloads live beside the Hub cache, one folder per URL."""
    from huggingface_hub import constants

    digest = hashlib.sha256(src.url.encode()).hexdigest()[:16]
    return Path(constants.HF_HOME) / "icmsr" / "downloads" / digest / src.filename


def _fetch_url(src: LoraSource, *, what: str, tqdm_class) -> Path:
    from huggingface_hub.file_download import http_get

    if cached := _cached_lora(src):
        return cached
    path = url_cache_path(src)
    if is_offline():
        raise _offline(what, f"LoRA checkpoint {src.url}")
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".incomplete")  # kept on failure: the next run resumes it
    try:
        with open(part, "ab") as f:
            http_get(src.url, f, resume_size=f.tell(), displayed_filename=src.filename, tqdm_class=tqdm_class)
    except Exception as exc:
        raise ModelNotFoundError(f"{what}: cannot download {src.url} ({_reason(exc, src.url)})") from exc
    atomic.sync_and_rename(part, path)
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1_of(path: Path) -> str:
    """git's object id of a file: sha1 of `blob <size>\0` followed by the bytes."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pin_checks(src: LoraSource, path: Path):
    """(kind, expected, actual) for each hash the source pins, computed from the file."""
    for kind, expected, digest in (("sha256", src.sha256, sha256_of), ("git blob sha1", src.git_blob_sha1, git_blob_sha1_of)):
        if expected:
            yield kind, expected.lower(), digest(path)


def _delete(path: Path) -> None:
    """A file that failed verification, and its Hub blob, so the next run downloads it afresh."""
    real = path.resolve()
    path.unlink(missing_ok=True)
    real.unlink(missing_ok=True)


def _offline(what: str, thing: str) -> ModelNotFoundError:
    """`what`: a registered model's name, or the option (--base, --lora) that named the source:
    `weights download` fetches only registered models, so its advice there sent users in a loop."""
    # the advice holds for `weights download` too, which HF_HUB_OFFLINE stops as well
    how = "to download it" if what.startswith("--") else f"and run `icmsr weights download {what}`"
    return ModelNotFoundError(f"{what}: {thing} not downloaded and HF_HUB_OFFLINE is set; unset it {how}")


def _reason(exc: Exception, url: str | None = None) -> str:
    """One line for an exception from huggingface_hub or the network; `url`: what was fetched,
    when it is not on the Hub (whose endpoint a network failure names otherwise)."""
    from huggingface_hub import errors

    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    # subclasses before their bases: a gated repo is a RepositoryNotFoundError, and "not in the
    # local cache" (what huggingface_hub raises when the Hub cannot be reached) an EntryNotFoundError
    if isinstance(exc, errors.GatedRepoError):
        return "gated repository: accept its licence on the Hub and set HF_TOKEN"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return "repository not found" + (f" (HTTP {status})" if status else "")
    if isinstance(exc, errors.RevisionNotFoundError):
        return "revision not found"
    if status is None and (isinstance(exc, errors.LocalEntryNotFoundError) or _network_error(exc)):  # an answer is no network failure
        from huggingface_hub import constants

        return f"cannot reach {_origin(url) if url else constants.ENDPOINT} ({_root_cause(exc)})"
    if isinstance(exc, errors.EntryNotFoundError):
        return "file not found"
    if status:
        return f"HTTP {status}"
    return _one_line(exc)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _chain(exc: BaseException | None):
    """The exception, then what it was raised from or while handling, innermost last."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _network_error(exc: BaseException) -> bool:
    """A connection that could not be made or broke off (httpx's and requests' errors, timeouts)."""
    return any(isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout", "ProxyError")
               for e in _chain(exc))


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's one line: the socket's reason, not huggingface_hub's wrapping."""
    *_, innermost = _chain(exc)
    return _one_line(innermost)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ------------------------------------------------------------------------ user-facing resolution


@dataclass(frozen=True)
class ResolvedWeights:
    base: Path
    lora: Path


def parse_lora_ref(ref: str) -> LoraSource | Path:
    """`--lora`: a local file, `hf://owner/repo[@revision]/path/in/repo` (huggingface_hub's own
    hf:// form, so a file name may hold '@'), or an https URL."""
    if ref.startswith("hf://"):
        parts = ref[5:].split("/", 2)
        if len(parts) < 3 or not all(parts):
            raise SetupError(f"--lora {ref}: expected hf://owner/repo/path/to/file or hf://owner/repo@revision/path/to/file")
        repo, _, revision = "/".join(parts[:2]).partition("@")
        if "@" in parts[1] and not revision:
            raise SetupError(f"--lora {ref}: no revision after '@' (a branch, tag or commit)")
        return LoraSource(repo=repo, path=parts[2], revision=revision or "main")
    if ref.startswith("https://") or ref.startswith("http://"):
        return LoraSource(url=ref)
    return Path(ref).expanduser()


def parse_base_ref(ref: str) -> tuple[HubSource, ...] | Path:
    """`--base`: a local diffusers folder, or a Hub repo id (`owner/name[@revision]`)."""
    path = Path(ref).expanduser()
    if path.exists() or not _REPO_ID.match(ref.split("@")[0]):
        return path
    repo, at, revision = ref.partition("@")
    if at and not revision:
        raise SetupError(f"--base {ref}: no revision after '@' (a branch, tag or commit)")
    return (HubSource(repo, revision or "main"),)


def resolve_weights(
    spec: ModelSpec,
    *,
    base: str | None = None,
    lora: str | None = None,
    fp16: bool = False,
    notify: Notify = logger.info,
    tqdm_class=None,
) -> ResolvedWeights:
    """Local paths for the base model and LoRA of `spec`, with --base/--lora overriding; downloads as needed."""
    # a model without a LoRA stops here, before gigabytes of base weights are fetched for nothing
    lora_ref: LoraSource | Path | None = parse_lora_ref(lora) if lora else spec.lora
    if lora_ref is None:
        raise SetupError(f"model {spec.name}: {spec.note or 'no LoRA checkpoint registered'}")
    base_ref = parse_base_ref(base) if base else spec.base
    if isinstance(base_ref, Path):
        if not base_ref.is_dir():
            why = "a file, not a model folder" if base_ref.is_file() else "no such folder (and not a Hub repo id)"
            raise ModelNotFoundError(f"--base {base}: {why}")
        base_dir = base_ref
    else:
        base_dir = fetch_base(base_ref, fp16=fp16, what="--base" if base else spec.name, notify=notify, tqdm_class=tqdm_class)

    if isinstance(lora_ref, Path):
        if not lora_ref.is_file():
            raise ModelNotFoundError(f"--lora {lora}: " + ("a folder, not a checkpoint file" if lora_ref.is_dir() else "no such file"))
        lora_path = lora_ref
    else:
        lora_path = fetch_lora(lora_ref, what="--lora" if lora else spec.name, notify=notify, tqdm_class=tqdm_class)
    return ResolvedWeights(base=base_dir, lora=lora_path)


@dataclass(frozen=True)
class CacheState:
    base: Path | None  # a complete cached snapshot (fp32 or fp16 weights), if any
    lora: Path | None
    size_bytes: int  # what those files take on disk


def cache_state(spec: ModelSpec) -> CacheState:
    """What of `spec` is on disk, found without any network request."""
    base, size = None, 0
    for src in spec.base:
        for fp16 in (False, True):
            if base := _cached_base(src, fp16):
                size = sum(p.resolve().stat().st_size for pat in base_files(fp16) for p in base.glob(pat))
                break
        if base:
            break
    lora = _cached_lora(spec.lora) if spec.lora else None
    if lora:
        size += lora.resolve().stat().st_size
    return CacheState(base=base, lora=lora, size_bytes=size)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def verify_cached(spec: ModelSpec) -> list[str]:
    """Re-hash what is cached for `spec`, offline; return the problems found (empty: all good).

    Hub LFS blobs are stored under their sha256, so every cached weights file can be checked
    without a request; the LoRA is checked against the registry's pin when there is one. A corrupt
    file is removed: huggingface_hub takes a cached file as it finds it, so `weights download`
    left it in place, and only deleting the cache by hand got a good copy.
    """
    state = cache_state(spec)
    problems = []
    fetch = f"`icmsr weights download {spec.name}` fetches it"
    if state.base is None:
        problems.append(f"{spec.name}: base model not downloaded; {fetch}")
    else:
        for path in sorted(state.base.rglob("*")):
            blob = path.resolve()
            if path.is_file() and _SHA256.match(blob.name) and (actual := sha256_of(blob)) != blob.name:
                _delete(path)
                problems.append(f"{spec.name}: {path.relative_to(state.base)} is corrupt (sha256 {actual}, expected {blob.name}); "
                                f"removed, {fetch} again")
    if spec.lora is None:
        return problems
    if state.lora is None:
        problems.append(f"{spec.name}: LoRA checkpoint not downloaded; {fetch}")
    else:
        wrong = [f"{kind} {actual}, expected {expected}" for kind, expected, actual in _pin_checks(spec.lora, state.lora) if actual != expected]
        if wrong:
            _delete(state.lora)
            problems.append(f"{spec.name}: {state.lora.name} is corrupt ({'; '.join(wrong)}); removed, {fetch} again")
    return problems
