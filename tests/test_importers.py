"""Model importers: ONNX pass-through, PyTorch export, scikit-learn conversion, TFLite checks, registry."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import models
from edgepack.errors import ConfigError, MissingExtraError, ModelError
from edgepack.importers import (
    IMPORTERS, ImportedModel, OnnxSource, SklearnSource, TfliteSource, TorchSource, import_model, source_from_config,
)


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="needs PyTorch: pip install 'edgepack[torch]'")


@pytest.fixture
def skl2onnx():
    pytest.importorskip("sklearn", reason="needs scikit-learn: pip install 'edgepack[sklearn]'")
    return pytest.importorskip("skl2onnx", reason="needs skl2onnx: pip install 'edgepack[sklearn]'")


def run(imported: ImportedModel, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(imported.to_bytes(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- ONNX -----------------------------------------------------------------------------------------


def test_onnx_passes_through_with_file_hash(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save_model(models.mlp(), path)
    imported = import_model("onnx", OnnxSource(path))
    assert imported.kind == "onnx" and imported.data is None
    assert imported.model.SerializeToString() == models.mlp().SerializeToString()
    assert imported.source_sha256 == sha256(path)
    assert "mlp.onnx" in imported.description and "opset 17" in imported.description


def test_onnx_external_data_is_loaded_and_hashed(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save_model(models.mlp(), path, save_as_external_data=True, location="mlp.data", size_threshold=0)
    imported = import_model("onnx", OnnxSource(path))
    assert [(f.role, f.path.name) for f in imported.source_files] == [("model", "mlp.onnx"), ("external data", "mlp.data")]
    assert imported.source_files[1].sha256 == sha256(tmp_path / "mlp.data")
    x = np.ones((2, 16), np.float32)
    expected = ort.InferenceSession(models.mlp().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(run(imported, x)[0], expected[0])


def test_onnx_garbage_is_a_model_error(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x00\xffnot onnx" * 20)
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        import_model("onnx", OnnxSource(path))
    with pytest.raises(ModelError, match="does not exist"):
        import_model("onnx", OnnxSource(tmp_path / "missing.onnx"))


# --- PyTorch --------------------------------------------------------------------------------------


def _trained_cnn(torch):
    import torch_nets

    torch.manual_seed(0)
    net = torch_nets.TinyCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval() mode matters
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_torch_cnn_state_dict_exports_with_dynamic_batch(torch, tmp_path):
    net = _trained_cnn(torch)
    weights = tmp_path / "cnn.pt"
    torch.save(net.state_dict(), weights)
    imported = import_model("pytorch", TorchSource("torch_nets:TinyCNN", (1, 1, 8, 8), weights=weights))

    graph = imported.model.graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["output"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param
    assert imported.model.opset_import[0].version == 17
    onnx.checker.check_model(imported.model)

    x = np.random.default_rng(3).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(imported, x)[0], expected, atol=1e-4, rtol=0)
    assert [f.role for f in imported.source_files] == ["weights", "module"]
    assert imported.source_files[0].sha256 == sha256(weights)
    assert "cnn.pt" in imported.description and "opset 17" in imported.description


def test_torch_module_file_from_project_config(torch, tmp_path):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "net.py").write_text(textwrap.dedent("""
        import torch

        def make():
            torch.manual_seed(1)
            return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    """))
    source = source_from_config({"kind": "pytorch", "module": "nets/net.py:make", "input_shape": [2, 4]}, base_dir=tmp_path)
    assert source.module == f"{tmp_path / 'nets' / 'net.py'}:make" and source.example_input_shape == (2, 4)
    imported = import_model("pytorch", source)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    assert run(imported, x)[0].shape == (3, 2)
    assert [f.role for f in imported.source_files] == ["module"]
    assert imported.source_sha256 == sha256(tmp_path / "nets" / "net.py")


def test_torch_wrong_weights_are_model_errors(torch, tmp_path):
    import torch_nets

    other = tmp_path / "other.pt"
    torch.save(torch_nets.BranchOnBatch().state_dict(), other)
    with pytest.raises(ModelError, match=r"does not fit torch_nets:TinyCNN.*same architecture"):
        import_model("pytorch", TorchSource("torch_nets:TinyCNN", (1, 1, 8, 8), weights=other))

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint" * 8)
    with pytest.raises(ModelError, match=r"not a PyTorch state_dict.*torch\.save\(model\.state_dict\(\), path\)"):
        import_model("pytorch", TorchSource("torch_nets:TinyCNN", (1, 1, 8, 8), weights=garbage))

    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "optimizer": "adam"}, checkpoint)
    with pytest.raises(ModelError, match="not a state_dict of tensors"):
        import_model("pytorch", TorchSource("torch_nets:TinyCNN", (1, 1, 8, 8), weights=checkpoint))

    whole = tmp_path / "whole.pt"
    torch.save(torch_nets.TinyCNN(), whole)  # a pickled module: refused, never unpickled
    with pytest.raises(ModelError, match=r"weights_only=True \(Unsupported global: GLOBAL torch_nets.TinyCNN\)"):
        import_model("pytorch", TorchSource("torch_nets:TinyCNN", (1, 1, 8, 8), weights=whole))


def test_torch_missing_module_or_attribute_is_a_config_error(torch):
    with pytest.raises(ConfigError, match="has no attribute 'TinyCN'; did you mean 'TinyCNN'"):
        import_model("pytorch", TorchSource("torch_nets:TinyCN", (1, 1, 8, 8)))
    with pytest.raises(ConfigError, match="Cannot import module 'no_such_pkg_for_edgepack.nets' named in model.module"):
        import_model("pytorch", TorchSource("no_such_pkg_for_edgepack.nets:Net", (1, 4)))
    with pytest.raises(ConfigError, match="does not exist"):
        import_model("pytorch", TorchSource("missing/net.py:Net", (1, 4)))
    with pytest.raises(ConfigError, match=r"fails on an example input of shape \[1, 3\]"):
        import_model("pytorch", TorchSource("torch_nets:BranchOnBatch", (1, 3)))


@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean")  # BranchOnBatch, on purpose
def test_torch_export_that_freezes_the_batch_is_refused(torch):
    with pytest.raises(ModelError, match="cannot run a batch of 2.*x.flatten"):
        import_model("pytorch", TorchSource("torch_nets:FixedBatch", (1, 64)))
    with pytest.raises(ModelError, match="changed the numbers"):
        import_model("pytorch", TorchSource("torch_nets:BranchOnBatch", (1, 4)))


# --- scikit-learn ---------------------------------------------------------------------------------


def test_sklearn_iris_pipeline_matches_predict_proba(skl2onnx, tmp_path):
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_iris(return_X_y=True)
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=500))]).fit(X, y)
    path = tmp_path / "iris.joblib"
    joblib.dump(pipe, path)

    imported = import_model("sklearn", SklearnSource(path))
    # No ZipMap, and the float probabilities first: the gates and output.labels work on the first output.
    assert [o.name for o in imported.model.graph.output] == ["probabilities", "label"]
    assert len({o.domain for o in imported.model.opset_import}) == len(imported.model.opset_import)
    x = X.astype(np.float32)
    proba, labels = run(imported, x)
    np.testing.assert_allclose(proba, pipe.predict_proba(x), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(labels, pipe.predict(x))
    assert imported.source_sha256 == sha256(path)
    assert "Pipeline(StandardScaler, LogisticRegression)" in imported.description


def test_sklearn_plain_pickled_regressor(skl2onnx, tmp_path):
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 3))
    model = Ridge().fit(X, X @ [1.0, -2.0, 0.5] + 3)
    path = tmp_path / "ridge.pkl"
    path.write_bytes(pickle.dumps(model))
    imported = import_model("sklearn", source_from_config({"kind": "sklearn", "path": "ridge.pkl", "n_features": 3}, tmp_path))
    x = X[:7].astype(np.float32)
    np.testing.assert_allclose(run(imported, x)[0].ravel(), model.predict(x), atol=1e-4)


def test_sklearn_bad_files_and_settings(skl2onnx, tmp_path):
    from sklearn.linear_model import LogisticRegression

    not_model = tmp_path / "dict.pkl"
    not_model.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ModelError, match="not a scikit-learn estimator"):
        import_model("sklearn", SklearnSource(not_model))

    unfitted = tmp_path / "unfitted.pkl"
    unfitted.write_bytes(pickle.dumps(LogisticRegression()))
    with pytest.raises(ModelError, match="not fitted"):
        import_model("sklearn", SklearnSource(unfitted))

    fitted = tmp_path / "fitted.pkl"
    fitted.write_bytes(pickle.dumps(LogisticRegression().fit([[0, 1], [1, 0], [1, 1], [0, 0]], [0, 1, 1, 0])))
    with pytest.raises(ConfigError, match="model.n_features is 5 but .* fitted on 2 features"):
        import_model("sklearn", SklearnSource(fitted, n_features=5))

    garbage = tmp_path / "garbage.joblib"
    garbage.write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(ModelError, match="could not be unpickled"):
        import_model("sklearn", SklearnSource(garbage))


def test_sklearn_binary_and_ovr_linear_classifiers_become_standard_ops_with_the_same_probabilities(skl2onnx, tmp_path):
    import joblib
    from sklearn.datasets import load_breast_cancer, load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import LinearSVC

    X, y = load_breast_cancer(return_X_y=True)
    binary = LogisticRegression(max_iter=5000).fit(X, y)
    Xi, yi = load_iris(return_X_y=True)
    ovr = OneVsRestClassifier(LogisticRegression(max_iter=500)).fit(Xi, yi)
    for name, est, data in (("binary", binary, X), ("ovr", ovr, Xi)):
        path = tmp_path / f"{name}.joblib"
        joblib.dump(est, path)
        imported = import_model("sklearn", SklearnSource(path))
        assert imported.model.graph.output[0].name == "probabilities"
        x = data.astype(np.float32)
        proba, labels = run(imported, x)[:2]
        np.testing.assert_allclose(proba, est.predict_proba(x), atol=1e-4, rtol=0)
        np.testing.assert_array_equal(labels.ravel(), est.predict(x))
    ops = {n.op_type for n in import_model("sklearn", SklearnSource(tmp_path / "binary.joblib")).model.graph.node}
    assert "LinearClassifier" not in ops and "MatMul" in ops  # quantizable: the weights are an initializer
    # A linear model skl2onnx cannot give probabilities for still imports (decision scores, label).
    svc = tmp_path / "svc.joblib"
    joblib.dump(LinearSVC().fit(Xi, yi), svc)
    assert import_model("sklearn", SklearnSource(svc)).model.graph.output


def _sklearn_digits_project(directory: Path, estimator, variants: list[str]) -> Path:
    """A build project around ``estimator`` fitted on half of scikit-learn's digits (offline data)."""
    import joblib
    import yaml
    from sklearn.datasets import load_digits

    from edgepack.bundle.keys import generate_keypair

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    order = np.random.default_rng(0).permutation(len(X))
    train, val = order[:897], order[897:]  # 900 held out: enough for the gates to decide
    estimator.fit(X[train], y[train])
    directory.mkdir(parents=True, exist_ok=True)
    joblib.dump(estimator, directory / "model.joblib")
    np.savez(directory / "calib.npz", raw=X[train[:200]])
    np.savez(directory / "val.npz", raw=X[val], labels=y[val].astype(np.int64))
    columns = [f"p{i}" for i in range(64)]
    config = {
        "name": "digits-sklearn", "version": "1.0.0",
        "model": {"kind": "sklearn", "path": "model.joblib", "n_features": 64},
        "input": {"name": "raw", "tabular": {"raw_columns": columns, "columns": [{"name": c} for c in columns]}},
        "output": {"labels": [str(i) for i in range(10)]},
        "data": {"calibration": {"path": "calib.npz", "key": "raw"},
                 "validation": {"path": "val.npz", "key": "raw", "labels": "labels"}},
        "targets": [{"device": "x86-gateway", "variants": variants}],
        "gates": {"max_accuracy_drop": 0.02},
        "signing": {"key": "keys/digits.key"}, "output_dir": "dist",
    }
    (directory / "edgepack.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (directory / "keys").mkdir()
    generate_keypair(directory / "keys", "digits")
    return directory / "edgepack.yaml"


def _build(cli, project: Path) -> tuple[int, str, str, dict | None]:
    code, out, err = cli("build", project)
    report = project.parent / "dist" / "digits-sklearn-1.0.0.build.json"
    return code, out, err, json.loads(report.read_text()) if report.is_file() else None


def test_sklearn_logistic_regression_gates_int8_and_fp16_on_its_probabilities(skl2onnx, cli, tmp_path):
    from sklearn.linear_model import LogisticRegression

    from edgepack.bundle import read_member

    project = _sklearn_digits_project(tmp_path / "lr", LogisticRegression(max_iter=300), ["fp32", "int8", "fp16"])
    code, out, err, report = _build(cli, project)
    assert code == 0, (out, err)
    for vid in ("onnx-fp32", "onnx-int8", "onnx-fp16"):
        n = report["variants"][vid]["numerics"]
        assert n["accuracy"] > 0.9 and n["agreement"] is not None and n["class_samples"] == 900, vid
        assert n["label_outputs"]["label"][1] == 900
    for vid in ("onnx-int8", "onnx-fp16"):
        verdicts = {(v["gate"], v["output"]): v for v in report["variants"][vid]["gate_verdicts"]}
        assert set(verdicts) == {("accuracy_drop", None), ("agreement", None), ("agreement", "label")}
        assert all(v["verdict"] == "pass" and v["samples"] == 900 for v in verdicts.values())
        drop = verdicts[("accuracy_drop", None)]
        assert drop["interval"][0] <= drop["estimate"] <= drop["interval"][1] <= 0.02
    assert "95% interval" in out and "agreement of output 'label'" in out
    manifest = json.loads(read_member(project.parent / "dist" / "digits-sklearn-1.0.0.epk", "manifest.json"))
    first = manifest["io"]["outputs"][0]
    assert first["name"] == "probabilities" and first["labels"] == [str(i) for i in range(10)]
    assert {v["precision"] for v in manifest["variants"]} >= {"fp32", "int8", "fp16"}


def test_sklearn_random_forest_gates_on_its_probabilities_and_int8_is_refused_by_name(skl2onnx, cli, tmp_path):
    from sklearn.ensemble import RandomForestClassifier

    forest = RandomForestClassifier(n_estimators=20, max_depth=10, random_state=0)
    project = _sklearn_digits_project(tmp_path / "rf", forest, ["fp32"])
    code, out, err, report = _build(cli, project)
    assert code == 0, (out, err)
    n = report["variants"]["onnx-fp32"]["numerics"]
    assert n["accuracy"] > 0.85 and n["agreement"] == 1.0 and n["reference_accuracy"] == n["accuracy"]
    assert "cannot be measured" not in out + err
    # Tree ensembles have no weight matrix: int8 is refused with one sentence, not built unmeasured.
    project = _sklearn_digits_project(tmp_path / "rf8", forest, ["fp32", "int8"])
    code, out, err, report = _build(cli, project)
    assert code != 0 and "Traceback" not in out + err
    assert "found no Conv/MatMul/Gemm weights" in err and not (project.parent / "dist").exists()


# --- TFLite ---------------------------------------------------------------------------------------


def test_tflite_passes_through(tmp_path):
    path = tmp_path / "m.tflite"
    data = b"\x1c\x00\x00\x00TFL3" + bytes(64)
    path.write_bytes(data)
    imported = import_model("tflite", TfliteSource(path))
    assert (imported.kind, imported.model, imported.to_bytes(), imported.suffix) == ("tflite", None, data, ".tflite")
    assert imported.source_sha256 == hashlib.sha256(data).hexdigest()


def test_tflite_garbage_is_a_model_error(tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"this is not a flatbuffer at all")
    with pytest.raises(ModelError, match=r"not a TFLite model .*'TFL3'"):
        import_model("tflite", TfliteSource(path))
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="is empty"):
        import_model("tflite", TfliteSource(path))


# --- registry, config and extras ------------------------------------------------------------------


def test_registry_kinds_and_unknown_kind_suggestion(tmp_path):
    assert set(IMPORTERS) == {"onnx", "pytorch", "sklearn", "tflite", "keras"}
    with pytest.raises(ConfigError, match=r"Unknown model kind 'pytorc'; did you mean 'pytorch'\?.*onnx, pytorch, sklearn, tflite"):
        import_model("pytorc", OnnxSource(tmp_path / "m.onnx"))
    with pytest.raises(ConfigError, match="did you mean 'sklearn'"):
        source_from_config({"kind": "sklearnn", "path": "m.pkl"})
    with pytest.raises(ConfigError, match="takes a TorchSource, got a OnnxSource"):
        import_model("pytorch", OnnxSource(tmp_path / "m.onnx"))


def test_source_from_config_validates_keys_and_values(tmp_path):
    source = source_from_config({"path": "m.onnx"}, base_dir=tmp_path)
    assert source == OnnxSource(tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="model.weigths is not used by kind 'pytorch'; did you mean 'weights'"):
        source_from_config({"kind": "pytorch", "module": "m:Net", "input_shape": [1, 4], "weigths": "w.pt"})
    with pytest.raises(ConfigError, match="model.module is required for kind 'pytorch'"):
        source_from_config({"kind": "pytorch", "input_shape": [1, 4]})
    with pytest.raises(ConfigError, match="model.input_shape must be a list of positive integers"):
        source_from_config({"kind": "pytorch", "module": "m:Net", "input_shape": [1, 0]})
    with pytest.raises(ConfigError, match="model.module must look like"):
        TorchSource("models.net", (1, 4))
    with pytest.raises(ConfigError, match="model.input_dtype must be one of"):
        TorchSource("m:Net", (1, 4), input_dtype="complex64")
    with pytest.raises(ConfigError, match="model.n_features must be a positive integer"):
        SklearnSource(tmp_path / "m.pkl", n_features=0)


@pytest.mark.parametrize(
    ("module", "kind", "source", "extra"),
    [
        ("torch", "pytorch", TorchSource("torch_nets:TinyCNN", (1, 1, 8, 8)), "edgepack[torch]"),
        ("skl2onnx", "sklearn", SklearnSource(Path("m.pkl")), "edgepack[sklearn]"),
    ],
)
def test_missing_extra_names_the_extra(monkeypatch, module, kind, source, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    with pytest.raises(MissingExtraError, match=re.escape(f"is not installed; install the extra with: pip install '{extra}'")):
        import_model(kind, source)


def test_importing_the_registry_loads_no_converter():
    code = "import sys, edgepack.importers; print(sorted(m for m in ('torch', 'skl2onnx', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
