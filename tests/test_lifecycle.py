"""Server lifecycle: idle stop, graceful stop, restart recovery, one server per
workspace, CLI auto-start, status and stop (README "CLI", "Lifecycle")."""
import concurrent.futures
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time


import pytest

import databuild
from conftest import MODULE, ServeProcess, built, run_count, set_plan, wait_for, write_workspace


def events_of(workspace):
    conn = sqlite3.connect(os.path.join(workspace, ".databuild", "events.db"))
    try:
        return conn.execute("SELECT event_id, timestamp, type, payload FROM events "
                            "ORDER BY event_id").fetchall()
    finally:
        conn.close()


def cli(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, MODULE, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our own exited child) counts as gone.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- the idle timer, one tick at a time --------------------------------------

def test_idle_timer_ticks_with_an_explicit_clock():
    now = [100.0]
    busy = [False]
    fired = []
    timer = databuild.IdleTimer(10, lambda: busy[0], fired.append, clock=lambda: now[0])
    assert not timer.check(105)
    timer.touch(105)  # a request
    assert not timer.check(114)
    busy[0] = True
    assert not timer.check(200)  # a job run queued or running keeps it alive
    busy[0] = False
    assert not timer.check(209)
    assert timer.check(210) and fired == [10]
    assert not timer.check(500)  # fires once


def test_idle_timer_zero_never_fires():
    fired = []
    timer = databuild.IdleTimer(0, lambda: False, fired.append, clock=lambda: 1e9)
    assert not timer.check(1e12) and not fired


# -- real servers --------------------------------------------------------------

def test_idle_stop(workspace, serve):
    server = serve(workspace, "--idle-timeout", "0.5")
    assert server.proc.wait(20) == 0
    err = server.proc.stderr.read()
    assert "Server idle for 0 seconds, shutting down" in err
    assert "Shutdown complete" in err
    assert not os.path.exists(os.path.join(workspace, ".databuild", "server.json"))


def test_no_idle_stop_while_a_job_runs(workspace, serve):
    set_plan(workspace, {"slow": {"sleep": 2}})
    server = serve(workspace, "--idle-timeout", "0.5")
    want = server.client.create_want(["slow"])
    # Nothing asks the server anything while the job runs for 2 seconds.
    assert server.proc.wait(30) == 0
    err = server.proc.stderr.read()
    assert "Server idle for" in err
    assert built(workspace, "slow")
    again = ServeProcess(workspace)
    try:
        assert again.client.get_want(want["want_id"])["status"] == "Successful"
    finally:
        again.stop()


def test_graceful_stop_lets_a_request_in_flight_finish(workspace, serve):
    set_plan(workspace, {"stubborn": {"sleep": 60, "ignore_term": True}})
    server = serve(workspace)
    want = server.client.create_want(["stubborn"])
    wait_for(lambda: os.path.exists(os.path.join(workspace, "runs", "pids")))
    (run_id,) = server.client.get_want(want["want_id"])["job_run_ids"]
    result = {}

    def cancel():  # answered only once the job's process has exited (SIGKILL after 3 s)
        try:
            result["run"] = server.client.cancel_job_run(run_id)
        except Exception as e:
            result["error"] = e
    t = threading.Thread(target=cancel)
    t.start()
    # The cancel has reached the server once the job got (and ignored) its SIGTERM.
    wait_for(lambda: os.path.exists(os.path.join(workspace, "runs", "terms")))
    server.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert server.proc.wait(30) == 0
    assert result.get("run", {}).get("status") == "Canceled", result
    assert "Shutdown complete" in server.proc.stderr.read()


def test_sigterm_cancels_running_jobs_and_removes_server_json(workspace, serve):
    set_plan(workspace, {"a": {"sleep": 60}, "b": {"sleep": 60}})
    server = serve(workspace)
    server.client.create_want(["a", "b"])
    wait_for(lambda: len(server.client.list_job_runs(status="Running")["data"]) == 2)
    wait_for(lambda: os.path.exists(os.path.join(workspace, "runs", "pids")) and
             len(open(os.path.join(workspace, "runs", "pids")).read().split()) == 2)
    job_pids = [int(p) for p in open(os.path.join(workspace, "runs", "pids")).read().split()]
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - started < 10
    assert not any(pid_alive(p) for p in job_pids)
    assert not os.path.exists(os.path.join(workspace, ".databuild", "server.json"))
    rows = events_of(workspace)
    cancels = [json.loads(r[3]) for r in rows if r[2] == "job_run_cancel"]
    assert len(cancels) == 2 and all(c["reason"] == "server shutdown" for c in cancels)


def test_restart_after_clean_stop_keeps_every_event(workspace, serve):
    server = serve(workspace)
    want = server.client.create_want(["a", "b"])
    wait_for(lambda: server.client.get_want(want["want_id"])["status"] == "Successful")
    assert server.stop() == 0
    before = events_of(workspace)
    again = serve(workspace)
    assert again.client.get_want(want["want_id"])["status"] == "Successful"
    assert again.client.health()["latest_event_id"] == len(before)
    assert again.stop() == 0
    assert events_of(workspace) == before  # nothing new, nothing changed


def test_serve_spawns_jobs_in_the_workspace_with_stdio_only(tmp_path, serve):
    # `serve` moves into the workspace and spawns with posix_spawn (the
    # in-process tests use Popen): the same job protocol either way.
    ws = write_workspace(tmp_path / "ws", jobs=[
        {"label": "t", "partition_patterns": ["out/.*"]},
        {"label": "sig", "partition_patterns": ["sig/.*"],
         "entrypoint": ["sh", "-c", "grep SigIgn /proc/self/status > sigign.txt"]},
        {"label": "gone", "partition_patterns": ["gone/.*"], "entrypoint": ["jobs/absent.sh"]}])
    server = serve(ws)
    want = server.client.create_want(["out/a", "sig/a"])
    wait_for(lambda: server.client.get_want(want["want_id"])["status"] == "Successful")
    gone = server.client.create_want(["gone/a"])
    wait_for(lambda: server.client.get_want(gone["want_id"])["status"] == "Failed")
    (failed,) = server.client.list_job_runs(status="Failed")["data"]
    assert failed["error"].startswith("cannot start job: [Errno 2] No such file or directory")
    assert os.path.join(ws, "jobs", "absent.sh") in failed["error"]
    with open(os.path.join(ws, "built", "out%2Fa")) as f:
        record = json.load(f)
    assert os.path.realpath(record["cwd"]) == os.path.realpath(ws)
    assert record["stdin"] == "" and record["fds"] == [0, 1, 2, 3]  # no descriptor leaked
    assert record["argv"] == ["out/a"] and record["env"]["DATABUILD_PARTITIONS"] == "out/a"
    (run,) = server.client.list_job_runs(status="Succeeded")["data"][:1]
    assert os.path.exists(os.path.join(ws, ".databuild", "logs", run["job_run_id"],
                                       "stdout.log"))
    with open(os.path.join(ws, "sigign.txt")) as f:
        ignored = int(f.read().split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))  # Python ignores it; a job must not


def test_answers_go_out_whole_to_a_late_reader_and_to_many_writers(workspace, serve):
    # The I/O loop leaves a channel alone while its worker is sending
    # (databuild._channel_class).  An answer far larger than the socket
    # buffers, to a client that only starts reading later, still arrives
    # whole; sixteen clients writing at once all get their answers.
    big = "x" * (6 << 20)
    set_plan(workspace, {"big": {"stdout": big}})
    server = serve(workspace)
    want = server.client.create_want(["big"])
    wait_for(lambda: server.client.get_want(want["want_id"])["status"] == "Successful")
    (run_id,) = server.client.get_want(want["want_id"])["job_run_ids"]
    host, port = server.url.split("//")[1].rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # a small window
    sock.settimeout(20)
    sock.connect((host, int(port)))
    with sock:
        sock.sendall(("GET /api/job_runs/%s/logs/stdout HTTP/1.1\r\nHost: %s:%s\r\n"
                      "Authorization: Bearer %s\r\nConnection: close\r\n\r\n"
                          % (run_id, host, port, server.token)).encode())
        time.sleep(0.3)  # the reader is late: the server's sends fill the buffers
        chunks = []
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    head, body = b"".join(chunks).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and body == big.encode() + b"\nbuilt big\n"

    def write(i):
        client = databuild.Client(server.url, timeout=20, token=server.token)
        return [client.create_want(["big"], comment="w%d" % i)["status"] for _ in range(10)]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = [s for statuses in pool.map(write, range(16)) for s in statuses]
    assert answers == ["Successful"] * 160
    assert server.client.list_wants(limit=0)["total"] == 161


def test_restart_after_sigkill_recovers_runs_and_stops_orphans(workspace, serve):
    set_plan(workspace, {"a": {"sleep": 60, "sleep_times": 1}, "b": {"deps": ["a"]}})
    server = serve(workspace)
    want = server.client.create_want(["b"])
    wait_for(lambda: os.path.exists(os.path.join(workspace, "runs", "pids")))
    orphan = int(open(os.path.join(workspace, "runs", "pids")).read().split()[0])
    acknowledged = server.client.health()["latest_event_id"]
    server.proc.kill()  # no chance to record anything
    server.proc.wait()
    assert pid_alive(orphan)  # the job outlived the server (its own session)
    rows = events_of(workspace)
    (start,) = [json.loads(r[3]) for r in rows if r[2] == "job_run_start"
                and json.loads(r[3])["pid"] == orphan]
    assert databuild._is_same_process(orphan, start["pid_start_time"])  # (pid, start time)
    assert len(rows) >= acknowledged
    again = serve(workspace)
    wait_for(lambda: not pid_alive(orphan), timeout=10)
    final = wait_for(lambda: (lambda w: w if w["status"] == "Successful" else None)(
        again.client.get_want(want["want_id"])), timeout=30)
    assert final["status"] == "Successful"
    after = events_of(workspace)
    assert after[:len(rows)] == rows  # the same events, with the same ids
    restarted = [r for r in again.client.list_job_runs(status="Failed")["data"]
                 if r["error"] == "server restarted"]
    assert len(restarted) == 1 and restarted[0]["partitions"] == ["a"]
    assert run_count(workspace, "a") == 2


def test_crash_loop_loses_no_acknowledged_want(workspace):
    """kill -9 at random moments under four writing threads, restart, again:
    every acknowledged want is there, the events stay gapless, nothing is stuck
    (the loop of tests/benchmarks/bench_crash.py, shorter)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "benchmarks"))
    try:
        from bench_crash import crash_loop
    finally:
        sys.path.pop(0)
    _, figures = crash_loop(workspace, kills=4, writers=4, seed=7, pause=(0.1, 0.6))
    assert figures["acknowledged"] > 20
    assert figures["lost"] == 0 and figures["gapless"] and figures["unfinished_wants"] == 0


def test_second_server_is_refused(workspace, serve):
    first = serve(workspace)
    r = subprocess.run([sys.executable, MODULE, "serve", "--workspace", workspace],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert first.url in r.stderr and str(first.proc.pid) in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_stale_server_json_is_replaced(workspace, serve):
    state = os.path.join(workspace, ".databuild")
    os.makedirs(state)
    with open(os.path.join(state, "server.json"), "w") as f:
        json.dump({"pid": 999999, "url": "http://127.0.0.1:9", "port": 9}, f)
    r = cli("--workspace", workspace, "want", "list", "--no-start")
    assert r.returncode == 1 and "No server is running" in r.stderr
    server = serve(workspace)
    assert databuild.read_server_info(state)["url"] == server.url


def test_cli_auto_start_status_and_stop(workspace):
    r = cli("want", "create", "a", "--json", cwd=workspace)
    assert r.returncode == 0, r.stderr
    assert "Starting databuild server" in r.stderr
    info = databuild.read_server_info(os.path.join(workspace, ".databuild"))
    try:
        assert pid_alive(info["pid"])
        with open(os.path.join(workspace, ".databuild", "server.log")) as f:
            assert "Listening on " + info["url"] in f.read()
        status = cli("status", cwd=workspace)
        assert status.returncode == 0
        assert info["url"] in status.stdout and str(info["pid"]) in status.stdout
        assert "uptime_seconds:" in status.stdout and "wants:" in status.stdout
        status_json = json.loads(cli("status", "--json", cwd=workspace).stdout)
        assert status_json["pid"] == info["pid"] and status_json["version"] == databuild.__version__
        stop = cli("stop", cwd=workspace)
        assert stop.returncode == 0 and "stopped" in stop.stdout
        assert not pid_alive(info["pid"])
        assert not os.path.exists(os.path.join(workspace, ".databuild", "server.json"))
        with open(os.path.join(workspace, ".databuild", "server.log")) as f:
            assert "Shutdown complete" in f.read()
        again = cli("stop", cwd=workspace)
        assert again.returncode == 0 and "No server is running" in again.stdout
    finally:
        if pid_alive(info["pid"]):
            os.kill(info["pid"], signal.SIGKILL)


def test_serve_on_a_port_in_use_says_so_in_one_line(workspace, serve):
    first = serve(workspace)
    port = first.url.rsplit(":", 1)[1]
    other = write_workspace(os.path.join(os.path.dirname(workspace), "other"))
    r = subprocess.run([sys.executable, MODULE, "serve", "--workspace", other, "--port", port],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.startswith("databuild: error: Cannot listen on 127.0.0.1:%s" % port)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_many_cli_commands_at_once_start_one_server_and_all_succeed(tmp_path):
    for round_ in range(2):
        ws = write_workspace(tmp_path / ("ws%d" % round_))
        procs = [subprocess.Popen([sys.executable, MODULE, "--workspace", ws, "want", "list",
                                   "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(16)]
        results = [(p.wait(60), p.stdout.read(), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        info = databuild.read_server_info(os.path.join(ws, ".databuild"))
        try:
            for code, out, err in results:
                assert code == 0 and json.loads(out)["total"] == 0, err
            starts = sum("Starting databuild server" in err for _, _, err in results)
            assert starts == 1
            with open(os.path.join(ws, ".databuild", "server.log")) as f:
                assert f.read().count("Listening on ") == 1
        finally:
            os.kill(info["pid"], signal.SIGTERM)
            wait_for(lambda: not pid_alive(info["pid"]), timeout=30)


def test_a_lost_event_log_is_refused_not_started_anew(workspace, serve):
    server = serve(workspace)
    want = server.client.create_want(["a"])
    wait_for(lambda: server.client.get_want(want["want_id"])["status"] == "Successful")
    assert server.stop() == 0
    db = os.path.join(workspace, ".databuild", "events.db")
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    os.truncate(db, 0)
    r = subprocess.run([sys.executable, MODULE, "serve", "--workspace", workspace, "--port", "0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "events.db is empty (0 bytes)" in r.stderr
    assert "logs of 1 job runs" in r.stderr and "backup" in r.stderr
    assert os.path.getsize(db) == 0  # nothing was started over it


def test_auto_start_with_a_bad_config_is_one_config_error(workspace):
    with open(os.path.join(workspace, "databuild.toml"), "a") as f:
        f.write("\n[server]\nport = 'x'\n")
    r = cli("--workspace", workspace, "want", "list")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("databuild: error")]
    assert len(errors) == 1 and "databuild.toml" in errors[0]


# -- no process outlives its run -----------------------------

def _left_pid(workspace, ref):
    path = os.path.join(workspace, "runs", ref + ".left")
    wait_for(lambda: os.path.exists(path) and open(path).read().endswith("\n"))
    with open(path) as f:
        return int(f.read())


@pytest.mark.parametrize("setsid", [False, True])
def test_what_a_finished_run_leaves_behind_is_stopped(workspace, serve, setsid):
    set_plan(workspace, {"a": {"leave": {"argv": ["sleep", "300"], "setsid": setsid}}})
    server = serve(workspace)
    want = server.client.create_want(["a"])
    wait_for(lambda: server.client.get_want(want["want_id"])["status"] == "Successful")
    left = _left_pid(workspace, "a")
    wait_for(lambda: not pid_alive(left), timeout=10)


def test_each_orphan_is_stopped_and_logged_once_whatever_the_executors(tmp_path, serve):
    # A local and a python job: one sweep for the server, not one per executor.
    from conftest import TEST_JOB
    ws = write_workspace(tmp_path / "ws", jobs=[
        {"label": "local", "partition_patterns": ["l/.*"]},
        {"label": "py", "partition_patterns": ["p/.*"], "executor": "python",
         "entrypoint": [sys.executable, TEST_JOB]}],
        plan={"l/a": {"leave": {"argv": ["sleep", "300"], "setsid": True}},
              "p/a": {"leave": {"argv": ["sleep", "300"], "setsid": True}}})
    server = serve(ws)
    for ref in ("p/a", "l/a"):
        want = server.client.create_want([ref])
        wait_for(lambda: server.client.get_want(want["want_id"])["status"] == "Successful")
        left = _left_pid(ws, ref.replace("/", "%2F"))
        wait_for(lambda: not pid_alive(left), timeout=10)
    assert server.stop() == 0
    stopped = re.findall(r"Stopping pid (\d+), left behind", server.stderr)
    assert len(stopped) == 2 and len(set(stopped)) == 2, server.stderr


def test_cancel_stops_a_child_that_left_the_group(workspace, serve):
    set_plan(workspace, {"a": {"sleep": 300, "leave": {
        "argv": ["sh", "-c", "sleep 300 & sleep 300"], "setsid": True}}})
    server = serve(workspace)
    want = server.client.create_want(["a"])
    left = _left_pid(workspace, "a")
    (run_id,) = server.client.get_want(want["want_id"])["job_run_ids"]
    assert pid_alive(left)  # a running run's helpers are left alone
    server.client.cancel_job_run(run_id)
    wait_for(lambda: server.client.get_job_run(run_id)["status"] == "Canceled")
    wait_for(lambda: not pid_alive(left), timeout=10)
    # The grandchild (sleep 300 &, in the escaped group) went with it.
    wait_for(lambda: not any(
        "sleep 300" in _cmdline(pid) for pid in _descendants_of_sessions({left})), timeout=10)


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _descendants_of_sessions(sids):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) in sids and fields[0] != "Z":
                found.append(int(entry))
    return found


def test_shutdown_over_http_logs_no_traceback(tmp_path):
    # The trigger used to be closed while the shutdown's own worker pulled it
    # (EBADF in 3 of 16 stops).
    for i in range(8):
        server = ServeProcess(write_workspace(tmp_path / ("ws%d" % i)))
        server.client.shutdown()
        assert server.stop() == 0
        assert "Traceback" not in server.stderr and "Shutdown complete" in server.stderr


def test_a_grandchild_that_left_the_group_is_stopped_after_its_run(workspace, serve):
    # job -> sh (in the group, killed at the run's end) -> setsid sleep: the
    # sleep is orphaned only once the group kill has taken the sh.
    set_plan(workspace, {"a": {"leave": {
        "argv": ["sh", "-c", "setsid sleep 300 & echo $! > runs/grandchild; wait"]}}})
    server = serve(workspace)
    want = server.client.create_want(["a"])
    wait_for(lambda: server.client.get_want(want["want_id"])["status"] == "Successful")
    path = os.path.join(workspace, "runs", "grandchild")
    wait_for(lambda: os.path.exists(path) and open(path).read().strip())
    with open(path) as f:
        grandchild = int(f.read())
    wait_for(lambda: not pid_alive(grandchild), timeout=10)


def test_numbers_out_of_range_write_nothing_and_every_written_want_restarts(workspace, serve):
    # The largest numbers a want may hold, written, then a kill -9 and a
    # restart: the log replays, lists and the CLI's tables show them.
    server = serve(workspace)
    before = server.client.health()["latest_event_id"]
    for field, value in (("ttl_seconds", 10 ** 400), ("ttl_seconds", 10 ** 30),
                         ("data_timestamp", 1e300), ("priority", 10 ** 7)):
        with pytest.raises(databuild.InvalidRequest) as info:
            server.client.create_want(["a"], **{field: value})
        assert info.value.fields["field"] == field
    assert server.client.health()["latest_event_id"] == before  # nothing written
    set_plan(workspace, {"slow": {"sleep": 60}})
    edge = server.client.create_want(["slow"], ttl_seconds=315360000, sla_seconds=315360000,
                                     data_timestamp=253402300799, priority=1000000)
    wait_for(lambda: server.client.list_job_runs(status="Running")["total"])
    server.proc.kill()
    server.stop()
    again = serve(workspace)
    want = again.client.get_want(edge["want_id"])
    assert want["ttl_seconds"] == 315360000 and want["created_at"]
    listing = again.cli("want", "list")
    assert listing.returncode == 0 and "9999-12-31 23:59Z" in listing.stdout
    assert again.cli("want", "get", edge["want_id"]).returncode == 0
