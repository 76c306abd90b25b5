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
    """Parse weights.toml: `path`, else $ICMSR_REGISTRY, else the copy shipped in the package."""
    path = path or os.environ.get("ICMSR_REGISTRY")
    try:
        text = Path(path).read_text() if path else resources.files("icmsr_cli.weights").joinpath("weights.toml").read_text()
    except OSError as exc:
        raise SetupError(f"{path}: cannot read the model registry ({exc.strerror})") from exc
    try:
        raw = tomllib.loads(text)
        models = {name: _spec(name, entry) for name, entry in raw["models"].items()}
        registry = Registry(default=raw["default"], models=models)
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise SetupError(f"weights.toml is malformed ({exc})") from exc
    registry.get(registry.default)
    return registry


def _spec(name: str, entry: dict) -> ModelSpec:
    lora = entry.get("lora")
    return ModelSpec(
        name=name,
        description=entry["description"],
        license=entry["license"],
        base=tuple(HubSource(s["repo"], s.get("revision", "main")) for s in entry["base"]),
        lora=LoraSource(**lora) if lora else None,
        note=entry.get("note", ""),
    )
