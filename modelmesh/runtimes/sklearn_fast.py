"""scikit-learn predictions without scikit-learn's per-call Python: same answers, a
fraction of the time, for the estimators served most.

``estimator.predict`` on one row of a small model costs 0.2-0.5 ms, nearly all of it
input validation (array-namespace and dataframe detection, dtype and finiteness
checks) and, for forests, joblib's dispatch, not arithmetic. The mesh has already
validated the request into a dense numeric matrix, so for the families below it
does the rest of the checks itself (feature count, dtype, every value finite) and
then runs the same arithmetic scikit-learn's own methods run, in the same order:

- linear classifiers (``LogisticRegression``, ``SGDClassifier``, ``Perceptron``,
  ``LinearSVC``, ...): labels only (``predict_proba`` is scikit-learn's);
- decision trees, random forests and extra trees, classifier and regressor, one
  output: labels and probabilities, or values.

A family is used only when the estimator's methods are scikit-learn's own
(``type(e).predict is ForestClassifier.predict``, and so on): a subclass that
overrides one, or a scikit-learn release that changes them, gets the estimator's
own ``predict``. So does any input the checks do not pass (a NaN, the wrong
number of features, a non-numeric dtype), so that scikit-learn accepts or refuses
it exactly as before, with its own message. Pipelines and other meta-estimators
always go through scikit-learn, and so do linear regressors (whose ``predict`` differs
from class to class in scikit-learn 1.9).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: ``(matrix, want_proba) -> (predict, predict_proba when wanted else None)``, or None
#: where the estimator's own methods must answer this input (or these outputs).
Fast = Callable[[np.ndarray, bool], "tuple[np.ndarray, np.ndarray | None] | None"]


def fast_predictor(estimator: Any) -> Fast | None:
    """The fast path for ``estimator``, or None when it must always be scikit-learn's."""
    try:
        return _linear_classifier(estimator) or _forest(estimator) or _tree(estimator)
    except (ImportError, AttributeError):  # another scikit-learn layout: no fast path
        return None


def _numeric(x: np.ndarray, n_features: int) -> bool:
    return x.ndim == 2 and x.shape[1] == n_features and x.dtype.kind in "iuf"


def _linear_classifier(est: Any) -> Fast | None:
    from sklearn.linear_model._base import LinearClassifierMixin

    cls = type(est)
    if not (isinstance(est, LinearClassifierMixin)
            and cls.predict is LinearClassifierMixin.predict
            and cls.decision_function is LinearClassifierMixin.decision_function):
        return None
    coef = np.asarray(est.coef_)
    intercept = est.intercept_
    classes = est.classes_
    n = int(est.n_features_in_)
    if coef.ndim != 2 or coef.shape[1] != n:
        return None
    coef_t = coef.T

    def predict(x: np.ndarray, proba: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
        if proba or not _numeric(x, n) or not np.isfinite(x).all():
            return None
        scores = x @ coef_t + intercept  # decision_function
        if scores.shape[1] == 1:
            indices = (scores.reshape(-1) > 0).astype(np.intp)
        else:
            indices = np.argmax(scores, axis=1)
        return classes.take(indices, axis=0), None

    return predict


def _as_tree_input(x: np.ndarray, n: int) -> np.ndarray | None:
    """``x`` as trees take it (float32, C order), or None where scikit-learn must check it
    (after the cast, as scikit-learn checks: 1e300 is a finite float64 but no float32)."""
    if not _numeric(x, n):
        return None
    if x.dtype == np.float32:
        x32 = np.ascontiguousarray(x)
    else:
        with np.errstate(over="ignore"):  # a value too large is caught just below
            x32 = np.ascontiguousarray(x, dtype=np.float32)
    return x32 if np.isfinite(x32).all() else None


def _tree_classes() -> tuple[Any, Any, Any, Any]:
    """scikit-learn's (DecisionTreeClassifier, ExtraTreeClassifier, DecisionTreeRegressor,
    ExtraTreeRegressor)."""
    from sklearn import tree

    return (tree.DecisionTreeClassifier, tree.ExtraTreeClassifier, tree.DecisionTreeRegressor,
            tree.ExtraTreeRegressor)


def _forest(est: Any) -> Fast | None:
    from sklearn.ensemble._forest import ForestClassifier, ForestRegressor

    DecisionTreeClassifier, ExtraTreeClassifier, DecisionTreeRegressor, ExtraTreeRegressor = \
        _tree_classes()  # noqa: N806 - the classes' own names

    cls = type(est)
    trees = list(getattr(est, "estimators_", ()))
    if not trees or int(getattr(est, "n_outputs_", 0)) != 1:
        return None
    n = int(est.n_features_in_)
    if isinstance(est, ForestClassifier):
        if not (cls.predict is ForestClassifier.predict
                and cls.predict_proba is ForestClassifier.predict_proba
                and all(type(t) in (DecisionTreeClassifier, ExtraTreeClassifier)
                        and type(t).predict_proba is DecisionTreeClassifier.predict_proba
                        for t in trees)):
            return None
        classes = est.classes_
        n_classes = int(est.n_classes_)
        tree_objs = [t.tree_ for t in trees]
        widths = [int(t.n_classes_) for t in trees]

        def classify(x: np.ndarray, proba: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
            x32 = _as_tree_input(x, n)
            if x32 is None:
                return None
            total = np.zeros((x32.shape[0], n_classes), dtype=np.float64)
            for tree, width in zip(tree_objs, widths, strict=True):
                total += tree.predict(x32)[:, :width]  # tree.predict_proba, unchecked
            total /= len(tree_objs)
            return classes.take(np.argmax(total, axis=1), axis=0), total if proba else None

        return classify
    if isinstance(est, ForestRegressor):
        if not (cls.predict is ForestRegressor.predict
                and all(type(t) in (DecisionTreeRegressor, ExtraTreeRegressor)
                        and type(t).predict is DecisionTreeRegressor.predict for t in trees)):
            return None
        tree_objs = [t.tree_ for t in trees]

        def regress(x: np.ndarray, proba: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
            x32 = _as_tree_input(x, n)
            if x32 is None:
                return None
            total = np.zeros(x32.shape[0], dtype=np.float64)
            for tree in tree_objs:
                total += tree.predict(x32)[:, 0]  # tree.predict, one output, unchecked
            total /= len(tree_objs)
            return total, None

        return regress
    return None


def _tree(est: Any) -> Fast | None:
    from sklearn.tree._classes import BaseDecisionTree

    DecisionTreeClassifier, ExtraTreeClassifier, DecisionTreeRegressor, ExtraTreeRegressor = \
        _tree_classes()  # noqa: N806 - the classes' own names

    cls = type(est)
    if cls not in (DecisionTreeClassifier, ExtraTreeClassifier, DecisionTreeRegressor,
                   ExtraTreeRegressor) or int(getattr(est, "n_outputs_", 0)) != 1 \
            or cls.predict is not BaseDecisionTree.predict:
        return None
    n = int(est.n_features_in_)
    tree = est.tree_
    if cls in (DecisionTreeRegressor, ExtraTreeRegressor):
        def regress(x: np.ndarray, proba: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
            x32 = _as_tree_input(x, n)
            return None if x32 is None else (tree.predict(x32)[:, 0], None)

        return regress
    if cls.predict_proba is not DecisionTreeClassifier.predict_proba:
        return None
    classes = est.classes_
    width = int(est.n_classes_)

    def classify(x: np.ndarray, proba: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
        x32 = _as_tree_input(x, n)
        if x32 is None:
            return None
        p = tree.predict(x32)
        labels = classes.take(np.argmax(p, axis=1), axis=0)  # BaseDecisionTree.predict
        return labels, p[:, :width] if proba else None

    return classify
