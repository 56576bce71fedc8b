"""How replies are decoded, for every place that generates (evaluation, `finetune chat`, `finetune serve`).

Entry points: `DecodingSettings` (what the user asks for) and `generate_kwargs(settings, generation_config,
prompt_length=...)`, the keyword arguments `model.generate()` gets: the model's own sampling settings, then the
user's, then the repetition guard (`RepetitionGuard`), which keeps greedy replies of small models out of loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from finetune.config import EvaluationConfig
from finetune.errors import FinetuneError, argument

# The sampling settings a model's generation_config may ship; its authors' choice beats our fallback.
MODEL_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
# How to decode when neither the user nor the model's generation_config says: the chat default finetune always had.
FALLBACK_SAMPLING: dict[str, Any] = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
# Settings that only mean something when sampling; greedy decoding drops them (the model's own included).
_SAMPLING_ONLY = ("temperature", "top_p", "top_k")

# The guard's shape, DRY's usual values, kept after measuring SmolLM2-135M-Instruct (benchmarks/results/
# repetition_guard.md): a repeat may run 2 tokens freely (names, "of the"), the third is penalised by the strength,
# each further one 1.75 times more, so a loop is broken within a few tokens while a short echo costs little.
GUARD_BASE = 1.75
GUARD_ALLOWED_LENGTH = 2
GUARD_STRENGTH: float = EvaluationConfig.model_fields["repetition_guard_strength"].default
# Match lengths past this many tokens beyond the allowed length are not counted: the penalty is already huge
# (0.8 * 1.75**24 > 5e5 at the defaults), and a bounded count keeps the work per step from growing as the reply does.
_COUNTED_BEYOND_ALLOWED = 24


@dataclass(frozen=True)
class DecodingSettings:
    """What the user asks of decoding; None leaves a setting to the model's generation_config, else the fallback.

    temperature 0 means greedy decoding (the same reply every time). The repetition guard works the same greedy or
    sampling.
    """

    max_new_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    repetition_guard: bool = True
    repetition_guard_strength: float = GUARD_STRENGTH

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise FinetuneError(f"{argument('max_new_tokens', self.max_new_tokens)}: use 1 or more tokens.")
        if self.temperature is not None and self.temperature < 0:
            raise FinetuneError(f"{argument('temperature', self.temperature)}: use 0 (greedy) or more.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise FinetuneError(f"{argument('top_p', self.top_p)}: use a share above 0 and at most 1.")
        if self.repetition_guard_strength <= 0:
            raise FinetuneError(
                f"{argument('repetition_guard_strength', self.repetition_guard_strength)}: use a penalty above 0, "
                "or turn the guard off instead (repetition_guard=False; on the command line --no-repetition-guard)."
            )

    @classmethod
    def for_evaluation(cls, cfg: EvaluationConfig) -> DecodingSettings:
        """Greedy unless `evaluation.do_sample`: a before/after comparison needs the same reply every time.

        Args:
            cfg: The `evaluation:` section: max_new_tokens, do_sample, temperature, top_p and the repetition guard.

        Returns:
            The DecodingSettings evaluation generates with.
        """
        return cls(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature if cfg.do_sample else 0,
            top_p=cfg.top_p if cfg.do_sample else None,
            repetition_guard=cfg.repetition_guard,
            repetition_guard_strength=cfg.repetition_guard_strength,
        )


def generate_kwargs(
    settings: DecodingSettings, generation_config: GenerationConfig, *, prompt_length: int
) -> dict[str, Any]:
    """Keyword arguments for `model.generate()`: the model's own sampling settings where its generation_config ships
    any (else `FALLBACK_SAMPLING`), overridden by the user's explicit `settings`, plus the repetition guard.

    prompt_length: the width of the (left-padded) prompt batch; the guard looks only at what comes after it.

    Args:
        settings: The user's decoding settings; None fields keep the model's own.
        generation_config: The model's generation config.
        prompt_length: The width of the prompt batch, in tokens.

    Returns:
        max_new_tokens, do_sample and the sampling settings, and a `logits_processor` with the RepetitionGuard when
        it is on.
    """
    shipped = {key: getattr(generation_config, key, None) for key in MODEL_SAMPLING_KEYS}
    shipped = {key: value for key, value in shipped.items() if value is not None}
    # A model that does not say whether to sample gets the fallback, under whatever it does ship.
    chosen = {**({} if "do_sample" in shipped else FALLBACK_SAMPLING), **shipped}
    if settings.temperature is not None:
        chosen["do_sample"] = settings.temperature > 0
        if settings.temperature > 0:
            chosen["temperature"] = settings.temperature
    if settings.top_p is not None:
        chosen["top_p"] = settings.top_p
    if not chosen["do_sample"]:
        # None, not absent: generate() would otherwise carry the model's values into a decoding that ignores them.
        chosen.update({key: None for key in _SAMPLING_ONLY})
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, **chosen}
    if settings.repetition_guard:
        guard = RepetitionGuard(prompt_length, settings.repetition_guard_strength)
        kwargs["logits_processor"] = LogitsProcessorList([guard])
    return kwargs


class RepetitionGuard(LogitsProcessor):
    """DRY ("Don't Repeat Yourself", as in llama.cpp and text-generation-webui): a token that would extend a verbatim
    repeat of an earlier span of the reply has its logit lowered by strength * base ** (match - allowed_length), where
    match (>= allowed_length) is the length of the repeated span it would continue.

    Written here because transformers has no DRY sampler, and its own tools do harm on chat replies:
    `repetition_penalty` lowers every token seen before (the prompt's words too), which distorts ordinary text, and
    `no_repeat_ngram_size` forbids any repeated n-gram outright, which breaks code and lists. This penalises only the
    continuation of a repeat, more the longer it runs.

    Only the reply counts: columns before `prompt_length` (the prompt and, in a left-padded batch, its padding) are
    never matched, so a reply may quote its prompt. Columns after a row's end hold padding, but that row is finished
    and its scores are not used.

    Args:
        prompt_length: The width of the prompt batch; only later columns are the reply.
        strength: The penalty's multiplier (the repetition guard's strength; 0 turns it off in effect).
        base: How fast the penalty grows with each further repeated token.
        allowed_length: The longest repeat left alone, in tokens.
    """

    def __init__(
        self,
        prompt_length: int,
        strength: float = GUARD_STRENGTH,
        base: float = GUARD_BASE,
        allowed_length: int = GUARD_ALLOWED_LENGTH,
    ) -> None:
        self.prompt_length = prompt_length
        self.strength = strength
        self.base = base
        self.allowed_length = allowed_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        reply = input_ids[:, self.prompt_length :]
        length = reply.shape[1]
        if length <= self.allowed_length:  # no earlier span can match allowed_length tokens yet
            return scores
        device = reply.device
        recent = reply.flip(1)  # recent[:, m]: the token m steps back from the newest
        counted = min(length - 1, self.allowed_length + _COUNTED_BEYOND_ALLOWED)
        shifts = torch.arange(1, length, device=device)  # how far back each earlier occurrence lies
        back = shifts[:, None] + torch.arange(counted, device=device)  # (shifts, counted)
        same = recent[:, back.clamp(max=length - 1)] == recent[:, None, :counted]
        same &= back < length  # an earlier span cannot start before the reply
        # The repeat at each shift: how many of the newest tokens equal those `shift` places further back.
        match = same.long().cumprod(-1).sum(-1)  # (rows, shifts)
        following = recent[:, shifts - 1]  # the token that came after that earlier span: the repeat's continuation
        excess = (match - self.allowed_length).float()
        penalty = torch.where(excess >= 0, self.strength * self.base**excess, 0.0).to(scores.dtype)
        # Each token loses the largest penalty of the repeats it would continue: the minimum of its penalised scores.
        return scores.scatter_reduce(1, following, scores.gather(1, following) - penalty, reduce="amin")
