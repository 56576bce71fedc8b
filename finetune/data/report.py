"""What happened to every row on its way to training: counts per step and reason, and the pre-flight findings."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from datasets import DatasetDict


class RowError(ValueError):
    """One invalid row; the message names the field and the problem."""


@dataclass
class Finding:
    """One pre-flight audit result. `serious` findings stop a run unless data.audit is 'warn'."""

    level: Literal["ok", "info", "warning", "serious"]
    check: str
    message: str


@dataclass
class DataReport:
    """Counts for every step that drops, changes or adds rows, so nothing happens silently."""

    rows_read: int = 0
    formats: Counter = field(default_factory=Counter)
    invalid: Counter = field(default_factory=Counter)
    invalid_examples: list[str] = field(default_factory=list)
    cleaned: Counter = field(default_factory=Counter)  # step -> rows changed
    dropped: Counter = field(default_factory=Counter)  # reason -> rows dropped
    leaked_into_heldout: int = 0
    truncated: int = 0
    text_chunks_added: int = 0
    samples_added: int = (
        0  # extra samples for turns a whole conversation does not show as at inference (finetune.data.masks)
    )
    weighted: dict[str, int] = field(default_factory=dict)  # source -> training rows after weighting
    augmented: int = 0
    safety_mix: int = 0  # refusal examples mixed into the training split (data.safety_mix)
    splits: dict[str, int] = field(default_factory=dict)
    trained_token_share: float = 0.0
    findings: list[Finding] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report as short lines for a person: rows read by format, skipped, changed, dropped, added; the splits.

        Returns:
            One line per count that is not zero, then the split sizes and the share of training tokens that carry loss.
        """
        formats = ", ".join(f"{count} {name}" for name, count in self.formats.most_common())
        out = [f"{self.rows_read} rows read" + (f" ({formats})" if formats else "")]
        for reason, count in self.invalid.most_common():
            out.append(f"{count} skipped: {reason}")
        out += [f"  e.g. {example}" for example in self.invalid_examples[:3]]
        for step, count in self.cleaned.most_common():
            out.append(f"{count} changed by cleaning step `{step}`")
        for reason, count in self.dropped.most_common():
            out.append(f"{count} dropped: {reason}")
        if self.leaked_into_heldout:
            out.append(f"{self.leaked_into_heldout} training conversations removed because held-out data contains them")
        if self.truncated:
            out.append(f"{self.truncated} truncated at a turn boundary to data.max_length")
        if self.samples_added:
            out.append(
                f"{self.samples_added} extra samples: assistant turns that their whole conversation does not show as at "
                "inference, each trained in a sample that ends with it (see the audit)"
            )
        if self.text_chunks_added:
            out.append(f"{self.text_chunks_added} extra chunks from splitting long text rows at data.max_length")
        if self.weighted:
            out.append(
                "training rows per source after weighting: " + ", ".join(f"{k} {v}" for k, v in self.weighted.items())
            )
        if self.augmented:
            out.append(f"{self.augmented} augmented copies added to the training split")
        if self.safety_mix:
            out.append(
                f"{self.safety_mix} refusal examples (HarmBench requests, each with a refusal) mixed into the training "
                "split (data.safety_mix)"
            )
        out.append("splits: " + ", ".join(f"{name} {count}" for name, count in self.splits.items()))
        out.append(f"{self.trained_token_share:.1%} of training tokens carry loss")
        return out


@dataclass
class PreparedData:
    """What the data stage hands to training: the tokenized splits and the report of how they were made.

    Attributes:
        splits: "train", "validation" and "test" (those present); columns messages, text, tools, origin, source,
            input_ids, labels and more.
        report: What happened to every row read.
    """

    splits: (
        DatasetDict  # train / validation / test; columns: messages, text, tools, origin, source, input_ids, labels, ...
    )
    report: DataReport
