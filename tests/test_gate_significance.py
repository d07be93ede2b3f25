"""Gates aware of sample size: intervals, the paired test, the three-way verdict and the samples needed.

Hand-computed values are worked out in the comments; scipy (an independent implementation)
cross-checks the Wilson interval and the exact binomial test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgepack.optimize import significance as sig
from edgepack.optimize.evaluate import Numerics, compare, session
from edgepack.optimize.gate import Gate, assess, check, notes

Z = 1.959963984540054  # the 97.5% normal quantile


# --------------------------------------------------------------------------- the statistics


def test_wilson_interval_matches_the_hand_computed_value_and_scipy():
    from scipy.stats import binomtest

    # 7 of 20: p = 0.35, z² = 3.841459; centre = (0.35 + z²/40) / (1 + z²/20) = 0.374169,
    # half = z·sqrt(0.35·0.65/20 + z²/1600) / (1 + z²/20) = 0.192977.
    low, high = sig.wilson_interval(7, 20)
    assert low == pytest.approx(0.181192, abs=1e-6) and high == pytest.approx(0.567146, abs=1e-6)
    for k, n in ((0, 75), (3, 75), (74, 75), (75, 75), (197, 198), (448, 450)):
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert sig.wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)
    # 0 of n: the upper bound is z² / (n + z²) exactly.
    assert sig.wilson_interval(0, 75)[1] == pytest.approx(Z * Z / (75 + Z * Z), rel=1e-12)


def test_exact_mcnemar_is_the_two_sided_binomial_test_of_the_flips():
    from scipy.stats import binomtest

    assert sig.mcnemar_exact(3, 0) == pytest.approx(0.25)  # 2 · (1/2)³
    assert sig.mcnemar_exact(6, 0) == pytest.approx(2 / 64)
    assert sig.mcnemar_exact(10, 2) == pytest.approx(2 * (66 + 12 + 1) / 4096)  # 2·P(X ≥ 10 | 12)
    assert sig.mcnemar_exact(2, 10) == sig.mcnemar_exact(10, 2)
    assert sig.mcnemar_exact(0, 0) == 1.0 and sig.mcnemar_exact(5, 5) == 1.0
    for b, c in ((1, 0), (4, 1), (17, 5), (40, 22), (3000, 2850)):
        assert sig.mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9, abs=1e-12)


def test_paired_interval_is_newcombes_formula_on_the_two_wilson_intervals():
    from scipy.stats import binomtest

    a, b, c, d = 60, 10, 2, 28
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    w1 = binomtest(a + b, n).proportion_ci(method="wilson")
    w2 = binomtest(a + c, n).proportion_ci(method="wilson")
    # ad - bc = 1660 > n/2, so phi = (1660 - 50) / sqrt(70·30·62·38).
    phi = (a * d - b * c - n / 2) / math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    lower = (p1 - p2) - math.sqrt((p1 - w1.low) ** 2 - 2 * phi * (p1 - w1.low) * (w2.high - p2) + (w2.high - p2) ** 2)
    upper = (p1 - p2) + math.sqrt((p2 - w2.low) ** 2 - 2 * phi * (p2 - w2.low) * (w1.high - p1) + (w1.high - p1) ** 2)
    assert sig.paired_difference_interval(a, b, c, d) == pytest.approx((lower, upper), abs=1e-12)
    assert lower < 0.08 < upper  # the point estimate (10 - 2)/100 lies inside


def test_paired_interval_is_much_narrower_than_treating_the_runs_as_independent():
    # Two models that agree on 440 of 450 samples: the pairing is most of the information.
    low, high = sig.paired_difference_interval(430, 6, 4, 10)
    w = sig.wilson_interval(436, 450), sig.wilson_interval(434, 450)
    independent = math.hypot(436 / 450 - w[0][0], w[1][1] - 434 / 450) + math.hypot(434 / 450 - w[1][0], w[0][1] - 436 / 450)
    assert high - low < 0.7 * independent


def test_paired_interval_covers_the_true_drop_at_least_at_the_stated_rate():
    # 4% of samples lost by the candidate, 1% gained: true drop 3 points, 200 samples.
    rng = np.random.default_rng(0)
    truth, n = 0.03, 200
    draws = rng.multinomial(n, [0.90, 0.04, 0.01, 0.05], size=3000)
    covered = sum(lo <= truth <= hi for lo, hi in (sig.paired_difference_interval(*map(int, row)) for row in draws))
    assert covered / len(draws) >= 0.93


# --------------------------------------------------------------------------- the verdicts


def test_three_flips_out_of_75_is_undecided_not_a_refusal():
    v = sig.drop_verdict(75, reference_correct=70, fp32_only=3, candidate_only=0, threshold=0.01)
    assert v.verdict == "undecided" and v.estimate == pytest.approx(0.04)
    assert v.p_value == pytest.approx(0.25) and v.lower < 0 < 0.01 < v.upper
    assert v.samples_needed is not None and v.samples_needed > 75
    text = v.sentence()
    assert text.startswith("undecided: with 75 samples the accuracy drop is 4.00 pt, 95% interval [")
    assert "3 samples fp32 right and candidate wrong, 0 the reverse" in text
    assert f"the 1.00 pt gate needs ~{v.samples_needed:,} samples at this flip rate to decide" in text


def test_a_real_drop_above_the_allowance_fails():
    v = sig.drop_verdict(1000, reference_correct=900, fp32_only=60, candidate_only=10, threshold=0.01)
    assert v.verdict == "fail" and v.p_value < 1e-6 and v.lower > 0.01


def test_a_drop_above_the_allowance_that_could_be_chance_is_undecided():
    # 2 flips one way, 0 the other in 100 samples: 2 points measured, McNemar p = 0.5.
    assert sig.drop_verdict(100, 90, 2, 0, 0.01).verdict == "undecided"


def test_no_flips_on_a_tiny_set_is_not_a_pass():
    # The false acceptance: 20 samples without a flip say little about the next thousand.
    assert sig.drop_verdict(20, 18, 0, 0, 0.01).verdict == "undecided"
    assert sig.agreement_verdict(20, 20, 0.98).verdict == "undecided"


def test_enough_samples_without_flips_pass():
    assert sig.drop_verdict(450, 440, 0, 0, 0.01).verdict == "pass"
    assert sig.agreement_verdict(450, 448, 0.98).verdict == "pass"


def test_agreement_clearly_below_fails():
    v = sig.agreement_verdict(100, 90, 0.98)
    assert v.verdict == "fail" and v.upper < 0.98 and v.counts == {"agreed": 90, "flipped": 10}


def test_samples_needed_is_where_the_rule_starts_deciding():
    v = sig.agreement_verdict(198, 197, 0.98)
    assert v.verdict == "undecided"
    rate, need = 197 / 198, v.samples_needed
    assert sig.wilson_interval(rate * need, need)[0] >= 0.98  # decided (pass) at the stated count
    assert sig.wilson_interval(rate * need * 0.97, need * 0.97)[0] < 0.98  # and not at 3% fewer
    drop = sig.drop_verdict(75, 70, 3, 0, 0.01)
    scale = drop.samples_needed / 75
    assert sig.drop_verdict(drop.samples_needed, round(70 * scale), round(3 * scale), 0, 0.01).verdict != "undecided"


def test_a_value_on_the_threshold_names_no_sample_count():
    v = sig.agreement_verdict(100, 98, 0.98)
    assert v.verdict == "undecided" and v.samples_needed is None
    assert "no sample count decides the 98.00% gate" in v.sentence()


def test_zero_tolerance_gates_are_decided_on_the_data():
    assert sig.agreement_verdict(50, 50, 1.0).verdict == "pass"
    assert sig.agreement_verdict(50, 49, 1.0).verdict == "fail"
    assert sig.drop_verdict(50, 45, 0, 0, 0.0).verdict == "pass"
    assert sig.drop_verdict(50, 45, 1, 1, 0.0).verdict == "pass"  # no net drop
    assert sig.drop_verdict(50, 45, 1, 0, 0.0).verdict == "fail"


def test_inconsistent_counts_are_refused():
    with pytest.raises(ValueError):
        sig.drop_verdict(10, 3, 5, 0, 0.01)  # 5 fp32-only right out of 3 right
    with pytest.raises(ValueError):
        sig.agreement_verdict(10, 11, 0.9)


# --------------------------------------------------------------------------- the gate


def numerics(n, ref_correct, b, c, agreed):
    return Numerics(samples=n, max_abs_error=0.1, cosine=0.999, agreement=agreed / n, accuracy=(ref_correct - b + c) / n,
                    reference_accuracy=ref_correct / n, finite=True, close=False, class_samples=n, agreed=agreed,
                    fp32_only=b, candidate_only=c)


def test_a_candidate_that_reproduces_the_reference_is_judged_on_the_data():
    # The fp32 variant against itself (or a lossless rewrite): nothing flipped, and its arithmetic
    # is the reference's, so 40 samples are not "too few" to say it keeps the accuracy.
    from dataclasses import replace

    same = replace(numerics(40, 39, 0, 0, 40), close=True)
    gate = Gate(max_accuracy_drop=0.01, min_agreement=0.98)
    assert assess(gate, same) == [] and check(gate, same) == []
    changed = numerics(40, 39, 0, 0, 40)  # an int8 with the same counts: its arithmetic differs
    assert [v.verdict for v in assess(gate, changed)] == ["undecided", "undecided"] and len(check(gate, changed)) == 2


def test_undecided_gate_refuses_with_the_samples_needed_sentence():
    failures = check(Gate(max_accuracy_drop=0.01), numerics(75, 70, 3, 0, 72))
    (failure,) = failures
    assert failure.startswith("accuracy drop undecided: with 75 samples") and "samples at this flip rate to decide" in failure
    assert "gates.undecided: accept" in failure


def test_undecided_gate_accepted_passes_but_is_reported():
    gate = Gate(max_accuracy_drop=0.01, min_agreement=0.8, undecided="accept")
    n = numerics(75, 70, 3, 0, 72)
    assert check(gate, n) == []
    (note,) = notes(gate, n)
    assert note.startswith("accepted although undecided: with 75 samples the accuracy drop")
    assert [v.verdict for v in assess(gate, n)] == ["undecided", "pass"]  # 72 of 75: Wilson lower 0.889 ≥ 0.8
    assert "undecided accepted" in gate.describe()


def test_failed_gate_keeps_the_measurement_first_and_adds_the_evidence():
    (failure,) = check(Gate(min_agreement=0.98), numerics(100, 90, 0, 0, 90))
    assert failure.startswith("top-1 agreement 90.00% is below the required 98.00% (with 100 samples")
    assert "95% interval [" in failure


def test_unknown_undecided_policy_is_a_config_error():
    from edgepack.errors import ConfigError

    with pytest.raises(ConfigError, match="undecided must be one of refuse, accept"):
        Gate(max_accuracy_drop=0.01, undecided="maybe")


def _scores_model(weights: list[float]) -> onnx.ModelProto:
    """y = x * w (per class): w boosts some classes, flipping the top-1 of chosen rows."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [len(weights)], weights)
    node = helper.make_node("Mul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_compare_counts_the_flips_each_way(tmp_path):
    from edgepack.data import open_dataset
    from edgepack.modelio import graph_inputs

    reference = _scores_model([1.0, 1.0, 1.0])
    candidate = _scores_model([1.0, 1.0, 3.0])  # class 2 wins whenever x2 > max(x0, x1) / 3
    x = np.array([[5, 1, 2],   # ref 0, cand 2; label 0 -> b (fp32 right only)
                  [5, 1, 2],   # ref 0, cand 2; label 2 -> c (candidate right only)
                  [4, 1, 3],   # ref 0, cand 2; label 0 -> b
                  [1, 5, 0],   # both 1; label 1 -> both right
                  [1, 5, 0],   # both 1; label 0 -> both wrong
                  [0, 0, 9]],  # both 2; label 2 -> both right
                 dtype=np.float32)
    labels = np.array([0, 2, 0, 1, 0, 2])
    np.savez(tmp_path / "val.npz", x=x, labels=labels)
    dataset = open_dataset(tmp_path / "val.npz", graph_inputs(reference), "validation")
    n = compare(session(reference.SerializeToString(), 1), session(candidate.SerializeToString(), 1), dataset, 4)
    assert (n.class_samples, n.agreed, n.fp32_only, n.candidate_only) == (6, 3, 2, 1)
    assert n.reference_accuracy == pytest.approx(4 / 6) and n.accuracy == pytest.approx(3 / 6)


# --------------------------------------------------------------------------- the CLI


def test_optimize_on_a_small_validation_set_refuses_undecided_and_names_the_samples(cli, digits, tmp_path):
    val = np.load(digits / "val.npz")
    np.savez(tmp_path / "small.npz", input=val["input"][:30], labels=val["labels"][:30])
    args = ["optimize", digits / "model.onnx", "-o", tmp_path / "o.onnx", "--quantize", "fp16",
            "--validation", tmp_path / "small.npz", "--min-agreement", "0.98", "--json", "--runs", "2"]
    code, out, err = cli(*args)
    assert code == 1 and not (tmp_path / "o.onnx").exists()
    assert "top-1 agreement undecided: with 30 samples" in err and "samples at this flip rate to decide" in err
    (verdict,) = json.loads(out)["candidates"][0]["gate_verdicts"]
    assert verdict["verdict"] == "undecided" and verdict["samples"] == 30 and verdict["samples_needed"] > 30
    assert verdict["interval"][0] < 0.98 <= verdict["interval"][1]

    code, out, err = cli(*args, "--undecided", "accept")
    assert code == 0, err
    report = json.loads(out)
    assert any(w.startswith("fp16: accepted although undecided: with 30 samples") for w in report["warnings"])
    assert "undecided accepted" in report["gate"]


def test_optimize_on_the_full_validation_set_decides_and_reports_the_interval(cli, digits, tmp_path):
    code, out, err = cli("optimize", digits / "model.onnx", "-o", tmp_path / "o.onnx", "--quantize", "fp16",
                         "--validation", digits / "val.npz", "--runs", "2")
    assert code == 0, err
    assert "agreement" in out and "95% interval [" in out and "of 450 flipped" in out and ": pass" in out


def test_project_file_undecided_key_is_validated(cli, digits, tmp_path):
    import shutil

    import yaml

    for name in ("model.onnx", "calib.npz", "val.npz", "edgepack.yaml"):
        shutil.copy(digits / name, tmp_path / name)
    config = yaml.safe_load((tmp_path / "edgepack.yaml").read_text())
    config["gates"]["undecided"] = "maybe"
    (tmp_path / "edgepack.yaml").write_text(yaml.safe_dump(config))
    code, out, err = cli("build", tmp_path / "edgepack.yaml")
    assert code == 2 and "Traceback" not in out + err
    assert "gates.undecided: must be one of refuse, accept" in err and "got 'maybe'" in err
    from edgepack.bundle.keys import generate_keypair
    from edgepack.project import load_project

    (tmp_path / "keys").mkdir()
    generate_keypair(tmp_path / "keys", "digits")
    config["gates"]["undecided"] = "accept"
    (tmp_path / "edgepack.yaml").write_text(yaml.safe_dump(config))
    assert load_project(tmp_path / "edgepack.yaml").gates.undecided == "accept"


def _small_digits_project(directory, digits, samples: int, undecided: str | None):
    import shutil

    import yaml

    from edgepack.bundle.keys import generate_keypair

    directory.mkdir()
    for name in ("model.onnx", "calib.npz", "edgepack.yaml"):
        shutil.copy(digits / name, directory / name)
    with np.load(digits / "val.npz") as val:
        np.savez(directory / "val.npz", **{k: val[k][:samples] for k in val.files})
    config = yaml.safe_load((directory / "edgepack.yaml").read_text())
    config["targets"] = [{"device": "rpi4", "variants": ["fp32", "int8"]}]
    if undecided:
        config["gates"]["undecided"] = undecided
    (directory / "edgepack.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (directory / "keys").mkdir()
    generate_keypair(directory / "keys", "digits")
    return directory / "edgepack.yaml"


def test_build_on_a_small_validation_set_ships_no_undecided_int8_unless_accepted(cli, digits, tmp_path):
    from edgepack.bundle import read_member

    project = _small_digits_project(tmp_path / "strict", digits, 40, None)
    code, out, err = cli("build", project)
    assert code == 0, (out, err)
    manifest = json.loads(read_member(project.parent / "dist" / "digits-1.0.0.epk", "manifest.json"))
    assert [v["id"] for v in manifest["variants"]] == ["onnx-fp32"]  # rpi4 falls back to fp32
    assert "undecided: with 40 samples" in out and "samples at this flip rate to decide" in out
    report = json.loads((project.parent / "dist" / "digits-1.0.0.build.json").read_text())
    verdicts = report["variants"]["onnx-int8"]["gate_verdicts"]
    assert {v["gate"] for v in verdicts} == {"accuracy_drop", "agreement"}
    assert all(v["samples"] == 40 for v in verdicts) and any(v["verdict"] == "undecided" for v in verdicts)

    project = _small_digits_project(tmp_path / "accept", digits, 40, "accept")
    code, out, err = cli("build", project)
    assert code == 0, (out, err)
    manifest = json.loads(read_member(project.parent / "dist" / "digits-1.0.0.epk", "manifest.json"))
    assert {v["id"] for v in manifest["variants"]} == {"onnx-fp32", "onnx-int8"}
    assert manifest["gates"]["thresholds"]["undecided"] == "accept"
    assert "onnx-int8: accepted although undecided: with 40 samples" in out
