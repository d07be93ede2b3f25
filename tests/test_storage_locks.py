"""Exactly-once rollout decisions when two server processes share one database.

Each test opens two storages on one database (two "replicas": two PostgreSQL
connection pools, or two connections to one SQLite file), holds a transaction open in
one of them at the critical moment and runs the competing decision in the other from a
thread. Without the row locks of ``storage.lock_*`` the second decision is taken on a
stale read and overwrites or contradicts the first; with them it waits, then sees the
first one's outcome. Run against both backends (``db_url``).
"""

from __future__ import annotations

import threading
import time

import pytest

from edgepack.server import rollout as logic
from edgepack.server.orchestration import Orchestrator
from edgepack.server.storage import (BundleRecord, DeviceRecord, MemberRecord, RolloutRecord, StorageConflict, open_storage)
from edgepack.server.storage.migrations import latest_version

OLD, NEW = "a" * 64, "b" * 64


def _world(storage, steps=(50.0, 100.0), soak=0.0):
    """A bundle, 40 devices of group g on OLD, and an active rollout of NEW whose step 0 can advance now."""
    now = time.time() - 10
    storage.add_bundle(BundleRecord("b_new", "m", "2.0.0", NEW, 10, "staging", "k", {"name": "m"}, now))
    storage.add_bundle(BundleRecord("b_old", "m", "1.0.0", OLD, 10, "production", "k", {"name": "m"}, now))
    for i in range(40):
        storage.add_device(DeviceRecord(f"d{i:02d}", "g", [], None, f"{i:064x}", now, current={"digest": OLD}))
    r = RolloutRecord("r1", "b_new", "g", list(steps), soak, 1, 0.5, 1000, {}, logic.ACTIVE, 0, now, now, now,
                      history=[{"at": now, "event": "created", "by": "admin", "detail": None}])
    storage.add_rollout(r)
    first = next(f"d{i:02d}" for i in range(40) if logic.cohort_position("r1", f"d{i:02d}") < steps[0])
    storage.save_member(MemberRecord("r1", first, 0, logic.COMMITTED, OLD, now, now))
    return r


@pytest.fixture
def two(db_url):
    one = open_storage(db_url)
    one.migrate()
    other = open_storage(db_url)
    yield one, other
    one.close()
    other.close()


def _in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_pause_is_not_overwritten_by_an_advance_decided_on_another_replica(two):
    s1, s2 = two
    _world(s1)
    admin, checkin_side = Orchestrator(s1, time.time), Orchestrator(s2, time.time)
    with s1.transaction():
        assert admin.act("r1", "pause").status == logic.PAUSED  # not committed yet
        # meanwhile replica 2 evaluates the rollout (a check-in or its tick): it would advance step 0
        thread, box = _in_thread(checkin_side.tick)
        thread.join(0.5)
        assert thread.is_alive(), "the other replica decided without waiting for the rollout's lock"
    thread.join(20)
    assert "error" not in box, box.get("error")
    final = s1.get_rollout("r1")
    assert final.status == logic.PAUSED and final.step_index == 0, final
    assert [h["event"] for h in final.history] == ["created", "pause"]


def test_device_does_not_join_a_rollout_that_another_replica_is_halting(two):
    s1, s2 = two
    _world(s1, steps=(100.0,))
    halter, joiner = Orchestrator(s1, time.time), Orchestrator(s2, time.time)
    device = s2.get_device("d07")
    assert s2.get_member("r1", "d07") is None
    with s1.transaction():
        halter.halt(s1.lock_rollout("r1"), [{"code": "prediction_shift"}], "prediction shift", time.time())

        def checkin():
            with s2.transaction():
                return joiner.directive_for(device, OLD)

        thread, box = _in_thread(checkin)
        thread.join(0.5)
        assert thread.is_alive(), "the device joined the cohort without waiting for the rollout's lock"
    thread.join(20)
    assert "error" not in box, box.get("error")
    decision, _ = box["value"]
    assert decision.action == "none", decision
    assert s1.get_member("r1", "d07") is None and s1.get_rollout("r1").status == logic.HALTED


def test_two_requests_of_one_device_are_applied_one_after_the_other(two):
    s1, s2 = two
    _world(s1)
    with s1.transaction():
        locked = s1.lock_device("d03")
        thread, box = _in_thread(lambda: _bump_seq(s2, "d03"))
        thread.join(0.5)
        assert thread.is_alive(), "a second request of the same device read its seq while the first was running"
        s1.save_device_report(_with_seq(locked, locked.last_seq + 1))
    thread.join(20)
    assert "error" not in box, box.get("error")
    assert box["value"] == 0  # it saw the first request's seq, not the stale -1
    assert s1.get_device("d03").last_seq == 1


def _with_seq(device, seq):
    import dataclasses

    return dataclasses.replace(device, last_seq=seq)


def _bump_seq(storage, device_id):
    with storage.transaction():
        seen = storage.lock_device(device_id).last_seq
        storage.save_device_report(_with_seq(storage.get_device(device_id), seen + 1))
        return seen


def test_replicas_starting_together_apply_each_migration_once(db_url):
    storages = [open_storage(db_url) for _ in range(3)]
    try:
        barrier = threading.Barrier(len(storages))
        results, errors = [], []

        def go(s):
            barrier.wait()
            try:
                results.append(s.migrate())
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(s,)) for s in storages]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        applied = sorted(v for r in results for v in r)
        assert applied == list(range(1, latest_version() + 1))  # every version once, by whichever came first
        assert all(s.schema_version() == latest_version() for s in storages)
    finally:
        for s in storages:
            s.close()


def test_member_counts_follow_every_member_change(two):
    s1, s2 = two
    _world(s1)
    now = time.time()
    for i in range(10):
        s2.save_member(MemberRecord("r1", f"d{i:02d}", 0, logic.DIRECTED, OLD, now, now))
    for i in range(4):
        s1.save_member(MemberRecord("r1", f"d{i:02d}", 0, logic.COMMITTED, OLD, now, now))
    with pytest.raises(RuntimeError):
        with s1.transaction():  # a rolled back change leaves the counts alone
            s1.save_member(MemberRecord("r1", "d09", 0, logic.FAILED, OLD, now, now))
            raise RuntimeError("rollback")
    real = {}
    for m in s2.list_members("r1"):
        real[m.state] = real.get(m.state, 0) + 1
    assert s1.member_counts("r1") == s2.member_counts("r1") == real


def test_deadlock_between_replicas_is_a_retryable_conflict():
    """PostgreSQL only: SQLite serializes writers, so two transactions never hold locks crosswise there."""
    from pg import fresh_schema

    with fresh_schema() as db_url:
        _deadlock(db_url)


def _deadlock(db_url):
    s1, s2 = open_storage(db_url), open_storage(db_url)
    try:
        s1.migrate()
        _world(s1)
        barrier = threading.Barrier(2)
        outcomes = []

        def cross(storage, first, second):
            try:
                with storage.transaction():
                    storage.lock_device(first)
                    barrier.wait()
                    time.sleep(0.2)
                    storage.lock_device(second)
                outcomes.append("committed")
            except StorageConflict as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=cross, args=(s1, "d01", "d02")), threading.Thread(target=cross, args=(s2, "d02", "d01"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        conflicts = [o for o in outcomes if isinstance(o, StorageConflict)]
        assert len(outcomes) == 2 and "committed" in outcomes and len(conflicts) == 1, outcomes  # one wins, one retries
        assert "retry" in str(conflicts[0])
    finally:
        s1.close()
        s2.close()


def test_checkins_read_only_the_rollouts_that_can_direct_them(db_url):
    """A group's rollout history grows with every release; a check-in must not load all of it."""
    storage = open_storage(db_url)
    try:
        storage.migrate()
        _world(storage)  # r1: active, oldest
        now = time.time()
        statuses = {"r2": logic.HALTED, "r3": logic.COMPLETED, "r4": logic.ROLLED_BACK, "r5": logic.ABORTED,
                    "r6": logic.COMPLETED}
        for i, (rid, status) in enumerate(statuses.items()):
            storage.add_rollout(RolloutRecord(rid, "b_new", "g", [100.0], 0.0, 1, 0.5, 1, {}, status, 0, now, now + i,
                                              now + i))
        storage.add_rollout(RolloutRecord("x1", "b_new", "other", [100.0], 0.0, 1, 0.5, 1, {}, logic.HALTED, 0, now,
                                          now + 99, now + 99))
        assert [r.id for r in storage.directive_rollouts("g")] == ["r2", "r4", "r6"]  # halted, rolled back, newest
        assert [r.id for r in storage.directive_rollouts("other")] == ["x1"]
        assert storage.directive_rollouts("empty") == []
    finally:
        storage.close()
