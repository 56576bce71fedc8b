"""The one exception type users see: what was wrong, where, and how to fix it."""


class FinetuneError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The CLI prints these without a traceback; anything else escaping is a bug in `finetune`.
    """
