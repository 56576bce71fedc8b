"""Decoding settings and the repetition guard (finetune.generation): which token the guard penalises and by how much
(constructed sequences, against a plain-Python DRY), what it ignores (the prompt, left padding), how generate()
kwargs are layered (model, user, guard), and a tiny model whose greedy reply loops without the guard and not with it."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from finetune import FinetuneError
from finetune.config import EvaluationConfig, ModelConfig
from finetune.evaluation import generate
from finetune.generation import (
    FALLBACK_SAMPLING,
    GUARD_BASE,
    DecodingSettings,
    RepetitionGuard,
    generate_kwargs,
)
from finetune.metrics.repetition import repeated_ngram_share
from finetune.models import configure_generation, load_tokenizer

VOCABULARY = 20
PROMPT = [11, 12, 13]


def penalties(reply: list[int], prompt: list[int] = PROMPT, **guard) -> dict[int, float]:
    """The guard's penalty per token (only those it lowers) after `prompt` + `reply`, from all-zero scores."""
    ids = torch.tensor([prompt + reply])
    scores = RepetitionGuard(len(prompt), **guard)(ids, torch.zeros(1, VOCABULARY))[0]
    return {token: round(-value, 6) for token, value in enumerate(scores.tolist()) if value != 0}


def test_the_token_that_extends_a_repeat_and_no_other_is_penalised():
    # "5 6" repeats: 7 followed it, so 7 would make the repeat 3 long. Matched 2 = allowed: strength * 1.75**0.
    assert penalties([5, 6, 7, 8, 5, 6]) == {7: 0.8}
    # One token longer: 8 would continue a repeat of 3, so its penalty is 1.75 times larger; 7 is no longer next.
    assert penalties([5, 6, 7, 8, 5, 6, 7]) == {8: round(0.8 * 1.75, 6)}
    # A repeat of one token is allowed (as names and "of the" are): nothing penalised.
    assert penalties([5, 6, 9, 5]) == {}
    # A run of one token: a third 4 would repeat "4 4".
    assert penalties([4, 4]) == {} and penalties([4, 4, 4]) == {4: 0.8}
    # Two earlier spans, two continuations: each is penalised by the length of the repeat it would continue.
    assert penalties([1, 2, 3, 9, 2, 3, 8, 1, 2, 3]) == {9: round(0.8 * 1.75, 6), 8: 0.8}
    # Strength, base and allowed length are the formula's.
    assert penalties([5, 6, 7, 8, 5, 6, 7], strength=2.0, base=3.0, allowed_length=3) == {8: 2.0}
    assert penalties([5, 6, 7, 8, 5, 6], allowed_length=3) == {}


def dry_reference(reply: list[int], strength: float, base: float, allowed: int) -> dict[int, float]:
    """DRY as text-generation-webui writes it, in plain Python: for each earlier occurrence of the last token, the
    longest run of tokens before it equal to the run before the end; the token after it would extend that run."""
    found: dict[int, int] = {}
    for end in range(len(reply) - 1):
        length = 0
        while length <= end and reply[end - length] == reply[len(reply) - 1 - length]:
            length += 1
        if length:
            found[reply[end + 1]] = max(found.get(reply[end + 1], 0), length)
    return {token: round(strength * base ** (n - allowed), 4) for token, n in found.items() if n >= allowed}


def test_the_vectorised_guard_equals_plain_dry_on_random_replies():
    rng = random.Random(0)
    for _ in range(300):
        reply = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]  # 4 tokens: repeats everywhere
        strength, base, allowed = rng.choice([0.8, 0.3, 2.0]), rng.choice([1.75, 1.2]), rng.choice([1, 2, 3])
        got = penalties(reply, strength=strength, base=base, allowed_length=allowed)
        assert {t: round(p, 4) for t, p in got.items()} == dry_reference(reply, strength, base, allowed), reply


def test_the_prompt_and_left_padding_are_never_matched():
    # The reply "5 6" repeats the prompt's "5 6 7": quoting a prompt is not a loop.
    assert penalties([5, 6], prompt=[5, 6, 7]) == {}
    # In a left-padded batch each row gets exactly the penalties it gets alone (pad id 0 is also in the replies).
    rows = [([5, 6, 7], [5, 6, 0, 5, 6]), ([1], [7, 8, 4, 4, 4]), ([0, 9, 0, 2], [0, 2, 3, 0, 2])]
    width = max(len(prompt) for prompt, _ in rows)
    batch = torch.tensor([[0] * (width - len(prompt)) + prompt + reply for prompt, reply in rows])
    scores = RepetitionGuard(width)(batch, torch.zeros(len(rows), VOCABULARY))
    for (prompt, reply), row in zip(rows, scores):
        alone = penalties(reply, prompt=prompt)
        assert {t: round(-v, 6) for t, v in enumerate(row.tolist()) if v != 0} == alone
    assert penalties([0, 2, 3, 0, 2], prompt=[0, 9, 0, 2]) == {3: 0.8}


def test_scores_already_ruled_out_stay_ruled_out_and_long_loops_stay_finite():
    scores = torch.zeros(1, VOCABULARY)
    scores[0, 7] = -float("inf")
    out = RepetitionGuard(len(PROMPT))(torch.tensor([PROMPT + [5, 6, 7, 8, 5, 6]]), scores)
    assert out[0, 7] == -float("inf") and (out[0, :7] == 0).all()
    loop = torch.tensor([PROMPT + [3, 4] * 400])
    out = RepetitionGuard(len(PROMPT))(loop, torch.zeros(1, VOCABULARY))
    assert torch.isfinite(out).all() and out[0, 3] < -1e5  # counted up to 24 tokens past the allowed length


def test_generate_kwargs_layers_the_model_then_the_user_then_the_guard():
    ships_nothing, gemma_like = GenerationConfig(), GenerationConfig(do_sample=True, top_k=64, top_p=0.95)
    kwargs = generate_kwargs(DecodingSettings(), ships_nothing, prompt_length=5)
    assert {k: kwargs[k] for k in FALLBACK_SAMPLING} == FALLBACK_SAMPLING  # the model says nothing: the fallback
    (guard,) = kwargs["logits_processor"]
    assert isinstance(guard, RepetitionGuard) and guard.prompt_length == 5 and guard.strength == 0.8

    kwargs = generate_kwargs(DecodingSettings(), gemma_like, prompt_length=5)
    assert kwargs["do_sample"] and kwargs["top_k"] == 64 and kwargs["top_p"] == 0.95
    assert "temperature" not in kwargs  # the model's authors left it at transformers' default
    kwargs = generate_kwargs(DecodingSettings(temperature=0.3, top_p=0.5), gemma_like, prompt_length=5)
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (0.3, 0.5, 64)  # the user's over the model's

    shipped_penalty = GenerationConfig(do_sample=True, temperature=0.6, repetition_penalty=1.05)
    kwargs = generate_kwargs(DecodingSettings(64, temperature=0), shipped_penalty, prompt_length=5)
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 64
    assert kwargs["temperature"] is kwargs["top_p"] is kwargs["top_k"] is None  # greedy ignores them
    assert kwargs["repetition_penalty"] == 1.05  # the model's own, greedy or not
    assert not generate_kwargs(DecodingSettings(), GenerationConfig(do_sample=False), prompt_length=5)["do_sample"]

    off = generate_kwargs(DecodingSettings(repetition_guard=False), ships_nothing, prompt_length=5)
    assert "logits_processor" not in off
    strong = generate_kwargs(DecodingSettings(repetition_guard_strength=2.5), ships_nothing, prompt_length=5)
    assert strong["logits_processor"][0].strength == 2.5


def test_evaluation_decodes_greedily_with_the_guard_unless_told_otherwise():
    assert DecodingSettings.for_evaluation(EvaluationConfig()) == DecodingSettings(64, temperature=0)
    sampled = DecodingSettings.for_evaluation(
        EvaluationConfig(do_sample=True, repetition_guard=False, repetition_guard_strength=1.5, max_new_tokens=9)
    )
    assert sampled == DecodingSettings(9, 0.7, 0.9, repetition_guard=False, repetition_guard_strength=1.5)
    assert f"{GUARD_BASE} times" in EvaluationConfig.model_fields["repetition_guard_strength"].description


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"repetition_guard_strength": 0}, "repetition_guard_strength=0"),
        ({"temperature": -1}, "temperature=-1"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ],
)
def test_bad_settings_name_the_setting_and_the_fix(settings, named):
    with pytest.raises(FinetuneError, match=f"`{named}`: use"):
        DecodingSettings(**settings)


def test_a_tiny_model_that_loops_greedily_stops_looping_with_the_guard(tiny_llama_dir):
    """The tiny random Llama answers with one token over and over; the guard breaks every repeat at its third token
    (its logits are closer together than the guard's first penalty), so no 4-gram of the reply repeats."""
    tokenizer = load_tokenizer(ModelConfig(source=str(tiny_llama_dir)))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    configure_generation(model, tokenizer, [tokenizer.convert_tokens_to_ids("<|im_end|>")])
    prompts = [[{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "Name a fruit, please."}]]
    plain = generate(model, tokenizer, prompts, decoding=DecodingSettings(48, temperature=0, repetition_guard=False))
    guarded = generate(model, tokenizer, prompts, decoding=DecodingSettings(48, temperature=0))
    assert all(repeated_ngram_share(reply, 4) > 0.8 for reply in plain), plain
    assert all(repeated_ngram_share(reply, 4) == 0 for reply in guarded), guarded
    # Batched with left padding, each guarded reply is the one its prompt gets alone.
    assert guarded == [
        generate(model, tokenizer, [p], decoding=DecodingSettings(48, temperature=0))[0] for p in prompts
    ]


def test_the_guard_costs_little_per_step():
    """Batch 16, 64 new tokens, SmolLM2's vocabulary: well under a millisecond a step (benchmarks/results/
    repetition_guard.md), where the model's own step takes tens to hundreds; the bound here is loose for CI."""
    import time

    prompt, rows, vocabulary = 40, 16, 49152
    ids = torch.randint(0, vocabulary, (rows, prompt + 64), generator=torch.Generator().manual_seed(0))
    scores = torch.randn(rows, vocabulary)
    guard = RepetitionGuard(prompt)
    start = time.perf_counter()
    for step in range(1, 65):
        guard(ids[:, : prompt + step], scores)
    assert (time.perf_counter() - start) / 64 < 0.02


# Chatterbot-corpus prompts: the first four loop in SmolLM2-135M-Instruct's greedy replies without the guard
# (benchmarks/results/repetition_guard.md), the last two get ordinary replies.
CHATTERBOT_PROMPTS = [
    "is hal dead",
    "My webcam isn't detected.",
    "What are your interests",
    "can you write a fizzbuzz in JavaScript?",
    "What is the first element on the Periodic Table?",
    "Hi, nice to meet you.",
]
# A reply loops when this share of its word 4-grams repeats earlier ones (the benchmark's threshold too).
LOOPING = 0.2


@pytest.mark.real_model
def test_smollm2_greedy_replies_to_chatterbot_prompts_loop_without_the_guard_and_not_with_it():
    import yaml

    from finetune.config import DataSource
    from finetune.data import end_of_turn_ids
    from finetune.data.sources import chatterbot_files
    from finetune.metrics import repetition
    from finetune.models import load_model

    corpus = {
        conversation[0]
        for file in chatterbot_files(DataSource(type="chatterbot", language="english"))
        for conversation in yaml.safe_load(file.read_text())["conversations"]
    }
    assert set(CHATTERBOT_PROMPTS) <= corpus  # real prompts, as the quickstart's held-out rows are
    config = ModelConfig(source="smollm2-135m-instruct", quantization="none")
    tokenizer = load_tokenizer(config)
    model = load_model(config)
    configure_generation(model, tokenizer, end_of_turn_ids(tokenizer))
    conversations = [[{"role": "user", "content": prompt}] for prompt in CHATTERBOT_PROMPTS]
    shares = {}
    for guard in (False, True):
        replies = generate(
            model, tokenizer, conversations, decoding=DecodingSettings(64, temperature=0, repetition_guard=guard)
        )
        texts = [tokenizer.decode(reply, skip_special_tokens=True) for reply in replies]
        shares[guard] = dict(zip(texts, repetition.per_reply(texts)["repeated_4gram_share"]))
    assert max(shares[False].values()) >= 0.5, shares[False]  # "No, no, no, no, ..."
    assert sum(share >= LOOPING for share in shares[False].values()) >= 2, shares[False]
    assert all(share < LOOPING for share in shares[True].values()), shares[True]
