"""Every public function, class and method of the modules the API reference renders (docs/api/*.md) documents itself.

Read statically with griffe (nothing is imported, so no torch): each one has a docstring; a function with parameters
has a Google-style `Args:` section naming exactly the parameters of its signature (a class: those of its `__init__`,
since the site merges `__init__` into the class); a function whose body raises FinetuneError has a `Raises:` section.
"""

from __future__ import annotations

import ast
import logging
import re
import textwrap
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parent.parent
API_DOCS = ROOT / "docs" / "api"
# Modules rendered but not (yet) held to the rule, and why. cli.py's commands are typer commands: typer shows a
# command's docstring as its --help text, and each parameter is documented by its option's own help=, so an Args
# section there would repeat every option in `finetune COMMAND --help` (unless it is cut off with click's \f marker).
NOT_CHECKED = {"finetune.cli": "typer commands: parameters documented by each option's help= (see above)"}


def rendered_modules() -> list[str]:
    """The modules docs/api/*.md render with `::: finetune.xxx`."""
    names = set()
    for page in API_DOCS.glob("*.md"):
        names.update(re.findall(r"^::: (finetune[\w.]*)\s*$", page.read_text(), flags=re.MULTILINE))
    return sorted(names - set(NOT_CHECKED))


def load_package() -> griffe.Module:
    """The finetune package, loaded from source without importing it."""
    logging.getLogger("griffe").setLevel(logging.ERROR)  # docstring-parsing notes; the checks below report instead
    return griffe.load("finetune", search_paths=[str(ROOT)], allow_inspection=False, resolve_aliases=False)


def public_objects(package: griffe.Module, module_name: str) -> list[tuple[str, griffe.Object]]:
    """(shown name, object) of every public function, class and method the page for `module_name` renders."""
    module = package[module_name.removeprefix("finetune.")] if module_name != "finetune" else package
    exported = set(module.exports or ()) if module.exports is not None else None
    found: list[tuple[str, griffe.Object]] = []

    def visit(obj: griffe.Object, shown: str) -> None:
        found.append((shown, obj))
        if obj.is_class:
            for name, member in obj.members.items():
                if name.startswith("_") or member.is_alias:
                    continue
                if member.is_function or member.is_class:
                    visit(member, f"{shown}.{name}")

    for name, member in module.members.items():
        if name.startswith("_"):
            continue
        if member.is_alias:
            # An imported name is rendered only where the module exports it in __all__; document it where it lives.
            if exported is None or name not in exported:
                continue
            try:
                target = member.final_target
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
            if not target.path.startswith("finetune.") or not (target.is_function or target.is_class):
                continue
            visit(target, target.path)
        elif member.is_function or member.is_class:
            visit(member, f"{module_name}.{name}")
    return found


def signature_parameters(obj: griffe.Object) -> list[str]:
    """Parameter names a docstring's Args section must list: the function's, or a class's `__init__`'s."""
    function = obj
    if obj.is_class:
        init = obj.members.get("__init__")
        if init is None or init.is_alias or not init.is_function:
            return []  # dataclasses and pydantic models document their fields (Attributes:, or per field)
        if "dataclass" in {d.callable_path.rsplit(".", 1)[-1] for d in obj.decorators}:
            return []
        function = init
    names = [p.name for p in function.parameters]
    if names and names[0] in ("self", "cls") and (obj.is_class or obj.parent.is_class):
        names = names[1:]
    return names


def raises_finetune_error(obj: griffe.Object) -> bool:
    """Whether the source of a function raises FinetuneError itself."""
    if not obj.is_function or obj.source is None:
        return False
    tree = ast.parse(textwrap.dedent(obj.source))
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "FinetuneError":
                return True
    return False


def problems(shown: str, obj: griffe.Object) -> list[str]:
    """What the docstring of one object lacks."""
    if obj.docstring is None or not obj.docstring.value.strip():
        return [f"{shown}: no docstring"]
    sections = obj.docstring.parse("google")
    kinds = {section.kind for section in sections}
    found = []
    wanted = signature_parameters(obj)
    documented = [
        param.name.lstrip("*")
        for section in sections
        if section.kind is griffe.DocstringSectionKind.parameters
        for param in section.value
    ]
    if wanted and griffe.DocstringSectionKind.parameters not in kinds:
        found.append(f"{shown}: no Args section (parameters: {', '.join(wanted)})")
    elif sorted(documented) != sorted(w.lstrip("*") for w in wanted):
        missing = [w for w in wanted if w not in documented]
        extra = [d for d in documented if d not in wanted]
        found.append(f"{shown}: Args does not match the signature (missing: {missing}, not parameters: {extra})")
    if raises_finetune_error(obj) and griffe.DocstringSectionKind.raises not in kinds:
        found.append(f"{shown}: raises FinetuneError but has no Raises section")
    return found


def test_the_api_reference_renders_modules():
    assert len(rendered_modules()) > 40


def test_every_public_function_and_class_documents_its_arguments_returns_and_errors():
    package = load_package()
    report = []
    seen = set()
    for module_name in rendered_modules():
        for shown, obj in public_objects(package, module_name):
            if obj.path in seen:
                continue
            seen.add(obj.path)
            report.extend(problems(shown, obj))
    assert not report, f"{len(report)} docstring problems:\n" + "\n".join(report)
