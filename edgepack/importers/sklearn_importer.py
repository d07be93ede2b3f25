"""Fitted scikit-learn estimators and Pipelines, converted to ONNX with skl2onnx.

The estimator is read from a joblib or pickle file. **Unpickling runs code stored in
the file**, so the path must point at a file you produced or otherwise trust.

Classifiers are converted without skl2onnx's ZipMap, so outputs are plain tensors, and
the float ``probabilities`` [N, classes] output comes FIRST, before the int64 ``label``
[N]: the build gates (accuracy, top-1 agreement) and post-processing (``output.labels``)
work on the first output, and a classifier is judged on its class scores. The label
output stays an output and is gated as well (its agreement with fp32). The converted
graph is run on random inputs and compared with ``predict_proba`` / ``predict`` /
``transform``.

scikit-learn and skl2onnx are imported inside the importer (the ``sklearn`` extra).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from ..errors import ConfigError, ModelError
from ..modelio import parse_model
from ._common import (
    first_line, max_abs_diff, merge_opset_imports, onnx_session, read_source_file, require_extra, run_session,
    source_file, tolerance,
)
from .base import ImportedModel, SklearnSource

# Largest accepted |onnx - sklearn| for outputs within [-1, 1]; scaled up for larger outputs.
ATOL = 1e-4
# Random rows the converted model is checked on.
CHECK_ROWS = 64
# Rows whose two top probabilities are closer than this may pick either label.
TIE_MARGIN = 1e-4


def _require() -> tuple[Any, Any]:
    sklearn = require_extra("sklearn", "scikit-learn", "sklearn")
    skl2onnx = require_extra("skl2onnx", "skl2onnx", "sklearn")
    return sklearn, skl2onnx


def _load(source: SklearnSource) -> tuple[Any, bytes]:
    import joblib  # a dependency of scikit-learn; reads plain pickles as well

    data = read_source_file(source.path, "Model file")
    try:
        return joblib.load(io.BytesIO(data)), data
    except Exception as exc:  # noqa: BLE001 - unpickling a foreign file can raise anything
        raise ModelError(
            f"{source.path} could not be unpickled ({type(exc).__name__}: {first_line(exc, 160)}); save the fitted "
            "estimator with joblib.dump(model, path) using the scikit-learn version installed here."
        ) from exc


def _final_estimator(estimator: Any) -> Any:
    from sklearn.pipeline import Pipeline

    while isinstance(estimator, Pipeline):
        estimator = estimator.steps[-1][1]
    return estimator


def _describe(estimator: Any) -> str:
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        return f"Pipeline({', '.join(_describe(step) for _, step in estimator.steps)})"
    return type(estimator).__name__


def _check_estimator(estimator: Any, source: SklearnSource) -> int:
    """Refuse objects that are not fitted estimators; return the number of input columns."""
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if not (hasattr(estimator, "predict") or hasattr(estimator, "transform")) or not hasattr(estimator, "fit"):
        raise ModelError(
            f"{source.path} holds a {type(estimator).__name__}, not a scikit-learn estimator or Pipeline; "
            "save the fitted model object itself with joblib.dump(model, path)."
        )
    try:
        check_is_fitted(estimator)
    except NotFittedError as exc:
        raise ModelError(f"The {_describe(estimator)} in {source.path} is not fitted; fit it before saving it.") from exc
    fitted = getattr(estimator, "n_features_in_", None)
    if source.n_features is not None and fitted is not None and source.n_features != fitted:
        raise ConfigError(f"model.n_features is {source.n_features} but the estimator in {source.path} was fitted on {fitted} features; fix model.n_features or remove it.")
    n_features = source.n_features or fitted
    if n_features is None:
        raise ConfigError(f"The estimator in {source.path} does not record its number of input features; set model.n_features.")
    return int(n_features)


def _convert(skl2onnx: Any, estimator: Any, n_features: int, source: SklearnSource) -> Any:
    from skl2onnx.common.data_types import FloatTensorType
    from skl2onnx.common.exceptions import MissingConverter, MissingShapeCalculator
    from sklearn.base import is_classifier

    final = _final_estimator(estimator)
    # ZipMap exists only for classifiers with probabilities (LinearSVC's converter refuses the option).
    options = {id(final): {"zipmap": False}} if is_classifier(final) and hasattr(final, "predict_proba") else None
    try:
        return skl2onnx.convert_sklearn(
            estimator, initial_types=[(source.input_name, FloatTensorType([None, n_features]))],
            options=options, target_opset=source.opset,
        )
    except (MissingConverter, MissingShapeCalculator) as exc:
        raise ModelError(
            f"skl2onnx cannot convert the {_describe(estimator)} in {source.path}: it has no converter for one of its "
            f"steps ({first_line(exc, 200)}); replace that step with a supported estimator."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - converters raise many types
        raise ModelError(
            f"skl2onnx could not convert the {_describe(estimator)} in {source.path} to ONNX opset {source.opset} "
            f"({type(exc).__name__}: {first_line(exc)}); try another model.opset or a simpler pipeline."
        ) from exc


#: skl2onnx's names of a classifier's outputs once ZipMap is off.
PROBABILITIES, LABEL = "probabilities", "label"


def _probabilities_first(model: Any) -> None:
    """Put the float probability output before the label output, in place (ONNX output order is free)."""
    outputs = list(model.graph.output)
    names = [o.name for o in outputs]
    if PROBABILITIES not in names or names[0] == PROBABILITIES:
        return
    ordered = [o for o in outputs if o.name == PROBABILITIES] + [o for o in outputs if o.name != PROBABILITIES]
    del model.graph.output[:]
    model.graph.output.extend(ordered)
    model.graph.output[0].doc_string = "class probabilities (predict_proba): already normalised, no softmax needed"


def _linear_to_standard_ops(model: Any) -> bool:
    """Rewrite an ``ai.onnx.ml`` LinearClassifier (and the L1 Normalizer after it) as MatMul + Add +
    Softmax/Sigmoid + ArgMax, in place. Returns True when it rewrote one.

    skl2onnx emits linear models as one opaque ``LinearClassifier`` node, which quantizers cannot
    see into: such a model has no int8 or fp16 variant. The same computation in standard
    operators has its weight matrix as an initializer, so it quantizes like any dense layer and
    runs on every engine. :func:`_verify` then proves the rewrite against ``predict_proba``.
    Forms it does not know (a one-row binary model, string labels, PROBIT) stay as they are.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    index = next((i for i, n in enumerate(nodes) if n.op_type == "LinearClassifier" and n.domain == "ai.onnx.ml"), None)
    if index is None:
        return False
    node = nodes[index]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    transform = attrs.get("post_transform", b"NONE")
    transform = transform.decode() if isinstance(transform, bytes) else str(transform)
    labels = list(attrs.get("classlabels_ints") or [])
    coefficients = np.asarray(attrs.get("coefficients") or [], dtype=np.float32)
    if not labels or transform not in ("NONE", "SOFTMAX", "LOGISTIC") or len(node.output) != 2 \
            or coefficients.size != len(labels) * (coefficients.size // max(len(labels), 1)) or coefficients.size == 0:
        return False
    classes = len(labels)
    weights = coefficients.reshape(classes, -1).T.copy()  # [features, classes]
    intercepts = np.asarray(attrs.get("intercepts") or [0.0] * classes, dtype=np.float32)
    if intercepts.shape != (classes,):
        return False
    label_out, scores_out = node.output
    consumers = [n for n in nodes if scores_out in n.input]
    normalizer = consumers[0] if len(consumers) == 1 and consumers[0].op_type == "Normalizer" else None
    if normalizer is not None and helper.get_attribute_value(
            next(a for a in normalizer.attribute if a.name == "norm")) not in (b"L1", "L1"):
        return False
    final_scores = normalizer.output[0] if normalizer is not None else scores_out
    p = f"{node.name or 'linear'}_std"
    graph.initializer.extend([numpy_helper.from_array(weights, f"{p}_coef"), numpy_helper.from_array(intercepts, f"{p}_intercept"),
                              numpy_helper.from_array(np.asarray(labels, dtype=np.int64), f"{p}_classes"),
                              numpy_helper.from_array(np.asarray([1], dtype=np.int64), f"{p}_axis")])
    new = [helper.make_node("MatMul", [node.input[0], f"{p}_coef"], [f"{p}_mm"], name=f"{p}_matmul"),
           helper.make_node("Add", [f"{p}_mm", f"{p}_intercept"], [f"{p}_raw"], name=f"{p}_add")]
    raw = f"{p}_raw"
    if transform == "SOFTMAX":
        new.append(helper.make_node("Softmax", [raw], [f"{p}_t"], name=f"{p}_softmax", axis=1))
    elif transform == "LOGISTIC":
        new.append(helper.make_node("Sigmoid", [raw], [f"{p}_t"], name=f"{p}_sigmoid"))
    else:
        new.append(helper.make_node("Identity", [raw], [f"{p}_t"], name=f"{p}_identity"))
    if normalizer is not None:
        new += [helper.make_node("Abs", [f"{p}_t"], [f"{p}_abs"], name=f"{p}_abs"),
                helper.make_node("ReduceSum", [f"{p}_abs", f"{p}_axis"], [f"{p}_sum"], name=f"{p}_sum", keepdims=1),
                helper.make_node("Div", [f"{p}_t", f"{p}_sum"], [final_scores], name=f"{p}_l1")]
    else:
        new.append(helper.make_node("Identity", [f"{p}_t"], [final_scores], name=f"{p}_out"))
    # The label is the class of the highest raw score, first one on ties, as LinearClassifier picks it.
    new += [helper.make_node("ArgMax", [raw], [f"{p}_argmax"], name=f"{p}_argmax", axis=1, keepdims=0),
            helper.make_node("Gather", [f"{p}_classes", f"{p}_argmax"], [label_out], name=f"{p}_label", axis=0)]
    kept = [n for n in nodes if n is not node and n is not normalizer]
    position = min(index, len(kept))
    del graph.node[:]
    graph.node.extend(kept[:position] + new + kept[position:])
    for output in graph.output:
        if output.name == label_out:
            output.type.tensor_type.elem_type = TensorProto.INT64
    return True


def _same_labels(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    expected, actual = np.asarray(expected).reshape(-1), np.asarray(actual).reshape(-1)
    if expected.dtype.kind in "biuf" and actual.dtype.kind in "biuf":
        return expected.astype(np.float64) == actual.astype(np.float64)
    return expected.astype(str) == actual.astype(str)


def _reference(estimator: Any, method: str, x: np.ndarray) -> np.ndarray:
    try:
        return np.asarray(getattr(estimator, method)(x))
    except Exception as exc:  # noqa: BLE001 - user estimators can raise anything
        raise ModelError(f"The estimator's own {method}() fails on random input ({type(exc).__name__}: {first_line(exc)}); it cannot be checked.") from exc


def _verify(session: Any, estimator: Any, n_features: int, source: SklearnSource) -> None:
    """Refuse the conversion unless ONNX matches scikit-learn on random inputs."""
    from sklearn.base import is_classifier

    x = np.random.default_rng(0).standard_normal((CHECK_ROWS, n_features)).astype(np.float32)
    got = run_session(session, {source.input_name: x}, f"The ONNX conversion of {source.path} cannot run")
    by_name = dict(zip((o.name for o in session.get_outputs()), got))

    def refuse(what: str, detail: str) -> ModelError:
        return ModelError(
            f"Converting {_describe(estimator)} from {source.path} with skl2onnx changed the numbers: {what} {detail} "
            "on random inputs; the pipeline uses an option skl2onnx does not reproduce, so simplify it or use kind: onnx."
        )

    def compare(what: str, want: np.ndarray, have: np.ndarray) -> None:
        diff, tol = max_abs_diff(want, have), tolerance(want, ATOL)
        if not diff <= tol:
            raise refuse(what, f"differ by up to {diff:.3g} (tolerance {tol:.1g})")

    if is_classifier(_final_estimator(estimator)):
        labels = _reference(estimator, "predict", x)
        rows = np.ones(len(x), dtype=bool)
        predicted = by_name.get(LABEL, got[0])
        if hasattr(estimator, "predict_proba") and PROBABILITIES in by_name:
            proba = _reference(estimator, "predict_proba", x)
            compare("probabilities", proba, by_name[PROBABILITIES])
            top2 = np.sort(proba, axis=1)[:, -2:] if proba.ndim == 2 and proba.shape[1] > 1 else None
            if top2 is not None:
                rows = top2[:, 1] - top2[:, 0] > TIE_MARGIN
        same = _same_labels(labels, predicted) if labels.size == predicted.size else np.zeros(len(x), dtype=bool)
        if not same.reshape(len(x), -1).all(axis=1)[rows].all():
            raise refuse("predicted labels", f"differ on {int((~same.reshape(len(x), -1).all(axis=1))[rows].sum())} of {len(x)} rows")
    elif hasattr(estimator, "predict"):
        compare("predictions", _reference(estimator, "predict", x), got[0])
    else:
        compare("transformed values", _reference(estimator, "transform", x), got[0])


class SklearnImporter:
    """Unpickles a fitted estimator, converts it with skl2onnx and verifies the numbers."""

    kind = "sklearn"
    source_type = SklearnSource

    def import_model(self, source: SklearnSource) -> ImportedModel:
        """Convert a pickled scikit-learn estimator or Pipeline to ONNX.

        The file is unpickled, which runs code stored in it: only import trusted files.

        Raises:
            MissingExtraError: scikit-learn or skl2onnx is not installed.
            ConfigError: ``model.n_features`` is missing or disagrees with the estimator.
            ModelError: The file is not a fitted estimator, skl2onnx cannot convert it, or
                the conversion changes the numbers.
        """
        _, skl2onnx = _require()
        estimator, data = _load(source)
        n_features = _check_estimator(estimator, source)
        converted = _convert(skl2onnx, estimator, n_features, source)
        merge_opset_imports(converted)
        _linear_to_standard_ops(converted)
        _probabilities_first(converted)
        serialized = converted.SerializeToString()
        label = f"ONNX conversion of {source.path}"
        model = parse_model(serialized, label, check=True)
        _verify(onnx_session(serialized, label), estimator, n_features, source)
        return ImportedModel(
            kind="onnx",
            description=(
                f"scikit-learn {_describe(estimator)} from {source.path.name}, converted to ONNX opset {source.opset} "
                f"by skl2onnx {skl2onnx.__version__}"
            ),
            source_files=(source_file("model", source.path, data),),
            model=model,
        )
