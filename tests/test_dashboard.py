"""The dashboard (README "Dashboard") in a real browser: headless Chromium driven by
Selenium over a real server.  Skipped, saying why, where Chromium or its
driver is missing (.ci/run installs Debian's chromium and chromium-driver)."""
import os
import shutil
import sys

import pytest

from conftest import TEST_JOB, set_plan, wait_for, write_workspace

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException, WebDriverException)
from selenium.webdriver.common.by import By  # noqa: E402

SHOTS = os.environ.get("DATABUILD_SCREENSHOTS")  # a folder: keep screenshots to look at


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium (%s) or chromedriver (%s): apt-get install chromium "
                    "chromium-driver" % (chromium, driver))
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1300,900"):
        options.add_argument(arg)
    options.binary_location = chromium
    try:
        b = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    except WebDriverException as e:
        pytest.skip("Chromium does not start here: %s" % e.msg)
    yield b
    b.quit()


def text_of(b, css):
    try:
        return " ".join(e.text for e in b.find_elements(By.CSS_SELECTOR, css))
    except StaleElementReferenceException:  # re-rendered meanwhile: read it again
        return text_of(b, css)


def attrs(b, css, name):
    """An attribute of every element matching ``css``, read again if the page re-rendered."""
    try:
        return [e.get_attribute(name) for e in b.find_elements(By.CSS_SELECTOR, css)]
    except StaleElementReferenceException:
        return attrs(b, css, name)


def click(b, by, value, timeout=10):
    """Click an element, found again if the page re-rendered it meanwhile."""
    def attempt():
        try:
            b.find_element(by, value).click()
            return True
        except (StaleElementReferenceException, WebDriverException):
            return False
    wait_for(attempt, timeout)


def until(b, css, words, timeout=10):
    """Wait until the elements matching ``css`` show every one of ``words``."""
    wait_for(lambda: all(w in text_of(b, css) for w in words), timeout)
    return text_of(b, css)


def shot(b, name):
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        b.save_screenshot(os.path.join(SHOTS, name + ".png"))


def login(b, server, fragment):
    url = server.cli("dashboard", check=0).stdout.strip()
    b.get(url + "#" + fragment)


def test_views_show_each_entity_and_link_them(tmp_path, serve, browser):
    ws = write_workspace(tmp_path / "ws", plan={"c": {"deps": ["b"]}, "x": {"exit": 3}})
    server = serve(ws)
    c = server.client.wait_want(server.client.create_want(["c"])["want_id"], 30)
    x = server.client.wait_want(server.client.create_want(["x"])["want_id"], 30)
    b = browser
    # Without the cookie: the 401 says how to log in.
    b.delete_all_cookies()
    b.get(server.url + "/#/wants")
    until(b, "body", ["databuild.py dashboard"])  # the 401 says how to log in
    login(b, server, "/wants")
    until(b, "#view", [c["want_id"][:8], x["want_id"][:8], "Successful", "Failed"])
    shot(b, "wants")
    # A want: its id and status, partitions, derivative want, runs.
    click(b, By.LINK_TEXT, c["want_id"][:8])
    until(b, "#view h1", [c["want_id"], "Successful"])
    (derivative,) = c["derivative_want_ids"]
    until(b, "#view", ["DERIVATIVE WANTS", derivative[:8], "DepMiss", "Succeeded"])
    shot(b, "want")
    # A partition: status, the run that built it, lineage, explain.
    click(b, By.CSS_SELECTOR, '#view a[href="#/partitions/c"]')
    until(b, "#view h1", ["Partition c", "Live"])
    until(b, "#view", ["BUILT FROM", "EXPLAIN", "succeeded"])
    assert "b" in [e.text for e in b.find_elements(By.CSS_SELECTOR, "ul.tree a")]
    shot(b, "partition")
    # The failed run: exit code, error and its stderr.
    (run,) = server.client.list_job_runs(status="Failed")["data"]
    b.get(server.url + "/#/job_runs/" + run["job_run_id"])
    until(b, "#view h1", [run["job_run_id"], "Failed"])
    until(b, "#log-stderr", ["planned exit 3 for x"])
    assert "exit code 3" in text_of(b, "#view dl")
    shot(b, "job_run")
    # Lists: partitions by prefix and status, events newest first, jobs, schedules.
    b.get(server.url + "/#/partitions?prefix=c")
    until(b, "#view", ["1\u20131 of 1"])
    b.get(server.url + "/#/partitions?status=Failed")
    until(b, "#view table", ["x", "Failed"])
    assert "Live" not in text_of(b, "#view table")
    latest = server.client.health()["latest_event_id"]
    b.get(server.url + "/#/events")
    first = until(b, "#view table tr:nth-child(2) td", [str(latest)])
    assert first.split()[0] == str(latest)
    shot(b, "events")
    # The type filter asks the log for that type only, newest first.
    b.get(server.url + "/#/events?type=job_run_failure")
    table = until(b, "#view table", ["job_run_failure", "exit code 3"])
    assert "job_run_start" not in table and "want_create" not in table
    b.get(server.url + "/#/jobs")
    until(b, "#view table", ["test", "local"])
    b.get(server.url + "/#/schedules")
    until(b, "#view", ["Schedules", "nothing here"])


def test_time_travel_shows_a_view_as_it_was(tmp_path, serve, browser):
    ws = write_workspace(tmp_path / "ws")
    server = serve(ws)
    first = server.client.wait_want(server.client.create_want(["a"])["want_id"], 30)
    before = server.client.health()["latest_event_id"]
    server.client.wait_want(server.client.create_want(["z"])["want_id"], 30)
    server.client.taint("a")
    b = browser
    login(b, server, "/partitions")
    until(b, "#view table", ["a", "Tainted", "z"])
    box = b.find_element(By.ID, "asof")
    box.send_keys(str(before))
    click(b, By.TAG_NAME, "h1")  # leaves the field: onchange
    until(b, "#msg", ["as of event %d" % before])
    table = until(b, "#view table", ["a", "Live"])
    assert "z" not in table.split() and "Tainted" not in table
    # The fragment says which event is shown, and links from the view keep it.
    assert "as_of=%d" % before in b.current_url
    assert all("as_of=%d" % before in h for h in attrs(b, "#view a[href^='#'], nav a", "href"))
    b.get("about:blank")
    login(b, server, "/partitions?as_of=%d" % before)  # a shared link to the past
    until(b, "#msg", ["as of event %d" % before])
    assert "Tainted" not in until(b, "#view table", ["a", "Live"])
    b.get(server.url + "/#/events")  # the events up to that one, newest first
    until(b, "#view table tr:nth-child(2) td", [str(before)])
    b.get(server.url + "/#/wants/" + first["want_id"])
    until(b, "#view h1", ["Successful"])
    assert all(not e.is_enabled() for e in b.find_elements(By.CSS_SELECTOR, "[data-act]"))
    click(b, By.ID, "live")
    until(b, "#msg", ["event"])
    assert "as of" not in text_of(b, "#msg") and "as_of" not in b.current_url


def test_live_log_grows_and_the_buttons_act(tmp_path, serve, browser):
    ws = write_workspace(tmp_path / "ws", jobs=[
        {"label": "tick", "partition_patterns": ["tick/.*"],
         "entrypoint": ["sh", "-c", 'for i in 1 2 3 4 5 6 7 8; do echo "tick $i"; sleep 0.4; done;'
                        ' sleep 60', "tick"]},
        {"label": "test", "partition_patterns": ["[a-z]+"], "entrypoint": [sys.executable, TEST_JOB]}])
    server = serve(ws)
    b = browser
    want = server.client.create_want(["tick/1"])
    run = wait_for(lambda: server.client.list_job_runs(status="Running")["data"], 15)[0]
    login(b, server, "/job_runs/" + run["job_run_id"])
    until(b, "#view h1", ["Running"])
    until(b, "#log-stdout", ["tick 1"])
    until(b, "#log-stdout", ["tick 4"])  # lines arrive while the job runs
    shot(b, "job_run_live")
    # Cancel run (with its confirm dialog).
    click(b, By.XPATH, "//button[text()='Cancel run']")
    b.switch_to.alert.accept()
    wait_for(lambda: server.client.get_job_run(run["job_run_id"])["status"] == "Canceled", 15)
    until(b, "#view h1", ["Canceled"])
    # New want form -> the want's page; then its cancel button.
    click(b, By.ID, "new")
    b.find_element(By.ID, "refs").send_keys("tick/2")
    b.find_element(By.ID, "priority").clear()
    b.find_element(By.ID, "priority").send_keys("5")
    click(b, By.CSS_SELECTOR, "#create button[type=submit]")
    wait_for(lambda: "#/wants/" in b.current_url, 10)
    new_id = b.current_url.split("#/wants/")[1]
    made = server.client.get_want(new_id)
    assert made["partitions"] == ["tick/2"] and made["priority"] == 5
    until(b, "#view h1", [new_id])
    click(b, By.XPATH, "//button[text()='Cancel want']")
    b.switch_to.alert.accept()
    wait_for(lambda: server.client.get_want(new_id)["status"] == "Canceled", 15)
    until(b, "#view h1", ["Canceled"])
    # Taint a Live partition (with its reason prompt).
    server.client.wait_want(server.client.create_want(["ok"])["want_id"], 30)
    b.get(server.url + "/#/partitions/ok")
    until(b, "#view h1", ["Live"])
    click(b, By.XPATH, "//button[text()='Taint']")
    prompt = b.switch_to.alert
    prompt.send_keys("bad export")
    prompt.accept()
    wait_for(lambda: server.client.get_partition("ok")["status"] == "Tainted", 15)
    until(b, "#view h1", ["Tainted"])
    assert server.client.get_want(want["want_id"])["status"] != "Successful"


def test_light_and_dark(tmp_path, serve, browser):
    ws = write_workspace(tmp_path / "ws")
    server = serve(ws)
    server.client.wait_want(server.client.create_want(["a", "b"])["want_id"], 30)
    b = browser
    login(b, server, "/wants")
    until(b, "#view", ["Successful"])

    def background():
        return b.execute_script("return getComputedStyle(document.body).backgroundColor")
    light = background()
    click(b, By.ID, "theme")
    dark = background()
    assert light != dark
    shot(b, "wants_" + ("dark" if "dark" in b.execute_script(
        "return document.documentElement.className") else "light"))
    click(b, By.ID, "theme")
    assert background() == light
    b.execute_script("localStorage.clear()")


def test_want_view_shows_progress_and_retries_what_is_not_live(tmp_path, serve, browser):
    ws = write_workspace(tmp_path / "ws", plan={"p/2": {"exit": 3}})
    server = serve(ws)
    want = server.client.wait_want(server.client.create_want(["p/[1..4]"])["want_id"], 30)
    assert want["status"] == "Failed"
    b = browser
    login(b, server, "/wants/" + want["want_id"])
    text = until(b, "#view", ["3/4 live", "Retry"])
    assert "1 Failed" in text
    bar = b.find_element(By.CSS_SELECTOR, "progress[data-live]")
    assert (bar.get_attribute("value"), bar.get_attribute("max")) == ("3", "4")
    # The failed partition with its error; how long the want and its runs took.
    assert attrs(b, "[data-error]", "data-error") == ["p/2"]
    assert "exit code 3" in text_of(b, "[data-error]")
    assert "elapsed" in text and "in 4 runs" in text and "duration" in text
    shot(b, "want_progress")
    set_plan(ws, {})
    click(b, By.XPATH, "//button[text()='Retry']")
    wait_for(lambda: "#/wants/" in b.current_url and want["want_id"] not in b.current_url, 10)
    retry_id = b.current_url.split("#/wants/")[1]
    retry = server.client.wait_want(retry_id, 30)
    assert retry["partitions"] == ["p/2"] and retry["status"] == "Successful"
    until(b, "#view h1", ["Successful"])
    assert "Retry" not in text_of(b, "#view .bar button")  # a Successful want has none


def test_stale_marks_sensors_and_alerts_views(tmp_path, serve, browser):
    # README "Freshness", "Sensors", "Alerts": what the dashboard shows of them.
    ws = write_workspace(tmp_path / "ws", plan={"b": {"deps": ["a"], "reads": ["a"]},
                                                "bad": {"exit": 2}})
    with open(os.path.join(ws, "databuild.toml"), "a") as f:
        f.write('\n[[sensors]]\nname = "landing"\ncommand = ["sh", "-c", '
                '"echo DATABUILD_SENSOR_CURSOR: c7"]\ninterval_seconds = 60\n'
                '\n[[alerts]]\nname = "oncall"\non = ["partition_failed"]\n'
                'command = ["sh", "-c", "cat > /dev/null"]\n')
    server = serve(ws)
    c = server.client
    c.wait_want(c.create_want(["b"])["want_id"], 30)
    server.cli("taint", "a", check=0)
    c.wait_want(c.create_want(["a", "bad"])["want_id"], 30)
    wait_for(lambda: c.list_alerts(status="delivered")["total"] == 1)
    b = browser
    login(b, server, "/partitions?stale=true")
    until(b, "#view", ["stale"])
    marks = b.find_elements(By.CSS_SELECTOR, "[data-stale]")
    assert [m.get_attribute("data-stale") for m in marks] == ["b"]
    assert "upstream a rebuilt at" in marks[0].get_attribute("title")
    assert b.find_element(By.ID, "stale").is_selected()
    shot(b, "partitions_stale")
    b.get(b.current_url.split("#")[0] + "#/partitions/b")
    until(b, "#view", ["upstream a rebuilt at", "Rebuild", "code version"])
    click(b, By.XPATH, "//button[text()='Rebuild']")
    wait_for(lambda: not c.get_partition("b")["stale"], 30)
    b.get(b.current_url.split("#")[0] + "#/sensors")
    text = until(b, "#view", ["landing", "c7", "ok"])
    assert b.find_element(By.CSS_SELECTOR, "[data-sensor]").get_attribute(
        "data-sensor") == "landing"
    shot(b, "sensors")
    b.get(b.current_url.split("#")[0] + "#/alerts")
    text = until(b, "#view", ["partition_failed", "delivered", "partition bad failed"])
    assert len(b.find_elements(By.CSS_SELECTOR, "[data-alert]")) == 1
    shot(b, "alerts")


def test_grid_shows_refs_that_differ_by_a_date(tmp_path, serve, browser):
    # README "Dashboard": a row per ref without its date, a column per date.
    ws = write_workspace(tmp_path / "ws", plan={"agg/date=2025-01-03": {"exit": 3}})
    server = serve(ws)
    c = server.client
    c.wait_want(c.create_want(["raw/date=[2025-01-01..2025-01-05]",
                               "agg/date=[2025-01-02..2025-01-04]", "plain"])["want_id"], 30)
    b = browser
    login(b, server, "/grid")
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "a.cell[data-ref]")) == 8)
    rows = [e.get_attribute("data-row") for e in b.find_elements(By.CSS_SELECTOR, "[data-row]")]
    assert rows == ["agg/date={date}", "raw/date={date}"]
    dates = [e.get_attribute("data-date") for e in b.find_elements(By.CSS_SELECTOR, "[data-date]")]
    assert dates == ["2025-01-0%d" % d for d in range(1, 6)]
    cells = {e.get_attribute("data-ref"): e.get_attribute("data-status")
             for e in b.find_elements(By.CSS_SELECTOR, "a.cell")}
    assert cells["agg/date=2025-01-03"] == "Failed" and cells["raw/date=2025-01-05"] == "Live"
    assert "plain" not in cells and "1 without a date not shown" in text_of(b, "#gridnote")
    # The agg row has no cell on the first and last dates: cells stay under their dates.
    agg = b.find_elements(By.CSS_SELECTOR, "[data-row='agg/date={date}'] td")
    assert [bool(td.find_elements(By.CSS_SELECTOR, "a.cell")) for td in agg[1:]] == \
        [False, True, True, True, False]
    shot(b, "grid")
    click(b, By.CSS_SELECTOR, "a.cell[data-ref='agg/date=2025-01-03']")
    until(b, "#view h1", ["agg/date=2025-01-03"])
    login(b, server, "/grid?prefix=agg/")
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "a.cell[data-ref]")) == 3)


def test_timeline_draws_runs_in_lanes_per_job(tmp_path, serve, browser):
    ws = write_workspace(tmp_path / "ws", jobs=[
        {"label": "raw", "partition_patterns": ["raw/.*"]},
        {"label": "agg", "partition_patterns": ["agg/.*"]}],
        plan={"agg/1": {"deps": ["raw/1"]}, "raw/slow": {"sleep": 30}})
    server = serve(ws)
    c = server.client
    c.wait_want(c.create_want(["agg/1", "raw/2"])["want_id"], 30)
    runs = c.list_job_runs(limit=100)["data"]
    slow = c.create_want(["raw/slow"])
    wait_for(lambda: c.list_job_runs(status="Running")["total"] == 1)
    b = browser
    login(b, server, "/timeline")
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "rect[data-job-run-id]")) ==
             len(runs) + 1)
    bars = {e.get_attribute("data-job-run-id"): e
            for e in b.find_elements(By.CSS_SELECTOR, "rect[data-job-run-id]")}
    assert {r["job_run_id"]: r["status"] for r in runs}.items() <= {
        k: e.get_attribute("data-status") for k, e in bars.items()}.items()
    lanes = {r["job_label"]: bars[r["job_run_id"]].get_attribute("y") for r in runs}
    assert set(lanes) == {"raw", "agg"} and lanes["raw"] != lanes["agg"]
    (running,) = b.find_elements(By.CSS_SELECTOR, "rect[data-running]")
    width = float(running.get_attribute("width"))
    wait_for(lambda: float(running.get_attribute("width")) > width, 5)  # it grows, live
    shot(b, "timeline")
    c.cancel_want(slow["want_id"])
    click(b, By.CSS_SELECTOR, "rect[data-job-run-id='%s']" % runs[0]["job_run_id"])
    until(b, "#view", [runs[0]["job_run_id"][:8]])
    login(b, server, "/timeline?window=hour")
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "rect[data-job-run-id]")) ==
             len(runs) + 1)


def test_event_details_expand_and_a_jobs_history(tmp_path, serve, browser):
    ws = write_workspace(tmp_path / "ws", jobs=[
        {"label": "raw", "partition_patterns": ["raw/.*"]},
        {"label": "agg", "partition_patterns": ["agg/.*"]}],
        plan={"raw/2": {"exit": 3}})
    server = serve(ws)
    c = server.client
    c.wait_want(c.create_want(["raw/1", "raw/2", "agg/1"])["want_id"], 30)
    b = browser
    login(b, server, "/events")
    until(b, "#view", ["job_run_failure"])
    (failure,) = [e for e in c.events(since=0, limit=100)["data"]
                  if e["type"] == "job_run_failure"]
    details = b.find_element(By.CSS_SELECTOR, "details[data-event-id='%d']"
                             % failure["event_id"])
    assert not details.get_attribute("open")
    details.find_element(By.TAG_NAME, "summary").click()
    wait_for(lambda: '"exit_code": 3' in details.find_element(By.TAG_NAME, "pre").text)
    shot(b, "events_details")
    b.get(b.current_url.split("#")[0] + "#/jobs")
    click(b, By.CSS_SELECTOR, "a[data-job='raw']")
    text = until(b, "#view", ["Job runs of raw", "2 runs", "median"])
    assert "agg/1" not in text and "raw/2" in text and "Failed" in text


def test_wants_list_folds_derivative_wants_and_filters_as_you_type(tmp_path, serve, browser):
    ws = write_workspace(tmp_path / "ws", plan={"c": {"deps": ["b"]}, "b": {"deps": ["a"]}})
    server = serve(ws)
    c = server.client
    root = c.wait_want(c.create_want(["c"])["want_id"], 30)
    other = c.wait_want(c.create_want(["x"], comment="nightly fix")["want_id"], 30)
    derivatives = [w["want_id"] for w in c.list_wants(limit=10)["data"]
                   if w["root_want_id"] == root["want_id"] and w["want_id"] != root["want_id"]]
    assert len(derivatives) == 2
    b = browser
    login(b, server, "/wants")
    until(b, "#view", ["2 derivative wants", "nightly fix"])
    rows = b.find_elements(By.CSS_SELECTOR, "#view table tr")[1:]
    assert len(rows) == 2  # the two wants people made; derivatives folded
    folded = b.find_element(By.CSS_SELECTOR, "[data-derivatives='%s']" % root["want_id"])
    folded.find_element(By.TAG_NAME, "summary").click()
    shown = [e.get_attribute("data-derivative")
             for e in folded.find_elements(By.CSS_SELECTOR, "[data-derivative]")]
    assert sorted(shown) == sorted(derivatives)
    shot(b, "wants_folded")
    box = b.find_element(By.ID, "find")
    box.send_keys("nightly")
    wait_for(lambda: [r.is_displayed() for r in rows] == [other["want_id"] in r.get_attribute(
        "innerHTML") for r in rows])
    box.clear()
    box.send_keys(root["want_id"][:8])
    wait_for(lambda: [r.is_displayed() for r in rows] == [root["want_id"] in r.get_attribute(
        "innerHTML") for r in rows])
    box.clear()
    box.send_keys(" ")  # an empty filter shows every row
    box.send_keys("\b")
    click(b, By.ID, "all")
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "#view table tr")) == 5)
    assert "all=1" in b.current_url


def test_graph_lays_lineage_out_left_to_right_and_collapses_by_job(tmp_path, serve, browser):
    ws = write_workspace(tmp_path / "ws", jobs=[
        {"label": "raw", "partition_patterns": ["raw/.*"]},
        {"label": "agg", "partition_patterns": ["agg/.*"]}],
        plan={"agg/b": {"deps": ["raw/a"], "reads": ["raw/a"]},
              "agg/c": {"deps": ["agg/b"], "reads": ["agg/b"]}})
    server = serve(ws)
    c = server.client
    c.wait_want(c.create_want(["agg/c"])["want_id"], 30)
    b = browser
    login(b, server, "/graph")
    wait_for(lambda: len(attrs(b, "g[data-ref]", "data-ref")) == 3)

    def column(ref):  # the x of a node's translate(x,y)
        g = b.find_element(By.CSS_SELECTOR, "g[data-ref='%s']" % ref)
        return float(g.get_attribute("transform").split("(")[1].split(",")[0])
    assert column("raw/a") < column("agg/b") < column("agg/c")
    assert sorted(attrs(b, "path[data-edge]", "data-edge")) == ["agg/b agg/c", "raw/a agg/b"]
    assert set(attrs(b, "g[data-ref]", "data-status")) == {"Live"}
    shot(b, "graph")
    # A prefix: its partitions and their direct upstream.
    login(b, server, "/graph?prefix=agg/c")
    wait_for(lambda: sorted(attrs(b, "g[data-ref]", "data-ref")) == ["agg/b", "agg/c"])
    # Beyond the limit: a node per job, and the page says so.
    login(b, server, "/graph?limit=2")
    wait_for(lambda: sorted(attrs(b, "g[data-job]", "data-job")) == ["agg", "raw"])
    assert "one node per job" in text_of(b, "#graphnote")
    assert attrs(b, "path[data-edge]", "data-edge") == ["raw agg"]
    # A partition's view draws its neighbourhood; a click on a node opens it.
    login(b, server, "/graph")
    click(b, By.CSS_SELECTOR, "g[data-ref='agg/b']")
    until(b, "#view h1", ["agg/b"])
    wait_for(lambda: attrs(b, "g[data-focus]", "data-ref") == ["agg/b"])
    assert set(attrs(b, "g[data-ref]", "data-ref")) == {"raw/a", "agg/b", "agg/c"}
