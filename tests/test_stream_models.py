"""Multi-input and stateful models: audio/frames raw kinds, input roles, streams, the state gate, golden streams.

Tiny models built with onnx.helper; each test names the failure it defends against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from edgepack.errors import DataError
from edgepack.preprocess import AudioPreprocess, FramesPreprocess, apply_reference, check_raw_input, embed_preprocessing

CHUNK, H = 8, 2
W = np.array([[1, 0.5]] * 4 + [[-1, 0.25]] * 4, np.float32) / 4  # audio -> both state channels
V = np.array([[4.0], [0.0]], np.float32)                          # speech reads state channel 0 only


def _sess(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def stateful_model(state_offset: float = 0.0) -> onnx.ModelProto:
    """(audio [1, 8], state [1, 2], sr int64 scalar) -> (speech [1, 1], stateN [1, 2]).

    ``state_offset`` adds to the new state's channel 1, which the decision never reads:
    a variant whose state moved while its decisions still agree.
    """
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "w": W, "v": V, "half": np.array(0.5, np.float32), "rate": np.array(16000, np.int64),
        "offset": np.array([[0.0, state_offset]], np.float32)}.items()]
    nodes = [
        helper.make_node("Equal", ["sr", "rate"], ["ok"]), helper.make_node("Cast", ["ok"], ["gate"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["audio", "gate"], ["gated"]),
        helper.make_node("MatMul", ["gated", "w"], ["drive"]), helper.make_node("Mul", ["state", "half"], ["kept"]),
        helper.make_node("Add", ["kept", "drive"], ["s0"]), helper.make_node("Add", ["s0", "offset"], ["stateN"]),
        helper.make_node("MatMul", ["stateN", "v"], ["logit"]), helper.make_node("Sigmoid", ["logit"], ["speech"]),
    ]
    graph = helper.make_graph(nodes, "stream", [
        helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, CHUNK]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, H]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, [])], [
        helper.make_tensor_value_info("speech", TensorProto.FLOAT, [1, 1]),
        helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [1, H])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def streams_npz(path: Path, n_streams: int = 4, n_chunks: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    audio = rng.integers(-20000, 20000, size=(n_streams, n_chunks, CHUNK)).astype(np.int16)
    audio[::2] //= 50  # quiet streams: decisions differ between streams
    labels = (np.abs(audio.astype(np.float32)).mean(axis=2) > 2000).astype(np.int64)
    np.savez(path, audio=audio, labels=labels)
    return path


def project(tmp_path: Path, model: onnx.ModelProto, **overrides) -> Path:
    from edgepack.bundle import generate_keypair

    onnx.save(model, tmp_path / "model.onnx")
    streams_npz(tmp_path / "calib.npz", seed=1)
    streams_npz(tmp_path / "val.npz", seed=2)
    (tmp_path / "keys").mkdir(exist_ok=True)
    generate_keypair(tmp_path / "keys", "k")
    data = {
        "name": "tiny-stream", "version": "1.0.0", "model": {"kind": "onnx", "path": "model.onnx"},
        "input": {"name": "pcm", "feeds": "audio", "audio": {"sample_format": "int16", "sample_rate": 16000, "samples": CHUNK}},
        "inputs": [{"name": "state", "role": "state", "output": "stateN"}, {"name": "sr", "role": "constant", "value": 16000}],
        "stream": {"decision": {"output": "speech", "threshold": 0.5}},
        "data": {"calibration": {"path": "calib.npz", "key": "audio"},
                 "validation": {"path": "val.npz", "key": "audio", "labels": "labels"}, "golden_vectors": 5},
        "targets": [{"device": "rpi4", "variants": ["fp32"]}],
        "signing": {"key": "keys/k.key"},
        **overrides,
    }
    (tmp_path / "edgepack.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "edgepack.yaml"


# --------------------------------------------------------------------------- raw kinds


def _identity(shape, name="x") -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", [name], ["y"])], "id",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int16_pcm_is_scaled_in_the_graph_bit_for_bit_like_the_reference():
    pre = AudioPreprocess("int16", 16000, 64)
    model = embed_preprocessing(_identity(["N", 64]), pre, raw_input_name="pcm")
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.INT16
    raw = np.random.default_rng(0).integers(-32768, 32768, size=(3, 64)).astype(np.int16)
    raw[0, :2] = (-32768, 32767)
    (got,) = _sess(model).run(None, {"pcm": raw})
    want = apply_reference(pre, raw)
    assert np.array_equal(got, want) and want.min() == -1.0 and want.max() < 1.0


def test_raw_audio_of_the_wrong_kind_is_refused_with_the_fix():
    pre = AudioPreprocess("int16", 16000, 64)
    with pytest.raises(DataError, match=r"astype\(np.int16\)"):
        check_raw_input(pre, np.zeros((1, 64), np.float32))
    with pytest.raises(DataError, match="chunks of 64"):
        check_raw_input(pre, np.zeros((1, 100), np.int16))
    with pytest.raises(DataError, match="peak is 2"):
        check_raw_input(AudioPreprocess("float32", 16000, 4), np.array([[0, 2, 0, 0]], np.float32))
    with pytest.raises(Exception, match="samples to the model's chunk length"):
        embed_preprocessing(_identity(["N", 32]), pre)


def test_numeric_frames_embed_their_scale_and_refuse_nan():
    pre = FramesPreprocess(frame_len=3, frames=2, scale=0.5)
    model = embed_preprocessing(_identity(["N", 2, 3]), pre)
    raw = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    (got,) = _sess(model).run(None, {"raw": raw})
    np.testing.assert_array_equal(got, apply_reference(pre, raw))
    bad = raw.copy()
    bad[1, 0, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        check_raw_input(pre, bad)


# --------------------------------------------------------------------------- project file


def test_project_file_rejects_state_without_stream_and_unknown_roles():
    from edgepack.project import validate_project

    base = yaml.safe_load((Path(__file__).parents[1] / "examples" / "vad" / "edgepack.yaml").read_text())
    assert validate_project(base) == []
    no_stream = {k: v for k, v in base.items() if k != "stream"}
    assert any("add stream:" in p for p in validate_project(no_stream))
    bad = dict(base, inputs=[{"name": "state", "role": "memory"}, {"name": "sr", "role": "constant", "output": "x"}])
    problems = validate_project(bad)
    assert any("inputs[0].role" in p for p in problems) and any("inputs[1].output: only for role: state" in p for p in problems)
    assert any("stream: declared, but no input has role: state" in p for p in problems)


def test_a_model_input_left_undeclared_is_named(tmp_path, cli):
    path = project(tmp_path, stateful_model(), inputs=[{"name": "state", "role": "state", "output": "stateN"}])
    code, _, err = cli("build", path)
    assert code == 2 and "'sr'" in err and "role per_sample, constant or state" in err
    assert not (tmp_path / "dist").exists()


# --------------------------------------------------------------------------- data


def test_stream_data_of_the_wrong_shape_says_what_shape_it_needs(tmp_path):
    from edgepack.modelio import TensorSpec
    from edgepack.stream import ExtraInput, open_streams

    inputs = [TensorSpec("pcm", np.dtype(np.int16), (1, CHUNK)), TensorSpec("state", np.dtype(np.float32), (1, H)),
              TensorSpec("sr", np.dtype(np.int64), ())]
    extras = (ExtraInput("state", "state", "stateN"), ExtraInput("sr", "constant"))
    np.savez(tmp_path / "bad.npz", audio=np.zeros((2, 3, 5), np.int16))
    with pytest.raises(DataError, match=r"\[n_streams, n_chunks, 8\]"):
        open_streams(tmp_path / "bad.npz", "validation", "pcm", "audio", None, extras, inputs)
    np.savez(tmp_path / "nosr.npz", audio=np.zeros((2, 3, CHUNK), np.int16))
    with pytest.raises(DataError, match=r"constant 'sr' \(\[\] int64\) needs one"):
        open_streams(tmp_path / "nosr.npz", "validation", "pcm", "audio", None, extras, inputs)
    np.savez(tmp_path / "ok.npz", audio=np.zeros((2, 3, CHUNK), np.int16), sr=np.array(16000), labels=np.array([0, 1]))
    streams = open_streams(tmp_path / "ok.npz", "validation", "pcm", "audio", None, extras, inputs)
    assert streams.constants["sr"].shape == () and streams.chunk_labels.tolist() == [[0, 0, 0], [1, 1, 1]]
    feed = streams.step_feed(1, 2, streams.initial)
    assert feed["pcm"].shape == (1, CHUNK) and feed["state"].shape == (1, H) and feed["sr"].shape == ()


def test_multi_input_data_adds_scalars_and_shared_tensors_to_every_batch(tmp_path):
    from edgepack.modelio import TensorSpec
    from edgepack.stream import ExtraInput, open_inputs

    inputs = [TensorSpec("raw", np.dtype(np.float32), (None, 4)), TensorSpec("k", np.dtype(np.int64), ()),
              TensorSpec("bias", np.dtype(np.float32), (1, 3)), TensorSpec("mask", np.dtype(np.float32), (None, 2))]
    extras = (ExtraInput("k", "constant", value=3), ExtraInput("bias", "constant"), ExtraInput("mask", "per_sample"))
    np.savez(tmp_path / "d.npz", raw=np.ones((5, 4), np.float32), bias=np.zeros((1, 3), np.float64),
             mask=np.ones((5, 2), np.float32))
    ds = open_inputs(tmp_path / "d.npz", "validation", "raw", "raw", None, extras, inputs)
    feed = ds.batch(0, 2)
    assert feed["raw"].shape == (2, 4) and feed["mask"].shape == (2, 2)
    assert feed["k"].shape == () and feed["k"].dtype == np.int64 and feed["bias"].dtype == np.float32
    np.savez(tmp_path / "e.npz", raw=np.ones((5, 4), np.float32), bias=np.zeros((5, 3), np.float32),
             mask=np.ones((5, 2), np.float32))
    with pytest.raises(DataError, match=r"constant is given once, in the input's own shape"):
        open_inputs(tmp_path / "e.npz", "validation", "raw", "raw", None, extras, inputs)


# --------------------------------------------------------------------------- gate


def _streamset(tmp_path):
    from edgepack.modelio import graph_inputs
    from edgepack.stream import ExtraInput, open_streams

    model = embed_preprocessing(stateful_model(), AudioPreprocess("int16", 16000, CHUNK), raw_input_name="pcm", feeds="audio")
    extras = (ExtraInput("state", "state", "stateN"), ExtraInput("sr", "constant", value=16000))
    streams = open_streams(streams_npz(tmp_path / "v.npz"), "validation", "pcm", "audio", "labels", extras, graph_inputs(model))
    return model, streams


def test_a_state_output_that_moved_fails_the_gate_although_every_decision_agrees(tmp_path):
    from edgepack.stream import Decision, ExtraInput, StreamSpec, compare_streams, state_gate_failures

    model, streams = _streamset(tmp_path)
    moved = embed_preprocessing(stateful_model(state_offset=14.0), AudioPreprocess("int16", 16000, CHUNK),
                                raw_input_name="pcm", feeds="audio")
    spec = StreamSpec((ExtraInput("state", "state", "stateN"),), Decision("speech", 0.5))
    same = compare_streams(_sess(model), _sess(model), streams, spec)
    assert same.agreement == 1.0 and state_gate_failures(same) == []
    n = compare_streams(_sess(model), _sess(moved), streams, spec)
    assert n.agreement == 1.0 and n.min_stream_agreement == 1.0  # decisions cannot see channel 1
    assert n.state_max_abs_error > 13
    failures = state_gate_failures(n)
    assert failures and "'stateN'" in failures[0]


def test_decisions_are_compared_per_stream():
    from edgepack.stream import Decision, decision_agreement

    d = Decision("p", 0.5)
    assert d.decide(np.array([[0.7], [0.2]])).tolist() == [1, 0]
    assert Decision("p", None, argmax=True).decide(np.array([[0.1, 0.9, 0.0]])).tolist() == [1]
    assert decision_agreement([np.array([1, 0, 1, 1]), np.array([0, 0])], [np.array([1, 1, 1, 1]), np.array([0, 0])]) == [0.75, 1.0]


# --------------------------------------------------------------------------- build, golden stream, verify


def test_stream_bundle_golden_stream_replays_with_state_and_fails_without_it(tmp_path, cli):
    from edgepack.build.golden import check_golden, read_npz
    from edgepack_runtime.bundle import extract_bundle, load_public_key

    path = project(tmp_path, stateful_model())
    code, out, err = cli("build", path, "--json")
    assert code == 0, err
    bundle = tmp_path / "dist" / "tiny-stream-1.0.0.epk"
    code, _, err = cli("verify", bundle, "--key", tmp_path / "keys" / "k.pub")
    assert code == 0, err
    manifest = extract_bundle(bundle, tmp_path / "x", load_public_key(tmp_path / "keys" / "k.pub"))
    layout = manifest["golden"]["stream"]
    assert layout == {"steps": 5, "step_inputs": ["pcm"], "state": {"state": "stateN"}}
    arrays = read_npz((tmp_path / "x" / "golden" / "vectors.npz").read_bytes())
    assert arrays["input:pcm"].shape == (5, 1, CHUNK) and arrays["input:sr"].shape == ()
    assert arrays["output:onnx-fp32:stateN"].shape == (5, 1, H)
    sess = _sess(onnx.load(tmp_path / "x" / manifest.variants[0]["file"]))
    tol = manifest["golden"]["tolerances"]["onnx-fp32"]
    assert check_golden(sess, "onnx-fp32", arrays, tol, layout) == []
    forgetful = dict(layout, state={})  # a device that does not carry the state
    assert any("stateN" in p for p in check_golden(sess, "onnx-fp32", arrays, tol, forgetful))


# --------------------------------------------------------------------------- optimize, registry


def test_optimize_without_data_refuses_to_quantize_a_stateful_model_and_names_each_input(tmp_path, cli):
    onnx.save(stateful_model(), tmp_path / "m.onnx")
    for mode in ("fp16", "auto", "dynamic"):
        code, _, err = cli("optimize", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", "--quantize", mode)
        assert code == 2, (mode, err)
        assert "'state' float32 [1, 2]" in err and "recurrent state" in err, err
        assert "'sr' int64 []" in err and "scalar" in err and "'audio' float32 [1, 8]" in err, err
        assert not (tmp_path / "out.onnx").exists()


def test_stream_registry_is_bounded_expires_idle_streams_and_restarts_on_a_new_model():
    from edgepack_runtime.stream import Stream, StreamLimitError, Streams

    now = [0.0]
    streams = Streams(max_streams=2, idle_seconds=10, clock=lambda: now[0])
    inputs = [{"name": "x", "dtype": "float32", "shape": [1, 1], "role": "raw"},
              {"name": "s", "dtype": "float32", "shape": [1, 1], "role": "state"}]

    def make():
        return Stream(inputs, ["y", "sN"], lambda f: [f["x"] + f["s"], f["x"] + f["s"]], {"state": [{"input": "s", "output": "sN"}]})

    one = np.ones((1, 1), np.float32)
    assert streams.feed("a", "d1", make, one)[0]["y"][0, 0] == 1
    assert streams.feed("a", "d1", make, one)[0]["y"][0, 0] == 2  # state carried
    streams.feed("b", "d1", make, one)
    with pytest.raises(StreamLimitError, match="2 streams are open"):
        streams.feed("c", "d1", make, one)
    now[0] = 11
    assert streams.feed("c", "d1", make, one)[0]["y"][0, 0] == 1  # a and b expired
    assert streams.feed("c", "d2", make, one)[0]["y"][0, 0] == 1  # another bundle: zero state again
    assert streams.end("c") and not streams.end("c")


def test_multi_input_model_builds_verifies_and_the_device_fills_in_its_constants(tmp_path, cli):
    """A stateless model with a per-sample input, a 0-d scalar and a shared [1, 4] tensor."""
    import edgepack_runtime
    from edgepack.bundle import generate_keypair
    from edgepack_runtime.bundle import load_public_key
    from edgepack_runtime.cache import CacheConfig
    from edgepack_runtime.model import RuntimeConfig, install

    nodes = [helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["x", "kf"], ["xk"]),
             helper.make_node("Add", ["xk", "bias"], ["xb"]), helper.make_node("Mul", ["xb", "mask"], ["y"])]
    graph = helper.make_graph(nodes, "multi", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]), helper.make_tensor_value_info("k", TensorProto.INT64, []),
        helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 4]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    for name in ("calib", "val"):
        np.savez(tmp_path / f"{name}.npz", rows=rng.standard_normal((12, 4)).astype(np.float32),
                 mask=(rng.random((12, 4)) > 0.3).astype(np.float32), bias=np.array([[1, 2, 3, 4]], np.float32))
    (tmp_path / "keys").mkdir()
    generate_keypair(tmp_path / "keys", "k")
    (tmp_path / "edgepack.yaml").write_text(yaml.safe_dump({
        "name": "multi", "version": "1.0.0", "model": {"kind": "onnx", "path": "model.onnx"},
        "input": {"name": "rows", "feeds": "x", "frames": {"frame_len": 4}},
        "inputs": [{"name": "k", "role": "constant", "value": 3}, {"name": "bias", "role": "constant"},
                   {"name": "mask", "role": "per_sample"}],
        "data": {"calibration": {"path": "calib.npz", "key": "rows"}, "validation": {"path": "val.npz", "key": "rows"}},
        "targets": [{"device": "rpi4", "variants": ["fp32"]}], "signing": {"key": "keys/k.key"}}))
    code, _, err = cli("build", tmp_path / "edgepack.yaml")
    assert code == 0, err
    bundle = tmp_path / "dist" / "multi-1.0.0.epk"
    code, _, err = cli("verify", bundle, "--key", tmp_path / "keys" / "k.pub")
    assert code == 0, err
    config = RuntimeConfig(CacheConfig(root=tmp_path / "cache", trusted_keys=(load_public_key(tmp_path / "keys" / "k.pub"),)))
    install(bundle, config)
    model = edgepack_runtime.open(tmp_path / "cache", keys=[tmp_path / "keys" / "k.pub"])
    roles = {i["name"]: (i["role"], i.get("value")) for i in model.inputs}
    assert roles == {"rows": ("raw", None), "k": ("constant", 3), "bias": ("constant", [[1.0, 2.0, 3.0, 4.0]]),
                     "mask": ("per_sample", None)}
    rows = np.ones((2, 4), np.float32)
    out = model.predict({"rows": rows, "mask": np.ones((2, 4), np.float32)})["y"]
    np.testing.assert_allclose(out, rows * 3 + np.array([1, 2, 3, 4], np.float32))
    with pytest.raises(edgepack_runtime.InputValidationError, match="bias"):
        model.predict({"rows": rows, "mask": np.ones((2, 4), np.float32), "bias": np.zeros((1, 4), np.float32)})


def test_a_refused_first_chunk_opens_no_stream():
    from edgepack_runtime.stream import Stream, Streams
    from edgepack_runtime.validate import InputValidationError

    streams = Streams(max_streams=1)
    inputs = [{"name": "x", "dtype": "float32", "shape": [1, 1], "role": "raw"},
              {"name": "s", "dtype": "float32", "shape": [1, 1], "role": "state"}]

    def make():
        return Stream(inputs, ["sN"], lambda f: [f["x"] + f["s"]], {"state": [{"input": "s", "output": "sN"}]})

    with pytest.raises(InputValidationError, match="dtype"):
        streams.feed("a", "d", make, np.ones((1, 1), np.int32))
    assert len(streams) == 0
    streams.feed("b", "d", make, np.ones((1, 1), np.float32))  # the limit of 1 is still free


def test_optimize_takes_a_scalar_input_as_one_0d_array_for_every_sample(tmp_path, cli):
    """The data format the no-data message asks for must be one optimize accepts."""
    onnx.save(stateful_model(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", audio=rng.standard_normal((16, CHUNK)).astype(np.float32),
             state=rng.standard_normal((16, H)).astype(np.float32), sr=np.array(16000, np.int64))
    code, out, err = cli("optimize", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", "--quantize", "fp16",
                         "--validation", tmp_path / "d.npz", "--json")
    assert code == 0, err
    report = json.loads(out[out.index("{"):])
    assert report["evaluation"]["samples"] == 16 and (tmp_path / "out.onnx").exists()
