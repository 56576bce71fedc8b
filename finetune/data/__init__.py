"""Stage 3: load conversations from any source, clean and validate them, split, augment, and tokenize them with
loss masks; audit the result before anything trains.

Entry point: `prepare_data(cfg, tokenizer)` -> PreparedData (splits + a DataReport that counts every row that was
skipped, changed, dropped or added, and why). `inspect_data` is the same pipeline for a person to look at.

Modules: sources (files, folders, save_to_disk, Hub, chatterbot), formats (row formats -> messages, validation),
cleaning, augment, masks (tokenization and labels), audit (pre-flight findings, `finetune data inspect`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from finetune.config import DataConfig, DataSource
from finetune.data.audit import Inspection, audit, enforce, summarize
from finetune.data.augment import augmented_copies
from finetune.data.cleaning import clean_conversation, drop_near_duplicates, exact_key, load_blocklist, text_steps
from finetune.data.formats import (
    ROLES,
    chat_messages,
    chat_tools,
    detect_format,
    to_conversation,
    to_messages,
    tools_json,
    validate_messages,
    validate_text,
)
from finetune.data.masks import (
    IGNORE_INDEX,
    REASONING_POLICIES,
    end_of_turn_ids,
    missing_turn_markers,
    render_chat,
    render_prompt,
    template_messages,
    template_traits,
    tokenize_conversation,
    tokenize_text,
    truncate_at_turn,
)
from finetune.data.report import DataReport, Finding, PreparedData, RowError
from finetune.data.sources import chatterbot_files, describe, read_source, source_files
from finetune.errors import FinetuneError

__all__ = [
    "IGNORE_INDEX",
    "REASONING_POLICIES",
    "ROLES",
    "DataReport",
    "Finding",
    "Inspection",
    "PreparedData",
    "RowError",
    "audit",
    "chat_messages",
    "chat_tools",
    "chatterbot_files",
    "detect_format",
    "end_of_turn_ids",
    "inspect_data",
    "load_conversations",
    "missing_turn_markers",
    "prepare_data",
    "render_chat",
    "render_prompt",
    "source_files",
    "split_conversations",
    "template_messages",
    "template_traits",
    "to_messages",
    "tokenize_conversation",
    "tokenize_splits",
    "tools_json",
    "truncate_at_turn",
    "validate_messages",
]


def load_conversations(cfg: DataConfig, report: DataReport, sources: list[DataSource] | None = None) -> Dataset:
    """Sources (default: cfg.sources) as one Dataset of cleaned, validated, de-duplicated conversations.

    Columns: messages (OpenAI-style, empty for raw text rows), text (raw text rows), tools (the row's tool list as
    JSON text, "" without), origin (`file:line`), source (index into cfg.sources, -1 for separate validation/test
    sources).

    Args:
        cfg: The `data:` section: sources, cleaning, system prompt, strict, max_bad_fraction, near duplicates.
        report: Counts of rows read, skipped, changed and dropped, added to in place.
        sources: Sources to read instead of `cfg.sources` (the separate validation or test sources).

    Returns:
        The conversations as one Dataset with the columns above.

    Raises:
        FinetuneError: A row is invalid while `data.strict` is on, more than `data.max_bad_fraction` of the rows are
            invalid, no valid conversation is left, or a source cannot be read (`data.sources`).
    """
    steps = text_steps(cfg.clean)
    blocklist = load_blocklist(cfg.clean)
    kept, seen, bad, read_before = [], set(), 0, report.rows_read
    for source_index, source in enumerate(sources or cfg.sources):
        for origin, raw in read_source(source):
            report.rows_read += 1
            try:
                fmt, messages, text, tools = to_conversation(raw, source)
                report.formats[fmt] += 1
                if fmt == "text" and not text.strip():
                    report.dropped["empty text row"] += 1
                    continue
                if cfg.system_prompt and messages and messages[0]["role"] != "system":
                    messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
                row = clean_conversation(
                    {"messages": messages, "text": text, "tools": tools, "origin": origin}, steps, report
                )
                if fmt == "text":
                    validate_text(row["text"])
                else:
                    validate_messages(row["messages"], row["tools"])
            except RowError as exc:
                if cfg.strict:
                    raise FinetuneError(
                        f"{origin}: {exc}. (data.strict is on; set it to false to skip bad rows.)"
                    ) from exc
                bad += 1
                reason = str(exc).split(": ", 1)[-1] if str(exc).startswith("turn ") else str(exc)
                report.invalid[reason] += 1
                report.invalid_examples.append(f"{origin}: {exc}")
                continue
            if blocklist is not None and blocklist.search(_all_text(row)):
                report.dropped["contains a data.clean.blocklist term"] += 1
                continue
            key = exact_key(row)
            if key in seen:
                report.dropped["exact duplicate"] += 1
                continue
            seen.add(key)
            kept.append({**row, "source": source_index if sources is None else -1})
    read = report.rows_read - read_before
    if read and bad / read > cfg.max_bad_fraction:
        raise FinetuneError(
            f"{bad} of {read} rows are invalid (more than data.max_bad_fraction={cfg.max_bad_fraction}). "
            "First problems:\n  " + "\n  ".join(report.invalid_examples[-bad:][:5])
        )
    if cfg.clean.near_duplicates is not None:
        kept, near = drop_near_duplicates(kept, cfg.clean.near_duplicates, cfg.seed)
        report.dropped[f"near duplicate (similarity >= {cfg.clean.near_duplicates})"] += len(near)
        report.invalid_examples += [f"near duplicate: {pair}" for pair in near[:2]]
    if not kept:
        raise FinetuneError(
            "data.sources: no valid conversations found"
            + (f" ({bad} invalid rows; e.g. {report.invalid_examples[0]})" if bad else ".")
        )
    return Dataset.from_list(kept)


def _all_text(row: dict[str, Any]) -> str:
    return row["text"] or "\n".join(m["content"] for m in row["messages"])


def split_conversations(dataset: Dataset, cfg: DataConfig) -> DatasetDict:
    """Seeded shuffle, optional cap, then disjoint train/validation/test splits (one conversation, one split).

    A split that comes from its own files (validation_sources, test_sources) is not carved out of `dataset`.

    Args:
        dataset: The conversations, as `load_conversations` returns them.
        cfg: The `data:` section: seed, max_rows, test_split, validation_split and the separate sources.

    Returns:
        A DatasetDict with "train" and, when they are carved out here, "validation" and "test".

    Raises:
        FinetuneError: Too few conversations to hold out the test and validation shares and keep one for training.
    """
    order = list(range(len(dataset)))
    random.Random(cfg.seed).shuffle(order)
    if cfg.max_rows:
        order = order[: cfg.max_rows]
    n = len(order)
    n_test = max(1, round(n * cfg.test_split)) if cfg.test_split and not cfg.test_sources else 0
    n_val = max(1, round(n * cfg.validation_split)) if cfg.validation_split and not cfg.validation_sources else 0
    if n - n_test - n_val < 1:
        raise FinetuneError(
            f"only {n} conversations: too few to hold out {n_test} for test and {n_val} for validation."
        )
    splits = {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return DatasetDict({name: dataset.select(indices) for name, indices in splits.items() if indices})


def _drop_toxic(train: Dataset, threshold: float, report: DataReport) -> Dataset:
    """The training conversations none of whose assistant turns the toxicity classifier (finetune.safety) gives at
    least `threshold` probability of being offensive. Training split only: held-out data stay as they are, so the
    evaluation still measures the model on the data's own distribution, and the splits do not move."""
    from finetune.safety import toxicity

    turns = [
        (index, message["content"])
        for index, messages in enumerate(train["messages"])
        for message in messages
        if message["role"] == "assistant" and (message["content"] or "").strip()
    ]
    scores = toxicity([text for _, text in turns])
    flagged = sorted({index for (index, _), score in zip(turns, scores) if score >= threshold})
    if flagged:
        report.dropped[f"assistant turn flagged toxic (data.clean.toxicity >= {threshold:g})"] += len(flagged)
    return train.select(sorted(set(range(len(train))) - set(flagged)))


def _safety_mix(rows: list[dict[str, Any]], cfg: DataConfig) -> list[dict[str, Any]]:
    """Refusal examples (finetune.safety: HarmBench requests, each with a refusal) making up `cfg.safety_mix` of the
    training rows, as conversations like the others (source -2)."""
    from finetune.safety import mix_count, refusal_conversations

    count = mix_count(cfg.safety_mix, len(rows))
    return [
        {"messages": row["messages"], "text": "", "tools": "", "origin": row["origin"], "source": -2}
        for row in refusal_conversations(count, cfg.seed)
    ]


def _mix_and_augment(train: Dataset, cfg: DataConfig, report: DataReport) -> Dataset:
    """Source weights (2.0 = every row twice, 0.5 = a seeded half), augmented copies, then the safety mix (refusal
    examples), training split only."""
    rows = train.to_list()
    if any(source.weight != 1 for source in cfg.sources):
        rng = random.Random(cfg.seed)
        mixed = []
        for index, source in enumerate(cfg.sources):
            own = [row for row in rows if row["source"] == index]
            whole, fraction = int(source.weight), source.weight - int(source.weight)
            chosen = own * whole + rng.sample(own, round(fraction * len(own)))
            report.weighted[describe(source)] = len(chosen)
            mixed += chosen
        rows = mixed + [row for row in rows if row["source"] < 0]
    augment = cfg.augment
    if augment.typos or augment.word_swaps or augment.word_deletions:
        copies = augmented_copies(rows, augment, cfg.seed)
        report.augmented = len(copies)
        rows += copies
    if not rows:
        raise FinetuneError("the training split is empty after applying the sources' `weight`s.")
    if cfg.safety_mix:  # the trainer shuffles the split, so the refusals are spread through training
        refusals = _safety_mix(rows, cfg)
        report.safety_mix = len(refusals)
        rows += refusals
    return Dataset.from_list(rows, features=train.features)


def tokenize_splits(
    conversations: DatasetDict, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, report: DataReport
) -> DatasetDict:
    """Tokenize every split with loss masks and apply the length policy (data.max_length, too_long, min_length).

    Args:
        conversations: The splits of conversations.
        tokenizer: The model's tokenizer, with the chat template that training uses.
        cfg: The `data:` section: max_length, too_long, min_length, reasoning, num_proc.
        report: Counts of samples added, rows truncated and dropped, added to in place.

    Returns:
        The splits with input_ids and labels (-100 where no loss is taken) added to the conversation columns.

    Raises:
        FinetuneError: A conversation is longer than `data.max_length` while `data.too_long` is "error", or the chat
            template cannot render one (the message names the row's origin).
    """

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """One row per training sample: a conversation may become several (see data.reasoning)."""
        out: dict[str, list[Any]] = {}
        for values in zip(*batch.values()):
            row = dict(zip(batch, values))
            try:
                samples = (
                    [tokenize_text(tokenizer, row["text"])]
                    if row["text"]
                    else tokenize_conversation(tokenizer, row["messages"], row["tools"], cfg.reasoning)
                )
            except FinetuneError as exc:
                raise FinetuneError(f"{row['origin']}: {exc}") from exc
            for sample in samples:
                covered = row["messages"][: sample["turn_messages"][-1]] if row["messages"] else row["messages"]
                for key, value in {**row, "messages": covered, **sample}.items():
                    out.setdefault(key, []).append(value)
        return out

    tokenized = DatasetDict()
    for name, split in conversations.items():
        num_proc = cfg.num_proc if cfg.num_proc and len(split) > 1000 else None
        encoded = split.map(encode, batched=True, desc=f"Tokenizing {name}", num_proc=num_proc)
        report.samples_added += len(encoded) - len(split)
        rows = []
        for row in encoded:
            length = len(row["input_ids"])
            if row["text"] and length > cfg.max_length:
                # Raw text is split into max_length windows: for continued pretraining no text should be wasted.
                chunks = [(row["input_ids"][i : i + cfg.max_length]) for i in range(0, length, cfg.max_length)]
                report.text_chunks_added += len(chunks) - 1
                rows += [
                    {**row, "input_ids": c, "labels": list(c), "origin": f"{row['origin']} (chunk {k + 1})"}
                    for k, c in enumerate(chunks)
                ]
                continue
            if length > cfg.max_length:
                if cfg.too_long == "error":
                    raise FinetuneError(
                        f"{row['origin']}: {length} tokens, longer than data.max_length={cfg.max_length}. "
                        "Raise max_length, or set data.too_long to 'drop' or 'truncate'."
                    )
                cut = truncate_at_turn(row, row["messages"], cfg.max_length) if cfg.too_long == "truncate" else None
                if cut is None:
                    reason = (
                        "longer than data.max_length"
                        if cfg.too_long == "drop"
                        else "first reply alone is longer than data.max_length"
                    )
                    report.dropped[reason] += 1
                    continue
                report.truncated += 1
                row = {**row, **cut[0], "messages": cut[1]}
            if len(row["input_ids"]) < cfg.min_length:
                report.dropped["shorter than data.min_length"] += 1
                continue
            if all(label == IGNORE_INDEX for label in row["labels"]):
                report.dropped["no tokens carry loss"] += 1
                continue
            rows.append(row)
        if not rows:
            raise FinetuneError(
                f"the {name} split is empty after applying data.max_length={cfg.max_length} and data.min_length={cfg.min_length}."
            )
        tokenized[name] = Dataset.from_list(rows)
        report.splits[name] = len(rows)
    if "train" in tokenized:
        labels = tokenized["train"]["labels"]
        total = sum(len(row) for row in labels)
        report.trained_token_share = sum(sum(1 for t in row if t != IGNORE_INDEX) for row in labels) / max(total, 1)
    return tokenized


def prepare_data(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, split: bool = True, enforce_audit: bool = True
) -> PreparedData:
    """The whole data stage. split=False puts every conversation in one `test` split (for scoring a model on a file).

    Held-out conversations that also appear in the training split are removed from it; the audit's findings are in
    the report, and with `enforce_audit` a blocking one stops the run (`data.audit`).

    Args:
        cfg: The `data:` section.
        tokenizer: The model's tokenizer, with the chat template that training uses.
        split: False to score a model on a file: no train/validation split, no mixing or augmentation.
        enforce_audit: Whether audit findings stop the run as `data.audit` says; False to only report them.

    Returns:
        PreparedData: the tokenized splits and the DataReport.

    Raises:
        FinetuneError: From loading, splitting or tokenizing (see `load_conversations`, `split_conversations`,
            `tokenize_splits`), or an audit finding while `data.audit` is "stop".
    """
    report = DataReport()
    if not split:
        conversations = DatasetDict({"test": load_conversations(cfg, report)})
        return PreparedData(splits=tokenize_splits(conversations, tokenizer, cfg, report), report=report)
    conversations = split_conversations(load_conversations(cfg, report), cfg)
    for name, sources in (("validation", cfg.validation_sources), ("test", cfg.test_sources)):
        if sources:
            conversations[name] = load_conversations(cfg, report, sources)
    # A held-out conversation that also sits in the training split would flatter every metric.
    heldout = {
        exact_key(row) for name in ("validation", "test") if name in conversations for row in conversations[name]
    }
    train = conversations["train"]
    leaked = [i for i, row in enumerate(train) if exact_key(row) in heldout]
    if leaked:
        report.leaked_into_heldout = len(leaked)
        train = train.select(sorted(set(range(len(train))) - set(leaked)))
    if cfg.clean.toxicity is not None:
        train = _drop_toxic(train, cfg.clean.toxicity, report)
    conversations["train"] = _mix_and_augment(train, cfg, report)
    splits = tokenize_splits(conversations, tokenizer, cfg, report)
    report.findings = audit(tokenizer, splits, report, reasoning=cfg.reasoning)
    if enforce_audit:
        enforce(report.findings, cfg)
    return PreparedData(splits=splits, report=report)


def inspect_data(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path | None = None,
    show_rows: int = 3,
    *,
    method: str = "sft",
) -> Inspection:
    """Prepare the data exactly as training would (for `method`: sft, or a preference method), without stopping on
    audit findings, for a person to look at; with out_dir, also write inspect.md, inspect.json and lengths.png there.
    Preference rows show their prompt and chosen reply; the audit covers the rejected replies too.

    Args:
        cfg: The `data:` section.
        tokenizer: The tokenizer and chat template to render with.
        out_dir: Folder to write inspect.md, inspect.json and lengths.png into; None writes nothing.
        show_rows: How many training rows to render token by token.
        method: The recipe's method: "sft", or a preference method ("dpo", "orpo", "simpo", "kto").

    Returns:
        The Inspection: the report, its findings and the rendered rows.

    Raises:
        FinetuneError: The data cannot be loaded or tokenized (see `prepare_data`).
    """
    from finetune.data.preference import prepare_preferences

    prepared = (
        prepare_data(cfg, tokenizer, enforce_audit=False)
        if method == "sft"
        else prepare_preferences(cfg, tokenizer, paired=method != "kto", enforce_audit=False)
    )
    inspection = summarize(prepared, tokenizer, show_rows)
    if out_dir is not None:
        inspection.write(out_dir)
    return inspection
