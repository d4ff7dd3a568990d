"""The one guard around user model code: factory calls, module imports, ``forward``, weights loading.

``except Exception`` misses what user code can throw past it: ``sys.exit(0)`` in a factory raises
``SystemExit`` (a ``BaseException``), which would end normfold with exit 0 and no verdict. Under
:func:`user_code` every such escape becomes one :class:`~normfold.errors.NormfoldError` with a one-line
reason. Only the user's own interrupt passes through unchanged: ``KeyboardInterrupt`` (Ctrl-C) and its
subclass :class:`~normfold.errors.Terminated` (SIGTERM), so that 130/143 stay what they mean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from normfold.errors import ModelCodeError, NormfoldError

__all__ = ["describe_escape", "user_code"]


def describe_escape(e: BaseException) -> str:
    """``called sys.exit(0)`` / ``raised ValueError: first line`` for an escape from user code."""
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r}) (model code must return or raise, not end the process)"
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"raised {type(e).__name__}: {first}" if first else f"raised {type(e).__name__}"


@contextlib.contextmanager
def user_code(what: str, error: type[NormfoldError] = ModelCodeError, *, catch_all: bool = True) -> Iterator[None]:
    """Run the body as user code named ``what`` (``"factory 'm.py:make'"``).

    ``catch_all=False`` only converts non-``Exception`` escapes (``SystemExit``, ``GeneratorExit``…) and
    lets ordinary exceptions through, for callers that already explain those in their own words.
    ``NormfoldError`` (ours, raised from inside) and interrupts always pass through unchanged.
    """
    try:
        yield
    except (KeyboardInterrupt, NormfoldError):
        raise
    except Exception as e:
        if not catch_all:
            raise
        raise error(f"{what} {describe_escape(e)}") from e
    except BaseException as e:
        raise error(f"{what} {describe_escape(e)}") from None
