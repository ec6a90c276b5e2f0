"""Freshness, sensors and alerts (README "Freshness", "Sensors", "Alerts"): over
HTTP against a real server, with real job, sensor and alert processes and a
real webhook receiver; and the section's functions on their own."""
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import MODULE, TEST_JOB, run_count, set_plan, toml_value, wait_for

import databuild


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def workspace_toml(ws, jobs, tables=(), server=None):
    """databuild.toml with ``jobs`` and extra ``[[table]]`` entries: (table, dict)."""
    lines = ["[server]"] + ["%s = %s" % (k, toml_value(v)) for k, v in (server or {}).items()]
    for job in jobs:
        job = dict(job)
        job.setdefault("entrypoint", [sys.executable, TEST_JOB])
        lines.append("\n[[jobs]]")
        lines += ["%s = %s" % (k, toml_value(v)) for k, v in job.items()]
    for table, entry in tables:
        lines.append("\n[[%s]]" % table)
        lines += ["%s = %s" % (k, toml_value(v)) for k, v in entry.items()]
    write(os.path.join(ws, "databuild.toml"), "\n".join(lines) + "\n")
    if not os.path.exists(os.path.join(ws, "plan.json")):
        set_plan(ws, {})
    return str(ws)


def chain_jobs(auto=True, version=None):
    """a <- b <- c <- d: each reads the one before (the test job's ``reads``)."""
    jobs = [{"label": "a", "partition_patterns": ["a"]}]
    for prev, label in (("a", "b"), ("b", "c"), ("c", "d")):
        job = {"label": label, "partition_patterns": [label]}
        if auto:
            job["auto_rebuild"] = "stale"
        jobs.append(job)
    if version is not None:
        jobs[0]["version"] = version
    return jobs


CHAIN_PLAN = {ref: {"deps": [dep], "reads": [dep]} for dep, ref in (("a", "b"), ("b", "c"), ("c", "d"))}


class Receiver:
    """A local webhook receiver: records each POST's JSON; answers ``status``
    (a list is used up one answer per request, then 200)."""

    def __init__(self, status=200, delay=0.0):
        self.bodies, self.status, self.delay = [], status, delay
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = receiver.status
                if isinstance(status, list):
                    status = status.pop(0) if status else 200
                receiver.bodies.append((status, self.headers["Content-Type"], json.loads(body)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/hook" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def delivered(self):
        return [body for status, _, body in self.bodies if status == 200]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(**kw):
        r = Receiver(**kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


# -- code versions and stale partitions ----------------------------------------

def test_stale_partitions_over_http_cli_and_build_stale(tmp_path, serve):
    ws = workspace_toml(tmp_path / "ws", chain_jobs(auto=False, version="v1"))
    set_plan(ws, CHAIN_PLAN)
    server = serve(ws)
    c = server.client
    assert c.wait_want(c.create_want(["d"])["want_id"], timeout=30)["status"] == "Successful"
    d = c.get_partition("d")
    assert d["stale"] is False and d["stale_reasons"] == [] and d["code_version"]
    run = c.get_job_run(c.get_partition("a")["built_by_job_run_id"])
    assert run["code_version"] == "v1" == c.get_partition("a")["code_version"]
    # a is rebuilt: b, c, d turn stale, each saying why.
    server.cli("taint", "a", check=0)
    assert c.wait_want(c.create_want(["a"])["want_id"], timeout=30)["status"] == "Successful"
    stale = c.list_partitions(stale=True)
    assert [p["ref"] for p in stale["data"]] == ["b", "c", "d"] and stale["total"] == 3
    b = c.get_partition("b")
    assert b["stale"] and b["stale_reasons"][0].startswith("upstream a rebuilt at 20")
    assert c.get_partition("c")["stale_reasons"] == ["upstream b is stale"]
    assert c.list_partitions(stale=True, prefix="c")["total"] == 1
    assert "upstream a rebuilt at" in server.cli("partitions", "list", "--stale", check=0).stdout
    assert "Live (stale)" in server.cli("partitions", "list", check=0).stdout
    explain = server.cli("explain", "b", check=0).stdout
    assert "stale" in explain and "upstream a rebuilt at" in explain
    # Nothing is rebuilt by itself (no auto_rebuild): build --stale does it.
    runs = {ref: run_count(ws, ref) for ref in "bcd"}  # (2 each: a dep miss, a success)
    r = server.cli("build", "--stale", "--prefix", "c", "--wait", check=0)
    assert run_count(ws, "c") == runs["c"] + 1 and run_count(ws, "b") == runs["b"]
    # Rebuilt from a stale b, c is still stale -- now only for that.
    assert [p["ref"] for p in c.list_partitions(stale=True)["data"]] == ["b", "c", "d"]
    assert c.get_partition("c")["stale_reasons"] == ["upstream b is stale"]
    server.cli("build", "--stale", "--wait", check=0)
    assert c.list_partitions(stale=True)["total"] == 0
    assert run_count(ws, "b") == runs["b"] + 1 and run_count(ws, "d") == runs["d"] + 1
    r = server.cli("build", "--stale", check=0)
    assert "No stale partitions" in r.stdout
    r = server.cli("build", "--stale", "x", check=2)
    assert r.stderr.count("\n") == 1 and "not both" in r.stderr
    # A changed code version: a's partition is stale, and so is what was built from it.
    workspace_toml(ws, chain_jobs(auto=False, version="v2"))
    wait_for(lambda: c.get_partition("a")["stale"], timeout=10)
    assert c.get_partition("a")["stale_reasons"] == ["code version v1 -> v2"]
    assert c.list_partitions(stale=True)["total"] == 4


def test_a_script_edit_changes_its_jobs_code_version(tmp_path, serve):
    ws = str(tmp_path / "ws")
    os.makedirs(ws)
    shutil.copy(TEST_JOB, os.path.join(ws, "job.py"))
    workspace_toml(ws, [{"label": "t", "partition_patterns": ["p"],
                         "entrypoint": [sys.executable, "job.py"]}])
    expected = databuild.code_version([os.path.join(ws, "job.py")])
    server = serve(ws)
    c = server.client
    c.wait_want(c.create_want(["p"])["want_id"], timeout=30)
    assert c.get_partition("p")["code_version"] == expected and not c.get_partition("p")["stale"]
    assert c.list_jobs()["data"][0]["code_version"] == expected
    with open(os.path.join(ws, "job.py"), "a") as f:
        f.write("\n# an edit\n")
    wait_for(lambda: c.get_partition("p")["stale"], timeout=10)
    new = databuild.code_version([os.path.join(ws, "job.py")])
    assert c.get_partition("p")["stale_reasons"] == ["code version %s -> %s" % (expected, new)]
    # A restart with the same code records nothing new and keeps it stale.
    latest = c.health()["latest_event_id"]
    server.stop()
    again = serve(ws)
    assert again.client.health()["latest_event_id"] == latest
    assert again.client.get_partition("p")["stale"]


# -- auto rebuild -------------------------------------------------------------

def test_auto_rebuild_ripples_down_a_chain_once_in_dependency_order(tmp_path, serve):
    ws = workspace_toml(tmp_path / "ws", chain_jobs(auto=True))
    set_plan(ws, CHAIN_PLAN)
    server = serve(ws)
    c = server.client
    assert c.wait_want(c.create_want(["d"])["want_id"], timeout=30)["status"] == "Successful"
    runs_before = c.list_job_runs()["total"]
    counts = [run_count(ws, r) for r in "abcd"]
    server.cli("taint", "a", check=0)
    c.wait_want(c.create_want(["a"])["want_id"], timeout=30)
    wait_for(lambda: c.get_partition("d")["status"] == "Live"
             and c.list_partitions(stale=True)["total"] == 0
             and c.list_job_runs()["total"] == runs_before + 4
             and not c.list_job_runs(status="Running")["data"], timeout=30)
    assert [run_count(ws, r) - n for r, n in zip("abcd", counts)] == [1, 1, 1, 1]  # once each
    auto = [w for w in c.list_wants()["data"] if w["source"]["type"] == "auto"]
    assert sorted(w["partitions"][0] for w in auto) == ["b", "c", "d"]
    assert all(w["status"] == "Successful" for w in auto)
    assert auto[-1]["source"]["reason"].startswith("upstream a rebuilt at")
    # Dependency order: each started after the one it reads from succeeded.
    runs = {r["partitions"][0]: r for r in c.list_job_runs(limit=4)["data"]}
    for up, down in (("a", "b"), ("b", "c"), ("c", "d")):
        assert runs[down]["started_at"] >= runs[up]["finished_at"]
    # Never a loop: nothing more runs.
    latest = c.health()["latest_event_id"]
    time.sleep(0.5)
    assert c.health()["latest_event_id"] == latest
    assert "auto_rebuild on jobs b, c, d" in c.health()["kept_up_by"]


def test_a_stale_upstream_that_is_not_rebuilt_by_itself_stops_the_ripple(tmp_path, driver_for):
    # a <- b (not auto) <- c (auto): c waits for b, which nobody rebuilds; c
    # is not rebuilt in a loop for a reason its own rebuild cannot clear.
    jobs = chain_jobs(auto=True)[:3]
    del jobs[1]["auto_rebuild"]
    ws = workspace_toml(tmp_path / "ws", jobs)
    set_plan(ws, CHAIN_PLAN)
    d = driver_for(ws)
    d.settle(d.want("c")["want_id"])
    runs = run_count(ws, "c")
    d.command("taint", ref="a")
    d.settle(d.want("a")["want_id"])
    d.until(lambda s: not s.active_run_by_ref)
    parts = d.state.partitions
    assert list(parts["b"].stale_reasons) == ["rebuilt:a"] and not d.state.pending_refs
    assert list(parts["c"].stale_reasons) == ["upstream:b"]
    assert run_count(ws, "c") == runs  # not rebuilt: b would still be stale
    # Once b is rebuilt (by a want), c follows by itself, once.
    d.settle(d.want("b")["want_id"])
    d.until(lambda s: parts["c"].status == "Live" and run_count(ws, "c") == runs + 1
            and not s.active_run_by_ref)
    assert not d.state.stale and run_count(ws, "c") == runs + 1


def test_a_stale_declared_dep_of_an_auto_job_is_rebuilt_first(tmp_path, driver_for):
    jobs = [{"label": "raw", "partition_patterns": ["raw/(?P<d>.+)"], "version": "1",
             "auto_rebuild": "stale"},
            {"label": "out", "partition_patterns": ["out/(?P<d>.+)"], "deps": ["raw/{d}"]}]
    ws = workspace_toml(tmp_path / "ws", jobs)
    d = driver_for(ws)
    d.settle(d.want("raw/1")["want_id"])
    jobs[0]["version"] = "2"
    workspace_toml(ws, jobs)
    d.orch._use_config(databuild.load_config(ws))
    d.orch.step()
    assert run_count(ws, "raw/1") >= 1
    d.settle(d.want("out/1")["want_id"])
    assert run_count(ws, "raw/1") == 2  # rebuilt (new code) before out/1 ran
    assert d.state.partitions["raw/1"].code_version == "2"


# -- sensors ------------------------------------------------------------------

LANDING_SENSOR = r'''
import json, os, sys
print("cursor was:" + os.environ["DATABUILD_SENSOR_CURSOR"], file=sys.stderr)
with open("cursors.log", "a") as f:
    f.write(os.environ["DATABUILD_SENSOR_NAME"] + " " + os.environ["DATABUILD_SENSOR_CURSOR"] + "\n")
mode = open("mode").read().strip() if os.path.exists("mode") else "ok"
if mode == "fail":
    print("the landing bucket is unreachable", file=sys.stderr)
    sys.exit(3)
if mode == "hang":
    import time; time.sleep(30)
if mode == "flood":
    sys.stdout.write("x" * (3 * 1024 * 1024))
    sys.exit(0)
if mode == "garbage":
    print("DATABUILD_WANT_JSON: {not json")
    sys.exit(0)
if mode == "badref":
    print('DATABUILD_WANT_JSON: {"partitions": ["nojob/x"]}')
    sys.exit(0)
names = sorted(os.listdir("landing")) if os.path.isdir("landing") else []
for name in names:
    print("DATABUILD_WANT_JSON: " + json.dumps({"partitions": ["clean/" + name], "key": name}))
if names:
    print("DATABUILD_SENSOR_CURSOR: " + names[-1])
'''


def sensor_workspace(path, interval=0.2, timeout=None, alerts=()):
    sensor = {"name": "landing", "command": [sys.executable, "sensors/landing.py"],
              "interval_seconds": interval}
    if timeout is not None:
        sensor["timeout_seconds"] = timeout
    ws = workspace_toml(path, [
        {"label": "raw", "partition_patterns": ["raw/.+"]},
        {"label": "clean", "partition_patterns": ["clean/(?P<f>.+)"], "deps": ["raw/{f}"],
         "auto_rebuild": "stale"}],
        [("sensors", sensor)] + [("alerts", a) for a in alerts],
        server={"idle_timeout_seconds": 1})
    write(os.path.join(ws, "sensors", "landing.py"), LANDING_SENSOR)
    return ws


def test_a_file_lands_a_sensor_wants_it_and_its_cursor_survives_a_restart(tmp_path, serve):
    ws = sensor_workspace(tmp_path / "ws")
    server = serve(ws)
    c = server.client
    sensor = wait_for(lambda: [s for s in c.list_sensors()["data"] if s["evaluations"]])[0]
    assert sensor["name"] == "landing" and sensor["last_status"] == "ok"
    assert sensor["wants_created"] == 0 and sensor["cursor"] is None
    write(os.path.join(ws, "landing", "f1"), "")
    want = wait_for(lambda: [w for w in c.list_wants()["data"]
                             if w["want_id"] == "sensor:landing:f1"])[0]
    assert want["source"] == {"type": "sensor", "name": "landing"}
    assert c.wait_want(want["want_id"], timeout=30)["status"] == "Successful"
    assert c.get_partition("raw/f1")["status"] == "Live"  # its declared dep
    write(os.path.join(ws, "landing", "f2"), "")
    wait_for(lambda: c.list_sensors()["data"][0]["cursor"] == "f2")
    # A key is wanted once, however many evaluations print it.
    evaluations = c.list_sensors()["data"][0]["evaluations"]
    wait_for(lambda: c.list_sensors()["data"][0]["evaluations"] >= evaluations + 3)
    sensor = c.list_sensors()["data"][0]
    assert sensor["wants_created"] == 2
    assert sorted(w["want_id"] for w in c.list_wants()["data"]
                  if w["source"]["type"] == "sensor") == ["sensor:landing:f1", "sensor:landing:f2"]
    # The server stays up (sensors keep it) and says why.
    assert c.health()["kept_up_by"] == ["1 sensor (landing)", "auto_rebuild on job clean"]
    assert "kept up by:" in server.cli("status", check=0).stdout
    assert "landing" in server.cli("sensors", "list", check=0).stdout
    # Restart: the first evaluation of the new server gets the cursor from the log.
    server.stop()
    with open(os.path.join(ws, "cursors.log")) as f:
        seen = len(f.readlines())
    again = serve(ws)
    wait_for(lambda: len(open(os.path.join(ws, "cursors.log")).readlines()) > seen)
    with open(os.path.join(ws, "cursors.log")) as f:
        assert f.readlines()[seen] == "landing f2\n"
    assert again.client.list_sensors()["data"][0]["cursor"] == "f2"


@pytest.mark.parametrize("mode, error", [
    ("fail", "exit code 3: cursor was: | the landing bucket is unreachable"),
    ("hang", "timed out after 0.5 s"),
    ("flood", "printed more than 1048576 bytes"),
    ("garbage", "line 1: DATABUILD_WANT_JSON: is not JSON"),
    ("badref", "a printed want: No job produces partition 'nojob/x'"),
])
def test_a_failed_evaluation_is_recorded_and_makes_nothing(tmp_path, driver_for, mode, error):
    ws = sensor_workspace(tmp_path / "ws", timeout=0.5)
    write(os.path.join(ws, "mode"), mode)
    os.makedirs(os.path.join(ws, "landing"))
    write(os.path.join(ws, "landing", "f1"), "")
    d = driver_for(ws)
    d.until(lambda s: s.sensors.get("landing", {}).get("evaluations"), timeout=20)
    sensor = d.state.sensors["landing"]
    assert sensor["last_status"] == "failed" and sensor["last_error"].startswith(error)
    assert sensor["cursor"] is None and sensor["wants_created"] == 0 and not d.state.wants
    # The next interval tries again; once it works, its wants and cursor count.
    write(os.path.join(ws, "mode"), "ok")
    d.until(lambda s: s.sensors["landing"]["last_status"] == "ok", timeout=20)
    assert d.state.sensors["landing"]["cursor"] == "f1"
    assert d.orch.find_want("sensor:landing:f1") is not None


def test_run_bounded_reads_a_bounded_amount_and_kills_on_timeout(tmp_path):
    code, out, tail, problem = databuild.run_bounded(
        [sys.executable, "-c", "import sys; print('hi'); print('e1\\ne2', file=sys.stderr)"],
        str(tmp_path), dict(os.environ), 10, 100)
    assert (code, out, tail, problem) == (0, b"hi\n", ["e1", "e2"], None)
    started = time.monotonic()
    code, out, tail, problem = databuild.run_bounded(
        [sys.executable, "-c", "import sys, time; print('x' * 5000, flush=True); time.sleep(30)"],
        str(tmp_path), dict(os.environ), 10, 1000)
    assert code is None and problem == "printed more than 1000 bytes" and len(out) == 1000
    assert time.monotonic() - started < 5
    code, out, tail, problem = databuild.run_bounded(
        ["sh", "-c", "sleep 30 & sleep 30"], str(tmp_path), dict(os.environ), 0.3, 1000)
    assert problem == "timed out after 0.3 s" and time.monotonic() - started < 8


def test_sensor_want_ids_and_keys():
    config = databuild.Config("/tmp", [databuild.JobConfig("t", ["true"], ["p/.+"])])
    req = databuild.sensor_want("s", {"partitions": ["p/2", "p/1"]}, config)
    assert req["want_id"].startswith("sensor:s:") and len(req["want_id"]) == len("sensor:s:") + 16
    assert req["want_id"] == databuild.sensor_want("s", {"partitions": ["p/1", "p/2"]},
                                                   config)["want_id"]
    req = databuild.sensor_want("s", {"partitions": ["p/[1..3]"], "key": "k:1",
                                      "comment": "landed"}, config)
    assert req["want_id"] == "sensor:s:k:1" and req["partitions"] == ["p/1", "p/2", "p/3"]
    for bad in ({"partitions": ["p/1"], "key": "a b"}, {"partitions": ["p/1"], "want_id": "x"},
                {"partitions": ["p/1"], "bogus": 1}, {"partitions": []}):
        with pytest.raises(databuild.InvalidRequest):
            databuild.sensor_want("s", bad, config)


# -- alerts -------------------------------------------------------------------

def test_a_failure_pages_a_webhook_and_a_command(tmp_path, serve, receiver):
    hook = receiver()
    ws = workspace_toml(tmp_path / "ws", [
        {"label": "t", "partition_patterns": ["[a-z]+"], "max_retries": 1}],
        [("alerts", {"name": "oncall", "on": ["want_failed", "partition_failed"],
                     "webhook": hook.url}),
         ("alerts", {"name": "log", "on": ["want_failed"],
                     "command": ["sh", "-c", "cat > alert-$$.json"]})])
    set_plan(ws, {"bad": {"exit": 3}})
    server = serve(ws)
    c = server.client
    want = c.create_want(["ok", "bad"], comment="nightly")
    assert c.wait_want(want["want_id"], timeout=30)["status"] == "Failed"
    wait_for(lambda: len(hook.delivered()) == 2)
    by_kind = {body["kind"]: body for body in hook.delivered()}
    assert hook.bodies[0][1] == "application/json"
    failed = by_kind["want_failed"]
    assert failed["alert"] == "oncall" and failed["want"]["want_id"] == want["want_id"]
    assert failed["want"]["not_live"] == ["bad"] and failed["want"]["comment"] == "nightly"
    assert "1 of 2 partitions not Live (bad)" in failed["summary"]
    event = c.events(since=failed["event_id"] - 1, limit=1)["data"][0]
    assert event["timestamp"] == failed["timestamp"]
    part = by_kind["partition_failed"]["partition"]
    assert part["ref"] == "bad" and part["error"].startswith("exit code 3")
    # partition_failed once, when retries were spent (2 runs failed).
    assert [b["kind"] for b in hook.delivered()].count("partition_failed") == 1
    files = wait_for(lambda: [f for f in os.listdir(ws) if f.startswith("alert-")])
    with open(os.path.join(ws, files[0])) as f:
        assert json.load(f)["kind"] == "want_failed"
    alerts = wait_for(lambda: [a for a in c.list_alerts()["data"]
                               if a["status"] == "delivered"] if len(
        [a for a in c.list_alerts()["data"] if a["status"] == "delivered"]) == 3 else None)
    assert all(a["attempts"] == 1 and a["delivered_at"] for a in alerts)
    assert c.list_alerts(status="owed")["total"] == 0
    assert "partition_failed" in server.cli("alerts", "list", check=0).stdout
    types = [e["type"] for e in c.events(limit=1000)["data"]]
    assert types.count("alert_raise") == 3 and types.count("alert_delivered") == 3


def test_failed_deliveries_retry_with_backoff_and_owed_alerts_survive_a_restart(
        tmp_path, serve, receiver):
    hook = receiver(status=[500, 503])  # two failures, then delivered
    ws = workspace_toml(tmp_path / "ws", [{"label": "t", "partition_patterns": ["[a-z]+"]}],
                        [("alerts", {"name": "oncall", "on": ["partition_failed"],
                                     "webhook": hook.url})])
    set_plan(ws, {"bad": {"exit": 1}})
    server = serve(ws)
    c = server.client
    c.wait_want(c.create_want(["bad"])["want_id"], timeout=30)
    alert = wait_for(lambda: [a for a in c.list_alerts()["data"] if a["status"] == "delivered"],
                     timeout=20)[0]
    assert alert["attempts"] == 3 and alert["last_error"].startswith("HTTP 503")
    times = [e for e in c.events(limit=1000)["data"]
             if e["type"] in ("alert_failed", "alert_delivered")]
    assert [e["type"] for e in times] == ["alert_failed", "alert_failed", "alert_delivered"]
    # An alert owed when the server stops is delivered by the next one.
    hook.status = [500] * 100
    c.wait_want(c.create_want(["bad"], want_id="again")["want_id"], timeout=30)
    wait_for(lambda: [a for a in c.list_alerts(status="owed")["data"] if a["attempts"] >= 1])
    assert server.stop() == 0
    hook.status = 200
    again = serve(ws)
    owed = wait_for(lambda: [a for a in again.client.list_alerts()["data"]
                             if a["status"] == "delivered" and a["attempts"] >= 2], timeout=20)
    assert owed[0]["partition"]["ref"] == "bad"


def test_a_dead_or_slow_receiver_never_delays_a_build(tmp_path, serve, receiver):
    slow = receiver(delay=5)
    ws = workspace_toml(tmp_path / "ws", [{"label": "t", "partition_patterns": ["[a-z0-9]+"]}],
                        [("alerts", {"name": "slow", "on": ["partition_failed"],
                                     "webhook": slow.url}),
                         ("alerts", {"name": "dead", "on": ["partition_failed"],
                                     "webhook": "http://127.0.0.1:9/nobody"})])
    set_plan(ws, {"bad": {"exit": 1}})
    server = serve(ws)
    c = server.client
    c.wait_want(c.create_want(["bad"])["want_id"], timeout=30)
    wait_for(lambda: slow.bodies == [] and c.list_alerts()["total"] == 2)
    started = time.monotonic()
    for i in range(5):
        assert c.wait_want(c.create_want(["ok%d" % i])["want_id"],
                           timeout=30)["status"] == "Successful"
    assert time.monotonic() - started < 3  # while the slow receiver holds its delivery
    dead = wait_for(lambda: [a for a in c.list_alerts()["data"]
                             if a["alert"] == "dead" and a["attempts"]])[0]
    assert dead["last_error"].startswith("cannot reach http://127.0.0.1:9/nobody")


def test_an_alert_is_given_up_after_its_attempts(tmp_path, driver_for, monkeypatch):
    monkeypatch.setitem(databuild.DEFAULTS, "alert_backoff_seconds", (0.01, 0.01))
    ws = workspace_toml(tmp_path / "ws", [{"label": "t", "partition_patterns": ["[a-z]+"]}],
                        [("alerts", {"name": "page", "on": ["partition_failed"],
                                     "command": ["sh", "-c", "echo no pager >&2; exit 7"]})])
    set_plan(ws, {"bad": {"exit": 1}})
    d = driver_for(ws)
    d.settle(d.want("bad")["want_id"])
    d.until(lambda s: s.alerts_by_status["given_up"])
    with d.log.view() as view:
        (alert,), total = view.alerts(None, 0, 10)
    assert alert["status"] == "given_up" and alert["attempts"] == 3
    assert alert["last_error"] == "exit code 7: no pager"
    assert d.state.alerts == {}  # a working set keeps only the owed ones


# -- configuration ------------------------------------------------------------

@pytest.mark.parametrize("table, entry, message", [
    ("sensors", {"name": "s", "command": ["x"]}, "[[sensors]] 's' interval_seconds: missing"),
    ("sensors", {"name": "s", "command": [], "interval_seconds": 1},
     "[[sensors]] 's' command: must not be empty"),
    ("sensors", {"name": "s", "command": ["x"], "interval_seconds": 0},
     "[[sensors]] 's' interval_seconds: must be at least 0.1"),
    ("sensors", {"name": "s", "command": ["x"], "interval_seconds": 1, "every": 2},
     "[[sensors]] 's' every: unknown key"),
    ("alerts", {"name": "a", "on": ["want_failed"], "webhook": "ftp://host/x"},
     "[[alerts]] 'a' webhook: must be an http:// or https:// URL"),
    ("alerts", {"name": "a", "on": ["nightfall"], "command": ["x"]},
     "[[alerts]] 'a' on: unknown kind 'nightfall'"),
    ("alerts", {"name": "a", "on": ["want_failed"]}, "[[alerts]] 'a': give either command or"),
    ("alerts", {"name": "a b", "on": ["want_failed"], "command": ["x"]},
     "name: must match"),
])
def test_a_bad_sensor_or_alert_table_is_a_config_error(tmp_path, table, entry, message):
    ws = workspace_toml(tmp_path / "ws", [{"label": "t", "partition_patterns": ["p"]}],
                        [(table, entry)])
    r = subprocess.run([sys.executable, MODULE, "serve", "--workspace", ws],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_auto_rebuild_and_version_are_checked(tmp_path):
    ws = workspace_toml(tmp_path / "ws", [{"label": "t", "partition_patterns": ["p"],
                                           "auto_rebuild": "always"}])
    with pytest.raises(databuild.ConfigError) as e:
        databuild.load_config(ws)
    assert 'auto_rebuild: must be "off" or "stale"' in e.value.message


# -- the walk-through ---------------------------------------------------------

def test_the_landing_example_walk_through(tmp_path, serve):
    # README "Freshness, sensors and alerts: a walk-through", step by step.
    from conftest import ROOT
    ws = str(tmp_path / "landing")
    shutil.copytree(os.path.join(ROOT, "examples", "landing"), ws,
                    ignore=shutil.ignore_patterns(".databuild", "data", "landing", "pages.log"))
    with open(os.path.join(ws, "databuild.toml")) as f:
        toml = f.read().replace("interval_seconds = 2", "interval_seconds = 0.2")
    write(os.path.join(ws, "databuild.toml"), toml)
    server = serve(ws)
    c = server.client
    os.makedirs(os.path.join(ws, "landing"))
    samples = os.path.join(ws, "samples")
    # A file lands: the sensor wants it; it builds.
    shutil.copy(os.path.join(samples, "2025-01-01.csv"), os.path.join(ws, "landing"))
    want = wait_for(lambda: [w for w in c.list_wants()["data"]
                             if w["want_id"] == "sensor:landing:2025-01-01"])[0]
    assert c.wait_want(want["want_id"], timeout=30)["status"] == "Successful"
    summary = os.path.join(ws, "data", "summary", "date=2025-01-01", "summary.json")
    assert json.load(open(summary))["total"] == 51.5
    # A corrected file: raw is rebuilt, its downstream rebuilds by itself.
    shutil.copy(os.path.join(samples, "2025-01-01-corrected.csv"),
                os.path.join(ws, "landing", "2025-01-01.csv"))
    wait_for(lambda: json.load(open(summary))["total"] == 65.5, timeout=30)
    wait_for(lambda: c.list_partitions(stale=True)["total"] == 0
             and c.get_partition("summary/date=2025-01-01")["status"] == "Live")
    auto = sorted(w["partitions"][0] for w in c.list_wants()["data"]
                  if w["source"]["type"] == "auto")
    assert auto == ["clean/date=2025-01-01", "summary/date=2025-01-01"]
    # A bad file: the build fails and someone is paged.
    shutil.copy(os.path.join(samples, "2025-01-02-bad.csv"),
                os.path.join(ws, "landing", "2025-01-02.csv"))
    wait_for(lambda: os.path.exists(os.path.join(ws, "pages.log")) and all(
        kind in open(os.path.join(ws, "pages.log")).read()
        for kind in ("[want_failed]", "[partition_failed]")), timeout=30)
    pages = open(os.path.join(ws, "pages.log")).read()
    assert "[partition_failed] partition clean/date=2025-01-02 failed" in pages
    assert "not an item,amount row" in pages


def test_sensors_schedules_and_auto_rebuild_keep_the_server_up(tmp_path):
    # README "Lifecycle": each keeps an idle server up, and /health says which.
    def kept(jobs, tables):
        ws = workspace_toml(tmp_path / ("ws%d" % len(os.listdir(tmp_path))), jobs, tables,
                            server={"idle_timeout_seconds": 5})
        server = databuild.Server(databuild.load_config(ws))
        try:
            far = server.idle_timer.clock() + 3600
            return server.kept_up_by(), server.idle_timer.check(now=far)
        finally:
            server.close()
    plain = [{"label": "t", "partition_patterns": ["p/.+"]}]
    assert kept(plain, []) == ([], True)  # nothing keeps it: it stops
    sensor = ("sensors", {"name": "s", "command": ["true"], "interval_seconds": 60})
    assert kept(plain, [sensor]) == (["1 sensor (s)"], False)
    schedule = ("schedules", {"name": "d", "interval_seconds": 60, "partitions": ["p/x"]})
    assert kept(plain, [schedule]) == (["1 schedule (d)"], False)
    auto = [dict(plain[0], auto_rebuild="stale")]
    assert kept(auto, []) == (["auto_rebuild on job t"], False)
