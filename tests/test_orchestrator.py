"""The orchestrator with real job subprocesses, stepped by the test."""
import json
import os
import threading
import time

import pytest

import databuild
from conftest import built, run_count, set_plan, write_workspace
from databuild import (CANCELED, DEP_MISS, EXPIRED, FAILED, QUEUED, RUNNING,
                       SUCCEEDED, SUCCESSFUL, UPSTREAM_FAILED, Conflict, NotFound)


def runs_of(state, ref):
    return [r for r in state.job_runs.values() if ref in r.partitions]


def test_success_with_the_job_protocol(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", jobs=[{
        "label": "t", "partition_patterns": ["out/.*"], "environment": {"TEST_REGION": "eu"}}])
    d = driver_for(ws)
    want = d.want("out/a")
    assert want["status"] == "Building"  # queued in the step that created it
    assert d.settle(want["want_id"]) == SUCCESSFUL
    (run,) = d.full().job_runs.values()
    assert run.status == SUCCEEDED and run.exit_code == 0 and run.duration_ms is not None
    with open(os.path.join(ws, "built", "out%2Fa")) as f:
        record = json.load(f)
    assert record["argv"] == ["out/a"]
    assert os.path.realpath(record["cwd"]) == os.path.realpath(ws)
    assert record["stdin"] == "" and record["fds"] == [0, 1, 2, 3]  # nothing leaked in
    env = record["env"]
    assert env["TEST_REGION"] == "eu"
    assert env["DATABUILD_JOB_RUN_ID"] == run.job_run_id
    assert env["DATABUILD_JOB_LABEL"] == "t"
    assert env["DATABUILD_WORKSPACE"] == d.config.root
    assert env["DATABUILD_URL"] == "http://127.0.0.1:9"
    assert env["DATABUILD_PARTITIONS"] == "out/a"
    with open(os.path.join(ws, ".databuild", "logs", run.job_run_id, "stdout.log")) as f:
        assert f.read() == "built out/a\n"
    assert d.log.latest_event_id() == d.state.latest_event_id


def test_dep_miss_chain_builds_upstream_then_reruns(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", plan={
        "c": {"deps": ["b"]}, "b": {"deps": ["a"]}})
    d = driver_for(ws)
    want = d.want("c")
    assert d.settle(want["want_id"]) == SUCCESSFUL
    assert all(built(ws, r) for r in "abc")
    assert [run_count(ws, r) for r in "abc"] == [1, 2, 2]
    root = d.full().wants[want["want_id"]]
    (child_id,) = root.derivative_want_ids
    child = d.full().wants[child_id]
    assert child.partitions == ["b"] and child.parent_want_id == root.want_id
    assert child.root_want_id == root.want_id and child.source["type"] == "job"
    assert d.full().job_runs[child.source["job_run_id"]].status == DEP_MISS
    (grandchild_id,) = child.derivative_want_ids
    assert d.full().wants[grandchild_id].root_want_id == root.want_id
    assert d.full().partitions["c"].missing_deps == []  # cleared by the rebuild


def test_failure_is_retried_up_to_max_retries(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", jobs=[{"label": "t", "partition_patterns": [".*"],
                                                 "max_retries": 2}],
                         plan={"ok": {"fail_times": 2}, "bad": {"exit": 7}})
    d = driver_for(ws)
    ok = d.want("ok")
    assert d.settle(ok["want_id"]) == SUCCESSFUL
    assert [r.attempt for r in runs_of(d.full(), "ok")] == [1, 2, 3]
    assert [r.status for r in runs_of(d.full(), "ok")] == [FAILED, FAILED, SUCCEEDED]
    bad = d.want("bad")
    assert d.settle(bad["want_id"]) == FAILED
    runs = runs_of(d.full(), "bad")
    assert len(runs) == 3 and all(r.status == FAILED for r in runs)
    assert runs[-1].exit_code == 7
    assert runs[-1].error == "exit code 7: planned exit 7 for bad"
    assert d.full().partitions["bad"].status == FAILED


@pytest.mark.parametrize("posix_spawn", [False, True])
def test_without_pidfds_a_waiter_thread_reports_each_exit(tmp_path, driver_for, monkeypatch,
                                                         posix_spawn):
    # Where os.pidfd_open is missing (older kernels), each process gets a
    # waiter thread that wakes the orchestrator; both ways of spawning.
    ws = write_workspace(tmp_path / "ws", plan={"c": {"deps": ["b"]}, "b": {"exit": 3}})
    if posix_spawn:
        monkeypatch.chdir(ws)
    d = driver_for(ws)
    launcher = d.orch._executor("local")
    launcher._use_pidfd = False
    assert launcher._posix_spawn == posix_spawn
    want = d.want("c", "ok")
    assert d.settle(want["want_id"]) == UPSTREAM_FAILED
    runs = d.full().job_runs.values()
    assert sorted((r.partitions[0], r.status, r.exit_code) for r in runs) == [
        ("b", FAILED, 3), ("c", DEP_MISS, 0), ("ok", SUCCEEDED, 0)]


def test_timeout_kills_the_process_group(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", jobs=[{"label": "t", "partition_patterns": [".*"],
                                                 "timeout_seconds": 0.3}],
                         plan={"slow": {"sleep": 30}})
    d = driver_for(ws)
    started = time.monotonic()
    want = d.want("slow")
    assert d.settle(want["want_id"]) == FAILED
    assert time.monotonic() - started < 10
    (run,) = d.full().job_runs.values()
    assert run.error == "timeout" and run.status == FAILED
    assert not built(ws, "slow")


def test_dependency_cycle_fails_the_run(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", plan={"a": {"deps": ["b"]}, "b": {"deps": ["a"]},
                                                "self": {"deps": ["self"]}})
    d = driver_for(ws)
    want = d.want("a")
    assert d.settle(want["want_id"]) == UPSTREAM_FAILED
    failed = [r for r in d.full().job_runs.values() if r.status == FAILED]
    assert [r.error for r in failed] == ["dependency cycle: a -> b -> a"]
    me = d.want("self")
    assert d.settle(me["want_id"]) == FAILED
    assert runs_of(d.full(), "self")[-1].error == "dependency cycle: self -> self"


def test_missing_dep_no_job_produces_fails_the_run(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", jobs=[{"label": "t", "partition_patterns": ["x/.*"]}],
                         plan={"x/a": {"deps": ["nobody/builds/this"]}})
    d = driver_for(ws)
    want = d.want("x/a")
    assert d.settle(want["want_id"]) == FAILED
    (run,) = d.full().job_runs.values()
    assert "nobody/builds/this" in run.error


def test_cancel_want_stops_its_running_job(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", plan={"slow": {"sleep": 30}})
    d = driver_for(ws)
    want = d.want("slow")
    d.until(lambda s: s.job_runs_by_status[RUNNING])
    started = time.monotonic()
    canceled = d.command("cancel_want", want_id=want["want_id"])
    assert canceled["status"] == CANCELED
    d.until(lambda s: not s.job_runs_by_status[RUNNING])
    assert time.monotonic() - started < 10
    (run,) = d.full().job_runs.values()
    assert run.status == CANCELED and run.error == "want canceled"
    with pytest.raises(Conflict):
        d.command("cancel_want", want_id=want["want_id"])
    with pytest.raises(NotFound):
        d.command("cancel_want", want_id="nope")


def test_cancel_keeps_runs_another_want_needs(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", plan={"slow": {"sleep": 0.5}})
    d = driver_for(ws)
    first = d.want("slow")
    second = d.want("slow")
    d.command("cancel_want", want_id=first["want_id"])
    assert d.settle(second["want_id"]) == SUCCESSFUL
    assert len(d.full().job_runs) == 1


def test_cancel_drops_queued_runs(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", server={"max_concurrent_job_runs": 1},
                         plan={"a": {"sleep": 30}})
    d = driver_for(ws)
    d.want("a")
    want = d.want("b")
    (queued,) = d.state.job_runs_by_status[QUEUED]
    d.command("cancel_want", want_id=want["want_id"])
    assert d.full().job_runs[queued].status == CANCELED
    assert d.full().job_runs[queued].error == "want canceled"
    assert run_count(ws, "b") == 0


def test_concurrency_limit(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", server={"max_concurrent_job_runs": 2},
                         plan={r: {"sleep": 0.2} for r in "abcde"})
    d = driver_for(ws)
    want = d.want(*"abcde")
    most = 0

    def check(state):
        nonlocal most
        most = max(most, len(state.job_runs_by_status[RUNNING]))
        return d.want_status(want["want_id"]) == SUCCESSFUL
    d.until(check)
    assert most == 2


def test_batching_up_to_max_partitions_per_run(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", jobs=[{"label": "t", "partition_patterns": [".*"],
                                                 "max_partitions_per_run": 3}])
    d = driver_for(ws)
    want = d.want(*"abcdefg")
    assert d.settle(want["want_id"]) == SUCCESSFUL
    sizes = sorted(len(r.partitions) for r in d.full().job_runs.values())
    assert sizes == [1, 3, 3]


def test_shared_build_one_run_for_many_wants(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", plan={"a": {"sleep": 0.3}})
    d = driver_for(ws)
    wants = [d.want("a") for _ in range(3)]
    for w in wants:
        assert d.settle(w["want_id"]) == SUCCESSFUL
    (run,) = d.full().job_runs.values()
    assert run.want_ids == [w["want_id"] for w in wants]
    assert run_count(ws, "a") == 1


def test_never_two_runs_for_one_partition(tmp_path, driver_for):
    # b and c both need a: a is built once, by one run.
    ws = write_workspace(tmp_path / "ws", plan={"b": {"deps": ["a"]}, "c": {"deps": ["a"]},
                                                "a": {"sleep": 0.2}})
    d = driver_for(ws)
    want = d.want("b", "c")
    assert d.settle(want["want_id"]) == SUCCESSFUL
    assert run_count(ws, "a") == 1


def test_ttl_expires_a_want_and_drops_its_work(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", server={"max_concurrent_job_runs": 1},
                         plan={"a": {"sleep": 30}})
    d = driver_for(ws)
    want = d.want("a", ttl_seconds=1, data_timestamp=time.time() - 0.7)  # expires in 0.3 s
    assert d.settle(want["want_id"]) == EXPIRED
    d.until(lambda s: not s.job_runs_by_status[RUNNING])
    (run,) = d.full().job_runs.values()
    assert run.status == CANCELED and run.error == "want expired"


def test_sla_breach_is_recorded(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", plan={"a": {"sleep": 1}, "b": {}})
    d = driver_for(ws)
    late = d.want("a", sla_seconds=1, data_timestamp=time.time() - 0.8)
    fine = d.want("b", sla_seconds=5)
    d.until(lambda s: d.orch.find_want(late["want_id"]).sla_breached)
    assert d.settle(late["want_id"]) == SUCCESSFUL
    assert d.settle(fine["want_id"]) == SUCCESSFUL
    assert not d.full().wants[fine["want_id"]].sla_breached


def test_want_id_idempotency(tmp_path, driver_for):
    d = driver_for(write_workspace(tmp_path / "ws"))
    created, first = d.command("create_want", request={"partitions": ["a"], "want_id": "w-1"})
    again, second = d.command("create_want", request={"partitions": ["a"], "want_id": "w-1"})
    assert created and not again and first["want_id"] == second["want_id"] == "w-1"
    events = d.log.latest_event_id()
    with pytest.raises(Conflict):
        d.command("create_want", request={"partitions": ["b"], "want_id": "w-1"})
    assert d.log.latest_event_id() == events  # a refused request leaves no trace


def test_taint_rebuilds_when_wanted(tmp_path, driver_for):
    d = driver_for(write_workspace(tmp_path / "ws"))
    want = d.want("a")
    d.settle(want["want_id"])
    answer = d.command("taint", ref="a", reason="bad rows")
    assert answer["partition"]["status"] == "Tainted" and answer["tainted"] == ["a"]
    again = d.want("a")
    assert d.settle(again["want_id"]) == SUCCESSFUL
    assert run_count(d.path, "a") == 2
    with pytest.raises(NotFound):
        d.command("taint", ref="never-built")


def test_cancel_a_running_job_run(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", plan={"a": {"sleep": 30}})
    d = driver_for(ws)
    d.want("a")
    d.until(lambda s: s.job_runs_by_status[RUNNING])
    (run_id,) = d.state.job_runs_by_status[RUNNING]
    cmd = d.orch.enqueue("cancel_job_run", job_run_id=run_id)
    d.until(lambda s: cmd.done.is_set())
    assert cmd.result["status"] == CANCELED
    with pytest.raises(Conflict):
        d.command("cancel_job_run", job_run_id=run_id)


def test_restart_fails_leftover_runs_and_goes_on(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", server={"max_concurrent_job_runs": 1},
                         plan={"a": {"sleep": 0.2}})
    d = driver_for(ws)
    want = d.want("a", "b")
    d.until(lambda s: s.job_runs_by_status[RUNNING])
    # A crash: the orchestrator is gone without recording anything more.
    for proc in d.orch._running.values():
        proc.kill()
    d.orch._running.clear()
    again = databuild.Orchestrator(d.config, d.log)
    stale = [r for r in databuild.BuildState.from_events(d.log.iter_events()).job_runs.values()
             if r.status == FAILED]
    assert {r.error for r in stale} == {"server restarted"}
    d.orch = again
    assert d.settle(want["want_id"]) == SUCCESSFUL


def test_step_cost_does_not_walk_finished_work(tmp_path, driver_for):
    d = driver_for(write_workspace(tmp_path / "ws"))
    want = d.want(*["p%d" % i for i in range(20)])
    d.settle(want["want_id"])
    assert not d.state.pending_refs and not d.state.active_run_by_ref
    assert not d.state.job_runs_by_status[QUEUED] and not d.state.live_wants_by_ref
    # Finished work is out of memory: it lives on in the projection only.
    assert not d.state.wants and not d.state.job_runs
    assert len(d.state.wants_by_status["Successful"]) == 1
    assert d.orch.find_want(want["want_id"]).status == "Successful"


def test_a_job_that_cannot_start_fails_its_run(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", jobs=[{"label": "t", "partition_patterns": [".*"],
                                                 "entrypoint": ["/no/such/program"]}])
    d = driver_for(ws)
    want = d.want("a")
    assert d.settle(want["want_id"]) == FAILED
    (run,) = d.full().job_runs.values()
    assert run.status == FAILED and run.error.startswith("cannot start job:")


# -- a failed commit leaves the state as the log is --------

class _FailingCommits:
    """Makes the next ``n`` commits of an event log fail inside the transaction."""

    def __init__(self, monkeypatch, log, n=1, error=None):
        self.n = n
        real = log._write_projection

        def write(conn, changes, summary):
            if self.n > 0:
                self.n -= 1
                raise error or databuild.sqlite3.OperationalError("injected failure")
            return real(conn, changes, summary)
        monkeypatch.setattr(log, "_write_projection", write)


def _failed_want(d, *refs, **fields):
    """Create a want in a step whose commit fails: the step raises, the command gets 503."""
    cmd = d.orch.enqueue("create_want", request=dict(partitions=list(refs), **fields))
    with pytest.raises(databuild.StorageError):
        d.orch.step()
    assert cmd.done.is_set() and isinstance(cmd.error, databuild.Unavailable)
    return cmd.error


def _same_as_replay(d):
    full = d.full()
    for want_id, want in d.state.wants.items():
        assert full.wants[want_id].status == want.status
    for run_id, run in d.state.job_runs.items():
        assert full.job_runs[run_id].status == run.status
    assert {r: p.status for r, p in full.partitions.items()} == \
        {r: d.state.partitions[r].status for r in full.partitions}
    assert d.state.latest_event_id == full.latest_event_id == d.log.latest_event_id()


@pytest.mark.parametrize("error", [None, UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogate"),
                                   RuntimeError("a bug")])
def test_a_failed_commit_answers_503_writes_nothing_and_the_next_write_works(
        workspace, driver_for, monkeypatch, error):
    d = driver_for(workspace)
    d.want("first")
    before = d.log.latest_event_id()
    _FailingCommits(monkeypatch, d.log, error=error)
    _failed_want(d, "second", want_id="second")
    assert d.log.latest_event_id() == before  # nothing of it in the log
    assert d.orch.find_want("second") is None
    _same_as_replay(d)
    # The same request again is a new, clean write, and work goes on.
    want = d.want("second", want_id="second")
    assert want["status"] == "Building"
    assert d.settle("second") == SUCCESSFUL
    _same_as_replay(d)
    ids = [e.event_id for e in d.log.iter_events()]
    assert ids == list(range(1, len(ids) + 1))


def test_outcomes_of_a_step_whose_commit_failed_are_recorded_later(
        workspace, driver_for, monkeypatch, caplog):
    d = driver_for(workspace)
    want = d.want("a")
    (run_id,) = want["job_run_ids"]
    d.until(lambda s: s.job_runs[run_id].status == RUNNING)
    failing = _FailingCommits(monkeypatch, d.log, n=0)
    # Fail the commit of the step that reaps the exit (and of one more).
    while not d.orch._exited:
        d.orch.wait(0.05)
    failing.n = 2
    for _ in range(2):
        with pytest.raises(databuild.StorageError):
            d.orch.step()
        assert d.orch.find_job_run(run_id).status == RUNNING  # as in the log
    assert d.settle(want["want_id"]) == SUCCESSFUL
    assert run_count(workspace, "a") == 1  # recorded once, not run again
    assert "KeyError" not in caplog.text
    _same_as_replay(d)


def test_a_run_started_in_a_failed_step_is_stopped_and_started_again(
        tmp_path, driver_for, monkeypatch):
    ws = write_workspace(tmp_path / "ws", plan={"a": {"sleep": 30}})
    d = driver_for(ws)
    _FailingCommits(monkeypatch, d.log)
    _failed_want(d, "a", want_id="w")  # queued and started in the same step
    assert not d.orch._running  # the process the log never heard of is killed
    (abandoned,) = d.orch._executors["local"]._pidfds.values()
    assert abandoned.abandoned
    deadline = time.monotonic() + 10
    while d.orch._executors["local"]._pidfds:  # it exits at once (SIGKILL), and is not recorded
        assert time.monotonic() < deadline
        d.orch.wait(0.1)
        d.orch.step()
    assert d.log.latest_event_id() == 0
    set_plan(ws, {})
    d.orch._no_starts_until = 0  # no need to wait out the pause in a test
    want = d.want("a", want_id="w")
    assert d.settle(want["want_id"], timeout=20) == SUCCESSFUL
    full = d.full()
    assert [r.status for r in full.job_runs.values()] == [SUCCEEDED]


def test_disk_full_says_so_writes_nothing_and_recovers_once_space_is_freed(
        workspace, driver_for, caplog):
    d = driver_for(workspace)
    d.want("a")
    conn = d.log._conn()  # the orchestrator's thread is this one
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute("PRAGMA max_page_count = %d" % (pages + 1))
    before = d.log.latest_event_id()
    for i in range(50):
        cmd = d.orch.enqueue("create_want", request={"partitions": ["b%d" % i],
                                                     "comment": "x" * 4000})
        try:
            d.orch.step()
        except databuild.StorageError:
            break
    error = cmd.error
    assert "Disk full" in error.message and error.fields["reason"] == "disk full"
    assert "no transaction is active" not in caplog.text and "KeyError" not in caplog.text
    assert d.log.latest_event_id() == before + i * 3  # the earlier wants only, whole
    d.orch._no_starts_until = 0  # no need to wait out the pause in a test
    conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    want = d.want("c")
    assert d.settle(want["want_id"]) == SUCCESSFUL
    _same_as_replay(d)


# -- lineage (README "Lineage") ---------------------------------------------------------

def _chain(tmp_path, driver_for):
    # c needs b (reported missing), b read a (said so), d read c.
    ws = write_workspace(tmp_path / "ws", plan={
        "c": {"deps": ["b"]}, "b": {"reads": ["a"]}, "d": {"reads": ["c"]}})
    d = driver_for(ws)
    for ref in ("a", "c", "d"):  # c's run reports b missing: b is built, then c again
        assert d.settle(d.want(ref)["want_id"]) == SUCCESSFUL
    return ws, d


def test_upstream_is_what_was_read_and_what_was_reported_missing(tmp_path, driver_for):
    ws, d = _chain(tmp_path, driver_for)
    parts = d.full().partitions
    assert parts["a"].upstream == [] and parts["b"].upstream == ["a"]
    assert parts["c"].upstream == ["b"] and parts["d"].upstream == ["c"]
    # The working set answers from the projection's upstream rows, as a full
    # replay from its index.
    assert [d.state.downstream_of(r) for r in "abcd"] == [["b"], ["c"], ["d"], []]
    assert [d.full().downstream_of(r) for r in "abcd"] == [["b"], ["c"], ["d"], []]
    restored = databuild.BuildState.restore(*d.log.load_projection(every_partition=True))
    assert restored.downstream == {"a": {"b"}, "b": {"c"}, "c": {"d"}}


def test_taint_downstream_in_one_commit_in_dependency_order(tmp_path, driver_for):
    ws, d = _chain(tmp_path, driver_for)
    before = d.log.latest_event_id()
    dry = d.command("taint", ref="a", reason="bad", downstream=True, dry_run=True)
    assert dry["tainted"] == ["a", "b", "c", "d"] and dry["dry_run"]
    assert d.log.latest_event_id() == before  # a dry run leaves no trace
    answer = d.command("taint", ref="a", reason="bad rows", downstream=True)
    assert answer["tainted"] == ["a", "b", "c", "d"]
    events = list(d.log.iter_events(since=before))
    assert [(e.type, e.payload["ref"]) for e in events] == [
        ("partition_taint", r) for r in "abcd"]
    assert {e.payload["reason"] for e in events} == {"bad rows"}
    assert [e.payload.get("upstream_of") for e in events] == [None, "a", "a", "a"]
    assert {d.state.partitions[r].status for r in "abcd"} == {"Tainted"}


def test_a_wanted_tainted_partition_is_rebuilt_after_its_upstream(tmp_path, driver_for):
    ws, d = _chain(tmp_path, driver_for)
    d.command("taint", ref="a", downstream=True)
    before = d.log.latest_event_id()
    want = d.want("d")  # only d is wanted: a, b, c are rebuilt first, in order
    assert d.settle(want["want_id"]) == SUCCESSFUL
    built = [d.full().job_runs[e.payload["job_run_id"]].partitions[0]
             for e in d.log.iter_events(since=before) if e.type == "job_run_success"]
    assert built == ["a", "b", "c", "d"]
    assert [run_count(ws, r) for r in "abcd"] == [2, 2, 3, 2]
    lineage_wants = [w for w in d.full().wants.values() if w.source.get("type") == "lineage"]
    assert lineage_wants and all(w.root_want_id == want["want_id"] for w in lineage_wants)


# -- scheduling policy: priority, per-job pools, retry backoff (README "Scheduling policy") -------

def _started_order(d, since):
    return [d.full().job_runs[e.payload["job_run_id"]].partitions[0]
            for e in d.log.iter_events(since=since) if e.type == "job_run_start"]


def test_queued_runs_start_by_priority_then_oldest(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", server={"max_concurrent_job_runs": 1},
                         plan={"block": {"sleep": 30}})
    d = driver_for(ws)
    d.want("block")  # takes the only slot
    before = d.log.latest_event_id()
    for ref, priority in (("low1", 0), ("low2", 0), ("high", 5), ("mid", 2), ("high2", 5)):
        d.want(ref, priority=priority)
    assert d.state.job_runs_by_status["Queued"].__len__() == 5
    (block_run,) = d.state.job_runs_by_status["Running"]
    d.orch._running[block_run].stop("test", time.time(), 0)
    d.until(lambda s: len(_started_order(d, before)) >= 5, timeout=30)
    # (block, stopped, goes back to the queue as a new run of priority 0, last)
    assert _started_order(d, before)[:5] == ["high", "high2", "mid", "low1", "low2"]


def test_a_higher_priority_want_lifts_the_run_it_joins_and_derivatives_inherit(
        tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", server={"max_concurrent_job_runs": 1},
                         plan={"block": {"sleep": 30}, "top": {"deps": ["dep"]}})
    d = driver_for(ws)
    block = d.want("block")
    before = d.log.latest_event_id()
    d.want("first")
    d.want("second")
    d.want("second", priority=9)  # joins second's queued run and lifts it
    (block_run,) = d.state.job_runs_by_status["Running"]
    d.orch._running[block_run].stop("test", time.time(), 0)
    d.until(lambda s: len(_started_order(d, before)) >= 2, timeout=30)
    assert _started_order(d, before)[:2] == ["second", "first"]
    d.command("cancel_want", want_id=block["want_id"])  # frees the slot for what follows
    want = d.want("top", priority=3)
    assert d.settle(want["want_id"]) == SUCCESSFUL
    (child_id,) = d.full().wants[want["want_id"]].derivative_want_ids
    assert d.full().wants[child_id].priority == 3
    assert d.orch.find_want(want["want_id"]).to_dict(d.state)["priority"] == 3


def test_max_concurrent_runs_caps_one_job(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", jobs=[
        {"label": "x", "partition_patterns": ["x/.*"], "max_concurrent_runs": 1},
        {"label": "y", "partition_patterns": ["y/.*"]}],
        plan={r: {"sleep": 30} for r in ("x/1", "x/2", "y/1", "y/2")})
    d = driver_for(ws)
    for ref in ("x/1", "x/2", "y/1", "y/2"):
        d.want(ref)
    running = [d.state.job_runs[r].partitions[0] for r in d.state.job_runs_by_status["Running"]]
    assert sorted(running) == ["x/1", "y/1", "y/2"]  # x waits although slots are free
    (queued,) = d.state.job_runs_by_status["Queued"]
    assert d.state.job_runs[queued].partitions == ["x/2"]


def test_retry_backoff_doubles_with_an_injected_clock_and_survives_a_restart(
        tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", jobs=[
        {"label": "t", "partition_patterns": [".*"], "max_retries": 3,
         "retry_backoff_seconds": 10, "retry_backoff_max_seconds": 15}],
        plan={"a": {"fail_times": 3}})
    d = driver_for(ws)
    t0 = 1e9
    cmd = d.orch.enqueue("create_want", request={"partitions": ["a"]})
    d.orch.step(t0)
    want_id = cmd.result[1]["want_id"]

    def fail_at(now):
        # Step at ``now`` until the running attempt has ended (its failure at now).
        nonlocal d
        deadline = time.monotonic() + 15
        while d.state.job_runs_by_status["Running"]:
            assert time.monotonic() < deadline
            d.orch.wait(0.05)
            d.orch.step(now)
        part = d.state.partitions["a"]
        assert part.status == "UpForRetry"
        return part.retry_at - now

    first = fail_at(t0)
    assert 10 <= first <= 11  # 10 s, plus up to 10 % jitter
    d.orch.step(t0 + 9.9)
    assert not d.state.job_runs_by_status["Queued"] and not d.state.job_runs_by_status["Running"]
    assert d.state.partitions["a"].to_dict()["retry_at"] is not None
    assert 0 < d.orch._sleep_seconds(t0 + 9.9) <= first - 9.9 + 1e-6  # the heap wakes it
    d.orch.step(t0 + first)
    assert d.state.job_runs_by_status["Running"] or d.state.job_runs_by_status["Queued"]
    second = fail_at(t0 + 20)
    assert 15 <= second <= 16.5  # 20 s, capped at 15, plus jitter
    # A restart keeps the pending retry's time: it is in the log.
    retry_at = d.state.partitions["a"].retry_at
    d.close()
    again = driver_for(ws)
    assert again.state.partitions["a"].retry_at == retry_at
    t2 = t0 + 20 + second
    again.orch.step(t2 - 1)
    assert not again.state.job_runs_by_status["Running"]
    again.orch.step(t2 + 0.01)  # the third attempt starts (and fails) ...
    d = again
    third = fail_at(t2 + 0.01)
    assert 15 <= third <= 16.5
    again.orch.step(t2 + 0.01 + third)  # ... the fourth succeeds
    assert again.settle(want_id, timeout=20) == SUCCESSFUL
    assert run_count(ws, "a") == 4


# -- schedules (README "Schedules"), with an explicit clock -------------------------------

def _hourly(tmp_path, catch_up=2):
    ws = write_workspace(tmp_path / "ws")
    with open(os.path.join(ws, "databuild.toml"), "a") as f:
        f.write('\n[[schedules]]\nname = "hourly"\ncron = "0 * * * *"\n'
                'partitions = ["agg/{data_time:%%Y%%m%%d-%%H}"]\nlag_seconds = 3600\n'
                'catch_up = %d\npriority = 4\n' % catch_up)
    return ws


class _Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def _schedule_wants(d):
    return sorted((w.want_id, w.data_timestamp, w.source["type"], w.priority)
                  for w in d.full().wants.values() if w.source["type"] == "schedule")


def test_a_tick_makes_one_want_with_its_id_and_data_time(tmp_path, driver_for):
    ws = _hourly(tmp_path)
    clock = _Clock(1767225600.0 + 600)  # 2026-01-01T00:10:00Z
    d = driver_for(ws, clock)
    d.orch.step(clock.now)
    assert _schedule_wants(d) == []  # a new schedule starts from now: no past tick
    assert d.orch._sleep_seconds(clock.now) <= 3000
    clock.now = 1767225600.0 + 3600  # 01:00Z
    d.orch.step(clock.now)
    ((want_id, data_time, source, priority),) = _schedule_wants(d)
    assert want_id == "schedule:hourly:2026-01-01T01:00:00Z"
    assert data_time == 1767225600.0 and priority == 4  # tick - lag
    assert d.full().wants[want_id].partitions == ["agg/20260101-00"]
    d.orch.step(clock.now + 30)
    assert len(_schedule_wants(d)) == 1  # not twice


def test_catch_up_after_a_four_hour_gap_and_no_tick_twice_across_restarts(
        tmp_path, driver_for):
    ws = _hourly(tmp_path, catch_up=2)
    clock = _Clock(1767225600.0 + 3600 + 5)  # just after 01:00Z
    d = driver_for(ws, clock)
    clock.now = 1767225600.0 + 7200  # 02:00Z
    d.orch.step(clock.now)
    assert [w[0][-20:] for w in _schedule_wants(d)] == ["2026-01-01T02:00:00Z"]
    d.close()
    # Down four hours: 03:00, 04:00, 05:00 and 06:00 were missed; catch_up = 2
    # makes the newest two, oldest first (newest last).
    clock.now = 1767225600.0 + 6 * 3600 + 120
    again = driver_for(ws, clock)
    before = again.log.latest_event_id()
    again.orch.step(clock.now)
    made = [e.payload["want_id"] for e in again.log.iter_events(since=before)
            if e.type == "want_create" and e.payload["source"]["type"] == "schedule"]
    assert made == ["schedule:hourly:2026-01-01T05:00:00Z", "schedule:hourly:2026-01-01T06:00:00Z"]
    # A restart at the same time, or a clock that jumps back, makes nothing again.
    again.close()
    third = driver_for(ws, clock)
    third.orch.step(clock.now)
    clock.now -= 3 * 3600
    third.orch.step(clock.now)
    assert len(_schedule_wants(third)) == 3


def test_canceling_the_want_during_a_backoff_cancels_the_retry(tmp_path, driver_for):
    ws = write_workspace(tmp_path / "ws", jobs=[
        {"label": "t", "partition_patterns": [".*"], "max_retries": 2,
         "retry_backoff_seconds": 60}], plan={"a": {"exit": 1}})
    d = driver_for(ws)
    t0 = 2e9
    cmd = d.orch.enqueue("create_want", request={"partitions": ["a"]})
    d.orch.step(t0)
    want_id = cmd.result[1]["want_id"]
    deadline = time.monotonic() + 15
    while d.state.partitions["a"].status != "UpForRetry":
        assert time.monotonic() < deadline
        d.orch.wait(0.05)
        d.orch.step(t0)
    cancel = d.orch.enqueue("cancel_want", want_id=want_id)
    d.orch.step(t0 + 1)
    assert cancel.result["status"] == "Canceled"
    d.orch.step(t0 + 120)  # past retry_at: nothing wants it any more
    assert not d.state.job_runs_by_status["Queued"] and not d.state.job_runs_by_status["Running"]
    assert run_count(ws, "a") == 1


def test_a_config_reload_between_ticks_keeps_the_next_tick(tmp_path, driver_for):
    ws = _hourly(tmp_path)
    clock = _Clock(1767225600.0 + 600)  # 00:10Z: the next tick is 01:00Z
    d = driver_for(ws, clock)
    d.orch.step(clock.now)
    with open(os.path.join(ws, "databuild.toml"), "a") as f:
        f.write("\n")  # any edit: the config is reloaded, the schedules planned again
    d.orch.watcher = databuild.ConfigWatcher(d.config)
    d.orch.watcher._stamp = None
    clock.now += 60
    d.orch.step(clock.now)
    assert d.orch.config is not d.config  # reloaded
    clock.now = 1767225600.0 + 3600
    d.orch.step(clock.now)
    assert [w[0] for w in _schedule_wants(d)] == ["schedule:hourly:2026-01-01T01:00:00Z"]


# -- backfills (README "Backfills") --------------------------------------------

TWO_STAGES = [{"label": "raw", "partition_patterns": [r"raw/date=(?P<date>[0-9-]+)"]},
              {"label": "out", "partition_patterns": [r"out/date=(?P<date>[0-9-]+)"]}]


def days(n):
    return ["2025-01-%02d" % d for d in range(1, n + 1)]


def test_a_backfill_with_bad_days_still_builds_every_good_day(tmp_path, driver_for):
    # Dep misses: out reports raw missing; raw fails for two days.
    plan = {"out/date=%s" % d: {"deps": ["raw/date=%s" % d]} for d in days(12)}
    plan.update({"raw/date=2025-01-03": {"exit": 1}, "raw/date=2025-01-07": {"exit": 1}})
    ws = write_workspace(tmp_path / "ws", jobs=TWO_STAGES, plan=plan)
    d = driver_for(ws)
    want = d.want("out/date=[2025-01-01..2025-01-12]")
    assert len(want["partitions"]) == 12
    assert d.settle(want["want_id"], timeout=60) == UPSTREAM_FAILED
    final = d.orch.find_want(want["want_id"]).to_dict(d.full())
    assert final["counts"] == {"total": 12, "Live": 10, "UpstreamFailed": 2}
    for day in days(12):
        bad = day in ("2025-01-03", "2025-01-07")
        assert built(ws, "out/date=" + day) is not bad
    assert not d.state.pending_refs and not d.state.job_runs  # nothing left behind


def test_declared_deps_run_each_partition_once(tmp_path, driver_for):
    jobs = [TWO_STAGES[0], dict(TWO_STAGES[1], deps=["raw/date={date}"])]
    plan = {"raw/date=2025-01-02": {"exit": 1}}
    ws = write_workspace(tmp_path / "ws", jobs=jobs, plan=plan)
    d = driver_for(ws)
    want = d.want("out/date=[2025-01-01..2025-01-04]")
    # Before anything is built: waiting on the declared deps, in lineage.
    part = d.state.partitions["out/date=2025-01-01"]
    assert part.status == databuild.UPSTREAM_BUILDING and part.upstream == ["raw/date=2025-01-01"]
    assert d.settle(want["want_id"], timeout=30) == UPSTREAM_FAILED
    full = d.full()
    for day in days(4):
        runs = runs_of(full, "out/date=" + day)
        if day == "2025-01-02":
            assert runs == [] and run_count(ws, "out/date=" + day) == 0  # no run at all
            assert full.partitions["out/date=" + day].status == UPSTREAM_FAILED
        else:
            assert [r.status for r in runs] == [SUCCEEDED]  # once, never a DepMiss
            assert full.partitions["out/date=" + day].upstream == ["raw/date=" + day]
    deps_wants = [w for w in full.wants.values() if w.source["type"] == "deps"]
    assert len(deps_wants) == 4
    assert {w.source["ref"] for w in deps_wants} == {"out/date=" + day for day in days(4)}
    assert all(w.root_want_id == want["want_id"] for w in deps_wants)


def test_declared_dep_cycle_and_unbuildable_dep_fail_the_partition(tmp_path, driver_for):
    jobs = [{"label": "a", "partition_patterns": [r"a/(?P<n>\d+)"], "deps": ["b/{n}"]},
            {"label": "b", "partition_patterns": [r"b/(?P<n>\d+)"], "deps": ["a/{n}"]}]
    ws = write_workspace(tmp_path / "ws", jobs=jobs)
    d = driver_for(ws)
    want = d.want("a/1")
    assert d.settle(want["want_id"]) == UPSTREAM_FAILED
    errors = [r.error for r in d.full().job_runs.values()]
    assert errors == ["dependency cycle: a/1 -> b/1 -> a/1"]


def test_a_restart_in_the_middle_of_a_backfill_goes_on(tmp_path, driver_for):
    jobs = [TWO_STAGES[0], dict(TWO_STAGES[1], deps=["raw/date={date}"])]
    plan = {"raw/date=%s" % day: {"sleep": 0.3} for day in days(6)}
    plan["raw/date=2025-01-05"] = {"exit": 1}
    ws = write_workspace(tmp_path / "ws", jobs=jobs, plan=plan, server={
        "max_concurrent_job_runs": 2})
    d = driver_for(ws)
    want = d.want("out/date=[2025-01-01..2025-01-06]")
    d.until(lambda s: s.partitions.get("out/date=2025-01-01") is not None
            and s.partitions["raw/date=2025-01-01"].status == databuild.LIVE)
    d.close()  # as a crash would: runs left Running, the want unsettled
    d2 = driver_for(ws)
    assert d2.want_status(want["want_id"]) not in databuild.TERMINAL_WANT_STATUSES
    assert d2.settle(want["want_id"], timeout=60) == UPSTREAM_FAILED
    counts = d2.orch.find_want(want["want_id"]).to_dict(d2.full())["counts"]
    assert counts == {"total": 6, "Live": 5, "UpstreamFailed": 1}


def test_plan_lists_the_runs_a_want_would_start_and_writes_nothing(tmp_path, driver_for):
    jobs = [TWO_STAGES[0], dict(TWO_STAGES[1], deps=["raw/date={date}"])]
    ws = write_workspace(tmp_path / "ws", jobs=jobs)
    d = driver_for(ws)
    done = d.want("raw/date=2025-01-01")
    d.settle(done["want_id"])
    head = d.log.latest_event_id()
    plan = d.command("plan_want", request={"partitions": ["out/date=2025-01-01",
                                                           "out/date=2025-01-02"]})
    assert d.log.latest_event_id() == head  # nothing written
    actions = {e["ref"]: (e["job_label"], e["action"], e["deps"]) for e in plan["plan"]}
    assert actions == {
        "out/date=2025-01-01": ("out", "build", ["raw/date=2025-01-01"]),
        "out/date=2025-01-02": ("out", "waiting", ["raw/date=2025-01-02"]),
        "raw/date=2025-01-02": ("raw", "build", []),
    }
    assert plan["runs"] == 3 and plan["jobs"] == {"out": 2, "raw": 1}
    assert plan["partitions"] == ["out/date=2025-01-01", "out/date=2025-01-02"]
    assert d.command("plan_want", request={"partitions": ["raw/date=2025-01-01"]})["plan"][0][
        "action"] == "live"


def test_retry_wants_every_partition_that_is_not_live(tmp_path, driver_for):
    plan = {"b": {"fail_times": 1}}
    ws = write_workspace(tmp_path / "ws", plan=plan)
    d = driver_for(ws)
    want = d.want("a", "b", "c", priority=5, ttl_seconds=3600)
    assert d.settle(want["want_id"]) == FAILED
    retry = d.command("retry_want", want_id=want["want_id"])
    assert retry["partitions"] == ["b"]
    assert retry["source"] == {"type": "retry", "want_id": want["want_id"]}
    assert (retry["priority"], retry["ttl_seconds"]) == (5, 3600)
    assert d.settle(retry["want_id"]) == SUCCESSFUL
    with pytest.raises(Conflict):
        d.command("retry_want", want_id=retry["want_id"])
    with pytest.raises(NotFound):
        d.command("retry_want", want_id="nope")


def test_a_large_want_is_queued_over_several_steps(tmp_path, driver_for, monkeypatch):
    # Each step gives work to at most schedule_batch pending partitions, so a
    # 10,000-partition backfill is answered at once and queued in steps that
    # follow one another without sleeping.
    monkeypatch.setitem(databuild.DEFAULTS, "schedule_batch", 5)
    ws = write_workspace(tmp_path / "ws", plan={"p/03": {"fail_times": 1}},
                         jobs=[{"label": "t", "partition_patterns": ["p/.*"], "max_retries": 1,
                                "retry_backoff_seconds": 30}])
    clock = [1000.0]
    d = driver_for(ws, clock=lambda: clock[0])
    want = d.want("p/[00..11]")
    assert len(d.state.partitions) == 5  # queued (four of them started)
    assert d.orch._sleep_seconds(clock[0]) == 0  # the rest at once
    d.orch.step()
    assert len(d.state.partitions) == 10
    d.until(lambda s: s.partitions["p/03"].retry_at is not None)
    d.until(lambda s: len(s.partitions_by_status[databuild.LIVE]) == 11)
    # p/03 waits in backoff: it takes none of a step's budget, nothing spins.
    assert d.orch._sleep_seconds(clock[0]) > 0
    clock[0] += 40
    assert d.settle(want["want_id"]) == SUCCESSFUL


def test_a_long_stdout_is_read_for_its_outcome_off_the_orchestrator(tmp_path, driver_for,
                                                                    monkeypatch):
    # A run whose stdout is long is read on the outcome reader's thread; the
    # orchestrator's own thread reads only short ones.
    readers = {}
    read = databuild.JobRunHandle._read_outcome

    def recording(handle):
        readers[handle.job_run_id] = threading.current_thread().name
        return read(handle)
    monkeypatch.setattr(databuild.JobRunHandle, "_read_outcome", recording)
    monkeypatch.setitem(databuild.DEFAULTS, "outcome_inline_bytes", 100 * 1024)
    ws = write_workspace(tmp_path / "ws", plan={
        "long": {"stdout": "x" * 300 * 1024, "deps": ["dep"]}, "short": {}})
    d = driver_for(ws)
    long_want, short_want = d.want("long"), d.want("short")
    assert d.settle(long_want["want_id"]) == SUCCESSFUL
    assert d.settle(short_want["want_id"]) == SUCCESSFUL
    runs = {r.partitions[0] + ":" + r.status: r.job_run_id for r in d.full().job_runs.values()}
    assert readers[runs["long:DepMiss"]] == "databuild-outcome-0"  # its dep miss was read
    assert readers[runs["short:Succeeded"]] == threading.current_thread().name


def test_a_command_that_fails_after_changing_the_state_writes_none_of_its_step(
        tmp_path, driver_for, monkeypatch):
    # The general rule behind the number ranges: whatever raises after a
    # command emitted its events, none of the step reaches the log.
    ws = write_workspace(tmp_path / "ws")
    d = driver_for(ws)
    push = databuild.Orchestrator._push_deadlines

    def failing(self, want, ttl=True):
        if want.comment == "breaks":
            raise OverflowError("a stand-in for a bug after the append")
        return push(self, want, ttl)
    monkeypatch.setattr(databuild.Orchestrator, "_push_deadlines", failing)
    head = d.log.latest_event_id()
    good = d.orch.enqueue("create_want", request=databuild.parse_want_request(
        {"partitions": ["a"]}, d.config))
    bad = d.orch.enqueue("create_want", request=databuild.parse_want_request(
        {"partitions": ["b"], "comment": "breaks"}, d.config))
    d.orch.step()
    assert isinstance(bad.error, OverflowError)
    assert isinstance(good.error, databuild.Unavailable)  # not written: send it again
    assert d.log.latest_event_id() == head and not d.state.wants
    again = d.want("a")
    assert d.settle(again["want_id"]) == SUCCESSFUL
    d.close()
    assert driver_for(ws).want_status(again["want_id"]) == SUCCESSFUL  # the log replays


def test_a_partition_kept_only_on_disk_behaves_as_one_in_memory(tmp_path, driver_for):
    # README "Performance" (history): a resting partition leaves memory once
    # committed; dep checks, taints downstream, lineage, explain, as_of and a
    # restart answer as they did while it was in memory.
    ws, d = _chain(tmp_path, driver_for)
    held = dict.keys(d.state.partitions)
    assert not {"a", "b", "c", "d"} & set(held)  # all Live, nothing wants them: on disk
    # Dep checks: x declares a and b; both are Live on disk, so x runs at once
    # (no derivative want, a and b not rebuilt).
    write_workspace(ws, jobs=[{"label": "t", "partition_patterns": ["[a-d]"]},
                              {"label": "x", "partition_patterns": ["x"], "deps": ["a", "b"]}],
                    plan={"c": {"deps": ["b"]}, "b": {"reads": ["a"]}, "d": {"reads": ["c"]},
                          "x": {"reads": ["a"]}})
    d.orch._use_config(databuild.load_config(ws))
    runs = {r: run_count(ws, r) for r in "ab"}
    want = d.want("x")
    assert d.settle(want["want_id"]) == SUCCESSFUL
    assert {r: run_count(ws, r) for r in "ab"} == runs and run_count(ws, "x") == 1
    assert d.orch.find_want(want["want_id"]).derivative_want_ids == []
    assert d.state.downstream_of("a") == ["b", "x"]
    # Lineage and explain read the projection.
    with d.log.view() as view:
        tree = view.lineage("b", 3)
        assert [n["ref"] for n in tree["downstream"]] == ["c", "x"]
        assert [n["ref"] for n in tree["upstream"]] == ["a"]
        story = databuild.explain_partition(view, "c", d.config.job_for)
        assert story["summary"].startswith("Live, built by run")
    # Taint downstream from a partition on disk: in dependency order.
    answer = d.command("taint", ref="a", reason="bad", downstream=True)
    assert answer["tainted"] == ["a", "b", "c", "x", "d"]  # each after its upstream
    assert {d.state.partitions[r].status for r in "abcdx"} == {"Tainted"}
    # as_of replays the log: the same answer as the working set had.
    at = d.log.latest_event_id()
    past = d.orch.state
    full = d.full()
    assert {r: full.partitions[r].status for r in "abcdx"} == \
        {r: past.partitions[r].status for r in "abcdx"}
    assert full.latest_event_id == at
    # Restart: the new working set holds only what is at work, and answers the same.
    d.close()
    again = driver_for(ws)
    assert not set(dict.keys(again.state.partitions)) & set("abcdx")
    assert {r: again.state.partitions[r].status for r in "abcdx"} == \
        {r: full.partitions[r].status for r in "abcdx"}
    assert again.state.downstream_of("a") == ["b", "x"]
    assert again.state.summary() == full.summary()
    assert again.settle(again.want("d")["want_id"]) == SUCCESSFUL  # rebuilt upstream first
    assert {again.state.partitions[r].status for r in "abcd"} == {"Live"}


def test_settled_work_leaves_no_partition_in_memory(tmp_path, driver_for):
    # README "Performance" (history): once a want settles, its partitions
    # (and the upstream built for it) rest on disk; memory holds none.
    ws = write_workspace(tmp_path / "ws", plan={"c": {"deps": ["b"]}})
    d = driver_for(ws)
    for refs in (["a", "b"], ["c"], ["a", "d"]):
        assert d.settle(d.want(*refs)["want_id"]) == SUCCESSFUL
        d.until(lambda s: not dict.keys(s.partitions))
    assert {r: d.state.partitions[r].status for r in "abcd"} == dict.fromkeys("abcd", "Live")
