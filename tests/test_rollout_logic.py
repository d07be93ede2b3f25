"""Pure rollout rules (edgepack.server.rollout): table-driven, no I/O."""

from __future__ import annotations

import hashlib

import pytest

from edgepack.server import rollout as r
from edgepack.server.rollout import MemberView, Policy

POLICY = Policy(steps=(10, 50, 100), soak_seconds=60, min_devices_succeeded=2, max_failure_rate=0.25, halt_min_count=2)
T = "a" * 64
OLD = "b" * 64


def m(dev: str, state: str, step: int = 0, code: str | None = None, frm: str | None = OLD) -> MemberView:
    return MemberView(dev, step, state, code, frm)


def test_cohort_position_is_sha256_of_rollout_plus_device():
    expected = int.from_bytes(hashlib.sha256(b"r_1pi-001").digest(), "big") * 100 / 2**256
    assert r.cohort_position("r_1", "pi-001") == expected
    positions = [r.cohort_position("r_x", f"d{i}") for i in range(2000)]
    assert all(0 <= p < 100 for p in positions)
    assert 150 < sum(p < 10 for p in positions) < 250  # roughly uniform
    assert r.cohort_position("r_x", "d1") != r.cohort_position("r_y", "d1")  # re-shuffled per rollout


@pytest.mark.parametrize("position, step_index, expected", [
    (9.99, 0, True), (10.0, 0, False), (10.0, 1, True), (49.9, 1, True), (99.99, 2, True), (0.0, 3, False),
])
def test_in_cohort(position, step_index, expected):
    assert r.in_cohort(position, POLICY.steps, step_index) is expected


@pytest.mark.parametrize("steps, ok", [
    ([1, 10, 50, 100], True), ([100], True), ([0.5, 100], True), ([], False), ([0, 100], False),
    ([10, 10], False), ([50, 10], False), ([101], False),
])
def test_step_problems(steps, ok):
    assert (r.step_problems(steps) == []) is ok


@pytest.mark.parametrize("state, event, code, status, expected", [
    ("directed", "downloaded", None, "active", ("downloaded", None)),
    ("downloaded", "installed", None, "active", ("installed", None)),
    ("installed", "committed", None, "active", ("committed", None)),
    ("committed", "downloaded", None, "active", ("committed", None)),       # progress never goes back
    ("failed", "committed", None, "active", ("failed", None)),             # nor erases a failure
    ("installed", "self_test_failed", None, "active", ("failed", "self_test")),
    ("installed", "self_test_failed", "nonfinite", "active", ("failed", "nonfinite")),
    ("directed", "install_failed", "verify", "active", ("failed", "verify")),
    ("directed", "install_failed", None, "active", ("failed", "install")),
    ("installed", "probation_failed", "crash_loop", "active", ("failed", "crash_loop")),
    ("installed", "probation_failed", "latency_regression", "active", ("failed", "latency_regression")),
    ("installed", "probation_failed", "error_rate", "paused", ("failed", "error_rate")),
    ("committed", "rolled_back", None, "active", ("failed", "rolled_back")),   # device-side rollback = failure
    ("installed", "rolled_back", None, "halted", ("reverted", None)),           # obeying the server
    ("failed", "rolled_back", None, "active", ("failed", None)),
])
def test_member_after_event(state, event, code, status, expected):
    assert r.member_after_event(state, event, code, status) == expected


@pytest.mark.parametrize("state, current, expected", [
    ("directed", T, "installed"), ("downloaded", T, "installed"), ("directed", OLD, "directed"),
    ("installed", OLD, "reverted"), ("committed", None, "reverted"), ("committed", T, "committed"),
    ("failed", T, "failed"),
])
def test_member_after_report_follows_the_device(state, current, expected):
    assert r.member_after_report(state, current, T) == expected


@pytest.mark.parametrize("members, halted, codes", [
    ([], False, []),
    ([m("a", "failed", code="self_test")], False, []),                                   # below halt_min_count
    ([m("a", "failed", code="self_test"), m("b", "failed", code="crash_loop")], True, ["crash_loop", "self_test"]),
    ([m("a", "failed", code="nonfinite"), m("b", "failed", code="nonfinite")] + [m(f"c{i}", "committed") for i in range(8)],
     False, []),                                                                          # 20% <= 25%
    ([m("a", "failed", code="error_rate"), m("b", "failed", code="latency_regression"), m("c", "failed", code="error_rate")]
     + [m(f"c{i}", "installed") for i in range(5)], True, ["error_rate", "latency_regression"]),
])
def test_halt_decision(members, halted, codes):
    decision = r.halt_decision(POLICY, members)
    assert (decision is not None) is halted
    if decision:
        assert [x["code"] for x in decision.reasons] == codes
        assert "failed" in decision.message and "max_failure_rate" in decision.message


@pytest.mark.parametrize("step, started, now, members, eligible, action", [
    (0, 0, 30, [m("a", "committed"), m("b", "committed")], 5, None),           # soak not over
    (0, 0, 61, [m("a", "committed")], 5, None),                                # 1 of 2 succeeded
    (0, 0, 61, [m("a", "committed"), m("b", "committed")], 5, "advance"),
    (0, 0, 61, [m("a", "committed")], 1, "advance"),                           # small cohort: all it has
    (0, 0, 61, [], 0, "advance"),                                              # empty cohort: soak only
    (2, 0, 61, [m("a", "committed"), m("b", "committed")], 9, "complete"),
    (1, 0, 61, [m("a", "committed"), m("b", "committed"), m("c", "failed")], 9, None),  # 33% > 25%
])
def test_advance_decision(step, started, now, members, eligible, action):
    decision = r.advance_decision(POLICY, step, started, now, members, eligible)
    assert decision.action == action
    assert (decision.waiting_for == []) is (action is not None)


@pytest.mark.parametrize("status, position, member, current, expected", [
    ("active", 5, None, OLD, ("update", T, True)),
    ("active", 15, None, OLD, ("none", None, False)),                    # not in cohort yet
    ("active", 5, None, T, ("none", None, False)),                       # already there
    ("active", 15, m("d", "downloaded"), OLD, ("update", T, False)),     # members keep going
    ("active", 5, m("d", "failed"), OLD, ("none", None, False)),         # no retry loop after failure
    ("active", 5, m("d", "reverted"), OLD, ("none", None, False)),
    ("completed", 5, None, None, ("update", T, True)),                   # new devices still get it
    ("paused", 5, None, OLD, ("none", None, False)),
    ("aborted", 5, m("d", "directed"), OLD, ("none", None, False)),
    ("halted", 5, m("d", "installed"), T, ("rollback", OLD, False)),
    ("halted", 5, m("d", "directed"), OLD, ("none", None, False)),       # never installed: nothing to undo
    ("rolled_back", 5, m("d", "committed"), T, ("rollback", OLD, False)),
    ("rolled_back", 5, m("d", "committed", frm=None), T, ("none", None, False)),  # nothing to go back to
    ("halted", 5, None, T, ("none", None, False)),
])
def test_compute_directive(status, position, member, current, expected):
    d = r.compute_directive(status, T, POLICY.steps, 0, position, member, current)
    assert (d.action, d.target, d.join) == expected


def test_step_progress_counts_per_step():
    members = [m("a", "committed", 0), m("b", "failed", 1, "self_test"), m("c", "directed", 1), m("d", "reverted", 1)]
    progress = r.step_progress(POLICY, members, [1.0, 20.0, 60.0, 99.0])
    assert [(p.percent, p.eligible, p.joined, p.succeeded, p.failed, p.in_flight, p.reverted) for p in progress] == [
        (10, 1, 1, 1, 0, 0, 0), (50, 2, 3, 0, 1, 1, 1), (100, 4, 0, 0, 0, 0, 0)]
