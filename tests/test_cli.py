"""End to end: `serve` as a subprocess on port 0, driven by the CLI and the client."""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import databuild
from conftest import MODULE, REVIEWS, set_plan, wait_for, write_workspace


def cli(*args, cwd=None, env=None, timeout=120):
    return subprocess.run([sys.executable, MODULE, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.fixture
def reviews(tmp_path):
    path = str(tmp_path / "reviews")
    shutil.copytree(REVIEWS, path, ignore=shutil.ignore_patterns(".databuild", "data"))
    return path


def test_reviews_example_builds_a_real_chain(reviews, serve):
    server = serve(reviews)
    r = server.cli("build", "report/weekly/week=2025-01-06", "--wait", check=0)
    assert "Successful" in r.stdout
    assert "Successful: 1/1 live" in r.stderr  # progress went to stderr
    # One missing deps (the report's); the dailies declare their raw day, so
    # each daily runs once.  Raw reviews are batched (up to 7 a run), so how
    # many raw runs there were depends on timing.
    counts = re.findall(r"job runs: (\d+) started, (\d+) succeeded, 1 missing deps, 0 failed",
                        r.stderr)
    started, succeeded = map(int, counts[-1])
    assert 1 + 7 + 1 <= succeeded <= 7 + 7 + 1 and started == succeeded + 1
    dailies = server.client.list_job_runs(job_label="daily_aggregates")["data"]
    assert len(dailies) == 7 and {r["status"] for r in dailies} == {"Succeeded"}
    report = os.path.join(reviews, "data", "report", "weekly", "week=2025-01-06", "report.md")
    with open(report) as f:
        text = f.read()
    assert "Weekly review digest, week of 2025-01-06" in text  # the job's environment
    assert text.count("| 2025-01-") == 7
    for day in range(6, 13):
        assert os.path.exists(os.path.join(reviews, "data", "raw", "reviews",
                                           "date=2025-01-%02d" % day, "reviews.csv"))
    wants = json.loads(server.cli("--json", "want", "list", check=0).stdout)
    assert wants["total"] == 9  # the report, one derivative for the dailies, seven raw
    roots = [w for w in wants["data"] if w["source"]["type"] == "manual"]
    assert len(roots) == 1 and roots[0]["status"] == "Successful"
    derived = [w for w in wants["data"] if w["source"]["type"] == "job"]
    assert all(w["root_want_id"] == roots[0]["want_id"] for w in derived)
    assert all(w["parent_want_id"] for w in derived)
    table = server.cli("partitions", "list", "--prefix", "agg/", check=0).stdout.splitlines()
    assert table[0].split() == ["REF", "STATUS", "JOB", "UPDATED"]
    assert len(table) == 8 and all(" Live " in line for line in table[1:])
    runs = json.loads(server.cli("job-runs", "list", "--job", "weekly_report", "--json",
                                 check=0).stdout)
    assert [r["status"] for r in runs["data"]] == ["Succeeded", "DepMiss"]
    logs = server.cli("logs", runs["data"][0]["job_run_id"], check=0).stdout
    assert "with 274 reviews" in logs or "reviews" in logs


def test_a_bad_week_fails_with_a_clear_reason(reviews, serve):
    server = serve(reviews)
    r = server.cli("build", "report/weekly/week=2025-01-07", "--wait")
    assert r.returncode == 1
    # The outcome names the failed partition and its run's error.
    assert "report/weekly/week=2025-01-07  Failed" in r.stdout
    assert "a week starts on a Monday" in r.stdout


def test_want_commands_tables_and_json(workspace, serve):
    set_plan(workspace, {"slow": {"sleep": 30}})
    server = serve(workspace)
    created = json.loads(server.cli("want", "create", "slow", "--comment", "note", "--json",
                                    check=0).stdout)
    want_id = created["want_id"]
    assert created["comment"] == "note" and created["source"]["type"] == "manual"
    table = server.cli("want", "list", check=0).stdout.splitlines()
    assert table[0].split() == ["WANT_ID", "STATUS", "LIVE", "PARTITIONS", "SOURCE",
                                "DATA_TIME", "CREATED"]
    assert want_id in table[1] and " 0/1 " in table[1]
    # Columns are aligned: every row has STATUS at the same offset.
    assert table[1].index(created["status"]) == table[0].index("STATUS")
    text = server.cli("want", "get", want_id, check=0).stdout
    assert "want_id:" in text and want_id in text and "partition_statuses:" in text
    assert "counts:" in text and "total=1" in text
    canceled = server.cli("want", "cancel", want_id, check=0).stdout
    assert "Canceled" in canceled
    again = server.cli("want", "cancel", want_id)
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "already Canceled" in again.stderr
    run_id = json.loads(server.cli("job-runs", "list", "--json", check=0).stdout)["data"][0]["job_run_id"]
    wait_for(lambda: server.client.get_job_run(run_id)["status"] == "Canceled")
    run_text = server.cli("job-runs", "get", run_id, check=0).stdout
    assert "Canceled" in run_text and "want canceled" in run_text


def test_errors_are_one_line_with_the_right_exit_status(workspace, serve, tmp_path):
    server = serve(workspace)
    missing = server.cli("want", "get", "nope")
    # Every error names what it is about.
    assert missing.returncode == 1
    assert missing.stderr == "databuild: error: Want not found (want_id: nope)\n"
    part = server.cli("partitions", "get", "raw/x")
    assert part.stderr == "databuild: error: Partition not found (ref: raw/x)\n"
    bad_ref = server.cli("build", "good", "has space")
    assert bad_ref.returncode == 1 and "Invalid partition ref 'has space'" in bad_ref.stderr
    usage = server.cli("want", "list", "--status", "Done")
    assert usage.returncode == 2
    nothing = server.cli("frobnicate")
    assert nothing.returncode == 2
    unreachable = cli("--server", "http://127.0.0.1:9", "want", "list")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("databuild: error: Cannot reach the databuild server")
    assert unreachable.stderr.count("\n") == 1
    nowhere = cli("want", "list", cwd=str(tmp_path))
    assert nowhere.returncode == 2 and "databuild.toml" in nowhere.stderr
    for r in (missing, bad_ref, usage, nothing, unreachable, nowhere):
        assert "Traceback" not in r.stderr


def test_global_options_before_or_after_and_env_url(workspace, serve):
    server = serve(workspace)
    # The token: --token, else $DATABUILD_TOKEN, else the workspace's server.json.
    after = cli("want", "list", "--json", "--server", server.url, "--token", server.token)
    before = cli("--json", "--server", server.url, "--workspace", workspace, "want", "list")
    by_env = cli("want", "list", "--json", env={"DATABUILD_URL": server.url,
                                                 "DATABUILD_TOKEN": server.token})
    assert after.returncode == before.returncode == by_env.returncode == 0, before.stderr
    assert json.loads(after.stdout)["total"] == 0 == json.loads(by_env.stdout)["total"]
    for wrong in ({"DATABUILD_URL": server.url}, {"DATABUILD_URL": server.url,
                                                   "DATABUILD_TOKEN": "guess"}):
        r = cli("want", "create", "a", env=wrong)
        assert r.returncode == 1 and "access token" in r.stderr and r.stderr.count("\n") == 1
    assert server.client.list_wants()["total"] == 0
    # The workspace's token goes to the workspace's own server only.
    other = server.url.replace("127.0.0.1", "localhost")
    r = cli("--server", other, "--workspace", workspace, "want", "list")
    assert r.returncode == 1 and "access token" in r.stderr


def test_discovery_through_server_json(workspace, serve):
    server = serve(workspace)
    info = databuild.read_server_info(os.path.join(workspace, ".databuild"))
    assert info["url"] == server.url and info["pid"] == server.proc.pid
    assert set(info) == {"pid", "url", "port", "host", "started_at", "workspace_root", "version",
                         "token"}
    sub = os.path.join(workspace, "some", "folder")
    os.makedirs(sub)
    r = cli("want", "create", "a", "--json", cwd=sub)  # nearest workspace upward
    assert r.returncode == 0, r.stderr
    assert server.client.get_want(json.loads(r.stdout)["want_id"])


def test_taint_events_and_status(workspace, serve):
    server = serve(workspace)
    r = server.cli("build", "a", "--wait", check=0)
    assert "Successful" in r.stdout
    tainted = server.cli("taint", "a", "--reason", "bad", check=0)
    assert "a: Tainted" in tainted.stdout
    events = json.loads(server.cli("events", "--since", "0", "--json", check=0).stdout)
    assert [e["type"] for e in events["data"]][-1] == "partition_taint"
    assert events["data"][0]["event_id"] == 1
    status = server.cli("status", check=0).stdout
    assert server.url in status and "Successful" in status


def test_client_mirrors_the_routes(workspace, serve):
    server = serve(workspace)
    client = server.client
    assert client.health()["status"] == "ok"
    want = client.create_want(["x/1"], comment="c")
    with pytest.raises(databuild.Conflict):
        client.create_want(["x/2"], want_id=want["want_id"])
    with pytest.raises(databuild.NotFound):
        client.get_partition("never")
    with pytest.raises(databuild.InvalidRequest):
        client.list_wants(status="nope")
    wait_for(lambda: client.get_want(want["want_id"])["status"] == "Successful")
    assert client.get_partition("x/1")["status"] == "Live"
    assert client.list_partitions(prefix="x/")["total"] == 1
    (run,) = client.list_job_runs(want_id=want["want_id"])["data"]
    assert client.logs(run["job_run_id"]) == "built x/1\n"
    assert client.events(since=0, limit=1)["data"][0]["type"] == "want_create"


def test_a_server_gone_mid_answer_is_unreachable_not_a_traceback(tmp_path):
    import socket
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def half_answer():  # promises 427 bytes, sends none, hangs up
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 427\r\n\r\n")
        conn.close()
    t = threading.Thread(target=half_answer)
    t.start()
    with pytest.raises(databuild.ServerUnreachable):
        databuild.Client("http://127.0.0.1:%d" % port, timeout=5).health()
    t.join(5)
    listener.close()


def test_dashboard_prints_the_url_that_sets_the_cookie(workspace, serve):
    server = serve(workspace)
    r = cli("--workspace", workspace, "dashboard")
    assert r.returncode == 0, r.stderr
    url = r.stdout.strip()
    assert url == "%s/?token=%s" % (server.url, server.token)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None
    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(url)
    assert e.value.code == 303 and "databuild_token=" in e.value.headers["Set-Cookie"]


# -- what a new user tripped on -------------------------------------

def test_events_show_the_newest_last_with_a_note_and_readable_payloads(workspace, serve):
    server = serve(workspace)
    for i in range(4):
        want = server.client.create_want(["e%d" % i], comment="x" * 300)
        wait_for(lambda: server.client.get_want(want["want_id"])["terminal"])
    latest = server.client.health()["latest_event_id"]
    r = server.cli("events", "--limit", "5", check=0)
    lines = r.stdout.splitlines()
    ids = [int(line.split()[0]) for line in lines[1:6]]
    assert ids == list(range(latest - 4, latest + 1))  # the newest, newest last
    assert "(5 of %d events shown" % latest in r.stdout
    assert all(len(line) < 250 for line in lines)  # long payloads are summarised
    assert "comment=xxx" in r.stdout and "..." in r.stdout and '{"' not in r.stdout
    since = server.cli("events", "--since", "2", "--limit", "3", check=0)
    assert [int(line.split()[0]) for line in since.stdout.splitlines()[1:4]] == [3, 4, 5]
    as_json = json.loads(server.cli("events", "--json", "--limit", "2", check=0).stdout)
    assert [e["event_id"] for e in as_json["data"]] == [latest - 1, latest]
    # --type: the newest of that type, still newest last.
    typed = server.cli("events", "--type", "want_create", "--limit", "2", check=0).stdout
    rows = [line.split() for line in typed.splitlines()[1:]]
    assert [r[2] for r in rows] == ["want_create"] * 2 and int(rows[0][0]) < int(rows[1][0])
    assert "partitions=e3" in typed and "partitions=e1" not in typed  # (ids may hold "e1")
    assert "invalid choice: 'nope'" in server.cli("events", "--type", "nope", check=2).stderr


def test_ids_by_unique_prefix(workspace, serve):
    set_plan(workspace, {"slow": {"sleep": 30}})
    server = serve(workspace)
    server.client.create_want(["a"], want_id="abcd-1")
    server.client.create_want(["b"], want_id="abcd-2")
    want = server.client.create_want(["slow"])
    wid = want["want_id"]
    r = server.cli("want", "get", wid[:6], "--json", check=0)
    assert json.loads(r.stdout)["want_id"] == wid
    ambiguous = server.cli("want", "get", "abcd")
    assert ambiguous.returncode == 1 and "more than one want id" in ambiguous.stderr
    assert "abcd-1" in ambiguous.stderr and ambiguous.stderr.count("\n") == 1
    assert server.cli("want", "get", "abc").returncode == 1  # too short to stand for an id
    (run_id,) = server.client.get_want(wid)["job_run_ids"]
    r = server.cli("job-runs", "get", run_id[:5], "--json", check=0)
    assert json.loads(r.stdout)["job_run_id"] == run_id
    assert server.cli("logs", run_id[:5], check=0).returncode == 0
    r = server.cli("job-runs", "cancel", run_id[:5], check=0)
    assert "Canceled" in r.stdout
    r = server.cli("want", "cancel", wid[:8], check=0)
    assert "Canceled" in r.stdout


def test_jobs_and_want_retry(tmp_path, serve):
    ws = write_workspace(tmp_path / "ws", plan={"bad": {"exit": 3}}, jobs=[
        {"label": "t", "partition_patterns": ["[a-z]+"], "max_retries": 1,
         "environment": {"SECRET_NAME": "value"}}])
    server = serve(ws)
    r = server.cli("build", "ok", "bad", "--wait")
    assert r.returncode == 1
    (want_id,) = [w["want_id"] for w in server.client.list_wants()["data"]]
    jobs = json.loads(server.cli("jobs", "--json", check=0).stdout)["data"]
    assert jobs == [{"label": "t", "partition_patterns": ["[a-z]+"],
                     "entrypoint": jobs[0]["entrypoint"], "executor": "local",
                     "environment_keys": ["SECRET_NAME"], "max_partitions_per_run": 1,
                     "max_retries": 1, "timeout_seconds": 0, "max_concurrent_runs": None,
                     "retry_backoff_seconds": 0, "retry_backoff_max_seconds": 3600, "options": {},
                     "code_version": jobs[0]["code_version"], "auto_rebuild": "off",
                     "job_runs": {"Succeeded": 1, "Failed": 2}}]
    table = server.cli("jobs", check=0).stdout
    assert "JOB" in table and "1 Succeeded" in table and "2 Failed" in table
    set_plan(ws, {})
    r = server.cli("want", "retry", want_id[:6], "--wait")
    assert r.returncode == 0, r.stderr
    retry = server.client.list_wants()["data"][0]
    assert retry["partitions"] == ["bad"] and retry["status"] == "Successful"
    assert retry["comment"] == "retry of want %s" % want_id
    again = server.cli("want", "retry", retry["want_id"])
    assert again.returncode == 1 and "is Live: nothing to retry" in again.stderr


def test_status_does_not_start_a_server(workspace):
    r = cli("--workspace", workspace, "status")
    assert r.returncode == 1 and "No server is running" in r.stdout
    assert not os.path.exists(os.path.join(workspace, ".databuild", "server.json"))
    r = cli("--workspace", workspace, "status", "--start")
    info = databuild.read_server_info(os.path.join(workspace, ".databuild"))
    try:
        assert r.returncode == 0 and info["url"] in r.stdout
    finally:
        cli("--workspace", workspace, "stop")


def test_help_describes_everything_and_says_the_program_name():
    parser = databuild._build_parser()
    undescribed = []

    def walk(p, path):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif not action.help:
                undescribed.append((" ".join(path), action.dest))
    walk(parser, [])
    assert undescribed == []
    serve_help = cli("serve", "--help").stdout
    assert "--server" not in serve_help and "--json" not in serve_help
    assert "--workspace" in serve_help and "--idle-timeout" in serve_help
    assert cli("--help").stdout.startswith("usage: databuild.py ")


def test_small_things(workspace, serve, tmp_path):
    server = serve(workspace)
    r = server.cli("want", "create", "a", "--json", check=0)
    want = json.loads(r.stdout)
    listed = server.cli("want", "list", "--status", "building", check=0).stdout + \
        server.cli("want", "list", "--status", "SUCCESSFUL", check=0).stdout
    assert want["want_id"] in listed and "DATA_TIME" in listed
    day = time.strftime("%Y-%m-%d", time.gmtime(want["data_timestamp"]))
    assert day in listed
    nowhere = cli("--workspace", str(tmp_path / "missing"), "want", "list")
    assert nowhere.returncode == 2 and "no such folder" in nowhere.stderr


def test_ctrl_c_in_build_wait_says_the_want_goes_on(workspace, serve):
    set_plan(workspace, {"slow": {"sleep": 30}})
    server = serve(workspace)
    proc = subprocess.Popen([sys.executable, MODULE, "--server", server.url, "build", "slow",
                             "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, DATABUILD_TOKEN=server.token))
    first = proc.stderr.readline()  # "Want <id>: Building": it follows the want now
    assert first.startswith("Want ")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    (want,) = server.client.list_wants()["data"]
    assert proc.returncode == 130 and "Traceback" not in err
    assert "goes on building" in err and "want cancel %s" % want["want_id"] in err
    assert want["status"] == "Building"


def test_overlapping_patterns_are_refused_and_no_jobs_is_warned(tmp_path, serve):
    ws = write_workspace(tmp_path / "ws", jobs=[
        {"label": "a", "partition_patterns": ["x/.*"]},
        {"label": "b", "partition_patterns": ["y/.*", "x/.*"]}])
    r = subprocess.run([sys.executable, MODULE, "serve", "--workspace", ws],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "'x/.*' is also a pattern of job 'a'" in r.stderr
    empty = write_workspace(tmp_path / "empty", jobs=[])
    server = serve(empty)
    server.stop()
    assert "has no [[jobs]]" in server.stderr


def test_client_for_workspace_and_wait_want(workspace):
    here = os.getcwd()
    os.chdir(os.path.join(workspace))
    try:
        with pytest.raises(databuild.ServerUnreachable):
            databuild.Client.for_workspace(start=False)
        client = databuild.Client.for_workspace()
    finally:
        os.chdir(here)
    try:
        assert client.token and client.health()["status"] == "ok"
        want = client.create_want(["a"])
        assert want["terminal"] is False
        done = client.wait_want(want["want_id"][:8], timeout=20)
        assert done["status"] == "Successful" and done["terminal"] is True
        set_plan(workspace, {"slow": {"sleep": 30}})
        slow = client.create_want(["slow"])
        with pytest.raises(databuild.WaitTimeout) as e:
            client.wait_want(slow["want_id"], timeout=0.3)
        assert e.value.fields["status"] == "Building"
        with pytest.raises(databuild.NotFound) as e:
            client.get_want("nope")
        assert e.value.fields == {"want_id": "nope"} and e.value.message == "Want not found"
    finally:
        client.shutdown()


def test_reviews_lineage_explain_and_taint_downstream(reviews, serve):
    server = serve(reviews)
    server.cli("build", "report/weekly/week=2025-01-06", "--wait", check=0)
    report, daily, raw = ("report/weekly/week=2025-01-06", "agg/daily/date=2025-01-08",
                          "raw/reviews/date=2025-01-08")
    part = server.client.get_partition(report)
    assert part["upstream"] == ["agg/daily/date=2025-01-%02d" % d for d in range(6, 13)]
    assert server.client.get_partition(daily)["upstream"] == [raw]
    tree = server.cli("lineage", raw, check=0).stdout
    assert "built into:" in tree and "-> %s  Live" % daily in tree and report in tree
    story = server.cli("explain", report, check=0).stdout.splitlines()
    assert story[0].startswith(report + ": Live, built by run ")
    assert any("reported missing agg/daily/date=2025-01-06" in line for line in story)
    assert 5 <= len(story) <= 10  # a few lines for the common case
    dry = server.cli("taint", raw, "--downstream", "--dry-run", check=0).stdout
    assert dry.splitlines() == ["%s: would taint 3 partitions" % raw, "  " + raw,
                                "  " + daily, "  " + report]
    assert server.client.get_partition(report)["status"] == "Live"
    server.cli("taint", raw, "--downstream", "--reason", "bad export", check=0)
    for ref in (raw, daily, report):
        assert server.client.get_partition(ref)["status"] == "Tainted"
    r = server.cli("build", report, "--wait", check=0)  # rebuilt, upstream first
    assert "Successful" in r.stdout
    story = server.cli("explain", daily, check=0).stdout
    assert "tainted: bad export (built from %s, tainted with it)" % raw in story
    assert "to rebuild it before %s" % report in story


def test_schedules_list_and_api(tmp_path, serve):
    ws = write_workspace(tmp_path / "ws")
    with open(os.path.join(ws, "databuild.toml"), "a") as f:
        f.write('\n[[schedules]]\nname = "every_hour"\ninterval_seconds = 3600\n'
                'partitions = ["hour/{data_time:%Y%m%d-%H}"]\n'
                '\n[[schedules]]\nname = "nightly"\ncron = "0 2 * * *"\n'
                'timezone = "Europe/Berlin"\npartitions = ["night/{data_time:%Y%m%d}"]\n'
                'lag_seconds = 86400\n')
    server = serve(ws)
    data = server.client.list_schedules()["data"]
    assert [s["name"] for s in data] == ["every_hour", "nightly"]
    nightly = data[1]
    assert nightly["cron"] == "0 2 * * *" and nightly["timezone"] == "Europe/Berlin"
    assert nightly["last_tick_at"] is None and nightly["next_tick_at"].endswith(":00:00.000Z")
    table = server.cli("schedules", "list", check=0).stdout
    assert "every 3600s" in table and "0 2 * * *" in table and "Europe/Berlin" in table


def test_a_workspace_with_schedules_is_never_idle(tmp_path):
    ws = write_workspace(tmp_path / "ws", server={"idle_timeout_seconds": 1})
    with open(os.path.join(ws, "databuild.toml"), "a") as f:
        f.write('\n[[schedules]]\nname = "s"\ninterval_seconds = 60\npartitions = ["x"]\n')
    server = databuild.Server(databuild.load_config(ws))
    try:
        assert server._busy()
        fired = []
        timer = databuild.IdleTimer(1, server._busy, fired.append, clock=lambda: 0.0)
        assert not timer.check(now=100.0) and not fired
    finally:
        server.close()


# -- backfills (README "Backfills") --------------------------------------------

BACKFILL = [{"label": "raw", "partition_patterns": [r"raw/date=(?P<date>[0-9-]+)"]},
            {"label": "out", "partition_patterns": [r"out/date=(?P<date>[0-9-]+)"],
             "deps": ["raw/date={date}"], "max_partitions_per_run": 10}]


def test_a_60_day_backfill_with_a_bad_day_plan_run_progress_retry(tmp_path, serve):
    ws = write_workspace(tmp_path / "ws", jobs=BACKFILL, server={"max_concurrent_job_runs": 4},
                         plan={"raw/date=2025-02-03": {"exit": 1}})
    server = serve(ws)
    refs = "out/date=[2025-01-01..2025-03-01]"
    plan = server.cli("build", refs, "--dry-run", check=0).stdout
    assert plan.splitlines()[0].split() == ["REF", "JOB", "ACTION", "DEPS"]
    assert "60 partitions wanted, 120 in the plan: 60 build, 60 waiting." in plan
    assert "66 job runs would start: out 6, raw 60" in plan
    assert server.client.list_wants()["total"] == 0  # the plan wrote nothing
    r = server.cli("build", refs, "--wait")
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert len(out.encode()) < 2048, out  # off a terminal, a long backfill stays short
    want_id = re.search(r"Want (\S+): UpstreamFailed, 59/60 live", r.stdout).group(1)
    assert "out/date=2025-02-03  UpstreamFailed  upstream failed: raw/date=2025-02-03" \
        in r.stdout
    assert re.search(r"\] UpstreamFailed: 59/60 live, 1 UpstreamFailed", r.stderr)
    listing = server.cli("want", "list", check=0).stdout
    assert re.search(want_id + r" +UpstreamFailed +59/60 ", listing)
    assert "UpstreamFailed=1" in server.cli("want", "get", want_id[:8], check=0).stdout
    set_plan(ws, {})
    retried = server.cli("want", "retry", want_id[:8], "--wait")
    assert retried.returncode == 0, retried.stderr
    assert "Successful, 1/1 live" in retried.stdout
    retry_id = re.search(r"Want (\S+): Successful", retried.stdout).group(1)
    again = server.cli("want", "retry", retry_id)
    assert again.returncode == 1 and "is Live: nothing to retry" in again.stderr
    assert again.stderr.count("\n") == 1


def test_build_wait_lists_at_most_ten_failures(tmp_path, serve):
    ws = write_workspace(tmp_path / "ws", plan={"f/%02d" % i: {"exit": 2} for i in range(13)})
    server = serve(ws)
    r = server.cli("build", "f/[00..12]", "--wait")
    assert r.returncode == 1
    lines = [line for line in r.stdout.splitlines() if line.startswith("  f/")]
    assert len(lines) == 10 and "Failed  exit code 2: planned exit 2 for f/00" in lines[0]
    assert "  and 3 more" in r.stdout
    bad = server.cli("build", "f/[3..1]")
    assert bad.returncode == 1 and "Bad range [3..1]: 3 comes after 1" in bad.stderr
    assert bad.stderr.count("\n") == 1


def test_init_writes_a_workspace_whose_printed_command_builds_it(tmp_path):
    import shlex
    ws = tmp_path / "starter"
    r = cli("init", str(ws))
    assert r.returncode == 0, r.stderr
    command = r.stdout.strip().splitlines()[-1].strip()
    assert (ws / ".gitignore").read_text().splitlines()[0] == ".databuild/"
    assert databuild.load_config(str(ws)).jobs[0].label == "greetings"
    try:
        built = subprocess.run(shlex.split(command), capture_output=True, text=True,
                               timeout=120)
        assert built.returncode == 0, built.stderr
        assert "Successful, 7/7 live" in built.stdout
        assert (ws / "data" / "greetings" / "date=2025-01-07" / "greeting.txt").read_text() \
            == "Hello from 2025-01-07\n"
    finally:
        cli("--workspace", str(ws), "stop")
    before = (ws / "databuild.toml").read_bytes()
    again = cli("init", str(ws))
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "already exists" in again.stderr
    assert (ws / "databuild.toml").read_bytes() == before  # never overwritten
