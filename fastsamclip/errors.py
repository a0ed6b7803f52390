"""The one base of every error a person can act on.

An ``InputError`` means the input is not what the command needs (a file that is not a
checkpoint, a data folder with nothing readable, a setting the teachers cannot follow): its
message is one line saying what is wrong and what to do, and the commands print it and exit 2.
Anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Input the user must fix; ``str(e)``'s first line says what is wrong and what to do."""


class ConfigError(InputError):
    """A setting (flag, config file field) that cannot work, found before any training step."""


class DataError(InputError):
    """A data path or file with nothing usable in it (none of its samples decodes)."""
