"""The one exception type users see: what was wrong, where, and how to fix it."""


class FinetuneError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The CLI prints these without a traceback; anything else escaping is a bug in `finetune`.
    """


class Interrupted(FinetuneError):
    """The run was stopped by a signal after saving a checkpoint; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
