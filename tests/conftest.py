"""Shared fixtures: workspaces with the scriptable test job, an orchestrator
driven one step at a time, an in-process WSGI caller and a real server."""
import io
import json
import os
import subprocess
import sys
import time
import urllib.parse
import wsgiref.util

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import databuild  # noqa: E402

TEST_JOB = os.path.join(HERE, "jobs", "testjob.py")
MODULE = os.path.join(ROOT, "databuild.py")
REVIEWS = os.path.join(ROOT, "examples", "reviews")


def toml_value(value):
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join("%s = %s" % (k, toml_value(v)) for k, v in value.items()) + " }"
    return repr(value)


def write_workspace(path, jobs=None, server=None, plan=None):
    """Write databuild.toml (+ plan.json) into ``path``; return the path."""
    os.makedirs(path, exist_ok=True)
    if jobs is None:
        jobs = [{"label": "test", "partition_patterns": [r"[a-z0-9_/=.-]+"]}]
    lines = ["[server]"]
    for key, value in (server or {}).items():
        lines.append("%s = %s" % (key, toml_value(value)))
    for job in jobs:
        job = dict(job)
        job.setdefault("entrypoint", [sys.executable, TEST_JOB])
        lines.append("\n[[jobs]]")
        for key, value in job.items():
            lines.append("%s = %s" % (key, toml_value(value)))
    with open(os.path.join(path, "databuild.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    set_plan(path, plan or {})
    return str(path)


def set_plan(path, plan):
    with open(os.path.join(path, "plan.json"), "w") as f:
        json.dump(plan, f)


def built(path, ref):
    return os.path.exists(os.path.join(path, "built", urllib.parse.quote(ref, safe="")))


def run_count(path, ref):
    try:
        with open(os.path.join(path, "runs", urllib.parse.quote(ref, safe=""))) as f:
            return len(f.readlines())
    except FileNotFoundError:
        return 0


@pytest.fixture
def workspace(tmp_path):
    return write_workspace(tmp_path / "ws")


class Driver:
    """An Orchestrator over a real event log, stepped by the test itself."""

    def __init__(self, path, clock=time.time):
        self.path = path
        self.config = databuild.load_config(path)
        self.log = databuild.EventLog(os.path.join(self.config.state_dir, "events.db"))
        self.orch = databuild.Orchestrator(self.config, self.log, url="http://127.0.0.1:9",
                                           clock=clock)

    @property
    def state(self):
        return self.orch.state

    def command(self, kind, **args):
        cmd = self.orch.enqueue(kind, **args)
        self.orch.step()
        assert cmd.done.is_set()
        if cmd.error is not None:
            raise cmd.error
        return cmd.result

    def want(self, *refs, **fields):
        """Create a want as POST /api/wants does (its body checked, ranges expanded)."""
        body = {"partitions": list(refs)}
        body.update(fields)
        request = databuild.parse_want_request(body, self.config)
        created, want = self.command("create_want", request=request)
        return want

    def until(self, predicate, timeout=15.0):
        """Step until ``predicate(state)``; sleeps as the orchestrator's loop does."""
        deadline = time.monotonic() + timeout
        while True:
            self.orch.step()
            if predicate(self.state):
                return
            assert time.monotonic() < deadline, "condition not reached in %.0fs" % timeout
            self.orch.wait(self.orch._sleep_seconds(time.time()) or 0.01)

    def full(self):
        """The whole state (a replay of the log), finished work included."""
        return databuild.BuildState.from_events(self.log.iter_events())

    def want_status(self, want_id):
        return self.orch.find_want(want_id).status

    def settle(self, want_id, timeout=15.0):
        self.until(lambda s: self.want_status(want_id) in databuild.TERMINAL_WANT_STATUSES,
                   timeout)
        return self.want_status(want_id)

    def close(self):
        self.orch.shutdown()
        self.log.close()


@pytest.fixture
def driver_for():
    drivers = []

    def make(path, clock=time.time):
        d = Driver(path, clock)
        drivers.append(d)
        return d
    yield make
    for d in drivers:
        d.close()


class WSGIClient:
    """Calls a WSGI app in-process: ``call(method, path, body=..., headers=...)``."""

    def __init__(self, app, token=None):
        self.app = app
        self.token = token  # sent as a Bearer header unless the call gives Authorization

    def call(self, method, path, body=None, headers=None, raw_body=None, environ=None):
        path, _, query = path.partition("?")
        extra_environ = environ
        # PEP 3333: the path's bytes, as Latin-1 (what waitress hands over).
        environ = {"REQUEST_METHOD": method,
                   "PATH_INFO": urllib.parse.unquote_to_bytes(path).decode("latin-1"),
                   "QUERY_STRING": query}
        wsgiref.util.setup_testing_defaults(environ)
        environ.setdefault("REMOTE_ADDR", "127.0.0.1")
        environ.update(extra_environ or {})
        data = raw_body if raw_body is not None else (
            b"" if body is None else json.dumps(body).encode())
        environ["wsgi.input"] = io.BytesIO(data)
        environ["CONTENT_LENGTH"] = str(len(data))
        hdrs = {"Content-Type": "application/json"} if method == "POST" else {}
        if self.token:
            hdrs["Authorization"] = "Bearer " + self.token
        hdrs.update(headers or {})
        for key, value in hdrs.items():
            if value is None:
                continue
            if key.lower() == "content-type":
                environ["CONTENT_TYPE"] = value
            elif key.lower() == "content-length":
                environ["CONTENT_LENGTH"] = value
            else:
                environ["HTTP_" + key.upper().replace("-", "_")] = value
        result = {}

        def start_response(status, response_headers, exc_info=None):
            result["status"] = int(status.split()[0])
            result["headers"] = dict(response_headers)
        chunks = self.app(environ, start_response)
        try:
            payload = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        return Response(result["status"], result["headers"], payload)


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "Response(%d, %r)" % (self.status, self.body[:300])


@pytest.fixture
def app_server(workspace):
    """A databuild.Server with its orchestrator running, but no socket."""
    server = databuild.Server(databuild.load_config(workspace))
    server.orchestrator.start()
    server.http = WSGIClient(server.app, server.token)
    yield server
    server.orchestrator.stop()
    server.close()


class ServeProcess:
    """``python databuild.py serve`` as a subprocess on port 0."""

    def __init__(self, workspace, *extra, env=None):
        self.workspace = workspace
        self.proc = subprocess.Popen(
            [sys.executable, MODULE, "serve", "--workspace", workspace, "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, **(env or {})))
        line = self.proc.stdout.readline()
        if not line.startswith("Listening on "):
            self.proc.kill()
            raise AssertionError("serve did not start: %r %s" % (line, self.proc.stderr.read()))
        self.url = line.split()[-1]
        info = databuild.read_server_info(os.path.join(workspace, ".databuild"))
        self.token = info.get("token")
        self.client = databuild.Client(self.url, timeout=30, token=self.token)

    def cli(self, *args, check=None, env=None):
        """Run the CLI against this server; returns CompletedProcess."""
        env = dict(os.environ, **({"DATABUILD_TOKEN": self.token} if self.token else {}),
                   **(env or {}))
        result = subprocess.run([sys.executable, MODULE, "--server", self.url, *args],
                                capture_output=True, text=True, timeout=120, env=env)
        if check is not None:
            assert result.returncode == check, (result.returncode, result.stdout, result.stderr)
        return result

    def stop(self, timeout=30):
        if self.proc.stderr.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture
def serve():
    servers = []

    def start(workspace, *extra, env=None):
        s = ServeProcess(workspace, *extra, env=env)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.stop()


def wait_for(predicate, timeout=15.0, interval=0.02):
    """Poll ``predicate`` (for conditions outside our process) until true."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in %.0fs" % timeout)
        time.sleep(interval)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node Slurm cluster for the session (tests/slurmcluster.py), or a skip
    saying why there can be none here (CI installs Slurm: .ci/run)."""
    sys.path.insert(0, HERE)
    import slurmcluster
    reason = slurmcluster.unavailable()
    if reason:
        pytest.skip(reason)
    cluster = slurmcluster.start(str(tmp_path_factory.mktemp("slurm")))
    yield cluster
    cluster.stop()
