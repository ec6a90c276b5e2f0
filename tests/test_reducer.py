"""The pure reducer: every state and transition of README "Concepts", from events alone."""
import pytest

from databuild import (BuildState, Event, BUILDING, CANCELED, DEP_MISS, EXPIRED, FAILED,
                       IDLE, LIVE, QUEUED, RUNNING, SUCCEEDED, SUCCESSFUL, TAINTED,
                       UP_FOR_RETRY, UPSTREAM_BUILDING, UPSTREAM_FAILED)


class Log:
    """Builds events with consecutive ids and applies them to a state."""

    def __init__(self):
        self.events = []
        self.state = BuildState()

    def __call__(self, type_, **payload):
        event = Event(len(self.events) + 1, 1000.0 + len(self.events), type_, payload)
        self.events.append(event)
        self.state.apply(event)
        return event

    def want(self, want_id, *refs, **extra):
        extra.setdefault("source", {"type": "manual", "user": "t"})
        self("want_create", want_id=want_id, partitions=list(refs), **extra)
        return self.state.wants[want_id]

    def queue(self, run_id, *refs, want_ids=(), label="job", attempt=1):
        self("job_run_queue", job_run_id=run_id, job_label=label, partitions=list(refs),
             want_ids=list(want_ids), attempt=attempt)
        return self.state.job_runs[run_id]


@pytest.fixture
def log():
    return Log()


def test_new_want_is_idle_and_pending(log):
    want = log.want("w1", "a", "b", "a")
    assert want.status == IDLE
    assert want.partitions == ["a", "b"]  # duplicates dropped
    assert list(log.state.pending_refs) == ["a", "b"]
    assert want.to_dict(log.state)["partition_statuses"] == {"a": IDLE, "b": IDLE}
    assert want.root_want_id == "w1"


def test_queue_start_success(log):
    want = log.want("w1", "a")
    run = log.queue("r1", "a", want_ids=["w1"])
    part = log.state.partitions["a"]
    assert (run.status, part.status, want.status) == (QUEUED, BUILDING, BUILDING)
    assert not log.state.pending_refs
    assert log.state.active_run_by_ref == {"a": "r1"}
    log("job_run_start", job_run_id="r1", pid=1)
    assert run.status == RUNNING and run.started_at is not None
    log("job_run_success", job_run_id="r1", exit_code=0)
    assert run.status == SUCCEEDED and run.exit_code == 0
    assert run.duration_ms == 1000  # timestamps of start and finish, one second apart
    assert part.status == LIVE and part.built_by_job_run_id == "r1"
    assert want.status == SUCCESSFUL
    assert want.job_run_ids == ["r1"]
    assert not log.state.active_run_by_ref


def test_want_for_live_partition_is_successful_at_once(log):
    log.want("w1", "a")
    log.queue("r1", "a", want_ids=["w1"])
    log("job_run_success", job_run_id="r1")
    assert log.want("w2", "a").status == SUCCESSFUL
    assert not log.state.pending_refs


def test_status_order_of_a_multi_partition_want(log):
    want = log.want("w1", "a", "b", "c")
    log.queue("ra", "a", want_ids=["w1"])
    log("job_run_success", job_run_id="ra")
    assert want.status == IDLE  # a Live, b and c not started
    log.queue("rb", "b", want_ids=["w1"])
    assert want.status == BUILDING
    log("job_run_missing_deps", job_run_id="rb", missing_deps=["x"])
    assert want.status == UPSTREAM_BUILDING
    log.queue("rc", "c", want_ids=["w1"])
    assert want.status == BUILDING  # Building outranks UpstreamBuilding
    log("job_run_failure", job_run_id="rc", error="boom", retry=False)
    # c settled Failed, but b is not settled: the want goes on (README "Backfills").
    assert want.status == UPSTREAM_BUILDING
    log("want_create", want_id="w2", partitions=["x"], parent_want_id="w1",
        root_want_id="w1", source={"type": "job", "job_run_id": "rb"})
    log.queue("rx", "x", want_ids=["w2"])
    log("job_run_success", job_run_id="rx")
    assert want.status == IDLE and "b" in log.state.pending_refs
    log.queue("rb2", "b", want_ids=["w1"])
    log("job_run_success", job_run_id="rb2")
    assert want.status == FAILED  # all settled: a and b Live, c Failed
    assert want.to_dict(log.state)["counts"] == {"total": 3, LIVE: 2, FAILED: 1}


def test_failure_with_retry_goes_up_for_retry(log):
    want = log.want("w1", "a")
    log.queue("r1", "a", want_ids=["w1"])
    log("job_run_failure", job_run_id="r1", exit_code=1, error="exit code 1", retry=True)
    part = log.state.partitions["a"]
    assert part.status == UP_FOR_RETRY and part.retries == 1
    assert want.status == IDLE
    assert "a" in log.state.pending_refs
    assert log.state.job_runs["r1"].status == FAILED
    assert log.state.job_runs["r1"].error == "exit code 1"


def test_dep_miss_waits_then_up_for_retry(log):
    want = log.want("w1", "b")
    log.queue("r1", "b", want_ids=["w1"])
    log("job_run_missing_deps", job_run_id="r1", missing_deps=["a"])
    part = log.state.partitions["b"]
    assert log.state.job_runs["r1"].status == DEP_MISS
    assert part.status == UPSTREAM_BUILDING and part.missing_deps == ["a"]
    assert want.status == UPSTREAM_BUILDING
    # Nobody wants "a" through a want yet, but b waits on it: it is pending.
    assert log.state.is_wanted("a") and "a" in log.state.pending_refs
    log("want_create", want_id="w2", partitions=["a"], parent_want_id="w1",
        root_want_id="w1", source={"type": "job", "job_run_id": "r1"})
    assert want.derivative_want_ids == ["w2"]
    log.queue("r2", "a", want_ids=["w2"])
    log("job_run_success", job_run_id="r2")
    assert part.status == UP_FOR_RETRY
    assert "b" in log.state.pending_refs
    assert log.state.wants["w2"].status == SUCCESSFUL
    log.queue("r3", "b", want_ids=["w1"])
    log("job_run_success", job_run_id="r3")
    assert want.status == SUCCESSFUL


def test_dep_miss_on_live_deps_retries_at_once(log):
    log.want("w0", "a")
    log.queue("r0", "a")
    log("job_run_success", job_run_id="r0")
    log.want("w1", "b")
    log.queue("r1", "b", want_ids=["w1"])
    log("job_run_missing_deps", job_run_id="r1", missing_deps=["a"])
    assert log.state.partitions["b"].status == UP_FOR_RETRY


def test_waits_on_several_deps(log):
    log.want("w1", "c")
    log.queue("r1", "c", want_ids=["w1"])
    log("job_run_missing_deps", job_run_id="r1", missing_deps=["a", "b"])
    log.queue("ra", "a")
    log("job_run_success", job_run_id="ra")
    assert log.state.partitions["c"].status == UPSTREAM_BUILDING
    log.queue("rb", "b")
    log("job_run_success", job_run_id="rb")
    assert log.state.partitions["c"].status == UP_FOR_RETRY


def test_upstream_failure_propagates_up_a_chain(log):
    want = log.want("w1", "c")
    log.queue("r1", "c", want_ids=["w1"])
    log("job_run_missing_deps", job_run_id="r1", missing_deps=["b"])
    log.want("w2", "b", parent_want_id="w1", root_want_id="w1")
    log.queue("r2", "b", want_ids=["w2"])
    log("job_run_missing_deps", job_run_id="r2", missing_deps=["a"])
    log.want("w3", "a", parent_want_id="w2", root_want_id="w1")
    log.queue("r3", "a", want_ids=["w3"])
    log("job_run_failure", job_run_id="r3", error="boom", retry=False)
    parts = log.state.partitions
    assert (parts["a"].status, parts["b"].status, parts["c"].status) == (
        FAILED, UPSTREAM_FAILED, UPSTREAM_FAILED)
    assert log.state.wants["w3"].status == FAILED
    assert log.state.wants["w2"].status == UPSTREAM_FAILED
    assert want.status == UPSTREAM_FAILED
    assert not log.state.pending_refs and not log.state.waiters


def test_new_want_rebuilds_a_failed_partition(log):
    log.want("w1", "a")
    log.queue("r1", "a", want_ids=["w1"])
    log("job_run_failure", job_run_id="r1", error="boom", retry=False)
    assert log.state.wants["w1"].status == FAILED
    want = log.want("w2", "a")
    assert want.status == IDLE
    assert log.state.partitions["a"].status == UP_FOR_RETRY
    assert log.state.partitions["a"].retries == 0
    assert log.state.wants["w1"].status == FAILED  # terminal statuses stay


def test_second_want_joins_the_running_build(log):
    log.want("w1", "a")
    run = log.queue("r1", "a", want_ids=["w1"])
    want2 = log.want("w2", "a")
    assert want2.status == BUILDING
    assert run.want_ids == ["w1", "w2"] and want2.job_run_ids == ["r1"]
    assert log.state.partitions["a"].want_ids == ["w1", "w2"]
    log("job_run_success", job_run_id="r1")
    assert want2.status == SUCCESSFUL


def test_cancel_reaches_derivative_wants_and_drops_waits(log):
    log.want("w1", "b")
    log.queue("r1", "b", want_ids=["w1"])
    log("job_run_missing_deps", job_run_id="r1", missing_deps=["a"])
    log.want("w2", "a", parent_want_id="w1", root_want_id="w1",
             source={"type": "job", "job_run_id": "r1"})
    log("want_cancel", want_id="w1")
    assert log.state.wants["w1"].status == CANCELED
    assert log.state.wants["w2"].status == CANCELED
    assert log.state.partitions["b"].status == CANCELED  # never built, its work dropped
    assert not log.state.pending_refs and not log.state.waiters
    assert not log.state.is_wanted("a")


def test_canceling_only_the_derivative_want_keeps_the_upstream_wanted(log):
    log.want("w1", "b")
    log.queue("r1", "b", want_ids=["w1"])
    log("job_run_missing_deps", job_run_id="r1", missing_deps=["a"])
    log.want("w2", "a", parent_want_id="w1", root_want_id="w1")
    log("want_cancel", want_id="w2")
    assert log.state.wants["w1"].status == UPSTREAM_BUILDING
    assert "a" in log.state.pending_refs  # b still waits on it: nothing is stuck


def test_expire_and_sla(log):
    want = log.want("w1", "a", ttl_seconds=10, sla_seconds=5)
    log("want_sla_breach", want_id="w1")
    assert want.sla_breached
    log("want_expire", want_id="w1")
    assert want.status == EXPIRED
    assert not log.state.pending_refs


def test_job_run_cancel_marks_never_built_partitions_canceled(log):
    want = log.want("w1", "a")
    log.queue("r1", "a", want_ids=["w1"])
    log("job_run_start", job_run_id="r1")
    log("job_run_cancel", job_run_id="r1", reason="canceled by user")
    assert log.state.job_runs["r1"].status == CANCELED
    assert log.state.job_runs["r1"].error == "canceled by user"
    assert log.state.partitions["a"].status == CANCELED
    # Canceled is not settled: a want that still wants it builds it again.
    assert want.status == IDLE and "a" in log.state.pending_refs
    log.queue("r2", "a", want_ids=["w1"])
    log("job_run_success", job_run_id="r2")
    log("partition_taint", ref="a")
    log.want("w2", "a")
    log.queue("r3", "a", want_ids=["w2"])
    log("job_run_cancel", job_run_id="r3", reason="canceled by user")
    assert log.state.partitions["a"].status == UP_FOR_RETRY  # built before: not Canceled


def test_taint_makes_a_wanted_partition_pending(log):
    log.want("w1", "a")
    log.queue("r1", "a", want_ids=["w1"])
    log("job_run_success", job_run_id="r1")
    log("partition_taint", ref="a", reason="bad data")
    assert log.state.partitions["a"].status == TAINTED
    assert not log.state.pending_refs  # w1 is terminal: nothing wants it now
    want = log.want("w2", "a")
    assert want.status == IDLE and "a" in log.state.pending_refs


def test_dep_miss_on_a_failed_dep_asks_again(log):
    log.want("w0", "a")
    log.queue("r0", "a", want_ids=["w0"])
    log("job_run_failure", job_run_id="r0", retry=False)
    log.want("w1", "b")
    log.queue("r1", "b", want_ids=["w1"])
    log("job_run_missing_deps", job_run_id="r1", missing_deps=["a"])
    assert log.state.partitions["a"].status == UP_FOR_RETRY
    assert log.state.partitions["b"].status == UPSTREAM_BUILDING
    assert log.state.wants["w1"].status == UPSTREAM_BUILDING


def test_indexes_by_status(log):
    log.want("w1", "a")
    log.want("w2", "b")
    log.queue("r1", "a", want_ids=["w1"])
    log("job_run_success", job_run_id="r1")
    assert set(log.state.wants_by_status[SUCCESSFUL]) == {"w1"}
    assert set(log.state.wants_by_status[IDLE]) == {"w2"}
    assert set(log.state.partitions_by_status[LIVE]) == {"a"}
    assert set(log.state.job_runs_by_status[SUCCEEDED]) == {"r1"}


def test_replay_is_deterministic(log):
    log.want("w1", "b")
    log.queue("r1", "b", want_ids=["w1"])
    log("job_run_missing_deps", job_run_id="r1", missing_deps=["a"])
    log.want("w2", "a", parent_want_id="w1", root_want_id="w1")
    log.queue("r2", "a", want_ids=["w2"])
    log("job_run_success", job_run_id="r2")
    again = BuildState.from_events(log.events)
    assert again.latest_event_id == log.state.latest_event_id == len(log.events)
    for want_id, want in log.state.wants.items():
        assert again.wants[want_id].to_dict(again) == want.to_dict(log.state)
    for ref, part in log.state.partitions.items():
        assert again.partitions[ref].to_dict() == part.to_dict()
    assert again.pending_refs == log.state.pending_refs


def test_unknown_event_types_are_skipped(log):
    log("something_new", x=1)
    assert log.state.latest_event_id == 1
    assert not log.state.wants


def test_upstream_is_read_deps_plus_deps_reported_missing_since_the_last_success(log):
    log.want("w", "c")
    log.queue("r1", "c", want_ids=["w"])
    log("job_run_missing_deps", job_run_id="r1", missing_deps=["b"], exit_code=0)
    log.queue("r2", "c", want_ids=["w"])
    log("job_run_success", job_run_id="r2", exit_code=0, read_deps=["x", "c"])
    part = log.state.partitions["c"]
    assert part.upstream == ["b", "x"]  # its own ref is not its upstream
    assert part.reported_deps == [] and log.state.downstream == {"b": {"c"}, "x": {"c"}}
    assert part.to_dict()["upstream"] == ["b", "x"]
    # A rebuild that read something else replaces the edges.
    log("partition_taint", ref="c", reason=None)
    log.want("w2", "c")
    log.queue("r3", "c", want_ids=["w2"])
    log("job_run_success", job_run_id="r3", exit_code=0, read_deps=["y"])
    assert part.upstream == ["y"] and log.state.downstream == {"y": {"c"}}
    # The same events give the same lineage (replay).
    assert BuildState.from_events(log.events).downstream == {"y": {"c"}}


# -- backfills: a want settles only when all its partitions have --------------

def test_a_failed_partition_never_stops_its_siblings(log):
    refs = ["out/%d" % i for i in range(5)]
    want = log.want("w1", *refs)
    for i, ref in enumerate(refs):
        log.queue("r%d" % i, ref, want_ids=["w1"])
    log("job_run_failure", job_run_id="r0", error="boom", retry=False)
    assert want.status == BUILDING  # settled one, four still building
    log("job_run_failure", job_run_id="r1", error="boom", retry=True)
    assert log.state.partitions["out/1"].status == UP_FOR_RETRY
    assert "out/1" in log.state.pending_refs  # its retry is still wanted
    for i in (2, 3, 4):
        log("job_run_success", job_run_id="r%d" % i)
    assert want.status == IDLE  # out/1 waits for its retry
    log.queue("r1b", "out/1", want_ids=["w1"], attempt=2)
    log("job_run_success", job_run_id="r1b")
    assert want.status == FAILED
    assert want.to_dict(log.state)["counts"] == {"total": 5, LIVE: 4, FAILED: 1}


def test_an_upstream_failure_settles_one_partition_and_the_rest_go_on(log):
    want = log.want("w1", "out/1", "out/2")
    log.queue("r1", "out/1", want_ids=["w1"])
    log.queue("r2", "out/2", want_ids=["w1"])
    log("job_run_missing_deps", job_run_id="r1", missing_deps=["raw/1"])
    log("job_run_missing_deps", job_run_id="r2", missing_deps=["raw/2"])
    log.want("d1", "raw/1", parent_want_id="w1", root_want_id="w1",
             source={"type": "job", "job_run_id": "r1"})
    log.want("d2", "raw/2", parent_want_id="w1", root_want_id="w1",
             source={"type": "job", "job_run_id": "r2"})
    log.queue("q1", "raw/1", want_ids=["d1"])
    log.queue("q2", "raw/2", want_ids=["d2"])
    log("job_run_failure", job_run_id="q1", error="bad day", retry=False)
    assert log.state.partitions["out/1"].status == UPSTREAM_FAILED
    assert want.status == UPSTREAM_BUILDING  # out/2 waits on raw/2, still building
    log("job_run_success", job_run_id="q2")
    assert "out/2" in log.state.pending_refs  # not abandoned: rebuilt now
    log.queue("r2b", "out/2", want_ids=["w1"])
    log("job_run_success", job_run_id="r2b")
    assert want.status == UPSTREAM_FAILED
    assert want.to_dict(log.state)["counts"] == {"total": 2, LIVE: 1, UPSTREAM_FAILED: 1}


def test_cancel_and_expiry_still_end_an_unsettled_want_at_once(log):
    want = log.want("w1", "a", "b")
    log.queue("ra", "a", want_ids=["w1"])
    log("job_run_failure", job_run_id="ra", error="boom", retry=False)
    log("want_cancel", want_id="w1")
    assert want.status == CANCELED
    want2 = log.want("w2", "c", "d", ttl_seconds=5)
    log.queue("rc", "c", want_ids=["w2"])
    log("job_run_success", job_run_id="rc")
    log("want_expire", want_id="w2")
    assert want2.status == EXPIRED
    counts = want2.to_dict(log.state)["counts"]  # on finished wants too
    assert counts == {"total": 2, LIVE: 1, IDLE: 1}


def test_declared_deps_want_makes_the_partition_wait_without_a_run(log):
    want = log.want("w1", "out/1")
    log("want_create", want_id="d1", partitions=["raw/1"], parent_want_id="w1",
        root_want_id="w1", source={"type": "deps", "ref": "out/1"}, job_label="out")
    part = log.state.partitions["out/1"]
    assert part.status == UPSTREAM_BUILDING and part.last_job_run_id is None
    assert part.upstream == ["raw/1"]  # in lineage before anything is built
    assert log.state.downstream["raw/1"] == {"out/1"}
    assert "out/1" not in log.state.pending_refs and "raw/1" in log.state.pending_refs
    assert log.state.wants["d1"].chain == (("out/1",),)
    log.queue("q1", "raw/1", want_ids=["d1"])
    log("job_run_success", job_run_id="q1")
    assert part.status == UP_FOR_RETRY and "out/1" in log.state.pending_refs
    log("job_run_queue", job_run_id="r1", job_label="out", partitions=["out/1"],
        want_ids=["w1"], attempt=1, deps={"out/1": ["raw/1"]})
    log("job_run_success", job_run_id="r1", read_deps=["other"])
    assert part.status == LIVE and part.upstream == ["other", "raw/1"]
    assert want.status == SUCCESSFUL


def test_a_failed_declared_dep_makes_the_partition_upstream_failed(log):
    want = log.want("w1", "out/1", "out/2")
    for n in (1, 2):
        log("want_create", want_id="d%d" % n, partitions=["raw/%d" % n], parent_want_id="w1",
            root_want_id="w1", source={"type": "deps", "ref": "out/%d" % n}, job_label="out")
        log.queue("q%d" % n, "raw/%d" % n, want_ids=["d%d" % n])
    log("job_run_failure", job_run_id="q1", error="bad day", retry=False)
    assert log.state.partitions["out/1"].status == UPSTREAM_FAILED
    assert log.state.partitions["out/1"].last_job_run_id is None  # no run of its job
    assert want.status == UPSTREAM_BUILDING
    log("want_cancel", want_id="w1")
    assert log.state.partitions["out/2"].status == CANCELED
    assert want.to_dict(log.state)["counts"] == {"total": 2, UPSTREAM_FAILED: 1, CANCELED: 1}


# -- freshness (README "Freshness") -------------------------------------------

def _build(log, run_id, ref, reads=(), code=None, started=True):
    log.want("w-" + run_id, ref)
    log.queue(run_id, ref, want_ids=["w-" + run_id])
    if started:
        log("job_run_start", job_run_id=run_id, code_version=code)
    payload = {"job_run_id": run_id, "exit_code": 0}
    if reads:
        payload["read_deps"] = list(reads)
    log("job_run_success", **payload)
    return log.state.partitions[ref]


def test_a_rebuilt_upstream_makes_its_downstream_stale_down_the_chain(log):
    _build(log, "r1", "a")
    _build(log, "r2", "b", reads=["a"])
    c = _build(log, "r3", "c", reads=["b"])
    assert not log.state.stale and c.stale_reasons is None
    _build(log, "r4", "a")  # a rebuilt: b was built from the old a
    parts = log.state.partitions
    assert list(parts["b"].stale_reasons) == ["rebuilt:a"]
    assert parts["b"].stale_reasons["rebuilt:a"].startswith("upstream a rebuilt at 1970-")
    assert parts["c"].stale_reasons == {"upstream:b": "upstream b is stale"}
    assert list(log.state.stale) == ["b", "c"]
    assert parts["c"].to_dict()["stale"] is True
    # b rebuilt: fresh; c now stale because b was rebuilt after c's run started.
    _build(log, "r5", "b", reads=["a"])
    assert parts["b"].stale_reasons is None
    assert list(parts["c"].stale_reasons) == ["rebuilt:b"]
    _build(log, "r6", "c", reads=["b"])
    assert not log.state.stale
    assert parts["c"].to_dict()["stale_reasons"] == [] and not parts["c"].to_dict()["stale"]


def test_an_upstream_rebuilt_while_its_downstream_ran_is_caught(log):
    _build(log, "r1", "a")
    log.want("wb", "b")
    log.queue("rb", "b", want_ids=["wb"])
    log("job_run_start", job_run_id="rb")  # b's run starts, reading the old a...
    _build(log, "r2", "a")  # ...a is rebuilt meanwhile...
    log("job_run_success", job_run_id="rb", exit_code=0, read_deps=["a"])
    assert list(log.state.partitions["b"].stale_reasons) == ["rebuilt:a"]  # ...b is stale


def test_an_upstream_no_longer_live_and_a_changed_code_version(log):
    _build(log, "r1", "a", code="v1")
    b = _build(log, "r2", "b", reads=["a"], code="v1")
    log("partition_taint", ref="a")
    assert b.stale_reasons == {"upstream:a": "upstream a is Tainted"}
    log("job_code_version", job_label="job", code_version="v2", previous="v1")
    assert b.stale_reasons["code"] == "code version v1 -> v2"
    assert log.state.partitions["a"].stale_reasons is None  # not Live: never stale
    # The code back to what built b: only the upstream reason is left.
    log("job_code_version", job_label="job", code_version="v1", previous="v2")
    assert list(b.stale_reasons) == ["upstream:a"]


def test_a_want_for_a_stale_partition_rebuilds_it(log):
    _build(log, "r1", "a")
    _build(log, "r2", "b", reads=["a"])
    _build(log, "r3", "a")
    want = log.want("again", "b")
    assert log.state.partitions["b"].status == UP_FOR_RETRY and "b" in log.state.pending_refs
    assert want.status == IDLE and "b" not in log.state.stale


def test_stale_survives_a_projection_round_trip(tmp_path):
    import databuild
    log = Log()
    _build(log, "r1", "a")
    _build(log, "r2", "b", reads=["a"])
    _build(log, "r3", "a")
    store = databuild.EventLog(str(tmp_path / "events.db"))
    state = BuildState(working_set=True)
    for event in log.events:
        state.apply(event)
    store.append([(e.type, e.payload, e.timestamp) for e in log.events],
                 changes=state.take_changes(), summary=state.summary())
    restored = BuildState.restore(*store.load_projection(every_partition=True))
    assert list(restored.stale) == ["b"]
    assert restored.partitions["b"].stale_reasons == log.state.partitions["b"].stale_reasons
    with store.view() as view:
        page, total = view.partitions(None, None, 0, 10, stale=True)
    assert [p["ref"] for p in page] == ["b"] and total == 1
    store.close()
