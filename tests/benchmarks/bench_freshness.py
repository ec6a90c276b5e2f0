"""Freshness and automation (README "Freshness and automation"), three figures:

* reads of staleness on a big log: ``GET /api/partition?ref=`` of a stale
  partition and ``GET /api/partitions?stale=true&limit=100``, one client, at
  10^6 events (the log of bench_reads, then 1,000 upstream rebuilds that make
  1,000 partitions stale) against the same at 10^3 events;
* auto rebuild: a chain c0 <- c1 <- ... <- c5 of ``sh`` jobs with declared
  deps, c1..c5 with ``auto_rebuild = "stale"``; c0 is rebuilt; from its
  success to the start of the third auto-rebuilt job down the chain (c3), per
  hop (each hop includes running the job before it);
* alert delivery: 20 failed partitions, each raising a ``partition_failed``
  alert to a local webhook receiver: from the event that raised it to the
  receiver's hands.

    python tests/benchmarks/bench_freshness.py [--tiny] [--events N]
"""
import http.server
import json
import os
import statistics
import tempfile
import threading
import time

import _workload as w
import databuild


def add_stale(workspace, n):
    """Append ``n`` rebuilds of raw partitions to the log: each makes the daily
    partition built from it stale.  Returns the stale refs."""
    log = databuild.EventLog(os.path.join(workspace, ".databuild", "events.db"))
    state = databuild.BuildState.restore(*log.load_projection(every_partition=True))
    raws = [ref for ref in state.partitions if ref.startswith("raw/")][-n:]
    ts, entries = time.time(), []
    for i, raw in enumerate(raws):
        run = "stale-%d" % i
        entries += [("want_create", {"want_id": "w" + run, "partitions": [raw],
                                     "source": {"type": "manual", "user": "bench"}}, ts),
                    ("partition_taint", {"ref": raw}, ts),
                    ("job_run_queue", {"job_run_id": run, "job_label": "raw",
                                       "partitions": [raw], "want_ids": ["w" + run]}, ts),
                    ("job_run_start", {"job_run_id": run}, ts),
                    ("job_run_success", {"job_run_id": run, "exit_code": 0}, ts)]
    first = state.latest_event_id + 1
    for k, (type_, payload, stamp) in enumerate(entries):
        state.apply(databuild.Event(first + k, stamp, type_, payload))
    log.append(entries, changes=state.take_changes(), summary=state.summary())
    stale = list(state.stale)
    log.close()
    return stale


def read_times(n_events, n_stale, calls):
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-fresh-") + "/ws")
    w.build_log(ws, n_events)
    stale = add_stale(ws, n_stale)
    server = w.Serve(ws)
    try:
        c = server.client
        ref = stale[len(stale) // 2]
        assert c.get_partition(ref)["stale"]
        assert c.list_partitions(stale=True, limit=0)["total"] == len(stale)
        times = {"one": [], "list": []}
        for _ in range(calls):
            t0 = time.perf_counter()
            c.get_partition(ref)
            times["one"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            page = c.list_partitions(stale=True, limit=100)
            times["list"].append(time.perf_counter() - t0)
        assert len(page["data"]) == min(100, len(stale))
        events = c.health()["latest_event_id"]
    finally:
        server.stop()
    return events, {k: statistics.median(v) * 1000 for k, v in times.items()}


CHAIN_TOML = """
[server]
idle_timeout_seconds = 0
max_concurrent_job_runs = 4

[[jobs]]
label = "c0"
entrypoint = ["sh", "-c", "exit 0", "sh"]
partition_patterns = ['c0']
"""
CHAIN_JOB = """
[[jobs]]
label = "c{i}"
entrypoint = ["sh", "-c", "echo 'DATABUILD_READ_DEPS_JSON: {{\\"read_deps\\": [\\"c{p}\\"]}}'", "sh"]
partition_patterns = ['c{i}']
deps = ["c{p}"]
auto_rebuild = "stale"
"""


def chain_hop_ms(links=5):
    toml = CHAIN_TOML + "".join(CHAIN_JOB.format(i=i, p=i - 1) for i in range(1, links + 1))
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-auto-") + "/ws", toml)
    server = w.Serve(ws)
    try:
        c = server.client
        last = "c%d" % links
        c.wait_want(c.create_want([last])["want_id"], 60)
        since = c.health()["latest_event_id"]
        c.taint("c0")
        c.wait_want(c.create_want(["c0"])["want_id"], 60)
        deadline = time.time() + 60
        while c.get_partition(last)["stale"] or c.get_partition(last)["status"] != "Live" \
                or c.list_job_runs(status="Running")["total"] or \
                c.list_job_runs(status="Queued")["total"]:
            assert time.time() < deadline, "the chain did not rebuild"
            time.sleep(0.02)
        events = c.events(since=since, limit=1000)["data"]
    finally:
        server.stop()
    runs = {}  # job_run_id -> partition
    success, starts = {}, {}
    for e in events:
        p = e["payload"]
        if e["type"] == "job_run_queue":
            runs[p["job_run_id"]] = p["partitions"][0]
        elif e["type"] == "job_run_start":
            starts[runs[p["job_run_id"]]] = e["timestamp"]
        elif e["type"] == "job_run_success":
            success[runs[p["job_run_id"]]] = e["timestamp"]
    rebuilt = sum(1 for e in events if e["type"] == "job_run_success")
    assert rebuilt == links + 1, "each partition rebuilt once: %d runs" % rebuilt

    def at(stamp):
        return databuild.datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return (at(starts["c3"]) - at(success["c0"])) / 3 * 1000


def alert_latency_ms(n):
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((time.time(), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    toml = w.WORKSPACE_TOML.replace('label = "raw"\nentrypoint = ["sh", "-c", "exit 0"]',
                                    'label = "raw"\nentrypoint = ["sh", "-c", "exit 3"]')
    toml += ('\n[[alerts]]\nname = "hook"\non = ["partition_failed"]\n'
             'webhook = "http://127.0.0.1:%d/"\n' % httpd.server_address[1])
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-alert-") + "/ws", toml)
    server = w.Serve(ws)
    try:
        c = server.client
        for i in range(n):
            c.wait_want(c.create_want(["raw/date=2025-01-01/n=%d" % i])["want_id"], 60)
        deadline = time.time() + 60
        while len(received) < n:
            assert time.time() < deadline, "alerts not delivered"
            time.sleep(0.02)
        stamps = {e["event_id"]: e["timestamp"] for e in c.events(limit=1000)["data"]}
    finally:
        server.stop()
        httpd.shutdown()
    latencies = []
    for got, body in received:
        raised = databuild.datetime.datetime.fromisoformat(
            stamps[body["event_id"]].replace("Z", "+00:00")).timestamp()
        latencies.append((got - raised) * 1000)
    latencies.sort()
    return statistics.median(latencies), latencies[int(len(latencies) * 0.9) - 1]


def main():
    args = w.parse_args(__doc__, ("--events", {"type": int, "default": 1000000,
                                               "help": "events of the big log"}))
    big = 20000 if args.tiny else args.events
    n_stale = 100 if args.tiny else 1000
    calls = 50 if args.tiny else 300
    rows, summary = [], {"machine": w.machine()}
    for n in (1000, big):
        events, ms = read_times(n, min(n_stale, n // 20), calls)
        rows.append({"events": events, "stale_partition_ms": ms["one"],
                     "stale_list_ms": ms["list"]})
    summary["stale_partition_ms"] = rows[-1]["stale_partition_ms"]
    summary["stale_list_ms"] = rows[-1]["stale_list_ms"]
    summary["events"] = rows[-1]["events"]
    hop, hops = w.median_of(chain_hop_ms, args.repeat)
    summary["auto_rebuild_hop_ms"], summary["auto_rebuild_hop_ms_all"] = hop, hops
    rows.append({"events": "chain", "stale_partition_ms": "-", "stale_list_ms": "-",
                 "auto_rebuild_hop_ms": hop})
    median, p90 = alert_latency_ms(5 if args.tiny else 20)
    summary["alert_latency_ms"], summary["alert_latency_p90_ms"] = median, p90
    for row in rows:
        row.setdefault("auto_rebuild_hop_ms", "-")
    w.report("freshness", rows, summary)


if __name__ == "__main__":
    main()
