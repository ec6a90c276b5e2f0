"""The HTTP API in-process (the WSGI app with a running orchestrator)."""
import json
import time
import urllib.parse

import pytest

from conftest import set_plan, wait_for


def create(server, *refs, **fields):
    body = {"partitions": list(refs)}
    body.update(fields)
    return server.http.call("POST", "/api/wants", body)


def settle(server, want_id, timeout=15):
    def done():
        want = server.http.call("GET", "/api/wants/" + want_id).json["data"]
        return want if want["status"] in ("Successful", "Failed", "UpstreamFailed",
                                          "Canceled", "Expired") else None
    return wait_for(done, timeout)


def test_health(app_server):
    r = app_server.http.call("GET", "/health")
    assert r.status == 200 and r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert r.json["status"] == "ok" and r.json["version"]
    assert r.json["latest_event_id"] == 0 and r.json["uptime_seconds"] >= 0


def test_create_get_list_want(app_server):
    stamp = int(time.time()) - 10
    r = create(app_server, "out/a", comment="hi", user="alice", ttl_seconds=3600,
               sla_seconds=60, data_timestamp=stamp)
    assert r.status == 201
    want = r.json["data"]
    assert set(want) == {"want_id", "partitions", "status", "partition_statuses", "counts",
                         "data_timestamp", "ttl_seconds", "sla_seconds", "sla_breached",
                         "source", "parent_want_id", "root_want_id", "derivative_want_ids",
                         "job_run_ids", "comment", "created_at", "updated_at", "terminal",
                         "priority"}
    assert want["terminal"] is False
    assert want["source"] == {"type": "manual", "user": "alice"}
    assert want["comment"] == "hi" and want["data_timestamp"] == stamp
    assert want["root_want_id"] == want["want_id"] and want["parent_want_id"] is None
    # Read your writes: the want is there as soon as the reply came.
    got = app_server.http.call("GET", "/api/wants/" + want["want_id"])
    assert got.status == 200 and got.json["data"]["want_id"] == want["want_id"]
    listing = app_server.http.call("GET", "/api/wants").json
    assert set(listing) == {"data", "total", "limit", "offset", "latest_event_id"}
    assert listing["total"] == 1 and listing["limit"] == 100 and listing["offset"] == 0
    assert listing["latest_event_id"] >= 1
    final = settle(app_server, want["want_id"])
    assert final["status"] == "Successful"
    assert final["partition_statuses"] == {"out/a": "Live"}


def test_a_want_past_its_ttl_expires(app_server):
    want = create(app_server, "a", data_timestamp=1735689600, ttl_seconds=60).json["data"]
    assert settle(app_server, want["want_id"])["status"] == "Expired"


def test_list_wants_paging_and_status(app_server):
    ids = [create(app_server, "p%d" % i).json["data"]["want_id"] for i in range(5)]
    for want_id in ids:
        settle(app_server, want_id)
    page = app_server.http.call("GET", "/api/wants?limit=2&offset=1").json
    assert [w["want_id"] for w in page["data"]] == [ids[3], ids[2]]  # newest first
    assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == 1
    ok = app_server.http.call("GET", "/api/wants?status=Successful&limit=3").json
    assert ok["total"] == 5 and [w["want_id"] for w in ok["data"]] == ids[::-1][:3]
    none = app_server.http.call("GET", "/api/wants?status=Failed").json
    assert none["total"] == 0 and none["data"] == []


def test_want_id_idempotency_over_http(app_server):
    first = create(app_server, "a", want_id="mine-1")
    again = create(app_server, "a", want_id="mine-1")
    other = create(app_server, "b", want_id="mine-1")
    assert (first.status, again.status, other.status) == (201, 200, 409)
    assert again.json["data"]["want_id"] == "mine-1"
    assert other.json["want_id"] == "mine-1" and "error" in other.json


def test_cancel_want(app_server):
    set_plan(app_server.config.root, {"slow": {"sleep": 30}})
    want = create(app_server, "slow").json["data"]
    r = app_server.http.call("DELETE", "/api/wants/" + want["want_id"])
    assert r.status == 200 and r.json["data"]["status"] == "Canceled"
    again = app_server.http.call("DELETE", "/api/wants/" + want["want_id"])
    assert again.status == 409 and again.json["want_id"] == want["want_id"]
    missing = app_server.http.call("DELETE", "/api/wants/nope")
    assert missing.status == 404 and missing.json == {"error": "Want not found", "want_id": "nope"}


def test_partitions_and_job_runs(app_server):
    set_plan(app_server.config.root, {"report/w=1": {"deps": ["raw/d=1", "raw/d=2"]}})
    want = create(app_server, "report/w=1").json["data"]
    assert settle(app_server, want["want_id"])["status"] == "Successful"
    http = app_server.http
    part = http.call("GET", "/api/partitions/report/w=1")
    assert part.status == 200
    assert set(part.json["data"]) == {"ref", "status", "job_label", "last_job_run_id",
                                      "built_by_job_run_id", "want_ids", "missing_deps",
                                      "updated_at", "upstream", "retry_at", "code_version",
                                      "built_at", "stale", "stale_reasons"}
    assert part.json["data"]["status"] == "Live" and want["want_id"] in part.json["data"]["want_ids"]
    assert http.call("GET", "/api/partitions/raw/d=9").status == 404
    raw = http.call("GET", "/api/partitions?prefix=raw/").json
    assert raw["total"] == 2 and {p["ref"] for p in raw["data"]} == {"raw/d=1", "raw/d=2"}
    live = http.call("GET", "/api/partitions?status=Live&prefix=report").json
    assert [p["ref"] for p in live["data"]] == ["report/w=1"]
    past = http.call("GET", "/api/partitions?prefix=raw/&offset=5").json
    assert past["data"] == [] and past["total"] == 2  # counted even past the last page
    assert http.call("GET", "/api/partitions?prefix=nope/").json["total"] == 0
    runs = http.call("GET", "/api/job_runs").json
    assert runs["total"] == 4  # dep miss, two upstream builds, the rerun
    run = runs["data"][0]
    assert set(run) == {"job_run_id", "job_label", "partitions", "want_ids", "status", "attempt",
                        "exit_code", "missing_deps", "error", "queued_at", "started_at",
                        "finished_at", "duration_ms", "executor", "external_id", "code_version"}
    dep_miss = http.call("GET", "/api/job_runs?status=DepMiss").json["data"]
    assert len(dep_miss) == 1 and dep_miss[0]["missing_deps"] == ["raw/d=1", "raw/d=2"]
    mine = http.call("GET", "/api/job_runs?want_id=" + want["want_id"]).json
    assert mine["total"] == 2
    by_label = http.call("GET", "/api/job_runs?job_label=test&status=Succeeded").json
    assert by_label["total"] == 3
    assert http.call("GET", "/api/job_runs?job_label=other").json["total"] == 0
    one = http.call("GET", "/api/job_runs/" + run["job_run_id"])
    assert one.status == 200 and one.json["data"] == run
    assert http.call("GET", "/api/job_runs/nope").status == 404


def test_job_run_logs(app_server):
    set_plan(app_server.config.root, {"a": {"stdout": "hello from the job"}})
    want = create(app_server, "a").json["data"]
    settle(app_server, want["want_id"])
    (run_id,) = app_server.http.call("GET", "/api/wants/" + want["want_id"]).json["data"]["job_run_ids"]
    out = app_server.http.call("GET", "/api/job_runs/%s/logs/stdout" % run_id)
    assert out.status == 200 and out.headers["Content-Type"].startswith("text/plain")
    assert out.body.decode().startswith("hello from the job\n")
    err = app_server.http.call("GET", "/api/job_runs/%s/logs/stderr" % run_id)
    assert err.status == 200 and err.body == b""
    assert app_server.http.call("GET", "/api/job_runs/%s/logs/other" % run_id).status == 404
    assert app_server.http.call("GET", "/api/job_runs/nope/logs/stdout").status == 404
    # Never a path from user input.
    assert app_server.http.call("GET", "/api/job_runs/..%2F..%2Fdatabuild.toml/logs/stdout").status == 404


def test_events_feed(app_server):
    want = create(app_server, "a").json["data"]
    settle(app_server, want["want_id"])
    feed = app_server.http.call("GET", "/api/events?since=0&limit=2").json
    assert [e["event_id"] for e in feed["data"]] == [1, 2]
    assert feed["data"][0]["type"] == "want_create"
    rest = app_server.http.call("GET", "/api/events?since=2").json["data"]
    assert rest[0]["event_id"] == 3 and rest[-1]["type"] == "job_run_success"
    # Newest first before an id, and one type only (its total is not counted).
    back = app_server.http.call("GET", "/api/events?before=3&limit=5").json
    assert [e["event_id"] for e in back["data"]] == [2, 1] and back["total"] == 2
    typed = app_server.http.call("GET", "/api/events?type=want_create&before=99").json
    assert [e["type"] for e in typed["data"]] == ["want_create"] and typed["total"] is None
    assert [e["event_id"] for e in app_server.http.call(
        "GET", "/api/events?type=job_run_start").json["data"]] == [3]
    bad = app_server.http.call("GET", "/api/events?type=nope")
    assert bad.status == 400 and bad.json["parameter"] == "type"


@pytest.mark.parametrize("body, field", [
    ({}, "partitions"),
    ({"partitions": []}, "partitions"),
    ({"partitions": "a"}, "partitions"),
    ({"partitions": [1]}, None),
    ({"partitions": ["has space"]}, None),
    ({"partitions": ["a"], "colour": "red"}, None),
    ({"partitions": ["a"], "ttl_seconds": -1}, "ttl_seconds"),
    ({"partitions": ["a"], "ttl_seconds": "1"}, "ttl_seconds"),
    ({"partitions": ["a"], "sla_seconds": True}, "sla_seconds"),
    ({"partitions": ["a"], "data_timestamp": "yesterday"}, "data_timestamp"),
    ({"partitions": ["a"], "want_id": "has space"}, "want_id"),
    ({"partitions": ["a"], "comment": 5}, "comment"),
    ([1, 2], None),
    # Numbers in their ranges only (README "HTTP API"), before anything is written.
    ({"partitions": ["a"], "ttl_seconds": 10 ** 400}, "ttl_seconds"),
    ({"partitions": ["a"], "ttl_seconds": 10 ** 30}, "ttl_seconds"),
    ({"partitions": ["a"], "ttl_seconds": 315360001}, "ttl_seconds"),
    ({"partitions": ["a"], "ttl_seconds": 0.5}, "ttl_seconds"),
    ({"partitions": ["a"], "sla_seconds": 1e300}, "sla_seconds"),
    ({"partitions": ["a"], "data_timestamp": 1e300}, "data_timestamp"),
    ({"partitions": ["a"], "data_timestamp": 253402300800}, "data_timestamp"),
    ({"partitions": ["a"], "data_timestamp": -1}, "data_timestamp"),
    ({"partitions": ["a"], "priority": 1000001}, "priority"),
    ({"partitions": ["a"], "priority": 10 ** 400}, "priority"),
])
def test_bad_want_bodies_are_400_and_leave_no_trace(app_server, body, field):
    r = app_server.http.call("POST", "/api/wants", body)
    assert r.status == 400, r
    assert isinstance(r.json["error"], str)
    if field:
        assert r.json.get("field") == field
    assert app_server.http.call("GET", "/health").json["latest_event_id"] == 0


def test_ref_no_job_produces_is_named(tmp_path):
    from conftest import WSGIClient, write_workspace
    import databuild
    ws = write_workspace(tmp_path / "ws", jobs=[{"label": "a", "partition_patterns": ["a/.*"]},
                                                {"label": "b", "partition_patterns": ["a/b.*"]}])
    server = databuild.Server(databuild.load_config(ws))
    try:
        http = WSGIClient(server.app, server.token)
        r = http.call("POST", "/api/wants", {"partitions": ["zzz"]})
        assert r.status == 400 and r.json["ref"] == "zzz"
        r = http.call("POST", "/api/wants", {"partitions": ["a/bee"]})
        assert r.status == 400 and r.json["ref"] == "a/bee" and "more than one" in r.json["error"]
    finally:
        server.close()


def test_protocol_errors(app_server):
    http = app_server.http
    bad_json = http.call("POST", "/api/wants", raw_body=b"{nope")
    assert bad_json.status == 400 and "JSON" in bad_json.json["error"]
    wrong_type = http.call("POST", "/api/wants", raw_body=b"partitions=a",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert wrong_type.status == 415
    no_type = http.call("POST", "/api/wants", raw_body=b"{}", headers={"Content-Type": None})
    assert no_type.status == 415
    big = http.call("POST", "/api/wants", raw_body=b" " * (1024 * 1024 + 1))
    assert big.status == 413
    assert http.call("GET", "/nowhere").status == 404
    assert http.call("GET", "/nowhere").json["error"] == "Not found"
    put = http.call("PUT", "/api/wants")
    assert put.status == 405 and put.json["error"] == "Method not allowed"
    assert http.call("POST", "/api/job_runs/x").status == 405
    assert http.call("GET", "/api/wants?limit=5000").status == 400
    assert http.call("GET", "/api/wants?limit=-1").status == 400
    assert http.call("GET", "/api/wants?offset=x").status == 400
    assert http.call("GET", "/api/wants?status=Done").status == 400
    assert http.call("GET", "/api/partitions?status=Building&colour=1").status == 400
    assert http.call("GET", "/api/events?since=-1").status == 400
    assert http.call("GET", "/api/wants?as_of=99").status == 400
    empty = http.call("POST", "/api/shutdown", raw_body=b"")  # an empty body reads as {}
    assert empty.status == 202
    for r in (bad_json, wrong_type, big, put):
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert app_server.stop_reason == "shutdown requested over HTTP"


def test_taint_and_cancel_routes(app_server):
    http = app_server.http
    want = create(app_server, "a").json["data"]
    settle(app_server, want["want_id"])
    r = http.call("POST", "/api/partitions/a/taint", {"reason": "late data"})
    assert r.status == 200 and r.json["data"]["status"] == "Tainted"
    assert http.call("POST", "/api/partitions/none/taint", {}).status == 404
    assert http.call("POST", "/api/partitions/a/taint", {"why": 1}).status == 400
    (run_id,) = want["job_run_ids"]
    r = http.call("POST", "/api/job_runs/%s/cancel" % run_id, {})
    assert r.status == 409 and r.json["job_run_id"] == run_id
    assert http.call("POST", "/api/job_runs/nope/cancel", {}).status == 404


def test_as_of_reads_the_past(app_server):
    want = create(app_server, "a").json["data"]
    settle(app_server, want["want_id"])
    then = app_server.http.call("GET", "/api/wants/%s?as_of=1" % want["want_id"]).json["data"]
    assert then["status"] == "Idle"
    listing = app_server.http.call("GET", "/api/partitions?as_of=1").json
    assert listing["total"] == 0 and listing["latest_event_id"] == 1


def test_unexpected_errors_are_500_with_an_id(app_server, monkeypatch, caplog):
    def boom(*a, **k):
        raise RuntimeError("secret detail")
    monkeypatch.setattr(app_server.read_model.log, "list_events", boom)
    r = app_server.http.call("GET", "/api/events")
    assert r.status == 500 and r.json["error"] == "Internal server error"
    assert "secret" not in r.body.decode() and "Traceback" not in r.body.decode()
    assert r.json["error_id"] in caplog.text


def test_orchestrator_timeout_is_503(app_server, monkeypatch):
    import databuild
    app_server.orchestrator.stop()
    monkeypatch.setitem(databuild.DEFAULTS, "command_timeout_seconds", 0.05)
    app_server.orchestrator._stop_requested = False  # stopped, but still accepting commands
    r = create(app_server, "a")
    assert r.status == 503


# -- bad input is a 400 that names what is wrong, and leaves no trace --

def _strict_json(body):
    def refuse(name):
        raise AssertionError("not JSON: %s" % name)
    return json.loads(body.decode("utf-8"), parse_constant=refuse)  # strict UTF-8 too


@pytest.mark.parametrize("raw, field", [
    (b'{"partitions": ["x"], "comment": "\\ud800"}', "comment"),
    (b'{"partitions": ["x"], "user": "a\\udfffb"}', "user"),
    (b'{"partitions": ["x\\ud800"]}', "partitions"),
    (b'{"partitions": [{"a": 1}]}', "partitions"),
    (b'{"partitions": [["a"]]}', "partitions"),
    (b'{"partitions": ["touch/../../../elsewhere/x"]}', "partitions"),
    (b'{"partitions": ["./x"]}', "partitions"),
    (b'{"partitions": ["x"], "ttl_seconds": NaN}', None),
    (b'{"partitions": ["x"], "data_timestamp": Infinity}', None),
    (b'{"partitions": ["x"], "sla_seconds": -Infinity}', None),
    (b'[' * 50000 + b']' * 50000, None),
    (b'{"partitions": ' + b'[' * 50000 + b']' * 50000 + b'}', None),
])
def test_hostile_bodies_are_400_with_valid_json_and_no_trace(app_server, raw, field):
    r = app_server.http.call("POST", "/api/wants", raw_body=raw)
    assert r.status == 400, r
    body = _strict_json(r.body)
    assert isinstance(body["error"], str)
    if field:
        assert body.get("field") == field, body
    assert app_server.http.call("GET", "/health").json["latest_event_id"] == 0
    # The server goes on writing.
    assert create(app_server, "ok").status == 201


def test_dot_segments_name_the_ref(app_server):
    r = create(app_server, "good", "a/../b")
    assert r.status == 400 and r.json["ref"] == "a/../b" and "'..'" in r.json["error"]
    assert create(app_server, "a/..b/c.d/.e").status == 201  # dots inside names are fine


def test_surrogates_in_a_taint_reason_and_in_paths(app_server):
    http = app_server.http
    want = create(app_server, "a").json["data"]
    settle(app_server, want["want_id"])
    r = http.call("POST", "/api/partitions/a/taint", raw_body=b'{"reason": "\\udc00"}')
    assert r.status == 400 and r.json["field"] == "reason"
    latest = http.call("GET", "/health").json["latest_event_id"]
    for path in ("/api/partitions/%ED%A0%80", "/api/partitions/%ED%A0%80/taint",
                 "/api/wants/%ED%A0%80", "/api/job_runs/%FF", "/api/partitions/a%FF/taint"):
        for method in ("GET", "POST"):
            r = http.call(method, path, body={})
            assert r.status == 400 and "UTF-8" in r.json["error"], (path, r)
            _strict_json(r.body)
    assert http.call("GET", "/health").json["latest_event_id"] == latest


@pytest.mark.parametrize("path", ["/api/wants", "/api/partitions", "/api/job_runs",
                                  "/api/events"])
def test_query_integers_are_bounded_and_plain(app_server, path):
    http = app_server.http
    names = ("since", "limit") if path == "/api/events" else ("offset", "limit", "as_of")
    for name in names:
        for value in (str(2 ** 63), str(2 ** 64 + 1), "9" * 400, "1_0", "+1", " 1", "١",
                      "", "0x10", "1e3"):
            r = http.call("GET", "%s?%s=%s" % (path, name, urllib.parse.quote(value)))
            assert r.status == 400 and r.json["parameter"] == name, (name, value, r)
    if path != "/api/events":
        r = http.call("GET", path + "?status=")
        assert r.status == 400 and r.json["parameter"] == "status"
        assert http.call("GET", path + "?offset=%d" % (2 ** 53 - 1)).status == 200


def test_paths_and_query_text_are_utf8(tmp_path):
    from conftest import WSGIClient, write_workspace
    import databuild
    ws = write_workspace(tmp_path / "ws", jobs=[{"label": "any", "partition_patterns": [".+"]}])
    server = databuild.Server(databuild.load_config(ws))
    server.orchestrator.start()
    try:
        server.http = WSGIClient(server.app, server.token)
        want = create(server, "café/α").json["data"]
        settle(server, want["want_id"])
        listing = server.http.call("GET", "/api/partitions?prefix=" +
                                   urllib.parse.quote("café/")).json
        assert [p["ref"] for p in listing["data"]] == ["café/α"]
        part = server.http.call("GET", "/api/partitions/" + urllib.parse.quote("café/α"))
        assert part.status == 200 and part.json["data"]["ref"] == "café/α"
        assert server.http.call("GET", "/api/partitions?prefix=%FF").status == 400
    finally:
        server.orchestrator.stop()
        server.close()


def test_a_post_without_a_body_needs_no_content_type_with_the_token(app_server):
    http = app_server.http
    want = create(app_server, "a").json["data"]
    settle(app_server, want["want_id"])
    r = http.call("POST", "/api/partitions/a/taint", headers={"Content-Type": None})
    assert r.status == 200 and r.json["data"]["status"] == "Tainted"
    r = http.call("POST", "/api/partitions/a/taint", raw_body=b'{}',
                  headers={"Content-Type": None})
    assert r.status == 415  # a body must say what it is


# -- access tokens (README "Security") --------------------------------------------------

def _every_operation():
    import databuild
    for path, ops in databuild.openapi_document()["paths"].items():
        concrete = path.replace("{want_id}", "w").replace("{ref}", "a/b").replace(
            "{job_run_id}", "r").replace("{stream}", "stdout")
        for method in ops:
            yield method.upper(), concrete


def test_every_request_but_health_and_preflights_needs_the_token(app_server):
    http = app_server.http
    for method, path in _every_operation():
        for headers in ({"Authorization": None}, {"Authorization": "Bearer wrong"},
                        {"Authorization": "Basic " + app_server.token},
                        {"Authorization": None, "Cookie": "databuild_token=wrong"}):
            r = http.call(method, path, body={} if method == "POST" else None, headers=headers)
            if method == "GET" and path == "/health":
                assert r.status == 200
                continue
            assert r.status == 401, (method, path, headers, r)
            assert "token" in r.json["error"] and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert http.call("OPTIONS", path, headers={"Authorization": None}).status == 204
    assert app_server.stop_reason is None  # the unauthenticated shutdown did nothing
    assert http.call("GET", "/health").json["latest_event_id"] == 0
    # The cookie is as good as the header.
    r = http.call("POST", "/api/wants", {"partitions": ["a"]}, headers={
        "Authorization": None, "Cookie": "other=1; databuild_token=%s" % app_server.token})
    assert r.status == 201


def test_the_dashboard_url_sets_the_cookie(app_server):
    http = app_server.http
    r = http.call("GET", "/?token=" + app_server.token, headers={"Authorization": None})
    assert r.status == 303 and r.headers["Location"] == "/"
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("databuild_token=%s;" % app_server.token)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = http.call("GET", "/", headers={"Authorization": None,
                                          "Cookie": cookie.split(";")[0]})
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    bad = http.call("GET", "/?token=guess", headers={"Authorization": None})
    assert bad.status == 401 and "Set-Cookie" not in bad.headers


def _server_with(tmp_path, **server_keys):
    from conftest import WSGIClient, write_workspace
    import databuild
    ws = write_workspace(tmp_path / "ws", server=server_keys)
    server = databuild.Server(databuild.load_config(ws))
    server.http = WSGIClient(server.app, server.token)
    return server


def test_auth_none_is_for_loopback_only(tmp_path):
    import databuild
    server = _server_with(tmp_path, auth="none")
    try:
        assert server.token is None
        assert server.http.call("GET", "/api/wants").status == 200
        # Without a token, a body-less POST still needs its content type.
        assert server.http.call("POST", "/api/shutdown",
                                headers={"Content-Type": None}).status == 415
    finally:
        server.close()
    for host in ("0.0.0.0", "192.0.2.7", "::"):
        with pytest.raises(databuild.ConfigError) as e:
            databuild.Server(databuild.load_config(str(tmp_path / "ws")), host=host)
        assert "loopback" in e.value.message
    with pytest.raises(databuild.ConfigError):
        _server_with(tmp_path / "x", auth="maybe")


def test_non_loopback_bind_takes_allowed_hosts_and_no_forged_loopback_host(tmp_path):
    server = _server_with(tmp_path, host="0.0.0.0", allowed_hosts=["build.example"])
    try:
        http = server.http
        remote = {"REMOTE_ADDR": "192.0.2.9"}

        def status(host, peer):
            return http.call("GET", "/api/wants", headers={"Host": host},
                             environ=peer).status
        assert status("build.example", remote) == 200
        assert status("BUILD.example", remote) == 200
        assert status("127.0.0.1", remote) == 400  # a forged loopback name
        assert status("localhost", remote) == 400
        assert status("127.0.0.1", {"REMOTE_ADDR": "127.0.0.1"}) == 200
        assert status("evil.example", remote) == 400
    finally:
        server.close()


def test_state_dir_and_server_json_are_private(tmp_path):
    import os
    import stat
    server = _server_with(tmp_path)
    try:
        server.url, server.port = "http://127.0.0.1:1", 1
        server._write_info()
        state = server.config.state_dir
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        path = os.path.join(state, "server.json")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with open(path) as f:
            assert json.load(f)["token"] == server.token and len(server.token) >= 40
    finally:
        server.close()


# -- lineage and explain (README "Lineage") ---------------------------------------------

def test_lineage_both_ways_with_depth_and_as_of(app_server):
    from conftest import set_plan
    ws = app_server.config.root
    set_plan(ws, {"c": {"deps": ["b"]}, "b": {"reads": ["a"]}})
    http = app_server.http
    settle(app_server, create(app_server, "a").json["data"]["want_id"])
    settle(app_server, create(app_server, "c").json["data"]["want_id"])
    r = http.call("GET", "/api/partitions/b/lineage")
    assert r.status == 200
    assert r.json["data"] == {
        "ref": "b", "status": "Live",
        "upstream": [{"ref": "a", "status": "Live", "upstream": []}],
        "downstream": [{"ref": "c", "status": "Live", "downstream": []}]}
    cut = http.call("GET", "/api/partitions/c/lineage?depth=1").json["data"]
    assert cut["upstream"] == [{"ref": "b", "status": "Live", "upstream": [],
                                "truncated": True}]
    assert http.call("GET", "/api/partitions/c/lineage?depth=0").json["data"]["upstream"] == []
    part = http.call("GET", "/api/partitions/c").json["data"]
    assert part["upstream"] == ["b"]
    # As of an event before c was rebuilt, b had no downstream yet.
    events = http.call("GET", "/api/events?limit=1000").json["data"]
    b_built = next(e["event_id"] for e in events if e["type"] == "job_run_success"
                   and e["payload"].get("read_deps") == ["a"])
    then = http.call("GET", "/api/partitions/b/lineage?as_of=%d" % b_built).json["data"]
    assert then["upstream"][0]["ref"] == "a" and then["downstream"] == []
    assert http.call("GET", "/api/partitions/zzz/lineage").status == 404
    assert http.call("GET", "/api/partitions/a/lineage?depth=51").status == 400


def test_explain_tells_the_story_oldest_first(app_server):
    from conftest import set_plan
    set_plan(app_server.config.root, {"top": {"deps": ["bad"]}, "bad": {"exit": 4}})
    http = app_server.http
    want = create(app_server, "top", user="alice").json["data"]
    assert settle(app_server, want["want_id"])["status"] == "UpstreamFailed"
    story = http.call("GET", "/api/partitions/top/explain").json["data"]
    assert story["ref"] == "top" and story["status"] == "UpstreamFailed"
    ids = [s["event_id"] for s in story["steps"]]
    assert ids == sorted(ids) and len(ids) >= 3
    types = [s["type"] for s in story["steps"]]
    assert types[:2] == ["want_create", "job_run_queue"] and "job_run_missing_deps" in types
    assert "alice" in story["steps"][0]["text"]
    assert story["steps"][0]["want_id"] == want["want_id"]
    (upstream,) = story["upstream_failures"]
    assert upstream["ref"] == "bad" and upstream["status"] == "Failed"
    failure = [s for s in upstream["steps"] if s["type"] == "job_run_failure"][-1]
    assert failure["exit_code"] == 4 and "planned exit 4" in failure["stderr_tail"][-1]
    assert "bad" in story["summary"] and "Failed" in story["summary"]
    never = http.call("GET", "/api/partitions/some/new/ref/explain").json["data"]
    assert never["steps"] == [] and "it would be built by job 'test'" in never["summary"]
    nobody = http.call("GET", "/api/partitions/UPPER/explain").json["data"]
    assert "no job produces it" in nobody["summary"]
    assert http.call("GET", "/api/partitions/a%20b/explain").status == 400
