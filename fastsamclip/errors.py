"""The one base of every error a person can act on.

An ``InputError`` means the input is not what the command needs (a file that is not a
checkpoint, a data folder with nothing readable, a setting the teachers cannot follow): its
message is one line saying what is wrong and what to do, and the commands print it and exit 2.
Anything else is a bug and keeps its traceback.

:func:`check_range` is the one range check of every number a person types (flags, config fields,
request fields): NaN and infinity fail it, and its message names the option and the interval.
"""

import math
from typing import Optional, Type


class InputError(ValueError):
    """Input the user must fix; ``str(e)``'s first line says what is wrong and what to do."""


class ConfigError(InputError):
    """A setting (flag, config file field) that cannot work, found before any training step."""


class DataError(InputError):
    """A data path or file with nothing usable in it (none of its samples decodes)."""


class OutputError(InputError):
    """An output that cannot be written (a read-only or full disk, no permission) or that would
    replace an earlier one unasked; the message names the path, the reason and what to do."""


class NonFiniteOutputError(InputError):
    """The model answered NaN or Infinity (weights that overflow): an error, never an answer."""


def check_range(name: str, value, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
                hi_open: bool = False, integer: bool = False, error: Type[InputError] = InputError):
    """``value`` if it is a finite number (an integer when ``integer``) in the interval, else
    ``error`` naming ``name`` (e.g. "--stage1-lr") and the interval. Bools are not numbers here."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo)) and (
        hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        fmt = lambda b: str(b) if isinstance(b, int) else f"{b:g}"  # noqa: E731
        interval = (("(" if lo_open else "[") + ("-inf" if lo is None else fmt(lo)) + ", "
                    + ("inf" if hi is None else fmt(hi)) + (")" if hi_open or hi is None else "]"))
        kind = "an integer" if integer else "a number"
        raise error(f"{name} {value!r}: must be {kind} in {interval}")
    return value
