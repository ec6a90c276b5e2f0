"""databuild.toml: parsing, defaults, and one clear line per error."""
import json
import os
import subprocess
import sys

import pytest

from conftest import MODULE
from databuild import ConfigError, InvalidRequest, load_config


def write(tmp_path, text):
    (tmp_path / "databuild.toml").write_text(text)
    return str(tmp_path)


GOOD = """
[server]
port = 8123
idle_timeout_seconds = 60
max_concurrent_job_runs = 2
cors_origins = ["http://localhost:5173"]

[[jobs]]
label = "raw"
entrypoint = "sh jobs/raw.sh --fast"
partition_patterns = ['raw/date=\\d{4}-\\d{2}-\\d{2}']
environment = { REGION = "eu" }
max_partitions_per_run = 3
max_retries = 2
timeout_seconds = 30

[[jobs]]
label = "agg"
entrypoint = ["python3", "agg.py"]
partition_patterns = ['agg/.*']
"""


def test_good_config(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert (config.port, config.idle_timeout_seconds, config.max_concurrent_job_runs) == (8123, 60, 2)
    assert config.host == "127.0.0.1"
    assert config.cors_origins == ["http://localhost:5173"]
    raw = config.jobs_by_label["raw"]
    assert raw.entrypoint == ["sh", "jobs/raw.sh", "--fast"]
    assert (raw.max_partitions_per_run, raw.max_retries, raw.timeout_seconds) == (3, 2, 30)
    assert raw.environment == {"REGION": "eu"}
    assert config.jobs_by_label["agg"].max_partitions_per_run == 1
    assert config.job_for("raw/date=2025-01-01") is raw
    assert config.state_dir == os.path.join(str(tmp_path), ".databuild")


def test_defaults(tmp_path):
    config = load_config(write(tmp_path, "[server]\n"))  # (an empty file is refused)
    assert config.port == 0 and config.idle_timeout_seconds == 10800
    assert config.max_concurrent_job_runs == 4 and config.jobs == []


def test_ref_lookup_errors(tmp_path):
    config = load_config(write(tmp_path, GOOD + """
[[jobs]]
label = "greedy"
entrypoint = ["true"]
partition_patterns = ['agg/x']
"""))
    with pytest.raises(InvalidRequest) as info:
        config.job_for("nothing/here")
    assert info.value.fields["ref"] == "nothing/here"
    with pytest.raises(InvalidRequest) as info:
        config.job_for("agg/x")
    assert "more than one job" in info.value.message
    for bad in ["", "has space", "tab\there", "x" * 1025, "bell\x07"]:
        with pytest.raises(InvalidRequest):
            config.job_for(bad)
    with pytest.raises(InvalidRequest):
        config.job_for("raw/date=2025-01-01x")  # patterns must match fully


DEPS = """
[[jobs]]
label = "raw"
entrypoint = ["x"]
partition_patterns = ['raw/.+']
[[jobs]]
label = "out"
entrypoint = ["x"]
partition_patterns = ['out/%s']
deps = ['%s']
"""


def test_declared_deps_are_filled_from_the_named_groups(tmp_path):
    config = load_config(write(tmp_path, DEPS % ("(?P<date>[0-9-]+)", "raw/date={date}")))
    out = config.jobs_by_label["out"]
    assert out.declared_deps("out/2025-01-01") == ["raw/date=2025-01-01"]
    assert config.jobs_by_label["raw"].declared_deps("raw/x") == []


@pytest.mark.parametrize("text, expected", [
    ("[server\nport=1", "databuild.toml"),
    ("[server]\nprot = 1", "[server] prot: unknown key"),
    ("[server]\nport = 'x'", "[server] port: must be an integer"),
    ("[server]\nport = 70000", "[server] port: must be at most 65535"),
    ("[server]\nmax_concurrent_job_runs = 0", "max_concurrent_job_runs: must be at least 1"),
    ("[server]\ncors_origins = 'x'", "cors_origins: must be a list of strings"),
    ("[[jobs]]\nlabel='a'\nentrypoint=['x']\npartition_patterns=['(']",
     "[[jobs]] 'a' partition_patterns: bad regex '('"),
    ("[[jobs]]\nlabel='a'\nentrypoint=['x']", "[[jobs]] 'a' partition_patterns: missing"),
    ("[[jobs]]\nlabel='a b'\nentrypoint=['x']\npartition_patterns=['a']", "label: must match"),
    ("[[jobs]]\nlabel='a'\nentrypoint=['x']\npartition_patterns=['a']\n"
     "[[jobs]]\nlabel='a'\nentrypoint=['y']\npartition_patterns=['b']", "duplicate label 'a'"),
    ("[[jobs]]\nlabel='a'\nentrypoint=['x']\npartition_patterns=['a']\nretries=1",
     "[[jobs]] 'a' retries: unknown key"),
    ("[[jobs]]\nlabel='a'\nentrypoint=[]\npartition_patterns=['a']", "entrypoint: must not be empty"),
    ("[[jobs]]\nlabel='a'\nentrypoint=['x']\npartition_patterns=['a']\nmax_retries=-1",
     "max_retries: must be at least 0"),
    ("[[jobs]]\nlabel='a'\nentrypoint=['x']\npartition_patterns=['a']\nenvironment={A=1}",
     "environment: must be a table of strings"),
    ("jobs = 3", "jobs: must be an array"),
    ("[other]", "unknown top-level key"),
    (DEPS % ("(?P<date>.+)", "raw/{day}"),
     "[[jobs]] 'out' deps: template 'raw/{day}' names {day}, which pattern 'out/(?P<date>.+)' "
     "has no named group"),
    (DEPS % ("(?P<date>\\d{4})", "nothing/{date}"),
     "[[jobs]] 'out' deps: template 'nothing/{date}' gives 'nothing/0000' for 'out/0000': "
     "No job produces partition 'nothing/0000'"),
    (DEPS % ("(?P<date>.+)", "raw/{date"), "[[jobs]] 'out' deps: bad template 'raw/{date'"),
    ("[[jobs]]\nlabel='a'\nentrypoint=['x']\npartition_patterns=['a']\ndeps='a'",
     "[[jobs]] 'a' deps: must be a list of strings"),
])
def test_config_errors_name_file_key_and_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in info.value.message
    assert info.value.message.startswith(os.path.join(path, "databuild.toml"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert "no such file" in info.value.message


def test_serve_with_bad_config_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, "[server]\nport = 'eighty'\n")
    result = subprocess.run([sys.executable, MODULE, "serve", "--workspace", path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "databuild.toml: [server] port: must be an integer" in lines[0]
    assert "Traceback" not in result.stderr


# -- a running server follows edits of databuild.toml --------------

def test_watcher_reloads_a_valid_edit_and_keeps_the_old_config_on_a_bad_one(tmp_path):
    import databuild
    ws = write(tmp_path, GOOD)
    watcher = databuild.ConfigWatcher(load_config(ws))
    first = watcher.current()
    assert watcher.current() is first  # unchanged: one stat, no reload
    (tmp_path / "databuild.toml").write_text(GOOD + '''
[[jobs]]
label = "extra"
entrypoint = ["true"]
partition_patterns = ['extra/.*']
''')
    second = watcher.current()
    assert second is not first and second.job_for("extra/x").label == "extra"
    assert watcher.error is None
    (tmp_path / "databuild.toml").write_text("[[jobs]\nbroken")
    assert watcher.current() is second  # the old config stays in force
    assert "databuild.toml" in watcher.error
    (tmp_path / "databuild.toml").write_text(GOOD)
    assert "extra" not in watcher.current().jobs_by_label and watcher.error is None


def test_a_running_server_builds_a_job_added_to_its_config(tmp_path, serve):
    from conftest import write_workspace
    ws = write_workspace(tmp_path / "ws", jobs=[{"label": "a", "partition_patterns": ["a/.*"]}])
    server = serve(ws)
    r = server.cli("build", "b/1")
    assert r.returncode == 1 and "No job produces partition 'b/1'" in r.stderr
    with open(os.path.join(ws, "databuild.toml"), "a") as f:
        f.write('\n[[jobs]]\nlabel = "b"\nentrypoint = %s\npartition_patterns = ["b/.*"]\n'
                % json.dumps([sys.executable, os.path.join(os.path.dirname(MODULE), "tests",
                                                           "jobs", "testjob.py")]))
    r = server.cli("build", "b/1", "--wait")
    assert r.returncode == 0, r.stderr
    assert server.client.get_partition("b/1")["job_label"] == "b"
    # A broken edit: the server says so and goes on with what it had.
    with open(os.path.join(ws, "databuild.toml"), "a") as f:
        f.write("\n[[jobs]]\nlabel = 'c'\n")
    health = server.client.health()
    assert "entrypoint: missing" in health["config_error"]
    status = server.cli("status", check=0)
    assert "config_error:" in status.stdout and "entrypoint: missing" in status.stdout
    assert server.cli("build", "a/1", "--wait").returncode == 0
    assert server.proc.poll() is None


BROKEN_FILES = [
    (b"", "the file is empty"),
    (b"  \n\t\n", "the file is empty"),
    (b"\xff\xfe[server]\n", "not UTF-8 text (byte 0)"),
    (b"a = " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b"[[jobs]]\nlabel = \"hal", "Unterminated string"),
]


@pytest.mark.parametrize("content, says", BROKEN_FILES)
def test_serve_on_an_unreadable_file_exits_2_with_one_line(tmp_path, content, says):
    (tmp_path / "databuild.toml").write_bytes(content)
    result = subprocess.run([sys.executable, MODULE, "serve", "--workspace", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "databuild.toml" in lines[0], lines


def test_a_running_server_keeps_its_config_through_unreadable_edits(tmp_path, serve):
    from conftest import set_plan, wait_for, write_workspace
    ws = write_workspace(tmp_path / "ws", server={"max_concurrent_job_runs": 1})
    set_plan(ws, {"first": {"sleep": 2}})
    server = serve(ws)
    path = os.path.join(ws, "databuild.toml")
    with open(path, "rb") as f:
        good = f.read()
    want = server.client.create_want(["first", "queued"])  # "queued" waits for "first"
    wait_for(lambda: server.client.list_job_runs(status="Running")["total"])
    for content, says in BROKEN_FILES:
        with open(path, "wb") as f:
            f.write(content)
        health = server.client.health()  # (a 500 before: the reload raised)
        assert says in health["config_error"], (says, health)
        status = server.cli("status", check=0)
        assert "config_error:" in status.stdout and says in status.stdout
    # Nothing failed because of it: the queued run starts on the last good config.
    assert server.client.wait_want(want["want_id"], 30)["status"] == "Successful"
    assert [r["status"] for r in server.client.list_job_runs()["data"]] == ["Succeeded"] * 2
    with open(path, "wb") as f:
        f.write(good)
    assert server.client.health()["config_error"] is None
    assert server.proc.poll() is None


# -- schedules (README "Schedules") -------------------------------------------------------

def _ticks(schedule, start, n):
    import itertools
    return list(itertools.islice(schedule.ticks_after(start), n))


def _utc(*args):
    import datetime
    return datetime.datetime(*args, tzinfo=datetime.timezone.utc).timestamp()


def test_cron_fields_names_ranges_steps_lists():
    import databuild
    cron = databuild.Cron("5/15 0-2 1,15 jan-mar SUN,6")
    assert sorted(cron.minutes) == [5, 20, 35, 50] and sorted(cron.hours) == [0, 1, 2]
    assert cron.months == {1, 2, 3} and cron.dows == {0, 6} and cron.days == {1, 15}
    assert databuild.Cron("0 0 * * 7").dows == {0}
    s = databuild.ScheduleConfig("s", ["x"], cron="0 9 * jan-mar mon-fri")
    import datetime
    days = [datetime.datetime.fromtimestamp(t, s.tz).strftime("%a %m-%d %H:%M")
            for t in _ticks(s, _utc(2025, 3, 28), 3)]
    assert days == ["Fri 03-28 09:00", "Mon 03-31 09:00", "Thu 01-01 09:00"]
    # Both day fields restricted: either matches (cron's rule).
    s = databuild.ScheduleConfig("s", ["x"], cron="0 0 13 * fri")
    days = [datetime.datetime.fromtimestamp(t, s.tz).strftime("%a %d") for t in
            _ticks(s, _utc(2025, 6, 1), 7)]
    assert days == ["Fri 06", "Fri 13", "Fri 20", "Fri 27", "Fri 04", "Fri 11", "Sun 13"]
    interval = databuild.ScheduleConfig("i", ["x"], interval_seconds=3600)
    assert _ticks(interval, _utc(2025, 1, 1, 0, 30), 2) == [_utc(2025, 1, 1, 1), _utc(2025, 1, 1, 2)]


def test_daylight_saving_days_tick_once():
    import databuild
    import datetime
    s = databuild.ScheduleConfig("d", ["x"], cron="30 2 * * *", timezone="America/New_York")
    spring = [datetime.datetime.fromtimestamp(t, s.tz).strftime("%m-%d %H:%M%z")
              for t in _ticks(s, _utc(2025, 3, 8), 3)]
    # 02:30 does not exist on 03-09: that day's tick comes once, after the jump.
    assert spring == ["03-08 02:30-0500", "03-09 03:30-0400", "03-10 02:30-0400"]
    s = databuild.ScheduleConfig("d", ["x"], cron="*/30 1 * * *", timezone="America/New_York")
    fall = [datetime.datetime.fromtimestamp(t, s.tz).strftime("%H:%M%z")
            for t in _ticks(s, _utc(2025, 11, 2, 4), 3)]
    # 01:00-01:59 happens twice on 11-02: its ticks come once.
    assert fall == ["01:00-0400", "01:30-0400", "01:00-0500"]
    assert s.want_id(_utc(2025, 11, 2, 5, 30)) == "schedule:d:2025-11-02T05:30:00Z"


@pytest.mark.parametrize("entry, message", [
    ({"cron": "61 * * * *"}, "cron minute field"),
    ({"cron": "* * *"}, "has 3 fields"),
    ({"cron": "0 0 31 2 *"}, "never matches"),
    ({"cron": "0 0 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
    ({}, "either cron or interval_seconds"),
    ({"cron": "0 0 * * *", "interval_seconds": 60}, "either cron or interval_seconds"),
    ({"cron": "0 0 * * *", "partitions": ["raw/date={day:%Y}"]}, "bad template"),
    ({"cron": "0 0 * * *", "partitions": ["nothing/{data_time:%Y}"]}, "No job produces"),
    ({"cron": "0 0 * * *", "colour": "red"}, "colour: unknown key"),
])
def test_schedule_config_errors_name_the_schedule_and_key(tmp_path, entry, message):
    body = {"name": "daily", "partitions": ["raw/date={data_time:%Y-%m-%d}"]}
    body.update(entry)
    lines = ["\n[[schedules]]"] + ["%s = %s" % (k, json.dumps(v)) for k, v in body.items()]
    ws = write(tmp_path, GOOD + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(ws)
    assert "[[schedules]] 'daily'" in e.value.message and message in e.value.message


def test_readme_and_help_list_every_setting():
    # One table (databuild.SETTINGS and each executor's): README's reference
    # shows every key, serve --help says the defaults it has.
    import databuild
    with open(os.path.join(os.path.dirname(MODULE), "README.rst")) as f:
        readme = f.read()
    settings = list(databuild.SETTINGS)
    for executor in databuild.executors.values():
        settings += list(executor.all_settings().values()) + list(executor.job_settings)
    missing = [(s.table, s.key) for s in settings if "%s = " % s.key not in readme]
    assert not missing, missing
    help_text = " ".join(subprocess.run([sys.executable, MODULE, "serve", "--help"],
                                        capture_output=True, text=True).stdout.split())
    assert "else 10800" in help_text and "else 127.0.0.1" in help_text
