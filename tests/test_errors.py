import pytest

from finetune.cli import FLAGS
from finetune.errors import FinetuneError, argument


def test_an_argument_reads_as_python_to_python_callers_and_as_a_flag_on_the_command_line():
    error = FinetuneError(f"{argument('adapter', '/tmp/x')}: no adapter there; or pass {argument('resume')}.")
    assert str(error) == "`adapter='/tmp/x'`: no adapter there; or pass `resume=True`."
    assert error.render(FLAGS) == "--adapter /tmp/x: no adapter there; or pass --resume."
    assert error.render({}) == str(error)  # an argument without a flag keeps its Python spelling


def test_pytest_and_tracebacks_see_the_python_wording():
    with pytest.raises(FinetuneError, match=r"`trials=0`: a sweep"):
        raise FinetuneError(f"{argument('trials', 0)}: a sweep needs at least one trial.")


def test_only_the_cli_names_command_line_flags():
    """Errors raised by stage modules are worded in config keys and arguments; flags like --overwrite live in cli.py."""
    import ast
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "finetune"
    flag = re.compile(r"(?<![\w-])(" + "|".join(FLAGS.values()) + r")\b")
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise):
                words = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                offenders += [f"{path.relative_to(package)}:{node.lineno}" for text in words if flag.search(text)]
    assert not offenders, offenders
