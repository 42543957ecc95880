"""Deletion priors: each training row's probability of being erased, given as ``fit(..., risk=...)``,
``add(..., risk=...)`` or the ``data.risk_column`` of a file source, and used by a deletion-aware
``sharding.placement`` (`shards.partition.Placement`).

A prior is a probability in [0, 1] or a class name of ``sharding.risk_classes`` (checked by
`shards.validation.check_risk`: finite, in range, known names; nothing is written before). Under a
deletion-aware placement the priors are stored with the rows (the ``risk`` field of the slice files, their
per-slice sums in the manifest), so deletions, additions, the audit and `sisa status` see them; under the
uniform placement there is nothing to store, and a prior is refused rather than silently ignored.
"""

from __future__ import annotations

import numpy as np

from shards.errors import DataError
from shards.validation import check_risk


def resolve(config, risk, n_rows: int, what: str = "risk") -> np.ndarray | None:
    """The validated priors (float64) of ``n_rows`` rows, or None under the uniform placement."""
    sh = config.sharding
    if sh.placement == "uniform":
        if risk is not None:
            raise DataError(
                f"{what} was given but sharding.placement is uniform, which places every row alike; set "
                "sharding.placement to late_slices or isolated_shards to place rows by their deletion prior"
            )
        return None
    if risk is None:
        raise DataError(
            f"sharding.placement {sh.placement} places rows by their deletion prior: pass {what}=[...] "
            "(one probability in [0, 1] or class name per row) or set data.risk_column"
        )
    return check_risk(risk, n_rows, sh.risk_classes, what)


def summary(m, config) -> dict | None:
    """The placement and its priors as `sisa status` shows them (None under the uniform placement)."""
    weights = m.slice_risk()
    if weights is None:
        return None
    from sisa import costmodel

    rows, eps = m.slice_rows(), m.schedules(config.epochs_per_stage())
    return {
        "placement": config.sharding.placement,
        "risk_threshold": config.sharding.risk_threshold,
        "prior_mass": float(sum(map(sum, weights))),
        "expected_sample_epochs": costmodel.expected_prior(rows, eps, weights),
        "expected_uniform_requests_sample_epochs": costmodel.expected_single(rows, eps),
    }
