"""The SQLite event log: append, read back, gapless ids, WAL, errors."""
import os
import sqlite3
import threading

import pytest

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
