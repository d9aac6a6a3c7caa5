"""The scikit-learn fast path (``modelmesh.runtimes.sklearn_fast``) gives exactly the
answers of the estimator's own ``predict`` / ``predict_proba``, and steps aside for
every estimator and input it does not cover."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import is_classifier
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import (
    Lasso,
    LinearRegression,
    LogisticRegression,
    Perceptron,
    Ridge,
    RidgeClassifier,
    SGDClassifier,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, ExtraTreeClassifier

from modelmesh.runtimes.sklearn import SklearnModel
from modelmesh.runtimes.sklearn_fast import fast_predictor

RNG = np.random.default_rng(7)
X = RNG.normal(size=(300, 5))
LABELS = {
    "binary int": (X[:, 0] > 0).astype(int),
    "three str": np.array(["cat", "dog", "emu"])[np.digitize(X[:, 1], [-0.4, 0.4])],
    "four int": np.digitize(X[:, 0] + X[:, 2], [-1, 0, 1]) * 10 - 5,
}
Y_REG = X @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + RNG.normal(scale=0.1, size=300)

CLASSIFIERS = [
    lambda: LogisticRegression(max_iter=500),
    lambda: SGDClassifier(random_state=0),
    lambda: Perceptron(random_state=0),
    lambda: LinearSVC(),
    lambda: RandomForestClassifier(n_estimators=5, max_depth=6, random_state=0),
    lambda: ExtraTreesClassifier(n_estimators=4, random_state=0),
    lambda: DecisionTreeClassifier(max_depth=5, random_state=0),
    lambda: ExtraTreeClassifier(random_state=0),
]
REGRESSORS = [
    lambda: RandomForestRegressor(n_estimators=4, max_depth=6, random_state=0),
    lambda: ExtraTreesRegressor(n_estimators=3, random_state=0),
    lambda: DecisionTreeRegressor(max_depth=6, random_state=0),
]
#: Rows as requests bring them: float32 (FP32), float64 (FP64), ints, one row, many.
INPUTS = [
    RNG.normal(size=(1, 5)).astype(np.float32),
    RNG.normal(size=(40, 5)).astype(np.float32),
    RNG.normal(scale=3, size=(25, 5)),
    RNG.integers(-3, 4, size=(10, 5)).astype(np.int32),
]


def _same(fast: np.ndarray, own: np.ndarray) -> None:
    assert fast.dtype == own.dtype
    assert fast.shape == own.shape
    np.testing.assert_array_equal(fast, own)


def _labels_agree(est):
    """The fast path of ``est``, after checking its predict() answers on every input."""
    fast = fast_predictor(est)
    assert fast is not None, type(est).__name__
    for x in INPUTS:
        got = fast(x, False)
        assert got is not None
        _same(got[0], est.predict(x))
        assert got[1] is None
    return fast


@pytest.mark.parametrize("make", CLASSIFIERS)
@pytest.mark.parametrize("labels", list(LABELS))
def test_classifiers_answer_as_scikit_learn_does(make, labels):
    est = make().fit(X, LABELS[labels])
    fast = _labels_agree(est)
    for x in INPUTS:
        with_proba = fast(x, True)
        if hasattr(est, "predict_proba") and with_proba is not None:  # trees and forests
            assert with_proba[1] is not None
            _same(with_proba[0], est.predict(x))
            _same(with_proba[1], est.predict_proba(x))


@pytest.mark.parametrize("make", REGRESSORS)
def test_regressors_answer_as_scikit_learn_does(make):
    _labels_agree(make().fit(X, Y_REG))


def test_linear_classifiers_leave_probabilities_to_scikit_learn():
    est = LogisticRegression().fit(X, LABELS["three str"])
    fast = fast_predictor(est)
    assert fast is not None
    assert fast(INPUTS[0], True) is None


class _Shifted(LogisticRegression):
    def predict(self, X):  # noqa: N803 - scikit-learn's name
        return super().predict(X + 1)


@pytest.mark.parametrize("est", [
    make_pipeline(StandardScaler(), LogisticRegression()).fit(X, LABELS["binary int"]),
    GradientBoostingClassifier(n_estimators=3).fit(X, LABELS["binary int"]),
    RidgeClassifier().fit(X, LABELS["binary int"]),  # its predict is its own (multilabel)
    LinearRegression().fit(X, Y_REG),
    Ridge().fit(X, Y_REG),
    Lasso(alpha=0.01).fit(X, Y_REG),
    _Shifted().fit(X, LABELS["binary int"]),
    RandomForestClassifier(n_estimators=2).fit(X, np.c_[LABELS["binary int"],
                                                         LABELS["four int"]]),  # 2 outputs
], ids=["pipeline", "gradient-boosting", "ridge-classifier", "linear-regression", "ridge",
        "lasso", "subclass", "two-outputs"])
def test_estimators_it_does_not_cover_have_no_fast_path(est):
    assert fast_predictor(est) is None


@pytest.mark.parametrize("make", [CLASSIFIERS[0], CLASSIFIERS[4], CLASSIFIERS[6], REGRESSORS[0],
                                  REGRESSORS[2]])
def test_inputs_scikit_learn_must_judge_go_to_it(make):
    """NaN, infinity, a float64 too large for float32 (trees), the wrong feature count
    and non-numeric data: no fast answer, so the estimator accepts or refuses them."""
    est = make()
    est.fit(X, LABELS["three str"] if is_classifier(est) else Y_REG)
    fast = fast_predictor(est)
    assert fast is not None
    row = np.zeros((1, 5))
    for bad in (np.nan, np.inf, -np.inf):
        x = row.copy()
        x[0, 2] = bad
        assert fast(x, False) is None
    assert fast(np.zeros((1, 4)), False) is None
    assert fast(np.zeros((1, 6)), False) is None
    assert fast(np.zeros(5), False) is None
    assert fast(np.array([[True, False, True, False, True]]), False) is None
    if "Tree" in type(est).__name__ or "Forest" in type(est).__name__:
        huge = row.copy()
        huge[0, 0] = 1e300  # finite as float64; infinity as the float32 trees compare
        assert fast(huge, False) is None


def test_a_nan_is_still_refused_with_scikit_learns_message():
    """Through the runtime: the fast path steps aside and scikit-learn's own check answers."""
    from modelmesh.errors import InvalidArgument
    from modelmesh.tensor import Tensor

    model = SklearnModel("m", LogisticRegression().fit(X, LABELS["binary int"]), 1000)
    x = np.zeros((1, 5), np.float32)
    x[0, 1] = np.nan
    with pytest.raises(InvalidArgument, match="NaN"):
        model.predict_outputs([Tensor("x", "FP32", x)], {}, ["predict"])
    ok = model.predict_outputs([Tensor("x", "FP32", np.zeros((1, 5), np.float32))], {},
                               ["predict"])
    assert ok[0].data.tolist() == model.estimator.predict(np.zeros((1, 5))).tolist()
