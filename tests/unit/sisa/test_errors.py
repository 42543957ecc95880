"""The exception tree: `NotFittedError` is also scikit-learn's, and every error pickles with its detail."""

import pickle

import numpy as np
import pytest
import sklearn.exceptions
from helpers import tiny_config
from sklearn.utils.validation import check_is_fitted

import shards.errors
import sisa
from sisa import SisaEnsemble
from sisa.errors import NotFittedError, SisaError, WorkdirError


def test_not_fitted_error_is_sklearns_and_sisas():
    assert NotFittedError is shards.errors.NotFittedError is sisa.NotFittedError
    assert issubclass(NotFittedError, sklearn.exceptions.NotFittedError)
    assert issubclass(NotFittedError, SisaError) and issubclass(NotFittedError, (ValueError, AttributeError))
    with pytest.raises(sklearn.exceptions.NotFittedError, match="call fit first"):
        raise NotFittedError("call fit first", workdir="w")


def test_not_fitted_error_pickles_with_its_detail():
    e = pickle.loads(pickle.dumps(NotFittedError("not fitted yet", workdir="runs/x", shard=3)))
    assert type(e) is NotFittedError and str(e) == "not fitted yet"
    assert e.detail == {"workdir": "runs/x", "shard": 3} and e.workdir == "runs/x" and e.shard == 3
    assert isinstance(e, sklearn.exceptions.NotFittedError)


def test_every_error_pickles_with_its_detail():
    for cls in (SisaError, WorkdirError, shards.errors.UnknownIdsError, shards.errors.RetrainingError):
        e = pickle.loads(pickle.dumps(cls("boom", ids=[1, 2], path="p").add_detail(shard=0)))
        assert type(e) is cls and e.detail == {"ids": [1, 2], "path": "p", "shard": 0} and str(e) == "boom"


def test_unknown_error_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchError'"):
        shards.errors.NoSuchError  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchError'"):
        sisa.errors.NoSuchError  # noqa: B018


def test_using_an_unfitted_ensemble_raises_sklearns_not_fitted_error(tmp_path):
    ens = SisaEnsemble.from_config(tiny_config(), tmp_path / "w")
    with pytest.raises(sklearn.exceptions.NotFittedError, match=r"call \.fit\(X, y"):
        ens.predict(np.zeros((1, 6), dtype=np.float32))


def test_check_is_fitted_sees_an_unfitted_ensemble(tmp_path):
    """sklearn's own check (via ``__sklearn_is_fitted__``; sklearn >= 1.6 also reads ``__sklearn_tags__``)."""
    ens = SisaEnsemble.from_config(tiny_config(), tmp_path / "w")
    with pytest.raises(sklearn.exceptions.NotFittedError, match="This SisaEnsemble instance is not fitted yet"):
        check_is_fitted(ens)
