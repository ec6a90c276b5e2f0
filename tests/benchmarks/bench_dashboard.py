"""the dashboard on a big log, in headless Chromium.

A workspace with N events (10^6; about 10^5 partitions): each view is opened
in the browser, and the time from navigation until the view shows its data
is measured (the page only ever asks the API for a page).  Target: well under
a second per view (README "Performance", row 13); the pictures (graph, grid,
timeline) 300 ms, the graph of a prefix drawn one node per partition (about
240 nodes, and 2,000 with ``limit=1000``) 500 ms (rows 25, 26).  Needs Chromium, chromedriver and selenium; says why and
measures nothing where they are missing.

    python tests/benchmarks/bench_dashboard.py [--tiny] [--events N]
"""
import shutil
import tempfile
import time

import _workload as w

VIEWS = ["/wants", "/wants/{want}", "/partitions", "/partitions?prefix=raw/",
         "/partitions/{ref}", "/job_runs", "/job_runs/{run}", "/events", "/jobs",
         "/graph", "/grid", "/grid?prefix=daily/date=2025-01-", "/timeline",
         "/job_runs?job=daily", "/graph?prefix={day}1", "/graph?prefix={day}&limit=1000"]


def main():
    args = w.parse_args(__doc__, ("--events", {"type": int, "default": 1000000}))
    n = 2000 if args.tiny else args.events
    try:
        from selenium import webdriver
    except ImportError:
        print("bench_dashboard: nothing measured: selenium is not installed")
        return
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        print("bench_dashboard: nothing measured: no chromium/chromedriver")
        return
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-dashboard-") + "/ws")
    want_ids = w.build_log(ws, n)
    server = w.Serve(ws)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = chromium
    b = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    rows = []
    try:
        c = server.client
        ref = c.list_partitions(limit=1)["data"][0]["ref"]
        run = c.list_job_runs(limit=1)["data"][0]["job_run_id"]
        total_partitions = c.list_partitions(limit=1)["total"]
        b.get(server.url + "/?token=" + server.token + "#/jobs")
        time.sleep(0.5)
        for rep in range(args.repeat):
            for view in VIEWS:
                fragment = view.format(want=want_ids[rep % len(want_ids)], ref=ref, run=run,
                                       day="daily/date=2025-01-01/n=")
                b.get(server.url + "/#/events?offset=999999999")  # a different page first
                t0 = time.perf_counter()
                b.execute_script("document.getElementById('view').innerHTML='';"
                                 "location.hash=arguments[0]", "#" + fragment)
                while not b.execute_script(
                        "var v=document.getElementById('view');"
                        "return v.querySelector('table,dl,svg') && !v.querySelector('.loading')"):
                    time.sleep(0.005)
                ms = 1000 * (time.perf_counter() - t0)
                nodes = b.execute_script("return document.querySelectorAll("
                                         "'#view g[data-ref], #view g[data-job]').length")
                rows.append({"rep": rep, "view": view, "ms": ms, "graph_nodes": nodes})
    finally:
        b.quit()
        server.stop()
    worst = max(r["ms"] for r in rows)
    medians = {}
    for view in VIEWS:
        these = sorted(r["ms"] for r in rows if r["view"] == view)
        medians[view] = round(these[len(these) // 2], 1)
    w.report("dashboard", rows, {"events": n, "partitions": total_partitions,
                                 "worst_ms": worst, "median_ms": medians,
                                 "target": "well under 1000 ms; pictures 300 ms; "
                                           "the 500-node graph 500 ms",
                                 "machine": w.machine()})


if __name__ == "__main__":
    main()
