"""Bad configs, tried systematically: whatever a user writes, the outcome is a valid config or a FinetuneError that
names the key, never another exception. Invalid values are derived from each field's own type and bounds, so new
fields are covered without editing this file."""

import tempfile
import types
import typing
from pathlib import Path

import annotated_types
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from finetune.config import RecipeConfig
from finetune.errors import FinetuneError
from finetune.training import total_steps

settings.register_profile("finetune", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("finetune")


def _fields(model: type[BaseModel], path: tuple = ()) -> list[tuple[tuple, object]]:
    """(path, field) for every leaf key, nested sections included; list entries are reached through index 0."""
    out = []
    for key, field in model.model_fields.items():
        nested = [t for t in _types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        items = [typing.get_args(t)[0] for t in _types(field.annotation) if typing.get_origin(t) is list]
        items = [t for t in items if isinstance(t, type) and issubclass(t, BaseModel)]
        out.append((path + (key,), field))
        if nested:
            out += _fields(nested[0], path + (key,))
        if items:
            out += _fields(items[0], path + (key, 0))
    return out


def _types(annotation) -> set:
    """The alternatives of a union (Literal kept whole)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_types(a) for a in typing.get_args(annotation)))
    return {annotation}


# A value nothing in a recipe accepts: not a number, string, bool, choice, list of strings, mapping or section.
NOTHING_ACCEPTS = [[["deeply", ["nested"]]]]
# Text built partly from pieces that mean something to YAML, paths and format strings.
TEXT = st.lists(
    st.text(max_size=4) | st.sampled_from(["{", "}", "{name}", "{0}", ":", "- ", "..", "/", "~", "*", "\n"]), max_size=6
).map("".join)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = _fields(RecipeConfig)
# List entries (data sources) need a valid rest, since a source of type "file" needs a path.
ENTRY_BASE = {"type": "chatterbot"}


def invalid_options(field) -> list[st.SearchStrategy]:
    """Values `field` must refuse, from its annotation and bounds."""
    alternatives = _types(field.annotation)
    options = [st.just(NOTHING_ACCEPTS)]
    literals = [t for t in alternatives if typing.get_origin(t) is typing.Literal]
    plain = {t for t in alternatives if t in (int, float, bool, str)}
    if plain <= {int, float} and plain and not literals:
        options.append(st.sampled_from(["many", "1e", "one hundred"]))
    if plain == {bool}:
        options.append(st.sampled_from(["maybe", 2, 0.5, "enabled"]))
    if plain == {str} and not literals:
        options.append(st.integers() | st.floats(allow_nan=False))
    if literals and not plain:
        choices = {c for literal in literals for c in typing.get_args(literal)}
        options.append(st.text(max_size=12).filter(lambda s: s not in choices))
    if plain & {int, float}:
        number = st.floats(allow_nan=False, allow_infinity=False) if float in plain else st.integers()
        for bound in field.metadata:
            if isinstance(bound, annotated_types.Ge):
                options.append(number.filter(lambda v, b=bound.ge: v < b))
            elif isinstance(bound, annotated_types.Gt):
                options.append(number.filter(lambda v, b=bound.gt: v <= b))
            elif isinstance(bound, annotated_types.Le):
                options.append(number.filter(lambda v, b=bound.le: v > b))
            elif isinstance(bound, annotated_types.Lt):
                options.append(number.filter(lambda v, b=bound.lt: v >= b))
        if float in plain:
            options.append(st.sampled_from([float("inf"), float("-inf"), float("nan")]))  # YAML's .inf and .nan
    if field.annotation is str and field.metadata:  # `name`: a pattern
        options.append(
            st.text(min_size=1, max_size=12).filter(
                lambda s: not s.isascii() or not s[0].isalnum() or any(c not in "._-" and not c.isalnum() for c in s)
            )
        )
    return options


def _raw(path: tuple, value) -> dict:
    """The recipe dict with `value` at `path`."""
    head, *rest = path
    if not rest:
        return {head: value}
    if rest[0] == 0:
        return {head: [{**ENTRY_BASE, **_raw(tuple(rest[1:]), value)}] if rest[1:] else [value]}
    return {head: _raw(tuple(rest), value)}


def _dotted(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _usable(config: RecipeConfig) -> None:
    """What a validated config must survive: its run folder, a YAML round trip, the step count."""
    assert config.run_dir.parts  # output.dir formats with the name
    with tempfile.TemporaryDirectory() as folder:
        config.to_yaml(Path(folder) / "r.yaml")
        assert RecipeConfig.from_yaml(Path(folder) / "r.yaml") == config
    total_steps(config.training, train_rows=1000)


@given(data=st.data(), index=st.integers(0, len(FIELDS) - 1))
def test_an_invalid_value_anywhere_is_a_finetune_error_naming_its_key(data, index):
    path, field = FIELDS[index]
    value = data.draw(st.one_of(invalid_options(field)), label=_dotted(path))
    try:
        RecipeConfig.from_dict(_raw(path, value))
    except FinetuneError as exc:
        assert _dotted(path) in str(exc)
    else:
        raise AssertionError(f"{_dotted(path)} = {value!r} was accepted")


@given(data=st.data(), key=st.from_regex(r"\A[a-z_]{1,20}\Z"))
def test_an_unknown_key_in_any_section_is_named(data, key):
    sections = sorted({path[:-1] for path, _ in FIELDS if len(path) > 1})
    section = data.draw(st.sampled_from(sections), label="section")
    if any(path == section + (key,) for path, _ in FIELDS):
        return
    try:
        RecipeConfig.from_dict(_raw(section + (key,), 1))
    except FinetuneError as exc:
        assert f"unknown key `{_dotted(section + (key,))}`" in str(exc)
    else:
        raise AssertionError(f"{_dotted(section + (key,))} was accepted")


@given(data=st.data(), index=st.integers(0, len(FIELDS) - 1), value=JSON)
def test_any_value_anywhere_is_either_usable_or_a_finetune_error(data, index, value):
    path, _ = FIELDS[index]
    path = path[: data.draw(st.integers(1, len(path)), label="depth")]  # a key, or a whole section, replaced
    try:
        config = RecipeConfig.from_dict(_raw(path, value))
    except FinetuneError as exc:
        assert str(path[0]) in str(exc)
    else:
        _usable(config)


TEXT_FIELDS = [path for path, field in FIELDS if str in _types(field.annotation)]


@given(path=st.sampled_from(TEXT_FIELDS), text=TEXT)
def test_any_text_in_a_text_field_is_either_usable_or_a_finetune_error(path, text):
    try:
        config = RecipeConfig.from_dict(_raw(path, text))
    except FinetuneError as exc:
        assert _dotted(path) in str(exc)
    else:
        _usable(config)


@given(text=st.text(max_size=200) | TEXT, overrides=st.lists(TEXT, max_size=3))
def test_any_yaml_text_and_overrides_are_either_usable_or_a_finetune_error(text, overrides):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(text)
        try:
            config = RecipeConfig.from_yaml(path, overrides)
        except FinetuneError:
            return
    _usable(config)


def test_every_scalar_field_gets_a_type_specific_invalid_value():
    # Besides the universal one: otherwise the first property would say little about that field.
    for path, field in FIELDS:
        scalar = _types(field.annotation) & {int, float, bool, str} or any(
            typing.get_origin(t) is typing.Literal for t in _types(field.annotation)
        )
        assert not scalar or len(invalid_options(field)) >= 2, _dotted(path)
