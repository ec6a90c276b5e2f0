"""The complete API against a real server over HTTP: event feed, as_of, taints,
job-run cancel, live logs (SSE), metrics, OpenAPI, CORS and the Host check."""
import http.client
import json
import os
import re
import socket
import subprocess
import time

import pytest

import databuild
from conftest import run_count, set_plan, wait_for, write_workspace


def raw_request(url, method="GET", path="/", headers=None, body=None, token=None):
    """A request with full control of the headers (urllib sets Host itself)."""
    host, port = url.split("//")[1].split(":")
    if token:
        headers = dict(headers or {}, Authorization="Bearer " + token)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def settled(client, want_id, timeout=20):
    return wait_for(lambda: (lambda w: w if w["status"] in databuild.TERMINAL_WANT_STATUSES
                             else None)(client.get_want(want_id)), timeout)


def test_event_feed_with_a_cursor(workspace, serve):
    server = serve(workspace)
    client = server.client
    want = client.create_want(["a", "b"])
    settled(client, want["want_id"])
    seen, cursor = [], 0
    while True:
        page = client.events(since=cursor, limit=3)
        if not page["data"]:
            break
        seen.extend(page["data"])
        cursor = page["data"][-1]["event_id"]
    assert [e["event_id"] for e in seen] == list(range(1, len(seen) + 1))
    assert cursor == page["latest_event_id"]
    assert seen[0]["type"] == "want_create" and seen[0]["payload"]["want_id"] == want["want_id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", seen[0]["timestamp"])
    assert {e["type"] for e in seen} >= {"want_create", "job_run_queue", "job_run_start",
                                         "job_run_success"}
    for bad in ({"since": -1}, {"since": "x"}, {"limit": 1001}, {"since": 1, "colour": "red"}):
        with pytest.raises(databuild.InvalidRequest):
            client.request("GET", "/api/events", params=bad)
    out = server.cli("events", "--since", str(len(seen) - 1), check=0).stdout.splitlines()
    assert out[0].split() == ["EVENT_ID", "TIME", "TYPE", "WHAT"]
    assert out[1].startswith(str(len(seen))) and out[2].startswith("(1 of %d events" % len(seen))


def test_time_travel_on_every_read_endpoint(workspace, serve):
    server = serve(workspace)
    client = server.client
    want = client.create_want(["a"])
    first = client.health()["latest_event_id"]
    settled(client, want["want_id"])
    (run_id,) = client.get_want(want["want_id"])["job_run_ids"]
    then = client.get_want(want["want_id"], as_of=1)
    assert then["status"] == "Idle" and then["job_run_ids"] == []
    assert client.list_wants(as_of=1)["latest_event_id"] == 1
    assert client.list_wants(as_of=1, status="Successful")["total"] == 0
    with pytest.raises(databuild.NotFound):
        client.get_partition("a", as_of=1)
    queued = client.get_partition("a", as_of=2)
    assert queued["status"] == "Building"
    assert client.get_job_run(run_id, as_of=2)["status"] == "Queued"
    assert client.list_job_runs(as_of=2)["data"][0]["status"] == "Queued"
    assert client.list_partitions(as_of=2)["total"] == 1
    assert client.list_wants(as_of=0)["total"] == 0
    assert client.get_want(want["want_id"])["status"] == "Successful"
    latest = client.health()["latest_event_id"]
    for bad in (-1, "abc", latest + 1):
        with pytest.raises(databuild.InvalidRequest):
            client.request("GET", "/api/wants", params={"as_of": bad})
    with pytest.raises(databuild.NotFound):
        client.get_want("nope", as_of=first)


def test_as_of_replays_once_for_a_burst(app_server, monkeypatch):
    http = app_server.http
    want = http.call("POST", "/api/wants", {"partitions": ["a"]}).json["data"]
    wait_for(lambda: http.call("GET", "/api/wants/" + want["want_id"]).json["data"]["status"]
             == "Successful")
    calls = []
    original = databuild.BuildState.from_events

    def counting(events):
        calls.append(1)
        return original(events)
    monkeypatch.setattr(databuild.BuildState, "from_events", staticmethod(counting))
    for _ in range(5):
        assert http.call("GET", "/api/wants?as_of=2").status == 200
    assert len(calls) == 1


def test_taint_rebuilds_at_once_while_a_live_want_needs_it(workspace, serve):
    set_plan(workspace, {"slow": {"sleep": 3}})
    server = serve(workspace)
    client = server.client
    want = client.create_want(["fast", "slow"])
    wait_for(lambda: client.get_partition("fast")["status"] == "Live")
    tainted = client.taint("fast", reason="bad rows")
    assert tainted["status"] == "Tainted"
    wait_for(lambda: run_count(workspace, "fast") == 2)  # rebuilt for the live want
    assert settled(client, want["want_id"])["status"] == "Successful"
    assert client.get_partition("fast")["status"] == "Live"
    event = client.events(since=0, limit=1000)["data"]
    taints = [e for e in event if e["type"] == "partition_taint"]
    assert taints[0]["payload"] == {"ref": "fast", "reason": "bad rows"}
    # Tainted and not wanted: rebuilt only when a new want asks for it.
    client.taint("fast")
    # A run for it would have been queued in the taint's own step, before the answer.
    assert client.get_partition("fast")["status"] == "Tainted"
    assert client.list_job_runs(status="Queued")["total"] == 0
    assert client.list_job_runs(status="Running")["total"] == 0
    assert run_count(workspace, "fast") == 2
    again = client.create_want(["fast"])
    assert settled(client, again["want_id"])["status"] == "Successful"
    assert run_count(workspace, "fast") == 3
    with pytest.raises(databuild.NotFound):
        client.taint("never-built")
    r = server.cli("taint", "never-built")
    assert r.returncode == 1 and "Partition not found" in r.stderr


def test_cancel_a_running_job_run_over_http(workspace, serve):
    set_plan(workspace, {"slow": {"sleep": 60, "sleep_times": 1}})
    server = serve(workspace)
    client = server.client
    want = client.create_want(["slow"])
    wait_for(lambda: os.path.exists(os.path.join(workspace, "runs", "pids")))  # it sleeps
    (run,) = client.list_job_runs(status="Running")["data"]
    canceled = client.cancel_job_run(run["job_run_id"])
    assert canceled["status"] == "Canceled" and canceled["error"] == "canceled by user"
    # The want goes on: the controller schedules the partition again.
    assert settled(client, want["want_id"])["status"] == "Successful"
    with pytest.raises(databuild.Conflict):
        client.cancel_job_run(run["job_run_id"])
    with pytest.raises(databuild.NotFound):
        client.cancel_job_run("nope")


def test_live_logs_stream_lines_then_complete(workspace, serve):
    set_plan(workspace, {"talky": {"stdout": "first line", "sleep": 1}})
    server = serve(workspace)
    client = server.client
    want = client.create_want(["talky"])
    wait_for(lambda: client.get_want(want["want_id"])["job_run_ids"])
    (run_id,) = client.get_want(want["want_id"])["job_run_ids"]
    got = []
    first_at = None
    for event, data in client.follow_logs(run_id):
        got.append((event, data))
        if first_at is None:
            first_at = client.get_job_run(run_id)["status"]
    assert got[0] == ("log", "first line")
    assert first_at == "Running"  # the line arrived while the job was still running
    assert got[-1][0] == "complete"
    assert got[-1][1]["status"] == "Succeeded" and got[-1][1]["exit_code"] == 0
    assert got[-1][1]["duration_ms"] >= 900
    assert ("log", "built talky") in got
    # A finished run streams its whole log and completes at once.
    again = list(client.follow_logs(run_id))
    assert again == got
    out = server.cli("logs", run_id, "--follow", check=0)
    assert out.stdout == "first line\nbuilt talky\n"
    assert "Succeeded" in out.stderr
    status, headers, _ = raw_request(server.url, token=server.token, path="/api/job_runs/%s/logs/stdout?follow=true"
                                     % run_id, headers={"Host": server.url.split("//")[1]})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    with pytest.raises(databuild.NotFound):
        list(client.follow_logs("nope"))
    with pytest.raises(databuild.NotFound):
        list(client.follow_logs(run_id, "other"))


def test_sse_client_disconnect_frees_the_stream(workspace, serve):
    set_plan(workspace, {"slow": {"sleep": 60}})
    server = serve(workspace)
    client = server.client
    want = client.create_want(["slow"])
    wait_for(lambda: client.get_want(want["want_id"])["job_run_ids"])
    (run_id,) = client.get_want(want["want_id"])["job_run_ids"]
    host = server.url.split("//")[1]
    # Open and drop more streams than there are slots: each must be released.
    for _ in range(12):
        sock = socket.create_connection(tuple(host.split(":")[:1]) + (int(host.split(":")[1]),))
        sock.sendall(("GET /api/job_runs/%s/logs/stdout?follow=true HTTP/1.1\r\nHost: %s\r\n"
                      "Authorization: Bearer %s\r\n\r\n" % (run_id, host, server.token)).encode())
        answer = sock.recv(4096)
        assert b"200 OK" in answer or b"503 Service Unavailable" in answer
        sock.close()
    # Other requests are not blocked, and a new stream gets a slot once the
    # dropped ones noticed (a heartbeat every second).
    assert client.health()["status"] == "ok"

    def stream_opens():
        try:
            conn = http.client.HTTPConnection(*host.split(":"), timeout=5)
            conn.request("GET", "/api/job_runs/%s/logs/stdout?follow=true" % run_id,
                         headers={"Authorization": "Bearer " + server.token})
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False
    wait_for(stream_opens, timeout=20, interval=0.5)
    client.cancel_want(want["want_id"])


def test_metrics_parse_with_the_reference_parser(workspace, serve):
    from prometheus_client.parser import text_string_to_metric_families
    set_plan(workspace, {"bad": {"exit": 2}})
    server = serve(workspace)
    client = server.client
    ok = client.create_want(["good"], sla_seconds=1, data_timestamp=time.time() - 60)
    bad = client.create_want(["bad"])
    settled(client, ok["want_id"])
    settled(client, bad["want_id"])
    with pytest.raises(databuild.NotFound):
        client.get_want("nope")
    status, headers, body = raw_request(server.url, token=server.token, path="/metrics",
                                        headers={"Host": server.url.split("//")[1]})
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("databuild_wants", (("status", "Successful"),))] == 1
    assert samples[("databuild_wants", (("status", "Failed"),))] == 1
    assert samples[("databuild_partitions", (("status", "Live"),))] == 1
    assert samples[("databuild_job_runs", (("status", "Failed"),))] == 1
    assert samples[("databuild_events_total", ())] == client.health()["latest_event_id"] - 0
    assert samples[("databuild_sla_breaches_total", ())] == 1
    assert samples[("databuild_http_requests_total", (("code", "404"), ("method", "GET")))] >= 1
    assert samples[("databuild_http_requests_total", (("code", "201"), ("method", "POST")))] == 2
    assert families["databuild_job_run_duration_seconds"].type == "histogram"
    assert samples[("databuild_job_run_duration_seconds_count", ())] == 2
    assert samples[("databuild_job_run_duration_seconds_bucket", (("le", "+Inf"),))] == 2


def test_openapi_document_is_valid_and_matches_the_routes(app_server):
    from openapi_spec_validator import validate
    r = app_server.http.call("GET", "/api/openapi.json")
    assert r.status == 200
    document = r.json
    validate(document)
    documented = {(method.upper(), path) for path, item in document["paths"].items()
                  for method in item}
    actual = set()
    for route in app_server.bottle_app.routes:
        path = re.sub(r"<([a-z_]+)(:[a-z]+)?(:[^>]+)?>", r"{\1}", route.rule)
        actual.add((route.method, path))
    assert documented == actual
    for path, item in document["paths"].items():
        for method, op in item.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), (method, path)


def test_cors_for_configured_origins_only(workspace, serve):
    server = serve(workspace)
    host = server.url.split("//")[1]
    status, headers, _ = raw_request(server.url, token=server.token, path="/api/wants", headers={
        "Host": host, "Origin": "http://localhost:3000"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    status, headers, _ = raw_request(server.url, token=server.token, method="OPTIONS", path="/api/wants", headers={
        "Host": host, "Origin": "http://localhost:3000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert headers["Access-Control-Allow-Methods"] == "GET, OPTIONS, POST"
    # Allow names the methods of the path asked about (the preflight needs no token).
    for path, allow in (("/api/wants/x", "DELETE, GET, OPTIONS"),
                        ("/api/job_runs/x/cancel", "OPTIONS, POST"),
                        ("/health", "GET, OPTIONS")):
        code, allowed, _ = raw_request(server.url, method="OPTIONS", path=path,
                                       headers={"Host": host})
        assert code == 204 and allowed["Allow"] == allow, (path, allowed)
    assert raw_request(server.url, method="OPTIONS", path="/nowhere",
                       headers={"Host": host})[0] == 404
    assert "Content-Type" in headers["Access-Control-Allow-Headers"]
    for method in ("GET", "OPTIONS"):
        status, headers, _ = raw_request(server.url, token=server.token, method=method, path="/api/wants", headers={
            "Host": host, "Origin": "http://evil.example",
            "Access-Control-Request-Method": "POST"})
        assert not any(k.lower().startswith("access-control") for k in headers), headers


def test_foreign_host_is_refused(workspace, serve):
    server = serve(workspace)
    port = server.url.rsplit(":", 1)[1]
    for host in ("evil.example", "evil.example:%s" % port, "127.0.0.1:1",
                 "localhost.evil.example:%s" % port, ""):
        status, headers, body = raw_request(server.url, path="/api/wants", token=server.token,
                                            headers={"Host": host} if host else {})
        assert status == 400 and "Host" in json.loads(body)["error"], host
    body = json.dumps({"partitions": ["a"]}).encode()
    status, _, _ = raw_request(server.url, "POST", "/api/wants", token=server.token, body=body, headers={
        "Host": "evil.example:%s" % port, "Content-Type": "application/json"})
    assert status == 400
    assert server.client.list_wants()["total"] == 0  # refused: no trace
    for host in ("127.0.0.1:%s" % port, "localhost:%s" % port):
        assert raw_request(server.url, token=server.token, path="/health", headers={"Host": host})[0] == 200


def test_simple_cross_site_posts_are_refused(workspace, serve):
    server = serve(workspace)
    host = server.url.split("//")[1]
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        status, _, body = raw_request(server.url, "POST", "/api/wants", token=server.token,
                                      body=b'{"partitions": ["a"]}',
                                      headers={"Host": host, "Content-Type": ctype,
                                               "Origin": "http://evil.example"})
        assert status == 415, ctype
    assert server.client.list_wants()["total"] == 0


def test_dashboard_is_self_contained_html(app_server):
    r = app_server.http.call("GET", "/")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    page = r.body.decode()
    assert "<table" in page and "/api/wants" in page
    assert not re.search(r"""(src|href)=["']https?://""", page)  # no external assets


def test_jobs_get_the_token_and_can_call_the_api(workspace, serve):
    server = serve(workspace)
    want = server.client.create_want(["a"])
    assert settled(server.client, want["want_id"])["status"] == "Successful"
    with open(os.path.join(workspace, "built", "a")) as f:
        env = json.load(f)["env"]
    assert env["DATABUILD_TOKEN"] == server.token and env["DATABUILD_URL"] == server.url
    job_client = databuild.Client(env["DATABUILD_URL"], token=env["DATABUILD_TOKEN"])
    assert job_client.get_want(want["want_id"])["status"] == "Successful"
    with pytest.raises(databuild.Unauthorized):
        databuild.Client(server.url).list_wants()


def _peak_rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])


def test_log_downloads_are_streamed_and_tail_reads_the_end(workspace, serve):
    server = serve(workspace)
    want = server.client.create_want(["a"])
    (run_id,) = settled(server.client, want["want_id"])["job_run_ids"]
    log = os.path.join(workspace, ".databuild", "logs", run_id, "stdout.log")
    size = 60 * 1024 * 1024
    with open(log, "r+b") as f:
        f.truncate(size)  # 60 MB (sparse: fast to make, as long to send)
        f.seek(size - 10)
        f.write(b"last line\n")
    before = _peak_rss_kb(server.proc.pid)

    def download():
        host, port = server.url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("GET", "/api/job_runs/%s/logs/stdout" % run_id,
                     headers={"Authorization": "Bearer " + server.token})
        resp = conn.getresponse()
        total = 0
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
        conn.close()
        return resp.status, resp.getheader("Content-Length"), total
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: download(), range(4)))
    assert results == [(200, str(size), size)] * 4
    growth_mb = (_peak_rss_kb(server.proc.pid) - before) / 1024
    print("peak RSS growth: %.1f MB" % growth_mb)
    assert growth_mb < 50, growth_mb  # read whole, it was > 240 MB
    assert server.client.logs(run_id, tail=10) == "last line\n"
    assert server.client.logs(run_id, tail=10 ** 12).endswith("last line\n")
    assert server.cli("logs", run_id, "--tail", "5", check=0).stdout == "line\n"


FUZZ_CONFIG = """\
# Checks left out (--exclude-checks) that cannot hold for this API, and why:
# - positive_data_acceptance: a schema-valid ref is still refused when no job
#   produces it, and as_of past the newest event is a 400 (both need state).
# 413 (a body over 1 MiB) is a rejection too.
[checks]
negative_data_rejection.expected-statuses = [400, 401, 404, 405, 409, 413, 415]
"""


def test_api_fuzzer_finds_no_server_error_and_no_answer_off_the_document(
        tmp_path, workspace, serve):
    """schemathesis over every operation of /api/openapi.json (but shutdown),
    all its checks, a bounded number of examples: no 5xx, every answer as
    documented, and nothing in the server's log but requests."""
    pytest.importorskip("schemathesis", reason="the API fuzzer is in the test extras: "
                                               "pip install -e '.[test]'")
    import sys
    config = tmp_path / "schemathesis.toml"
    config.write_text(FUZZ_CONFIG)
    server = serve(workspace)
    r = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
         server.url + "/api/openapi.json", "-H", "Authorization: Bearer " + server.token,
         "--checks", "all", "--exclude-checks",
         "positive_data_acceptance", "--max-examples", "30", "--exclude-operation-id", "shutdown",
         "--seed", "1", "--no-color", "--generation-database", "none",
         "--request-timeout", "20"],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert server.client.health()["status"] == "ok"
    assert server.stop() == 0
    assert "Traceback" not in server.stderr and "Unhandled error" not in server.stderr


# -- backfills over HTTP (README "Backfills") ---------------------------------

BACKFILL_JOBS = [
    {"label": "raw", "partition_patterns": [r"raw/date=(?P<date>\d{4}-\d{2}-\d{2})"]},
    {"label": "out", "partition_patterns": [r"out/date=(?P<date>\d{4}-\d{2}-\d{2})"],
     "deps": ["raw/date={date}"]},
    {"label": "num", "partition_patterns": [r"n/\d+", r"m/\d{4}-\d{2}", r"h/\d{4}-\d{2}-\d{2}T\d{2}"]},
]


@pytest.fixture
def backfill_ws(tmp_path):
    return write_workspace(tmp_path / "bf", jobs=BACKFILL_JOBS,
                           plan={"raw/date=2025-01-05": {"exit": 1}})


def post(server, path, body):
    """(status, JSON answer) of a POST over a real socket."""
    host = server.url.split("//")[1]
    status, _, raw = raw_request(server.url, "POST", path, token=server.token,
                                 headers={"Content-Type": "application/json", "Host": host},
                                 body=json.dumps(body).encode())
    return status, json.loads(raw)


@pytest.mark.parametrize("ref, count, first, last", [
    ("raw/date=[2025-01-30..2025-03-01]", 31, "raw/date=2025-01-30", "raw/date=2025-03-01"),
    ("m/[2024-11..2025-02]", 4, "m/2024-11", "m/2025-02"),
    ("h/[2025-01-01T22..2025-01-02T01]", 4, "h/2025-01-01T22", "h/2025-01-02T01"),
    ("n/[0098..0101]", 4, "n/0098", "n/0101"),
])
def test_a_range_is_expanded_into_the_wants_refs(backfill_ws, serve, ref, count, first, last):
    server = serve(backfill_ws)
    plan = server.client.plan_want([ref])
    assert len(plan["partitions"]) == count
    assert (plan["partitions"][0], plan["partitions"][-1]) == (first, last)


@pytest.mark.parametrize("ref, says", [
    ("raw/date=[2025-01-02..2025-01-01]", "comes after"),
    ("raw/date=[2025-01..2025-01-03]", "of one kind"),
    ("raw/date=[2025-02-29..2025-03-01]", "day is out of range"),
    ("n/[1..2]/[3..4]", "at most one [FROM..TO]"),
    ("n/[0..10000]", "at most 10000 partitions; this one names 10001"),
    ("raw/date=[2025-01-01..2025-01-02]x", "No job produces partition"),
])
def test_a_bad_range_is_a_400_naming_it_and_writes_nothing(backfill_ws, serve, ref, says):
    server = serve(backfill_ws)
    before = server.client.health()["latest_event_id"]
    for path in ("/api/wants", "/api/wants?dry_run=true"):
        status, body = post(server, path, {"partitions": [ref]})
        assert status == 400 and says in body["error"], body
    assert server.client.health()["latest_event_id"] == before


def test_a_backfill_with_a_bad_day_plans_runs_settles_and_retries(backfill_ws, serve):
    server = serve(backfill_ws)
    before = server.client.health()["latest_event_id"]
    status, planned = post(server, "/api/wants?dry_run=true",
                           {"partitions": ["out/date=[2025-01-01..2025-01-08]"]})
    assert status == 200 and planned["data"]["runs"] == 16
    assert planned["data"]["jobs"] == {"out": 8, "raw": 8}
    assert {e["action"] for e in planned["data"]["plan"]} == {"waiting", "build"}
    assert server.client.health()["latest_event_id"] == before  # a plan writes nothing
    want = server.client.create_want(["out/date=[2025-01-01..2025-01-08]"])
    assert want["counts"]["total"] == 8
    final = settled(server.client, want["want_id"])
    assert final["status"] == "UpstreamFailed"
    assert final["counts"] == {"total": 8, "Live": 7, "UpstreamFailed": 1}
    # Each out partition ran once (declared deps: no dep-miss runs), the bad one never.
    outs = server.client.list_job_runs(job_label="out")["data"]
    assert sorted(r["status"] for r in outs) == ["Succeeded"] * 7
    # A job's totals come from the counters kept with the projection.
    assert server.client.list_job_runs(job_label="out", limit=2)["total"] == 7
    assert server.client.list_job_runs(job_label="raw", status="Failed")["total"] == \
        len(server.client.list_job_runs(job_label="raw", status="Failed")["data"]) >= 1
    lineage = server.client.request("GET", "/api/partitions/out/date=2025-01-05/lineage")
    assert [u["ref"] for u in lineage["data"]["upstream"]] == ["raw/date=2025-01-05"]
    # Retry wants what is not Live, once the bad day is mended.
    set_plan(server.workspace, {})
    status, retry = post(server, "/api/wants/%s/retry" % want["want_id"], {})
    assert status == 201
    assert retry["data"]["partitions"] == ["out/date=2025-01-05"]
    assert retry["data"]["source"] == {"type": "retry", "want_id": want["want_id"]}
    assert settled(server.client, retry["data"]["want_id"])["status"] == "Successful"
    status, body = post(server, "/api/wants/%s/retry" % retry["data"]["want_id"], {})
    assert status == 409 and "nothing to retry" in body["error"]
    status, body = post(server, "/api/wants/nope-nope/retry", {})
    assert status == 404 and body["want_id"] == "nope-nope"
    status, body = post(server, "/api/wants/%s/retry" % want["want_id"], {"x": 1})
    assert status == 400


def test_canceling_a_backfill_marks_never_built_partitions_canceled(backfill_ws, serve):
    write_workspace(backfill_ws, jobs=BACKFILL_JOBS, server={"max_concurrent_job_runs": 1},
                    plan={"raw/date=2025-01-01": {"sleep": 30}})
    server = serve(backfill_ws)
    want = server.client.create_want(["out/date=[2025-01-01..2025-01-03]"])
    wait_for(lambda: server.client.list_job_runs(status="Running")["data"])
    canceled = server.client.cancel_want(want["want_id"])
    assert canceled["status"] == "Canceled"
    final = wait_for(lambda: (lambda w: w if w["counts"].get("Canceled") == 3 else None)(
        server.client.get_want(want["want_id"])))
    assert final["counts"] == {"total": 3, "Canceled": 3}
    raw = server.client.get_partition("raw/date=2025-01-01")
    assert raw["status"] == "Canceled"
    explained = server.client.request("GET", "/api/partitions/out/date=2025-01-01/explain")
    assert explained["data"]["summary"].startswith("Canceled")


def test_refs_that_end_like_a_route_are_read_and_tainted_by_query(workspace, serve):
    server = serve(workspace)
    refs = ["x/lineage", "y/explain", "z/taint"]
    want = server.client.create_want(refs)
    assert settled(server.client, want["want_id"])["status"] == "Successful"
    host = {"Host": server.url.split("//")[1]}
    for ref in refs:
        assert server.client.get_partition(ref)["ref"] == ref
        assert server.client.lineage(ref)["ref"] == ref
        assert server.client.explain(ref)["ref"] == ref
        assert server.cli("partitions", "get", ref).returncode == 0
        assert ref in server.cli("explain", ref, check=0).stdout
    # The CLI and the client taint through ?ref=, whatever the ref ends with.
    assert server.cli("taint", "z/taint", "--reason", "bad", check=0).stdout == \
        "z/taint: Tainted\n"
    assert server.client.get_partition("z/taint")["status"] == "Tainted"
    # Explain as of an earlier event: the story up to there.
    head = server.client.health()["latest_event_id"]
    earlier = server.client.explain("z/taint", as_of=head - 1)
    assert earlier["status"] == "Live" and len(server.client.explain("z/taint")["steps"]) == \
        len(earlier["steps"]) + 1
    # A path ending in /taint is the taint's: GET says 405 and names POST only.
    status, headers, _ = raw_request(server.url, "OPTIONS", "/api/partitions/z/taint",
                                     headers=host)
    assert status == 204 and headers["Allow"] == "OPTIONS, POST"
    status, headers, _ = raw_request(server.url, "GET", "/api/partitions/z/taint",
                                     headers=host, token=server.token)
    assert status == 405
    status, _, body = raw_request(server.url, "GET", "/api/partition", headers=host,
                                  token=server.token)
    assert status == 400 and json.loads(body)["parameter"] == "ref"
    status, _, body = raw_request(server.url, "GET", "/api/partition?ref=nope", headers=host,
                                  token=server.token)
    assert status == 404 and json.loads(body)["ref"] == "nope"


def read_to_close(sock):
    """What the server sends until it closes the connection, as text."""
    data = b""
    while True:
        try:
            more = sock.recv(65536)
        except ConnectionResetError:
            break
        if not more:
            break
        data += more
    sock.close()
    return data.decode()


def test_idle_sockets_and_big_bodies_do_not_stop_the_server(workspace, serve):
    server = serve(workspace)
    host, port = server.url.split("//")[1].split(":")
    idle = []
    try:
        for _ in range(300):  # unauthenticated, saying nothing
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        t0 = time.monotonic()
        fast = databuild.Client(server.url, timeout=2, token=server.token)
        assert fast.health()["status"] == "ok"
        assert fast.list_wants()["total"] == 0  # an authenticated read
        assert time.monotonic() - t0 < 2
        # A 500 MB body, unauthenticated: refused (413, JSON) from its headers,
        # before a byte of it is read or stored.
        big = socket.create_connection((host, int(port)), timeout=5)
        big.sendall(("POST /api/wants HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: "
                     "application/json\r\nContent-Length: %d\r\n\r\n"
                     % (host, port, 500 * 1024 * 1024)).encode())
        answer = read_to_close(big)
        assert answer.startswith("HTTP/1.1 413 "), answer[:200]
        assert "application/json" in answer
        assert json.loads(answer.split("\r\n\r\n", 1)[1])["limit"] == 1024 * 1024
        # A chunked body over the limit: refused the same way, as JSON.
        chunked = socket.create_connection((host, int(port)), timeout=5)
        chunked.sendall(("POST /api/wants HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: "
                         "application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         % (host, port)).encode())
        chunk = b"x" * 65536
        try:
            for _ in range(20):  # 1.25 MiB
                chunked.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server closed the connection once the limit was passed
        answer = read_to_close(chunked)
        assert answer.startswith("HTTP/1.1 413 "), answer[:200]
    finally:
        for s in idle:
            s.close()
    assert server.client.health()["status"] == "ok"
