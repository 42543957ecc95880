"""What the `sisa` command hides unless asked (`sisa -v`): libraries' start-up chatter that says nothing about
the user's ensemble.

  - Ray's "Token authentication is enabled for this Ray cluster ..." (Ray's auth settings are unchanged:
    only that logger of this process is set to ERROR; RAY_AUTH_MODE is never touched);
  - MLflow's "Creating initial MLflow database tables" / "Updating database tables" (and alembic's);
  - Starlette's deprecation warning that MLflow's server modules raise on import.

Everything is scoped to the `sisa` process: logger levels of those named loggers and a warnings filter.
Errors and warnings about the user's data or ensemble are never hidden.
"""

from __future__ import annotations

import logging
import warnings

NOISY_LOGGERS = (
    "ray._private.authentication.authentication_token_setup",
    "mlflow.store.db.utils",
    "alembic.runtime.migration",
)


def hush(verbose: int) -> None:
    """Hide the chatter (``verbose == 0``); with ``verbose >= 1`` leave every library as it is."""
    if verbose:
        return
    for name in NOISY_LOGGERS:  # set before the libraries load; Ray resets only "ray" and "ray.rllib"
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"starlette\b.*\bdeprecated")
