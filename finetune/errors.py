"""The one exception type users see: what was wrong, where, and how to fix it.

Stages word their messages in config keys (`output.overwrite: true`) and Python arguments. A Python argument goes
into a message through `argument(...)`, so the same error reads `resume=True` to a Python caller and `--resume` on
the command line: only cli.py knows the flags (`FinetuneError.render(flags)`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_ARGUMENT = re.compile(r"\x00(\w+)\x01(.*?)\x01(.*?)\x00", re.DOTALL)


def argument(name: str, value: object = True) -> str:
    """A Python argument as an error message names it: `name=value` in Python, the CLI's flag on the command line.

    Args:
        name: The Python argument's name (e.g. "resume"); cli.py maps it to its flag.
        value: The argument's value as the caller passed it; True (the default) for a switch, which the command line
            shows as the bare flag.

    Returns:
        The argument encoded for a FinetuneError message: `str(error)` shows it as `name=value`, and
        `FinetuneError.render(flags)` as the flag.
    """
    shown = value if isinstance(value, (bool, int, float)) else str(value)  # a path reads 'runs/x', not PosixPath(...)
    return f"\x00{name}\x01{name}={shown!r}\x01{'' if value is True else shown}\x00"


class FinetuneError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The CLI prints these without a traceback; anything else escaping is a bug in `finetune`.
    """

    def __str__(self) -> str:
        return _ARGUMENT.sub(lambda m: f"`{m[2]}`", super().__str__())

    def render(self, flags: Mapping[str, str]) -> str:
        """The message with each argument shown as its command-line flag (`flags`: argument name -> flag).

        Args:
            flags: Python argument name -> command-line flag (e.g. "resume" -> "--resume"); an argument not in it is
                shown
                as `name=value`.

        Returns:
            The message text for the command line.
        """

        def flag(match: re.Match[str]) -> str:
            name, python, value = match.groups()
            if name not in flags:
                return f"`{python}`"
            return f"{flags[name]} {value}" if value else flags[name]

        return _ARGUMENT.sub(flag, super().__str__())


class Interrupted(FinetuneError):
    """The run was stopped by a signal after saving a checkpoint; `exit_code` is the shell's 128 + signal number.

    Args:
        message: What was stopped and where the checkpoint is.
        exit_code: The exit status the command line ends with: 128 + the signal's number.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
