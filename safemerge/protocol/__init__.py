"""The experiment protocol the scripts run: named pools and their clean twins, merge runs over
methods × options × pools × seeds, the all-clean reference, the mini benchmark, the paper grid,
and their markdown tables.

Each ``scripts/<name>.py`` is a thin entry point over ``main`` of one module here; the modules
import the package (merging, evaluation, reports), never the reverse.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

from safemerge.errors import SafemergeError

F = TypeVar("F", bound=Callable)


def exits_on_user_error(main: F) -> F:
    """A script's ``main``: a user mistake (:class:`SafemergeError`) ends it with one ``error:`` line."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SafemergeError as err:
            raise SystemExit(f"error: {err}") from None

    return wrapper  # type: ignore[return-value]
