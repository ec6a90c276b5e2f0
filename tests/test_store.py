"""The SQLite event log: append, read back, gapless ids, WAL, errors."""
import sqlite3
import threading

import pytest

import databuild
from conftest import write_workspace
from databuild import EventLog, NotFound, StorageError


@pytest.fixture
def log(tmp_path):
    log = EventLog(str(tmp_path / "state" / "events.db"))
    yield log
    log.close()


def test_append_assigns_gapless_ids_from_one(log):
    assert log.latest_event_id() == 0
    first = log.append([("want_create", {"want_id": "a"}, 1.5)])
    more = log.append([("want_cancel", {"want_id": "a"}, 2.0), ("x", {}, 2.0)])
    assert [e.event_id for e in first + more] == [1, 2, 3]
    assert log.latest_event_id() == 3
    assert log.append([]) == []


def test_events_read_back_as_written(log):
    log.append([("want_create", {"want_id": "a", "partitions": ["p/é"]}, 1700000000.25)])
    (event,) = log.list_events()
    assert (event.event_id, event.type, event.payload, event.timestamp) == (
        1, "want_create", {"want_id": "a", "partitions": ["p/é"]}, 1700000000.25)
    assert event.to_dict()["timestamp"] == "2023-11-14T22:13:20.250Z"
    assert log.get_event(1).payload == event.payload
    with pytest.raises(NotFound):
        log.get_event(2)


def test_list_since_limit_upto(log):
    log.append([("e", {"i": i}, float(i)) for i in range(10)])
    assert [e.event_id for e in log.list_events(since=3, limit=4)] == [4, 5, 6, 7]
    assert [e.event_id for e in log.list_events(since=8)] == [9, 10]
    assert [e.event_id for e in log.list_events(upto=2)] == [1, 2]
    assert [e.event_id for e in log.iter_events(since=2, upto=7, batch=2)] == [3, 4, 5, 6, 7]


def test_wal_mode_and_durable_across_reopen(tmp_path):
    path = str(tmp_path / "events.db")
    log = EventLog(path)
    log.append([("e", {"n": 1}, 1.0)])
    log.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    again = EventLog(path)
    assert [e.payload for e in again.list_events()] == [{"n": 1}]
    again.append([("e", {"n": 2}, 2.0)])
    assert again.latest_event_id() == 2
    again.close()


def test_a_connection_per_thread(log):
    log.append([("e", {}, 1.0)])
    seen = []

    def reader():
        seen.append((log._conn(), log.latest_event_id()))
    t = threading.Thread(target=reader)
    t.start()
    t.join()
    assert seen[0][1] == 1
    assert seen[0][0] is not log._conn()


def test_failed_append_appends_nothing(log):
    log.append([("e", {}, 1.0)])
    with pytest.raises(TypeError):
        log.append([("e", {}, 2.0), ("e", {"bad": object()}, 3.0)])
    assert log.latest_event_id() == 1


def test_sqlite_errors_become_storage_errors(tmp_path):
    path = tmp_path / "events.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError) as info:
        EventLog(str(path))
    assert isinstance(info.value.__cause__, sqlite3.Error)


# -- the projection ------------------------------------------------------------


def rows_of(log, table, key):
    conn = sqlite3.connect(log.path)
    try:
        return {k: row for k, row in conn.execute("SELECT %s, row FROM %s" % (key, table))}
    finally:
        conn.close()


def assert_projection_matches_replay(log):
    """Every projection row equals the entity of a full replay of the log, and
    the working set restored from it has the replay's indexes."""
    full = databuild.BuildState.from_events(log.iter_events())
    for table, key, entities in (("wants", "want_id", full.wants),
                                 ("partitions", "ref", full.partitions),
                                 ("job_runs", "job_run_id", full.job_runs)):
        rows = rows_of(log, table, key)
        assert set(rows) == set(entities), table
        for k, entity in entities.items():
            assert rows[k] == entity.to_row(), (table, k)
    for want_id, want in full.wants.items():
        assert log.projected("wants", want_id).job_run_ids == want.job_run_ids
        assert log.projected("wants", want_id).derivative_want_ids == want.derivative_want_ids
    for ref, part in full.partitions.items():
        assert log.projected("partitions", ref).want_ids == part.want_ids
    restored = databuild.BuildState.restore(*log.load_projection(), store=log)
    assert set(dict.keys(restored.partitions)) <= {  # at work only; the rest stays on disk
        ref for ref, part in full.partitions.items()
        if part.status in (databuild.BUILDING, databuild.UPSTREAM_BUILDING,
                           databuild.UP_FOR_RETRY)}
    for ref, part in full.partitions.items():
        assert restored.partitions[ref].to_row() == part.to_row()
        assert restored.downstream_of(ref) == full.downstream_of(ref)
    assert set(log.stale_refs()) == set(full.stale)
    refs = sorted(full.partitions) + ["never/built"]
    assert {r: p.to_row() for r, p in log.partition_rows(refs).items()} == {
        r: p.to_row() for r, p in full.partitions.items()}  # one statement per chunk
    fresh = databuild.BuildState.restore(*log.load_projection(), store=log)
    fresh.partitions.prefetch(refs)
    assert "never/built" not in fresh.partitions
    assert all(fresh.partitions[r].to_row() == full.partitions[r].to_row()
               for r in full.partitions)
    assert restored.latest_event_id == full.latest_event_id
    assert restored.pending_refs.keys() == full.pending_refs.keys()
    assert restored.live_wants_by_ref == full.live_wants_by_ref
    assert restored.waiters == full.waiters
    assert restored.active_run_by_ref == full.active_run_by_ref
    for want_id, want in restored.wants.items():
        assert want.counts == full.wants[want_id].counts
        assert want.job_run_ids == full.wants[want_id].job_run_ids
        assert want.derivative_want_ids == full.wants[want_id].derivative_want_ids
    for kind in ("wants_by_status", "partitions_by_status", "job_runs_by_status"):
        for status, bucket in getattr(full, kind).items():
            assert len(getattr(restored, kind)[status]) == len(bucket), (kind, status)
    assert restored.summary() == full.summary()


def test_projection_rows_are_the_replay(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", jobs=[{"label": "t", "partition_patterns": [".*"],
                                                 "max_retries": 1}],
                         plan={"c": {"deps": ["b"]}, "b": {"deps": ["a"]},
                               "flaky": {"fail_times": 1}, "bad": {"exit": 3},
                               "needs-bad": {"deps": ["bad"]}, "slow": {"sleep": 30}})
    d = driver_for(ws)
    for refs in (["c"], ["flaky"], ["needs-bad", "x"]):
        d.settle(d.want(*refs)["want_id"])
    slow = d.want("slow", "y")
    d.until(lambda s: s.job_runs_by_status["Running"])
    d.command("taint", ref="c", reason="why not")
    d.want("c", sla_seconds=100, ttl_seconds=1000)  # rebuilt while the slow one runs
    assert_projection_matches_replay(d.log)  # with work in progress
    d.command("cancel_want", want_id=slow["want_id"])
    d.until(lambda s: not s.job_runs_by_status["Running"] and not s.job_runs_by_status["Queued"])
    assert_projection_matches_replay(d.log)


def test_projection_is_rebuilt_when_missing(tmp_path, driver_for, caplog):
    ws = write_workspace(tmp_path / "ws", plan={"b": {"deps": ["a"]}})
    d = driver_for(ws)
    want = d.want("b")
    d.settle(want["want_id"])
    events = d.log.latest_event_id()
    d.log.clear_projection()  # as if the log came from elsewhere, or an older version
    with caplog.at_level("INFO", logger="databuild"):
        d.orch = databuild.Orchestrator(d.config, d.log)
    said = [r.getMessage() for r in caplog.records]
    assert "Building the projection of the event log (%d events)" % events in said
    assert any(m.startswith("Projection built: %d events in " % events) for m in said)
    assert not dict.keys(d.orch.state.partitions)  # all at rest: on disk only
    assert d.orch.find_want(want["want_id"]).status == "Successful"
    assert not d.orch.state.wants  # finished work is not loaded
    assert_projection_matches_replay(d.log)
    d.settle(d.want("c")["want_id"])  # and it goes on from there
    assert_projection_matches_replay(d.log)
