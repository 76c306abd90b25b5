"""weights.toml -> frozen model specs, and turning --model/--base/--lora into local files."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import SetupError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class HubSource:
    repo: str
    revision: str = "main"


@dataclass(frozen=True)
class LoraSource:
    """Where a LoRA checkpoint lives: a Hub file (repo + path) or an https URL, with the hashes that
    pin its bytes: sha256, and for files served from a git repository the git blob id (what `git
    ls-tree` prints, so a pin can be read off the repository without downloading)."""

    repo: str | None = None
    path: str | None = None
    revision: str = "main"
    url: str | None = None
    sha256: str | None = None
    git_blob_sha1: str | None = None  # git's object id of the file (sha1 of "blob <size>\0" + bytes)

    @property
    def filename(self) -> str:
        return Path(self.path or self.url or "lora.pkl").name


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    license: str
    base: tuple[HubSource, ...]  # mirrors, tried in order
    lora: LoraSource | None  # None: weights not published; `note` says so
    note: str = ""


@dataclass(frozen=True)
class Registry:
    default: str
    models: dict[str, ModelSpec]

    def get(self, name: str) -> ModelSpec:
        if name not in self.models:
            raise SetupError(f"unknown model {name!r}; known models: {', '.join(sorted(self.models))}")
        return self.models[name]


def load_registry(path: str | Path | None = None) -> Registry:
    """Parse weights.toml: `path`, else $ICMSR_REGISTRY, else the copy shipped in the package.
    A file that does not parse, or an entry that lacks what a model needs, is one SetupError
    naming the file and the entry (a user's own registry is edited by hand)."""
    path = path or os.environ.get("ICMSR_REGISTRY")
    source = str(path) if path else "the shipped weights.toml"
    try:
        text = Path(path).read_text() if path else resources.files("icmsr_cli.weights").joinpath("weights.toml").read_text()
    except OSError as exc:
        raise SetupError(f"{path}: cannot read the model registry ({exc.strerror})") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SetupError(f"{source}: not valid TOML ({exc})") from exc
    try:
        tables = raw.get("models")
        if not isinstance(tables, dict) or not tables:
            raise ValueError("has no [models.NAME] tables")
        models = {name: _spec(name, entry) for name, entry in tables.items()}
        default = raw.get("default", next(iter(models)))
    except ValueError as exc:
        raise SetupError(f"{source}: {exc}") from exc
    if default not in models:
        raise SetupError(f"{source}: default = {default!r} names no model; known models: {', '.join(sorted(models))}")
    return Registry(default=default, models=models)


_LORA_KEYS = ("repo", "path", "revision", "url", "sha256", "git_blob_sha1")


def _spec(name: str, entry: object) -> ModelSpec:
    where = f"models.{name}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not a table")
    base = entry.get("base")
    if not isinstance(base, list) or not base or not all(isinstance(s, dict) and isinstance(s.get("repo"), str) for s in base):
        raise ValueError(f'{where}.base must be a list of {{ repo = "owner/name" }} tables (the Hub sources of SD-2.1-base)')
    lora = entry.get("lora")
    if lora is not None:
        if not isinstance(lora, dict):
            raise ValueError(f"{where}.lora is not a table")
        if unknown := sorted(set(lora) - set(_LORA_KEYS)):
            raise ValueError(f"{where}.lora: unknown key {unknown[0]!r} (expected {', '.join(_LORA_KEYS)})")
        if not lora.get("url") and not (lora.get("repo") and lora.get("path")):
            raise ValueError(f"{where}.lora needs url, or repo and path")
    return ModelSpec(
        name=name,
        description=str(entry.get("description", "")),
        license=str(entry.get("license", "")),
        base=tuple(HubSource(s["repo"], str(s.get("revision", "main"))) for s in base),
        lora=LoraSource(**lora) if lora else None,
        note=str(entry.get("note", "")),
    )
