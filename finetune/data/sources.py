"""Sources: local files (.jsonl .json .csv .parquet .txt), folders and globs of them, `save_to_disk` folders,
Hub dataset ids, and the chatterbot-corpus package. Every row comes back with its origin (`file:line`) so any
error can point at it. Reading goes through `datasets` (its loaders and cache); only the line numbers, which
`datasets` does not keep, are recovered here.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from finetune.config import DataSource
from finetune.errors import FinetuneError

FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def describe(source: DataSource) -> str:
    """A short name for a source in reports: its path, or `chatterbot:LANGUAGE`.

    Args:
        source: A `data.sources` entry.

    Returns:
        The name.
    """
    if source.type == "chatterbot":
        return f"chatterbot:{source.language}"
    return str(source.path)


def read_source(source: DataSource) -> Iterator[tuple[str, Any]]:
    """(origin, raw row) pairs of one source, in file order.

    Args:
        source: A `data.sources` entry: files, a folder, a glob, a `save_to_disk` folder, a Hub dataset or chatterbot.

    Yields:
        (origin, row): where the row comes from (e.g. `file:line`) and the row as read, not yet validated.
    """
    if source.type == "chatterbot":
        yield from _read_chatterbot(source)
    elif source.type == "hub":
        yield from _read_hub(source)
    else:
        path = Path(source.path or "").expanduser()
        if path.is_dir() and _is_saved_dataset(path):
            yield from _read_saved(path, source)
        else:
            for file in source_files(source):
                yield from _read_file(file, source)


def source_files(source: DataSource) -> list[Path]:
    """The files a source reads (for hashing in the model card); a Hub source has none locally.

    Args:
        source: A `data.sources` entry.

    Returns:
        The files it reads: the file, every supported file under the folder (or every file of a `save_to_disk`
        folder), the glob's matches, or the chatterbot files; none for a Hub source.

    Raises:
        FinetuneError: The file type is not supported, the folder holds no data files, or the path matches nothing
            (`data.sources`); for chatterbot, see `chatterbot_files`.
    """
    if source.type == "chatterbot":
        return chatterbot_files(source)
    if source.type == "hub":
        return []
    path = Path(source.path or "").expanduser()
    if path.is_file():
        if path.suffix.lower() not in FILE_TYPES:
            raise FinetuneError(
                f"data.sources: `{path}`: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_TYPES)}."
            )
        return [path]
    if path.is_dir():
        if _is_saved_dataset(path):
            return sorted(p for p in path.rglob("*") if p.is_file())
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_TYPES)
        if not files:
            raise FinetuneError(
                f"data.sources: folder `{path}` holds no {', '.join(FILE_TYPES)} files and is not a `save_to_disk` folder."
            )
        return files
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).suffix.lower() in FILE_TYPES)
    if any(ch in str(source.path) for ch in "*?[") and matches:
        return matches
    raise FinetuneError(f"data.sources: `{source.path}` not found (a file, a folder, or a glob such as data/*.jsonl).")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_saved(path: Path, source: DataSource) -> Iterator[tuple[str, Any]]:
    saved = load_from_disk(str(path))
    if isinstance(saved, DatasetDict):
        if source.split not in saved:
            raise FinetuneError(
                f"data.sources: `{path}` has splits {', '.join(saved)}; set the source's `split` to one of them."
            )
        saved = saved[source.split]
    for index, row in enumerate(saved):
        yield f"{path}[{source.split}:{index}]", row


def _read_hub(source: DataSource) -> Iterator[tuple[str, Any]]:
    try:
        dataset = load_dataset(source.path, name=source.subset, split=source.split, revision=source.revision)
    except Exception as exc:  # offline, unknown id, gated, bad split: datasets raises many types
        raise FinetuneError(
            f"data.sources: Hub dataset `{source.path}` could not be loaded ({type(exc).__name__}: {str(exc)[:200]}). "
            "Without internet, load it once where there is, `save_to_disk` it, and point `path` at that folder."
        ) from exc
    assert isinstance(dataset, Dataset)
    for index, row in enumerate(dataset):
        yield f"hub:{source.path}[{source.split}:{index}]", row


def _read_file(path: Path, source: DataSource) -> Iterator[tuple[str, Any]]:
    if path.stat().st_size == 0:
        raise FinetuneError(f"{path}: the file is empty. Remove it from data.sources or fill it.")
    problem = _encoding_problem(path)
    if problem:
        raise FinetuneError(problem)
    builder = FILE_TYPES[path.suffix.lower()]
    options = {"sample_by": source.text_unit} if builder == "text" else {}
    try:
        if builder == "json" and _has_non_object_lines(path):
            # pyarrow's JSON reader (under datasets) segfaults on a line that is `null` (pyarrow 26); lines that are not
            # objects are invalid rows anyway, so such files take the plain path where each bad line is named.
            raise ValueError("rows that are not JSON objects")
        dataset: Any = load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as exc:  # datasets wraps parse errors in several types; find the line ourselves
        located = _locate_json_error(path) if builder == "json" else None
        if located:
            raise FinetuneError(located) from exc
        if builder != "json":
            raise FinetuneError(
                f"{path}: could not be read as {builder} ({type(exc).__name__}: {str(exc)[:300]})."
            ) from exc
        # Valid JSON that Arrow cannot type (a field that is a string in one row and a number in another, or rows
        # that are not objects): read it plainly so per-row validation can name each bad row and its line.
        dataset = _plain_json_rows(path)
    if len(dataset) == 0:
        raise FinetuneError(f"{path}: holds no rows (only whitespace). Remove it from data.sources or fill it.")
    origins = _origins(path, builder, source, len(dataset))
    for origin, row in zip(origins, dataset):
        if builder == "text":
            row = {source.columns.get("text", "text"): row["text"]}
        yield origin, row


def _encoding_problem(path: Path) -> str | None:
    if path.suffix.lower() == ".parquet":
        return None
    raw = path.read_bytes()
    if b"\x00" in raw[:8192] and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return (
            f"{path}: binary data, not a text file (a NUL byte near the start). Check that this is the file you meant."
        )
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return f"{path}:{line}: not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}). Re-save the file as UTF-8."
    return None


def _origins(path: Path, builder: str, source: DataSource, count: int) -> list[str]:
    """`file:line` of each row, so errors point at the exact place (datasets does not keep line numbers)."""
    text = path.read_text(encoding="utf-8-sig") if builder != "parquet" else ""
    if builder == "json" and path.suffix.lower() == ".jsonl":
        lines = [n for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif builder == "csv":
        reader = csv.reader(text.splitlines(keepends=True))
        next(reader, None)  # header
        lines = []
        while True:
            start = reader.line_num + 1
            if next(reader, None) is None:
                break
            lines.append(start)
    elif builder == "text" and source.text_unit != "document":
        # datasets splits on "\n" (line) or "\n\n" (paragraph, skipping empty ones) after universal-newline translation
        normalised = text.replace("\r\n", "\n").replace("\r", "\n")
        paragraphs = source.text_unit == "paragraph"
        lines, line = [], 1
        for piece in normalised.split("\n\n") if paragraphs else normalised.split("\n"):
            if piece or not paragraphs:
                lines.append(line)
            line += piece.count("\n") + (2 if paragraphs else 1)
    else:
        return [f"{path}[{i}]" for i in range(count)]
    return [f"{path}:{lines[i] if i < len(lines) else i + 1}" for i in range(count)]


def _has_non_object_lines(path: Path) -> bool:
    if path.suffix.lower() != ".jsonl":
        return False
    with open(path, encoding="utf-8-sig") as handle:
        return any(line.strip() and not line.lstrip().startswith("{") for line in handle)


def _plain_json_rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = json.loads(text)
    return rows if isinstance(rows, list) else [rows]


def _locate_json_error(path: Path) -> str | None:
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"{path}:{exc.lineno}: invalid JSON ({exc.msg})."
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                return f"{path}:{number}: invalid JSON ({exc.msg}). Each line of a .jsonl file must be one JSON object."
    return None


def chatterbot_files(source: DataSource) -> list[Path]:
    """The chatterbot-corpus YAML files a source selects (all categories of its language by default).

    Args:
        source: A `data.sources` entry of type "chatterbot" (its `language` and `categories`).

    Returns:
        The YAML file of each selected category.

    Raises:
        FinetuneError: chatterbot-corpus is not installed, the language is not in it, or a category is unknown
            (`data.sources`).
    """
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError(
            "data.sources: type 'chatterbot' needs the chatterbot-corpus package. Fix: pip install chatterbot-corpus==1.3.3"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / source.language
    available = sorted(p.stem for p in folder.glob("*.yml"))
    if not available:
        raise FinetuneError(f"data.sources: chatterbot language `{source.language}` not found in {folder.parent}.")
    unknown = sorted(set(source.categories or []) - set(available))
    if unknown:
        raise FinetuneError(
            f"data.sources: unknown chatterbot categories {unknown}; available: {', '.join(available)}."
        )
    return [folder / f"{category}.yml" for category in source.categories or available]


def _read_chatterbot(source: DataSource) -> Iterator[tuple[str, Any]]:
    """An example of extending the loader: chatterbot-corpus YAML conversations are lists of strings that
    alternate user and assistant."""
    for file in chatterbot_files(source):
        for index, turns in enumerate(yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", [])):
            if len(turns) % 2:  # a trailing question has no reply to learn from
                turns = turns[:-1]
            messages = [{"role": ("user", "assistant")[i % 2], "content": str(text)} for i, text in enumerate(turns)]
            yield f"chatterbot:{source.language}/{file.stem}.yml#{index}", {"messages": messages}
