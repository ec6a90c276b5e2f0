#!/usr/bin/env python3
"""databuild.py -- a want-driven data build system in one module.

Data engineers declare what data they *want* ("partitions", named by refs such
as ``reviews/date=2025-01-01``).  A single-threaded orchestrator runs the jobs
that build them, turns each job's reported missing upstream partitions into new
(derivative) wants, retries, cancels and recovers.  Every change of state is an
event appended to the build event log, an SQLite database, and all state is a
pure reduction of that log.  A per-workspace server (Bottle on waitress) exposes
it as a JSON API; a CLI (argparse + urllib) drives it; the server stops by
itself when idle.

Run it::

    python databuild.py serve --workspace examples/reviews
    python databuild.py --workspace examples/reviews build 'report/weekly/week=2025-01-06' --wait
    python databuild.py want list

Requires Python >= 3.11.  Runtime dependencies: ``bottle`` and ``waitress``
(only for the server; the reducer, the client and the CLI need only the
standard library).  License: MIT.

Sections (in dependency order; ``grep -n '^# .*####' databuild.py``):

    Constants and defaults
    Errors
    Utilities
    Events and the reducer
    Storage: the event log
    Configuration
    Executors: where job runs execute
    Automation: want requests, sensors, alerts
    Orchestrator
    Read model
    HTTP API
    Server and lifecycle
    Dashboard
    Client
    CLI
"""

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "AlertConfig",
    "BuildState",
    "Client",
    "Config",
    "ConfigError",
    "ConfigWatcher",
    "Conflict",
    "DatabuildError",
    "Event",
    "EventLog",
    "Executor",
    "ExecutorError",
    "IdleTimer",
    "InvalidRequest",
    "JobConfig",
    "JobRunHandle",
    "LocalExecutor",
    "MemoryView",
    "NotFound",
    "Orchestrator",
    "PayloadTooLarge",
    "PythonExecutor",
    "ReadModel",
    "Server",
    "SensorConfig",
    "ServerUnreachable",
    "SlurmExecutor",
    "StorageError",
    "StoreView",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "UsageError",
    "WaitTimeout",
    "check_ref",
    "code_files",
    "code_version",
    "deliver_alert",
    "describe_error",
    "evaluate_sensor",
    "executors",
    "is_loopback",
    "load_config",
    "main",
    "make_app",
    "metrics_text",
    "openapi_document",
    "parse_json_body",
    "parse_want_request",
    "run_bounded",
    "sensor_want",
]

import argparse
import bisect
import collections
import contextlib
import datetime
import errno
import fcntl
import functools
import gc
import getpass
import hashlib
import heapq
import hmac
import http.client
import itertools
import json
import logging
import operator
import os
import queue
import random
import re
import secrets
import select
import selectors
import shlex
import shutil
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import threading
import time
import tomllib
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
import zoneinfo

logger = logging.getLogger("databuild")
logger.addHandler(logging.NullHandler())


###############################################################################
# Constants and defaults ######################################################
###############################################################################

#: The server's internal limits and timings (databuild.toml's keys and their
#: defaults are in ``SETTINGS``, in the Configuration section).
DEFAULTS = {
    "orchestrator_max_sleep_seconds": 1.0,  # longest sleep when nothing wakes it
    "command_timeout_seconds": 30.0,  # an HTTP write waits this long for a reply
    "kill_grace_seconds": 3.0,  # SIGTERM -> SIGKILL for a job's process group
    "http_threads": 16,
    # Connections open at once (idle ones included) before waitress stops
    # accepting; an idle one is closed after http_idle_seconds.
    "http_connection_limit": 1000,
    "http_idle_seconds": 30,
    # An answer's bytes that wait in memory for a slow reader before its worker
    # waits too (waitress's outbuf_high_watermark; its default is 16 MiB).
    "http_outbuf_bytes": 2 * 1024 * 1024,
    "list_limit": 100,
    "list_limit_max": 1000,
    "max_body_bytes": 1024 * 1024,
    "max_partitions_per_want": 10000,
    "lineage_depth_max": 50,
    "cli_start_timeout_seconds": 15.0,
    "commit_retry_seconds": 2.0,  # after a failed commit, no job run starts for this long
    # Pending partitions one step looks at (queues, or wants deps for): a
    # backfill of 10,000 is queued over a few steps, each answered quickly.
    "schedule_batch": 1000,
    # A run's stdout up to this size is read for its outcome in the
    # orchestrator's thread (a millisecond); a longer one on a thread of its own.
    "outcome_inline_bytes": 256 * 1024,
    # README "Sensors": what one evaluation may print before it is stopped and
    # failed, and the stderr lines kept as its error.
    "sensor_output_bytes": 1024 * 1024,
    "sensor_error_lines": 5,
    # README "Alerts": a failed delivery is tried again after each of these
    # waits in turn, then given up; a command's and a webhook's time limits.
    "alert_backoff_seconds": (1.0, 2.0, 4.0, 8.0),
    "alert_command_timeout_seconds": 30.0,
    "alert_webhook_timeout_seconds": 10.0,
}

#: The ranges of a want's numbers (README "HTTP API"): checked before anything
#: is written, so every want in the log has times a server can compute with.
PRIORITY_RANGE = (-1000000, 1000000)
DURATION_RANGE = (1, 315360000)  # ttl_seconds, sla_seconds: 1 s to ten years
DATA_TIME_RANGE = (0, 253402300799)  # data_timestamp: 1970 to the end of year 9999

#: Upper bounds (seconds) of the job run duration histogram of /metrics.
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, float("inf"))

STATE_DIR = ".databuild"
CONFIG_FILE = "databuild.toml"
MISSING_DEPS_MARKER = "DATABUILD_MISSING_DEPS_JSON:"
READ_DEPS_MARKER = "DATABUILD_READ_DEPS_JSON:"  # lineage: what a job read (README "Lineage")
TOKEN_COOKIE = "databuild_token"  # the dashboard's copy of the access token (README "Security")
LOOPBACK_HOSTS = frozenset(("127.0.0.1", "localhost", "::1"))

# Want statuses (README "Concepts").
IDLE = "Idle"
BUILDING = "Building"
UPSTREAM_BUILDING = "UpstreamBuilding"
SUCCESSFUL = "Successful"
FAILED = "Failed"
UPSTREAM_FAILED = "UpstreamFailed"
CANCELED = "Canceled"
EXPIRED = "Expired"
WANT_STATUSES = (IDLE, BUILDING, UPSTREAM_BUILDING, SUCCESSFUL, FAILED,
                 UPSTREAM_FAILED, CANCELED, EXPIRED)
TERMINAL_WANT_STATUSES = frozenset((SUCCESSFUL, FAILED, UPSTREAM_FAILED, CANCELED, EXPIRED))

# Partition statuses (Building, UpstreamBuilding, Failed, UpstreamFailed and
# Canceled are shared with wants).
UP_FOR_RETRY = "UpForRetry"
LIVE = "Live"
TAINTED = "Tainted"
PARTITION_STATUSES = (BUILDING, UPSTREAM_BUILDING, UP_FOR_RETRY, LIVE, FAILED,
                      UPSTREAM_FAILED, TAINTED, CANCELED)
#: A partition in one of these statuses (or with no partition yet) needs a job
#: run whenever something wants it.
NEEDS_BUILD = frozenset((None, UP_FOR_RETRY, TAINTED, CANCELED))
#: A want ends when each of its partitions is in one of these (README "Backfills").
SETTLED = frozenset((LIVE, FAILED, UPSTREAM_FAILED))
LIVE_WANT_STATUSES = (IDLE, BUILDING, UPSTREAM_BUILDING)
_NOTHING = frozenset()  # the shared "waits on nothing" of partitions

# Job run statuses.
QUEUED = "Queued"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
DEP_MISS = "DepMiss"
JOB_RUN_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, DEP_MISS, CANCELED)
ACTIVE_JOB_RUN_STATUSES = frozenset((QUEUED, RUNNING))

# Event types (README "Concepts").
WANT_CREATE = "want_create"
WANT_CANCEL = "want_cancel"
WANT_EXPIRE = "want_expire"
WANT_SLA_BREACH = "want_sla_breach"
JOB_RUN_QUEUE = "job_run_queue"
JOB_RUN_START = "job_run_start"
JOB_RUN_SUCCESS = "job_run_success"
JOB_RUN_FAILURE = "job_run_failure"
JOB_RUN_MISSING_DEPS = "job_run_missing_deps"
JOB_RUN_CANCEL = "job_run_cancel"
PARTITION_TAINT = "partition_taint"
JOB_CODE_VERSION = "job_code_version"  # a job's code changed (README "Freshness")
SENSOR_EVALUATE = "sensor_evaluate"  # README "Sensors"
ALERT_RAISE = "alert_raise"  # README "Alerts"
ALERT_DELIVERED = "alert_delivered"
ALERT_FAILED = "alert_failed"
EVENT_TYPES = (WANT_CREATE, WANT_CANCEL, WANT_EXPIRE, WANT_SLA_BREACH,
               JOB_RUN_QUEUE, JOB_RUN_START, JOB_RUN_SUCCESS, JOB_RUN_FAILURE,
               JOB_RUN_MISSING_DEPS, JOB_RUN_CANCEL, PARTITION_TAINT, JOB_CODE_VERSION,
               SENSOR_EVALUATE, ALERT_RAISE, ALERT_DELIVERED, ALERT_FAILED)

# README "Alerts": what an alert may be raised on, and the states of its delivery.
ALERT_KINDS = ("want_failed", "partition_failed", "sla_breached", "sensor_failed")
OWED = "owed"
DELIVERED = "delivered"
GIVEN_UP = "given_up"
ALERT_STATUSES = (OWED, DELIVERED, GIVEN_UP)

# Reasons recorded on job runs that did not end on their own.
REASON_SERVER_SHUTDOWN = "server shutdown"
REASON_SERVER_RESTARTED = "server restarted"
REASON_TIMEOUT = "timeout"


###############################################################################
# Errors ######################################################################
###############################################################################

class DatabuildError(Exception):
    """Root of every error this module raises on purpose.

    ``fields`` are the identifiers the error is about; the HTTP layer puts them
    beside ``"error"`` in the JSON body, the CLI prints the message.
    """

    def __init__(self, message, **fields):
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_dict(self):
        """The JSON error body: ``{"error": message, **fields}``."""
        return {"error": self.message, **self.fields}


class ConfigError(DatabuildError):
    """databuild.toml (or a command-line setting) is invalid."""


class UsageError(DatabuildError):
    """A command line that does not say what to do (the CLI exits 2)."""


class InvalidRequest(DatabuildError):
    """Bad input: bad JSON, wrong types, unknown fields, bad refs (HTTP 400)."""


class Unauthorized(DatabuildError):
    """A request without the server's access token, or with a wrong one (HTTP 401)."""


class NotFound(DatabuildError):
    """No such want, partition or job run (HTTP 404)."""


class Conflict(DatabuildError):
    """The request contradicts the current state (HTTP 409)."""


class PayloadTooLarge(DatabuildError):
    """A request body over the size limit (HTTP 413)."""


class UnsupportedMediaType(DatabuildError):
    """A POST whose body is not ``application/json`` (HTTP 415)."""


class Unavailable(DatabuildError):
    """Shutting down, or the orchestrator did not answer in time (HTTP 503)."""


class StorageError(DatabuildError):
    """The event log could not be read or written (sqlite3 errors, translated)."""


class ServerUnreachable(DatabuildError):
    """The client could not reach a server."""


class WaitTimeout(DatabuildError):
    """A client waited for something (``Client.wait_want``) longer than it was told to."""


class ExecutorError(DatabuildError):
    """An executor could not start a job run (or learn of it); the message
    is the run's error as it is (README "Running on a cluster")."""


###############################################################################
# Utilities ###################################################################
###############################################################################

def isoformat(ts):
    """Format epoch seconds as ``2026-11-27T09:30:00.123Z`` (None stays None)."""
    if ts is None:
        return None
    seconds = int(ts // 1)
    millis = int(round((ts - seconds) * 1000))
    if millis == 1000:
        seconds, millis = seconds + 1, 0
    return "%s.%03dZ" % (_iso_seconds(seconds), millis)


@functools.lru_cache(maxsize=4096)
def _iso_seconds(seconds):
    # Timestamps cluster (one step, one page of a list): format each second once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


# Ids need to be unique, not secret: a generator seeded once from the OS is
# an order of magnitude cheaper than os.urandom per id (uuid.uuid4).
_id_source = random.Random(os.urandom(32))


def new_id():
    """A fresh uuid4 string: want and job run ids."""
    return str(uuid.UUID(int=_id_source.getrandbits(128), version=4))


_REF_RE = re.compile(r"[^\s\x00-\x1f\x7f]{1,1024}")


def check_ref(ref):
    """Raise InvalidRequest unless ``ref`` is a well-formed ref (README "The workspace").

    Besides 1 to 1024 printable characters without whitespace, no ``/``
    segment may be ``.`` or ``..``: jobs map refs to paths, and such a ref
    would lead them out of their folder.
    """
    if not isinstance(ref, str):
        raise InvalidRequest("Invalid partition ref %s: refs are strings" % _shown(ref),
                             ref=_shown(ref))
    if not _REF_RE.fullmatch(ref) or not ref.isprintable():
        raise InvalidRequest("Invalid partition ref %r: 1 to 1024 printable characters, "
                             "no whitespace" % _shown(ref), ref=_shown(ref))
    if "." in ref and any(segment in (".", "..") for segment in ref.split("/")):
        raise InvalidRequest("Invalid partition ref %r: '.' and '..' are not allowed as "
                             "path segments" % ref, ref=ref)
    return ref


_RANGE_RE = re.compile(r"\[([^\[\]]*)\.\.([^\[\]]*)\]")
#: The kinds of range ends (README "Backfills"): a name, the regex an end
#: matches, how to read one, and how to write a value (strftime; None: digits).
_RANGE_KINDS = (
    ("day", re.compile(r"\d{4}-\d{2}-\d{2}"),
     lambda t: datetime.datetime.strptime(t, "%Y-%m-%d"), "%Y-%m-%d"),
    ("hour", re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}"),
     lambda t: datetime.datetime.strptime(t, "%Y-%m-%dT%H"), "%Y-%m-%dT%H"),
    ("month", re.compile(r"\d{4}-\d{2}"),
     lambda t: datetime.datetime.strptime(t, "%Y-%m"), "%Y-%m"),
    ("integer", re.compile(r"\d{1,18}"), int, None),
)


def _range_values(text, first, last):
    # The values of one range ``[first..last]`` as (count, iterator of text).
    kinds = [(name, parse, fmt) for name, regex, parse, fmt in _RANGE_KINDS
             if regex.fullmatch(first) and regex.fullmatch(last)]
    if not kinds:
        raise InvalidRequest("Bad range %s: both ends must be dates (YYYY-MM-DD), months "
                             "(YYYY-MM), hours (YYYY-MM-DDTHH) or integers, of one kind"
                             % text, range=text)
    name, parse, fmt = kinds[0]
    try:
        low, high = parse(first), parse(last)
    except ValueError as e:
        raise InvalidRequest("Bad range %s: %s" % (text, e), range=text) from None
    if low > high:
        raise InvalidRequest("Bad range %s: %s comes after %s" % (text, first, last), range=text)
    if name == "integer":
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        return high - low + 1, ("%0*d" % (width, n) for n in range(low, high + 1))
    if name == "month":
        start, end = low.year * 12 + low.month - 1, high.year * 12 + high.month - 1
        return end - start + 1, ("%04d-%02d" % (m // 12, m % 12 + 1)
                                 for m in range(start, end + 1))
    step = datetime.timedelta(days=1) if name == "day" else datetime.timedelta(hours=1)
    count = int((high - low) / step) + 1
    return count, ((low + i * step).strftime(fmt) for i in range(count))


def expand_ranges(refs, limit):
    """``refs`` with each ``[FROM..TO]`` range expanded, in order (README
    "Backfills"): days, months, hours or integers, inclusive, zero padding
    kept.  InvalidRequest naming the range if it is bad, or if the refs come
    to more than ``limit``."""
    out, total = [], 0
    for ref in refs:
        matches = list(_RANGE_RE.finditer(ref)) if isinstance(ref, str) and "[" in ref else ()
        if not matches:
            out.append(ref)
            total += 1
        else:
            if len(matches) > 1:
                raise InvalidRequest("Bad range in %r: a ref holds at most one [FROM..TO]"
                                     % _shown(ref), ref=_shown(ref))
            m = matches[0]
            count, values = _range_values(m.group(0), m.group(1), m.group(2))
            total += count
            if total <= limit:
                out.extend(ref[:m.start()] + v + ref[m.end():] for v in values)
        if total > limit:
            raise InvalidRequest("A want may name at most %d partitions; this one names %d"
                                 % (limit, total), field="partitions", count=total)
    return out


#: The shortest prefix of a want or job run id that stands for the id (as in git).
MIN_ID_PREFIX = 4


def unique_id(key, candidates, noun):
    """``key`` itself if it is among ``candidates`` (ids starting with ``key``,
    at most a few), else the one candidate it is a prefix of; None if none.
    InvalidRequest if the prefix is ambiguous."""
    candidates = list(candidates)
    if key in candidates:
        return key
    if len(key) < MIN_ID_PREFIX or not candidates:
        return None
    if len(candidates) > 1:
        raise InvalidRequest("%r is the start of more than one %s id (%s): give more of it"
                             % (key, noun, ", ".join(candidates[:3]) + (", ..." if len(
                                 candidates) > 3 else "")), prefix=key, matches=candidates[:3])
    return candidates[0]


def _shown(value, limit=200):
    """``value`` as text fit for an error message: valid UTF-8 (a lone
    surrogate becomes U+FFFD), at most ``limit`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=repr)[:limit]
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _json_default(obj):
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError("%s is not JSON serializable" % type(obj).__name__)


# One encoder, made once: json.dumps with options builds a new one per call.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                                 default=_json_default)


def dumps(obj):
    """Compact JSON, the one encoding used for the log and the API (sets as sorted lists)."""
    return _JSON_ENCODER.encode(obj)


def find_workspace(start=None):
    """The nearest folder at or above ``start`` holding databuild.toml, or None."""
    path = os.path.abspath(start or os.getcwd())
    while True:
        if os.path.isfile(os.path.join(path, CONFIG_FILE)):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Workers:
    """A few daemon threads that run slow calls (an executor's ``sbatch`` and
    ``scancel``, the reading of a long log) in order, so that no caller
    waits for them: ``submit(fn,
    *args)`` queues a call; ``close(timeout)`` lets the queued ones finish.
    The queue is the only state shared with the caller (it locks itself)."""

    def __init__(self, name, size):
        self._queue = queue.SimpleQueue()
        self._name, self._size = name, size
        self._threads = []  # started with the first call (the caller's thread only)

    def submit(self, fn, *args):
        """Run ``fn(*args)`` on a worker thread, soon."""
        if not self._threads:
            self._threads = [threading.Thread(target=self._work, daemon=True,
                                              name="%s-%d" % (self._name, i))
                             for i in range(self._size)]
            for thread in self._threads:
                thread.start()
        self._queue.put((fn, args))

    def _work(self):
        while True:
            fn, args = self._queue.get()
            if fn is None:
                return
            try:
                fn(*args)
            except Exception:
                logger.exception("%s failed", getattr(fn, "__name__", fn))

    def close(self, timeout):
        """Finish what is queued (up to ``timeout`` seconds), then stop."""
        for _ in self._threads:
            self._queue.put((None, ()))
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))



###############################################################################
# Events and the reducer ######################################################
###############################################################################

class Event:
    """One entry of the build event log: an id, a time, a type and a payload.

    ``timestamp`` is epoch seconds (float); ``to_dict`` renders it ISO 8601.
    """

    __slots__ = ("event_id", "timestamp", "type", "payload")

    def __init__(self, event_id, timestamp, type, payload):
        self.event_id = event_id
        self.timestamp = timestamp
        self.type = type
        self.payload = payload

    def to_dict(self):
        """The event as the API shows it (README "Concepts")."""
        return {"event_id": self.event_id, "timestamp": isoformat(self.timestamp),
                "type": self.type, "payload": self.payload}

    def __repr__(self):
        return "Event(%r, %r, %r)" % (self.event_id, self.type, self.payload)


class _Entity:
    """What wants, partitions and job runs share: a projection row.

    A row is the JSON list of the fields named by ``ROW``; ``_loaded`` sets
    what a row leaves out.
    """

    __slots__ = ()
    ROW = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._row_values = operator.attrgetter(*cls.ROW)

    def to_row(self):
        """The entity as one JSON projection row (the fields of ``ROW``)."""
        return dumps(self._row_values(self))

    @classmethod
    def from_row(cls, text):
        """An entity from a projection row."""
        return cls.from_values(json.loads(text))

    @classmethod
    def from_values(cls, values):
        """An entity from a projection row already parsed (a list in ``ROW`` order)."""
        entity = cls()
        for name, value in zip(cls.ROW, values):
            setattr(entity, name, value)
        entity._loaded()
        return entity

    def _loaded(self):
        pass


class Want(_Entity):
    """A declaration that some partitions should exist (README "Concepts", Want)."""

    __slots__ = ("want_id", "partitions", "status", "data_timestamp", "ttl_seconds",
                 "sla_seconds", "sla_breached", "source", "parent_want_id",
                 "root_want_id", "derivative_want_ids", "job_run_ids", "comment",
                 "created_at", "updated_at", "seq", "chain", "counts", "priority")
    #: What a projection row holds: everything but the live-only ``counts`` and
    #: the lists that grow without bound (link rows instead).
    ROW = tuple(f for f in __slots__
                if f not in ("counts", "job_run_ids", "derivative_want_ids"))

    def _loaded(self):
        # ``counts`` is the caller's to rebuild; the lists are link rows.
        self.chain = tuple(tuple(refs) for refs in self.chain)
        self.counts = None
        self.job_run_ids = []
        self.derivative_want_ids = []

    def to_dict(self, state):
        """The want as the API shows it; partition statuses come from ``state``."""
        statuses = {ref: state.partition_status(ref) for ref in self.partitions}
        counts = {"total": len(self.partitions)}
        counts.update(collections.Counter(statuses.values()))
        return {
            "want_id": self.want_id, "partitions": list(self.partitions),
            "status": self.status, "partition_statuses": statuses, "counts": counts,
            "data_timestamp": self.data_timestamp, "ttl_seconds": self.ttl_seconds,
            "sla_seconds": self.sla_seconds, "sla_breached": self.sla_breached,
            "source": dict(self.source), "parent_want_id": self.parent_want_id,
            "root_want_id": self.root_want_id,
            "derivative_want_ids": list(self.derivative_want_ids),
            "job_run_ids": list(self.job_run_ids), "comment": self.comment,
            "created_at": isoformat(self.created_at), "updated_at": isoformat(self.updated_at),
            "terminal": self.status in TERMINAL_WANT_STATUSES, "priority": self.priority,
        }


class Partition(_Entity):
    """An atomic unit of data named by a ref (README "Concepts", Partition).

    ``waiting_on`` holds the missing deps not yet Live while UpstreamBuilding;
    ``retries`` counts plain failures since the last success (for max_retries).
    ``upstream`` (README "Lineage") are the refs its last successful run read: the ones
    that run printed (``DATABUILD_READ_DEPS_JSON``) and the ones the runs for
    it reported missing since the success before (``reported_deps``).
    README "Freshness": ``code_version`` is that of the run that built it,
    ``built_at`` when that run succeeded, ``build_started_at`` when it
    started; ``stale_reasons`` is None while it is fresh, else why it is
    stale (cause -> a line).
    """

    __slots__ = ("ref", "status", "job_label", "last_job_run_id", "built_by_job_run_id",
                 "want_ids", "missing_deps", "updated_at", "waiting_on", "retries",
                 "upstream", "reported_deps", "retry_at", "seq", "code_version", "built_at",
                 "build_started_at", "stale_reasons")
    #: ``want_ids`` grows without bound: a link table holds it, not the row.
    ROW = tuple(f for f in __slots__ if f != "want_ids")

    @classmethod
    def from_values(cls, values):
        """A Partition from a parsed row: unrolled, as start-up loads every partition."""
        part = cls()
        (part.ref, part.status, part.job_label, part.last_job_run_id,
         part.built_by_job_run_id, part.missing_deps, part.updated_at, waiting_on,
         part.retries, part.upstream, part.reported_deps, part.retry_at, part.seq,
         part.code_version, part.built_at, part.build_started_at, part.stale_reasons) = values
        part.waiting_on = set(waiting_on) if waiting_on else _NOTHING
        part.want_ids = []
        return part

    def to_dict(self):
        """The partition as the API shows it."""
        return {"ref": self.ref, "status": self.status, "job_label": self.job_label,
                "last_job_run_id": self.last_job_run_id,
                "built_by_job_run_id": self.built_by_job_run_id,
                "want_ids": list(self.want_ids), "missing_deps": list(self.missing_deps),
                "upstream": list(self.upstream), "retry_at": isoformat(self.retry_at),
                "code_version": self.code_version, "built_at": isoformat(self.built_at),
                "stale": bool(self.stale_reasons),
                "stale_reasons": list((self.stale_reasons or {}).values()),
                "updated_at": isoformat(self.updated_at)}


class JobRun(_Entity):
    """One execution of a job for 1..max_partitions_per_run refs (README "Concepts", Job run)."""

    __slots__ = ("job_run_id", "job_label", "partitions", "want_ids", "status", "attempt",
                 "exit_code", "missing_deps", "error", "queued_at", "started_at",
                 "finished_at", "pid", "pid_start_time", "seq", "executor", "external_id",
                 "code_version")
    ROW = __slots__

    @property
    def duration_ms(self):
        """Milliseconds from start (or queueing, if it never started) to finish."""
        if self.finished_at is None or self.started_at is None:
            return None
        return int(round((self.finished_at - self.started_at) * 1000))

    def to_dict(self):
        """The job run as the API shows it."""
        return {"job_run_id": self.job_run_id, "job_label": self.job_label,
                "partitions": list(self.partitions), "want_ids": list(self.want_ids),
                "status": self.status, "attempt": self.attempt, "exit_code": self.exit_code,
                "missing_deps": list(self.missing_deps), "error": self.error,
                "queued_at": isoformat(self.queued_at),
                "started_at": isoformat(self.started_at),
                "finished_at": isoformat(self.finished_at),
                "duration_ms": self.duration_ms,
                "executor": self.executor or "local", "external_id": self.external_id,
                "code_version": self.code_version}


class Alert(_Entity):
    """An alert raised for people (README "Alerts"), and where its delivery is.

    ``alert_id`` is the id of its ``alert_raise`` event; ``event_id`` and
    ``timestamp`` are those of the event that raised it; ``subject`` is
    ``{"want" | "partition" | "sensor": {...}}``.
    """

    __slots__ = ("alert_id", "alert", "kind", "event_id", "timestamp", "summary", "subject",
                 "status", "attempts", "last_error", "delivered_at", "next_attempt_at")
    ROW = __slots__

    def message(self):
        """The JSON a receiver gets (a command on stdin, a webhook as the body)."""
        message = {"alert_id": self.alert_id, "alert": self.alert, "kind": self.kind,
                   "event_id": self.event_id, "timestamp": isoformat(self.timestamp),
                   "summary": self.summary}
        message.update(self.subject)
        return message

    def to_dict(self):
        """The alert as the API shows it: its message and its delivery."""
        answer = self.message()
        answer.update({"status": self.status, "attempts": self.attempts,
                       "last_error": self.last_error,
                       "delivered_at": isoformat(self.delivered_at),
                       "next_attempt_at": isoformat(self.next_attempt_at)})
        return answer


class _Tally:
    """A status bucket that only counts (terminal buckets of a working-set state)."""

    __slots__ = ("n",)

    def __init__(self):
        self.n = 0

    def __setitem__(self, key, value):
        self.n += 1

    def pop(self, key, default=None):
        self.n -= 1

    def __len__(self):
        return self.n

    def __bool__(self):
        return self.n > 0


#: Bumped when the projection's rows change shape: an older projection is rebuilt.
PROJECTION_VERSION = 9


def _unindex(index, key, member):
    """Take ``member`` out of the set ``index[key]``, and the key out of the
    index once its set is empty; True if it was emptied."""
    members = index.get(key)
    if members is None:
        return False
    members.discard(member)
    if members:
        return False
    del index[key]
    return True


#: Partition statuses of settled work: a working set keeps such a partition in
#: memory only while something needs it (README "Performance", history).
_RESTING = frozenset((LIVE, FAILED, UPSTREAM_FAILED, TAINTED, CANCELED))


class _Partitions(dict):
    """The partitions of a working-set state: those in memory, and any other
    read from the projection when asked for (``store``, an EventLog).

    The dict holds the partitions the orchestrator works on (and every one
    changed since the last commit, whose projection row is not written
    yet); ``evict`` drops one once it rests.  A partition read from the
    projection waits in a small cache (``_read``, least recently used
    first) until it is changed (``keep``) or pushed out; refs known to have
    no partition are remembered too (``_absent``), so a backfill of new refs
    asks the projection once per chunk of refs (``prefetch``).  Only the
    orchestrator's thread uses it.
    """

    __slots__ = ("store", "_read", "_absent", "cache_size")

    def __init__(self, store, cache_size=4096):
        super().__init__()
        self.store = store
        self._read = collections.OrderedDict()  # ref -> Partition, read not changed
        self._absent = set()  # refs with no partition in the projection
        self.cache_size = cache_size

    def get(self, ref, default=None):
        part = dict.get(self, ref)
        if part is not None:
            return part
        part = self._read.get(ref)
        if part is not None:
            self._read.move_to_end(ref)
            return part
        if ref in self._absent:
            return default
        part = self.store.partition_row(ref)
        self._remember(ref, part)
        return default if part is None else part

    def _remember(self, ref, part):
        # A partition read from the projection (None: it has none), cached.
        if part is None:
            if len(self._absent) >= self.cache_size * 4:
                self._absent.clear()
            self._absent.add(ref)
            return
        self._read[ref] = part
        if len(self._read) > self.cache_size:
            self._read.popitem(last=False)

    def __getitem__(self, ref):
        part = self.get(ref)
        if part is None:
            raise KeyError(ref)
        return part

    def __contains__(self, ref):
        return self.get(ref) is not None

    def __setitem__(self, ref, part):
        self._absent.discard(ref)
        self._read.pop(ref, None)
        dict.__setitem__(self, ref, part)

    def prefetch(self, refs):
        """Read the partitions of ``refs`` not known yet in one statement per
        chunk (a want of many refs, mostly new ones), into the caches."""
        unknown = [r for r in refs if not dict.__contains__(self, r)
                   and r not in self._read and r not in self._absent]
        if not unknown:
            return
        found = self.store.partition_rows(unknown)
        for ref in unknown:
            self._remember(ref, found.get(ref))

    def keep(self, part):
        """Hold a partition in memory until it is evicted (it changed)."""
        if dict.get(self, part.ref) is not part:
            self[part.ref] = part

    def evict(self, part):
        """Back to the cache of read partitions: the projection has it now."""
        if dict.pop(self, part.ref, None) is not None:
            self._remember(part.ref, part)


class BuildState:
    """The state of wants, partitions and job runs: a pure reduction of events.

    ``apply(event)`` is deterministic and does no I/O, reads no clock and takes
    no lock: the same events always give the same state.  Besides the entities
    it keeps indexes so that neither a read nor an orchestrator step has to
    walk finished work:

    * ``live_wants_by_ref``: ref -> ids of non-terminal wants naming it;
    * ``waiters``: ref -> refs of UpstreamBuilding partitions waiting on it;
    * ``pending_refs``: refs that need a job run now (ordered, oldest first);
    * ``active_run_by_ref``: ref -> its Queued or Running job run;
    * ``*_by_status``: status -> ids (ordered dicts used as sets);
    * ``stale``: the Live partitions that are stale (README "Freshness"),
      kept as events arrive: a partition's staleness is computed again when
      it or one of its upstream partitions changes status, or turns stale
      or fresh, or its job's code version changes -- never by a scan.

    A partition is *wanted* while a non-terminal want names it or a wanted
    partition waits on it.  It is *pending* while it is wanted, has no active
    run, and has no partition yet or is UpForRetry or Tainted.

    The orchestrator's state is made with ``working_set=True``: it records
    every entity an event changes (``take_changes``, for the projection rows
    written with the events) and lets the caller drop finished wants and job
    runs from memory (``forget``): no later event needs them, so memory and
    start-up stay proportional to the work in progress, not to the history.
    Terminal status buckets are then plain counts.
    """

    def __init__(self, working_set=False, store=None):
        self.working_set = working_set
        self.store = store  # README "Performance": resting partitions live on disk only
        self.wants = {}
        self.partitions = _Partitions(store) if store is not None else {}
        self.job_runs = {}
        self.latest_event_id = 0
        self.event_counts = collections.Counter()
        self.sla_breaches = 0
        # Job run durations (seconds) for /metrics: counts per bucket, sum, count.
        self.duration_buckets = [0] * len(DURATION_BUCKETS)
        self.duration_sum = 0.0
        self.duration_count = 0
        self.seqs = {"wants": 0, "partitions": 0, "job_runs": 0}  # creation counters
        self.job_runs_by_job = {}  # job label -> {status: how many job runs}
        # ref -> refs whose upstream holds it (README "Lineage"); with a store,
        # the projection's upstream rows answer (``downstream_of``), and this
        # holds this step's changes to them only: dep -> {ref: linked?}.
        self.downstream = {}
        self.job_versions = {}  # job label -> its code version now (README "Freshness")
        # The stale Live partitions (a dict used as an ordered set); with a
        # store, a count (the projection's stale table has the refs).
        self.stale = _Tally() if store is not None else {}
        self.sensors = {}  # sensor name -> what its evaluations left (README "Sensors")
        self.alerts = {}  # alert_id -> Alert (a working set keeps the owed ones)
        # Set by the orchestrator (None while replaying): the refs whose
        # staleness changed (auto rebuild looks at them), and what alerts may
        # be raised on -- (kind, event_id, timestamp, summary, subject).
        self.stale_dirty = None
        self.notices = None
        self._event = None  # the event being applied

        def bucket(status, live):
            return {} if live or not working_set else _Tally()
        self.wants_by_status = {s: bucket(s, s in LIVE_WANT_STATUSES) for s in WANT_STATUSES}
        self.partitions_by_status = {
            s: _Tally() if store is not None and s in _RESTING else {} for s in PARTITION_STATUSES}
        self.job_runs_by_status = {s: bucket(s, s in ACTIVE_JOB_RUN_STATUSES)
                                   for s in JOB_RUN_STATUSES}
        self.alerts_by_status = {s: bucket(s, s == OWED) for s in ALERT_STATUSES}
        self.live_wants_by_ref = {}
        self.waiters = {}
        self.pending_refs = {}
        self.active_run_by_ref = {}
        self._unneeded = set()  # refs that stopped being wanted since ``forget``
        self._todo = collections.deque()
        self._changed = {} if working_set else None  # (kind, key) -> entity

    def _touch(self, kind, key, entity):
        if self._changed is not None:
            self._changed[(kind, key)] = entity
            if kind == "partitions" and self.store is not None:
                self.partitions.keep(entity)

    def _link(self, kind, owner, member, members):
        # The lists that grow without bound (a partition's wants, a want's job
        # runs, its derivative wants) are link rows in the projection, so no
        # row is rewritten with its whole history.  A working set keeps the
        # lists of live wants only (cancel cascades and replies need them); a
        # partition's wants are read from the projection when shown.
        if self._changed is None:
            members.append(member)
            return
        if kind != "partition_wants":
            members.append(member)
        self._changed[("links", len(self._changed))] = (kind, owner, member)

    def pending_links(self, kind, owner):
        """Members linked to ``owner`` by changes not yet taken (committed)."""
        return [link[2] for (k, _), link in (self._changed or {}).items()
                if k == "links" and link[0] == kind and link[1] == owner]

    def take_changes(self):
        """The entities changed since the last call: ``[(kind, entity)]``, and the
        new links as ``("links", (kind, owner, member))``, in order."""
        if self.store is not None:
            self.downstream = {}  # this step's upstream rows: in the projection from now on
        if not self._changed:
            return []
        changed, self._changed = self._changed, {}
        return [(kind, entity) for (kind, _), entity in changed.items()]

    def forget(self, changes):
        """Drop the terminal wants, finished job runs and resting partitions
        among ``changes`` (committed now) from memory, and the partitions that
        came to rest without changing (nothing wants or waits on them now)."""
        refs = []  # partitions that may rest now
        for kind, entity in changes:
            if kind == "links":
                continue
            if kind == "wants" and entity.status in TERMINAL_WANT_STATUSES:
                self.wants.pop(entity.want_id, None)
            elif kind == "job_runs" and entity.status not in ACTIVE_JOB_RUN_STATUSES:
                self.job_runs.pop(entity.job_run_id, None)
            elif kind == "alerts" and entity.status != OWED:
                self.alerts.pop(entity.alert_id, None)
            elif kind == "partitions":
                refs.append(entity.ref)
        if self.store is None:
            return
        refs.extend(self._unneeded)
        self._unneeded.clear()
        for ref in refs:
            part = dict.get(self.partitions, ref)
            if (part is not None and self._resting(part)
                    and ("partitions", ref) not in self._changed):
                self.partitions.evict(part)

    def _prefetched(self, refs, chunk=512):
        # ``refs``, their partitions read from the store a chunk at a time
        # (a backfill of new refs: one statement per chunk, not one per ref).
        if self.store is None:
            yield from refs
            return
        for i in range(0, len(refs), chunk):
            self.partitions.prefetch(refs[i:i + chunk])
            yield from refs[i:i + chunk]

    def _resting(self, part):
        # Nothing needs this partition in memory: settled, and neither
        # wanted, waited on, waiting, building nor pending.
        ref = part.ref
        return (part.status in _RESTING and ref not in self.live_wants_by_ref
                and ref not in self.waiters and ref not in self.active_run_by_ref
                and ref not in self.pending_refs and not part.waiting_on)

    def downstream_of(self, ref):
        """The refs whose recorded upstream holds ``ref`` (README "Lineage"), sorted."""
        if self.store is None:
            return sorted(self.downstream.get(ref, ()))
        refs = set(self.store.downstream_refs(ref))
        for other, linked in self.downstream.get(ref, {}).items():
            if linked:
                refs.add(other)
            else:
                refs.discard(other)
        return sorted(refs)

    def summary(self):
        """Counters and ids a projection stores beside the rows (``restore`` reads it)."""
        return {"version": PROJECTION_VERSION, "event_id": self.latest_event_id,
                "seqs": self.seqs, "event_counts": dict(self.event_counts),
                "sla_breaches": self.sla_breaches, "job_runs_by_job": self.job_runs_by_job,
                "durations": [self.duration_buckets, self.duration_sum, self.duration_count],
                "job_versions": self.job_versions, "sensors": self.sensors,
                "counts": {"wants": {k: len(v) for k, v in self.wants_by_status.items()},
                           "partitions": {k: len(v) for k, v in self.partitions_by_status.items()},
                           "job_runs": {k: len(v) for k, v in self.job_runs_by_status.items()},
                           "alerts": {k: len(v) for k, v in self.alerts_by_status.items()},
                           "stale": len(self.stale)}}

    @classmethod
    def restore(cls, summary, partitions, live_wants, active_runs, owed_alerts=(), store=None):
        """The working-set state from a projection: its summary, the partitions
        (with a ``store``: those at work -- building, waiting, up for retry --
        the others are read from it when asked for; else every one), the
        non-terminal wants, the Queued/Running job runs (creation order) and
        the owed alerts.  Rebuilds the indexes exactly as the reducer keeps
        them."""
        state = cls(working_set=True, store=store)
        state.latest_event_id = summary["event_id"]
        state.seqs = dict(summary["seqs"])
        state.event_counts.update(summary["event_counts"])
        state.sla_breaches = summary["sla_breaches"]
        state.job_runs_by_job = {label: dict(counts) for label, counts
                                 in summary["job_runs_by_job"].items()}
        state.duration_buckets, state.duration_sum, state.duration_count = summary["durations"]
        state.job_versions = dict(summary["job_versions"])
        state.sensors = {name: dict(s) for name, s in summary["sensors"].items()}
        for kind, index in (("wants", state.wants_by_status),
                            ("job_runs", state.job_runs_by_status),
                            ("alerts", state.alerts_by_status),
                            ("partitions", state.partitions_by_status)):
            for status, bucket in index.items():
                if isinstance(bucket, _Tally):
                    bucket.n = summary["counts"][kind].get(status, 0)
        if isinstance(state.stale, _Tally):
            state.stale.n = summary["counts"]["stale"]
        for alert in owed_alerts:
            state.alerts[alert.alert_id] = alert
            state.alerts_by_status[OWED][alert.alert_id] = None
        for part in partitions:
            state.partitions[part.ref] = part
            if not isinstance(state.partitions_by_status[part.status], _Tally):
                state.partitions_by_status[part.status][part.ref] = None
            if part.stale_reasons and store is None:
                state.stale[part.ref] = None
        for run in active_runs:
            state.job_runs[run.job_run_id] = run
            state.job_runs_by_status[run.status][run.job_run_id] = None
            for ref in run.partitions:
                state.active_run_by_ref[ref] = run.job_run_id
        for want in live_wants:
            state.wants[want.want_id] = want
            state.wants_by_status[want.status][want.want_id] = None
            want.counts = collections.Counter()
            for ref in want.partitions:
                state.live_wants_by_ref.setdefault(ref, set()).add(want.want_id)
                want.counts[state._status_of(ref)] += 1
        for part in partitions:
            if part.status == UPSTREAM_BUILDING:
                for dep in part.waiting_on:
                    state.waiters.setdefault(dep, set()).add(part.ref)
            if store is None:
                for dep in part.upstream:
                    state.downstream.setdefault(dep, set()).add(part.ref)
        for ref in itertools.chain(state.live_wants_by_ref, list(state.waiters)):
            state._refresh_pending(ref)
        return state

    @classmethod
    def from_events(cls, events):
        """Reduce an iterable of events, oldest first, into a new state."""
        state = cls()
        for event in events:
            state.apply(event)
        return state

    # -- applying events ----------------------------------------------------

    def apply(self, event):
        """Advance the state by one event (its id must follow ``latest_event_id``)."""
        handler = self._HANDLERS.get(event.type)
        if handler is not None:  # unknown types are skipped: newer logs stay readable
            self._event = event
            handler(self, event.payload, event.timestamp)
            while self._todo:
                action, ref, ts = self._todo.popleft()
                action(self, ref, ts)
            if self._changed is not None:
                # The index of events by the refs they concern (``explain``).
                for ref in self._refs_of(event):
                    self._changed[("ref_events", (ref, event.event_id))] = (ref, event.event_id)
        self.latest_event_id = event.event_id
        self.event_counts[event.type] += 1

    def _on_want_create(self, p, ts):
        want = Want()
        want.want_id = p["want_id"]
        want.partitions = list(dict.fromkeys(p["partitions"]))
        want.status = None
        want.data_timestamp = p.get("data_timestamp", ts)
        want.ttl_seconds = p.get("ttl_seconds")
        want.sla_seconds = p.get("sla_seconds")
        want.sla_breached = False
        want.source = p.get("source") or {"type": "manual", "user": None}
        want.parent_want_id = p.get("parent_want_id")
        want.root_want_id = p.get("root_want_id") or want.want_id
        want.derivative_want_ids = []
        want.job_run_ids = []
        want.comment = p.get("comment")
        want.priority = p.get("priority") or 0
        want.created_at = want.updated_at = ts
        want.seq = self.seqs["wants"]
        self.seqs["wants"] += 1
        want.counts = collections.Counter()
        parent = self.wants.get(want.parent_want_id)
        # The partitions of the runs whose dep misses led here, nearest first:
        # what cycle detection needs, kept with the want (those runs are over).
        source_run = self.job_runs.get(want.source.get("job_run_id") or "")
        declared_by = want.source.get("ref") if want.source.get("type") == "deps" else None
        link = ((tuple(source_run.partitions),) if source_run is not None
                else ((declared_by,),) if declared_by is not None else ())
        want.chain = link + (parent.chain if parent is not None else ())
        self.wants[want.want_id] = want
        self._touch("wants", want.want_id, want)
        for ref in self._prefetched(want.partitions):
            part = self.partitions.get(ref)
            if part is not None and (part.status in (FAILED, UPSTREAM_FAILED)
                                     or part.stale_reasons):
                # A new want asks again for what failed before, or for what
                # is stale (README "Freshness"): build it anew.
                part.retries = 0
                self._set_partition_status(part, UP_FOR_RETRY, ts)
            self.live_wants_by_ref.setdefault(ref, set()).add(want.want_id)
            want.counts[part.status if part is not None else None] += 1
            if part is not None:
                self._link("partition_wants", ref, want.want_id, part.want_ids)
            run_id = self.active_run_by_ref.get(ref)
            if run_id is not None:  # join the build already under way
                run = self.job_runs[run_id]
                if want.want_id not in run.want_ids:
                    run.want_ids.append(want.want_id)
                    self._link("want_job_runs", want.want_id, run_id, want.job_run_ids)
                    self._touch("job_runs", run_id, run)
            self._refresh_pending(ref)
        if parent is not None:
            self._link("want_derivatives", parent.want_id, want.want_id,
                       parent.derivative_want_ids)
        self._update_want_status(want, ts)
        if declared_by is not None:
            self._wait_on_declared(declared_by, p.get("job_label"), want.partitions, ts)

    def _end_want_tree(self, want_id, status, ts):
        # Cancel and expiry reach the want's derivative wants too: their work
        # exists only for it.
        stack = [want_id]
        while stack:
            want = self.wants.get(stack.pop())
            if want is None or want.status in TERMINAL_WANT_STATUSES:
                continue
            self._set_want_status(want, status, ts)
            stack.extend(want.derivative_want_ids)

    def _on_want_cancel(self, p, ts):
        self._end_want_tree(p["want_id"], CANCELED, ts)

    def _on_want_expire(self, p, ts):
        self._end_want_tree(p["want_id"], EXPIRED, ts)

    def _on_want_sla_breach(self, p, ts):
        want = self.wants.get(p["want_id"])
        if want is not None and not want.sla_breached:
            want.sla_breached = True
            want.updated_at = ts
            self.sla_breaches += 1
            self._touch("wants", want.want_id, want)
            self._notice("sla_breached", "want %s missed its SLA of %s s (%d partitions)"
                         % (want.want_id, want.sla_seconds, len(want.partitions)),
                         {"want": self._want_brief(want)})

    def _on_job_run_queue(self, p, ts):
        run = JobRun()
        run.job_run_id = p["job_run_id"]
        run.job_label = p["job_label"]
        run.partitions = list(p["partitions"])
        run.want_ids = list(p.get("want_ids", ()))
        run.status = QUEUED
        run.attempt = p.get("attempt", 1)
        run.exit_code = None
        run.missing_deps = []
        run.error = None
        run.queued_at = ts
        run.started_at = run.finished_at = None
        run.pid = run.pid_start_time = run.external_id = run.code_version = None
        run.executor = p.get("executor")
        run.seq = self.seqs["job_runs"]
        self.seqs["job_runs"] += 1
        self.job_runs[run.job_run_id] = run
        self.job_runs_by_status[QUEUED][run.job_run_id] = None
        self._count_run(run, None, QUEUED)
        self._touch("job_runs", run.job_run_id, run)
        declared = p.get("deps") or {}
        for ref in run.partitions:
            part = self.partitions.get(ref)
            if part is None:
                part = self._new_partition(ref, run.job_label)
            elif part.status == UPSTREAM_BUILDING:
                self._drop_waits(part, ts)
            if ref in declared:  # upstream once built, with what the run reads
                part.reported_deps = sorted(set(part.reported_deps).union(declared[ref]))
            part.last_job_run_id = run.job_run_id
            part.retry_at = None
            part.missing_deps = []
            self.active_run_by_ref[ref] = run.job_run_id
            self._set_partition_status(part, BUILDING, ts)
        for want_id in run.want_ids:
            want = self.wants.get(want_id)
            if want is not None:  # a new run: never linked before
                self._link("want_job_runs", want_id, run.job_run_id, want.job_run_ids)

    def _new_partition(self, ref, job_label):
        part = Partition()
        part.ref = ref
        part.status = None
        part.job_label = job_label
        part.last_job_run_id = part.built_by_job_run_id = None
        part.missing_deps = []
        part.want_ids = []
        for want_id in sorted(self.live_wants_by_ref.get(ref, ()),
                              key=lambda wid: self.wants[wid].seq):
            self._link("partition_wants", ref, want_id, part.want_ids)
        part.waiting_on = _NOTHING
        part.retries = 0
        part.upstream = []
        part.reported_deps = []
        part.retry_at = None
        part.code_version = part.built_at = part.build_started_at = part.stale_reasons = None
        part.seq = self.seqs["partitions"]
        self.seqs["partitions"] += 1
        self.partitions[ref] = part
        return part

    def _wait_on_declared(self, ref, job_label, deps, ts):
        # A want of source "deps" wants the declared deps of ``ref`` that
        # are not Live: ``ref`` waits on them as on a dep miss, without a run,
        # and they are its upstream in lineage already (README "Backfills").
        part = self.partitions.get(ref)
        if part is None:
            part = self._new_partition(ref, job_label)
        elif part.status == UPSTREAM_BUILDING:
            self._drop_waits(part, ts)
        self._set_upstream(part, sorted(set(part.upstream).union(deps) - {ref}))
        unmet = [d for d in deps if self._status_of(d) != LIVE]
        failed = [d for d in unmet if self._status_of(d) in (FAILED, UPSTREAM_FAILED)]
        if failed or not self.is_wanted(ref):
            self._set_partition_status(part, UPSTREAM_FAILED if failed
                                       else self._dropped_status(part), ts)
            return
        if not unmet:
            self._set_partition_status(part, UP_FOR_RETRY, ts)
            return
        part.waiting_on = set(unmet)
        for dep in unmet:
            self.waiters.setdefault(dep, set()).add(ref)
            self._refresh_pending(dep)
        self._set_partition_status(part, UPSTREAM_BUILDING, ts)

    def _on_job_run_start(self, p, ts):
        run = self.job_runs[p["job_run_id"]]
        self._move(self.job_runs_by_status, run.job_run_id, run.status, RUNNING)
        self._count_run(run, run.status, RUNNING)
        run.status = RUNNING
        run.started_at = ts
        run.pid = p.get("pid")
        run.pid_start_time = p.get("pid_start_time")
        run.executor = p.get("executor", run.executor)
        run.external_id = p.get("external_id")
        run.code_version = p.get("code_version")
        if run.code_version and run.job_label not in self.job_versions:
            self.job_versions[run.job_label] = run.code_version  # its first run's code
        self._touch("job_runs", run.job_run_id, run)

    def _finish_run(self, p, status, ts):
        run = self.job_runs[p["job_run_id"]]
        self._move(self.job_runs_by_status, run.job_run_id, run.status, status)
        self._count_run(run, run.status, status)
        run.status = status
        run.finished_at = ts
        run.exit_code = p.get("exit_code")
        run.error = p.get("error", p.get("reason"))
        self._touch("job_runs", run.job_run_id, run)
        for ref in run.partitions:
            if self.active_run_by_ref.get(ref) == run.job_run_id:
                del self.active_run_by_ref[ref]
        if run.started_at is not None:
            seconds = max(0.0, ts - run.started_at)
            self.duration_sum += seconds
            self.duration_count += 1
            self.duration_buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        return run

    def _on_job_run_success(self, p, ts):
        run = self._finish_run(p, SUCCEEDED, ts)
        read = p.get("read_deps") or ()
        for ref in run.partitions:
            part = self.partitions[ref]
            part.built_by_job_run_id = run.job_run_id
            part.code_version = run.code_version
            part.built_at = ts
            # README "Freshness": an upstream built after this moment makes it stale.
            part.build_started_at = run.started_at if run.started_at is not None else run.queued_at
            part.retries = 0
            self._set_upstream(part, sorted(set(read).union(part.reported_deps) - {ref}))
            part.reported_deps = []
            self._set_partition_status(part, LIVE, ts)

    def _set_upstream(self, part, upstream):
        if upstream == part.upstream:
            return
        if self.store is not None:  # this step's changes to the projection's rows
            for dep in part.upstream:
                self.downstream.setdefault(dep, {})[part.ref] = False
            for dep in upstream:
                self.downstream.setdefault(dep, {})[part.ref] = True
        else:
            for dep in part.upstream:
                _unindex(self.downstream, dep, part.ref)
            for dep in upstream:
                self.downstream.setdefault(dep, set()).add(part.ref)
        part.upstream = upstream
        if self._changed is not None:
            self._changed[("upstream", part.ref)] = (part.ref, upstream)

    def _on_job_run_failure(self, p, ts):
        run = self._finish_run(p, FAILED, ts)
        status = UP_FOR_RETRY if p.get("retry") else FAILED
        for ref in run.partitions:
            part = self.partitions[ref]
            # retry backoff (README "Scheduling policy")
            part.retry_at = p.get("retry_at") if p.get("retry") else None
            if p.get("counted", True):
                part.retries += 1
            self._set_partition_status(part, status, ts)

    def _on_job_run_missing_deps(self, p, ts):
        run = self._finish_run(p, DEP_MISS, ts)
        deps = list(p["missing_deps"])
        run.missing_deps = deps
        for dep in deps:
            dep_part = self.partitions.get(dep)
            if dep_part is not None and dep_part.status in (FAILED, UPSTREAM_FAILED):
                dep_part.retries = 0  # a dep miss asks again for what failed before
                self._set_partition_status(dep_part, UP_FOR_RETRY, ts)
        unmet = [d for d in deps if self._status_of(d) != LIVE]
        for ref in run.partitions:
            part = self.partitions[ref]
            part.missing_deps = deps
            part.reported_deps = sorted(set(part.reported_deps).union(deps))
            if not unmet or not self.is_wanted(ref):
                # Nothing to wait for, or nobody to wait for: a later want reruns it.
                self._set_partition_status(part, UP_FOR_RETRY, ts)
                continue
            part.waiting_on = set(unmet)
            for dep in unmet:
                self.waiters.setdefault(dep, set()).add(ref)
                self._refresh_pending(dep)
            self._set_partition_status(part, UPSTREAM_BUILDING, ts)

    def _on_job_run_cancel(self, p, ts):
        run = self._finish_run(p, CANCELED, ts)
        for ref in run.partitions:
            part = self.partitions[ref]
            self._set_partition_status(part, self._dropped_status(part), ts)

    @staticmethod
    def _dropped_status(part):
        # A partition whose work was dropped (its run canceled, or nobody
        # wants what it waits on) and that was never built says so.
        return CANCELED if part.built_by_job_run_id is None else UP_FOR_RETRY

    def _on_partition_taint(self, p, ts):
        part = self.partitions.get(p["ref"])
        if part is not None:
            self._set_partition_status(part, TAINTED, ts)

    def _on_job_code_version(self, p, ts):
        # A job's code changed: its Live partitions built with other code are
        # stale.  The one walk of the Live partitions in the reducer, once per
        # change of a job's code.
        label = p["job_label"]
        self.job_versions[label] = p["code_version"]
        if self.store is None:
            refs = [r for r in self.partitions_by_status[LIVE]
                    if self.partitions[r].job_label == label]
        else:  # the projection's Live rows, and this step's changes
            refs = set(self.store.live_refs_of_job(label)).union(
                r for r, part in dict.items(self.partitions)
                if part.job_label == label and part.status == LIVE)
        for ref in sorted(refs):
            self._restale(ref, ts)

    def _on_sensor_evaluate(self, p, ts):
        name = p["name"]
        sensor = self.sensors.setdefault(name, {
            "cursor": None, "last_evaluated_at": None, "last_status": None,
            "last_error": None, "wants_created": 0, "evaluations": 0})
        failed = p["status"] == "failed"
        if failed and sensor["last_status"] != "failed":  # once per run of failures
            self._notice("sensor_failed", "sensor %s failed: %s" % (name, p.get("error")),
                         {"sensor": {"name": name, "error": p.get("error")}})
        sensor["last_status"] = p["status"]
        sensor["last_error"] = p.get("error")
        sensor["last_evaluated_at"] = ts
        sensor["evaluations"] += 1
        if not failed:  # a failed evaluation's cursor and wants are dropped
            if p.get("cursor") is not None:
                sensor["cursor"] = p["cursor"]
            sensor["wants_created"] += len(p.get("want_ids", ()))

    def _on_alert_raise(self, p, ts):
        alert = Alert()
        alert.alert_id = self._event.event_id
        alert.alert, alert.kind, alert.summary = p["alert"], p["kind"], p["summary"]
        alert.event_id, alert.timestamp = p["event_id"], p["timestamp"]
        alert.subject = {k: p[k] for k in ("want", "partition", "sensor") if k in p}
        alert.status, alert.attempts = OWED, 0
        alert.last_error = alert.delivered_at = None
        alert.next_attempt_at = ts
        self.alerts[alert.alert_id] = alert
        self.alerts_by_status[OWED][alert.alert_id] = None
        self._touch("alerts", alert.alert_id, alert)

    def _on_alert_attempt(self, p, ts):
        alert = self.alerts.get(p["alert_id"])
        if alert is None or alert.status != OWED:
            return
        alert.attempts += 1
        if self._event.type == ALERT_DELIVERED:
            status, alert.delivered_at, alert.next_attempt_at = DELIVERED, ts, None
        else:
            alert.last_error = p.get("error")
            status = GIVEN_UP if p.get("given_up") else OWED
            alert.next_attempt_at = None if status == GIVEN_UP else p.get("retry_at")
        self._move(self.alerts_by_status, alert.alert_id, alert.status, status)
        alert.status = status
        self._touch("alerts", alert.alert_id, alert)

    _HANDLERS = {
        WANT_CREATE: _on_want_create, WANT_CANCEL: _on_want_cancel,
        WANT_EXPIRE: _on_want_expire, WANT_SLA_BREACH: _on_want_sla_breach,
        JOB_RUN_QUEUE: _on_job_run_queue, JOB_RUN_START: _on_job_run_start,
        JOB_RUN_SUCCESS: _on_job_run_success, JOB_RUN_FAILURE: _on_job_run_failure,
        JOB_RUN_MISSING_DEPS: _on_job_run_missing_deps, JOB_RUN_CANCEL: _on_job_run_cancel,
        PARTITION_TAINT: _on_partition_taint, JOB_CODE_VERSION: _on_job_code_version,
        SENSOR_EVALUATE: _on_sensor_evaluate, ALERT_RAISE: _on_alert_raise,
        ALERT_DELIVERED: _on_alert_attempt, ALERT_FAILED: _on_alert_attempt,
    }

    # -- derived state ------------------------------------------------------

    @staticmethod
    def _move(index, key, old, new):
        if old is not None:
            index[old].pop(key, None)
        index[new][key] = None

    def _refs_of(self, event):
        # job_run_start is left out: the run's queue and end events tell its
        # story, and one index row less per run is measurable on a fan-out.
        p = event.payload
        if event.type == JOB_RUN_START:
            return ()
        if "job_run_id" in p:
            run = self.job_runs.get(p["job_run_id"])
            return run.partitions if run is not None else ()
        if event.type == WANT_CREATE:
            declared_by = (p.get("source") or {}).get("ref")
            if declared_by is not None and p["source"].get("type") == "deps":
                return list(p["partitions"]) + [declared_by]
            return p["partitions"]
        if event.type in (WANT_CANCEL, WANT_EXPIRE):
            want = self.wants.get(p["want_id"])
            return want.partitions if want is not None else ()
        if event.type == PARTITION_TAINT:
            return (p["ref"],)
        return ()

    def _count_run(self, run, old, new):
        counts = self.job_runs_by_job.setdefault(run.job_label or "", {})
        if old is not None:
            counts[old] -= 1
        counts[new] = counts.get(new, 0) + 1

    def _status_of(self, ref):
        part = self.partitions.get(ref)
        return part.status if part is not None else None

    def partition_status(self, ref):
        """A ref's partition status, or Idle if it has no partition yet."""
        part = self.partitions.get(ref)
        return part.status if part is not None else IDLE

    def is_wanted(self, ref):
        """True while a non-terminal want names ``ref`` or a wanted partition waits on it."""
        return ref in self.live_wants_by_ref or ref in self.waiters

    def _refresh_pending(self, ref):
        if (self._status_of(ref) in NEEDS_BUILD and ref not in self.active_run_by_ref
                and self.is_wanted(ref)):
            self.pending_refs[ref] = None
        else:
            self.pending_refs.pop(ref, None)
            if self.store is not None:
                self._unneeded.add(ref)  # it may rest now (``forget``)

    def _set_partition_status(self, part, status, ts):
        old = part.status
        part.updated_at = ts
        self._touch("partitions", part.ref, part)
        if old == status:
            return
        self._move(self.partitions_by_status, part.ref, old, status)
        part.status = status
        for want_id in list(self.live_wants_by_ref.get(part.ref, ())):
            want = self.wants[want_id]
            want.counts[old] -= 1
            want.counts[status] += 1
            self._update_want_status(want, ts)
        self._refresh_pending(part.ref)
        if status == LIVE:
            for ref in self.waiters.pop(part.ref, ()):
                self._todo.append((BuildState._dep_live, (ref, part.ref), ts))
        elif status in (FAILED, UPSTREAM_FAILED):
            for ref in self.waiters.pop(part.ref, ()):
                self._todo.append((BuildState._dep_failed, ref, ts))
            if status == FAILED:  # settled Failed: its retries are spent
                run = self.job_runs.get(part.last_job_run_id or "")
                error = run.error if run is not None else None
                self._notice("partition_failed", "partition %s failed: %s" % (part.ref, error),
                             {"partition": {"ref": part.ref, "status": status,
                                            "job_label": part.job_label,
                                            "last_job_run_id": part.last_job_run_id,
                                            "error": error}})
        if old == LIVE or status == LIVE:
            self._restale(part.ref, ts)
        if part.built_by_job_run_id is not None:  # what was built from it sees the change
            for ref in self.downstream_of(part.ref):
                self._todo.append((BuildState._restale, ref, ts))

    def _stale_reasons(self, part):
        # README "Freshness": why a Live partition is stale, by cause --
        # "code", "rebuilt:<ref>" (a rebuild of this one clears those two) or
        # "upstream:<ref>" (not Live, or stale) -- or None if it is fresh (or
        # not Live).
        if part.status != LIVE:
            return None
        reasons = {}
        version = self.job_versions.get(part.job_label)
        if part.code_version and version and version != part.code_version:
            reasons["code"] = "code version %s -> %s" % (part.code_version, version)
        started = part.build_started_at
        for dep in part.upstream:
            up = self.partitions.get(dep)
            if up is None or up.built_by_job_run_id is None:
                continue  # never built here: nothing of ours it could be stale against
            if started is not None and up.built_at is not None and up.built_at > started:
                reasons["rebuilt:" + dep] = "upstream %s rebuilt at %sZ" % (
                    dep, _iso_seconds(up.built_at))
            elif up.status != LIVE:
                reasons["upstream:" + dep] = "upstream %s is %s" % (dep, up.status)
            elif up.stale_reasons:
                reasons["upstream:" + dep] = "upstream %s is stale" % dep
        return reasons or None

    def _restale(self, ref, ts):
        # Compute ``ref``'s staleness again; when it turns stale or fresh, so
        # may what was built from it (each flips once per wave: no loop).
        part = self.partitions.get(ref)
        if part is None:
            return
        reasons = self._stale_reasons(part)
        if reasons == part.stale_reasons:
            return
        was = bool(part.stale_reasons)
        part.stale_reasons = reasons
        self._touch("partitions", ref, part)
        if self.stale_dirty is not None:
            self.stale_dirty[ref] = None
        if bool(reasons) == was:
            return
        if reasons:
            self.stale[ref] = None
        else:
            self.stale.pop(ref)
        if self._changed is not None:
            self._changed[("stale", ref)] = (ref, part.seq, bool(reasons))
        for down in self.downstream_of(ref):
            self._todo.append((BuildState._restale, down, ts))

    def _notice(self, kind, summary, subject):
        # Something an alert may be raised on (README "Alerts"); the
        # orchestrator turns notices into alert_raise events.
        if self.notices is not None:
            event = self._event
            self.notices.append((kind, event.event_id, event.timestamp, summary, subject))

    @staticmethod
    def _want_brief(want):
        return {"want_id": want.want_id, "status": want.status, "source": want.source,
                "comment": want.comment, "partitions": len(want.partitions),
                "root_want_id": want.root_want_id}

    def _dep_live(self, args, ts):
        ref, dep = args
        part = self.partitions[ref]
        if part.status != UPSTREAM_BUILDING:
            return
        part.waiting_on.discard(dep)
        self._touch("partitions", ref, part)
        if not part.waiting_on:
            self._set_partition_status(part, UP_FOR_RETRY, ts)

    def _dep_failed(self, ref, ts):
        part = self.partitions[ref]
        if part.status != UPSTREAM_BUILDING:
            return
        self._drop_waits(part, ts)
        self._set_partition_status(part, UPSTREAM_FAILED, ts)

    def _drop_waits(self, part, ts):
        # Stop waiting on upstream refs; one nobody waits on any more may have
        # become unwanted.
        for dep in part.waiting_on:
            if _unindex(self.waiters, dep, part.ref):
                self._refresh_pending(dep)
                self._todo.append((BuildState._maybe_unwanted, dep, ts))
        part.waiting_on = _NOTHING
        self._touch("partitions", part.ref, part)

    def _maybe_unwanted(self, ref, ts):
        # A partition that waits on upstream work nobody wants any more drops
        # back to UpForRetry: its unstarted work is dropped (README "Concepts", TTL/cancel).
        part = self.partitions.get(ref)
        if part is not None and part.status == UPSTREAM_BUILDING and not self.is_wanted(ref):
            self._drop_waits(part, ts)
            self._set_partition_status(part, self._dropped_status(part), ts)

    def _update_want_status(self, want, ts):
        if want.status in TERMINAL_WANT_STATUSES:
            return
        # A want ends when every partition is settled (README "Backfills"): a
        # failed partition never stops its siblings from being built.
        counts = want.counts
        if counts[LIVE] + counts[FAILED] + counts[UPSTREAM_FAILED] == len(want.partitions):
            status = (SUCCESSFUL if counts[LIVE] == len(want.partitions)
                      else FAILED if counts[FAILED] else UPSTREAM_FAILED)
        elif counts[BUILDING]:
            status = BUILDING
        elif counts[UPSTREAM_BUILDING]:
            status = UPSTREAM_BUILDING
        else:
            status = IDLE
        self._set_want_status(want, status, ts)

    def _set_want_status(self, want, status, ts):
        if want.status == status:
            return
        self._move(self.wants_by_status, want.want_id, want.status, status)
        want.status = status
        want.updated_at = ts
        self._touch("wants", want.want_id, want)
        if status in (FAILED, UPSTREAM_FAILED) and want.parent_want_id is None:
            # A want people made (not a derivative one: its failure fails its parent).
            bad = [r for r in want.partitions if self._status_of(r) != LIVE]
            brief = self._want_brief(want)
            brief["not_live"] = bad[:10]
            self._notice("want_failed", "want %s ended %s: %d of %d partitions not Live (%s%s)"
                         % (want.want_id, status, len(bad), len(want.partitions),
                            ", ".join(bad[:3]), ", ..." if len(bad) > 3 else ""),
                         {"want": brief})
        if status in TERMINAL_WANT_STATUSES:
            want.counts = None  # only live wants need them
            for ref in want.partitions:
                if _unindex(self.live_wants_by_ref, ref, want.want_id):
                    self._refresh_pending(ref)
                    self._todo.append((BuildState._maybe_unwanted, ref, ts))

    # -- queries ------------------------------------------------------------


    def is_needed(self, run):
        """True if a run's partitions are still wanted by something live."""
        return any(self.is_wanted(ref) for ref in run.partitions)


###############################################################################
# Storage: the event log ######################################################
###############################################################################

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id  INTEGER PRIMARY KEY,   -- gapless from 1: single writer, never deleted
    timestamp REAL NOT NULL,         -- epoch seconds
    type      TEXT NOT NULL,
    payload   TEXT NOT NULL          -- JSON
);
-- The projection: the reduced state, one row per entity, written in the same
-- transaction as the events that changed it.  Derived, never authoritative:
-- dropped and rebuilt from the events whenever it does not match them.
CREATE TABLE IF NOT EXISTS wants (
    want_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, status TEXT NOT NULL, row TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS wants_by_seq ON wants (seq);
CREATE INDEX IF NOT EXISTS wants_by_status ON wants (status, seq);
CREATE TABLE IF NOT EXISTS partitions (
    ref TEXT PRIMARY KEY, seq INTEGER NOT NULL, status TEXT NOT NULL, row TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS partitions_by_seq ON partitions (seq);
CREATE INDEX IF NOT EXISTS partitions_by_status ON partitions (status, seq);
CREATE TABLE IF NOT EXISTS job_runs (
    job_run_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, status TEXT NOT NULL,
    job_label TEXT, row TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS job_runs_by_seq ON job_runs (seq);
CREATE INDEX IF NOT EXISTS job_runs_by_status ON job_runs (status, seq);
CREATE INDEX IF NOT EXISTS job_runs_by_label ON job_runs (job_label, seq);
CREATE TABLE IF NOT EXISTS links (      -- a partition's wants, a want's job runs
    seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, owner TEXT NOT NULL, member TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS links_by_owner ON links (kind, owner, seq);
CREATE TABLE IF NOT EXISTS projection (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Lineage (README "Lineage"): a partition's upstream refs, and each ref's events.
CREATE TABLE IF NOT EXISTS upstream (ref TEXT NOT NULL, dep TEXT NOT NULL,
                                     PRIMARY KEY (ref, dep)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS upstream_by_dep ON upstream (dep, ref);
CREATE TABLE IF NOT EXISTS ref_events (ref TEXT NOT NULL, event_id INTEGER NOT NULL,
                                       PRIMARY KEY (ref, event_id)) WITHOUT ROWID;
-- README "Freshness": the stale Live partitions (seq: the partition's).
CREATE TABLE IF NOT EXISTS stale (ref TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS stale_by_seq ON stale (seq);
-- README "Alerts": alert_id is the id of the alert's alert_raise event.
CREATE TABLE IF NOT EXISTS alerts (
    alert_id INTEGER PRIMARY KEY, status TEXT NOT NULL, row TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS alerts_by_status ON alerts (status, alert_id);
"""
# Upserts, not INSERT OR REPLACE: an update touches only the indexes whose
# columns changed (status), where a replace deletes and re-inserts every entry.
_ROW_SQL = {
    "links": "INSERT INTO links (kind, owner, member) VALUES (?, ?, ?)",
    "ref_events": "INSERT OR IGNORE INTO ref_events (ref, event_id) VALUES (?, ?)",
    "wants": "INSERT INTO wants (want_id, seq, status, row) VALUES (?, ?, ?, ?) "
             "ON CONFLICT (want_id) DO UPDATE SET status = excluded.status, row = excluded.row",
    "partitions": "INSERT INTO partitions (ref, seq, status, row) VALUES (?, ?, ?, ?) "
                  "ON CONFLICT (ref) DO UPDATE SET status = excluded.status, row = excluded.row",
    "job_runs": "INSERT INTO job_runs (job_run_id, seq, status, job_label, row) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (job_run_id) DO UPDATE "
                "SET status = excluded.status, row = excluded.row",
    "alerts": "INSERT INTO alerts (alert_id, status, row) VALUES (?, ?, ?) "
              "ON CONFLICT (alert_id) DO UPDATE SET status = excluded.status, row = excluded.row",
}


class EventLog:
    """The build event log: an append-only SQLite table in WAL mode, and beside
    it the projection of the state that readers query (``view``).

    Each thread gets its own connection (sqlite3 connections must not be
    shared across threads).  Only the orchestrator thread calls ``append``;
    any thread may read.  sqlite3 errors become ``StorageError``.

    Durability (README "Lifecycle").  An event is *durable* once the WAL holding it has
    been fsynced; readers (``list_events``, ``latest_event_id``) see durable
    events only, and nobody is told of an event before it is durable, so an
    acknowledged event survives a power loss.  ``append(entries)`` commits and
    fsyncs, exactly like ``synchronous=FULL``.  ``append(entries, sync=False)``
    then ``sync()`` splits the two: the connections run with
    ``synchronous=NORMAL`` and ``sync()`` fsyncs the WAL file itself, so the
    orchestrator can go on with its next step while another thread waits for
    the disk, and one fsync covers every commit made meanwhile (pipelined
    group commit).
    """

    def __init__(self, path):
        self.path = path
        self._local = threading.local()
        self._connections = []  # every thread's connection, for close()
        self._lock = threading.Lock()  # guards _connections only
        self._sync_lock = threading.Lock()  # one fsync at a time; guards _wal_fd
        self._durable = threading.Condition()  # notified when durable_event_id grows
        self._wal_fd = None
        self._syncs = 0  # fsyncs so far (a checkpoint every 64)
        self._appended_id = 0  # newest committed event (the writer sets it)
        # Readers' answers for single objects: (kind, key) -> (event id, dict),
        # good while no commit happened since that event (StoreView._cached).
        self.read_cache = {}
        self.read_cache_lock = threading.Lock()  # guards read_cache (the readers' threads)
        with self._errors():
            self._conn().executescript(_SCHEMA)
            (latest,) = self._conn().execute(
                "SELECT COALESCE(MAX(event_id), 0) FROM events").fetchone()
        self._appended_id = latest
        # What a previous process committed is on disk once this sync returns.
        self.durable_event_id = 0
        self.sync()

    @staticmethod
    def _errors():
        return _translate_sqlite_errors()

    @contextlib.contextmanager
    def transaction(self, write=True):
        """``with log.transaction() as conn``: one SQLite transaction on this
        thread's connection (``BEGIN IMMEDIATE`` to write, a plain ``BEGIN``
        for a consistent read), committed at the end of the block and rolled
        back on any error.  sqlite3 errors become StorageError."""
        with self._errors():
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself after some errors (SQLITE_FULL
                # in a COMMIT): a second ROLLBACK would hide the real error.
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        logger.exception("Rollback failed")
                raise

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # sync() fsyncs: see the class doc
            # Checkpoints run from sync(), in the syncer's thread, not in a
            # commit of the orchestrator's (where they would stall a step).
            conn.execute("PRAGMA wal_autocheckpoint=0")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def append(self, entries, sync=True, changes=None, summary=None):
        """Append ``(type, payload, timestamp)`` entries in one transaction.

        Returns the new ``Event`` objects with their ids.  ``changes`` (from
        ``BuildState.take_changes``) and ``summary`` update the projection in
        the same transaction.  Nothing is written if anything fails.  With
        ``sync=False`` the events stay invisible to readers until ``sync()``.
        """
        if not entries:
            return []
        with self.transaction() as conn:
            # This object is the only writer (the workspace lock), so it
            # knows the next id; a foreign writer would fail the primary key.
            latest = self._appended_id
            events = [Event(latest + i, ts, type_, payload)
                      for i, (type_, payload, ts) in enumerate(entries, 1)]
            conn.executemany(
                "INSERT INTO events (event_id, timestamp, type, payload) VALUES (?, ?, ?, ?)",
                [(e.event_id, e.timestamp, e.type, dumps(e.payload)) for e in events])
            if summary is not None:
                self._write_projection(conn, changes or (), summary)
        self._appended_id = events[-1].event_id
        if sync:
            self.sync()
        return events

    @property
    def appended_event_id(self):
        """The newest committed event (durable or not yet); the writer's view."""
        return self._appended_id

    def sync(self):
        """fsync the WAL: every event committed so far becomes durable (and visible)."""
        with self._sync_lock:
            target = self._appended_id
            if target <= self.durable_event_id:
                return target
            wal = self.path + "-wal"
            try:
                if self._wal_fd is None:
                    self._wal_fd = os.open(wal, os.O_RDWR | os.O_CLOEXEC)
                    dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
                    try:
                        os.fsync(dir_fd)  # the WAL's directory entry, once
                    finally:
                        os.close(dir_fd)
                os.fsync(self._wal_fd)
            except FileNotFoundError:
                pass  # no WAL: everything is in the database file already
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise _disk_full() from e
                raise StorageError("Event log fsync failed: %s" % e) from e
            with self._durable:
                self.durable_event_id = target
                self._durable.notify_all()
            self._syncs += 1
            if self._syncs % 64 == 0:
                self.checkpoint()
            return target

    def checkpoint(self):
        """Copy the WAL into the database file (PASSIVE: never blocks the writer)."""
        with self._errors():
            self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def wait_durable(self, event_id, timeout=10.0):
        """Block until event ``event_id`` is durable (an fsync is under way)."""
        with self._durable:
            if not self._durable.wait_for(lambda: self.durable_event_id >= event_id, timeout):
                raise Unavailable("The event log did not reach the disk in time")

    @staticmethod
    def _write_projection(conn, changes, summary):
        rows = {"wants": [], "partitions": [], "job_runs": [], "links": [], "ref_events": [],
                "alerts": []}
        upstream, stale = [], []
        for kind, entity in changes:
            if kind in ("links", "ref_events"):
                rows[kind].append(entity)
            elif kind == "upstream":
                upstream.append(entity)
            elif kind == "stale":
                stale.append(entity)
            elif kind == "alerts":
                rows[kind].append((entity.alert_id, entity.status, entity.to_row()))
            elif kind == "job_runs":
                rows[kind].append((entity.job_run_id, entity.seq, entity.status,
                                   entity.job_label, entity.to_row()))
            else:
                key = entity.want_id if kind == "wants" else entity.ref
                rows[kind].append((key, entity.seq, entity.status, entity.to_row()))
        for kind, values in rows.items():
            if values:
                conn.executemany(_ROW_SQL[kind], values)
        if stale:
            conn.executemany("DELETE FROM stale WHERE ref = ?", [(r,) for r, _, _ in stale])
            conn.executemany("INSERT INTO stale (ref, seq) VALUES (?, ?)",
                             [(r, seq) for r, seq, is_stale in stale if is_stale])
        if upstream:
            conn.executemany("DELETE FROM upstream WHERE ref = ?", [(r,) for r, _ in upstream])
            conn.executemany("INSERT INTO upstream (ref, dep) VALUES (?, ?)",
                             [(r, d) for r, deps in upstream for d in deps])
        conn.executemany("INSERT OR REPLACE INTO projection (key, value) VALUES (?, ?)",
                         (("summary", dumps(summary)), ("event_id", summary["event_id"])))

    def write_projection(self, changes, summary):
        """Write projection rows alone (rebuilding the projection from the events)."""
        with self.transaction() as conn:
            self._write_projection(conn, changes, summary)

    def clear_projection(self):
        """Drop every projection row (before a rebuild)."""
        with self.transaction() as conn:
            for table in ("wants", "partitions", "job_runs", "links", "projection", "upstream",
                          "ref_events", "stale", "alerts"):
                conn.execute("DELETE FROM %s" % table)

    def load_projection(self, every_partition=False):
        """``(summary, partitions, live wants, active job runs, owed alerts)`` as
        objects (``BuildState.restore``'s arguments), or ``(None, ...)`` when
        there is no projection or it does not match the log.  The partitions
        are those at work (Building, UpstreamBuilding, UpForRetry) -- a state
        with this log as its store reads the others when it needs them -- or,
        with ``every_partition``, all of them."""
        with self.transaction(write=False) as conn:
            row = conn.execute("SELECT value FROM projection WHERE key = 'summary'").fetchone()
            summary = json.loads(row[0]) if row else None
            if (summary is None or summary.get("version") != PROJECTION_VERSION
                    or summary.get("event_id") != self._appended_id):
                return None, [], [], [], []
            # The partitions, parsed as one JSON document: far cheaper than a
            # json.loads per row.
            where = "" if every_partition else " WHERE status IN ('%s', '%s', '%s')" % (
                BUILDING, UPSTREAM_BUILDING, UP_FOR_RETRY)
            (rows,) = conn.execute("SELECT json_group_array(json(row)) FROM "
                                   "(SELECT row FROM partitions%s ORDER BY seq)" % where
                                   ).fetchone()
            partitions = [Partition.from_values(v) for v in json.loads(rows)]
            wants = [Want.from_row(r) for (r,) in conn.execute(
                "SELECT row FROM wants WHERE status IN (?, ?, ?) ORDER BY seq",
                LIVE_WANT_STATUSES)]
            for want in wants:
                want.job_run_ids = self._links(conn, "want_job_runs", want.want_id)
                want.derivative_want_ids = self._links(conn, "want_derivatives",
                                                       want.want_id)
            runs = [JobRun.from_row(r) for (r,) in conn.execute(
                "SELECT row FROM job_runs WHERE status IN (?, ?) ORDER BY seq",
                (QUEUED, RUNNING))]
            alerts = [Alert.from_row(r) for (r,) in conn.execute(
                "SELECT row FROM alerts WHERE status = ? ORDER BY alert_id", (OWED,))]
            return summary, partitions, wants, runs, alerts

    # What a working-set state asks of the partitions it does not hold
    # (``_Partitions``, ``BuildState.downstream_of``): each an indexed lookup.

    def partition_row(self, ref):
        """The partition of ``ref`` from the projection (without its want ids), or None."""
        with self._errors():
            row = self._conn().execute("SELECT row FROM partitions WHERE ref = ?",
                                       (ref,)).fetchone()
        return Partition.from_row(row[0]) if row is not None else None

    def partition_rows(self, refs):
        """``{ref: partition}`` of those of ``refs`` the projection has."""
        found = {}
        with self._errors():
            for i in range(0, len(refs), 500):
                chunk = refs[i:i + 500]
                for ref, row in self._conn().execute(
                        "SELECT ref, row FROM partitions WHERE ref IN (%s)"
                        % ",".join("?" * len(chunk)), chunk):
                    found[ref] = Partition.from_row(row)
        return found

    def downstream_refs(self, ref):
        """The refs whose recorded upstream holds ``ref`` (the upstream table's index)."""
        with self._errors():
            return [r for (r,) in self._conn().execute(
                "SELECT ref FROM upstream WHERE dep = ?", (ref,))]

    def stale_refs(self):
        """The refs of the stale partitions, oldest first (README "Freshness")."""
        with self._errors():
            return [r for (r,) in self._conn().execute("SELECT ref FROM stale ORDER BY seq")]

    def live_refs_of_job(self, label):
        """The refs of the Live partitions of one job (a walk of the Live ones:
        once per change of that job's code)."""
        with self._errors():
            return [r for (r,) in self._conn().execute(
                "SELECT ref FROM partitions WHERE status = ? AND json_extract(row, '$[%d]') = ?"
                % Partition.ROW.index("job_label"), (LIVE, label))]

    @staticmethod
    def _links(conn, kind, owner):
        return [m for (m,) in conn.execute(
            "SELECT member FROM links WHERE kind = ? AND owner = ? ORDER BY seq", (kind, owner))]

    def links(self, kind, owner):
        """The members linked to ``owner`` (a partition's wants, a want's job runs...)."""
        with self._errors():
            return self._links(self._conn(), kind, owner)

    def last_want_id(self, prefix):
        """The greatest want id starting with ``prefix`` (an index range), or None:
        a schedule's newest tick, as its ids sort by time."""
        with self._errors():
            row = self._conn().execute(
                "SELECT want_id FROM wants WHERE want_id >= ? AND want_id < ? "
                "ORDER BY want_id DESC LIMIT 1", (prefix, prefix + "\U0010ffff")).fetchone()
        return row[0] if row else None

    def projected(self, kind, key):
        """One projection row (a Want, Partition or JobRun, lists included), or None."""
        column = {"wants": "want_id", "partitions": "ref", "job_runs": "job_run_id"}[kind]
        cls = {"wants": Want, "partitions": Partition, "job_runs": JobRun}[kind]
        with self._errors():
            conn = self._conn()
            row = conn.execute("SELECT row FROM %s WHERE %s = ?" % (kind, column),
                               (key,)).fetchone()
            if row is None:
                return None
            entity = cls.from_row(row[0])
            if kind == "wants":
                entity.job_run_ids = self._links(conn, "want_job_runs", key)
                entity.derivative_want_ids = self._links(conn, "want_derivatives", key)
            elif kind == "partitions":
                entity.want_ids = self._links(conn, "partition_wants", key)
        return entity

    def view(self):
        """A consistent, durable snapshot of the projection for readers (a context
        manager yielding a ``StoreView``)."""
        return _Reading(lambda: StoreView(self))

    @staticmethod
    def _event(row):
        return Event(row[0], row[1], row[2], json.loads(row[3]))

    def list_events(self, since=0, limit=None, upto=None, type_=None, newest_first=False):
        """Durable events with ``since < event_id <= upto`` (of one type, if
        given), oldest first (or newest first), at most ``limit``."""
        upto = self.durable_event_id if upto is None else min(upto, self.durable_event_id)
        sql = "SELECT event_id, timestamp, type, payload FROM events " \
              "WHERE event_id > ? AND event_id <= ?"
        args = [since, upto]
        if type_ is not None:
            sql += " AND type = ?"
            args.append(type_)
        sql += " ORDER BY event_id DESC" if newest_first else " ORDER BY event_id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._errors():
            return [self._event(r) for r in self._conn().execute(sql, args)]

    def iter_events(self, since=0, upto=None, batch=20000):
        """Yield every event after ``since`` (up to ``upto``), oldest first, in batches."""
        while True:
            events = self.list_events(since, batch, upto)
            yield from events
            if len(events) < batch:
                return
            since = events[-1].event_id

    def get_event(self, event_id):
        """The durable event with this id; NotFound if there is none."""
        if not 0 < event_id <= self.durable_event_id:
            raise NotFound("Event not found", event_id=event_id)
        with self._errors():
            row = self._conn().execute(
                "SELECT event_id, timestamp, type, payload FROM events WHERE event_id = ?",
                (event_id,)).fetchone()
        if row is None:
            raise NotFound("Event not found", event_id=event_id)
        return self._event(row)

    def latest_event_id(self):
        """The id of the newest durable event, 0 for an empty log."""
        return self.durable_event_id

    def close(self):
        """Close every thread's connection."""
        with self._sync_lock:
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()


class _Reading:
    """``with log.view() as view`` and ``with read_model.read(as_of) as view``:
    a view to read with (a ``StoreView``, made when the block begins, or a
    ``MemoryView`` of the past)."""

    def __init__(self, make_view):
        self.make_view = make_view

    def __enter__(self):
        return self.make_view()

    def __exit__(self, *exc):
        return False


class _Statuses:
    """``partition_status(ref)`` from a dict fetched with one answer."""

    def __init__(self, statuses):
        self.statuses = statuses

    def partition_status(self, ref):
        return self.statuses.get(ref, IDLE)


_EVENT_ID_SQL = "(SELECT value FROM projection WHERE key = 'event_id')"
_LINKS_SQL = ("(SELECT json_group_array(member) FROM (SELECT member FROM links "
              "WHERE kind = '%s' AND owner = %s ORDER BY seq))")
_WANT_RUNS_SQL = _LINKS_SQL % ("want_job_runs", "w.want_id")
_WANT_DERIVATIVES_SQL = _LINKS_SQL % ("want_derivatives", "w.want_id")
_PARTITION_WANTS_SQL = _LINKS_SQL % ("partition_wants", "p.ref")
#: The statuses of a want row's partitions, as one JSON object.
_STATUSES_SQL = ("(SELECT json_group_object(p.ref, p.status) FROM json_each(w.row, '$[%d]') j "
                 "JOIN partitions p ON p.ref = j.value)" % Want.ROW.index("partitions"))


class StoreView:
    """Read queries on the projection, answered as API dicts.

    Every query uses an index, so a read costs the size of its answer.  A
    single object is read by one SQL statement (one consistent snapshot, and
    few round trips through the GIL); a page by a short read transaction.  If
    what was read is not yet fsynced (the orchestrator commits before its
    syncer fsyncs), the reader waits for that fsync: nobody sees what a power
    loss could still take back.  ``MemoryView`` has the same methods.
    """

    def __init__(self, log):
        self.log = log
        self.conn = log._conn()
        self._summary = None
        self.latest_event_id = None

    def _durable(self, event_id):
        if event_id is not None and int(event_id) > self.log.durable_event_id:
            self.log.wait_durable(int(event_id))

    def _one(self, sql, args):
        with self.log._errors():
            row = self.conn.execute(sql, args).fetchone()
        if row is not None:
            self._durable(row[-1])
        return row

    def _cached(self, kind, key, sql, render):
        # A single object read again while nothing was committed meanwhile is
        # answered from memory.  A write's reply is sent only after its commit
        # moved the appended event id on, so a client still reads its writes.
        cache, lock = self.log.read_cache, self.log.read_cache_lock
        with lock:
            hit = cache.get((kind, key))
        if hit is not None and hit[0] == self.log._appended_id:
            return hit[1]
        row = self._one(sql, (key,))
        if row is None:
            return None
        answer = render(row)
        with lock:
            if len(cache) >= 10000:
                cache.clear()
            cache[(kind, key)] = (int(row[-1]), answer)
        return answer

    def _page(self, sql, args):
        # A short read transaction: the page and the summary (totals) agree.
        with self.log.transaction(write=False) as conn:
            rows = conn.execute(sql, args).fetchall()
            row = conn.execute("SELECT value FROM projection WHERE key = 'summary'").fetchone()
        self._summary = json.loads(row[0]) if row else BuildState().summary()
        self.latest_event_id = self._summary["event_id"]
        self._durable(self.latest_event_id)
        return rows

    @property
    def summary(self):
        """Counts and counters of ``BuildState.summary()``, read on first use."""
        if self._summary is None:
            with self.log._errors():
                row = self.conn.execute(
                    "SELECT value FROM projection WHERE key = 'summary'").fetchone()
            self._summary = json.loads(row[0]) if row else BuildState().summary()
            self.latest_event_id = self._summary["event_id"]
            self._durable(self.latest_event_id)
        return self._summary

    @staticmethod
    def _want_of(values, statuses, job_run_ids, derivative_want_ids):
        want = Want.from_values(values)
        want.job_run_ids = job_run_ids
        want.derivative_want_ids = derivative_want_ids
        return want.to_dict(_Statuses(statuses or {}))

    def _want(self, row):
        return self._want_of(json.loads(row[0]), json.loads(row[1]) if row[1] else None,
                             json.loads(row[2]), json.loads(row[3]))

    @staticmethod
    def _partition_of(values, want_ids):
        part = Partition.from_values(values)
        part.want_ids = want_ids
        return part.to_dict()

    def _partition(self, row):
        return self._partition_of(json.loads(row[0]), json.loads(row[1]))

    def _json_page(self, columns, source, order_limit, args, count=False):
        """``(rows, total)``: the page's ``columns`` (SQL giving JSON) as one
        JSON document -- one json.loads for a page, not one per column and
        row -- and, if ``count``, how many rows the unpaged query has (None
        for an empty page; counting walks every match, so only when asked)."""
        ((page, total),) = self._page(
            "SELECT json_group_array(json_array(%s)), MAX(n) FROM (SELECT %s, %s AS n "
            "FROM %s %s)" % (", ".join("json(c%d)" % i for i in range(len(columns))),
                             ", ".join("%s AS c%d" % (c, i) for i, c in enumerate(columns)),
                             "COUNT(*) OVER ()" if count else "NULL", source, order_limit),
            args)
        return json.loads(page), total

    def want(self, want_id):
        """One want as a dict, or None."""
        return self._cached("wants", want_id, "SELECT w.row, %s, %s, %s, %s FROM wants w "
                            "WHERE want_id = ?" % (_STATUSES_SQL, _WANT_RUNS_SQL,
                                                   _WANT_DERIVATIVES_SQL, _EVENT_ID_SQL),
                            self._want)

    def wants(self, status, offset, limit):
        """``(page, total)`` of wants, newest first."""
        where, args = ("", []) if status is None else (" WHERE status = ?", [status])
        rows, _ = self._json_page(("w.row", _STATUSES_SQL, _WANT_RUNS_SQL, _WANT_DERIVATIVES_SQL),
                                  "wants w" + where, "ORDER BY seq DESC LIMIT ? OFFSET ?",
                                  args + [limit, offset])
        total = (self.summary["seqs"]["wants"] if status is None
                 else self.summary["counts"]["wants"].get(status, 0))
        return [self._want_of(*values) for values in rows], total

    def lineage(self, ref, depth):
        """``ref``'s lineage both ways to ``depth`` (see ``lineage_tree``), or None.
        One indexed query per level and direction."""
        return lineage_tree(ref, depth, self._nodes, self._downstream_of)

    def _nodes(self, refs):
        found = {}
        with self.log._errors():
            for chunk in _chunks(refs):
                for ref, status, upstream in self.conn.execute(
                        "SELECT ref, status, json_extract(row, '$[%d]') FROM partitions "
                        "WHERE ref IN (%s)" % (Partition.ROW.index("upstream"),
                                               ",".join("?" * len(chunk))), chunk):
                    found[ref] = (status, json.loads(upstream) if upstream else [])
        return found

    def _downstream_of(self, refs):
        found = {}
        with self.log._errors():
            for chunk in _chunks(refs):
                for dep, ref in self.conn.execute(
                        "SELECT dep, ref FROM upstream WHERE dep IN (%s) ORDER BY dep, ref"
                        % ",".join("?" * len(chunk)), chunk):
                    found.setdefault(dep, []).append(ref)
        return found

    def partition_events(self, ref):
        """The events that concern ``ref`` (its wants, its job runs, its taints),
        oldest first: an index range, never a scan of the log."""
        with self.log._errors():
            rows = self.conn.execute(
                "SELECT e.event_id, e.timestamp, e.type, e.payload FROM ref_events r "
                "JOIN events e ON e.event_id = r.event_id WHERE r.ref = ? "
                "AND r.event_id <= ? ORDER BY r.event_id",
                (ref, self.log.durable_event_id)).fetchall()
        return [EventLog._event(r) for r in rows]

    def partition(self, ref):
        """One partition as a dict, or None."""
        return self._cached("partitions", ref, "SELECT p.row, %s, %s FROM partitions p "
                            "WHERE ref = ?" % (_PARTITION_WANTS_SQL, _EVENT_ID_SQL),
                            self._partition)

    def partitions(self, status, prefix, offset, limit, stale=False):
        """``(page, total)`` of partitions, newest first, optionally by status,
        ref prefix, and only the stale ones (their own index: README "Freshness")."""
        where, args = [], []
        table = "stale s JOIN partitions p ON p.ref = s.ref" if stale else "partitions p"
        key = "s" if stale else "p"
        if status is not None:
            where.append("p.status = ?")
            args.append(status)
        if prefix:
            # A range on the primary key: prefix <= ref < prefix + U+10FFFF.
            where.append("%s.ref >= ? AND %s.ref < ?" % (key, key))
            args += [prefix, prefix + "\U0010ffff"]
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        counted = bool(prefix) or (stale and status is not None)
        rows, count = self._json_page(("p.row", _PARTITION_WANTS_SQL), table + clause,
                                      "ORDER BY %s.seq DESC LIMIT ? OFFSET ?" % key,
                                      args + [limit, offset], count=counted)
        if counted:  # counted in the same snapshot as the page
            total = count if rows else self._count(table, clause, args)
        elif stale:
            total = self.summary["counts"]["stale"]
        else:
            total = (self.summary["seqs"]["partitions"] if status is None
                     else self.summary["counts"]["partitions"].get(status, 0))
        return [self._partition_of(*values) for values in rows], total

    def alerts(self, status, offset, limit):
        """``(page, total)`` of alerts, newest first (README "Alerts")."""
        where, args = ("", []) if status is None else (" WHERE status = ?", [status])
        rows = self._page("SELECT row FROM alerts%s ORDER BY alert_id DESC LIMIT ? OFFSET ?"
                          % where, args + [limit, offset])
        counts = self.summary["counts"]["alerts"]
        total = sum(counts.values()) if status is None else counts.get(status, 0)
        return [Alert.from_row(r[0]).to_dict() for r in rows], total

    def _count(self, table, clause, args):
        with self.log._errors():
            return self.conn.execute("SELECT COUNT(*) FROM %s%s" % (table, clause),
                                     args).fetchone()[0]

    def resolve(self, kind, key):
        """The full id of the want (``kind`` "wants") or job run ("job_runs") that
        ``key`` names, itself or as a unique prefix of at least MIN_ID_PREFIX
        characters (an index range); None if none."""
        column = {"wants": "want_id", "job_runs": "job_run_id"}[kind]
        with self.log._errors():
            rows = self.conn.execute(
                "SELECT %s FROM %s WHERE %s >= ? AND %s < ? ORDER BY %s LIMIT 4"
                % (column, kind, column, column, column), (key, key + "\U0010ffff")).fetchall()
        return unique_id(key, [r[0] for r in rows], kind[:-1].replace("_", " "))

    def job_run(self, job_run_id):
        """One job run as a dict, or None."""
        return self._cached("job_runs", job_run_id, "SELECT row, %s FROM job_runs "
                            "WHERE job_run_id = ?" % _EVENT_ID_SQL,
                            lambda r: JobRun.from_row(r[0]).to_dict())

    def job_runs(self, status, job_label, want_id, offset, limit):
        """``(page, total)`` of job runs, newest first, by status, job label or want."""
        where, args = [], []
        if status is not None:
            where.append("r.status = ?")
            args.append(status)
        if job_label is not None:
            where.append("r.job_label = ?")
            args.append(job_label)
        if want_id is not None:
            source = "links l JOIN job_runs r ON r.job_run_id = l.member"
            where.insert(0, "l.kind = 'want_job_runs' AND l.owner = ?")
            args.insert(0, want_id)
        else:
            source = "job_runs r"
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        # One JSON column a row: as cheap to parse row by row (measured) as
        # through _json_page.
        if want_id is not None:
            rows = self._page("SELECT r.row, COUNT(*) OVER () FROM %s%s "
                              "ORDER BY r.seq DESC LIMIT ? OFFSET ?" % (source, clause),
                              args + [limit, offset])
            total = rows[0][1] if rows else self._count(source, clause, args)
        else:  # totals from the counters kept with the projection, not a count
            rows = self._page("SELECT r.row FROM %s%s ORDER BY r.seq DESC LIMIT ? OFFSET ?"
                              % (source, clause), args + [limit, offset])
            if job_label is not None:
                counts = self.summary["job_runs_by_job"].get(job_label, {})
                total = (sum(counts.values()) if status is None else counts.get(status, 0))
            else:
                total = (self.summary["seqs"]["job_runs"] if status is None
                         else self.summary["counts"]["job_runs"].get(status, 0))
        return [JobRun.from_row(r[0]).to_dict() for r in rows], total


def _disk_full():
    return StorageError("Disk full: the event log could not be written and nothing was "
                        "recorded; free space for %s and retry" % STATE_DIR, reason="disk full")


class _translate_sqlite_errors:
    """Context manager: sqlite3 errors become StorageError (original as cause).

    A full disk says so in words (sqlite3's own message for it on COMMIT is
    "database or disk is full", or worse, an error of the ROLLBACK after it).
    """

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            raise _disk_full() from exc
        if issubclass(exc_type, sqlite3.Error):
            raise StorageError("Event log error: %s" % exc) from exc
        if issubclass(exc_type, UnicodeError):  # text SQLite cannot store (a lone surrogate)
            raise StorageError("Event log error: text that is not valid Unicode: %s"
                               % exc) from exc
        return False


###############################################################################
# Configuration ###############################################################
###############################################################################

_LABEL_RE = re.compile(r"[A-Za-z0-9_.-]+")


class Setting:
    """One key of databuild.toml, as waitress's ``Adjustments`` has them: its
    table, its kind (``int``, ``num``, ``str``, ``str_list``, ``choice``,
    ``any``: checked by the parser of its table), its default, its range and
    a line of help.  Parsing checks values with ``check``, ``serve --help``
    and README's reference say the same (a test holds README to it)."""

    __slots__ = ("table", "key", "kind", "default", "low", "high", "help", "choices")

    def __init__(self, table, key, kind, default=None, low=None, high=None, help="",
                 choices=None):
        self.table, self.key, self.kind, self.default = table, key, kind, default
        self.low, self.high, self.help, self.choices = low, high, help, choices

    def check(self, where, value):
        """``value`` if it is of this setting's kind and range, else ConfigError
        naming ``where`` (the table) and the key."""
        if self.kind == "choice":
            if value not in self.choices:
                raise ConfigError("%s %s: must be %s, not %r" % (
                    where, self.key, " or ".join('"%s"' % c for c in self.choices), value))
            return value
        if self.kind == "any":
            return value
        return _config_value(where, self.key, value, self.kind, self.low, self.high)


#: Every key of databuild.toml but the executors' own (``Executor.settings``
#: and ``job_settings``): ``[server]``, ``[[jobs]]`` and ``[[schedules]]``.
SETTINGS = (
    Setting("server", "host", "str", "127.0.0.1", help="the address to listen on"),
    Setting("server", "port", "int", 0, 0, 65535, "the port; 0 = a free one chosen by the OS"),
    Setting("server", "idle_timeout_seconds", "num", 3 * 60 * 60, 0,
            help="stop after this many seconds without a request or a job run; 0 = never"),
    Setting("server", "max_concurrent_job_runs", "int", 4, 1,
            help="job runs at once, per executor unless [executors.<name>] says otherwise"),
    Setting("server", "cors_origins", "str_list", ["http://localhost:3000"],
            help="web origins whose pages may call the API"),
    Setting("server", "auth", "choice", "token", choices=("token", "none"),
            help='"none": no access token (a loopback host only)'),
    Setting("server", "allowed_hosts", "str_list", [],
            help="Host names accepted besides loopback (for a non-loopback bind)"),
    Setting("jobs", "label", "any", help="unique, [A-Za-z0-9_.-]+ (required)"),
    Setting("jobs", "entrypoint", "any", help="argv list, or a string split with shlex "
                                              "(required)"),
    Setting("jobs", "partition_patterns", "any", help="Python regexes, full match (required)"),
    Setting("jobs", "deps", "any", [], help="declared deps: templates filled from the "
                                            "patterns' named groups"),
    Setting("jobs", "environment", "any", {}, help="a table of strings added to the job's env"),
    Setting("jobs", "max_partitions_per_run", "int", 1, 1, help="refs one run may get"),
    Setting("jobs", "max_retries", "int", 0, 0, help="retries of a failed run"),
    Setting("jobs", "timeout_seconds", "num", 0, 0, help="a run's time limit; 0 = none"),
    Setting("jobs", "max_concurrent_runs", "int", None, 1, help="runs of this job at once"),
    Setting("jobs", "retry_backoff_seconds", "num", 0, 0,
            help="retry n waits retry_backoff_seconds * 2**(n-1)"),
    Setting("jobs", "retry_backoff_max_seconds", "num", 3600, 0,
            help="the longest of those waits"),
    Setting("jobs", "executor", "any", "local", help="where its runs execute (an executor's "
                                                     "name)"),
    Setting("jobs", "version", "str", None, help="its code version; default: a hash of its "
                                                 "entrypoint files in the workspace"),
    Setting("jobs", "auto_rebuild", "choice", "off", choices=("off", "stale"),
            help='"stale": its stale partitions are rebuilt by themselves'),
    Setting("schedules", "name", "any", help="unique, [A-Za-z0-9_.-]+ (required)"),
    Setting("schedules", "cron", "str", help="5-field cron (or interval_seconds)"),
    Setting("schedules", "interval_seconds", "int", None, 1, help="ticks every N seconds"),
    Setting("schedules", "timezone", "str", "UTC", help="an IANA name"),
    Setting("schedules", "partitions", "str_list", help="ref templates with {data_time:...} "
                                                        "(required)"),
    Setting("schedules", "lag_seconds", "num", 0, 0, DURATION_RANGE[1],
            help="data_time = tick - lag_seconds"),
    Setting("schedules", "catch_up", "int", 1, 0, help="missed ticks made after downtime"),
    Setting("schedules", "priority", "int", 0, *PRIORITY_RANGE, help="of each want"),
    Setting("schedules", "ttl_seconds", "num", None, *DURATION_RANGE, help="of each want"),
    Setting("schedules", "sla_seconds", "num", None, *DURATION_RANGE, help="of each want"),
    Setting("sensors", "name", "any", help="unique, [A-Za-z0-9_.-]+ (required)"),
    Setting("sensors", "command", "any", help="argv list, or a string split with shlex, run "
                                              "in the workspace (required)"),
    Setting("sensors", "interval_seconds", "num", None, 0.1, DURATION_RANGE[1],
            help="seconds between evaluations (required)"),
    Setting("sensors", "timeout_seconds", "num", 60, 0.1, DURATION_RANGE[1],
            help="an evaluation's time limit"),
    Setting("alerts", "name", "any", help="unique, [A-Za-z0-9_.-]+ (required)"),
    Setting("alerts", "on", "any", help="the kinds it is raised on: " + ", ".join(ALERT_KINDS)
                                        + " (required)"),
    Setting("alerts", "command", "any", help="argv list or string; gets the alert JSON on "
                                             "stdin (or webhook)"),
    Setting("alerts", "webhook", "str", help="an http(s) URL the alert JSON is POSTed to "
                                             "(or command)"),
)
#: The settings of a table, by key: ``SETTINGS_OF["server"]["port"]``.
SETTINGS_OF = {}
for _setting in SETTINGS:
    SETTINGS_OF.setdefault(_setting.table, {})[_setting.key] = _setting
del _setting
_SERVER_KEYS = tuple(SETTINGS_OF["server"])
_JOB_KEYS = tuple(SETTINGS_OF["jobs"])


class JobConfig:
    """One ``[[jobs]]`` entry of databuild.toml."""

    def __init__(self, label, entrypoint, partition_patterns, environment=None,
                 max_partitions_per_run=1, max_retries=0, timeout_seconds=0,
                 max_concurrent_runs=None, retry_backoff_seconds=0,
                 retry_backoff_max_seconds=3600, executor="local", options=None, deps=(),
                 version=None, auto_rebuild="off"):
        self.label = label
        self.entrypoint = list(entrypoint)
        self.partition_patterns = list(partition_patterns)
        self.patterns = [re.compile(p) for p in self.partition_patterns]
        self.environment = dict(environment or {})
        self.max_partitions_per_run = max_partitions_per_run
        self.max_retries = max_retries
        self.timeout_seconds = timeout_seconds
        self.max_concurrent_runs = max_concurrent_runs  # None: only the server's limit
        self.retry_backoff_seconds = retry_backoff_seconds
        self.retry_backoff_max_seconds = retry_backoff_max_seconds
        self.executor = executor  # a name in ``executors`` (README "Running on a cluster")
        self.options = dict(options or {})  # the executor's own job keys (sbatch_options)
        #: Declared deps: templates filled from the named groups of the pattern
        #: a ref matched, e.g. ``raw/date={date}`` (README "Backfills").
        self.deps = list(deps)
        self.version = version  # README "Freshness": given, else code_version is a hash
        self.auto_rebuild = auto_rebuild  # "off" or "stale"
        self.code_version = version  # set by Config from the files (code_files) if None
        self.code_files = []  # the entrypoint's files in the workspace

    def declared_deps(self, ref):
        """The refs ``ref`` declares it needs (its job's ``deps``, filled in); []
        if none.  KeyError if a template names a group the matching pattern lacks."""
        if not self.deps:
            return []
        for pattern in self.patterns:
            match = pattern.fullmatch(ref)
            if match is not None:
                groups = match.groupdict()
                return list(dict.fromkeys(t.format_map(groups) for t in self.deps))
        return []

    def retry_delay(self, attempt, rng=random.random):
        """Seconds before retry ``attempt`` (2, 3, ...) may start (README "Scheduling policy"):
        ``retry_backoff_seconds * 2**(n-1)`` for the n-th retry, capped by
        ``retry_backoff_max_seconds``, plus up to 10 % of jitter (so that
        runs that failed together do not all retry at the same instant)."""
        if not self.retry_backoff_seconds:
            return 0.0
        retry = max(1, attempt - 1)
        delay = min(self.retry_backoff_seconds * 2 ** min(retry - 1, 60),
                    self.retry_backoff_max_seconds)
        return delay * (1 + 0.1 * rng())

    def produces(self, ref):
        """True if one of this job's patterns fully matches ``ref``."""
        return any(p.fullmatch(ref) for p in self.patterns)


class Config:
    """A workspace's settings: the ``[server]`` table and the jobs.

    ``root`` is the workspace folder (the jobs' cwd); ``path`` the toml file
    (None for a config built in code, as tests do).
    """

    def __init__(self, root, jobs, path=None, **server):
        unknown = set(server) - set(_SERVER_KEYS)
        if unknown:
            raise ConfigError("unknown server setting: %s" % ", ".join(sorted(unknown)))
        self.root = os.path.abspath(root)
        self.path = path
        self.jobs = list(jobs)
        self.jobs_by_label = {job.label: job for job in self.jobs}
        self.schedules = []  # ScheduleConfig, in file order (README "Schedules")
        self.schedules_by_name = {}
        #: ``[executors.<name>]`` tables, checked (README "Running on a cluster").
        self.executor_settings = {}
        self.sensors = []  # SensorConfig, in file order (README "Sensors")
        self.sensors_by_name = {}
        self.alerts = []  # AlertConfig, in file order (README "Alerts")
        self.alerts_by_name = {}
        for key, setting in SETTINGS_OF["server"].items():
            setattr(self, key, server.get(key, setting.default))
        self.job_for = functools.lru_cache(maxsize=16384)(self._job_for)
        for job in self.jobs:
            job.code_files = code_files(self.root, job.entrypoint)
            if job.version is None:
                job.code_version = code_version(job.code_files)

    @property
    def state_dir(self):
        """``<workspace>/.databuild``."""
        return os.path.join(self.root, STATE_DIR)

    def _job_for(self, ref):
        check_ref(ref)
        jobs = [job for job in self.jobs if job.produces(ref)]
        if not jobs:
            raise InvalidRequest("No job produces partition %r" % ref, ref=ref)
        if len(jobs) > 1:
            raise InvalidRequest("Partition %r matches more than one job (%s)"
                                 % (ref, ", ".join(j.label for j in jobs)),
                                 ref=ref, job_labels=[j.label for j in jobs])
        return jobs[0]


def code_files(root, entrypoint):
    """The files of an entrypoint that lie in the workspace ``root``, in order
    (the script, not the interpreter): what a job's code version hashes."""
    root = os.path.realpath(root)
    found = []
    for arg in entrypoint:
        path = os.path.realpath(os.path.join(root, arg))
        if path.startswith(root + os.sep) and os.path.isfile(path) and path not in found:
            found.append(path)
    return found


def code_version(paths):
    """The first 12 hex digits of the SHA-256 of the files' contents, in order
    (README "Freshness"); a file that cannot be read counts as empty."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 16), b""):
                    digest.update(chunk)
        except OSError:
            pass
    return digest.hexdigest()[:12]


def _stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return st.st_mtime_ns, st.st_size, st.st_ino


class ConfigWatcher:
    """A workspace's config, reloaded when databuild.toml or a job's code changes.

    ``current()`` costs one ``stat`` of the file (and, at most every
    ``code_check_seconds``, one of each job's code files: a changed script
    changes its job's code version, README "Freshness"); when an mtime,
    size or inode changed, the file is loaded again.  A valid new config
    replaces the old one for all new work; an invalid one keeps the old
    config, and ``error`` says why until the file loads again (never a crash).
    """

    code_check_seconds = 1.0

    def __init__(self, config, clock=time.monotonic):
        self.config = config
        self.error = None  # why the last reload failed; None while the file loads
        self.clock = clock
        self._lock = threading.Lock()  # one reload at a time; guards the stamps
        # (_code_check_at is not guarded: two threads may both stat the code files)
        self._stamp = self._stat()
        self._code_stamp = self._code_stat()
        self._code_check_at = clock() + self.code_check_seconds

    def _stat(self):
        return None if self.config.path is None else _stamp(self.config.path)

    def _code_stat(self):
        return [_stamp(path) for job in self.config.jobs for path in job.code_files]

    def current(self):
        """The config in force, reloaded first if the file (or a job's code) changed."""
        if self.config.path is None:
            return self.config
        changed = self._stat() != self._stamp
        if not changed and self.clock() >= self._code_check_at:
            self._code_check_at = self.clock() + self.code_check_seconds
            changed = self._code_stat() != self._code_stamp
        if changed:
            with self._lock:
                stamp, code_stamp = self._stat(), self._code_stat()
                if stamp != self._stamp or code_stamp != self._code_stamp:
                    self._stamp = stamp
                    self._reload()
                    self._code_stamp = self._code_stat()
        return self.config

    def _reload(self):
        try:
            config = load_config(self.config.root)
        except Exception as e:  # whatever the file holds, the server goes on
            self.error = e.message if isinstance(e, ConfigError) else "%s: %s: %s" % (
                self.config.path, type(e).__name__, e)
            logger.error("%s changed but does not load; the previous config stays in force: "
                         "%s", CONFIG_FILE, e.message)
            return
        self.config, self.error = config, None
        logger.info("Reloaded %s: %d jobs", config.path, len(config.jobs))


_CRON_FIELDS = (  # name, low, high, names
    ("minute", 0, 59, None), ("hour", 0, 23, None), ("day of month", 1, 31, None),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                      "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")))


class Cron:
    """A 5-field cron expression (minute hour day-of-month month day-of-week)
    with ``*``, ``*/n``, ``a-b``, ``a-b/n``, lists and names of months and days
    (``jan``, ``mon``); day of week 0 and 7 are Sunday.  As in cron, when both
    day fields are restricted a day matching either one matches.

    ``next_after(naive)`` gives the first matching wall-clock minute after a
    naive datetime, searching field by field (never minute by minute).
    """

    def __init__(self, text):
        parts = text.split()
        if len(parts) != 5:
            raise ConfigError("cron: %r has %d fields, cron has 5 (minute hour day-of-month "
                              "month day-of-week)" % (text, len(parts)))
        self.text = text
        sets = [self._field(part, *spec) for part, spec in zip(parts, _CRON_FIELDS)]
        self.minutes, self.hours, self.days, self.months, dows = sets
        self.dows = {d % 7 for d in dows}
        self.any_day = parts[2] == "*"
        self.any_dow = parts[4] == "*"

    @staticmethod
    def _field(text, name, low, high, names):
        values = set()
        def number(word):
            return names.index(word) + low if names and word in names else int(word)
        for item in text.lower().split(","):
            item, stepped, step = item.partition("/")
            try:
                step = int(step) if stepped else 1
                if item == "*":
                    start, end = low, high
                else:
                    first, _, last = item.partition("-")
                    start = number(first)
                    # "a-b", or "a/n" (from a to the end by n), or "a" alone
                    end = number(last) if last else (high if stepped else start)
            except ValueError:
                raise ConfigError("cron %s field: %r is not a number, range, list or step"
                                  % (name, text)) from None
            if not (low <= start <= end <= high) or step < 1:
                raise ConfigError("cron %s field: %r is out of range %d-%d"
                                  % (name, text, low, high))
            values.update(range(start, end + 1, step))
        return values

    def _day_matches(self, day):
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.dows
        if self.any_day or self.any_dow:
            return dom and dow
        return dom or dow

    def next_after(self, naive):
        """The first matching naive minute strictly after ``naive``."""
        t = naive.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
        for _ in range(100000):  # a few steps per field in practice
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + datetime.timedelta(days=32)).replace(
                    day=1)
            elif not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + datetime.timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + datetime.timedelta(hours=1)
            elif t.minute not in self.minutes:
                t += datetime.timedelta(minutes=1)
            else:
                return t
        raise ConfigError("cron: %r never matches" % self.text)


class ScheduleConfig:
    """One ``[[schedules]]`` entry (README "Schedules"): when it ticks, and the want each
    tick makes.

    ``ticks_after(ts)`` yields the ticks (epoch seconds) after ``ts``, in
    order.  A cron schedule ticks on the wall clock of its ``timezone``: on a
    day the clocks go forward, a tick in the skipped hour comes once, right
    after the jump; on a day they go back, a tick in the repeated hour comes
    once (the first time).  An ``interval_seconds`` schedule ticks at the
    multiples of the interval since the epoch.
    """

    def __init__(self, name, partitions, cron=None, interval_seconds=None, timezone="UTC",
                 lag_seconds=0, catch_up=1, priority=0, ttl_seconds=None, sla_seconds=None):
        self.name = name
        self.partitions = list(partitions)
        self.cron = Cron(cron) if cron is not None else None
        self.interval_seconds = interval_seconds
        self.timezone = timezone
        self.tz = zoneinfo.ZoneInfo(timezone)
        self.lag_seconds = lag_seconds
        self.catch_up = catch_up
        self.priority = priority
        self.ttl_seconds = ttl_seconds
        self.sla_seconds = sla_seconds

    def ticks_after(self, ts):
        """The ticks after ``ts`` (epoch seconds), oldest first, without end."""
        if self.interval_seconds:
            tick = (ts // self.interval_seconds + 1) * self.interval_seconds
            while True:
                yield float(tick)
                tick += self.interval_seconds
        naive = datetime.datetime.fromtimestamp(ts, self.tz).replace(tzinfo=None)
        last = ts
        while True:
            naive = self.cron.next_after(naive)
            # fold=0: a time in a skipped hour is read with the offset before the
            # jump (so it lands just after it); a repeated hour's first pass.
            tick = naive.replace(tzinfo=self.tz).timestamp()
            if tick > last:
                last = tick
                yield tick

    def want_id(self, tick):
        """The want of a tick: ``schedule:<name>:<tick as UTC ISO 8601>`` (README "Schedules")."""
        return "schedule:%s:%s" % (self.name, time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                           time.gmtime(tick)))

    def refs(self, tick):
        """The partitions of a tick: the templates with ``data_time`` (tick - lag,
        in the schedule's timezone) and ``tick``."""
        data_time = datetime.datetime.fromtimestamp(tick - self.lag_seconds, self.tz)
        return [p.format(data_time=data_time, tick=datetime.datetime.fromtimestamp(
            tick, self.tz)) for p in self.partitions]


class SensorConfig:
    """One ``[[sensors]]`` entry (README "Sensors"): a command evaluated every
    ``interval_seconds`` that may print wants and a cursor."""

    def __init__(self, name, command, interval_seconds, timeout_seconds=60):
        self.name = name
        self.command = list(command)
        self.interval_seconds = interval_seconds
        self.timeout_seconds = timeout_seconds


class AlertConfig:
    """One ``[[alerts]]`` entry (README "Alerts"): the kinds it is raised on and
    where it goes (a command, or a webhook)."""

    def __init__(self, name, on, command=None, webhook=None):
        self.name = name
        self.on = list(on)
        self.command = list(command) if command else None
        self.webhook = webhook


def _table_entry(table, i, data, required):
    # The i-th [[table]] entry, checked for what every such entry needs: a
    # table of known keys, the required ones, a good unique-able name.
    # Returns ``(where, name)``; ``where`` names the entry in errors.
    where = "[[%s]] #%d" % (table, i)
    if not isinstance(data, dict):
        raise ConfigError("%s: must be a table" % where)
    if isinstance(data.get("name"), str):
        where = "[[%s]] %r" % (table, data["name"])
    known = tuple(SETTINGS_OF[table])
    for key in data:
        if key not in known:
            raise ConfigError("%s %s: unknown key (known: %s)" % (where, key, ", ".join(known)))
    for key in required:
        if key not in data:
            raise ConfigError("%s %s: missing (required)" % (where, key))
    name = _config_value(where, "name", data["name"], "str")
    if not _LABEL_RE.fullmatch(name):
        raise ConfigError("%s name: must match [A-Za-z0-9_.-]+" % where)
    return where, name


def _argv(where, key, value):
    # An argv: a list of strings, or a string split as a shell would.
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as e:
            raise ConfigError("%s %s: %s" % (where, key, e)) from None
    _config_value(where, key, value, "str_list")
    if not value:
        raise ConfigError("%s %s: must not be empty" % (where, key))
    return value


def _parse_sensor(i, data):
    where, name = _table_entry("sensors", i, data, ("name", "command", "interval_seconds"))
    command = _argv(where, "command", data["command"])
    numbers = {key: SETTINGS_OF["sensors"][key].check(where, data[key]) if key in data
               else SETTINGS_OF["sensors"][key].default
               for key in ("interval_seconds", "timeout_seconds")}
    return SensorConfig(name, command, **numbers)


def _parse_alert(i, data):
    where, name = _table_entry("alerts", i, data, ("name", "on"))
    on = _config_value(where, "on", data["on"], "str_list")
    if not on:
        raise ConfigError("%s on: must name at least one kind (%s)"
                          % (where, ", ".join(ALERT_KINDS)))
    for kind in on:
        if kind not in ALERT_KINDS:
            raise ConfigError("%s on: unknown kind %r (known: %s)"
                              % (where, kind, ", ".join(ALERT_KINDS)))
    if ("command" in data) == ("webhook" in data):
        raise ConfigError("%s: give either command or webhook" % where)
    if "command" in data:
        return AlertConfig(name, on, command=_argv(where, "command", data["command"]))
    url = SETTINGS_OF["alerts"]["webhook"].check(where, data["webhook"])
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("%s webhook: must be an http:// or https:// URL, not %r"
                          % (where, url))
    return AlertConfig(name, on, webhook=url)


def _parse_schedule(i, data, jobs_config):
    where, name = _table_entry("schedules", i, data, ("name", "partitions"))
    if ("cron" in data) == ("interval_seconds" in data):
        raise ConfigError("%s: give either cron or interval_seconds" % where)
    partitions = _config_value(where, "partitions", data["partitions"], "str_list")
    if not partitions:
        raise ConfigError("%s partitions: must not be empty" % where)
    kwargs = {key: setting.check(where, data[key]) if key in data else setting.default
              for key, setting in SETTINGS_OF["schedules"].items()
              if key not in ("name", "partitions")}
    try:
        schedule = ScheduleConfig(name, partitions, **kwargs)
    except ConfigError as e:
        raise ConfigError("%s %s" % (where, e.message)) from None
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError("%s timezone: unknown time zone %r (an IANA name such as "
                          "Europe/Berlin)" % (where, data.get("timezone"))) from None
    try:
        next(schedule.ticks_after(1735689600.0))  # a cron that never matches (Feb 31)
    except ConfigError as e:
        raise ConfigError("%s %s" % (where, e.message)) from None
    # Every template must make a ref some job produces: try one tick.
    try:
        refs = schedule.refs(1735689600.0)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ConfigError("%s partitions: bad template (%s; use {data_time:%%Y-%%m-%%d})"
                          % (where, e)) from None
    for ref in refs:
        try:
            jobs_config.job_for(ref)
        except InvalidRequest as e:
            raise ConfigError("%s partitions: %s" % (where, e.message)) from None
    return schedule


def _config_value(where, key, value, kind, minimum=None, maximum=None):
    def bad(what):
        raise ConfigError("%s %s: %s" % (where, key, what))
    if maximum is not None and kind in ("int", "num") and isinstance(value, (int, float)) \
            and not isinstance(value, bool) and value > maximum:
        bad("must be at most %s, not %s" % (maximum, value))
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            bad("must be an integer, not %r" % (value,))
        if minimum is not None and value < minimum:
            bad("must be at least %d, not %d" % (minimum, value))
    elif kind == "num":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            bad("must be a number, not %r" % (value,))
        if minimum is not None and value < minimum:
            bad("must be at least %s, not %s" % (minimum, value))
    elif kind == "str":
        if not isinstance(value, str) or not value:
            bad("must be a non-empty string, not %r" % (value,))
    elif kind == "str_list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            bad("must be a list of strings, not %r" % (value,))
    return value


def _parse_executors(data):
    # README "Running on a cluster": [executors.<name>] tables, each key checked by its executor.
    if not isinstance(data, dict):
        raise ConfigError("executors: must be a table of tables ([executors.local], ...)")
    tables = {}
    for name, table in data.items():
        where = "[executors.%s]" % name
        if name not in executors:
            raise ConfigError("%s: unknown executor (known: %s)" % (where, ", ".join(executors)))
        if not isinstance(table, dict):
            raise ConfigError("%s: must be a table" % where)
        known = executors[name].all_settings()
        for key, value in table.items():
            if key not in known:
                raise ConfigError("%s %s: unknown key (known: %s)" % (where, key, ", ".join(known)))
            known[key].check(where, value)
        tables[name] = dict(table)
    return tables


def _parse_deps(where, templates, patterns):
    # Each template may name only groups that every pattern of the job has.
    _config_value(where, "deps", templates, "str_list")
    for template in templates:
        try:
            names = {name for _, name, spec, conv in string.Formatter().parse(template)
                     if name is not None}
        except ValueError as e:
            raise ConfigError("%s deps: bad template %r: %s" % (where, template, e)) from None
        for name in sorted(names):
            for pattern in patterns:
                if name not in re.compile(pattern).groupindex:
                    raise ConfigError("%s deps: template %r names {%s}, which pattern %r has "
                                      "no named group (?P<%s>...) for" % (
                                          where, template, name, pattern, name))
    return templates


def _check_deps_built(job, config):
    # A declared dep that no job builds is a config error: checked on an
    # example ref made from each pattern (where the pattern is simple enough
    # to make one; otherwise the run that needs the dep fails saying so).
    for pattern in job.patterns:
        example = _example_of(pattern)
        if example is None:
            continue
        groups = pattern.fullmatch(example).groupdict()
        for template in job.deps:
            dep = template.format_map(groups)
            try:
                config.job_for(dep)
            except InvalidRequest as e:
                raise ConfigError("[[jobs]] %r deps: template %r gives %r for %r: %s" % (
                    job.label, template, dep, example, e.message)) from None


def _example_of(pattern):
    """A short string that the compiled ``pattern`` fully matches, or None if
    the pattern uses more than literals, classes, groups, repeats and branches."""
    from re import _parser  # the stdlib's regex parser (sre_parse)

    def text(items):
        out = []
        for op, av in items:
            op = str(op)
            if op == "LITERAL":
                out.append(chr(av))
            elif op == "ANY":
                out.append("x")
            elif op == "IN":
                out.append(one_of(av))
            elif op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, _, sub = av
                out.append(text(sub) * max(low, 0))
            elif op == "SUBPATTERN":
                out.append(text(av[-1]))
            elif op == "BRANCH":
                out.append(text(av[1][0]))
            elif op == "AT":
                continue
            else:
                raise ValueError(op)
        return "".join(out)

    def one_of(items):
        op, av = items[0]
        op = str(op)
        if op == "LITERAL":
            return chr(av)
        if op == "RANGE":
            return chr(av[0])
        if op == "CATEGORY" and str(av) in ("CATEGORY_DIGIT", "CATEGORY_WORD"):
            return "0"
        raise ValueError(op)

    try:
        example = text(_parser.parse(pattern.pattern, pattern.flags))
    except Exception:
        return None
    return example if pattern.fullmatch(example) else None


def load_config(workspace):
    """Read ``<workspace>/databuild.toml`` into a Config; ConfigError names file, key, problem."""
    path = os.path.join(os.path.abspath(workspace), CONFIG_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if not raw.strip():  # (an editor's half-saved file, as often as a mistake)
            raise ConfigError("%s: the file is empty" % path)
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError("%s: no such file (a workspace is a folder holding %s)"
                          % (path, CONFIG_FILE)) from None
    except UnicodeDecodeError as e:
        raise ConfigError("%s: not UTF-8 text (byte %d)" % (path, e.start)) from None
    except RecursionError:
        raise ConfigError("%s: nested too deeply" % path) from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError("%s: %s" % (path, e)) from None
    try:
        return _parse_config(os.path.dirname(path), data, path)
    except ConfigError as e:
        raise ConfigError("%s: %s" % (path, e.message)) from None


def _parse_job(i, job, labels, pattern_owner):
    # The i-th [[jobs]] table; ``labels``: the jobs' before it; ``pattern_owner``
    # (pattern -> label) gets its patterns.
    where = "[[jobs]] #%d" % i
    if not isinstance(job, dict):
        raise ConfigError("%s: must be a table" % where)
    if isinstance(job.get("label"), str):
        where = "[[jobs]] %r" % job["label"]
    executor = job.get("executor", "local")
    if executor not in executors:
        raise ConfigError("%s executor: must be one of %s, not %r"
                          % (where, ", ".join(map(repr, executors)), executor))
    own = {setting.key: setting for setting in executors[executor].job_settings}
    for key in job:
        if key in own:
            continue
        owners = [n for n, e in executors.items() if key in {s.key for s in e.job_settings}]
        if owners:
            raise ConfigError("%s %s: only for jobs with executor = %s" % (
                where, key, " or ".join(map(repr, owners))))
        if key not in _JOB_KEYS:
            raise ConfigError("%s %s: unknown key (known: %s)" % (
                where, key, ", ".join(_JOB_KEYS + tuple(own))))
    options = {key: setting.check(where, job[key]) for key, setting in own.items()
               if key in job}
    for key in ("label", "entrypoint", "partition_patterns"):
        if key not in job:
            raise ConfigError("%s %s: missing (required)" % (where, key))
    label = _config_value(where, "label", job["label"], "str")
    if not _LABEL_RE.fullmatch(label):
        raise ConfigError("%s label: must match [A-Za-z0-9_.-]+" % where)
    if label in labels:
        raise ConfigError("%s label: duplicate label %r" % (where, label))
    entrypoint = _argv(where, "entrypoint", job["entrypoint"])
    patterns = _config_value(where, "partition_patterns", job["partition_patterns"], "str_list")
    if not patterns:
        raise ConfigError("%s partition_patterns: must not be empty" % where)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError("%s partition_patterns: bad regex %r: %s"
                              % (where, pattern, e)) from None
        if pattern_owner.get(pattern, label) != label:
            raise ConfigError("%s partition_patterns: %r is also a pattern of job %r, and "
                              "a ref is produced by one job only"
                              % (where, pattern, pattern_owner[pattern]))
        pattern_owner[pattern] = label
    environment = job.get("environment", {})
    if not isinstance(environment, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in environment.items()):
        raise ConfigError("%s environment: must be a table of strings" % where)
    limits = {key: setting.check(where, job[key]) if key in job else setting.default
              for key, setting in SETTINGS_OF["jobs"].items() if setting.kind != "any"}
    parsed = JobConfig(label, entrypoint, patterns, environment, executor=executor,
                       options=options, deps=_parse_deps(where, job.get("deps", []), patterns),
                       **limits)
    try:
        executors[executor].check_job(parsed)
    except ConfigError as e:
        raise ConfigError("%s entrypoint: %s" % (where, e.message)) from None
    return parsed


def _parse_config(root, data, path):
    unknown = set(data) - {"server", "jobs", "schedules", "sensors", "alerts", "executors"}
    if unknown:
        raise ConfigError("unknown top-level key %r (expected [server], [[jobs]], "
                          "[[schedules]], [[sensors]], [[alerts]] and [executors.*])"
                          % sorted(unknown)[0])
    executor_tables = _parse_executors(data.get("executors", {}))
    server = data.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError("server: must be a table")
    for key, value in server.items():
        if key not in _SERVER_KEYS:
            raise ConfigError("[server] %s: unknown key (known: %s)"
                              % (key, ", ".join(_SERVER_KEYS)))
        SETTINGS_OF["server"][key].check("[server]", value)
    jobs_data = data.get("jobs", [])
    if not isinstance(jobs_data, list):
        raise ConfigError("jobs: must be an array of tables ([[jobs]])")
    jobs = []
    pattern_owner = {}  # pattern -> label: one job per ref, so no pattern twice
    for i, job in enumerate(jobs_data):
        jobs.append(_parse_job(i + 1, job, {j.label for j in jobs}, pattern_owner))
    config = Config(root, jobs, path=path, **server)
    config.executor_settings = executor_tables
    for job in jobs:
        _check_deps_built(job, config)
    schedules_data = data.get("schedules", [])
    if not isinstance(schedules_data, list):
        raise ConfigError("schedules: must be an array of tables ([[schedules]])")
    for i, entry in enumerate(schedules_data):
        schedule = _parse_schedule(i + 1, entry, config)
        if schedule.name in config.schedules_by_name:
            raise ConfigError("[[schedules]] %r name: duplicate name" % schedule.name)
        config.schedules.append(schedule)
        config.schedules_by_name[schedule.name] = schedule
    for table, parse, entries, by_name in (
            ("sensors", _parse_sensor, config.sensors, config.sensors_by_name),
            ("alerts", _parse_alert, config.alerts, config.alerts_by_name)):
        items = data.get(table, [])
        if not isinstance(items, list):
            raise ConfigError("%s: must be an array of tables ([[%s]])" % (table, table))
        for i, entry in enumerate(items):
            item = parse(i + 1, entry)
            if item.name in by_name:
                raise ConfigError("[[%s]] %r name: duplicate name" % (table, item.name))
            by_name[item.name] = item
            entries.append(item)
    return config


###############################################################################
# Executors: where job runs execute ###########################################
###############################################################################

def job_run_log_path(state_dir, job_run_id, stream):
    """``.databuild/logs/<job_run_id>/<stream>.log`` -- built from a known run id only."""
    if stream not in ("stdout", "stderr"):
        raise NotFound("No such log stream", stream=stream)
    return os.path.join(state_dir, "logs", job_run_id, stream + ".log")


# Python ignores these; a job starts with the default action, as Popen does.
_RESET_SIGNALS = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ")
                       if hasattr(signal, name))


def _process_start_time(pid):
    """The kernel's start time of ``pid`` (clock ticks since boot), or None.

    Recorded with each job run so that after a crash a surviving job process
    is recognised by (pid, start time), never by a reused pid alone.
    """
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_START_TIME_SLACK = _CLOCK_TICKS  # one second


def _spawn_ticks():
    """The boot clock in the ticks of ``_process_start_time``, or None.

    Read just before a spawn, it is the start time the kernel will give the
    child, up to the time the spawn takes: no /proc read per job run (which
    waits for the new process's exec to finish).
    """
    try:
        return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLOCK_TICKS)
    except (AttributeError, OSError):
        return None


def _is_same_process(pid, start_ticks):
    """True if ``pid`` is still the process spawned at ``start_ticks``."""
    actual = _process_start_time(pid)
    return actual is not None and 0 <= actual - start_ticks <= _START_TIME_SLACK


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper():
    """Make this process the reaper of its orphaned descendants (Linux).

    A process that a job started and that left the job's process group
    (``setsid``) becomes this process's child once its parent exits, so the
    orchestrator can find and stop it (``Orchestrator.adopt_orphans``).
    Returns False where the kernel does not offer it.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _orphans_adopted():
    """The pids of the main thread's children, or [] where unknown.

    A subreaper adopts orphans in its main thread (the kernel's
    ``find_new_reaper`` takes the first live thread of the group); the job
    processes themselves are the orchestrator thread's children.  One small
    file read, not one per thread.
    """
    try:
        with open("/proc/self/task/%d/children" % os.getpid()) as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


class _OrphanSweeper:
    """What a finished run left behind, stopped (where this process is its
    jobs' subreaper, as ``serve`` is: ``become_subreaper``).

    A run's end kills its process group (``Executor.ended``); what left the
    group (setsid) becomes our child once its parent exits.  Every child of
    the main thread that is not a process of a running run is such an
    orphan: stopped unless its run (by its environment) still goes on, and
    reaped.  The orchestrator thread's only; one per server, whatever its
    executors.
    """

    def __init__(self):
        self.stopped = set()  # pids killed and not reaped yet: said once

    def sweep(self, running):
        """One sweep; True if it found an orphan (sweep again soon: its own
        children become ours when it dies)."""
        known = {h.pid for h in running.values() if h.pid is not None}
        own_group = os.getpgrp()
        found = False
        for pid in _orphans_adopted():
            if pid in known:
                continue
            run_id, zombie = _job_run_of(pid)
            if run_id in running:
                continue  # its run goes on: stopped when that run ends
            found = True
            if not zombie and pid not in self.stopped:
                logger.info("Stopping pid %d, left behind by job run %s", pid, run_id or "?")
                self.stopped.add(pid)
                try:
                    pgid = os.getpgid(pid)
                    if pgid != own_group:
                        _signal_group(pgid, signal.SIGKILL)
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    self.stopped.discard(pid)
            except ChildProcessError:
                self.stopped.discard(pid)
        return found


def _job_run_of(pid):
    """``(job run id or None, is a zombie)`` of a process, from its environment."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return None, True
        with open("/proc/%d/environ" % pid, "rb") as f:
            environ = f.read()
    except (OSError, IndexError):
        return None, False
    for item in environ.split(b"\0"):
        if item.startswith(b"DATABUILD_JOB_RUN_ID="):
            return item[len(b"DATABUILD_JOB_RUN_ID="):].decode("ascii", "replace"), False
    return None, False


class _Wakeup:
    """How the orchestrator thread sleeps: one ``poll()`` on a self-pipe and on
    the descriptors its executors watch (the pidfds of local job processes).

    ``set()`` (any thread) wakes it; a watched descriptor that becomes
    readable wakes it and runs its callback in the sleeping thread, without
    any other thread in between.  The pipe is written once per sleep, not
    once per command.
    """

    def __init__(self):
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._poller = select.poll()
        self._poller.register(self._r, select.POLLIN)
        self._callbacks = {}  # watched fd -> called when it is readable
        self._armed = False  # True: a byte is (being) written, no need for another
        # Closed with the object, never while another thread could still write.
        weakref.finalize(self, _close_fds, self._r, self._w)

    def set(self):
        """Wake the sleeper (or make its next ``wait`` return at once)."""
        if not self._armed:
            self._armed = True
            try:
                os.write(self._w, b"x")
            except (BlockingIOError, OSError):
                pass  # full (a wake-up is pending anyway) or closed

    def watch(self, fd, callback):
        """Also wake when ``fd`` becomes readable, and then call ``callback()``."""
        self._callbacks[fd] = callback
        self._poller.register(fd, select.POLLIN)

    def unwatch(self, fd):
        """Stop watching ``fd``."""
        if self._callbacks.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def wait(self, seconds):
        """Sleep up to ``seconds``, then run the callbacks of the readable fds.

        Whatever was put in the inbox before this returns is seen by the
        step that follows: the flag is cleared only after the pipe is drained
        (which comes after the callbacks, which may ``set()`` too).
        """
        events = self._poller.poll(max(0, int(seconds * 1000 + 0.999)))
        for fd, _ in events:
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback()
        if events:
            try:
                os.read(self._r, 4096)
            except BlockingIOError:
                pass
        self._armed = False


def _close_fds(*fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class JobRunHandle:
    """A started job run as its executor tracks it (README "Running on a cluster").

    Owned by the orchestrator thread, except ``returncode`` and ``error``,
    which an executor's own thread may set just before it reports the end
    through the executor's ``on_exit``, and -- for a run whose start the
    executor learns later (``started`` False when ``start`` returns it) --
    ``pid``, ``start_time`` and ``external_id``, set before it reports the
    start through ``on_start``.  Both callbacks are thread-safe wake-ups.
    ``error`` is an outcome the executor knows without the job's exit code
    (``lost by slurm``); otherwise the outcome is read from the log files as
    for every run.
    """

    def __init__(self, executor, job_run_id, log_dir, deadline, pid=None, start_time=None,
                 external_id=None):
        self.executor = executor
        self.job_run_id = job_run_id
        self.pid = pid  # the local process (group), if the run has one here
        self.start_time = start_time  # see _spawn_ticks
        self.external_id = external_id  # the engine's id of the run (a Slurm job id)
        self.popen = None  # set where the process was spawned by subprocess
        self.stdout_path = os.path.join(log_dir, "stdout.log")
        self.stderr_path = os.path.join(log_dir, "stderr.log")
        self.deadline = deadline
        self.stop_reason = None
        self.kill_at = None
        self.returncode = None
        self.error = None
        self.abandoned = False  # its start was never committed: not a run's process
        self.started = True  # False until the executor reports the start (on_start)
        self._outcome = None  # what outcome() read (by the outcome reader, for a long log)

    def start_fields(self):
        """What the run's start event records of where it runs, for a server
        that restarts: its process (pid and start time) or its id in the
        engine that runs it."""
        fields = {}
        if self.pid is not None:
            fields["pid"], fields["pid_start_time"] = self.pid, self.start_time
        if self.external_id is not None:
            fields["external_id"] = self.external_id
        return fields

    def stop(self, reason, now, grace):
        """Ask the run to stop now (SIGTERM), and force it at ``now + grace``."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.kill_at = now + grace
            self.executor.signal(self, signal.SIGTERM)

    def kill(self):
        """Force the run to stop (SIGKILL)."""
        self.executor.signal(self, signal.SIGKILL)

    def outcome(self):
        """Read the run's stdout for its protocol lines: ``(missing_deps or None,
        read_deps, problem)`` -- the deps it reported missing, the deps it said
        it read (README "Lineage"), and what was wrong with a line, if anything.
        Read once: a later call answers what the first read."""
        if self._outcome is None:
            self._outcome = self._read_outcome()
        return self._outcome

    def _read_outcome(self):
        found = {MISSING_DEPS_MARKER: None, READ_DEPS_MARKER: None}
        keys = {MISSING_DEPS_MARKER: "missing_deps", READ_DEPS_MARKER: "read_deps"}
        problem = None
        try:
            if os.stat(self.stdout_path).st_size == 0:  # a silent job: nothing to read
                return None, [], None
            with open(self.stdout_path, "rb") as f:
                for raw in f:
                    if not raw.startswith(b"DATABUILD_"):
                        continue
                    for marker in found:
                        if raw.startswith(marker.encode()):
                            break
                    else:
                        continue
                    text = raw[len(marker):].decode("utf-8", "replace")
                    try:
                        deps = json.loads(text)[keys[marker]]
                        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
                            raise ValueError
                    except (ValueError, KeyError, TypeError):
                        problem = "unreadable %s line: %s" % (marker, text.strip()[:200])
                        continue
                    seen = found[marker] or []
                    found[marker] = seen + [d for d in deps if d not in seen]
        except FileNotFoundError:
            return None, [], None  # never written (a Slurm job that never ran)
        except OSError as e:
            problem = "cannot read stdout log: %s" % e
        return found[MISSING_DEPS_MARKER], found[READ_DEPS_MARKER] or [], problem

    def stderr_tail(self, lines=10):
        """The last lines the job wrote to stderr."""
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                tail = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return []
        return [line for line in tail if line.strip()][-lines:]


class Executor:
    """Where job runs execute: one subclass per kind, named in ``executors``
    (README "Writing an executor"), the way bottle names its server adapters.

    The contract.  The orchestrator speaks to job runs only through these
    methods, all called in its own thread, and none of them may block it --
    no waiting on a process, a socket or a command; anything slow goes to a
    thread of the executor's (``_Workers``) and comes back as a report:

    * ``start(run, job, now)`` -> a ``JobRunHandle``, or None for "not now"
      (the executor wakes the orchestrator when it can take runs again), or
      raises ExecutorError (the run fails with the message as its error).
      A handle with ``started`` True is recorded Running at once; one with
      ``started`` False is recorded when the executor calls
      ``on_start(handle)`` (its ``external_id`` or pid set first), or fails
      when it calls ``on_exit(handle)`` with ``handle.error`` set.
    * ``signal(handle, sig)``: SIGTERM asks the run to stop, SIGKILL forces
      it; the run's end is then reported as any other.  A handle not yet
      started keeps the signal until it is.
    * ``ended(handle)``: the orchestrator is about to record the run's end
      (clean up what it left: its process group).
    * ``recover(runs, now)``: at start, the runs of this executor that a
      previous server left Queued or Running; returns the handles of those
      it takes back (``keeps_runs``: they outlive servers), stops what is left
      of the others, which then fail "server restarted".
    * ``maintain(now, ended, running)``: once per step; returns when the
      next step is needed for it (its idle timers), or inf.
    * ``close()``: at shutdown, after the runs were stopped (or kept).

    Reports, from any thread: ``on_exit(handle)`` once per handle, when the
    run has ended (``returncode``, or ``error`` for an end the executor knows
    without the job's exit code, such as ``lost by slurm``); ``on_start``
    as above; ``wakeup.set()`` to ask for a step.  The outcome (dep miss,
    read deps) is read from the run's stdout log by the orchestrator, or by
    its outcome reader for a long log.  Who owns what: the handle is the
    orchestrator's, but for the fields ``JobRunHandle`` says an executor's
    thread may set before it reports; an executor's own state is its
    threads', each field behind a lock named where it is made.

    What every kind shares lives here: the run's argv, environment and log
    files (README "Job protocol"), prepared once per job.  A subclass sets
    ``name``, the keys it reads from its ``[executors.<name>]`` table and
    from its jobs (``settings`` and ``job_settings``: key -> (kind, minimum),
    as ``_config_value`` checks them; a job's are in ``JobConfig.options``)
    and its default ``max_concurrent_job_runs``.
    """

    name = None
    settings = ()  # Setting()s of [executors.<name>] (max_concurrent_job_runs: every one's)
    job_settings = ()  # Setting()s of its jobs' own keys (their values: JobConfig.options)
    #: Runs at once when ``[executors.<name>] max_concurrent_job_runs`` is not
    #: set; None: ``[server] max_concurrent_job_runs``.
    default_limit = None
    #: True: a graceful stop leaves its runs running (re-adopted at the next
    #: start) instead of canceling them.
    keeps_runs = False

    def __init__(self, config, on_exit, wakeup, on_start=None):
        self.config = config
        self.on_exit = on_exit
        self.on_start = on_start
        self.wakeup = wakeup
        self.url = None
        self.token = None
        self.clock = time.time  # the orchestrator's: deadlines are on it
        self._templates = {}  # job label -> (executable, env as a bytes dict)
        self._logs_dir = os.path.join(config.state_dir, "logs")
        os.makedirs(self._logs_dir, exist_ok=True)

    @classmethod
    def all_settings(cls):
        """``{key: Setting}`` of its ``[executors.<name>]`` table."""
        found = {"max_concurrent_job_runs": Setting(
            "executors." + cls.name, "max_concurrent_job_runs", "int", cls.default_limit, 1,
            help="its runs at once (default: [server] max_concurrent_job_runs)")}
        found.update((s.key, s) for s in cls.settings)
        return found

    def setting(self, key):
        """The value of ``key`` in its ``[executors.<name>]`` table, or its default."""
        return self.config.executor_settings.get(self.name, {}).get(
            key, self.all_settings()[key].default)

    @property
    def limit(self):
        """How many of this executor's runs may be Running at once."""
        table = self.config.executor_settings.get(self.name, {})
        if "max_concurrent_job_runs" in table:
            return table["max_concurrent_job_runs"]
        if self.default_limit is not None:
            return self.default_limit
        return self.config.max_concurrent_job_runs

    def use_config(self, config):
        """Runs started from now on follow ``config`` (running runs keep theirs)."""
        self.config = config
        self._templates.clear()

    def _template(self, job):
        template = self._templates.get(job.label)
        if template is None:
            env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
            env.update({os.fsencode(k): os.fsencode(v) for k, v in job.environment.items()})
            env[b"DATABUILD_JOB_LABEL"] = os.fsencode(job.label)
            env[b"DATABUILD_WORKSPACE"] = os.fsencode(self.config.root)
            env[b"DATABUILD_EXECUTOR"] = self.name.encode()
            program = job.entrypoint[0]
            if os.sep not in program:  # look PATH up once, not at every spawn
                program = shutil.which(program, path=os.environ.get("PATH")) or program
            else:
                program = os.path.join(self.config.root, program)
            template = (program, env)
            self._templates[job.label] = template
        return template

    def prepare(self, run, job):
        """``(program, argv, env, log_dir)`` of a run (README "Job protocol");
        makes its log folder."""
        program, base_env = self._template(job)
        env = dict(base_env)
        env[b"DATABUILD_JOB_RUN_ID"] = run.job_run_id.encode()
        env[b"DATABUILD_URL"] = os.fsencode(self.url or "")
        env[b"DATABUILD_TOKEN"] = os.fsencode(self.token or "")
        env[b"DATABUILD_PARTITIONS"] = os.fsencode(" ".join(run.partitions))
        log_dir = os.path.join(self._logs_dir, run.job_run_id)
        os.mkdir(log_dir)
        return program, job.entrypoint + list(run.partitions), env, log_dir

    def log_dir(self, job_run_id):
        """The folder of a run's log files."""
        return os.path.join(self._logs_dir, job_run_id)

    def start(self, run, job, now):
        """Start ``run`` of ``job``; returns its JobRunHandle, or None for "not
        now" (the run stays queued; the executor wakes the orchestrator when
        it can start runs again).  Raises ExecutorError (or OSError, from a
        spawn) if the run could not start: it then fails."""
        raise NotImplementedError

    @classmethod
    def check_job(cls, job):
        """Raise ConfigError if ``job`` (a JobConfig) cannot run here."""

    def signal(self, handle, sig):
        """Send ``sig`` (SIGTERM: stop; SIGKILL: force) to a started run."""
        raise NotImplementedError

    def ended(self, handle):
        """Called once the run's outcome is about to be recorded."""

    def recover(self, runs, now):
        """Runs a previous server left Queued or Running: returns the handles
        of those this executor takes back (their ends are reported as any
        other); the orchestrator fails the rest with ``server restarted``."""
        return []

    def maintain(self, now, ended, running):
        """Once per step, in the orchestrator thread (``ended``: some run ended
        in it; ``running``: job run id -> handle).  Returns the time the next
        step is needed for it (the orchestrator sleeps no longer), or inf."""
        return float("inf")

    def close(self):
        """Let go of everything (at shutdown, after the runs were stopped)."""


class LocalExecutor(Executor):
    """A process per run on the server's machine (README "Job protocol").

    Each process's pidfd is watched by the orchestrator's ``_Wakeup``; its
    exit is waited in the orchestrator thread.  Where pidfds are missing a
    waiter thread per process waits it.  When a run ends its process group
    is killed, and where this process is its jobs' subreaper (``serve``)
    what left the group is found and stopped too (``maintain``).
    """

    name = "local"

    def __init__(self, config, on_exit, wakeup, on_start=None):
        super().__init__(config, on_exit, wakeup, on_start)
        self._use_pidfd = hasattr(os, "pidfd_open")
        # posix_spawn cannot change directory: used where this process already
        # runs in the workspace root (``serve`` moves there), Popen elsewhere.
        self._posix_spawn = (hasattr(os, "POSIX_SPAWN_OPEN")
                             and os.getcwd() == os.path.realpath(config.root))
        self._pidfds = {}  # pidfd -> handle, watched by the wakeup (orchestrator thread only)

    def start(self, run, job, now):
        program, argv, env, log_dir = self.prepare(run, job)
        return self.spawn(run.job_run_id, program, argv, env, log_dir,
                          now + job.timeout_seconds if job.timeout_seconds else None)

    def spawn(self, job_run_id, program, argv, env, log_dir, deadline):
        """A process in a new session, logs to ``log_dir``; returns its handle."""
        stdout_path = os.path.join(log_dir, "stdout.log")
        stderr_path = os.path.join(log_dir, "stderr.log")
        popen = None
        start_ticks = _spawn_ticks()
        if self._posix_spawn:
            # One C call that holds the GIL throughout; the child opens its
            # own log files.  Every descriptor this process opens is
            # close-on-exec (PEP 446, SQLite's O_CLOEXEC), so none leaks.
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            try:
                pid = os.posix_spawn(program, argv, env, file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, stdout_path, flags, 0o644),
                    (os.POSIX_SPAWN_OPEN, 2, stderr_path, flags, 0o644)],
                    setsid=True, setsigdef=_RESET_SIGNALS)
            except OSError as e:
                raise OSError(e.errno, e.strerror, program) from None
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            out = os.open(stdout_path, flags, 0o644)
            try:
                err = os.open(stderr_path, flags, 0o644)
                try:
                    popen = subprocess.Popen(
                        argv, executable=program, cwd=self.config.root, env=env,
                        stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                        start_new_session=True)
                finally:
                    os.close(err)
            finally:
                os.close(out)
            pid = popen.pid
        handle = JobRunHandle(self, job_run_id, log_dir, deadline, pid=pid,
                              start_time=start_ticks)
        handle.popen = popen
        self.watch(handle)
        return handle

    def watch(self, handle):
        """Report the exit of ``handle``'s process (a child of this one)."""
        if self._use_pidfd:
            try:
                fd = os.pidfd_open(handle.pid)
            except OSError:
                self._use_pidfd = False
            else:
                self._pidfds[fd] = handle
                self.wakeup.watch(fd, functools.partial(self._collect_exit, fd))
                return
        threading.Thread(target=self._wait_thread, args=(handle,),
                         name="databuild-job-%d" % handle.pid, daemon=True).start()

    def _wait(self, handle):
        if handle.popen is not None:
            handle.returncode = handle.popen.wait()
        else:
            handle.returncode = os.waitstatus_to_exitcode(os.waitpid(handle.pid, 0)[1])
        return handle

    def _wait_thread(self, handle):
        self.on_exit(self._wait(handle))  # a waiter thread (no pidfds)

    def _collect_exit(self, fd):
        # In the orchestrator thread, from its _Wakeup: the process has
        # exited, so the wait does not block.
        handle = self._pidfds.pop(fd, None)
        self.wakeup.unwatch(fd)
        os.close(fd)
        if handle is not None:
            self.on_exit(self._wait(handle))

    def signal(self, handle, sig):
        _signal_group(handle.pid, sig)

    def ended(self, handle):
        _signal_group(handle.pid, signal.SIGKILL)  # whatever the job left in its group

    def recover(self, runs, now):
        # README "Lifecycle": a job process that outlived the previous server is
        # recognised by (pid, start time) and stopped before its run fails,
        # so that two processes never build one partition at once.
        for pid, run_id in self._left_behind(runs).items():
            logger.warning("Stopping job run %s (pid %d) left by a previous server", run_id, pid)
            _stop_orphan(pid)
        return []

    def _left_behind(self, runs):
        # {pid: job run id} of the runs' processes still alive: by the pid and
        # start time of their start events; a process spawned just before a
        # crash may have no committed start event, but it carries its run id
        # in its environment.
        found = {run.pid: run.job_run_id for run in runs
                 if run.pid and run.pid_start_time is not None
                 and _is_same_process(run.pid, run.pid_start_time)}
        found.update(_processes_of_runs({run.job_run_id for run in runs}))
        return found

    def close(self):
        for fd in list(self._pidfds):
            self.wakeup.unwatch(fd)
            os.close(fd)
        self._pidfds.clear()


class SlurmExecutor(Executor):
    """Each run is a Slurm batch job (README "Running on a cluster").

    ``sbatch`` gets a small script in the run's log folder that runs the
    job's argv in the workspace with the run's environment and writes the
    exit code beside the logs (so no Slurm accounting is needed); the job's
    output files are the run's two logs, on the filesystem the nodes share.
    ``sbatch`` and ``scancel`` run on worker threads (``databuild-sbatch-N``):
    ``start`` returns at once, and the run's start (its Slurm job id) is
    reported through ``on_start`` once ``sbatch`` answered.  One thread
    (``databuild-slurm``) watches every run: it looks for the exit code files
    and asks ``squeue`` about all the runs in one call, often after a change
    and less and less often while nothing changes.  A run
    whose Slurm job is gone without an exit code fails ``lost by slurm``.
    Runs outlive the server: a graceful stop leaves them, a start re-adopts
    them by the Slurm job ids in the log (and cancels Slurm jobs whose start
    never reached the log, found by their name ``databuild-<job run id>``).
    """

    name = "slurm"
    settings = (Setting("executors.slurm", "sbatch_options", "str_list", [],
                        help="sbatch options for every run, before the job's own"),
                Setting("executors.slurm", "poll_max_seconds", "num", 2.0, 0.05,
                        help="the longest wait between two squeue calls"))
    job_settings = (Setting("jobs", "sbatch_options", "str_list", [],
                            help="sbatch options of this job's runs (slurm jobs only)"),)
    default_limit = 200
    keeps_runs = True
    #: squeue states after which a job runs no more.
    FINISHED = frozenset(("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED",
                          "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
                          "TIMEOUT"))
    POLL_MIN_SECONDS = 0.05
    #: A job squeue does not know and that wrote no exit code is lost only
    #: after this long (the exit code file may be late on a shared filesystem).
    LOST_AFTER_SECONDS = 5.0

    #: Calls of sbatch and scancel at once (a slow slurmctld delays each).
    WORKERS = 4

    def __init__(self, config, on_exit, wakeup, on_start=None):
        super().__init__(config, on_exit, wakeup, on_start)
        self._workers = _Workers("databuild-sbatch", self.WORKERS)
        self._cv = threading.Condition()  # guards _tracked, _timeouts, _changed, _began
        # and, on handles not yet submitted, external_id and pending_signal
        self._began = []  # handles the poller saw RUNNING, for maintain to time out
        self._tracked = {}  # Slurm job id -> handle: the runs the poller watches
        self._changed = False  # a run was added: poll soon
        self._closing = False
        self._thread = None
        self._unknown_since = {}  # Slurm job id -> first poll that did not find it
        self._timeouts = {}  # Slurm job id -> its job's timeout_seconds, until it runs
        #: Where the poller last found trouble (an squeue that failed), or None.
        self.problem = None

    def _command(self, argv, env=None, timeout=60):
        try:
            done = subprocess.run(argv, env=env, cwd=self.config.root, capture_output=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ExecutorError("%s did not answer in %d s" % (argv[0], timeout)) from None
        except OSError as e:
            raise ExecutorError("cannot run %s: %s" % (argv[0], e.strerror)) from None
        return done.returncode, done.stdout.decode("utf-8", "replace"), \
            done.stderr.decode("utf-8", "replace").strip()

    def start(self, run, job, now):
        program, argv, env, log_dir = self.prepare(run, job)
        exit_path = os.path.join(log_dir, "exit_code")
        script = os.path.join(log_dir, "slurm.sh")
        with open(script, "w") as f:
            f.write("#!/bin/sh\n# databuild job run %s (slurm executor)\ncd %s || exit 1\n"
                    "%s </dev/null\ncode=$?\n"
                    "printf '%%s\\n' \"$code\" > %s.part && mv %s.part %s\nexit $code\n" % (
                        run.job_run_id, shlex.quote(self.config.root),
                        " ".join(shlex.quote(os.fsdecode(a)) for a in [program] + argv[1:]),
                        shlex.quote(exit_path), shlex.quote(exit_path),
                        shlex.quote(exit_path)))
        options = list(self.setting("sbatch_options"))
        options += job.options.get("sbatch_options", [])
        argv = ["sbatch", "--parsable", "--job-name=databuild-%s" % run.job_run_id,
                "--chdir=%s" % self.config.root, "--export=ALL",
                "--output=%s" % os.path.join(log_dir, "stdout.log"),
                "--error=%s" % os.path.join(log_dir, "stderr.log")] + options + [script]
        # The timeout counts from when Slurm runs the job, not while it waits
        # in the queue: the poller notes when it runs (see _poll, maintain).
        handle = JobRunHandle(self, run.job_run_id, log_dir, None)
        handle.started = False  # once sbatch answered: _submit reports it
        handle.pending_signal = None  # a signal asked for before the job id was known
        self._workers.submit(self._submit, handle, argv, env, job.timeout_seconds)
        return handle

    def _submit(self, handle, argv, env, timeout):
        # On a worker thread: sbatch, then the start or the failure reported.
        with self._cv:
            canceled = handle.pending_signal is not None
        if canceled:  # stopped while it waited for a worker: never submitted
            self.on_exit(handle)
            return
        try:
            code, out, err = self._command(argv, env=env)
            if code != 0:
                raise ExecutorError("cannot start job: sbatch failed: %s"
                                    % (err.splitlines() or ["exit %d" % code])[-1])
            slurm_id = out.strip().split(";")[0]
            if not slurm_id.isdigit():
                raise ExecutorError("sbatch answered %r, not a job id" % out.strip()[:200])
        except ExecutorError as e:
            handle.error = e.message
            self.on_exit(handle)
            return
        with self._cv:
            handle.external_id = slurm_id
            sig, handle.pending_signal = handle.pending_signal, None
        self._track(handle, timeout)
        self.on_start(handle)
        if sig is not None:  # stopped while sbatch ran
            self._scancel(handle, sig)

    def _track(self, handle, timeout):
        with self._cv:
            self._tracked[handle.external_id] = handle
            if timeout:
                self._timeouts[handle.external_id] = timeout
            self._changed = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._poll_loop, name="databuild-slurm",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()

    def signal(self, handle, sig):
        with self._cv:
            if handle.external_id is None:  # not submitted yet: scancel'd once it is
                if handle.pending_signal != signal.SIGKILL:
                    handle.pending_signal = sig
                return
        self._workers.submit(self._scancel, handle, sig)

    def _scancel(self, handle, sig):
        # On a worker thread.
        argv = ["scancel", handle.external_id]
        if sig == signal.SIGKILL:
            argv[1:1] = ["--signal=KILL", "--full"]
        try:
            code, _, err = self._command(argv, timeout=30)
        except ExecutorError as e:
            code, err = 1, e.message
        if code != 0:
            logger.warning("scancel of Slurm job %s (job run %s) failed: %s",
                           handle.external_id, handle.job_run_id, err)

    def recover(self, runs, now):
        adopted = []
        unstarted = []
        for run in runs:
            if run.executor == self.name and run.external_id:
                job = self.config.jobs_by_label.get(run.job_label)
                handle = JobRunHandle(self, run.job_run_id, self.log_dir(run.job_run_id), None,
                                      external_id=run.external_id)
                logger.info("Job run %s: Slurm job %s re-adopted", run.job_run_id,
                            run.external_id)
                # Its timeout counts again from now on (the server did not see
                # it run before).
                self._track(handle, job.timeout_seconds if job is not None else 0)
                adopted.append(handle)
            elif run.status == QUEUED:
                unstarted.append(run.job_run_id)
        if unstarted:
            # A run submitted just before the previous server died has a Slurm
            # job but no start in the log: found by name and canceled (the run
            # fails "server restarted" and is retried as any other).
            try:
                code, out, _ = self._command(
                    ["squeue", "-h", "-o", "%i|%j", "-n",
                     ",".join("databuild-%s" % r for r in unstarted)])
            except ExecutorError:
                code, out = 1, ""
            for line in out.splitlines() if code == 0 else ():
                slurm_id, _, name = line.partition("|")
                logger.warning("Canceling Slurm job %s (%s): its start never reached the log",
                               slurm_id, name)
                self.signal(JobRunHandle(self, name[len("databuild-"):], self._logs_dir, None,
                                         external_id=slurm_id), signal.SIGTERM)
        return adopted

    def maintain(self, now, ended, running):
        # The runs the poller saw start running: their timeouts count from now.
        with self._cv:
            began, self._began = self._began, []
        for handle, timeout in began:
            handle.deadline = self.clock() + timeout
        return float("inf")

    def close(self):
        self._workers.close(60)  # queued submissions and cancels finish first
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(10)

    # -- the poller thread -----------------------------------------------------

    def _poll_loop(self):
        interval = self.POLL_MIN_SECONDS
        while True:
            with self._cv:
                if not self._changed and not self._closing:
                    self._cv.wait(interval if self._tracked else None)
                if self._closing:
                    return
                if self._changed:
                    interval = self.POLL_MIN_SECONDS
                self._changed = False
                tracked = dict(self._tracked)
            if not tracked:
                continue
            try:
                finished = self._poll(tracked)
            except Exception:
                logger.exception("Slurm poll failed")
                finished = []
            with self._cv:
                for handle in finished:
                    self._tracked.pop(handle.external_id, None)
            for handle in finished:
                self.on_exit(handle)
            # Back off while nothing changes, up to poll_max_seconds.
            longest = self.setting("poll_max_seconds")
            interval = self.POLL_MIN_SECONDS if finished else min(interval * 2, longest)

    def _poll(self, tracked):
        # One squeue call for every run; the exit code files say how they ended.
        code, out, err = self._command(
            ["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", ",".join(tracked)], timeout=30)
        states = {}
        if code == 0:
            if self.problem:
                logger.info("squeue answers again")
            self.problem = None
            for line in out.splitlines():
                slurm_id, _, state = line.partition("|")
                states[slurm_id] = state.strip().split(" ")[0]
        elif "Invalid job id" not in err:  # (said when none of the ids is known)
            if self.problem is None:  # once, not at every poll
                logger.warning("squeue failed (retrying): %s", err[-300:])
            self.problem = "squeue failed: %s" % err[-300:]
            return []
        now = time.monotonic()
        finished = []
        for slurm_id, handle in tracked.items():
            state = states.get(slurm_id)
            returncode = self._exit_code(handle)
            if returncode is not None:
                handle.returncode = returncode
            elif state in self.FINISHED:
                if handle.stop_reason is None:
                    handle.error = "Slurm job %s ended %s without an exit code" % (
                        slurm_id, state)
            elif state is None:
                first = self._unknown_since.setdefault(slurm_id, now)
                if now - first < self.LOST_AFTER_SECONDS:
                    continue
                handle.error = "lost by slurm"
            else:
                self._unknown_since.pop(slurm_id, None)
                if state == "RUNNING":
                    with self._cv:
                        timeout = self._timeouts.pop(slurm_id, None)
                        if timeout:  # the orchestrator thread sets the deadline (maintain)
                            self._began.append((handle, timeout))
                    if timeout:
                        self.wakeup.set()
                continue
            self._unknown_since.pop(slurm_id, None)
            with self._cv:
                self._timeouts.pop(slurm_id, None)
            finished.append(handle)
        return finished

    @staticmethod
    def _exit_code(handle):
        try:
            with open(os.path.join(os.path.dirname(handle.stdout_path), "exit_code")) as f:
                code = int(f.read().strip())
        except (OSError, ValueError):
            return None
        # The shell says 128+n for a job killed by signal n; local runs say -n.
        return 128 - code if 128 < code <= 128 + 64 else code


# The warm interpreter of the python executor: run by the job's own
# interpreter (so only the standard library, and no databuild), with the
# channel's fd, the workspace and the entrypoint's target as arguments.  It
# runs only the target's top-level import statements (found with ast), says
# which workspace files it imported, then forks a child per request; the
# child runs the whole target as __main__, as ``python script.py`` would
# (README "Warm Python jobs").
_WARM_PYTHON = r'''
import ast, atexit, importlib, importlib.util, io, json, os, runpy, select, signal, socket
import sys, traceback

def import_ahead(path, package=None):
    # Only the module-level ``import`` statements: what the script does
    # besides runs in each run, where it would run in a cold start.
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), path)
    body = [node for node in tree.body if isinstance(node, ast.Import) or (
        isinstance(node, ast.ImportFrom) and node.module != "__future__"
        and (node.level == 0 or package))]
    if body:
        exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"),
             {"__name__": "__databuild_imports__", "__package__": package})

def main():
    chan = socket.socket(fileno=int(sys.argv[1]))
    root, target = sys.argv[2], sys.argv[3:]
    def say(**message):
        try:
            chan.sendall((json.dumps(message) + "\n").encode())
        except OSError:
            pass  # the server is gone: its runs are waited all the same
    os.chdir(root)
    code = None
    if target[0] == "-m":
        module, script = target[1], None
        sys.path.insert(0, root)
    else:
        module, script = None, os.path.join(root, target[0])
        sys.path.insert(0, os.path.dirname(script))
    try:
        if module:
            spec = importlib.util.find_spec(module)  # (imports its parent packages)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                raise ImportError("No module named %r" % module)
            source = spec.origin
            import_ahead(source, spec.parent)
        else:
            source = script
            with open(script, "rb") as f:  # compiled once, run as __main__ per fork
                code = compile(f.read(), script, "exec")
            import_ahead(script)
    except BaseException as e:
        say(import_error="%s: %s" % (type(e).__name__, e), traceback=traceback.format_exc())
        return
    files = [[source, os.stat(source).st_mtime_ns, os.stat(source).st_size]]
    for m in list(sys.modules.values()):
        path = getattr(m, "__file__", None)
        if path and os.path.abspath(path).startswith(root + os.sep):
            try:
                st = os.stat(path)
                files.append([os.path.abspath(path), st.st_mtime_ns, st.st_size])
            except OSError:
                pass
    say(ready=True, files=files)
    # One line per fork, appended (a file per run would cost an inode each).
    pids = os.open(os.path.join(root, ".databuild", "python", "%d.pids" % os.getpid()),
                   os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    signal.set_wakeup_fd(wake_w)
    children, buffered, quitting = {}, b"", False
    while not (quitting and not children):
        try:
            ready = select.select([chan, wake_r], [], [])[0]
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            say(exit=children.pop(pid, None), code=os.waitstatus_to_exitcode(status))
        if chan in ready:
            data = chan.recv(1 << 16)
            if not data:
                quitting = True  # the server is gone: no more runs
                continue
            buffered += data
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                request = json.loads(line)
                if request.get("quit"):
                    quitting = True
                    continue
                pid = os.fork()
                if pid == 0:
                    run(request, module, script, code, chan, (wake_r, wake_w, pids))
                children[pid] = request["run"]
                try:  # for a server that restarts after a crash: run id, pid, start
                    with open("/proc/%d/stat" % pid, "rb") as f:
                        ticks = f.read().rsplit(b")", 1)[1].split()[19].decode()
                    os.write(pids, ("%s %d %s\n" % (request["run"], pid, ticks)).encode())
                except (OSError, IndexError):
                    pass
                say(run=request["run"], pid=pid)

def run(request, module, script, code_object, chan, fds):
    code = 70
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (chan.detach(),) + fds:
            os.close(fd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], flags),
                               (2, request["stderr"], flags)):
            opened = os.open(path, mode, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        os.chdir(request["cwd"])
        os.environ.update(request["env"])  # the run's own values over the job's
        sys.argv = list(request["argv"])
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(
            io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False), line_buffering=True, errors="backslashreplace")
        code = 0
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                main = type(sys)("__main__")  # argv[0] stays as the entrypoint wrote it
                main.__file__, main.__builtins__ = script, __builtins__
                sys.modules["__main__"] = main
                exec(code_object, main.__dict__)
        except SystemExit as e:
            code = exit_code(e)
        except BaseException as e:
            # As a cold run shows it: from the user's first frame on.
            tb = e.__traceback__
            while tb is not None and (tb.tb_frame.f_code.co_filename == "<string>"
                                      or "runpy" in tb.tb_frame.f_code.co_filename):
                tb = tb.tb_next
            sys.excepthook(type(e), e.with_traceback(tb), tb)
            code = 1
        # What the interpreter does at exit: wait for non-daemon threads,
        # then the atexit handlers, then flush.
        try:
            if "threading" in sys.modules:
                sys.modules["threading"]._shutdown()
        except SystemExit as e:
            code = exit_code(e)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    finally:
        os._exit(code)

def exit_code(e):
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1

main()
'''


class _WarmPython:
    """One warm interpreter of the python executor: the process, its channel
    and the thread that reads the channel (``databuild-python-<label>``).

    ``state`` goes "starting" -> "ready" (or "failed", with ``error``) ->
    "gone"; the reader thread sets it and wakes the orchestrator.  Runs are
    forked only once it is ready (``fork``, in the orchestrator thread, waits
    for the pid of the child, a fork away).
    """

    def __init__(self, executor, job, env):
        self.executor = executor
        self.label = job.label
        interpreter, target = _python_target(job.entrypoint)
        program = interpreter if os.sep in interpreter else (
            shutil.which(interpreter, path=os.environ.get("PATH")) or interpreter)
        if os.sep in interpreter and not os.path.isabs(interpreter):
            program = os.path.join(executor.config.root, interpreter)
        ours, theirs = socket.socketpair()
        log_dir = os.path.join(executor.config.state_dir, "python")
        os.makedirs(log_dir, exist_ok=True)
        # Output of the import itself (prints, warnings) goes to this file.
        log = os.open(os.path.join(log_dir, job.label + ".log"),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            self.proc = subprocess.Popen(
                [program, "-c", _WARM_PYTHON, str(theirs.fileno()), executor.config.root]
                + target, cwd=executor.config.root, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, pass_fds=(theirs.fileno(),), start_new_session=True)
        finally:
            theirs.close()
            os.close(log)
        self.chan = ours
        self.state = "starting"
        self.error = None
        self.files = []  # [path, mtime_ns, size] of the workspace files it imported
        self.children = {}  # job run id -> handle: forked, exit not yet reported
        self.last_used = time.monotonic()  # (while starting: when it started)
        self._cv = threading.Condition()  # guards state, children and their pids
        threading.Thread(target=self._read, name="databuild-python-%s" % job.label,
                         daemon=True).start()

    def _read(self):
        buffered = b""
        while True:
            try:
                data = self.chan.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            buffered += data
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                self._message(json.loads(line))
        with self._cv:
            if self.state == "starting":
                self.state, self.error = "failed", "the warm interpreter exited while importing"
            elif self.state != "failed":
                self.state = "gone"
            orphans = list(self.children.values())
            self.children.clear()
            self._cv.notify_all()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        else:  # its list of forks is needed only while it may have some
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.executor.config.state_dir, "python",
                                       "%d.pids" % self.proc.pid))
        for handle in orphans:
            if handle.pid is None:  # asked for, never forked: the run fails
                handle.error = "the warm interpreter exited before it forked the run (%s)" % (
                    self.error or "exit code %s" % self.proc.returncode)
                self.executor.on_exit(handle)
            else:  # it goes on: its exit is learnt another way
                self.executor.orphaned(handle)
        self.executor.wakeup.set()

    def _message(self, message):
        ended = started = signal_now = None
        with self._cv:
            if "ready" in message:
                self.state, self.files = "ready", message["files"]
            elif "import_error" in message:
                self.state, self.error = "failed", message["import_error"]
                logger.warning("Job %s does not import: %s", self.label,
                               message.get("traceback", self.error).rstrip())
            elif "pid" in message:
                started = self.children.get(message["run"])
                if started is not None:
                    started.pid = message["pid"]
                    signal_now, started.pending_signal = started.pending_signal, None
            elif "exit" in message:
                ended = self.children.pop(message["exit"], None)
                if ended is not None:
                    ended.returncode = message["code"]
            self._cv.notify_all()
        # Callbacks after the lock is let go (the pid always comes before
        # the exit: one channel, in order).
        if signal_now is not None:  # stopped before its pid was known
            self.executor.signal(started, signal_now)
        if ended is not None:
            self.executor.on_exit(ended)
        if "ready" in message or "import_error" in message:
            self.executor.wakeup.set()

    def changed(self):
        """True if a workspace file it imported changed since (README "Running on a cluster")."""
        for path, mtime_ns, size in self.files:
            try:
                st = os.stat(path)
            except OSError:
                return True
            if st.st_mtime_ns != mtime_ns or st.st_size != size:
                return True
        return False

    def fork(self, handle, request):
        """Ask for a child running ``request``, without waiting: the reader
        thread sets ``handle.pid`` when the interpreter says it (and the
        interpreter writes it beside the run's logs, for a restart)."""
        with self._cv:
            self.children[handle.job_run_id] = handle
        try:
            self.chan.sendall((json.dumps(request) + "\n").encode())
        except OSError as e:
            with self._cv:
                self.children.pop(handle.job_run_id, None)
            raise ExecutorError("the warm interpreter is gone: %s" % e) from None
        self.last_used = time.monotonic()

    def status(self):
        """``(state, error, busy)``, read under the reader thread's lock
        (``busy``: a fork of it still runs)."""
        with self._cv:
            return self.state, self.error, bool(self.children)

    def retire(self):
        """No more runs: it exits once its children have."""
        state, _, busy = self.status()
        if state in ("starting", "ready"):
            try:
                self.chan.sendall(b'{"quit": true}\n')
            except OSError:
                pass
        if state == "starting" or not busy:
            _signal_group(self.proc.pid, signal.SIGKILL)  # nothing of value in it


class _ForkHandle(JobRunHandle):
    """A run of the python executor: a fork whose pid comes after ``start``
    (set by its warm interpreter's reader thread, under ``warm``'s lock)."""

    warm = None  # the _WarmPython that forks it
    pending_signal = None  # a signal asked for before the pid was known

    def start_fields(self):
        return {}  # the pid is in the warm interpreter's list of forks (_python_forks)


def _fork_lists(state_dir):
    """``[(path, pid of its warm interpreter)]`` of the lists of forks that
    warm interpreters keep: ``.databuild/python/<pid>.pids``, a line ``run id,
    pid, start time`` per fork (removed once their interpreter is gone)."""
    folder = os.path.join(state_dir, "python")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [(os.path.join(folder, n), int(n[:-5])) for n in names
            if n.endswith(".pids") and n[:-5].isdigit()]


def _python_forks(state_dir):
    """``{job run id: (pid, start time)}`` of the runs warm interpreters forked."""
    forks = {}
    for path, _ in _fork_lists(state_dir):
        try:
            with open(path) as f:
                for line in f:
                    run_id, pid, ticks = line.split()
                    forks[run_id] = (int(pid), int(ticks))
        except (OSError, ValueError):
            continue
    return forks


def _python_target(entrypoint):
    """``(interpreter, target)`` of a python job's entrypoint: target is
    ``[script]`` or ``["-m", module]``; the rest of the entrypoint is argv."""
    if len(entrypoint) >= 3 and entrypoint[1] == "-m":
        return entrypoint[0], entrypoint[1:3]
    if len(entrypoint) >= 2 and not entrypoint[1].startswith("-"):
        return entrypoint[0], entrypoint[1:2]
    raise ConfigError("a python job's entrypoint is [interpreter, script, ...] or "
                      "[interpreter, \"-m\", module, ...], not %r" % (entrypoint,))


class PythonExecutor(LocalExecutor):
    """Python jobs forked from a warm interpreter (README "Warm Python jobs").

    One warm interpreter per job (``_WarmPython``), started from the
    entrypoint's own interpreter, imports the script (or module) once; each
    run is a fork of it that behaves as a local run: its own session and
    process group, the run's argv, environment, cwd and log files, the exit
    code of ``sys.exit`` (a traceback is stderr and exit 1).  A run costs a
    fork instead of an interpreter start and the imports.  Before a fork, a
    change to any workspace file the interpreter imported replaces it (the
    old one exits once its runs have); an import error fails one run naming
    the exception, and the next run tries the import again.  Stopping,
    killing and orphan sweeps are the local executor's, by process group.
    """

    name = "python"
    settings = (Setting("executors.python", "idle_seconds", "num", 300, 0,
                        help="a warm interpreter unused this long stops"),
                Setting("executors.python", "import_timeout_seconds", "num", 600, 0,
                        help="an import that takes longer fails a run"))

    def recover(self, runs, now):
        found = super().recover(runs, now)
        for path, owner in _fork_lists(self.config.state_dir):
            if not _pid_alive(owner):  # its warm interpreter is gone: so are its forks
                with contextlib.suppress(OSError):
                    os.unlink(path)
        return found

    def _left_behind(self, runs):
        # A fork's pid is not in its start event (it comes later): the warm
        # interpreters list their forks.
        forks = _python_forks(self.config.state_dir)
        found = {}
        for run in runs:
            pid, start_time = forks.get(run.job_run_id, (None, None))
            if pid and _is_same_process(pid, start_time):
                found[pid] = run.job_run_id
        return found

    @classmethod
    def check_job(cls, job):
        _python_target(job.entrypoint)

    def signal(self, handle, sig):
        if handle.pid is None:
            with handle.warm._cv:  # (the reader thread sets the pid under this lock)
                if handle.pid is None:  # not forked yet: sent once it is
                    if handle.pending_signal != signal.SIGKILL:
                        handle.pending_signal = sig
                    return
        try:
            os.killpg(handle.pid, sig)
        except ProcessLookupError:  # forked, not yet in its own group
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, sig)
        except PermissionError:
            pass

    def ended(self, handle):
        if handle.pid is not None:  # (a run the warm interpreter never forked has none)
            super().ended(handle)

    def __init__(self, config, on_exit, wakeup, on_start=None):
        super().__init__(config, on_exit, wakeup, on_start)
        # Both the orchestrator thread's only (each _WarmPython has its own lock).
        self._warm = {}  # job label -> _WarmPython taking new runs
        self._retired = []  # replaced or idle ones, until their runs have ended

    def _warm_for(self, job):
        warm = self._warm.get(job.label)
        state = warm.status()[0] if warm is not None else None
        if state == "gone" or (state == "ready" and warm.changed()):
            if state == "ready":
                logger.info("Job %s: code changed, starting a new warm interpreter", job.label)
            self._retire(job.label)
            warm = None
        if warm is None:
            _, env = self._template(job)
            warm = self._warm[job.label] = _WarmPython(self, job, env)
        return warm

    def _retire(self, label):
        warm = self._warm.pop(label, None)
        if warm is not None:
            warm.retire()
            self._retired.append(warm)

    def start(self, run, job, now):
        warm = self._warm_for(job)
        state, error, _ = warm.status()
        if state == "starting":
            limit = self.setting("import_timeout_seconds")
            if time.monotonic() - warm.last_used < limit:
                return None  # importing: it wakes the orchestrator when ready
            self._retire(job.label)
            raise ExecutorError("the import of %s took longer than %s s"
                                % (" ".join(_python_target(job.entrypoint)[1]), limit))
        if state == "failed":
            self._retire(job.label)  # the next run tries the import again
            raise ExecutorError(error)
        _, argv, env, log_dir = self.prepare(run, job)
        interpreter, target = _python_target(job.entrypoint)
        handle = _ForkHandle(self, run.job_run_id, log_dir,
                             now + job.timeout_seconds if job.timeout_seconds else None)
        # The warm interpreter was started with the job's environment: a run
        # sends only its own values.
        request = {"run": run.job_run_id, "cwd": self.config.root,
                   "argv": (argv[1:] if target[0] != "-m" else argv[2:]),
                   "env": {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()
                           if k.startswith(b"DATABUILD_")},
                   "stdout": handle.stdout_path, "stderr": handle.stderr_path}
        handle.warm = warm
        warm.fork(handle, request)  # (the pid comes later, from the reader thread)
        return handle

    def orphaned(self, handle):
        """A run whose warm interpreter died before it (called by the reader
        thread): a thread of its own waits for its end and reports it."""
        threading.Thread(target=self._wait_orphan, args=(handle,), daemon=True,
                         name="databuild-orphan-%d" % handle.pid).start()

    def _wait_orphan(self, handle):
        # Its exit code is known only where this process adopted it (``serve``
        # is its jobs' subreaper); elsewhere it went to init.
        pid = handle.pid
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            fd = None  # no pidfds: look every 0.1 s
        else:
            select.select([fd], [], [])  # readable once it has exited
            os.close(fd)
        while True:
            try:
                done, status = os.waitpid(pid, 0 if fd is not None else os.WNOHANG)
            except ChildProcessError:  # not ours (or gone)
                if fd is None and _pid_alive(pid):
                    time.sleep(0.1)
                    continue
                handle.error = "its warm interpreter died while it ran: exit code unknown"
                break
            if done:
                handle.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.1)
        self.on_exit(handle)

    def maintain(self, now, ended, running):
        when = super().maintain(now, ended, running)
        idle = self.setting("idle_seconds")
        clock = time.monotonic()
        for label, warm in list(self._warm.items()):
            state, _, busy = warm.status()
            if state == "ready" and not busy and clock - warm.last_used >= idle:
                logger.info("Job %s: warm interpreter idle, stopped", label)
                self._retire(label)
        self._retired = [w for w in self._retired if w.status()[0] not in ("gone", "failed")]
        if self._warm:
            when = min(when, now + idle)
        return when

    def close(self):
        for label in list(self._warm):
            self._retire(label)
        for warm in self._retired:
            try:
                warm.proc.wait(DEFAULTS["kill_grace_seconds"])
            except subprocess.TimeoutExpired:
                _signal_group(warm.proc.pid, signal.SIGKILL)
        super().close()


#: The executors by name (README "Running on a cluster"): adding one is a class and a line here.
executors = {"local": LocalExecutor, "python": PythonExecutor, "slurm": SlurmExecutor}


def _processes_of_runs(run_ids):
    """pid -> job run id of live processes whose environment names one of ``run_ids``."""
    found = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                environ = f.read()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(b"DATABUILD_JOB_RUN_ID="):
                run_id = item[len(b"DATABUILD_JOB_RUN_ID="):].decode("ascii", "replace")
                if run_id in run_ids:
                    found[pid] = run_id
                break
    return found


def _stop_orphan(pid):
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + DEFAULTS["kill_grace_seconds"]
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)
    _signal_group(pid, signal.SIGKILL)


###############################################################################
# Automation: want requests, sensors, alerts ##################################
###############################################################################

# What a want request may hold (README "HTTP API"): the body of POST
# /api/wants, and what a sensor prints (README "Sensors").
_WANT_FIELDS = ("partitions", "want_id", "data_timestamp", "ttl_seconds", "sla_seconds",
                "comment", "user", "priority")
_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def _number(body, name, low, high):
    # A JSON number (not a boolean) from ``low`` to ``high``, or None if absent.
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high:
        return value
    raise InvalidRequest("%s must be a number from %d to %d" % (name, low, high),
                         field=name, value=_shown(value, 40))


def _string(body, name, max_len):
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise InvalidRequest("%s must be a string of at most %d characters" % (name, max_len),
                             field=name)
    return value


def parse_want_request(body, config):
    """Validate a POST /api/wants body; returns the request for ``create_want``.

    Raises InvalidRequest naming the field (or the ref) that is wrong.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    unknown = sorted(set(body) - set(_WANT_FIELDS))
    if unknown:
        raise InvalidRequest("Unknown field(s): %s" % ", ".join(unknown), fields=unknown)
    refs = body.get("partitions")
    if not isinstance(refs, list) or not refs:
        raise InvalidRequest("partitions must be a non-empty list of refs", field="partitions")
    refs = expand_ranges(refs, DEFAULTS["max_partitions_per_want"])
    for ref in refs:
        try:
            check_ref(ref)
        except InvalidRequest as e:
            e.fields["field"] = "partitions"
            raise
        config.job_for(ref)
    want_id = body.get("want_id")
    if want_id is not None and (not isinstance(want_id, str) or not _ID_RE.fullmatch(want_id)):
        raise InvalidRequest("want_id must be 1 to 128 characters of [A-Za-z0-9_.:-]",
                             field="want_id")
    return {"partitions": refs, "want_id": want_id,
            "data_timestamp": _number(body, "data_timestamp", *DATA_TIME_RANGE),
            "ttl_seconds": _number(body, "ttl_seconds", *DURATION_RANGE),
            "sla_seconds": _number(body, "sla_seconds", *DURATION_RANGE),
            "comment": _string(body, "comment", 10000), "user": _string(body, "user", 200),
            "priority": _priority(body)}


def _priority(body):
    value = body.get("priority")
    if value is None:
        return 0
    low, high = PRIORITY_RANGE
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest("priority must be an integer from %d to %d" % (low, high),
                             field="priority", value=_shown(value))
    return value


SENSOR_WANT_MARKER = "DATABUILD_WANT_JSON:"
SENSOR_CURSOR_MARKER = "DATABUILD_SENSOR_CURSOR:"
_SENSOR_KEY_RE = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
SENSOR_CURSOR_MAX = 10000  # characters: the cursor is kept in the log


def run_bounded(argv, cwd, env, timeout, limit, stdin=b"", running=None):
    """Run a command (a sensor, an alert's) in its own process group.

    Returns ``(returncode, stdout, stderr_tail, problem)``: stdout as bytes,
    read up to ``limit`` bytes, the last lines of stderr, and ``problem`` --
    ``"timed out after N s"`` or ``"printed more than N bytes"`` -- when the
    command was killed for it (then ``returncode`` is None).  ``running``, a
    set, holds the Popen while it runs (so a server that stops can kill it).
    Memory stays bounded whatever the command prints.
    """
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, close_fds=True)
    if running is not None:
        running.add(proc)
    out, err, problem = bytearray(), b"", None
    deadline = time.monotonic() + timeout
    try:
        try:
            proc.stdin.write(stdin)
        except OSError:  # (it did not read its stdin: its business)
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
        with _poll_selector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            selector.register(proc.stderr, selectors.EVENT_READ)
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    problem = "timed out after %g s" % timeout
                    break
                for key, _ in selector.select(remaining):
                    data = os.read(key.fileobj.fileno(), 1 << 16)
                    if not data:
                        selector.unregister(key.fileobj)
                    elif key.fileobj is proc.stdout:
                        out += data
                        if len(out) > limit:
                            problem = "printed more than %d bytes" % limit
                            break
                    else:
                        err = (err + data)[-8192:]
                if problem:
                    break
        if problem:
            _signal_group(proc.pid, signal.SIGKILL)
        try:
            code = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # it closed its pipes but runs on
            problem = "timed out after %g s" % timeout
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    finally:
        proc.stdout.close()
        proc.stderr.close()
        if running is not None:
            running.discard(proc)
    tail = err.decode("utf-8", "replace").splitlines()[-DEFAULTS["sensor_error_lines"]:]
    return (None if problem else code), bytes(out[:limit]), tail, problem


def _poll_selector():
    """A selector for a few pipes (poll where there is one: no 1,024-fd limit)."""
    return selectors.PollSelector() if hasattr(selectors, "PollSelector") \
        else selectors.DefaultSelector()


def _failure_text(code, tail):
    # "exit code 3: <the last stderr line>", as for a job run.
    text = "exit code %d" % code if code >= 0 else "killed by signal %d" % -code
    return text + (": " + " | ".join(line[:300] for line in tail) if tail else "")


def evaluate_sensor(sensor, root, cursor, env, running=None):
    """Run one evaluation of a sensor (README "Sensors"), on the caller's thread.

    Returns ``{"status": "ok", "wants": [object, ...], "cursor": text or
    None}`` -- each want the JSON object of a ``DATABUILD_WANT_JSON:`` line,
    not yet checked -- or ``{"status": "failed", "error": text}``.
    """
    env = dict(env, DATABUILD_SENSOR_NAME=sensor.name, DATABUILD_SENSOR_CURSOR=cursor or "")
    try:
        code, out, tail, problem = run_bounded(
            sensor.command, root, env, sensor.timeout_seconds,
            DEFAULTS["sensor_output_bytes"], running=running)
    except OSError as e:
        return {"status": "failed", "error": "cannot run %s: %s" % (sensor.command[0], e)}
    if problem:
        return {"status": "failed", "error": problem}
    if code != 0:
        return {"status": "failed", "error": _failure_text(code, tail)}
    wants, new_cursor = [], None
    for n, line in enumerate(out.decode("utf-8", "replace").splitlines(), 1):
        if line.startswith(SENSOR_WANT_MARKER):
            try:
                want = json.loads(line[len(SENSOR_WANT_MARKER):])
            except ValueError as e:
                return {"status": "failed", "error": "line %d: %s is not JSON (%s)"
                        % (n, SENSOR_WANT_MARKER, e)}
            if not isinstance(want, dict):
                return {"status": "failed", "error": "line %d: %s must be a JSON object"
                        % (n, SENSOR_WANT_MARKER)}
            wants.append(want)
        elif line.startswith(SENSOR_CURSOR_MARKER):
            new_cursor = line[len(SENSOR_CURSOR_MARKER):].strip()
            if len(new_cursor) > SENSOR_CURSOR_MAX:
                return {"status": "failed", "error": "line %d: the cursor is longer than %d "
                        "characters" % (n, SENSOR_CURSOR_MAX)}
    return {"status": "ok", "wants": wants, "cursor": new_cursor}


def sensor_want(sensor_name, body, config):
    """A sensor's printed want as a want request (``parse_want_request``'s),
    with its idempotent id ``sensor:<name>:<key>``; InvalidRequest if bad."""
    body = dict(body)
    key = body.pop("key", None)
    if "want_id" in body:
        raise InvalidRequest("want_id is the sensor's to make: print a key instead",
                             field="want_id")
    request = parse_want_request(body, config)
    if key is None:
        key = hashlib.sha256(" ".join(sorted(request["partitions"])).encode()).hexdigest()[:16]
    elif not isinstance(key, str) or not _SENSOR_KEY_RE.fullmatch(key):
        raise InvalidRequest("key must be 1 to 200 characters of [A-Za-z0-9_.:-]", field="key")
    request["want_id"] = "sensor:%s:%s" % (sensor_name, key)
    return request


def deliver_alert(alert, message, root, env):
    """Deliver one alert message (README "Alerts") on the caller's thread:
    None if delivered, else the error.  A command gets the JSON on stdin
    (exit 0 = delivered); a webhook a POST (a 2xx answer = delivered)."""
    body = dumps(message).encode("utf-8")
    if alert.command:
        timeout = DEFAULTS["alert_command_timeout_seconds"]
        try:
            code, _, tail, problem = run_bounded(alert.command, root, env, timeout, 1 << 20,
                                                 stdin=body)
        except OSError as e:
            return "cannot run %s: %s" % (alert.command[0], e)
        if problem:
            return problem
        return None if code == 0 else _failure_text(code, tail)
    timeout = DEFAULTS["alert_webhook_timeout_seconds"]
    request = urllib.request.Request(alert.webhook, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "databuild/" + __version__})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            resp.read(1 << 16)
            return None
    except urllib.error.HTTPError as e:
        return "HTTP %d %s from %s" % (e.code, e.reason, alert.webhook)
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            return "timed out after %g s" % timeout
        return "cannot reach %s: %s" % (alert.webhook, e.reason)
    except (socket.timeout, TimeoutError):
        return "timed out after %g s" % timeout
    except (OSError, http.client.HTTPException) as e:
        return "cannot reach %s: %s" % (alert.webhook, e)


###############################################################################
# Orchestrator ################################################################
###############################################################################

def _find_cycle(refs, deps, chain):
    """``[dep, ..., dep]`` if one of ``deps`` (asked for by ``refs``) is among
    ``refs`` or in ``chain`` (a want's chain: the refs whose deps led to it,
    nearest first); else None."""
    for dep in deps:
        if dep in refs:
            return [dep, dep]
        path = [refs[0]]
        for upstream in chain:
            if dep in upstream:
                return [dep] + path[::-1] + [dep]
            path.append(upstream[0])
    return None


class _Command:
    """A write request in the orchestrator's inbox, answered through ``done``."""

    __slots__ = ("kind", "args", "done", "result", "error")

    def __init__(self, kind, args):
        self.kind = kind
        self.args = args
        self.done = threading.Event()
        self.result = None
        self.error = None


class Orchestrator:
    """The only writer of the event log: reconciles wants into job runs (README "Design").

    Other threads talk to it through ``submit`` (or ``enqueue``): commands go
    into a ``collections.deque`` inbox and the caller waits on the command's
    ``threading.Event``, set only after the command's events are committed.
    ``step(now)`` is one reconciliation pass; ``start()`` runs steps in a named
    thread that sleeps until woken by a command, a job's exit or a deadline.

    ``state`` (a BuildState), the executors and the handles of the started
    job runs belong to the orchestrator thread (or to the test driving
    ``step``); nothing else may touch them.  Executors report a run's end
    from any thread through ``_on_exit``.
    """

    def __init__(self, config, log, url=None, clock=time.time, watcher=None):
        self.config = config
        self.watcher = watcher  # a ConfigWatcher: each step runs on the config in force
        self.log = log
        self._executors = {}  # name -> Executor, made when first needed
        self._url = url  # the server's base URL and access token, given to jobs:
        self._token = None  # set before the loop starts (``url``, ``token``)
        self.clock = clock
        self.state = self._open_state()
        self._inbox = collections.deque()  # any thread appends, the orchestrator pops
        self._exited = collections.deque()  # ended JobRunHandles, not yet recorded
        self._starts = collections.deque()  # started JobRunHandles, not yet recorded
        self._outcome_reader = _Workers("databuild-outcome", 1)  # reads long stdout logs
        self._wake = _Wakeup()
        self._running = {}  # job_run_id -> JobRunHandle: the started runs
        self._entries = []  # (type, payload, timestamp) of this step, not yet committed
        self._replies = []  # (command, result) to answer after the next commit
        self._waiting_cancels = {}  # job_run_id -> commands answered when it ends
        self._deadlines = []  # heap of (when, kind, want_id): "ttl" and "sla"
        # README "Scheduling policy".  Queued runs by (-priority, seq, id), a heap per executor:
        # the highest priority of the live wants needing a run, then the
        # oldest, starts first.  Entries are lazy: one whose run started,
        # ended or changed priority (or executor) is dropped (or pushed again)
        # when it comes up.
        self._queues = {}  # executor name -> heap
        self._ticks = []  # heap of (tick, schedule name): wants to make (README "Schedules")
        self._next_tick = {}  # schedule name -> its planned next tick
        self._retry_waits = []  # heap of (retry_at, ref): partitions in backoff
        self._retry_waiting = set()  # the refs in _retry_waits
        self._schedule_more = False  # the last step left pending refs for the next
        self._stop_requested = False
        self._no_starts_until = 0.0  # after a failed commit: start no job run before this
        #: True where this process is its jobs' subreaper (``serve``): then
        #: descendants that a finished run left outside its group are stopped.
        self.adopt_orphans = False
        self._orphans = _OrphanSweeper()
        self._sweep_at = float("inf")  # the next sweep for orphans, if one is due
        self._maintain_at = float("inf")  # the next call of the executors' maintain
        # README "Sensors": evaluations run on worker threads; the plan is here.
        self._sensor_due = []  # heap of (when, sensor name)
        self._sensor_next = {}  # sensor name -> its planned evaluation (heap entries agree)
        self._sensors_running = set()  # names of the sensors being evaluated
        self._sensor_procs = set()  # their processes (killed when the server stops)
        self._sensor_workers = _Workers("databuild-sensor", 4)
        # README "Alerts": deliveries run on worker threads too.
        self._alert_due = []  # heap of (when, alert_id): owed alerts to try
        self._alerts_sending = set()  # alert_ids being delivered
        self._alert_workers = _Workers("databuild-alert", 2)
        self._stopped = threading.Event()
        #: True while a job run is Queued or Running: set by the orchestrator
        #: thread after each commit, read by the idle timer's.
        self.has_runs = False
        self._thread = None
        self._current_command = None  # the command a _cmd_ handler is answering
        self._syncer = None  # the _Syncer while the loop runs in its thread
        now = clock()
        for want in self.state.wants.values():  # the live wants: a working set
            self._push_deadlines(want)
        self._recover(now)
        self._note_code_versions(now)  # code changed while no server ran
        self._commit()
        runs = self.state.job_runs_by_status
        self.has_runs = bool(runs[QUEUED] or runs[RUNNING])
        self._plan_from_state(now)
        self._plan_sensors(now)

    @staticmethod
    def _watched(state):
        # The orchestrator's state also notes what alerts may be raised on
        # and whose staleness changed (all stale ones, at first: auto rebuild).
        state.notices = []
        state.stale_dirty = dict.fromkeys(state.store.stale_refs())
        return state

    def _open_state(self):
        # The working set from the projection; if the projection does not
        # match the log (a new log, an older version, a log written by other
        # means), rebuild it from the events first.
        projection = self.log.load_projection()
        if projection[0] is not None:
            return self._watched(BuildState.restore(*projection, store=self.log))
        if self.log.latest_event_id():
            logger.info("Building the projection of the event log (%d events)",
                        self.log.latest_event_id())
        self.log.clear_projection()
        state = BuildState(working_set=True, store=self.log)
        batch, total, started = [], self.log.latest_event_id(), time.monotonic()
        said = 0  # events when progress was last logged
        for event in itertools.chain(self.log.iter_events(), [None]):
            if event is not None:
                state.apply(event)
                batch.append(event)
            if len(batch) >= 20000 or (event is None and (batch or not state.latest_event_id)):
                changes = state.take_changes()
                self.log.write_projection(changes, state.summary())
                state.forget(changes)
                batch = []
                if event is not None and state.latest_event_id - said >= 500000:
                    said = state.latest_event_id
                    logger.info("Projection: %d of %d events (%.0f s)", said, total,
                                time.monotonic() - started)
        if total:
            logger.info("Projection built: %d events in %.1f s", total,
                        time.monotonic() - started)
        return self._watched(state)

    def _reload_state(self):
        projection = self.log.load_projection()
        return (self._watched(BuildState.restore(*projection, store=self.log))
                if projection[0] is not None else self._open_state())

    def find_want(self, want_id):
        """A want in memory (live) or from the projection (finished), or None."""
        want = self.state.wants.get(want_id)
        return want if want is not None else self.log.projected("wants", want_id)

    def find_job_run(self, job_run_id):
        """A job run in memory (active) or from the projection (finished), or None."""
        run = self.state.job_runs.get(job_run_id)
        return run if run is not None else self.log.projected("job_runs", job_run_id)

    # -- commands from other threads ------------------------------------------

    def enqueue(self, kind, **args):
        """Put a command in the inbox and wake the orchestrator; returns the command."""
        if self._stop_requested:
            raise Unavailable("Server is shutting down")
        cmd = _Command(kind, args)
        self._inbox.append(cmd)
        self._wake.set()
        return cmd

    def submit(self, kind, timeout=None, **args):
        """Run a command and return its result once its events are committed.

        Kinds: ``create_want`` (request) -> (created, want dict);
        ``cancel_want`` (want_id), ``taint`` (ref, reason),
        ``cancel_job_run`` (job_run_id) -> dict.  Raises the command's
        DatabuildError, or Unavailable if no answer came within ``timeout``.
        """
        cmd = self.enqueue(kind, **args)
        if not cmd.done.wait(DEFAULTS["command_timeout_seconds"] if timeout is None else timeout):
            raise Unavailable("The orchestrator did not answer in time")
        if cmd.error is not None:
            raise cmd.error
        return cmd.result

    # -- the loop -------------------------------------------------------------

    def start(self):
        """Run ``step`` in a thread named databuild-orchestrator until ``stop``.

        In this mode commits are fsynced by a second thread (``_Syncer``)
        while the orchestrator goes on; answers still wait for the fsync.
        """
        self._syncer = _Syncer(self.log)
        self._thread = threading.Thread(target=self._loop, name="databuild-orchestrator",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=None):
        """Ask the loop to finish its step, stop running jobs and exit; wait for it."""
        self._stop_requested = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self):
        try:
            while not self._stop_requested:
                now = self.clock()
                try:
                    self.step(now)
                except Exception:  # survive: log, sleep a little, try again
                    logger.exception("Orchestrator step failed")
                self.wait(self._sleep_seconds(self.clock()))
        finally:
            try:
                self.shutdown()
            except Exception:
                logger.exception("Orchestrator shutdown failed")
            self._stopped.set()

    def wait(self, seconds):
        """Sleep until a command arrives, a job run ends or ``seconds`` pass.

        For the thread that steps (the loop, or a test driving ``step``).
        """
        self._wake.wait(seconds)  # local exits are reported from inside it

    def _sleep_seconds(self, now):
        if self._schedule_more:
            return 0.0
        when = min(now + DEFAULTS["orchestrator_max_sleep_seconds"], self._maintain_at)
        if self._ticks:
            when = min(when, self._ticks[0][0])
        if self._retry_waits:
            when = min(when, self._retry_waits[0][0])
        for heap in (self._sensor_due, self._alert_due):
            if heap:
                when = min(when, heap[0][0])
        if self._deadlines:
            when = min(when, self._deadlines[0][0])
        for handle in self._running.values():
            for t in (handle.deadline, handle.kill_at):
                if t is not None:
                    when = min(when, t)
        return max(0.0, when - now)

    def step(self, now=None):
        """One reconciliation pass (README "Design").

        Drain the inbox -> reap finished job runs -> enforce timeouts -> expire
        wants -> schedule pending partitions -> start queued runs up to the
        limit -> commit everything in one transaction -> answer (after the
        fsync: inline, or by the syncer thread when the loop runs).
        """
        now = self.clock() if now is None else now
        if self.watcher is not None:
            self._use_config(self.watcher.current())
        commands = []
        while self._inbox:
            commands.append(self._inbox.popleft())
        for cmd in commands:
            self._current_command = cmd
            emitted = len(self._entries)
            try:
                result = getattr(self, "_cmd_" + cmd.kind)(now, **cmd.args)
            except DatabuildError as e:
                cmd.error = e
            except Exception as e:
                logger.exception("Command %s failed", cmd.kind)
                cmd.error = e
            else:
                if result is not _LATER:
                    self._replies.append((cmd, result))
            if cmd.error is not None:
                cmd.done.set()
                if len(self._entries) > emitted:  # failed half-way: write none of the step
                    self._discard_step(now, cmd.kind)
                    return
        recorded = self._record_starts()
        reaped = self._record_ends(now)
        # Every step: an executor's maintain is cheap, and hears what its own
        # threads noted meanwhile (a Slurm job that began running).
        self._maintain_at = min([executor.maintain(now, bool(reaped), self._running)
                                 for executor in self._executors.values()]
                                + [self._sweep_orphans(now, bool(reaped))])
        self._enforce_deadlines(now)
        self._expire(now)
        self._tick_schedules(now)
        self._tick_sensors(now)
        self._send_alerts(now)
        self._auto_rebuild(now)
        self._schedule(now)
        if not self._stop_requested and now >= self._no_starts_until:
            started = recorded + self._start_queued(now)
        else:
            started = recorded
        # One commit per step: commands, outcomes, new runs and their starts
        # together (group commit).
        try:
            self._commit()
        except StorageError:
            # The state is the log's again (see _commit).  Never let a
            # process run that the log does not know; record the outcomes
            # of this step's exits again in the next one; start nothing new
            # for a while (a full disk would kill every start).
            for handle in started:
                handle.abandoned = True
                handle.stop(REASON_SERVER_SHUTDOWN, now, 0)
                handle.kill()
                self._running.pop(handle.job_run_id, None)
            self._exited.extendleft(reversed(reaped))
            self._no_starts_until = now + DEFAULTS["commit_retry_seconds"]
            self._plan_from_state(now)  # the queued runs and schedules are the log's again
            raise

    def _discard_step(self, now, kind):
        # A command failed after it had emitted events: none of this step's
        # events is written (a half-applied change never reaches the log),
        # the state is the log's again, and the step's other commands are
        # answered 503.  Nothing had started yet: commands come first.
        logger.error("Command %s failed after changing the state: this step's %d events are "
                     "not written", kind, len(self._entries))
        self._entries = []
        replies, self._replies = self._replies, []
        for cmd, _ in replies:
            cmd.error = Unavailable("Not written: another request of the same step failed; "
                                    "send it again")
            cmd.done.set()
        self.state = self._reload_state()
        self._plan_from_state(now)
        self._wake.set()  # the rest of the work: in the next step, at once

    def _plan_from_state(self, now):
        # The queued runs, the schedules' ticks and the owed alerts, as the
        # state (the log's) has them.
        self._queues = {}
        for run_id in self.state.job_runs_by_status[QUEUED]:
            self._push_queued(self.state.job_runs[run_id])
        self._plan_schedules(now)
        self._alert_due = [(alert.next_attempt_at or now, alert.alert_id)
                           for alert in self.state.alerts.values() if alert.status == OWED]
        heapq.heapify(self._alert_due)

    def _commit(self):
        """Append this step's events with the projection rows they changed, in
        one transaction, then answer the step's commands.

        If the commit fails, for any reason, nothing was written: the state
        in memory, already advanced by the step, is thrown away and reloaded
        from the log, and every command of the step is answered 503.  So no
        answer is ever an error for a write that is in the log, nor a success
        for one that is not.
        """
        entries, self._entries = self._entries, []
        replies, self._replies = self._replies, []
        changes = self.state.take_changes()
        try:
            if entries:
                if self.log.appended_event_id + len(entries) != self.state.latest_event_id:
                    raise StorageError("The event log is at event %d, the orchestrator's state "
                                       "expected %d" % (self.log.appended_event_id,
                                                        self.state.latest_event_id - len(entries)))
                self.log.append(entries, sync=self._syncer is None,
                                changes=changes, summary=self.state.summary())
        except Exception as e:
            error = e if isinstance(e, StorageError) else StorageError(
                "Event log write failed: %s: %s" % (type(e).__name__, e))
            logger.error("Commit failed, nothing written; state reloaded from the log: %s",
                         error.message)
            self.state = self._reload_state()
            for cmd, _ in replies:
                cmd.error = Unavailable(error.message, **error.fields)
                cmd.done.set()
            if error is e:
                raise
            raise error from e
        answered = []
        for cmd, result in replies:  # computed here: the state is this thread's
            try:
                cmd.result = result() if callable(result) else result
            except Exception as e:
                logger.exception("Reply to %s failed", cmd.kind)
                cmd.error = e
            answered.append(cmd)
        self.state.forget(changes)  # finished work lives on in the projection only
        runs = self.state.job_runs_by_status
        self.has_runs = bool(runs[QUEUED] or runs[RUNNING])  # (read by the idle timer)
        if self._syncer is not None and entries:
            self._syncer.submit(answered)  # answered once the fsync is done
        else:
            for cmd in answered:
                cmd.done.set()

    def _emit(self, type_, payload, now):
        self._entries.append((type_, payload, now))
        self.state.apply(Event(self.state.latest_event_id + 1, now, type_, payload))
        if self.state.notices:
            self._raise_alerts(now)
        if type_ == WANT_CREATE:
            want = self.state.wants[payload["want_id"]]
            self._push_deadlines(want)
            if want.priority:  # it may raise the priority of queued runs it joined
                for ref in want.partitions:
                    run = self.state.job_runs.get(self.state.active_run_by_ref.get(ref, ""))
                    if run is not None and run.status == QUEUED:
                        self._push_queued(run)
        elif type_ == JOB_RUN_QUEUE:
            self._push_queued(self.state.job_runs[payload["job_run_id"]], payload.get("executor"))

    def _run_priority(self, run):
        wants = self.state.wants
        return max((wants[w].priority for w in run.want_ids if w in wants
                    and wants[w].status not in TERMINAL_WANT_STATUSES), default=0)

    def _push_queued(self, run, executor=None):
        if executor is None:
            job = self.config.jobs_by_label.get(run.job_label)
            executor = job.executor if job is not None else "local"
        heapq.heappush(self._queues.setdefault(executor, []),
                       (-self._run_priority(run), run.seq, run.job_run_id))

    def _push_deadlines(self, want, ttl=True):
        for kind, seconds in (("ttl", want.ttl_seconds if ttl else None),
                              ("sla", want.sla_seconds)):
            if seconds:
                try:  # (a log from before the ranges were checked may hold any number)
                    when = float(want.data_timestamp) + float(seconds)
                except (OverflowError, TypeError, ValueError):
                    continue
                heapq.heappush(self._deadlines, (when, kind, want.want_id))

    # -- commands -------------------------------------------------------------

    def _want_reply(self, want_id):
        return lambda: self.state.wants[want_id].to_dict(self.state)

    def _cmd_create_want(self, now, request):
        want_id = request.get("want_id") or new_id()
        refs = list(dict.fromkeys(request["partitions"]))
        existing = self.find_want(want_id) if request.get("want_id") else None
        if existing is not None:
            if existing.partitions != refs:
                raise Conflict("want_id already used with other partitions", want_id=want_id,
                               partitions=existing.partitions)
            return lambda: (False, existing.to_dict(self.state))
        for ref in refs:
            self.config.job_for(ref)
        self._create_want(want_id, refs, request,
                          {"type": "manual", "user": request.get("user")}, now)
        reply = self._want_reply(want_id)
        return lambda: (True, reply())

    def _create_want(self, want_id, refs, request, source, now):
        # A want people made (or a sensor): its own root, fields from a
        # checked want request (``parse_want_request``).
        data_timestamp = request.get("data_timestamp")
        self._emit(WANT_CREATE, {
            "want_id": want_id, "partitions": refs,
            "data_timestamp": now if data_timestamp is None else data_timestamp,
            "ttl_seconds": request.get("ttl_seconds"),
            "sla_seconds": request.get("sla_seconds"),
            "priority": request.get("priority") or 0, "source": source,
            "parent_want_id": None, "root_want_id": want_id,
            "comment": request.get("comment"),
        }, now)

    def _cmd_retry_want(self, now, want_id):
        # README "Backfills": a new want for every partition of the want
        # that is not Live, whatever it is (Failed, Canceled, never built).
        want = self.find_want(want_id)
        if want is None:
            raise NotFound("Want not found", want_id=want_id)
        refs = [ref for ref in want.partitions if self.state._status_of(ref) != LIVE]
        if not refs:
            raise Conflict("Every partition of want %s is Live: nothing to retry" % want_id,
                           want_id=want_id, status=want.status)
        retry_id = new_id()
        self._emit(WANT_CREATE, {
            "want_id": retry_id, "partitions": refs, "data_timestamp": now,
            "ttl_seconds": want.ttl_seconds, "sla_seconds": want.sla_seconds,
            "priority": want.priority, "source": {"type": "retry", "want_id": want_id},
            "parent_want_id": None, "root_want_id": retry_id,
            "comment": "retry of want %s" % want_id}, now)
        return self._want_reply(retry_id)

    def _cmd_plan_want(self, now, request):
        # README "Backfills": the runs a want would start, transitively over
        # declared deps, from the state as it is; nothing is written.
        state, config = self.state, self.config
        refs = list(dict.fromkeys(request["partitions"]))
        plan, seen, todo = [], set(refs), collections.deque(refs)
        jobs = collections.Counter()
        while todo:
            ref = todo.popleft()
            job = config.job_for(ref)
            try:
                deps = job.declared_deps(ref)
            except KeyError:
                deps = []
            status = state._status_of(ref)
            if status == LIVE:
                action = "live"
            elif ref in state.active_run_by_ref or status in (UPSTREAM_BUILDING, BUILDING):
                action = "building"
            else:
                unmet = [d for d in deps if state._status_of(d) != LIVE]
                action = "waiting" if unmet else "build"
                jobs[job.label] += 1
                for dep in unmet:
                    if dep not in seen:
                        seen.add(dep)
                        todo.append(dep)
            plan.append({"ref": ref, "job_label": job.label, "action": action, "deps": deps})
        runs = {label: -(-n // config.jobs_by_label[label].max_partitions_per_run)
                for label, n in jobs.items()}
        return {"partitions": refs, "plan": plan, "runs": sum(runs.values()), "jobs": runs}

    def _cmd_cancel_want(self, now, want_id):
        want = self.find_want(want_id)
        if want is None:
            raise NotFound("Want not found", want_id=want_id)
        if want.status in TERMINAL_WANT_STATUSES:
            raise Conflict("Want is already %s" % want.status, want_id=want_id,
                           status=want.status)
        self._emit(WANT_CANCEL, {"want_id": want_id}, now)
        self._drop_unneeded_runs(now, "want canceled")
        return self._want_reply(want_id)

    def _cmd_taint(self, now, ref, reason=None, downstream=False, dry_run=False):
        part = self.state.partitions.get(ref)
        if part is None:
            raise NotFound("Partition not found", ref=ref)
        if ref in self.state.active_run_by_ref:
            raise Conflict("Partition is being built", ref=ref,
                           job_run_id=self.state.active_run_by_ref[ref])
        below = self._built_from(ref) if downstream else []
        if dry_run:
            answer = part.to_dict()
            answer["want_ids"] = self.log.links("partition_wants", ref)
            return {"partition": answer, "tainted": [ref] + below, "dry_run": True}
        # One event each, in dependency order, in this step's one commit.
        self._emit(PARTITION_TAINT, {"ref": ref, "reason": reason}, now)
        for other in below:
            self._emit(PARTITION_TAINT, {"ref": other, "reason": reason, "upstream_of": ref}, now)
        # Answer with the partition as the taint left it (README "HTTP API": "now Tainted"),
        # even if this same step already queues its rebuild.
        answer = self.state.partitions[ref].to_dict()
        answer["want_ids"] = self.log.links("partition_wants", ref) + \
            self.state.pending_links("partition_wants", ref)
        return {"partition": answer, "tainted": [ref] + below, "dry_run": False}

    def _built_from(self, ref):
        # README "Lineage": the Live partitions built, directly or transitively, from
        # ref (not those being built: their runs end as they end), upstream
        # first.  The walk goes through partitions that are not Live: what
        # was built from them may be.
        state, order, seen = self.state, [], {ref}
        frontier = [ref]
        while frontier:
            nxt = []
            for dep in frontier:
                for other in state.downstream_of(dep):
                    if other not in seen:
                        seen.add(other)
                        nxt.append(other)
            order.extend(nxt)
            frontier = nxt
        # Breadth first is not enough where paths differ in length: order the
        # set so that each partition comes after its upstream ones in it.
        members = set(order)
        waiting = {r: sum(1 for d in state.partitions[r].upstream if d in members)
                   for r in order}
        ready = collections.deque(r for r in order if not waiting[r])
        result = []
        while ready:
            r = ready.popleft()
            result.append(r)
            for other in state.downstream_of(r):
                if other in waiting:
                    waiting[other] -= 1
                    if not waiting[other]:
                        ready.append(other)
        if len(result) < len(order):  # a cycle in recorded reads: the rest as found
            done = set(result)
            result += [r for r in order if r not in done]
        return [r for r in result if state.partitions[r].status == LIVE
                and r not in state.active_run_by_ref]

    def _cmd_cancel_job_run(self, now, job_run_id, reason="canceled by user"):
        run = self.find_job_run(job_run_id)
        if run is None:
            raise NotFound("Job run not found", job_run_id=job_run_id)
        if run.status not in ACTIVE_JOB_RUN_STATUSES:
            raise Conflict("Job run already finished (%s)" % run.status,
                           job_run_id=job_run_id, status=run.status)
        handle = self._running.get(job_run_id)
        if handle is None:
            self._emit(JOB_RUN_CANCEL, {"job_run_id": job_run_id, "reason": reason}, now)
            return lambda: self.state.job_runs[job_run_id].to_dict()
        handle.stop(reason, now, DEFAULTS["kill_grace_seconds"])
        self._waiting_cancels.setdefault(job_run_id, []).append(self._current_command)
        return _LATER

    # -- reconciliation -------------------------------------------------------

    def _drop_unneeded_runs(self, now, reason):
        # README "HTTP API" (DELETE want): queued runs nobody needs are dropped, running
        # ones stopped (recorded Canceled once they have ended).
        for run_id in list(self.state.job_runs_by_status[QUEUED]):
            run = self.state.job_runs[run_id]
            if not self.state.is_needed(run) and run_id not in self._running:
                self._emit(JOB_RUN_CANCEL, {"job_run_id": run_id, "reason": reason}, now)
        for run_id, handle in self._running.items():  # (a run still starting too)
            if not self.state.is_needed(self.state.job_runs[run_id]):
                handle.stop(reason, now, DEFAULTS["kill_grace_seconds"])

    def _on_exit(self, handle):
        # The one way executors report a run's end, from any thread: hand the
        # handle over and wake the orchestrator.  A long stdout is read for
        # the run's outcome on the outcome reader's thread first: the
        # orchestrator never scans a big file.
        try:
            long_log = os.stat(handle.stdout_path).st_size > DEFAULTS["outcome_inline_bytes"]
        except OSError:
            long_log = False
        if long_log:
            self._outcome_reader.submit(self._outcome_read, handle)
            return
        self._exited.append(handle)
        self._wake.set()

    def _outcome_read(self, handle):
        handle.outcome()  # (on the outcome reader's thread)
        self._exited.append(handle)
        self._wake.set()

    def _on_start(self, handle):
        # How an executor that learns a run's start later (a fork, a
        # submission) reports it, from any thread.
        self._starts.append(handle)
        self._wake.set()

    def _record_starts(self):
        # The start events of the runs whose executors reported them since.
        recorded = []
        while self._starts:
            handle = self._starts.popleft()
            if handle.abandoned:  # its step's commit failed: not a run of the log's
                handle.kill()
            elif self._running.get(handle.job_run_id) is handle and not handle.started:
                handle.started = True
                self._emit_start(handle)
                recorded.append(handle)
        return recorded

    def _emit_start(self, handle):
        payload = {"job_run_id": handle.job_run_id, "executor": handle.executor.name}
        job = self.config.jobs_by_label.get(self.state.job_runs[handle.job_run_id].job_label)
        if job is not None:  # the code it runs (README "Freshness")
            payload["code_version"] = job.code_version
        payload.update(handle.start_fields())
        # Stamped when the run was started, not when the step began.
        self._emit(JOB_RUN_START, payload, self.clock())

    def _use_config(self, config):
        # Runs already started keep what they started with (argv, env,
        # timeout); everything decided from now on follows the new config.
        if config is not self.config:
            self.config = config
            for executor in self._executors.values():
                executor.use_config(config)
            now = self.clock()
            self._plan_schedules(now)
            self._plan_sensors(now)
            self._note_code_versions(now)
            # A job may have turned auto_rebuild on: look at every stale partition.
            self.state.stale_dirty.update(dict.fromkeys(self.log.stale_refs()))

    def _note_code_versions(self, now):
        # README "Freshness": a job's code version that differs from the one
        # the log last recorded is recorded (its partitions built with other
        # code turn stale in the reducer).
        # A job that never ran has nothing built to compare: its first run's
        # start records its version.
        for job in self.config.jobs:
            previous = self.state.job_versions.get(job.label)
            if job.code_version and previous is not None and job.code_version != previous:
                self._emit(JOB_CODE_VERSION, {"job_label": job.label,
                                              "code_version": job.code_version,
                                              "previous": previous}, now)

    @property
    def url(self):
        """The server's base URL, which jobs get as ``DATABUILD_URL``."""
        return self._url

    @url.setter
    def url(self, url):  # (before the loop starts: executors made at recovery know it too)
        self._url = url
        for executor in self._executors.values():
            executor.url = url

    @property
    def token(self):
        """The server's access token, which jobs get as ``DATABUILD_TOKEN``."""
        return self._token

    @token.setter
    def token(self, token):
        self._token = token
        for executor in self._executors.values():
            executor.token = token

    def _executor(self, name):
        executor = self._executors.get(name)
        if executor is None:
            executor = self._executors[name] = executors[name](
                self.config, self._on_exit, self._wake, self._on_start)
            executor.url, executor.token, executor.clock = self._url, self._token, self.clock
        return executor

    def _sweep_orphans(self, now, ended):
        # After a run ended, and again while orphans turn up (each may leave
        # children of its own); returns when the next sweep is due.
        if not self.adopt_orphans or (not ended and now < self._sweep_at):
            return self._sweep_at
        found = self._orphans.sweep(self._running)
        self._sweep_at = now + 0.1 if found else float("inf")
        if ended:  # once more soon: what the group kill orphans is adopted late
            self._sweep_at = min(self._sweep_at, now + 0.2)
        return self._sweep_at

    def _record_ends(self, now):
        # Returns the handles of the runs whose outcomes this step records.
        reaped = []
        while self._exited:
            handle = self._exited.popleft()
            if handle.abandoned:  # started in a step whose commit failed: no run to record
                continue
            self._running.pop(handle.job_run_id, None)
            handle.executor.ended(handle)
            self._record_outcome(handle, now)
            reaped.append(handle)
            waiting = self._waiting_cancels.pop(handle.job_run_id, ())
            run_id = handle.job_run_id
            for cmd in waiting:
                self._replies.append((cmd, lambda: self.state.job_runs[run_id].to_dict()))
        return reaped

    def _fail(self, run, now, error, retry, counted=True, exit_code=None, stderr_tail=None):
        payload = {"job_run_id": run.job_run_id, "exit_code": exit_code, "error": error,
                   "retry": bool(retry), "counted": counted}
        job = self.config.jobs_by_label.get(run.job_label)
        if retry and counted and job is not None and job.retry_backoff_seconds:
            # In the log, so that a restart keeps the schedule of the retry.
            payload["retry_at"] = now + job.retry_delay(run.attempt + 1)
        if stderr_tail:
            payload["stderr_tail"] = stderr_tail
        self._emit(JOB_RUN_FAILURE, payload, now)

    def _may_retry(self, run):
        job = self.config.jobs_by_label.get(run.job_label)
        return job is not None and run.attempt <= job.max_retries

    def _record_outcome(self, handle, now):
        run = self.state.job_runs[handle.job_run_id]
        code = handle.returncode
        if handle.stop_reason == REASON_TIMEOUT:
            self._fail(run, now, "timeout", self._may_retry(run), exit_code=code)
            return
        if handle.stop_reason is not None:
            self._emit(JOB_RUN_CANCEL, {"job_run_id": run.job_run_id,
                                        "reason": handle.stop_reason, "exit_code": code}, now)
            return
        if handle.error is not None:  # the executor knows the end, not the job
            self._fail(run, now, handle.error, self._may_retry(run), exit_code=code,
                       stderr_tail=handle.stderr_tail())
            return
        missing, read_deps, problem = handle.outcome()
        if problem is not None and missing is None:
            self._fail(run, now, problem, False, exit_code=code)
        elif missing is not None:
            self._record_dep_miss(run, missing, code, now)
        elif code == 0:
            payload = {"job_run_id": run.job_run_id, "exit_code": 0}
            if read_deps:
                payload["read_deps"] = read_deps
            self._emit(JOB_RUN_SUCCESS, payload, now)
        else:
            tail = handle.stderr_tail()
            error = "exit code %d" % code if code >= 0 else "killed by signal %d" % -code
            if tail:
                error += ": " + tail[-1][:500]
            self._fail(run, now, error, self._may_retry(run), exit_code=code, stderr_tail=tail)

    def _record_dep_miss(self, run, missing, code, now):
        if not missing:
            self._fail(run, now, "job reported missing deps but named none", False,
                       exit_code=code)
            return
        for dep in missing:
            try:
                self.config.job_for(dep)
            except InvalidRequest as e:
                self._fail(run, now, "missing dependency %r: %s" % (dep, e.message), False,
                           exit_code=code)
                return
        cycle = None
        for want_id in run.want_ids:
            want = self.state.wants.get(want_id)
            cycle = cycle or _find_cycle(run.partitions, missing,
                                         want.chain if want is not None else ())
        if cycle:
            self._fail(run, now, "dependency cycle: " + " -> ".join(cycle), False,
                       exit_code=code)
            return
        self._emit(JOB_RUN_MISSING_DEPS, {"job_run_id": run.job_run_id,
                                          "missing_deps": missing, "exit_code": code}, now)
        unmet = [d for d in missing if self.state._status_of(d) != LIVE]
        live_parents = [w for w in map(self.state.wants.get, run.want_ids)
                        if w is not None and w.status not in TERMINAL_WANT_STATUSES]
        if not unmet or not live_parents:
            return
        parent = live_parents[0]
        want_id = new_id()
        self._emit(WANT_CREATE, {
            "want_id": want_id, "partitions": unmet,
            "data_timestamp": parent.data_timestamp, "ttl_seconds": parent.ttl_seconds,
            "sla_seconds": parent.sla_seconds,
            "source": {"type": "job", "job_run_id": run.job_run_id},
            "parent_want_id": parent.want_id, "root_want_id": parent.root_want_id,
            "comment": None, "priority": parent.priority,
        }, now)

    def _enforce_deadlines(self, now):
        for handle in self._running.values():
            if (handle.stop_reason is None and handle.deadline is not None
                    and now >= handle.deadline):
                logger.info("Job run %s timed out", handle.job_run_id)
                handle.stop(REASON_TIMEOUT, now, DEFAULTS["kill_grace_seconds"])
            elif handle.kill_at is not None and now >= handle.kill_at:
                handle.kill_at = None  # once: a Slurm job takes a while to go
                handle.kill()

    def _expire(self, now):
        while self._deadlines and self._deadlines[0][0] <= now:
            _, kind, want_id = heapq.heappop(self._deadlines)
            want = self.state.wants.get(want_id)
            if want is None:  # finished (and out of memory) meanwhile
                continue
            if kind == "ttl":
                if want.status not in TERMINAL_WANT_STATUSES:
                    self._emit(WANT_EXPIRE, {"want_id": want_id}, now)
                    self._drop_unneeded_runs(now, "want expired")
            elif want.status not in (SUCCESSFUL, CANCELED, EXPIRED) and not want.sla_breached:
                self._emit(WANT_SLA_BREACH, {"want_id": want_id}, now)

    def _schedule(self, now):
        state = self.state
        while self._retry_waits and self._retry_waits[0][0] <= now:
            self._retry_waiting.discard(heapq.heappop(self._retry_waits)[1])
        if not state.pending_refs:
            return
        by_job = {}
        seen = set()
        budget = DEFAULTS["schedule_batch"]  # refs given work this step; the rest next step
        self._schedule_more = False
        while not self._schedule_more:  # again for what this pass wanted (deps, upstream)
            refs = [ref for ref in state.pending_refs if ref not in seen]
            if not refs:
                break
            for ref in refs:
                if budget <= 0:
                    self._schedule_more = True  # the next step comes at once
                    break
                seen.add(ref)
                budget -= self._sort_pending(ref, now, by_job)
        for job, refs in by_job.values():
            size = job.max_partitions_per_run
            for i in range(0, len(refs), size):
                chunk = refs[i:i + size]
                want_ids = set()
                for ref in chunk:
                    want_ids.update(state.live_wants_by_ref.get(ref, ()))
                retries = max((state.partitions[r].retries for r in chunk
                               if r in state.partitions), default=0)
                payload = {
                    "job_run_id": new_id(), "job_label": job.label, "partitions": chunk,
                    "want_ids": sorted(want_ids, key=lambda w: state.wants[w].seq),
                    "attempt": retries + 1, "executor": job.executor}
                if job.deps:  # lineage: declared deps are upstream (README "Backfills")
                    payload["deps"] = {ref: job.declared_deps(ref) for ref in chunk}
                self._emit(JOB_RUN_QUEUE, payload, now)

    def _sort_pending(self, ref, now, by_job):
        # A pending ref waits (backoff, upstream first, declared deps), fails
        # (no job for it) or joins its job's list in ``by_job``.  1 if that
        # gave it work (events now or a run to queue), 0 if it only waits.
        state, emitted = self.state, len(self._entries)
        part = state.partitions.get(ref)
        if part is not None and part.retry_at is not None and part.retry_at > now:
            # Retry backoff (README "Scheduling policy"): UpForRetry until
            # retry_at; the heap wakes us.
            if ref not in self._retry_waiting:
                self._retry_waiting.add(ref)
                heapq.heappush(self._retry_waits, (part.retry_at, ref))
            return 0
        if self._rebuild_upstream_first(ref, now):
            return int(len(self._entries) > emitted)
        try:
            job = self.config.job_for(ref)
        except InvalidRequest as e:  # the config changed under an old want
            self._fail_unrunnable(ref, None, e.message, now)
            return 1
        if job.deps and self._want_declared_deps(ref, job, now):
            return 1
        by_job.setdefault(job.label, (job, []))[1].append(ref)
        return 1

    def _fail_unrunnable(self, ref, job_label, error, now):
        # A partition that no run can build (no job for it any more, a
        # declared dep that cannot be, a dependency cycle) fails through a run
        # that never starts, so its story is in the log like any failure.
        run_id = new_id()
        wants = self.state.wants
        self._emit(JOB_RUN_QUEUE, {"job_run_id": run_id, "job_label": job_label,
                                   "partitions": [ref], "want_ids": sorted(
                                       self.state.live_wants_by_ref.get(ref, ()),
                                       key=lambda w: wants[w].seq),  # oldest first, as _schedule
                                   "attempt": 1}, now)
        self._fail(self.state.job_runs[run_id], now, error, False)

    def _want_declared_deps(self, ref, job, now):
        # README "Backfills": a run is queued only once the partition's
        # declared deps are Live.  Those that are not are wanted by one
        # derivative want (source "deps"), in whose event the partition
        # starts waiting on them.  True while ``ref`` must wait.
        state = self.state
        try:
            deps = job.declared_deps(ref)
            for dep in deps:
                self.config.job_for(dep)
        except (KeyError, InvalidRequest) as e:
            error = e.message if isinstance(e, InvalidRequest) else "no group %s" % e
            self._fail_unrunnable(ref, job.label, "declared dependency of %r: %s"
                                  % (ref, error), now)
            return True
        # A stale dep is used as it is, unless its job rebuilds it by itself
        # (README "Freshness"): then it is rebuilt first.
        unmet = [dep for dep in deps if state._status_of(dep) != LIVE
                 or (state.partitions[dep].stale_reasons and self._auto_job(state.partitions[dep]))]
        if not unmet:
            return False
        parent = self._parent_want(ref)
        cycle = _find_cycle([ref], unmet, parent.chain if parent is not None else ())
        if cycle:
            self._fail_unrunnable(ref, job.label, "dependency cycle: " + " -> ".join(cycle), now)
            return True
        self._emit(WANT_CREATE, {
            "want_id": new_id(), "partitions": unmet,
            "data_timestamp": parent.data_timestamp if parent else now,
            "ttl_seconds": parent.ttl_seconds if parent else None,
            "sla_seconds": parent.sla_seconds if parent else None,
            "source": {"type": "deps", "ref": ref}, "job_label": job.label,
            "parent_want_id": parent.want_id if parent else None,
            "root_want_id": parent.root_want_id if parent else None,
            "comment": None, "priority": parent.priority if parent else 0}, now)
        return True

    def _parent_want(self, ref):
        # The want a derivative want for ``ref``'s upstream hangs under: the
        # oldest live want naming ``ref``, else one naming a partition that
        # waits on it (nearest first); None if nothing live wants it.
        state, seen, frontier = self.state, {ref}, [ref]
        while frontier:
            wants = [state.wants[w] for r in frontier for w in state.live_wants_by_ref.get(r, ())]
            if wants:
                return min(wants, key=lambda w: w.seq)
            frontier = [x for r in frontier for x in sorted(state.waiters.get(r, ()))
                        if x not in seen]
            seen.update(frontier)
        return None

    # -- schedules (README "Schedules") ------------------------------------------------

    def _plan_schedules(self, now):
        # The heap of ticks to make, from each schedule's newest tick in the
        # log (every tick made is committed before the next plan): the missed
        # ones (at most catch_up, the newest) and the next one.  A schedule
        # new to the log starts from now.
        self._ticks = []
        for schedule in self.config.schedules:
            last_id = self.log.last_want_id("schedule:%s:" % schedule.name)
            last = _tick_of(last_id) if last_id else None
            self._plan(schedule, now if last is None else last, now)

    def _plan(self, schedule, after, now):
        missed = collections.deque(maxlen=schedule.catch_up)
        for n, tick in enumerate(schedule.ticks_after(after)):
            if tick > now or n > 100000:  # (a gap of years of minutes: the newest few)
                break
            missed.append(tick)
        for past in missed:
            heapq.heappush(self._ticks, (past, schedule.name))
        heapq.heappush(self._ticks, (tick, schedule.name))
        self._next_tick[schedule.name] = tick

    def _tick_schedules(self, now):
        while self._ticks and self._ticks[0][0] <= now:
            tick, name = heapq.heappop(self._ticks)
            schedule = self.config.schedules_by_name.get(name)
            if schedule is None:
                continue  # gone from the config
            self._make_tick_want(schedule, tick, now)
            if tick == self._next_tick.get(name):  # the planned next one: plan again
                self._plan(schedule, tick, now)

    def _make_tick_want(self, schedule, tick, now):
        # The want_id is the tick's: a tick is never made twice, across
        # restarts and clock jumps too.
        want_id = schedule.want_id(tick)
        if self.find_want(want_id) is not None:
            return
        try:
            refs = list(dict.fromkeys(schedule.refs(tick)))
            for ref in refs:
                self.config.job_for(ref)
        except (InvalidRequest, KeyError, ValueError) as e:
            logger.error("Schedule %s: tick %s makes no want: %s", schedule.name,
                         isoformat(tick), getattr(e, "message", e))
            return
        self._emit(WANT_CREATE, {
            "want_id": want_id, "partitions": refs,
            "data_timestamp": tick - schedule.lag_seconds,
            "ttl_seconds": schedule.ttl_seconds, "sla_seconds": schedule.sla_seconds,
            "source": {"type": "schedule", "name": schedule.name, "tick": isoformat(tick)},
            "parent_want_id": None, "root_want_id": want_id, "comment": None,
            "priority": schedule.priority}, now)

    # -- freshness, sensors, alerts (README "Freshness", "Sensors", "Alerts") -------

    def _auto_rebuild(self, now):
        # A stale partition of a job with auto_rebuild = "stale" is wanted
        # again (source "auto") once a rebuild would make it fresh: its
        # upstream Live and not building, none stale that will be rebuilt
        # itself (dependency order), and a reason a rebuild clears (its code
        # changed, an upstream was rebuilt).  It is looked at when its
        # staleness changes; one not ready now is looked at again when its
        # upstream changes.  While it is rebuilt it is not Live, so not
        # stale: one rebuild at a time, and the changes meanwhile make one
        # more (README "Freshness", the rule against storms).
        dirty, state = self.state.stale_dirty, self.state
        budget = DEFAULTS["schedule_batch"]
        while dirty and budget > 0:
            ref = next(iter(dirty))
            del dirty[ref]
            part = state.partitions.get(ref)
            if part is None or not part.stale_reasons:
                continue
            job = self.config.jobs_by_label.get(part.job_label)
            if job is None or job.auto_rebuild != "stale" or not self._rebuild_clears(part):
                continue
            self._create_want(new_id(), [ref], {}, {
                "type": "auto", "ref": ref,
                "reason": next(iter(part.stale_reasons.values()))}, now)
            budget -= 1
        if dirty:
            self._schedule_more = True  # the rest in the next step, at once

    def _rebuild_clears(self, part):
        state = self.state
        for dep in part.upstream:
            up = state.partitions.get(dep)
            if up is None or up.built_by_job_run_id is None:
                continue
            if up.status != LIVE or dep in state.active_run_by_ref:
                return False
            if up.stale_reasons and self._auto_job(up):
                return False  # rebuilt first
        return any(key == "code" or key.startswith("rebuilt:") for key in part.stale_reasons)

    def _auto_job(self, part):
        job = self.config.jobs_by_label.get(part.job_label)
        return job is not None and job.auto_rebuild == "stale"

    def _plan_sensors(self, now):
        # A sensor new to this server (or to its config) is evaluated now;
        # the others keep their plan.
        for sensor in self.config.sensors:
            if sensor.name not in self._sensor_next and sensor.name not in self._sensors_running:
                self._sensor_next[sensor.name] = now
                heapq.heappush(self._sensor_due, (now, sensor.name))

    def _tick_sensors(self, now):
        while self._sensor_due and self._sensor_due[0][0] <= now:
            when, name = heapq.heappop(self._sensor_due)
            sensor = self.config.sensors_by_name.get(name)
            if self._sensor_next.get(name) != when:
                continue  # planned again since
            del self._sensor_next[name]
            if sensor is None:
                continue  # gone from the config
            self._sensors_running.add(name)
            cursor = self.state.sensors.get(name, {}).get("cursor")
            self._sensor_workers.submit(self._evaluate_sensor, sensor, cursor, self._env())

    def _env(self):
        # What a sensor or an alert command gets, as a job does: the server.
        return dict(os.environ, DATABUILD_URL=self._url or "", DATABUILD_TOKEN=self._token or "",
                    DATABUILD_WORKSPACE=self.config.root)

    def _evaluate_sensor(self, sensor, cursor, env):
        # On a sensor worker's thread; the outcome comes back as a command.
        outcome = evaluate_sensor(sensor, self.config.root, cursor, env, self._sensor_procs)
        try:
            self.enqueue("sensor_result", name=sensor.name, outcome=outcome)
        except Unavailable:
            pass  # the server stops: the next one evaluates again

    def _cmd_sensor_result(self, now, name, outcome):
        self._sensors_running.discard(name)
        sensor = self.config.sensors_by_name.get(name)
        if sensor is not None and name not in self._sensor_next:
            self._sensor_next[name] = now + sensor.interval_seconds
            heapq.heappush(self._sensor_due, (now + sensor.interval_seconds, name))
        payload = {"name": name, "status": outcome["status"]}
        if outcome["status"] == "ok":
            try:  # every printed want checked before any is made
                requests = [sensor_want(name, body, self.config) for body in outcome["wants"]]
            except InvalidRequest as e:
                outcome = {"status": "failed", "error": "a printed want: %s" % e.message}
                payload["status"] = "failed"
        if outcome["status"] != "ok":
            payload["error"] = outcome["error"]
            self._emit(SENSOR_EVALUATE, payload, now)
            return None
        created = []
        for request in requests:
            want_id = request["want_id"]
            if want_id in created or self.find_want(want_id) is not None:
                continue  # a key is wanted once
            self._create_want(want_id, request["partitions"], request,
                              {"type": "sensor", "name": name}, now)
            created.append(want_id)
        payload.update(cursor=outcome["cursor"], want_ids=created, wants_printed=len(requests))
        self._emit(SENSOR_EVALUATE, payload, now)
        return None

    def _raise_alerts(self, now):
        # What the reducer noticed, as alert_raise events of each alert
        # configured for its kind: in the same commit as its cause.
        notices, self.state.notices = self.state.notices, []
        for kind, event_id, timestamp, summary, subject in notices:
            for alert in self.config.alerts:
                if kind in alert.on:
                    payload = {"alert": alert.name, "kind": kind, "event_id": event_id,
                               "timestamp": timestamp, "summary": summary}
                    payload.update(subject)
                    self._emit(ALERT_RAISE, payload, now)
                    heapq.heappush(self._alert_due, (now, self.state.latest_event_id))

    def _send_alerts(self, now):
        while self._alert_due and self._alert_due[0][0] <= now:
            _, alert_id = heapq.heappop(self._alert_due)
            alert = self.state.alerts.get(alert_id)
            if alert is None or alert.status != OWED or alert_id in self._alerts_sending:
                continue
            config = self.config.alerts_by_name.get(alert.alert)
            if config is None:
                self._emit(ALERT_FAILED, {"alert_id": alert_id, "given_up": True,
                                          "error": "alert %r is no longer in %s"
                                                   % (alert.alert, CONFIG_FILE)}, now)
                continue
            self._alerts_sending.add(alert_id)
            self._alert_workers.submit(self._deliver_alert, alert_id, config, alert.message(),
                                       self._env())

    def _deliver_alert(self, alert_id, config, message, env):
        # On an alert worker's thread.  Sent once its alert_raise is on disk
        # (a power loss never takes back an alert someone got).
        try:
            self.log.wait_durable(alert_id, timeout=30)
            error = deliver_alert(config, message, self.config.root, env)
        except Exception as e:  # (a result always comes back, or the alert stays owed)
            error = "%s: %s" % (type(e).__name__, e)
        try:
            self.enqueue("alert_result", alert_id=alert_id, error=error)
        except Unavailable:
            pass  # the server stops: the alert stays owed; the next server delivers it

    def _cmd_alert_result(self, now, alert_id, error):
        self._alerts_sending.discard(alert_id)
        alert = self.state.alerts.get(alert_id)
        if alert is None or alert.status != OWED:
            return None
        if error is None:
            self._emit(ALERT_DELIVERED, {"alert_id": alert_id, "attempt": alert.attempts + 1},
                       now)
            return None
        backoff = DEFAULTS["alert_backoff_seconds"]
        attempt = alert.attempts + 1
        payload = {"alert_id": alert_id, "attempt": attempt, "error": error[:2000]}
        if attempt > len(backoff):
            payload["given_up"] = True
            logger.error("Alert %s (%s) given up after %d attempts: %s", alert.alert,
                         alert.kind, attempt, error)
        else:
            payload["retry_at"] = now + backoff[attempt - 1]
            heapq.heappush(self._alert_due, (payload["retry_at"], alert_id))
        self._emit(ALERT_FAILED, payload, now)
        return None

    def _rebuild_upstream_first(self, ref, now):
        # README "Lineage": a partition is rebuilt after the partitions it was built
        # from (its recorded upstream) that are themselves to be rebuilt: it
        # waits while they are pending or building, and a Tainted one that
        # nothing wants any more is wanted for it (a derivative want, source
        # "lineage").  Returns True while ``ref`` must wait.
        state = self.state
        part = state.partitions.get(ref)
        if part is None or not part.upstream:
            return False
        wait, want = False, []
        for dep in part.upstream:
            if dep in state.pending_refs or dep in state.active_run_by_ref:
                wait = True
            elif state._status_of(dep) == TAINTED and not state.is_wanted(dep):
                want.append(dep)
        if want:
            parent = self._parent_want(ref)
            want_id = new_id()
            self._emit(WANT_CREATE, {
                "want_id": want_id, "partitions": want,
                "data_timestamp": parent.data_timestamp if parent else now,
                "ttl_seconds": parent.ttl_seconds if parent else None,
                "sla_seconds": parent.sla_seconds if parent else None,
                "source": {"type": "lineage", "ref": ref},
                "parent_want_id": parent.want_id if parent else None,
                "root_want_id": parent.root_want_id if parent else want_id,
                "comment": None, "priority": parent.priority if parent else 0}, now)
            wait = True
        return wait

    def _start_queued(self, now):
        # Each executor starts its queued runs, best first, up to its limit
        # and each job's max_concurrent_runs (README "Running on a cluster", "Scheduling policy").
        started = []
        if not any(self._queues.values()):
            return started
        running = collections.Counter()  # executor name -> runs; job label -> runs
        for run_id, handle in self._running.items():
            running[handle.executor.name] += 1
            running["job:" + self.state.job_runs[run_id].job_label] += 1
        for name, heap in list(self._queues.items()):
            executor = self._executor(name)
            held = []  # entries of jobs at their max_concurrent_runs: back in the heap after
            while heap and running[name] < executor.limit:
                entry = heapq.heappop(heap)
                run = self.state.job_runs.get(entry[2])
                if run is None or run.status != QUEUED or run.job_run_id in self._running:
                    continue  # started (or starting), ended or unknown since it was pushed
                job = self.config.jobs_by_label.get(run.job_label)
                if job is None:
                    self._fail(run, now, "no job labelled %r in the config" % run.job_label,
                               False)
                    continue
                priority = self._run_priority(run)
                if -entry[0] != priority or job.executor != name:
                    self._push_queued(run)
                    continue
                if (job.max_concurrent_runs is not None
                        and running["job:" + job.label] >= job.max_concurrent_runs):
                    held.append(entry)
                    continue
                try:
                    handle = executor.start(run, job, now)
                except ExecutorError as e:  # its message says it all
                    self._fail(run, now, e.message, self._may_retry(run))
                    continue
                except OSError as e:
                    self._fail(run, now, "cannot start job: %s" % e, self._may_retry(run))
                    continue
                if handle is None:  # not now: the executor wakes us
                    held.append(entry)
                    break
                running[name] += 1
                running["job:" + job.label] += 1
                self._running[run.job_run_id] = handle
                started.append(handle)
                if handle.started:  # else the executor reports it (_on_start)
                    self._emit_start(handle)
            for entry in held:
                heapq.heappush(heap, entry)
        return started

    # -- recovery and shutdown ------------------------------------------------

    def _recover(self, now):
        # README "Lifecycle", "Running on a cluster": runs a previous server
        # left Queued or Running fail with "server restarted" and their wants
        # go on -- except those an executor takes back (Slurm runs still
        # pending or running); the others stop what is left of them first.
        stale = [self.state.job_runs[run_id] for run_id in
                 list(self.state.job_runs_by_status[QUEUED])
                 + list(self.state.job_runs_by_status[RUNNING])]
        if not stale:
            return
        by_executor = {}  # each executor recovers its own runs
        for run in stale:
            by_executor.setdefault(run.executor or "local", []).append(run)
        for name, runs in sorted(by_executor.items()):
            if name in executors:
                for handle in self._executor(name).recover(runs, now):
                    self._running[handle.job_run_id] = handle
        stale = [run for run in stale if run.job_run_id not in self._running]
        for run in stale:
            self._fail(run, now, REASON_SERVER_RESTARTED, True, counted=False)
        self._commit()

    def shutdown(self, now=None):
        """Stop every job run (but those of executors that keep theirs: README
        "Running on a cluster") and record it Canceled ("server shutdown");
        close the executors.

        Queued runs are canceled too; commands still in the inbox get 503.
        Called by the loop on exit; safe to call from a test driving ``step``.
        """
        self._stop_requested = True
        now = self.clock() if now is None else now
        stopping = {run_id: handle for run_id, handle in self._running.items()
                    if not handle.executor.keeps_runs}  # the others run on (Slurm)
        kept = len(self._running) - len(stopping)
        if kept:
            logger.info("%d job run(s) go on in their executor (Slurm); the next server "
                        "takes them back", kept)
        for handle in stopping.values():
            handle.stop(REASON_SERVER_SHUTDOWN, now, DEFAULTS["kill_grace_seconds"])
        deadline = time.monotonic() + DEFAULTS["kill_grace_seconds"]
        while (any(run_id in self._running for run_id in stopping)
               and time.monotonic() < deadline + 5):
            if time.monotonic() >= deadline:
                for run_id, handle in stopping.items():
                    if run_id in self._running:
                        handle.kill()
            self.wait(0.05)
            self._record_starts()
            self._record_ends(self.clock())
        for run_id in list(self.state.job_runs_by_status[QUEUED]):
            self._emit(JOB_RUN_CANCEL, {"job_run_id": run_id,
                                        "reason": REASON_SERVER_SHUTDOWN}, self.clock())
        for executor in self._executors.values():
            executor.close()
        for proc in list(self._sensor_procs):  # an evaluation is tried again at the next start
            _signal_group(proc.pid, signal.SIGKILL)
        self._sensor_workers.close(1.0)
        self._alert_workers.close(1.0)  # an alert still owed is the next server's
        if self.adopt_orphans:
            self._orphans.sweep({})  # nothing of ours runs any more
        try:
            self._commit()
        finally:
            if self._syncer is not None:
                self._syncer.close()  # the last fsync, then its thread ends
                self._syncer = None
            while self._inbox:
                cmd = self._inbox.popleft()
                cmd.error = Unavailable("Server is shutting down")
                cmd.done.set()
            for cmds in self._waiting_cancels.values():
                for cmd in cmds:
                    cmd.error = Unavailable("Server is shutting down")
                    cmd.done.set()
            self._waiting_cancels.clear()


_LATER = object()  # a command answered later (when its job run has ended)


class _Syncer:
    """Makes the orchestrator's commits durable: fsyncs the event log in its own
    thread and only then answers the commands of those commits.

    One fsync covers every commit made while the previous one ran, so the
    orchestrator never waits for the disk and the fsync rate adapts to the
    load (pipelined group commit).  ``_pending`` is guarded by ``_cv``.
    """

    def __init__(self, log):
        self.log = log
        self._cv = threading.Condition()
        self._pending = []  # lists of answered commands, waiting for an fsync
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="databuild-syncer", daemon=True)
        self._thread.start()

    def submit(self, commands):
        """After a commit: answer ``commands`` once it is durable."""
        with self._cv:
            self._pending.append(commands)
            self._cv.notify()

    def _run(self):
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                batch, self._pending = self._pending, []
                if not batch and self._closing:
                    return
            try:
                self.log.sync()
            except StorageError as e:
                logger.error("%s", e.message)
                for commands in batch:
                    for cmd in commands:
                        cmd.error = Unavailable("Event log write failed: %s" % e.message)
            for commands in batch:
                for cmd in commands:
                    cmd.done.set()

    def close(self):
        """Flush what is pending and end the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()


def _tick_of(want_id):
    """The tick (epoch seconds) in a schedule's want id, or None."""
    try:
        stamp = want_id.rsplit(":", 3)[-3:]
        return datetime.datetime.strptime(":".join(stamp), "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc).timestamp()
    except (ValueError, IndexError):
        return None


###############################################################################
# Read model ##################################################################
###############################################################################

class MemoryView:
    """The read queries of ``StoreView``, answered from a state in memory
    (a full replay, as for ``as_of``); ``log`` answers ``partition_events``."""

    def __init__(self, state, log=None):
        self.state = state
        self.log = log
        self.latest_event_id = state.latest_event_id
        self.summary = state.summary()

    def partition_events(self, ref):
        """As ``StoreView.partition_events``, up to this view's event."""
        if self.log is None:
            return []
        with self.log.view() as store:
            return [e for e in store.partition_events(ref)
                    if e.event_id <= self.latest_event_id]

    def want(self, want_id):
        """One want as a dict, or None."""
        want = self.state.wants.get(want_id)
        return want.to_dict(self.state) if want is not None else None

    def resolve(self, kind, key):
        """As ``StoreView.resolve`` (a scan: the past is a replay anyway)."""
        ids = self.state.wants if kind == "wants" else self.state.job_runs
        if key in ids:
            return key
        return unique_id(key, sorted(i for i in ids if i.startswith(key))[:4],
                         kind[:-1].replace("_", " "))

    def wants(self, status, offset, limit):
        """``(page, total)`` of wants, newest first."""
        index = None if status is None else self.state.wants_by_status[status]
        page, total = _newest_first(self.state.wants, index, offset, limit)
        return [w.to_dict(self.state) for w in page], total

    def partition(self, ref):
        """One partition as a dict, or None."""
        part = self.state.partitions.get(ref)
        return part.to_dict() if part is not None else None

    def lineage(self, ref, depth):
        """As ``StoreView.lineage``, from the state in memory."""
        parts = self.state.partitions
        return lineage_tree(
            ref, depth,
            lambda refs: {r: (parts[r].status, parts[r].upstream) for r in refs if r in parts},
            lambda refs: {r: sorted(self.state.downstream.get(r, ())) for r in refs})

    def partitions(self, status, prefix, offset, limit, stale=False):
        """``(page, total)`` of partitions, newest first."""
        index = None if status is None else self.state.partitions_by_status[status]
        if stale:
            index = [ref for ref in self.state.stale if index is None or ref in index]
        keep = None if not prefix else (lambda p: p.ref.startswith(prefix))
        page, total = _newest_first(self.state.partitions, index, offset, limit, keep)
        return [p.to_dict() for p in page], total

    def alerts(self, status, offset, limit):
        """``(page, total)`` of alerts, newest first."""
        alerts = [a for a in reversed(self.state.alerts.values())
                  if status is None or a.status == status]
        return [a.to_dict() for a in alerts[offset:offset + limit]], len(alerts)

    def job_run(self, job_run_id):
        """One job run as a dict, or None."""
        run = self.state.job_runs.get(job_run_id)
        return run.to_dict() if run is not None else None

    def job_runs(self, status, job_label, want_id, offset, limit):
        """``(page, total)`` of job runs, newest first."""
        index = None if status is None else self.state.job_runs_by_status[status]
        if want_id is not None:
            want = self.state.wants.get(want_id)
            ids = want.job_run_ids if want is not None else ()
            index = [i for i in ids if index is None or i in index]
        keep = None if job_label is None else (lambda r: r.job_label == job_label)
        page, total = _newest_first(self.state.job_runs, index, offset, limit, keep)
        return [r.to_dict() for r in page], total


class ReadModel:
    """What readers read (README "Design"): the projection, or the past.

    ``read()`` is a consistent snapshot of the projection -- the reduced
    state the orchestrator writes in the same transaction as the events --
    queried through indexes, so a read costs the size of its answer, never a
    replay.  ``read(as_of=N)`` replays the log up to event N into a state in
    memory; a few such states are cached, so a burst of reads at one
    ``as_of`` replays once.
    """

    def __init__(self, log, past_states=4):
        self.log = log
        self._past_lock = threading.Lock()  # guards _past; each entry has a lock of its own
        self._past = collections.OrderedDict()
        self._past_states = past_states  # how many replays of the past are kept

    def read(self, as_of=None):
        """Context manager yielding a view (StoreView, or MemoryView for ``as_of``)."""
        if as_of is None:
            return self.log.view()
        view = MemoryView(self._state_at(as_of), self.log)
        return _Reading(lambda: view)

    def _state_at(self, as_of):
        latest = self.log.latest_event_id()
        if as_of > latest:
            raise InvalidRequest("as_of is beyond the latest event", as_of=as_of,
                                 latest_event_id=latest)
        with self._past_lock:  # (held for the lookup only, never through a replay)
            past = self._past.get(as_of)
            if past is None:
                past = self._past[as_of] = [threading.Lock(), None]  # [its lock, state]
                while len(self._past) > self._past_states:
                    self._past.popitem(last=False)
            else:
                self._past.move_to_end(as_of)
        with past[0]:  # one replay per as_of; readers of other points go on
            if past[1] is None:
                past[1] = BuildState.from_events(self.log.iter_events(upto=as_of))
            return past[1]


def _chunks(items, size=500):
    items = list(items)
    return [items[i:i + size] for i in range(0, len(items), size)]


def lineage_tree(ref, depth, nodes, downstream_of):
    """``{"ref", "status", "upstream": [...], "downstream": [...]}`` of a ref
    (None if it has no partition), each item ``{"ref", "status",
    "upstream"|"downstream": [...]}`` to ``depth`` levels; an item whose
    further lineage was cut by the depth says ``"truncated": true``.

    ``nodes(refs)`` gives ``{ref: (status, upstream refs)}`` for the refs that
    have a partition, ``downstream_of(refs)`` ``{ref: [refs built from it]}``:
    the tree asks for one level at a time.
    """
    root = nodes([ref]).get(ref)
    if root is None:
        return None
    statuses = {ref: root[0]}
    answer = {"ref": ref, "status": root[0]}
    for direction in ("upstream", "downstream"):
        links, frontier = {}, [ref]
        for _ in range(depth + 1):  # one level past the depth: to know what was cut
            if not frontier:
                break
            if direction == "upstream":
                found = nodes(frontier)
                statuses.update((r, v[0]) for r, v in found.items())
                level = {r: found[r][1] if r in found else [] for r in frontier}
            else:
                level = downstream_of(frontier)
            asked, frontier = frontier, []
            for r in asked:
                links[r] = level.get(r, [])
            for r in asked:
                frontier.extend(c for c in links[r] if c not in links and c not in frontier)
        missing = [r for refs in links.values() if refs for r in refs if r not in statuses]
        statuses.update((r, v[0]) for r, v in nodes(missing).items())

        def item(r, level, path):
            node = {"ref": r, "status": statuses.get(r)}
            children = links.get(r)
            if level >= depth:
                node[direction] = []
                if children:
                    node["truncated"] = True
            else:
                node[direction] = [item(c, level + 1, path | {r})
                                   for c in (children or ()) if c not in path]
            return node
        answer[direction] = item(ref, 0, frozenset())[direction]
    return answer


def explain_partition(view, ref, job_for, depth=3):
    """Why ``ref`` is in its state (README "Lineage"): ``{"ref", "status", "summary",
    "steps": [...], "upstream_failures": [...]}``.

    ``steps`` are the events that concern the ref, oldest first, each with its
    ``event_id``, ``timestamp``, ``type``, a sentence (``text``) and the ids it
    names: the wants that asked (and who), the runs that built or failed it
    (exit code, stderr tail), the dep misses and how their deps stand now,
    the taints, the retries.  For an UpstreamFailed ref, ``upstream_failures``
    explain the upstream refs that failed (to ``depth``).  A ref never built
    is explained by the job that would build it.  ``view`` is a StoreView;
    ``job_for(ref)`` the config's lookup.
    """
    part = view.partition(ref)
    events = view.partition_events(ref)
    status = part["status"] if part else None
    runs = {}  # job_run_id -> its job_run_queue payload
    steps = [_explain_step(event, view, runs) for event in events]
    answer = {"ref": ref, "status": status, "steps": steps, "upstream_failures": []}
    if part is None and not steps:
        try:
            job = job_for(ref)
        except InvalidRequest as e:
            answer["summary"] = "Never built: no job produces it (%s)" % e.message
        else:
            answer["summary"] = ("Never built: no want asked for it; it would be built by "
                                 "job %r" % job.label)
            answer["job_label"] = job.label
        return answer
    last = steps[-1] if steps else None
    if status == UPSTREAM_FAILED and depth > 0:
        for dep in part["missing_deps"] or part["upstream"]:  # reported, or declared
            dep_part = view.partition(dep)
            if dep_part is not None and dep_part["status"] in (FAILED, UPSTREAM_FAILED):
                answer["upstream_failures"].append(
                    explain_partition(view, dep, job_for, depth - 1))
    answer["summary"] = _explain_summary(status, part, last, answer["upstream_failures"])
    return answer


def _explain_summary(status, part, last, upstream_failures):
    said = last["text"] if last else "no events"
    if status == UPSTREAM_FAILED and upstream_failures:
        first = upstream_failures[0]
        return "UpstreamFailed: upstream %s is %s -- %s" % (first["ref"], first["status"],
                                                           first["summary"])
    if status == UPSTREAM_BUILDING:
        return "UpstreamBuilding: waiting for %s" % _few(part["missing_deps"]
                                                        or part["upstream"], 5)
    if status == CANCELED:
        return "Canceled: its work was dropped before it was ever built (%s); a new want " \
            "builds it" % said
    if status == LIVE and part.get("stale"):  # README "Freshness"
        return "Live but stale, built by run %s: %s" % (_short(part["built_by_job_run_id"]),
                                                       "; ".join(part["stale_reasons"]))
    if status == LIVE:
        return "Live, built by run %s" % _short(part["built_by_job_run_id"])
    return "%s: %s" % (status, said)


def _explain_step(event, view, runs):
    p = event.payload
    step = {"event_id": event.event_id, "timestamp": isoformat(event.timestamp),
            "type": event.type}
    run_id = p.get("job_run_id")
    if run_id:
        step["job_run_id"] = run_id
    if event.type == JOB_RUN_QUEUE:
        runs[run_id] = p
    queued = runs.get(run_id, {})
    # Sentences for a terminal: ids cut to 8 characters (the CLI takes them as
    # they are), lists to their first few; the fields beside hold them whole.
    run_name = "run %s (%s, attempt %s)" % (_short(run_id), queued.get("job_label"),
                                           queued.get("attempt", 1))
    if event.type == WANT_CREATE:
        source = p.get("source") or {}
        step["want_id"] = p["want_id"]
        if source.get("type") == "job":
            why = "as a dep of run %s" % _short(source.get("job_run_id"))
        elif source.get("type") == "lineage":
            why = "to rebuild it before %s, which was built from it" % source.get("ref")
        elif source.get("type") == "deps":
            why = "as declared deps (%s) of %s" % (_few(p["partitions"]), source.get("ref"))
        elif source.get("type") == "retry":
            why = "as a retry of want %s" % _short(source.get("want_id"))
        else:
            why = "(%s%s)" % (source.get("type", "manual"),
                              ", by %s" % source["user"] if source.get("user") else "")
        step["text"] = "want %s asked for it %s" % (_short(p["want_id"]), why)
    elif event.type in (WANT_CANCEL, WANT_EXPIRE):
        step["want_id"] = p["want_id"]
        step["text"] = "want %s was %s" % (_short(p["want_id"]), "canceled" if event.type ==
                                           WANT_CANCEL else "expired (past its TTL)")
    elif event.type == JOB_RUN_QUEUE:
        step["text"] = "%s queued" % run_name
    elif event.type == JOB_RUN_START:
        step["text"] = "%s started" % run_name
    elif event.type == JOB_RUN_SUCCESS:
        read = p.get("read_deps") or []
        step["read_deps"] = read
        step["text"] = "%s succeeded%s" % (run_name, ", read %s" % _few(read) if read else "")
    elif event.type == JOB_RUN_FAILURE:
        step.update(exit_code=p.get("exit_code"), error=p.get("error"),
                    stderr_tail=p.get("stderr_tail") or [])
        step["text"] = "%s failed: %s%s" % (run_name, p.get("error"),
                                           "; to be retried" if p.get("retry") else "")
    elif event.type == JOB_RUN_MISSING_DEPS:
        deps = p["missing_deps"]
        now = {}
        for dep in deps[:20]:
            dep_part = view.partition(dep)
            now[dep] = dep_part["status"] if dep_part else "not built"
        step["missing_deps"] = deps
        step["deps_now"] = now
        unlive = ["%s %s" % (d, s) for d, s in now.items() if s != LIVE]
        step["text"] = "%s reported missing %s; now %s" % (
            run_name, _few(deps), _few(unlive) if unlive else "all Live")
    elif event.type == JOB_RUN_CANCEL:
        step["text"] = "%s canceled: %s" % (run_name, p.get("reason"))
    elif event.type == PARTITION_TAINT:
        via = p.get("upstream_of")
        step["text"] = "tainted%s%s" % (": %s" % p["reason"] if p.get("reason") else "",
                                        " (built from %s, tainted with it)" % via if via else "")
    else:
        step["text"] = event.type
    return step


_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _short(value):
    """A generated id cut to 8 characters (a unique prefix, which commands
    take as the id); anything else as it is."""
    return value[:8] if isinstance(value, str) and _UUID_RE.fullmatch(value) else value


def _few(items, n=3):
    """The first ``n`` items, then ``(+N more)``: a list for a sentence or a cell."""
    items = [str(_short(i)) for i in items]
    return ", ".join(items[:n]) + (" (+%d more)" % (len(items) - n) if len(items) > n else "")


def _newest_first(entities, index, offset, limit, keep=None):
    """Page through ``entities`` (creation-ordered dict) newest first.

    ``index`` (ids, or None for all) narrows the candidates; ``keep`` filters
    them.  Returns ``(page, total)``.
    """
    if keep is None:
        if index is None:
            return [entities[k] for k in itertools.islice(reversed(entities), offset,
                                                          offset + limit)], len(entities)
        ids = heapq.nlargest(offset + limit, index, key=lambda k: entities[k].seq)
        return [entities[k] for k in ids[offset:]], len(index)
    source = reversed(entities) if index is None else sorted(
        index, key=lambda k: entities[k].seq, reverse=True)
    matches = [entities[k] for k in source if keep(entities[k])]
    return matches[offset:offset + limit], len(matches)


###############################################################################
# HTTP API ####################################################################
###############################################################################

#: Domain errors -> HTTP status codes (the one place that knows both).
HTTP_STATUS = (
    (InvalidRequest, 400), (ConfigError, 400), (Unauthorized, 401), (NotFound, 404),
    (Conflict, 409),
    (PayloadTooLarge, 413), (UnsupportedMediaType, 415), (Unavailable, 503),
    (StorageError, 503), (ServerUnreachable, 502), (DatabuildError, 500),
)
JSON_TYPE = "application/json; charset=utf-8"
_DIGITS_RE = re.compile(r"[0-9]+")
#: The largest integer a query parameter takes (2**53 - 1: exact in every JSON client).
MAX_INT = 2 ** 53 - 1


def _import_bottle():
    try:
        import bottle
    except ImportError:
        raise ConfigError("The server needs bottle and waitress: pip install bottle waitress") from None
    return bottle


def _encode_json(obj):
    """An answer's bytes: always valid UTF-8 (a lone surrogate that slipped
    into a message becomes "?", never a failed answer)."""
    return dumps(obj).encode("utf-8", "replace")


def _refuse_constant(name):
    raise InvalidRequest("Body is not valid JSON: %s is not a JSON number" % name)


def parse_json_body(raw):
    """A request body (bytes) as a JSON object, or InvalidRequest.

    Refused: invalid JSON, ``NaN`` and ``Infinity`` (not JSON), nesting
    too deep to parse, and strings that are not valid Unicode (a lone
    surrogate such as ``"\\ud800"``, which SQLite cannot store): the error
    names the top-level field they are in.
    """
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidRequest("Body is not acceptable JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest("Body is not valid JSON: %s" % e) from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    for field, value in body.items():
        stack = [field, value]
        while stack:  # not recursive: a deep body must not exhaust the stack
            item = stack.pop()
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidRequest("%s holds text that is not valid Unicode (a lone "
                                         "surrogate)" % _shown(field),
                                         field=_shown(field)) from None
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    return body


def http_status_for(error):
    """The HTTP status code of a DatabuildError."""
    for cls, status in HTTP_STATUS:
        if isinstance(error, cls):
            return status
    return 500


def _sse(event, data):
    return ("event: %s\ndata: %s\n\n" % (event, data)).encode("utf-8")


def _follow_log(path, job_run_id, read_model, server, poll=0.1, heartbeat=1.0):
    """Server-Sent Events of a job run's log: ``log`` per line, then ``complete``.

    Holds one waitress thread while the run lasts, but sleeps between polls
    of the file (on the server's stop event, so a stop ends it at once); a
    heartbeat comment every second finds clients that went away.  The
    number of concurrent streams is capped (``server.streams``) so followers
    can never take every worker thread.
    """
    try:
        yield b": following job run %s\n\n" % job_run_id.encode()  # headers go out now
        position, partial, last_sent = 0, b"", time.monotonic()
        while True:
            # The status first: once the run has ended, its file is complete.
            with read_model.read() as view:
                run = view.job_run(job_run_id)
            finished = run["status"] not in ACTIVE_JOB_RUN_STATUSES
            summary = {"status": run["status"], "exit_code": run["exit_code"],
                       "duration_ms": run["duration_ms"]}
            try:
                with open(path, "rb") as f:
                    f.seek(position)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            if data:
                position += len(data)
                *lines, partial = (partial + data).split(b"\n")
                for line in lines:
                    yield _sse("log", line.decode("utf-8", "replace").rstrip("\r"))
                last_sent = time.monotonic()
            if finished:
                if partial:
                    yield _sse("log", partial.decode("utf-8", "replace").rstrip("\r"))
                yield _sse("complete", dumps(summary))
                return
            if server.stopping:
                return
            if time.monotonic() - last_sent >= heartbeat:
                yield b": keepalive\n\n"
                last_sent = time.monotonic()
            server.stop_event.wait(poll)
    finally:
        server.streams.release()


def schedule_to_dict(schedule, last_want, now):
    """A schedule as ``GET /api/schedules`` shows it: when it ticks, its last
    tick and want (``last_want``: the want dict or None), its next tick."""
    last_tick = _tick_of(last_want["want_id"]) if last_want else None
    next_tick = next(schedule.ticks_after(max(now, last_tick or now)))
    return {"name": schedule.name, "cron": schedule.cron.text if schedule.cron else None,
            "interval_seconds": schedule.interval_seconds, "timezone": schedule.timezone,
            "partitions": list(schedule.partitions), "lag_seconds": schedule.lag_seconds,
            "catch_up": schedule.catch_up, "priority": schedule.priority,
            "next_tick_at": isoformat(next_tick), "last_tick_at": isoformat(last_tick),
            "last_want_id": last_want["want_id"] if last_want else None,
            "last_want_status": last_want["status"] if last_want else None}


def sensor_to_dict(sensor, evaluated):
    """A sensor as ``GET /api/sensors`` shows it: its config and what its
    evaluations left in the log (``evaluated``: ``BuildState.sensors``'s entry)."""
    evaluated = evaluated or {}
    return {"name": sensor.name, "command": list(sensor.command),
            "interval_seconds": sensor.interval_seconds,
            "timeout_seconds": sensor.timeout_seconds, "cursor": evaluated.get("cursor"),
            "last_evaluated_at": isoformat(evaluated.get("last_evaluated_at")),
            "last_status": evaluated.get("last_status"),
            "last_error": evaluated.get("last_error"),
            "wants_created": evaluated.get("wants_created", 0),
            "evaluations": evaluated.get("evaluations", 0)}


def job_to_dict(job, run_counts):
    """A configured job as ``GET /api/jobs`` shows it, with its job runs by status."""
    return {"label": job.label, "partition_patterns": list(job.partition_patterns),
            "entrypoint": list(job.entrypoint), "executor": job.executor,
            "environment_keys": sorted(job.environment),
            "max_partitions_per_run": job.max_partitions_per_run,
            "max_retries": job.max_retries, "timeout_seconds": job.timeout_seconds,
            "max_concurrent_runs": job.max_concurrent_runs,
            "retry_backoff_seconds": job.retry_backoff_seconds,
            "retry_backoff_max_seconds": job.retry_backoff_max_seconds,
            "options": dict(job.options), "code_version": job.code_version,
            "auto_rebuild": job.auto_rebuild,
            "job_runs": {s: n for s, n in run_counts.items() if n}}


def _file_chunks(f, start, length, chunk=1 << 16):
    """``length`` bytes of an open file from ``start``, in chunks, then close it:
    a log is streamed, never read whole into memory."""
    try:
        f.seek(start)
        while length > 0:
            data = f.read(min(chunk, length))
            if not data:
                return
            length -= len(data)
            yield data
    finally:
        f.close()


def metrics_text(summary, http_requests, uptime):
    """Prometheus text exposition (format 0.0.4) of a state summary
    (``BuildState.summary()``) and request counts."""
    out = []
    counts = summary["counts"]
    buckets, duration_sum, duration_count = summary["durations"]

    def family(name, kind, help_text, samples):
        out.append("# HELP %s %s" % (name, help_text))
        out.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            label_text = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\")
                                                 .replace('"', '\\"').replace("\n", "\\n"))
                                  for k, v in labels)
            out.append("%s%s %s" % (name, "{%s}" % label_text if label_text else "",
                                    repr(float(value)) if isinstance(value, float) else value))

    family("databuild_wants", "gauge", "Wants by status.",
           [((("status", s),), counts["wants"].get(s, 0)) for s in WANT_STATUSES])
    family("databuild_partitions", "gauge", "Partitions by status.",
           [((("status", s),), counts["partitions"].get(s, 0)) for s in PARTITION_STATUSES])
    family("databuild_job_runs", "gauge", "Job runs by status.",
           [((("status", s),), counts["job_runs"].get(s, 0)) for s in JOB_RUN_STATUSES])
    family("databuild_stale_partitions", "gauge", "Live partitions that are stale.",
           [((), counts["stale"])])
    family("databuild_alerts", "gauge", "Alerts by delivery status.",
           [((("status", s),), counts["alerts"].get(s, 0)) for s in ALERT_STATUSES])
    family("databuild_events_total", "counter", "Events in the build event log.",
           [((), summary["event_id"])])
    family("databuild_sla_breaches_total", "counter", "Wants that breached their SLA.",
           [((), summary["sla_breaches"])])
    family("databuild_http_requests_total", "counter", "HTTP requests by method and status code.",
           [((("method", m), ("code", c)), n) for (m, c), n in sorted(http_requests.items())])
    cumulative, samples = 0, []
    for bound, count in zip(DURATION_BUCKETS, buckets):
        cumulative += count
        samples.append(((("le", "+Inf" if bound == float("inf") else repr(bound)),), cumulative))
    out.append("# HELP databuild_job_run_duration_seconds Durations of finished job runs.")
    out.append("# TYPE databuild_job_run_duration_seconds histogram")
    for labels, value in samples:
        out.append('databuild_job_run_duration_seconds_bucket{le="%s"} %d' % (labels[0][1], value))
    out.append("databuild_job_run_duration_seconds_sum %r" % float(duration_sum))
    out.append("databuild_job_run_duration_seconds_count %d" % duration_count)
    family("databuild_uptime_seconds", "gauge", "Seconds since the server started.",
           [((), round(float(uptime), 3))])
    return "\n".join(out) + "\n"


class _Api:
    """What the routes of the HTTP API share: the server, Bottle's request and
    response, and the helpers that validate a request's query and body (each
    raises InvalidRequest, ... naming the parameter or field)."""

    def __init__(self, server, bottle):
        self.server = server
        self.read_model = server.read_model
        self.request, self.response = bottle.request, bottle.response
        self.max_body = DEFAULTS["max_body_bytes"]

    def query(self, allowed):
        unknown = sorted(set(self.request.query) - set(allowed))
        if unknown:
            raise InvalidRequest("Unknown query parameter(s): %s"
                                 % ", ".join(map(_shown, unknown)),
                                 parameters=[_shown(u) for u in unknown])
        return self.request.query

    def text_param(self, name, empty_ok=True):
        # Bottle hands query values over as Latin-1; they are UTF-8.
        raw = self.request.query.get(name)
        if raw is None:
            return None
        try:
            value = raw.encode("latin-1").decode("utf-8")
        except UnicodeError:
            raise InvalidRequest("%s is not valid UTF-8" % name, parameter=name) from None
        if not value and not empty_ok:
            raise InvalidRequest("%s must not be empty (leave it out instead)" % name,
                                 parameter=name)
        return value

    def int_param(self, name, default, minimum=0, maximum=MAX_INT):
        raw = self.text_param(name, empty_ok=False)
        if raw is None:
            return default
        value = int(raw) if _DIGITS_RE.fullmatch(raw) and len(raw) <= 20 else None
        if value is None or value < minimum or value > maximum:
            raise InvalidRequest("%s must be an integer from %d to %d" % (name, minimum, maximum),
                                 parameter=name, value=_shown(raw))
        return value

    def ref_param(self):
        """The ``ref`` query parameter of the query routes of partitions (required)."""
        ref = self.text_param("ref", empty_ok=False)
        if ref is None:
            raise InvalidRequest("ref is required: ?ref=<partition ref>", parameter="ref")
        return ref

    def bool_param(self, name):
        raw = (self.text_param(name, empty_ok=False) or "false").lower()
        if raw not in ("true", "false", "1", "0"):
            raise InvalidRequest("%s must be true or false" % name, parameter=name,
                                 value=_shown(raw))
        return raw in ("true", "1")

    def status_param(self, allowed):
        raw = self.text_param("status", empty_ok=False)
        if raw is None:
            return None
        if raw not in allowed:
            raise InvalidRequest("Unknown status %r (one of %s)" % (raw, ", ".join(allowed)),
                                 parameter="status", value=_shown(raw))
        return raw

    def paging(self):
        return (self.int_param("limit", DEFAULTS["list_limit"], 0, DEFAULTS["list_limit_max"]),
                self.int_param("offset", 0))

    def as_of(self):
        return self.int_param("as_of", None)

    def body_json(self):
        ctype = (self.request.content_type or "").split(";")[0].strip().lower()
        if self.request.content_length > self.max_body:
            raise PayloadTooLarge("Request body over %d bytes" % self.max_body, limit=self.max_body)
        # A POST with no body at all needs no type when the request carries
        # the token (a foreign page cannot send it): the body is optional.
        no_body = (self.request.content_length <= 0
                   and "HTTP_TRANSFER_ENCODING" not in self.request.environ)
        if ctype != "application/json" and not (
                no_body and not ctype and self.request.environ.get("databuild.bearer")):
            raise UnsupportedMediaType("POST bodies must be application/json",
                                       content_type=_shown(self.request.content_type or "") or None)
        raw = self.request.body.read(self.max_body + 1)
        if len(raw) > self.max_body:
            raise PayloadTooLarge("Request body over %d bytes" % self.max_body, limit=self.max_body)
        if not raw.strip():
            return {}
        return parse_json_body(raw)

    def listing(self, page, total, limit, offset, view):
        return {"data": page, "total": total, "limit": limit, "offset": offset,
                "latest_event_id": view.latest_event_id}

    def entity(self, view, kind, key):
        # (full id, dict) of a want or job run named by its id or a unique prefix.
        get = view.want if kind == "wants" else view.job_run
        found = get(key)
        if found is None:
            full = view.resolve(kind, key)
            found = get(full) if full is not None else None
        if found is None:
            if kind == "wants":
                raise NotFound("Want not found", want_id=_shown(key))
            raise NotFound("Job run not found", job_run_id=_shown(key))
        return found["want_id" if kind == "wants" else "job_run_id"], found

    def full_id(self, kind, key):
        with self.read_model.read() as view:
            return self.entity(view, kind, key)[0]

    def orchestrator(self):
        if self.server.orchestrator is None:
            raise Unavailable("This server does not accept writes")
        return self.server.orchestrator


def _wants_routes(app, api):
    """The routes of wants: list, create (or plan), get, cancel, retry."""

    @app.get("/api/wants")
    def list_wants():
        api.query(("status", "limit", "offset", "as_of"))
        status = api.status_param(WANT_STATUSES)
        limit, offset = api.paging()
        with api.read_model.read(api.as_of()) as view:
            page, total = view.wants(status, offset, limit)
            return api.listing(page, total, limit, offset, view)

    @app.post("/api/wants")
    def create_want():
        api.query(("dry_run",))
        dry_run = api.bool_param("dry_run")
        want_request = parse_want_request(api.body_json(), api.server.config)
        if dry_run:  # the plan (README "Backfills"): nothing written
            return {"data": api.orchestrator().submit("plan_want", request=want_request)}
        created, want = api.orchestrator().submit("create_want", request=want_request)
        api.response.status = 201 if created else 200
        return {"data": want}

    @app.post("/api/wants/<want_id>/retry")
    def retry_want(want_id):
        api.query(())
        body = api.body_json()
        if body:
            raise InvalidRequest("A retry takes no fields (send {} or no body)",
                                 fields=sorted(body) if isinstance(body, dict) else None)
        want_id = api.full_id("wants", want_id)
        want = api.orchestrator().submit("retry_want", want_id=want_id)
        api.response.status = 201
        return {"data": want}

    @app.get("/api/wants/<want_id>")
    def get_want(want_id):
        api.query(("as_of",))
        with api.read_model.read(api.as_of()) as view:
            return {"data": api.entity(view, "wants", want_id)[1]}

    @app.delete("/api/wants/<want_id>")
    def cancel_want(want_id):
        api.query(())
        want_id = api.full_id("wants", want_id)
        return {"data": api.orchestrator().submit("cancel_want", want_id=want_id)}


def _partitions_routes(app, api):
    """The routes of partitions: list, get, lineage, explain, taint.  Each takes
    the ref in the path (``/api/partitions/<ref>/lineage``: lineage and
    explain come before get, as a ref may hold '/') or, for any ref (one
    that ends in ``/lineage`` too), as a query parameter
    (``/api/partition/lineage?ref=R``)."""

    def routes(method, suffix, handler, allowed, ref_rule="<ref:path>"):
        # The path route and the query route of one partition operation.
        def by_path(ref):
            api.query(allowed)
            return handler(ref)

        def by_query():
            api.query(allowed + ("ref",))
            return handler(api.ref_param())
        app.route("/api/partitions/" + ref_rule + suffix, method, by_path)
        app.route("/api/partition" + suffix, method, by_query)

    @app.get("/api/partitions")
    def list_partitions():
        api.query(("status", "prefix", "stale", "limit", "offset", "as_of"))
        status = api.status_param(PARTITION_STATUSES)
        prefix = api.text_param("prefix") or None
        stale = api.bool_param("stale")
        limit, offset = api.paging()
        with api.read_model.read(api.as_of()) as view:
            page, total = view.partitions(status, prefix, offset, limit, stale=stale)
            return api.listing(page, total, limit, offset, view)

    def lineage(ref):
        depth = api.int_param("depth", 3, 0, DEFAULTS["lineage_depth_max"])
        with api.read_model.read(api.as_of()) as view:
            tree = view.lineage(ref, depth)
        if tree is None:
            raise NotFound("Partition not found", ref=_shown(ref))
        return {"data": tree}

    def explain(ref):
        check_ref(ref)
        with api.read_model.read(api.as_of()) as view:
            return {"data": explain_partition(view, ref, api.server.config.job_for)}

    def get(ref):
        with api.read_model.read(api.as_of()) as view:
            part = view.partition(ref)
        if part is None:
            raise NotFound("Partition not found", ref=_shown(ref))
        return {"data": part}

    def taint(ref):
        body = api.body_json()
        unknown = sorted(set(body) - {"reason", "downstream", "dry_run"})
        if unknown:
            raise InvalidRequest("Unknown field(s): %s" % ", ".join(unknown), fields=unknown)
        reason = _string(body, "reason", 10000)
        flags = {}
        for name in ("downstream", "dry_run"):
            flags[name] = body.get(name, False)
            if not isinstance(flags[name], bool):
                raise InvalidRequest("%s must be true or false" % name, field=name)
        answer = api.orchestrator().submit("taint", ref=ref, reason=reason, **flags)
        return {"data": answer["partition"], "tainted": answer["tainted"],
                "dry_run": answer["dry_run"]}

    routes("GET", "/lineage", lineage, ("depth", "as_of"))
    routes("GET", "/explain", explain, ("as_of",))
    # A path that ends in /taint is the taint's only: a partition whose ref
    # ends so is read with ?ref= (so OPTIONS and 405 name one route's methods).
    routes("GET", "", get, ("as_of",), ref_rule="<ref:re:(?!.*/taint$).+>")
    routes("POST", "/taint", taint, ())


def _job_runs_routes(app, api):
    """The routes of job runs: list, get, cancel, logs (plain or followed)."""

    @app.get("/api/job_runs")
    def list_job_runs():
        api.query(("status", "job_label", "want_id", "limit", "offset", "as_of"))
        status = api.status_param(JOB_RUN_STATUSES)
        label = api.text_param("job_label") or None
        want_id = api.text_param("want_id") or None
        limit, offset = api.paging()
        with api.read_model.read(api.as_of()) as view:
            page, total = view.job_runs(status, label, want_id, offset, limit)
            return api.listing(page, total, limit, offset, view)

    @app.get("/api/job_runs/<job_run_id>")
    def get_job_run(job_run_id):
        api.query(("as_of",))
        with api.read_model.read(api.as_of()) as view:
            return {"data": api.entity(view, "job_runs", job_run_id)[1]}

    @app.post("/api/job_runs/<job_run_id>/cancel")
    def cancel_job_run(job_run_id):
        api.query(())
        api.body_json()
        return {"data": api.orchestrator().submit("cancel_job_run",
                                              job_run_id=api.full_id("job_runs", job_run_id))}

    @app.get("/api/job_runs/<job_run_id>/logs/<stream>")
    def job_run_log(job_run_id, stream):
        api.query(("follow", "tail"))
        job_run_id = api.full_id("job_runs", job_run_id)
        # The path is built from a known job run id, never from user input.
        path = job_run_log_path(api.server.config.state_dir, job_run_id, stream)
        if api.bool_param("follow"):
            stream_slot = api.server.streams.acquire(blocking=False)
            if not stream_slot:
                raise Unavailable("Too many log streams open; try again later")
            api.response.content_type = "text/event-stream; charset=utf-8"
            api.response.set_header("Cache-Control", "no-cache")
            return _follow_log(path, job_run_id, api.read_model, api.server)
        tail = api.int_param("tail", None)
        api.response.content_type = "text/plain; charset=utf-8"
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            api.response.set_header("Content-Length", "0")
            return b""
        size = os.fstat(f.fileno()).st_size
        start = 0 if tail is None else max(0, size - tail)
        api.response.set_header("Content-Length", str(size - start))
        return _file_chunks(f, start, size - start)


def _service_routes(app, api):
    """The routes of the server itself: health, metrics, the OpenAPI document,
    the dashboard, events, jobs, schedules, shutdown."""

    @app.get("/health")
    def health():
        api.query(())
        api.server.config_watcher.current()  # an edited databuild.toml: reloaded, or its error known
        return {"status": "ok", "version": __version__,
                "latest_event_id": api.server.read_model.log.latest_event_id(),
                "uptime_seconds": round(time.time() - api.server.started_at, 3),
                "pid": os.getpid(), "config_error": api.server.config_watcher.error,
                "kept_up_by": api.server.kept_up_by()}

    @app.get("/api/schedules")
    def list_schedules():
        api.query(())
        now = time.time()
        items = []
        with api.read_model.read() as view:
            for schedule in api.server.config.schedules:
                last_id = api.read_model.log.last_want_id("schedule:%s:" % schedule.name)
                last = view.want(last_id) if last_id else None
                items.append(schedule_to_dict(schedule, last, now))
            return {"data": items, "total": len(items), "limit": len(items), "offset": 0,
                    "latest_event_id": api.read_model.log.latest_event_id()}

    @app.get("/api/sensors")
    def list_sensors():
        api.query(("as_of",))
        with api.read_model.read(api.as_of()) as view:
            evaluated = view.summary["sensors"]
            items = [sensor_to_dict(sensor, evaluated.get(sensor.name))
                     for sensor in api.server.config.sensors]
            return {"data": items, "total": len(items), "limit": len(items), "offset": 0,
                    "latest_event_id": view.latest_event_id}

    @app.get("/api/alerts")
    def list_alerts():
        api.query(("status", "limit", "offset", "as_of"))
        status = api.status_param(ALERT_STATUSES)
        limit, offset = api.paging()
        with api.read_model.read(api.as_of()) as view:
            page, total = view.alerts(status, offset, limit)
            return api.listing(page, total, limit, offset, view)

    @app.get("/api/jobs")
    def list_jobs():
        api.query(("as_of",))
        with api.read_model.read(api.as_of()) as view:
            counts = view.summary["job_runs_by_job"]
            jobs = [job_to_dict(job, counts.get(job.label, {}))
                    for job in api.server.config.jobs]
            return {"data": jobs, "total": len(jobs), "limit": len(jobs), "offset": 0,
                    "latest_event_id": view.latest_event_id}

    @app.get("/metrics")
    def metrics():
        api.query(())
        with api.read_model.read() as view:
            text = metrics_text(view.summary, api.server.http_requests(),
                                time.time() - api.server.started_at)
        api.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return text

    @app.get("/api/openapi.json")
    def openapi():
        api.query(())
        return openapi_document()

    @app.get("/")
    def dashboard():
        api.query(())
        api.response.content_type = "text/html; charset=utf-8"
        return _DASHBOARD_HTML

    @app.get("/api/events")
    def list_events():
        # Oldest first after ``since``; with ``before``, the newest before it
        # first (a page back from there).  ``type`` keeps one type of event:
        # its total is not counted (that would be a scan of the log).
        api.query(("since", "limit", "before", "type"))
        since = api.int_param("since", 0)
        before = api.int_param("before", None)
        limit = api.int_param("limit", DEFAULTS["list_limit"], 0, DEFAULTS["list_limit_max"])
        type_ = api.text_param("type", empty_ok=False)
        if type_ is not None and type_ not in EVENT_TYPES:
            raise InvalidRequest("type must be one of %s" % ", ".join(EVENT_TYPES),
                                 parameter="type", value=type_)
        log = api.read_model.log
        latest = log.latest_event_id()
        upto = latest if before is None else min(latest, before - 1)
        events = log.list_events(since, limit, upto, type_, newest_first=before is not None)
        total = None if type_ is not None else max(0, upto - since)
        return {"data": [e.to_dict() for e in events], "total": total, "limit": limit,
                "since": since, "before": before, "type": type_, "latest_event_id": latest}

    @app.post("/api/shutdown")
    def shutdown():
        api.query(())
        api.body_json()
        api.server.request_stop("shutdown requested over HTTP")
        api.response.status = 202
        return {"status": "shutting down"}


def make_app(server):
    """Build the Bottle application for ``server`` (a Server, or anything with
    its attributes: ``config``, ``config_watcher``, ``read_model``,
    ``orchestrator``, ``started_at``, ``stopping``, ``stop_event``, ``streams``,
    ``http_requests`` and ``request_stop(reason)``).  Routes validate input,
    make one call into the domain and return a dict.  ``Server`` puts
    ``_Gate`` (Host check, token, CORS, request counts) in front of it.
    """
    bottle = _import_bottle()
    app = bottle.Bottle(catchall=True)
    api = _Api(server, bottle)
    request, response = api.request, api.response

    def json_error(status, body):
        response.status = status
        response.content_type = JSON_TYPE
        return _encode_json(body)

    def boundary(callback):
        # The one boundary where every exception becomes an HTTP answer.
        @functools.wraps(callback)
        def wrapper(*args, **kwargs):
            try:
                if server.stopping and request.method != "GET":
                    raise Unavailable("Server is shutting down")
                result = callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except DatabuildError as e:
                return json_error(http_status_for(e), e.to_dict())
            except Exception:
                error_id = uuid.uuid4().hex[:12]
                logger.exception("Unhandled error %s in %s %s", error_id, request.method,
                                 request.path)
                return json_error(500, {"error": "Internal server error", "error_id": error_id})
            if isinstance(result, dict):
                response.content_type = JSON_TYPE
                return _encode_json(result)
            return result
        return wrapper

    app.install(boundary)

    def default_error(error):
        # Bottle's own errors (unknown route, wrong method) as JSON too.
        response.content_type = JSON_TYPE
        message = {404: "Not found", 405: "Method not allowed"}.get(error.status_code,
                                                                    error.status_line)
        body = {"error": message}
        if error.status_code == 404:
            body["path"] = request.path
        if error.status_code == 405:
            body["allow"] = response.headers.get("Allow")
        return _encode_json(body)

    app.default_error_handler = default_error

    for add_routes in (_service_routes, _wants_routes, _partitions_routes, _job_runs_routes):
        add_routes(app, api)
    return app


class _OpenAPI:
    """The building blocks of the OpenAPI document: references, answers,
    errors, parameters and the shapes the lists share (``o`` in the parts)."""

    ERROR_TEXT = {400: "Bad input", 401: "Missing or wrong access token", 404: "Not found",
                  409: "Conflict", 413: "Body too large", 415: "Body is not application/json",
                  503: "Shutting down or busy"}
    integer = {"type": "integer", "minimum": 0, "maximum": MAX_INT}
    nullable_str = {"type": "string", "nullable": True}
    nullable_num = {"type": "number", "nullable": True}

    @staticmethod
    def number_in(bounds):
        """A nullable number from ``bounds[0]`` to ``bounds[1]``."""
        return {"type": "number", "nullable": True, "minimum": bounds[0], "maximum": bounds[1]}
    str_list = {"type": "array", "items": {"type": "string"}}

    def __init__(self):
        self.paging = [self.param("limit", "query", {"type": "integer", "minimum": 0,
                                                     "maximum": 1000, "default": 100},
                                  "page size"),
                       self.param("offset", "query", self.integer, "items to skip"),
                       self.param("as_of", "query", self.integer, "answer as of this event id")]
        self.as_of = [self.paging[2]]
        self.post_body = {"required": False, "content": self.json_body({"type": "object"})}
        self.want_id = self.param("want_id", "path", {"type": "string"}, "want id")
        self.ref = self.param("ref", "path", {"type": "string"}, "partition ref (may contain /)")
        self.run_id = self.param("job_run_id", "path", {"type": "string"}, "job run id")

    @staticmethod
    def schema(name):
        """A reference to a schema of the document."""
        return {"$ref": "#/components/schemas/" + name}

    @staticmethod
    def json_body(s):
        """A JSON content of schema ``s``."""
        return {"application/json": {"schema": s}}

    @staticmethod
    def answer(description, s=None, media="application/json"):
        """A response, with content of schema ``s`` if given."""
        r = {"description": description}
        if s is not None:
            r["content"] = {media: {"schema": s}}
        return r

    def errors(self, *codes):
        """The error responses of ``codes`` (status -> response)."""
        return {str(c): self.answer(self.ERROR_TEXT[c], self.schema("Error")) for c in codes}

    @staticmethod
    def param(name, where, s, description, required=False):
        """A parameter (a path parameter is always required)."""
        return {"name": name, "in": where, "required": required or where == "path",
                "schema": s, "description": description}

    def status_param(self, statuses):
        """The ``status`` filter of a list."""
        return self.param("status", "query", {"type": "string", "enum": list(statuses)},
                          "only this status")

    def envelope(self, item):
        """A list answer: a page of ``item`` with its total."""
        return {"type": "object", "required": ["data", "total", "limit", "offset",
                                               "latest_event_id"],
                "properties": {"data": {"type": "array", "items": self.schema(item)},
                               "total": self.integer, "limit": self.integer,
                               "offset": self.integer, "latest_event_id": self.integer}}

    def single(self, item):
        """A single-object answer: ``{"data": item}``."""
        return {"type": "object", "required": ["data"], "properties": {"data": self.schema(item)}}


def _openapi_service(o):
    """The OpenAPI paths of the server itself (``_service_routes``)."""
    return {
        "/health": {"get": {"summary": "Server health", "operationId": "health",
                            "responses": {"200": o.answer("Healthy", o.schema("Health"))}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text format 0.0.4)",
                             "operationId": "metrics",
                             "responses": {"200": o.answer("Metrics", {"type": "string"},
                                                           "text/plain")}}},
        "/api/openapi.json": {"get": {"summary": "This document", "operationId": "openapi",
                                      "responses": {"200": o.answer("OpenAPI document",
                                                                    {"type": "object"})}}},
        "/": {"get": {"summary": "Dashboard (HTML)", "operationId": "dashboard",
                      "responses": {"200": o.answer("The dashboard page", {"type": "string"},
                                                    "text/html")}}},
        "/api/schedules": {
            "get": {"summary": "The configured schedules, with their next and last ticks",
                    "operationId": "listSchedules",
                    "responses": {"200": o.answer("Schedules", o.envelope("Schedule"))}}},
        "/api/sensors": {
            "get": {"summary": "The configured sensors and what their evaluations left",
                    "operationId": "listSensors", "parameters": o.as_of,
                    "responses": {"200": o.answer("Sensors", o.envelope("Sensor")),
                                  **o.errors(400)}}},
        "/api/alerts": {
            "get": {"summary": "Alerts raised, newest first, and their delivery",
                    "operationId": "listAlerts",
                    "parameters": [o.status_param(ALERT_STATUSES)] + o.paging,
                    "responses": {"200": o.answer("Alerts", o.envelope("Alert")),
                                  **o.errors(400)}}},
        "/api/jobs": {
            "get": {"summary": "The configured jobs, with their job runs by status",
                    "operationId": "listJobs", "parameters": o.as_of,
                    "responses": {"200": o.answer("Jobs", o.envelope("Job"))}}},
        "/api/events": {
            "get": {"summary": "Events after an id, oldest first (with before: newest first)",
                    "operationId": "listEvents",
                    "parameters": [o.param("since", "query", o.integer, "events with a larger id"),
                                   o.param("before", "query", o.integer,
                                           "events with a smaller id, newest first"),
                                   o.param("type", "query", {"type": "string",
                                                             "enum": list(EVENT_TYPES)},
                                           "only events of this type (then total is null)"),
                                   o.paging[0]],
                    "responses": {"200": o.answer("Events", o.schema("EventList")),
                                  **o.errors(400)}}},
        "/api/shutdown": {
            "post": {"summary": "Begin a graceful stop", "operationId": "shutdown",
                     "requestBody": o.post_body,
                     "responses": {"202": o.answer("Stopping", {"type": "object"}),
                                   **o.errors(413, 415)}}},
    }


def _openapi_wants(o):
    """The OpenAPI paths of wants (``_wants_routes``)."""
    return {
        "/api/wants": {
            "get": {"summary": "List wants, newest first", "operationId": "listWants",
                    "parameters": [o.status_param(WANT_STATUSES)] + o.paging,
                    "responses": {"200": o.answer("Wants", o.envelope("Want")), **o.errors(400)}},
            "post": {"summary": "Create a want; with dry_run=true, only plan it",
                     "operationId": "createWant",
                     "parameters": [o.param("dry_run", "query", {"type": "boolean"},
                                            "answer the plan, write nothing")],
                     "requestBody": {"required": True,
                                     "content": o.json_body(o.schema("WantRequest"))},
                     "responses": {"201": o.answer("Created", o.single("Want")),
                                   "200": o.answer(
                                       "The existing want (same want_id and partitions), "
                                       "or the plan (dry_run)",
                                       {"type": "object", "required": ["data"], "properties": {
                                           "data": {"anyOf": [o.schema("Want"),
                                                              o.schema("Plan")]}}}),
                                   **o.errors(400, 409, 413, 415, 503)}}},
        "/api/wants/{want_id}/retry": {
            "post": {"summary": "Want every partition of a want that is not Live again, "
                                "as a new want", "operationId": "retryWant",
                     "parameters": [o.want_id], "requestBody": o.post_body,
                     "responses": {"201": o.answer("The new want", o.single("Want")),
                                   **o.errors(400, 404, 409, 413, 415, 503)}}},
        "/api/wants/{want_id}": {
            "get": {"summary": "One want", "operationId": "getWant",
                    "parameters": [o.want_id] + o.as_of,
                    "responses": {"200": o.answer("The want", o.single("Want")),
                                  **o.errors(400, 404)}},
            "delete": {"summary": "Cancel a want", "operationId": "cancelWant",
                       "parameters": [o.want_id],
                       "responses": {"200": o.answer("The canceled want", o.single("Want")),
                                     **o.errors(404, 409, 503)}}},
    }


def _openapi_partitions(o):
    """The OpenAPI paths of partitions (``_partitions_routes``)."""
    paths = {
        "/api/partitions": {
            "get": {"summary": "List partitions, newest first", "operationId": "listPartitions",
                    "parameters": [o.status_param(PARTITION_STATUSES),
                                   o.param("prefix", "query", {"type": "string"},
                                           "only refs starting with this"),
                                   o.param("stale", "query", {"type": "boolean"},
                                           "only the stale partitions")] + o.paging,
                    "responses": {"200": o.answer("Partitions", o.envelope("Partition")),
                                  **o.errors(400)}}},
    }
    by_ref = {
        "": ("get", {"summary": "One partition", "operationId": "getPartition",
                     "parameters": o.as_of,
                     "responses": {"200": o.answer("The partition", o.single("Partition")),
                                   **o.errors(400, 404)}}),
        "/taint": ("post", {"summary": "Taint a partition", "operationId": "taintPartition",
                            "parameters": [],
                            "requestBody": {"required": False,
                                            "content": o.json_body(o.schema("TaintRequest"))},
                            "responses": {"200": o.answer(
                                "The tainted partition, and every ref tainted (or, with "
                                "dry_run, that would be)", o.schema("TaintAnswer")),
                                **o.errors(400, 404, 409, 413, 415, 503)}}),
        "/lineage": ("get", {
            "summary": "What a partition was built from, and what was built from it",
            "operationId": "partitionLineage",
            "parameters": [o.param("depth", "query", {
                "type": "integer", "minimum": 0, "default": 3,
                "maximum": DEFAULTS["lineage_depth_max"]}, "levels each way")] + o.as_of,
            "responses": {"200": o.answer("The lineage", {
                "type": "object", "properties": {"data": o.schema("Lineage")}}),
                **o.errors(400, 404)}}),
        "/explain": ("get", {
            "summary": "Why a partition is in its state: the events that led there",
            "operationId": "partitionExplain", "parameters": o.as_of,
            "responses": {"200": o.answer("The story", {
                "type": "object", "properties": {"data": o.schema("Explanation")}}),
                **o.errors(400)}}),
    }
    # Each operation twice: the ref in the path, and (for any ref, one that
    # ends in /taint too) as the query parameter ``ref``.
    ref_query = o.param("ref", "query", {"type": "string", "minLength": 1, "maxLength": 1024},
                        "the partition's ref", required=True)
    for suffix, (method, operation) in by_ref.items():
        paths["/api/partitions/{ref}" + suffix] = {
            method: dict(operation, parameters=[o.ref] + operation["parameters"])}
        paths["/api/partition" + suffix] = {method: dict(
            operation, operationId=operation["operationId"] + "ByQuery",
            summary=operation["summary"] + " (the ref as a query parameter)",
            parameters=[ref_query] + operation["parameters"])}
    return paths


def _openapi_job_runs(o):
    """The OpenAPI paths of job runs (``_job_runs_routes``)."""
    return {
        "/api/job_runs": {
            "get": {"summary": "List job runs, newest first", "operationId": "listJobRuns",
                    "parameters": [o.status_param(JOB_RUN_STATUSES),
                                   o.param("job_label", "query", {"type": "string"},
                                           "only this job"),
                                   o.param("want_id", "query", {"type": "string"},
                                           "only runs for this want")] + o.paging,
                    "responses": {"200": o.answer("Job runs", o.envelope("JobRun")),
                                  **o.errors(400)}}},
        "/api/job_runs/{job_run_id}": {
            "get": {"summary": "One job run", "operationId": "getJobRun",
                    "parameters": [o.run_id] + o.as_of,
                    "responses": {"200": o.answer("The job run", o.single("JobRun")),
                                  **o.errors(400, 404)}}},
        "/api/job_runs/{job_run_id}/cancel": {
            "post": {"summary": "Cancel a job run", "operationId": "cancelJobRun",
                     "parameters": [o.run_id], "requestBody": o.post_body,
                     "responses": {"200": o.answer("The canceled job run", o.single("JobRun")),
                                   **o.errors(404, 409, 413, 415, 503)}}},
        "/api/job_runs/{job_run_id}/logs/{stream}": {
            "get": {"summary": "A job run's stdout or stderr; follow=true streams "
                               "Server-Sent Events (event: log per line, then event: complete)",
                    "operationId": "jobRunLog",
                    "parameters": [o.run_id,
                                   o.param("stream", "path", {"type": "string",
                                                              "enum": ["stdout", "stderr"]},
                                           "which stream"),
                                   o.param("follow", "query", {"type": "boolean"},
                                           "stream until the run ends"),
                                   o.param("tail", "query", o.integer,
                                           "only the last N bytes (without follow)")],
                    "responses": {"200": {"description": "The log",
                                          "content": {"text/plain": {"schema": {"type": "string"}},
                                                      "text/event-stream": {"schema": {
                                                          "type": "object", "properties": {
                                                              "event": {"type": "string",
                                                                        "enum": ["log",
                                                                                 "complete"]},
                                                              "data": {"type": "string"}}}}}},
                                  **o.errors(400, 404, 503)}}},
    }


def _openapi_schemas(o):
    """The OpenAPI schemas of the bodies and answers."""
    return {**_openapi_request_schemas(o), **_openapi_entity_schemas(o),
            **_openapi_config_schemas(o)}


def _openapi_request_schemas(o):
    """Request bodies, errors and the answers that are not entities."""
    return {
        "Error": {"type": "object", "required": ["error"],
                  "properties": {"error": {"type": "string"}}, "additionalProperties": True},
        "Health": {"type": "object", "required": ["status", "version", "latest_event_id",
                                                  "uptime_seconds"],
                   "properties": {"status": {"type": "string"}, "version": {"type": "string"},
                                  "latest_event_id": o.integer,
                                  "uptime_seconds": {"type": "number"},
                                  "pid": o.integer, "config_error": o.nullable_str,
                                  "kept_up_by": o.str_list}},
        "WantRequest": {"type": "object", "required": ["partitions"], "additionalProperties": False,
                        "properties": {"partitions": {"type": "array", "minItems": 1,
                                                      "maxItems": DEFAULTS[
                                                          "max_partitions_per_want"],
                                                      "items": {"type": "string", "minLength": 1,
                                                                "maxLength": 1024}},
                                       "want_id": {"type": "string", "pattern": _ID_RE.pattern,
                                                   "minLength": 1, "maxLength": 128,
                                                   "nullable": True},
                                       "data_timestamp": o.number_in(DATA_TIME_RANGE),
                                       "ttl_seconds": o.number_in(DURATION_RANGE),
                                       "sla_seconds": o.number_in(DURATION_RANGE),
                                       "comment": o.nullable_str, "user": o.nullable_str,
                                       "priority": {"type": "integer", "nullable": True,
                                                    "minimum": PRIORITY_RANGE[0],
                                                    "maximum": PRIORITY_RANGE[1]}}},
        "TaintRequest": {"type": "object", "additionalProperties": False,
                         "properties": {"reason": o.nullable_str, "downstream": {"type": "boolean"},
                                        "dry_run": {"type": "boolean"}}},
        "TaintAnswer": {"type": "object", "required": ["data", "tainted", "dry_run"],
                        "properties": {"data": o.schema("Partition"), "tainted": o.str_list,
                                       "dry_run": {"type": "boolean"}}},
        "Lineage": {"type": "object", "required": ["ref", "upstream", "downstream"],
                    "properties": {"ref": {"type": "string"}, "status": o.nullable_str,
                                   "upstream": {"type": "array", "items": {"type": "object"}},
                                   "downstream": {"type": "array",
                                                  "items": {"type": "object"}}}},
        "Explanation": {"type": "object", "required": ["ref", "summary", "steps"],
                        "properties": {"ref": {"type": "string"}, "status": o.nullable_str,
                                       "summary": {"type": "string"},
                                       "steps": {"type": "array", "items": {"type": "object"}},
                                       "upstream_failures": {"type": "array",
                                                             "items": {"type": "object"}}}},
    }


def _openapi_entity_schemas(o):
    """Wants (and plans), partitions, job runs and events."""
    return {
        "Want": {"type": "object", "properties": {
            "want_id": {"type": "string"}, "partitions": o.str_list,
            "status": {"type": "string", "enum": list(WANT_STATUSES)},
            "partition_statuses": {"type": "object", "additionalProperties": {"type": "string"}},
            "counts": {"type": "object", "additionalProperties": o.integer},
            "data_timestamp": {"type": "number"}, "ttl_seconds": o.nullable_num,
            "sla_seconds": o.nullable_num, "sla_breached": {"type": "boolean"},
            "source": {"type": "object"}, "parent_want_id": o.nullable_str,
            "root_want_id": {"type": "string"}, "derivative_want_ids": o.str_list,
            "job_run_ids": o.str_list, "comment": o.nullable_str, "terminal": {"type": "boolean"},
            "priority": {"type": "integer"},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"}}},
        "Plan": {"type": "object", "required": ["partitions", "plan", "runs", "jobs"],
                 "properties": {
                     "partitions": o.str_list, "runs": o.integer,
                     "jobs": {"type": "object", "additionalProperties": o.integer},
                     "plan": {"type": "array", "items": {"type": "object", "properties": {
                         "ref": {"type": "string"}, "job_label": {"type": "string"},
                         "action": {"type": "string",
                                    "enum": ["live", "build", "building", "waiting"]},
                         "deps": o.str_list}}}}},
        "Partition": {"type": "object", "properties": {
            "ref": {"type": "string"},
            "status": {"type": "string", "enum": list(PARTITION_STATUSES)},
            "job_label": o.nullable_str, "last_job_run_id": o.nullable_str,
            "built_by_job_run_id": o.nullable_str, "want_ids": o.str_list,
            "missing_deps": o.str_list,
            "upstream": o.str_list, "retry_at": {"type": "string", "nullable": True},
            "code_version": o.nullable_str, "built_at": o.nullable_str,
            "stale": {"type": "boolean"}, "stale_reasons": o.str_list,
            "updated_at": {"type": "string", "format": "date-time"}}},
        "JobRun": {"type": "object", "properties": {
            "job_run_id": {"type": "string"}, "job_label": o.nullable_str, "partitions": o.str_list,
            "want_ids": o.str_list, "status": {"type": "string", "enum": list(JOB_RUN_STATUSES)},
            "attempt": o.integer, "exit_code": {"type": "integer", "nullable": True},
            "missing_deps": o.str_list, "error": o.nullable_str,
            "queued_at": {"type": "string", "format": "date-time"},
            "started_at": o.nullable_str, "finished_at": o.nullable_str,
            "duration_ms": {"type": "integer", "nullable": True},
            "executor": {"type": "string"}, "external_id": o.nullable_str,
            "code_version": o.nullable_str}},
        "Event": {"type": "object", "properties": {
            "event_id": o.integer, "timestamp": {"type": "string", "format": "date-time"},
            "type": {"type": "string"}, "payload": {"type": "object"}}},
    }


def _openapi_config_schemas(o):
    """Schedules, jobs and lists of events."""
    return {
        "Schedule": {"type": "object", "properties": {
            "name": {"type": "string"}, "cron": o.nullable_str,
            "interval_seconds": {"type": "integer", "nullable": True},
            "timezone": {"type": "string"}, "partitions": o.str_list,
            "lag_seconds": {"type": "number"}, "catch_up": o.integer,
            "priority": {"type": "integer"}, "next_tick_at": o.nullable_str,
            "last_tick_at": o.nullable_str, "last_want_id": o.nullable_str,
            "last_want_status": o.nullable_str}},
        "Job": {"type": "object", "properties": {
            "label": {"type": "string"}, "partition_patterns": o.str_list,
            "entrypoint": o.str_list, "executor": {"type": "string"},
            "environment_keys": o.str_list, "max_partitions_per_run": o.integer,
            "max_retries": o.integer, "timeout_seconds": {"type": "number"},
            "max_concurrent_runs": {"type": "integer", "nullable": True},
            "retry_backoff_seconds": {"type": "number"},
            "retry_backoff_max_seconds": {"type": "number"},
            "options": {"type": "object", "description": "the executor's own job keys"},
            "code_version": o.nullable_str, "auto_rebuild": {"type": "string"},
            "job_runs": {"type": "object", "additionalProperties": o.integer}}},
        "Sensor": {"type": "object", "properties": {
            "name": {"type": "string"}, "command": o.str_list,
            "interval_seconds": {"type": "number"}, "timeout_seconds": {"type": "number"},
            "cursor": o.nullable_str, "last_evaluated_at": o.nullable_str,
            "last_status": {"type": "string", "nullable": True, "enum": ["ok", "failed", None]},
            "last_error": o.nullable_str, "wants_created": o.integer,
            "evaluations": o.integer}},
        "Alert": {"type": "object", "properties": {
            "alert_id": o.integer, "alert": {"type": "string"},
            "kind": {"type": "string", "enum": list(ALERT_KINDS)}, "event_id": o.integer,
            "timestamp": {"type": "string", "format": "date-time"},
            "summary": {"type": "string"}, "want": {"type": "object"},
            "partition": {"type": "object"}, "sensor": {"type": "object"},
            "status": {"type": "string", "enum": list(ALERT_STATUSES)},
            "attempts": o.integer, "last_error": o.nullable_str,
            "delivered_at": o.nullable_str, "next_attempt_at": o.nullable_str}},
        "EventList": {"type": "object", "properties": {
            "data": {"type": "array", "items": o.schema("Event")},
            "total": {"type": "integer", "nullable": True}, "limit": o.integer,
            "since": o.integer, "before": {"type": "integer", "nullable": True},
            "type": o.nullable_str, "latest_event_id": o.integer}},
    }


def openapi_document():
    """The OpenAPI 3 document of the HTTP API (served at /api/openapi.json):
    the paths in one part per group of routes, as ``make_app`` has them."""
    o = _OpenAPI()
    paths = {}
    for part in (_openapi_service, _openapi_wants, _openapi_partitions, _openapi_job_runs):
        paths.update(part(o))
    # README "Security": every operation but /health needs the token (and may answer
    # 401); every one that reads a body or a query may answer 400.
    for path, operations in paths.items():
        for method, op in operations.items():
            if path == "/health":
                op["security"] = []
                continue
            op["responses"].update(o.errors(401))
            if method == "post" or op.get("parameters"):
                op["responses"].setdefault("400", o.errors(400)["400"])
    return {"openapi": "3.0.3",
            "info": {"title": "databuild.py API", "version": __version__,
                     "description": "A want-driven data build system. Errors are JSON "
                                    "{\"error\": message, ...fields}. Every request but "
                                    "GET /health needs the server's token (in "
                                    ".databuild/server.json) as a Bearer header or the "
                                    "databuild_token cookie."},
            "security": [{"bearer": []}, {"cookie": []}],
            "paths": paths,
            "components": {"schemas": _openapi_schemas(o), "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": TOKEN_COOKIE}}}}


def is_loopback(host):
    """True for a loopback host name or address (127.0.0.0/8, ::1, localhost)."""
    host = (host or "").strip("[]").lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _split_host(host):
    """``"name:port"`` or ``"[v6]:port"`` -> ``(name, port or "")``."""
    if host.startswith("["):
        name, _, port = host[1:].partition("]")
        return name, port[1:] if port.startswith(":") else ""
    name, _, port = host.partition(":")
    return name, port


class _Gate:
    """WSGI middleware in front of the Bottle app, for what every request shares.

    * Host check: the server's own loopback names and port (a DNS rebinding
      page cannot talk to it), from a loopback peer only; on a non-loopback
      bind also the bound address and ``[server] allowed_hosts``.  Else 400.
    * Access (README "Security"): every request but ``GET /health`` and CORS
      preflights carries the server's token, as ``Authorization: Bearer``
      or the ``databuild_token`` cookie, else 401.  ``GET /?token=T`` sets
      the cookie and redirects to ``/``.  The WSGI environ gets
      ``databuild.bearer`` when the token came in the header.
    * CORS: ``Access-Control-Allow-Origin`` for the configured origins only;
      OPTIONS answered here, with the methods the path has.
    * Counts requests by method and status for /metrics, and marks activity
      for the idle timer.
    """

    _METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"))

    def __init__(self, app, server):
        self.app = app
        self.server = server
        self._token = server.token.encode() if server.token else None

    def _host_allowed(self, host, peer):
        if not host:
            return False
        name, port = _split_host(host)
        name = name.lower()
        if name in LOOPBACK_HOSTS:
            # A remote peer naming our loopback address is forging the header.
            if not is_loopback(peer):
                return False
        elif name != self.server.host.lower() and name not in self._allowed_hosts():
            return False
        bound = self.server.port
        return not bound or port == str(bound) or (not port and bound == 80)

    def _allowed_hosts(self):
        return {h.lower() for h in self.server.config.allowed_hosts}

    def _token_of(self, environ):
        # -> (token bytes or None, came in the Authorization header)
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip().encode("latin-1"), True
        for part in environ.get("HTTP_COOKIE", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == TOKEN_COOKIE:
                return value.strip().encode("latin-1"), False
        return None, False

    def _authorized(self, given):
        return given is not None and hmac.compare_digest(given, self._token)

    def __call__(self, environ, start_response):
        self.server.touch()
        method = environ.get("REQUEST_METHOD", "")
        path = environ.get("PATH_INFO", "")
        origin = environ.get("HTTP_ORIGIN")
        cors = []
        if origin and origin in self.server.config.cors_origins:
            cors = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        status_seen = []

        def respond(status, headers, exc_info=None):
            status_seen.append(status.split(" ", 1)[0])
            return start_response(status, list(headers) + cors, exc_info)

        try:
            if not self._host_allowed(environ.get("HTTP_HOST", ""), environ.get("REMOTE_ADDR")):
                return self._json(respond, "400 Bad Request", {
                    "error": "Host header not allowed (only this server's own address)",
                    "host": _shown(environ.get("HTTP_HOST") or "")})
            try:  # PEP 3333 hands the path over as Latin-1; it must be UTF-8
                path.encode("latin-1").decode("utf-8")
            except UnicodeError:
                return self._json(respond, "400 Bad Request",
                                  {"error": "The path is not valid UTF-8"})
            if method == "OPTIONS":
                allow = self._allow(environ)
                if allow is None:
                    return self._json(respond, "404 Not Found", {"error": "Not found",
                                                                 "path": _shown(path)})
                headers = [("Allow", allow), ("Content-Length", "0")]
                if cors:
                    headers += [("Access-Control-Allow-Methods", allow),
                                ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
                                ("Access-Control-Max-Age", "600")]
                respond("204 No Content", headers)
                return [b""]
            if self._token is not None and not (method in ("GET", "HEAD") and path == "/health"):
                given, bearer = self._token_of(environ)
                if method == "GET" and path == "/" and "token=" in environ.get("QUERY_STRING", ""):
                    return self._cookie_login(environ, respond)
                if not self._authorized(given):
                    return self._json(respond, "401 Unauthorized", {
                        "error": "Missing or wrong access token: send 'Authorization: Bearer "
                                 "<token>' with the token in .databuild/server.json (for the "
                                 "dashboard, open the URL `databuild.py dashboard` prints)"},
                        [("WWW-Authenticate", 'Bearer realm="databuild"')])
                environ["databuild.bearer"] = bearer
            elif self._token is None:
                environ["databuild.bearer"] = False
            return self.app(environ, respond)
        finally:
            key = (method if method in self._METHODS else "OTHER",
                   status_seen[0] if status_seen else "000")
            self.server.count_request(key)

    def _cookie_login(self, environ, respond):
        # GET /?token=T (the URL `databuild dashboard` prints): the cookie, then /.
        values = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("token", [""])
        if not self._authorized(values[-1].encode("utf-8", "replace")):
            return self._json(respond, "401 Unauthorized",
                              {"error": "Wrong access token in the URL"})
        respond("303 See Other", [
            ("Location", "/"), ("Content-Length", "0"), ("Cache-Control", "no-store"),
            ("Set-Cookie", "%s=%s; Path=/; HttpOnly; SameSite=Strict"
             % (TOKEN_COOKIE, self.server.token))])
        return [b""]

    def _allow(self, environ):
        # The methods a path answers, from the router's own 405 (None: no such path).
        probe = dict(environ, REQUEST_METHOD="PROPFIND")
        try:
            self.app.router.match(probe)
        except Exception as e:
            allow = getattr(e, "headers", {}).get("Allow") if getattr(
                e, "status_code", None) == 405 else None
            if allow:
                methods = {m.strip() for m in allow.split(",")} | {"OPTIONS"}
                return ", ".join(sorted(methods))
        return None

    @staticmethod
    def _json(respond, status, body, headers=()):
        data = _encode_json(body)
        respond(status, [("Content-Type", JSON_TYPE), ("Content-Length", str(len(data))),
                         *headers])
        return [data]


###############################################################################
# Server and lifecycle ########################################################
###############################################################################

class IdleTimer:
    """Calls ``on_idle`` once nothing happened for ``timeout`` seconds (README "Lifecycle").

    Activity is an HTTP request (``touch``) or a job run Queued or Running
    (``is_busy()``).  ``check(now)`` is one tick, for tests with an explicit
    clock; ``start()`` runs ticks in a thread named databuild-idle-timer.
    """

    def __init__(self, timeout, is_busy, on_idle, clock=time.monotonic):
        self.timeout = timeout
        self.is_busy = is_busy
        self.on_idle = on_idle
        self.clock = clock
        self.last_activity = clock()
        self._stop = threading.Event()
        self.fired = False

    def touch(self, now=None):
        """Record activity now."""
        self.last_activity = self.clock() if now is None else now

    def check(self, now=None):
        """One tick: fire ``on_idle`` (once) if idle long enough; returns whether it fired."""
        now = self.clock() if now is None else now
        if self.fired or not self.timeout:
            return False
        if self.is_busy():
            self.last_activity = now
            return False
        if now - self.last_activity >= self.timeout:
            self.fired = True
            self.on_idle(now - self.last_activity)
            return True
        return False

    def start(self):
        """Tick in a daemon thread until ``stop``."""
        if not self.timeout:
            return self
        interval = min(1.0, max(0.01, self.timeout / 10.0))
        def run():
            while not self._stop.wait(interval):
                try:
                    if self.check():
                        return
                except Exception:
                    logger.exception("Idle timer failed")
        threading.Thread(target=run, name="databuild-idle-timer", daemon=True).start()
        return self

    def stop(self):
        """Stop ticking."""
        self._stop.set()


@functools.lru_cache(maxsize=None)
def _channel_class():
    """waitress's HTTP channel, without its busy loop while a worker answers.

    With ``send_bytes = 1`` a worker thread sends its response itself, under
    the channel's ``outbuf_lock``; ``socket.send`` drops the GIL, and the I/O
    loop, woken meanwhile by any other connection, sees the channel
    ``writable()``: ``select`` returns at once, ``handle_write`` cannot take
    the lock, and the loop goes round again, taking the GIL from the very
    worker it waits for (README "Performance", row 3, has the figures).
    Here the channel is not writable while a worker holds that
    lock; the worker flushes, and ends its request with a trigger that wakes
    the loop for whatever is left (at worst the loop's one-second timeout
    does).  Above the high watermark (a worker waiting for the loop to drain)
    nothing changes.
    """
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class JsonErrorTask(ErrorTask):
        # waitress's own refusals (a body over the limit, a malformed
        # request) as JSON, like every other error of the API.
        def execute(self):
            error = self.request.error
            status, _, _ = error.to_response(self.channel.server.adj.ident)
            body = _encode_json({"error": error.reason, "detail": error.body,
                                 **({"limit": DEFAULTS["max_body_bytes"]}
                                    if error.code == 413 else {})})
            self.status = status
            self.response_headers.extend([("Content-Type", JSON_TYPE), ("Connection", "close")])
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class Channel(HTTPChannel):
        error_task_class = JsonErrorTask

        def writable(self):
            if (self.requests and 0 < self.total_outbufs_len <= self.adj.outbuf_high_watermark
                    and not (self.will_close or self.close_when_flushed)):
                if not self.outbuf_lock.acquire(False):
                    return False
                self.outbuf_lock.release()
            return HTTPChannel.writable(self)

    return Channel


def _raise_open_files_limit(wanted):
    """Raise this process's soft limit of open files towards ``wanted`` (no
    higher than the hard limit): each connection holds a descriptor."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def _check_log_not_lost(state_dir):
    """Refuse to start a new, empty event log where job runs were logged
    before: an events.db that is missing or of 0 bytes beside a logs/ folder
    of past runs means the log was lost (README "Lifecycle"), not a new workspace."""
    path = os.path.join(state_dir, "events.db")
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        size = None
    if size:
        return
    try:
        runs = len(os.listdir(os.path.join(state_dir, "logs")))
    except OSError:
        runs = 0
    if runs:
        raise StorageError(
            "%s is %s, but %s holds the logs of %d job runs: the event log was lost or "
            "truncated. Restore events.db (with events.db-wal, if any) from a backup, or "
            "move %s aside to start a new, empty log"
            % (path, "missing" if size is None else "empty (0 bytes)",
               os.path.join(state_dir, "logs"), runs, state_dir), path=path)


def read_server_info(state_dir):
    """The parsed ``server.json`` of a workspace, or None."""
    try:
        with open(os.path.join(state_dir, "server.json")) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


class Server:
    """One workspace's server: event log, orchestrator, read model, HTTP app.

    Construct it (which takes the workspace lock and replays the log), then
    ``serve()`` in the main thread; ``request_stop`` from anywhere (signal
    handlers, the idle timer, POST /api/shutdown) begins the graceful stop.
    """

    def __init__(self, config, host=None, port=None, idle_timeout=None):
        self.config_watcher = ConfigWatcher(config)
        self.host = host or config.host
        self.port = config.port if port is None else port
        self.idle_timeout = config.idle_timeout_seconds if idle_timeout is None else idle_timeout
        self.url = None
        self.started_at = time.time()
        self.stopping = False
        self.stop_reason = None
        if config.auth == "none" and not is_loopback(self.host):
            raise ConfigError('[server] auth = "none" is allowed on a loopback host only, '
                              'not on %s: anyone who can reach it could run jobs' % self.host)
        # README "Security": a new token at every start, readable by this user only.
        self.token = secrets.token_urlsafe(32) if config.auth == "token" else None
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        os.chmod(config.state_dir, 0o700)
        self._lock_file = self._take_lock()
        try:
            _check_log_not_lost(config.state_dir)
            self.log = EventLog(os.path.join(config.state_dir, "events.db"))
            self.read_model = ReadModel(self.log)
            self.orchestrator = Orchestrator(config, self.log, watcher=self.config_watcher)
        except BaseException:
            self._lock_file.close()
            raise
        self.orchestrator.token = self.token
        self.idle_timer = IdleTimer(self.idle_timeout, self._busy, self._on_idle)
        self.stop_event = threading.Event()  # set once: the graceful stop has begun
        self._http_lock = threading.Lock()  # guards _http_requests (the gate's threads write)
        self._http_requests = collections.Counter()  # (method, code) -> n
        # Log followers hold a waitress thread each: at most half of them.
        self.streams = threading.BoundedSemaphore(max(1, DEFAULTS["http_threads"] // 2))
        self.bottle_app = make_app(self)
        self.app = _Gate(self.bottle_app, self)
        self._wsgi_server = None

    @property
    def config(self):
        """The workspace's config in force (reloaded when databuild.toml changes).
        ``host``, ``port``, ``auth`` and ``idle_timeout_seconds`` are read at start."""
        return self.config_watcher.current()

    def _take_lock(self):
        path = os.path.join(self.config.state_dir, "server.lock")
        lock_file = open(path, "a+")
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            info = read_server_info(self.config.state_dir) or {}
            raise Conflict("A server is already running for workspace %s at %s (pid %s)"
                           % (self.config.root, info.get("url", "?"), info.get("pid", "?")),
                           url=info.get("url"), pid=info.get("pid")) from None
        return lock_file

    def count_request(self, key):
        """Count one HTTP answer, ``key`` = (method, status code), for /metrics."""
        with self._http_lock:
            self._http_requests[key] += 1

    def http_requests(self):
        """A copy of the HTTP answer counts: (method, status code) -> n."""
        with self._http_lock:
            return dict(self._http_requests)

    def _busy(self):
        return bool(self.kept_up_by())

    def kept_up_by(self):
        """Why the server will not stop for idleness now ([] when it may):
        job runs, and what has work to do by itself -- schedules' ticks,
        sensors' evaluations, jobs that rebuild their stale partitions
        (README "Lifecycle")."""
        config, reasons = self.config, []
        if not self.idle_timeout:
            reasons.append("idle_timeout_seconds = 0")
        if self.orchestrator.has_runs:
            reasons.append("job runs queued or running")
        for noun, items in (("schedule", config.schedules), ("sensor", config.sensors)):
            if items:
                reasons.append("%d %s%s (%s)" % (len(items), noun, "s" * (len(items) > 1),
                                                 ", ".join(i.name for i in items)))
        auto = [job.label for job in config.jobs if job.auto_rebuild == "stale"]
        if auto:
            reasons.append("auto_rebuild on job%s %s" % ("s" * (len(auto) > 1), ", ".join(auto)))
        return reasons

    def _on_idle(self, seconds):
        logger.info("Server idle for %d seconds, shutting down", seconds)
        self.request_stop("idle")

    def touch(self):
        """Note an HTTP request (for the idle timer)."""
        self.idle_timer.touch()

    def request_stop(self, reason):
        """Begin the graceful stop (safe from signal handlers and any thread)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop_event.set()
        server = self._wsgi_server
        if server is not None:
            try:
                server.pull_trigger()
            except Exception:
                pass

    def bind(self):
        """Create the waitress server (binding the port) and start the orchestrator."""
        import waitress
        try:
            _raise_open_files_limit(DEFAULTS["http_connection_limit"] + 1024)
            self._wsgi_server = waitress.create_server(
                self.app, host=self.host, port=self.port, threads=DEFAULTS["http_threads"],
                ident="databuild", channel_timeout=DEFAULTS["http_idle_seconds"],
                connection_limit=DEFAULTS["http_connection_limit"], expose_tracebacks=False,
                outbuf_high_watermark=DEFAULTS["http_outbuf_bytes"],
                # waitress refuses a body over the limit (413) before reading
                # it, and keeps the ones under it in memory: none is spooled
                # to a temporary file.
                max_request_body_size=DEFAULTS["max_body_bytes"],
                inbuf_overflow=DEFAULTS["max_body_bytes"] + 65536)
        except OSError as e:
            raise DatabuildError("Cannot listen on %s:%s: %s" % (self.host, self.port,
                                                                 e.strerror or e)) from None
        from waitress.server import BaseWSGIServer
        for listener in [self._wsgi_server, *self._wsgi_server._map.values()]:
            if isinstance(listener, BaseWSGIServer):  # one, or several (MultiSocketServer)
                listener.channel_class = _channel_class()
        self.port = int(self._wsgi_server.effective_port)
        host = self.host if ":" not in self.host else "[%s]" % self.host
        self.url = "http://%s:%d" % (host, self.port)
        self.orchestrator.url = self.url
        self.orchestrator.start()
        self._write_info()
        self.idle_timer.start()
        return self.url

    def _write_info(self):
        info = {"pid": os.getpid(), "url": self.url, "port": self.port, "host": self.host,
                "started_at": isoformat(self.started_at), "workspace_root": self.config.root,
                "version": __version__, "token": self.token}
        path = os.path.join(self.config.state_dir, "server.json")
        tmp = path + ".%d.tmp" % os.getpid()
        # 0600 from the start: the token is never readable by others, not even briefly.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, path)

    def serve(self):
        """Serve until ``request_stop``, then stop gracefully (README "Lifecycle")."""
        if self._wsgi_server is None:
            self.bind()
        from waitress import wasyncore
        socket_map = self._wsgi_server._map
        try:
            while not self.stop_event.is_set():  # poll: select stops at 1,024 descriptors
                wasyncore.loop(timeout=1.0, map=socket_map, count=1, use_poll=True)
        finally:
            self._graceful_stop(wasyncore, socket_map)

    def _graceful_stop(self, wasyncore, socket_map):
        logger.info("Stopping (%s)", self.stop_reason or "stop requested")
        self.stopping = True
        self.idle_timer.stop()
        server = self._wsgi_server
        from waitress.server import BaseWSGIServer
        # Stop accepting connections: close the listening sockets only.  The
        # trigger (waitress's wake-up pipe, which BaseWSGIServer.close would
        # close too) stays open until no worker can pull it any more.
        for listener in {server, *socket_map.values()}:
            if isinstance(listener, BaseWSGIServer):
                try:
                    wasyncore.dispatcher.close(listener)
                except Exception:
                    logger.exception("Closing the listening socket failed")
        # Let in-flight requests finish and their answers go out.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            busy = server.task_dispatcher.active_count or server.task_dispatcher.queue or any(
                getattr(ch, "requests", None) or getattr(ch, "total_outbufs_len", 0)
                for ch in list(socket_map.values()))
            if not busy:
                break
            wasyncore.loop(timeout=0.05, map=socket_map, count=1, use_poll=True)
        self.orchestrator.stop()
        server.task_dispatcher.shutdown(timeout=2)  # the workers end first,
        wasyncore.close_all(socket_map)  # then the channels and the trigger
        self.close()
        logger.info("Shutdown complete")

    def close(self):
        """Remove server.json, close the log, release the workspace lock."""
        info = read_server_info(self.config.state_dir)
        if info is not None and info.get("pid") == os.getpid():
            try:
                os.unlink(os.path.join(self.config.state_dir, "server.json"))
            except OSError:
                pass
        self.log.close()
        self._lock_file.close()


###############################################################################
# Dashboard ###################################################################
###############################################################################

# The page ``GET /`` serves (README "Dashboard"): one HTML document with its
# CSS and JavaScript, no external assets, working offline.  Views by URL
# fragment (``#/wants``, ``#/wants/<id>``, ``#/partitions?prefix=``, ...), each
# rendered from the API by the function of its name in ``views``; the status
# and event type names come from this module's constants.
_DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">

<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>databuild</title>
  <style>
    :root {
      --bg: #fafafa;
      --fg: #1d1f23;
      --muted: #6a717c;
      --line: #e2e4e8;
      --panel: #fff;
      --accent: #2f6fdb;
      --ok: #1a7f37;
      --bad: #c4302b;
      --busy: #9a6700;
      --idle: #6a717c;
      --code: #f3f4f6
    }

    @media (prefers-color-scheme:dark) {
      :root {
        --bg: #15171a;
        --fg: #e4e6ea;
        --muted: #9aa1ab;
        --line: #2b2f35;
        --panel: #1c1f23;
        --accent: #6ea1ff;
        --ok: #4ac26b;
        --bad: #ff7b72;
        --busy: #d29922;
        --idle: #9aa1ab;
        --code: #111315
      }
    }

    :root.light {
      --bg: #fafafa;
      --fg: #1d1f23;
      --muted: #6a717c;
      --line: #e2e4e8;
      --panel: #fff;
      --accent: #2f6fdb;
      --ok: #1a7f37;
      --bad: #c4302b;
      --busy: #9a6700;
      --idle: #6a717c;
      --code: #f3f4f6
    }

    :root.dark {
      --bg: #15171a;
      --fg: #e4e6ea;
      --muted: #9aa1ab;
      --line: #2b2f35;
      --panel: #1c1f23;
      --accent: #6ea1ff;
      --ok: #4ac26b;
      --bad: #ff7b72;
      --busy: #d29922;
      --idle: #9aa1ab;
      --code: #111315
    }

    * {
      box-sizing: border-box
    }

    body {
      margin: 0;
      background: var(--bg);
      color: var(--fg);
      font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif
    }

    header {
      display: flex;
      flex-wrap: wrap;
      align-items: center;
      gap: 1em;
      padding: .6em 1.2em;
      background: var(--panel);
      border-bottom: 1px solid var(--line);
      position: sticky;
      top: 0;
      z-index: 1
    }

    header b {
      font-size: 1.05em;
      letter-spacing: .02em
    }

    nav a {
      margin-right: .9em
    }

    a {
      color: var(--accent);
      text-decoration: none
    }

    a:hover {
      text-decoration: underline
    }

    main {
      padding: 1em 1.2em;
      max-width: 1400px
    }

    h1 {
      font-size: 1.15em;
      margin: .2em 0 .8em;
      word-break: break-all
    }

    h2 {
      font-size: 1em;
      margin: 1.4em 0 .5em;
      color: var(--muted);
      text-transform: uppercase;
      letter-spacing: .05em
    }

    table {
      border-collapse: collapse;
      width: 100%;
      background: var(--panel);
      border: 1px solid var(--line)
    }

    th,
    td {
      padding: .35em .7em;
      text-align: left;
      border-bottom: 1px solid var(--line);
      vertical-align: top
    }

    th {
      font-weight: 600;
      color: var(--muted);
      font-size: 12px
    }

    td {
      font-size: 13px
    }

    .mono,
    td.mono {
      font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
      font-size: 12px
    }

    dl {
      display: grid;
      grid-template-columns: max-content 1fr;
      gap: .3em 1.2em;
      margin: 0;
      background: var(--panel);
      border: 1px solid var(--line);
      padding: .8em 1em
    }

    dt {
      color: var(--muted)
    }

    dd {
      margin: 0;
      word-break: break-all
    }

    .status {
      font-weight: 600;
      white-space: nowrap
    }

    .s-Successful,
    .s-Live,
    .s-Succeeded {
      color: var(--ok)
    }

    .s-Failed,
    .s-UpstreamFailed,
    .s-Canceled,
    .s-Expired {
      color: var(--bad)
    }

    .s-Building,
    .s-Running,
    .s-Queued,
    .s-UpstreamBuilding,
    .s-UpForRetry,
    .s-DepMiss,
    .s-stale,
    .s-owed {
      color: var(--busy)
    }

    .s-delivered,
    .s-ok {
      color: var(--ok)
    }

    .s-given_up,
    .s-failed {
      color: var(--bad)
    }

    .s-Idle,
    .s-Tainted,
    .s-Missing {
      color: var(--idle)
    }

    .muted {
      color: var(--muted)
    }

    table.grid td,
    table.grid th {
      padding: 1px;
      border: 0
    }

    table.grid th.date {
      writing-mode: vertical-rl;
      transform: rotate(180deg);
      font-weight: 400;
      font-size: .8em;
      color: var(--muted);
      height: 6.5em;
      text-align: left
    }

    table.grid td.key {
      padding-right: .8em;
      white-space: nowrap
    }

    a.cell {
      display: block;
      width: 14px;
      height: 14px;
      border-radius: 2px;
      background: currentColor
    }

    .graphbox {
      overflow: auto;
      max-height: 75vh
    }

    svg.graph path {
      fill: none;
      stroke: var(--muted);
      stroke-opacity: .5
    }

    svg.graph g.node rect {
      fill: var(--panel);
      stroke: currentColor;
      stroke-width: 1.5
    }

    svg.graph g.node[data-focus] rect {
      stroke-width: 3
    }

    svg.graph g.node.stale rect {
      stroke-dasharray: 4 2
    }

    svg.graph g.node text {
      fill: var(--fg);
      font: 12px ui-monospace, monospace
    }

    svg.timeline text {
      fill: var(--muted);
      font-size: 11px
    }

    svg.timeline line {
      stroke: var(--line)
    }

    svg.timeline rect {
      fill: currentColor
    }

    .bar {
      display: flex;
      flex-wrap: wrap;
      gap: .6em;
      align-items: center;
      margin: .4em 0 .8em
    }

    input,
    select,
    button,
    textarea {
      font: inherit;
      color: var(--fg);
      background: var(--panel);
      border: 1px solid var(--line);
      border-radius: 5px;
      padding: .3em .55em
    }

    button {
      cursor: pointer
    }

    button.primary {
      background: var(--accent);
      color: #fff;
      border-color: var(--accent)
    }

    button.danger {
      color: var(--bad);
      border-color: var(--bad)
    }

    button:disabled {
      opacity: .5;
      cursor: default
    }

    pre {
      background: var(--code);
      border: 1px solid var(--line);
      padding: .7em;
      overflow: auto;
      max-height: 32em;
      margin: 0;
      font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, monospace;
      white-space: pre-wrap;
      word-break: break-all
    }

    ul.tree {
      list-style: none;
      padding-left: 1.2em;
      margin: .2em 0
    }

    ul.tree>li {
      margin: .15em 0
    }

    .grid {
      display: grid;
      grid-template-columns: repeat(auto-fit, minmax(420px, 1fr));
      gap: 1em
    }

    #msg {
      margin-left: auto;
      color: var(--muted);
      font-size: 12px
    }

    #msg.err {
      color: var(--bad)
    }

    .asof {
      border: 1px solid var(--busy);
      color: var(--busy);
      border-radius: 5px;
      padding: .1em .5em
    }

    #create {
      display: none;
      background: var(--panel);
      border: 1px solid var(--line);
      padding: .8em 1em;
      margin-bottom: 1em
    }

    #create.open {
      display: block
    }

    #create textarea {
      width: 100%;
      min-height: 4em
    }

  </style>
</head>

<body>
  <header><b>databuild</b>
    <nav><a href="#/wants">Wants</a><a href="#/partitions">Partitions</a><a href="#/job_runs">Job
        runs</a>
      <a href="#/events">Events</a><a href="#/schedules">Schedules</a><a href="#/sensors">Sensors</a>
      <a href="#/alerts">Alerts</a><a href="#/jobs">Jobs</a><a href="#/graph">Graph</a><a href="#/grid">Grid</a><a
        href="#/timeline">Timeline</a>
    </nav>
    <button id="new" class="primary">New want</button>
    <label class="muted">as of event <input id="asof" type="number" min="1" style="width:7em"
        placeholder="now"></label>
    <button id="live" title="Back to the present">Now</button>
    <button id="theme" title="Light or dark">&#9680;</button>
    <span id="msg">loading&hellip;</span>
  </header>
  <main>
    <form id="create"><b>New want</b>
      <p class="muted">Partition refs, one per line (or separated by spaces).</p>
      <textarea id="refs" placeholder="report/weekly/week=2025-01-06"></textarea>
      <div class="bar"><label>priority <input id="priority" type="number" value="0"
            style="width:6em"></label>
        <label>TTL seconds <input id="ttl" type="number" min="1" style="width:8em"></label>
        <label>comment <input id="comment" style="width:20em"></label>
        <button class="primary" type="submit">Create</button><button type="button"
          id="cancelnew">Close</button>
      </div>
    </form>
    <div id="view"></div>
  </main>
  <script>
    "use strict";
    var asOf = null,
      lastEvent = null,
      busy = false,
      again = false,
      follower = null,
      PAGE = 50;
    var GRAPH_LIMIT = 400, // more nodes than this: the graph draws one per job
      GRID_DATES = 62, // the grid's columns at most (the newest dates: two months)
      GRID_ROWS = 100, // and its rows
      findText = "", // what a list's text box holds
      grow = null, // the timeline's timer that grows running bars
      DATE = /\d{4}-\d{2}-\d{2}T\d{2}|\d{4}-\d{2}-\d{2}|\d{4}-\d{2}/; // README "Backfills"
    var STATUSES = /*STATUSES*/ ,
      EVENT_TYPES = /*EVENT_TYPES*/ ;

    function $(id) {
      return document.getElementById(id);
    }

    function esc(s) {
      return String(s == null ? "\u2013" : s).replace(/[&<>"']/g, function(c) {
        return {
          "&": "&amp;",
          "<": "&lt;",
          ">": "&gt;",
          '"': "&quot;",
          "'": "&#39;"
        } [c];
      });
    }

    function st(s) {
      return '<span class="status s-' + esc(s) + '">' + esc(s) + '</span>';
    }

    function staleMark(p) { // README "Freshness": a Live partition built from what changed since
      return p.stale ? ' <span class="status s-stale" data-stale="' + esc(p.ref) + '" title="' +
        esc(p.stale_reasons.join("; ")) + '">stale</span>' : "";
    }

    function short(id) {
      id = id ? String(id) : "";
      var m = /^schedule:([^:]+):/.exec(id);
      return m ? m[1] + " " + id.slice(m[0].length, m[0].length + 16) : /^[0-9a-f]{8}-[0-9a-f]{4}-/
        .test(id) ? id.slice(0, 8) : id;
    }

    function sourceText(src) {
      return src.type + (src.name ? " " + src.name : src.ref ? " " + src.ref : src.want_id ? " " +
        short(src.want_id) : "");
    }

    function wantLink(id) {
      return id ? '<a class="mono" href="' + link("wants/" + encodeURIComponent(id)) + '" title="' + esc(
        id) + '">' + esc(short(id)) + '</a>' : "\u2013";
    }

    function runLink(id) {
      return id ? '<a class="mono" href="' + link("job_runs/" + encodeURIComponent(id)) + '" title="' + esc(
        id) + '">' + esc(short(id)) + '</a>' : "\u2013";
    }

    function finder() { // a list's text box: it filters the rows shown as you type
      return '<input id="find" type="search" placeholder="filter: id, ref, comment" value="' +
        esc(findText) + '" size="26">';
    }

    function applyFinder() {
      var box = $("find");
      if (!box) return;
      var show = function() {
        findText = box.value;
        var t = box.value.trim().toLowerCase();
        Array.prototype.forEach.call(document.querySelectorAll("#view table tr"), function(tr,
          i) {
          if (i) tr.hidden = !!t && rowText(tr).indexOf(t) < 0;
        });
      };
      box.oninput = show;
      show();
    }

    function rowText(tr) { // what a row shows, and the whole ids behind its short ones
      var t = tr.textContent;
      Array.prototype.forEach.call(tr.querySelectorAll("a[title]"), function(a) {
        t += " " + a.title;
      });
      return t.toLowerCase();
    }

    function secs(t) { // a duration, as people read one
      return t < 60 ? t.toFixed(1) + "s" : t < 3600 ? Math.floor(t / 60) + "m " + ("0" + Math
        .floor(t % 60)).slice(-2) + "s" : Math.floor(t / 3600) + "h " + ("0" + Math.floor(t %
        3600 / 60)).slice(-2) + "m";
    }

    function link(path) { // the fragment of a view: "#/" + kind/id, as of the event shown
      return withAsOf("#/" + path);
    }

    function withAsOf(hash) { // a fragment with this page's ?as_of=N (or none, at present)
      var h = hash.replace(/([?&])as_of=[^&]*&?/, "$1").replace(/[?&]$/, "");
      return asOf ? h + (h.indexOf("?") < 0 ? "?" : "&") + "as_of=" + asOf : h;
    }

    function showAsOf(v) { // the header's field and colours follow the event shown
      asOf = v ? String(+v) : null;
      $("asof").value = asOf || "";
      document.documentElement.classList.toggle("past", !!asOf);
      $("msg").className = "";
    }

    function refLink(r) {
      return '<a class="mono" href="' + link("partitions/" + encodeURIComponent(r)) + '">' + esc(r) +
        '</a>';
    }

    function few(list, fn, n) {
      n = n || 3;
      var h = list.slice(0, n).map(fn).join(" ");
      return list.length > n ? h + ' <span class="muted">+' + (list.length - n) + ' more</span>' : (
        h || "\u2013");
    }

    function when(t) {
      return t ? esc(String(t).replace("T", " ").replace(/\.\d+Z$/, "Z")) : "\u2013";
    }

    function epoch(s) {
      return s == null ? "\u2013" : when(new Date(s * 1000).toISOString());
    }

    function api(path, params) {
      params = Object.assign({}, params || {});
      if (asOf) params.as_of = asOf;
      var q = Object.keys(params).filter(function(k) {
          return params[k] !== "" && params[k] != null;
        })
        .map(function(k) {
          return encodeURIComponent(k) + "=" + encodeURIComponent(params[k]);
        }).join("&");
      return fetch(path + (q ? "?" + q : ""), {
        credentials: "same-origin"
      }).then(answer);
    }

    function send(method, path, body) {
      return fetch(path, {
        method: method,
        credentials: "same-origin",
        headers: {
          "Content-Type": "application/json"
        },
        body: JSON.stringify(body || {})
      }).then(answer);
    }

    function answer(r) {
      return r.json().catch(function() {
        return {
          error: "HTTP " + r.status
        };
      }).then(function(j) {
        if (!r.ok) {
          var e = new Error(j.error || ("HTTP " + r.status));
          e.status = r.status;
          throw e;
        }
        return j;
      });
    }

    function say(text, err) {
      var m = $("msg");
      m.textContent = text;
      m.className = err ? "err" : "";
    }

    function route() {
      var h = location.hash.replace(/^#\/?/, "") || "wants";
      var q = {},
        i = h.indexOf("?");
      if (i >= 0) {
        h.slice(i + 1).split("&").forEach(function(kv) {
          var p = kv.split("=");
          if (p[0]) q[decodeURIComponent(p[0])] = decodeURIComponent(p.slice(1).join("=") ||
          "");
        });
        h = h.slice(0, i);
      }
      var parts = h.split("/");
      return {
        kind: parts[0],
        id: parts.length > 1 ? decodeURIComponent(parts.slice(1).join("/")) : null,
        q: q
      };
    }

    function go(kind, q) {
      var s = Object.keys(q).filter(function(k) {
          return q[k] !== "" && q[k] != null && q[k] !== 0;
        })
        .map(function(k) {
          return k + "=" + encodeURIComponent(q[k]);
        }).join("&");
      location.hash = withAsOf("#/" + kind + (s ? "?" + s : ""));
    }

    function pager(kind, q, total) {
      var off = +(q.offset || 0),
        h = '<div class="bar"><span class="muted">' +
        (total ? (off + 1) + "\u2013" + Math.min(off + PAGE, total) + " of " + total : "none") +
        "</span>";
      h += '<button data-off="' + Math.max(0, off - PAGE) + '"' + (off ? "" : " disabled") +
        '>&larr; Newer</button>';
      h += '<button data-off="' + (off + PAGE) + '"' + (off + PAGE < total ? "" : " disabled") +
        '>Older &rarr;</button></div>';
      return h;
    }

    function wirePager(kind, q) {
      Array.prototype.forEach.call(document.querySelectorAll("[data-off]"), function(b) {
        b.onclick = function() {
          go(kind, Object.assign({}, q, {
            offset: +b.dataset.off
          }));
        };
      });
    }

    function statusFilter(kind, q) {
      return '<select id="flt"><option value="">any status</option>' + STATUSES[kind].map(function(
        s) {
        return "<option" + (q.status === s ? " selected" : "") + ">" + s + "</option>";
      }).join("") + "</select>";
    }

    function table(cols, rows) {
      return "<table><tr>" + cols.map(function(c) {
          return "<th>" + c[0] + "</th>";
        }).join("") + "</tr>" +
        (rows.length ? rows.map(function(r) {
            return "<tr>" + cols.map(function(c) {
              return "<td>" + c[1](r) + "</td>";
            }).join("") + "</tr>";
          }).join("") :
          '<tr><td colspan="' + cols.length + '" class="muted">nothing here</td></tr>') +
        "</table>";
    }

    function fields(pairs) {
      return "<dl>" + pairs.map(function(p) {
        return "<dt>" + p[0] + "</dt><dd>" + p[1] + "</dd>";
      }).join("") + "</dl>";
    }

    function action(label, cls, fn) {
      return {
        label: label,
        cls: cls,
        fn: fn
      };
    }

    function actions(list) {
      window._actions = list;
      return '<div class="bar">' + list.map(function(a, i) {
        return '<button class="' + a.cls + '" data-act="' + i + '"' + (asOf ?
            " disabled title=\"not while looking at the past\"" : "") + '>' + a.label +
          "</button>";
      }).join("") + "</div>";
    }

    function wireActions() {
      Array.prototype.forEach.call(document.querySelectorAll("[data-act]"), function(b) {
        b.onclick = function() {
          var a = window._actions[+b.dataset.act];
          b.disabled = true;
          Promise.resolve(a.fn()).then(function(t) {
            if (t) say(t);
            render();
          }).catch(function(e) {
            say(e.message, true);
            b.disabled = false;
          });
        };
      });
    }
    var views = {
      wants: function(r) {
        if (r.id) return wantView(r.id);
        var q = r.q;
        return api("/api/wants", {
          status: q.status,
          limit: PAGE,
          offset: q.offset
        }).then(function(j) {
          // The wants people made (root wants), each with the derivative
          // wants of the page folded under it; ?all=1 lists every want.
          var folded = {},
            onPage = {};
          j.data.forEach(function(w) {
            onPage[w.want_id] = true;
          });
          var rows = q.all ? j.data : j.data.filter(function(w) {
            if (w.root_want_id === w.want_id || !onPage[w.root_want_id]) return true;
            (folded[w.root_want_id] = folded[w.root_want_id] || []).push(w);
          });
          return {
            html: "<h1>Wants</h1>" + '<div class="bar">' + statusFilter("wants", q) +
              finder() + '<label><input type="checkbox" id="all"' + (q.all ? " checked" :
                "") + "> derivative wants as rows too</label></div>" +
              table([
                ["want", function(w) {
                  return wantLink(w.want_id) + (w.root_want_id !== w.want_id ?
                    ' <span class="muted">of</span> ' + wantLink(w.root_want_id) : "");
                }],
                ["status", function(w) {
                  return st(w.status);
                }],
                ["partitions", function(w) {
                  return few(w.partitions, refLink);
                }],
                ["priority", function(w) {
                  return esc(w.priority);
                }],
                ["source", function(w) {
                  return esc(sourceText(w.source)) + (w.comment ?
                    ' <span class="muted">' + esc(w.comment) + "</span>" : "");
                }],
                ["derivative wants", function(w) {
                  var d = folded[w.want_id];
                  return d ? '<details data-derivatives="' + esc(w.want_id) + '"><summary>' +
                    d.length + " derivative want" + (d.length > 1 ? "s" : "") +
                    "</summary>" + d.map(function(x) {
                      return '<div data-derivative="' + esc(x.want_id) + '">' + wantLink(x
                        .want_id) + " " + st(x.status) + " " + few(x.partitions, refLink, 2) +
                        "</div>";
                    }).join("") + "</details>" : (w.derivative_want_ids.length && !q.all ?
                      '<span class="muted">' + w.derivative_want_ids.length +
                      " (other pages)</span>" : "\u2013");
                }],
                ["created", function(w) {
                  return when(w.created_at);
                }]
              ], rows) + pager("wants", q, j.total),
            wire: function() {
              $("flt").onchange = function() {
                go("wants", {
                  status: this.value,
                  all: q.all
                });
              };
              $("all").onchange = function() {
                go("wants", {
                  status: q.status,
                  all: this.checked ? "1" : ""
                });
              };
              wirePager("wants", q);
            }
          };
        });
      },
      partitions: function(r) {
        if (r.id) return partitionView(r.id);
        var q = r.q;
        return api("/api/partitions", {
          status: q.status,
          prefix: q.prefix,
          stale: q.stale ? "true" : null,
          limit: PAGE,
          offset: q.offset
        }).then(function(j) {
          return {
            html: "<h1>Partitions</h1>" +
              '<div class="bar"><input id="prefix" placeholder="ref prefix, e.g. raw/" value="' +
              esc(q.prefix || "").replace("\u2013", "") + '" size="32">' +
              statusFilter("partitions", q) + finder() +
              '<label><input type="checkbox" id="stale"' + (q.stale ? " checked" : "") +
              '> stale only</label></div>' +
              table([
                ["ref", function(p) {
                  return refLink(p.ref);
                }],
                ["status", function(p) {
                  return st(p.status) + staleMark(p);
                }],
                ["job", function(p) {
                  return esc(p.job_label);
                }],
                ["built by", function(p) {
                  return runLink(p.built_by_job_run_id);
                }],
                ["last run", function(p) {
                  return runLink(p.last_job_run_id);
                }],
                ["updated", function(p) {
                  return when(p.updated_at);
                }]
              ], j.data) +
              pager("partitions", q, j.total),
            wire: function() {
              $("prefix").onchange = function() {
                go("partitions", {
                  prefix: this.value,
                  status: q.status,
                  stale: q.stale
                });
              };
              $("flt").onchange = function() {
                go("partitions", {
                  prefix: q.prefix,
                  status: this.value,
                  stale: q.stale
                });
              };
              $("stale").onchange = function() {
                go("partitions", {
                  prefix: q.prefix,
                  status: q.status,
                  stale: this.checked ? "true" : ""
                });
              };
              wirePager("partitions", q);
            }
          };
        });
      },
      job_runs: function(r) {
        if (r.id) return runView(r.id);
        var q = r.q;
        return api("/api/job_runs", {
          status: q.status,
          job_label: q.job,
          limit: PAGE,
          offset: q.offset
        }).then(function(j) {
          var took = j.data.filter(function(x) {
            return x.duration_ms != null;
          }).map(function(x) {
            return x.duration_ms / 1000;
          }).sort(function(a, b) {
            return a - b;
          });
          return {
            html: "<h1>Job runs" + (q.job ? " of " + esc(q.job) : "") + "</h1>" +
              '<div class="bar">' + statusFilter("job_runs", q) + finder() + (q.job ?
                '<span class="muted" id="durations">' + j.total + " runs; this page: " +
                (took.length ? "median " + took[took.length >> 1].toFixed(1) + "s, longest " +
                  took[took.length - 1].toFixed(1) + "s" : "none finished") +
                '</span> <a href="' + link("job_runs") + '">all jobs</a>' : "") + "</div>" +
              table([
                ["job run", function(x) {
                  return runLink(x.job_run_id);
                }],
                ["status", function(x) {
                  return st(x.status);
                }],
                ["job", function(x) {
                  return esc(x.job_label);
                }],
                ["partitions", function(x) {
                  return few(x.partitions, refLink);
                }],
                ["attempt", function(x) {
                  return esc(x.attempt);
                }],
                ["executor", function(x) {
                  return esc(x.executor);
                }],
                ["duration", function(x) {
                  return x.duration_ms == null ? "\u2013" : (x.duration_ms / 1000)
                    .toFixed(1) + "s";
                }],
                ["error", function(x) {
                  return esc(x.error);
                }]
              ], j.data) + pager("job_runs", q, j.total),
            wire: function() {
              $("flt").onchange = function() {
                go("job_runs", {
                  status: this.value,
                  job: q.job
                });
              };
              wirePager("job_runs", q);
            }
          };
        });
      },
      events: function(r) {
        var q = r.q,
          top = asOf ? +asOf + 1 : 9007199254740991,
          before = Math.min(+(q.before || top), top);
        var params = "before=" + before + "&limit=" + PAGE + (q.type ? "&type=" +
          encodeURIComponent(q.type) : "");
        return fetch("/api/events?" + params, {
          credentials: "same-origin"
        }).then(answer).then(function(j) {
          var rows = j.data,
            last = rows.length ? rows[rows.length - 1].event_id : 0;
          var shown = rows.length ? (q.type ? rows.length + " " + esc(q.type) +
            " events, #" + rows[0].event_id + " to #" + last :
            "#" + rows[0].event_id + " to #" + last + " of " + Math.min(j.latest_event_id,
              top - 1)) : "none";
          return {
            html: "<h1>Events</h1>" +
              '<div class="bar"><select id="flt"><option value="">any type</option>' +
              EVENT_TYPES.map(function(t) {
                return "<option" + (q.type === t ? " selected" : "") + ">" + t +
                  "</option>";
              }).join("") + '</select><span class="muted">newest first</span></div>' +
              table([
                ["#", function(e) {
                  return '<a href="#" data-asof="' + e.event_id +
                    '" title="show everything as of this event">' + e.event_id + "</a>";
                }],
                ["time", function(e) {
                  return when(e.timestamp);
                }],
                ["type", function(e) {
                  return esc(e.type);
                }],
                ["about", function(e) {
                  var p = e.payload,
                    h = [];
                  if (p.want_id) h.push(wantLink(p.want_id));
                  if (p.job_run_id) h.push(runLink(p.job_run_id));
                  if (p.ref) h.push(refLink(p.ref));
                  if (p.partitions) h.push(few(p.partitions, refLink, 2));
                  if (p.error) h.push(esc(p.error));
                  if (p.reason) h.push(esc(p.reason));
                  return h.join(" ") + '<details data-event-id="' + e.event_id +
                    '"><summary class="muted">details</summary><pre class="mono">' +
                    esc(JSON.stringify(p, null, 2)) + "</pre></details>";
                }]
              ], rows) +
              '<div class="bar"><span class="muted">' + shown +
              '</span><button id="newest"' + (q.before ? "" : " disabled") +
              '>&larr; Newest</button><button id="older"' + (rows.length < PAGE || last <=
                1 ? " disabled" : "") + '>Older &rarr;</button></div>',
            wire: function() {
              $("flt").onchange = function() {
                go("events", {
                  type: this.value
                });
              };
              $("newest").onclick = function() {
                go("events", {
                  type: q.type
                });
              };
              $("older").onclick = function() {
                go("events", {
                  type: q.type,
                  before: last
                });
              };
              Array.prototype.forEach.call(document.querySelectorAll("[data-asof]"),
                function(a) {
                  a.onclick = function(ev) {
                    ev.preventDefault();
                    setAsOf(a.dataset.asof);
                  };
                });
            }
          };
        });
      },
      schedules: function() {
        return api("/api/schedules", {}).then(function(j) {
          return {
            html: "<h1>Schedules</h1>" + table([
              ["name", function(s) {
                return esc(s.name);
              }],
              ["when", function(s) {
                return esc(s.cron || ("every " + s.interval_seconds + " s")) + " " +
                  esc(s.timezone);
              }],
              ["partitions", function(s) {
                return few(s.partitions, esc);
              }],
              ["next tick", function(s) {
                return when(s.next_tick_at);
              }],
              ["last tick", function(s) {
                return when(s.last_tick_at);
              }],
              ["last want", function(s) {
                return wantLink(s.last_want_id);
              }],
              ["status", function(s) {
                return s.last_want_status ? st(s.last_want_status) : "\u2013";
              }]
            ], j.data)
          };
        });
      },
      sensors: function() {
        return api("/api/sensors", {}).then(function(j) {
          return {
            html: "<h1>Sensors</h1>" + table([
              ["name", function(x) {
                return '<span data-sensor="' + esc(x.name) + '">' + esc(x.name) + "</span>";
              }],
              ["every", function(x) {
                return esc(x.interval_seconds) + " s";
              }],
              ["command", function(x) {
                return '<span class="mono">' + esc(x.command.join(" ")) + "</span>";
              }],
              ["last evaluated", function(x) {
                return when(x.last_evaluated_at);
              }],
              ["status", function(x) {
                return x.last_status ? st(x.last_status) : "\u2013";
              }],
              ["error", function(x) {
                return x.last_error ? '<span class="mono">' + esc(x.last_error) + "</span>" :
                  "\u2013";
              }],
              ["cursor", function(x) {
                return x.cursor != null ? '<span class="mono">' + esc(x.cursor) + "</span>" :
                  "\u2013";
              }],
              ["wants made", function(x) {
                return esc(x.wants_created);
              }]
            ], j.data)
          };
        });
      },
      alerts: function(r) {
        var q = r.q;
        return api("/api/alerts", {
          status: q.status,
          limit: PAGE,
          offset: q.offset
        }).then(function(j) {
          return {
            html: "<h1>Alerts</h1>" + '<div class="bar">' + statusFilter("alerts", q) +
              "</div>" + table([
                ["#", function(a) {
                  return '<span data-alert="' + esc(a.alert_id) + '">' + esc(a.alert_id) +
                    "</span>";
                }],
                ["alert", function(a) {
                  return esc(a.alert);
                }],
                ["kind", function(a) {
                  return esc(a.kind);
                }],
                ["raised", function(a) {
                  return when(a.timestamp);
                }],
                ["summary", function(a) {
                  var subject = a.want ? wantLink(a.want.want_id) : a.partition ?
                    refLink(a.partition.ref) : "";
                  return esc(a.summary) + (subject ? " " + subject : "");
                }],
                ["delivery", function(a) {
                  return st(a.status) + " " + esc(a.attempts) + " attempt" +
                    (a.attempts === 1 ? "" : "s");
                }],
                ["last error", function(a) {
                  return a.last_error ? esc(a.last_error) : "\u2013";
                }]
              ], j.data) + pager("alerts", q, j.total),
            wire: function() {
              $("flt").onchange = function() {
                go("alerts", {
                  status: this.value
                });
              };
              wirePager("alerts", q);
            }
          };
        });
      },
      grid: function(r) {
        // Refs that differ by a date: a row per ref without it, a column per date.
        var q = r.q;
        return api("/api/partitions", {
          prefix: q.prefix,
          limit: 1000
        }).then(function(j) {
          var rows = {},
            dates = {},
            undated = 0;
          j.data.forEach(function(p) {
            var m = DATE.exec(p.ref);
            if (!m) return undated++;
            var key = p.ref.slice(0, m.index) + "{date}" + p.ref.slice(m.index + m[0].length);
            (rows[key] = rows[key] || {})[m[0]] = p;
            dates[m[0]] = true;
          });
          var ds = Object.keys(dates).sort(),
            keys = Object.keys(rows).sort(),
            note = (j.total > j.data.length ? "The first " + j.data.length + " of " + j
              .total + " partitions: narrow them with a prefix. " : "");
          if (ds.length > GRID_DATES) { // the newest dates: what a team checks first
            note += "The newest " + GRID_DATES + " of " + ds.length + " dates. ";
            ds = ds.slice(-GRID_DATES);
          }
          if (keys.length > GRID_ROWS) {
            note += "The first " + GRID_ROWS + " of " + keys.length + " rows. ";
            keys = keys.slice(0, GRID_ROWS);
          }
          note += undated ? undated + " without a date not shown." : "";
          return {
            html: "<h1>Grid</h1>" + prefixBar(q, "gridnote", note) +
              (keys.length ? '<table class="grid"><tr><th></th>' + ds.map(function(d) {
                return '<th class="date" data-date="' + esc(d) + '">' + esc(d) + "</th>";
              }).join("") + "</tr>" + keys.map(function(k) {
                return '<tr data-row="' + esc(k) + '"><td class="key mono">' + esc(k) +
                  "</td>" + ds.map(function(d) {
                    var p = rows[k][d];
                    return "<td>" + (p ? '<a class="cell s-' + esc(p.status) +
                      '" data-ref="' + esc(p.ref) + '" data-status="' + esc(p.status) +
                      '" href="' + link("partitions/" + encodeURIComponent(p.ref)) +
                      '" title="' + esc(p.ref + " " + p.status + (p.stale ? " (stale)" :
                        "")) + '"></a>' : "") + "</td>";
                  }).join("") + "</tr>";
              }).join("") + "</table>" :
                '<p class="muted">No partitions with a date in their ref here.</p>'),
            wire: wirePrefix("grid")
          };
        });
      },
      graph: function(r) {
        // The lineage graph of the partitions under a prefix and their
        // direct upstream; beyond GRAPH_LIMIT nodes (or ?limit=N), one per job.
        var q = r.q,
          most = +q.limit || GRAPH_LIMIT;
        return api("/api/partitions", {
          prefix: q.prefix,
          limit: 1000
        }).then(function(j) {
          var nodes = {},
            edges = [],
            part = {};
          j.data.forEach(function(p) {
            part[p.ref] = p;
          });
          j.data.forEach(function(p) {
            p.upstream.forEach(function(u) {
              edges.push([u, p.ref]);
              if (!part[u]) part[u] = {
                ref: u,
                status: "unknown",
                job_label: "(outside the prefix)",
                neighbour: true
              };
            });
          });
          var refs = Object.keys(part),
            note = (j.total > j.data.length ? "The first " + j.data.length + " of " + j.total +
              " partitions. " : "") + (j.data.length > most ? j.data.length + " partitions" :
              refs.length + " nodes");
          if (j.data.length > most) { // partitions, their upstream neighbours aside
            var jobs = {};
            refs.forEach(function(ref) {
              var p = part[ref],
                k = p.job_label || "?";
              var n = jobs[k] = jobs[k] || {
                label: k,
                counts: {},
                total: 0
              };
              n.counts[p.status] = (n.counts[p.status] || 0) + 1;
              n.total++;
            });
            Object.keys(jobs).forEach(function(k) {
              var n = jobs[k],
                worst = ["Failed", "UpstreamFailed", "Building", "UpstreamBuilding",
                  "UpForRetry", "Tainted", "Canceled", "Live"
                ].filter(function(s) {
                  return n.counts[s];
                })[0] || "unknown"; // the job's colour: its worst status
              nodes[k] = {
                label: k + " (" + n.total + ")",
                status: worst,
                title: k + ": " + Object.keys(n.counts).map(function(s) {
                  return n.counts[s] + " " + s;
                }).join(", "),
                href: link("partitions?prefix=" + encodeURIComponent(q.prefix || "")),
                attrs: 'data-job="' + esc(k) + '" data-status="' + esc(worst) + '"'
              };
            });
            var seen = {};
            edges = edges.map(function(e) {
              return [part[e[0]].job_label || "?", part[e[1]].job_label || "?"];
            }).filter(function(e) {
              var k = e.join("\n");
              return e[0] !== e[1] && !seen[k] && (seen[k] = true);
            });
            note += ": more than " + most + " partitions, so one node per job (narrow with a " +
              "prefix, or ?limit=N)";
          } else {
            refs.forEach(function(ref) {
              var p = part[ref];
              nodes[ref] = {
                label: ref,
                status: p.status,
                stale: p.stale,
                title: ref + " " + p.status + (p.stale ? " (stale)" : "") + (p.neighbour ?
                  " (upstream, outside the prefix)" : ""),
                href: link("partitions/" + encodeURIComponent(ref)),
                attrs: 'data-ref="' + esc(ref) + '" data-status="' + esc(p.status) + '"' + (p
                  .stale ? " data-stale" : "")
              };
            });
          }
          return {
            html: "<h1>Graph</h1>" + prefixBar(q, "graphnote", note) +
              (refs.length ? drawGraph(nodes, edges) :
                '<p class="muted">No partitions here.</p>'),
            wire: wirePrefix("graph")
          };
        });
      },
      timeline: function(r) {
        // Job runs as bars on a time axis, a lane per job; running bars grow.
        var q = r.q,
          win = {
            hour: 3600,
            day: 86400
          } [q.window];
        return api("/api/job_runs", {
          limit: 1000
        }).then(function(j) {
          var now = Date.now() / 1000,
            t = function(s) {
              return s ? Date.parse(s) / 1000 : null;
            };
          var runs = j.data.filter(function(x) {
            return x.started_at && (!win || (t(x.finished_at) || now) >= now - win);
          });
          var lanes = Array.from(new Set(runs.map(function(x) {
            return x.job_label;
          }))).sort();
          var t0 = win ? now - win : Math.min.apply(null, runs.map(function(x) {
              return t(x.started_at);
            })),
            t1 = win ? now : Math.max.apply(null, runs.map(function(x) {
              return t(x.finished_at) || now;
            }));
          if (!(t1 > t0)) t1 = t0 + 1;
          if (runs.some(function(x) { // room on the right for running bars to grow into
              return !x.finished_at;
            })) t1 += Math.max(30, (t1 - t0) / 10);
          var L = 160,
            W = 1100,
            H = 12, // a bar's row; runs of a job that overlap take rows of its lane
            x = function(v) {
              return L + Math.max(0, (v - t0) / (t1 - t0)) * (W - L);
            };
          var rows = {},
            top = {},
            y = 0;
          lanes.forEach(function(l) {
            var ends = [];
            runs.filter(function(r) {
              return r.job_label === l;
            }).sort(function(a, b) {
              return t(a.started_at) - t(b.started_at);
            }).forEach(function(r) {
              var i = ends.findIndex(function(e) {
                return e <= t(r.started_at);
              });
              if (i < 0) i = ends.push(0) - 1;
              ends[i] = t(r.finished_at) || Infinity;
              rows[r.job_run_id] = i;
            });
            top[l] = y;
            y += Math.max(ends.length * H, 18) + 8;
          });
          var span = t1 - t0,
            cut = span > 86400 ? [5, 16] : span > 60 ? [11, 19] : [11, 21];
          var axis = [0, 1, 2, 3, 4, 5].map(function(i) {
            var v = t0 + span * i / 5,
              text = new Date(v * 1000).toISOString().replace("T", " ").slice(cut[0], cut[1]);
            return '<line x1="' + x(v) + '" x2="' + x(v) + '" y1="0" y2="' + y +
              '"></line><text x="' + x(v) + '" y="' + (y + 14) + '" text-anchor="' + (i ?
                i === 5 ? "end" : "middle" : "start") + '">' + text + "</text>";
          }).join("");
          var bars = runs.map(function(r) {
            var a = x(t(r.started_at)),
              b = x(t(r.finished_at) || now);
            return '<a href="' + link("job_runs/" + encodeURIComponent(r.job_run_id)) +
              '"><rect class="s-' + esc(r.status) + '" data-job-run-id="' + esc(r.job_run_id) +
              '" data-status="' + esc(r.status) + '" data-start="' + t(r.started_at) + '"' +
              (r.finished_at ? "" : " data-running") + ' x="' + a + '" y="' + (top[r
                .job_label] + rows[r.job_run_id] * H) + '" height="' + (H - 2) +
              '" width="' + Math.max(2, b - a - 1) + '"><title>' +
              esc(r.job_label + " " + r.status + " " + r.partitions.join(" ")) +
              "</title></rect></a>";
          }).join("");
          var labels = lanes.map(function(l) {
            return '<text x="0" y="' + (top[l] + 10) + '">' + esc(l) + "</text>";
          }).join("");
          var choose = ["", "hour", "day"].map(function(w) {
            return '<option value="' + w + '"' + ((q.window || "") === w ? " selected" : "") +
              ">" + (w ? "last " + w : "all runs shown") + "</option>";
          }).join("");
          return {
            html: "<h1>Timeline</h1>" + '<div class="bar"><select id="window">' + choose +
              '</select><span class="muted">' + runs.length + " runs" + (j.total > j.data
                .length ? " (the newest " + j.data.length + " of " + j.total + ")" : "") +
              "</span></div>" + (runs.length ? '<svg class="timeline" width="' + W +
                '" height="' + (y + 20) + '">' + axis + labels + bars +
                "</svg>" : '<p class="muted">No job run started in this window.</p>'),
            wire: function() {
              $("window").onchange = function() {
                go("timeline", {
                  window: this.value
                });
              };
              grow = setInterval(function() { // running bars reach now
                var n = Date.now() / 1000;
                Array.prototype.forEach.call(document.querySelectorAll("rect[data-running]"),
                  function(e) {
                    e.setAttribute("width", Math.max(2, Math.min(x(n), W) - x(+e.dataset
                      .start)));
                  });
              }, 1000);
            }
          };
        });
      },
      jobs: function() {
        return api("/api/jobs", {}).then(function(j) {
          return {
            html: "<h1>Jobs</h1>" + table([
              ["job", function(x) {
                return '<a data-job="' + esc(x.label) + '" href="' + link("job_runs?job=" +
                  encodeURIComponent(x.label)) + '" title="its runs">' + esc(x.label) + "</a>";
              }],
              ["executor", function(x) {
                return esc(x.executor);
              }],
              ["patterns", function(x) {
                return few(x.partition_patterns, function(p) {
                  return '<span class="mono">' + esc(p) + "</span>";
                });
              }],
              ["entrypoint", function(x) {
                return '<span class="mono">' + esc(x.entrypoint.join(" ")) +
                "</span>";
              }],
              ["code version", function(x) {
                return '<span class="mono">' + esc(x.code_version || "\u2013") + "</span>" +
                  (x.auto_rebuild === "stale" ? " (auto rebuild)" : "");
              }],
              ["runs", function(x) {
                return Object.keys(x.job_runs).map(function(k) {
                  return st(k) + " " + x.job_runs[k];
                }).join(" ") || "\u2013";
              }]
            ], j.data)
          };
        });
      }
    };

    function wantView(id) {
      return api("/api/wants/" + encodeURIComponent(id)).then(function(j) {
        var w = j.data;
        var runs = w.job_run_ids.length ? api("/api/job_runs", {
          want_id: w.want_id,
          limit: 100
        }) : Promise.resolve({
          data: []
        });
        return Promise.all([runs, tree(w, 0)]).then(function(a) {
          var c = w.counts,
            live = c.Live || 0,
            errors = {}; // ref -> the error of its newest failed run
          a[0].data.slice().reverse().forEach(function(x) {
            if (x.status === "Failed") x.partitions.forEach(function(r) {
              errors[r] = x.error || "failed";
            });
          });
          var acts = w.terminal ? [] : [action("Cancel want", "danger", function() {
            if (!confirm("Cancel want " + w.want_id + "?")) return;
            return send("DELETE", "/api/wants/" + encodeURIComponent(w.want_id)).then(
              function() {
                return "Want canceled";
              });
          })];
          if (w.terminal && live < c.total) acts.push(action("Retry", "", function() {
            return send("POST", "/api/wants/" + encodeURIComponent(w.want_id) +
              "/retry").then(function(j) {
              location.hash = "#/wants/" + encodeURIComponent(j.data.want_id);
              return "Retry want created";
            });
          }));
          return {
            html: "<h1>Want " + esc(w.want_id) + " " + st(w.status) + "</h1>" + actions(
                acts) +
              '<div class="grid"><div>' + fields([
                ["status", st(w.status)],
                ["progress", '<progress data-live="' + live + '" value="' + live +
                  '" max="' + c.total + '"></progress> ' + live + "/" + c.total +
                  " live" +
                  Object.keys(c).filter(function(k) {
                    return k !== "total" && k !== "Live";
                  }).map(function(k) {
                    return ", " + c[k] + " " + st(k);
                  }).join("")
                ],
                ["source", esc(JSON.stringify(w.source))],
                ["parent", wantLink(w.parent_want_id)],
                ["root", wantLink(w.root_want_id)],
                ["priority", esc(w.priority)],
                ["data time", epoch(w.data_timestamp)],
                ["TTL", w.ttl_seconds ? esc(w.ttl_seconds) + " s (expires " + epoch(w
                  .data_timestamp + w.ttl_seconds) + ")" : "none"],
                ["SLA", w.sla_seconds ? esc(w.sla_seconds) + " s" + (w.sla_breached ?
                  ' <span class="s-Failed status">breached</span>' : "") : "none"],
                ["comment", esc(w.comment)],
                ["created", when(w.created_at)],
                ["updated", when(w.updated_at)],
                ["elapsed", secs(((w.terminal ? Date.parse(w.updated_at) : Date.now()) -
                  Date.parse(w.created_at)) / 1000) + (w.terminal ? "" : " so far")],
                ["runs took", a[0].data.length ? secs(a[0].data.reduce(function(t, x) {
                  return t + (x.duration_ms || 0);
                }, 0) / 1000) + " in " + a[0].data.length + " runs" : "\u2013"]
              ]) +
              "</div><div><h2 style=\"margin-top:0\">Partitions</h2>" + table([
                ["ref", function(r) {
                  return refLink(r);
                }],
                ["status", function(r) {
                  return st(w.partition_statuses[r]);
                }],
                ["error", function(r) { // why a partition of this want failed
                  return /Failed/.test(w.partition_statuses[r]) ? '<span data-error="' +
                    esc(r) + '">' + esc(errors[r] || "upstream failed") + "</span>" : "";
                }]
              ], w.partitions) + "</div></div>" +
              "<h2>Derivative wants</h2>" + (a[1] || '<p class="muted">none</p>') +
              "<h2>Job runs</h2>" + table([
                ["job run", function(x) {
                  return runLink(x.job_run_id);
                }],
                ["status", function(x) {
                  return st(x.status);
                }],
                ["job", function(x) {
                  return esc(x.job_label);
                }],
                ["partitions", function(x) {
                  return few(x.partitions, refLink);
                }],
                ["attempt", function(x) {
                  return esc(x.attempt);
                }],
                ["duration", function(x) {
                  return x.duration_ms == null ? "\u2013" : secs(x.duration_ms / 1000);
                }],
                ["error", function(x) {
                  return esc(x.error);
                }]
              ], a[0].data)
          };
        });
      });
    }

    function tree(w, depth) {
      if (!w.derivative_want_ids.length || depth > 4) return Promise.resolve("");
      return Promise.all(w.derivative_want_ids.slice(0, 20).map(function(id) {
          return api("/api/wants/" + encodeURIComponent(id)).then(function(j) {
            return tree(j.data, depth + 1).then(function(sub) {
              return "<li>" + wantLink(id) + " " + st(j.data.status) + " " + few(j.data
                .partitions, refLink) + sub + "</li>";
            });
          });
        }))
        .then(function(items) {
          return '<ul class="tree">' + items.join("") + (w.derivative_want_ids.length > 20 ?
              '<li class="muted">+' + (w.derivative_want_ids.length - 20) + " more</li>" : "") +
            "</ul>";
        });
    }

    function prefixBar(q, id, note) { // a picture's prefix box, and what it left out
      return '<div class="bar"><input id="prefix" placeholder="ref prefix, e.g. daily/" ' +
        'value="' + esc(q.prefix || "") + '" size="32"><span class="muted" id="' + id + '">' +
        esc(note) + "</span></div>";
    }

    function wirePrefix(kind) {
      return function() {
        $("prefix").onchange = function() {
          go(kind, {
            prefix: this.value
          });
        };
      };
    }

    function drawGraph(nodes, edges) {
      // A layered layout of our own: a column per depth (upstream to the
      // left), nodes ordered in a column by where their upstream sit.
      // nodes: {id: {label, status, stale, href, attrs}}; edges: [[up, down]].
      var ups = {},
        depth = {},
        ids = Object.keys(nodes).sort();
      edges.forEach(function(e) {
        (ups[e[1]] = ups[e[1]] || []).push(e[0]);
      });
      var level = function(id, seen) {
        if (depth[id] != null) return depth[id];
        if (seen[id]) return 0; // a cycle: cut here
        seen[id] = true;
        var d = 0;
        (ups[id] || []).forEach(function(u) {
          d = Math.max(d, level(u, seen) + 1);
        });
        return (depth[id] = d);
      };
      ids.forEach(function(id) {
        level(id, {});
      });
      var cols = [],
        pos = {},
        downs = {};
      edges.forEach(function(e) {
        (downs[e[0]] = downs[e[0]] || []).push(e[1]);
      });
      ids.forEach(function(id) {
        (cols[depth[id]] = cols[depth[id]] || []).push(id);
      });
      cols = cols.filter(Boolean);
      cols.forEach(function(col) {
        col.forEach(function(id, i) {
          pos[id] = i;
        });
      });
      // Sweeps: each node wants the mean row of its neighbours in the column
      // just placed (upstream going right, downstream going left); a column
      // takes the rows its nodes want, in that order, none sharing a row.
      [ups, downs, ups].forEach(function(near, k) {
        (k === 1 ? cols.slice().reverse() : cols).forEach(function(col) {
          col.forEach(function(id) {
            var n = (near[id] || []).filter(function(x) {
              return pos[x] != null && depth[x] !== depth[id];
            });
            if (n.length) pos[id] = n.reduce(function(a, x) {
              return a + pos[x];
            }, 0) / n.length;
          });
          col.sort(function(a, b) {
            return pos[a] - pos[b] || (a < b ? -1 : 1);
          });
          col.forEach(function(id, i) {
            pos[id] = Math.max(Math.round(pos[id]), i ? pos[col[i - 1]] + 1 : 0);
          });
        });
      });
      var longest = Math.max.apply(null, ids.map(function(id) {
          return nodes[id].label.length;
        }).concat([8])),
        NW = Math.min(340, longest * 7 + 20),
        NH = 20,
        GX = 70,
        GY = 8,
        at = function(id) {
          return [depth[id] * (NW + GX), pos[id] * (NH + GY)];
        };
      var height = (Math.max.apply(null, ids.map(function(id) {
        return pos[id];
      })) + 1) * (NH + GY);
      var lines = edges.filter(function(e) {
        return nodes[e[0]] && nodes[e[1]];
      }).map(function(e) {
        var a = at(e[0]),
          b = at(e[1]),
          x1 = a[0] + NW,
          y1 = a[1] + NH / 2,
          x2 = b[0],
          y2 = b[1] + NH / 2;
        return '<path data-edge="' + esc(e[0] + " " + e[1]) + '" d="M' + x1 + " " + y1 + " C" +
          (x1 + GX / 2) + " " + y1 + " " + (x2 - GX / 2) + " " + y2 + " " + x2 + " " + y2 +
          '"></path>';
      }).join("");
      var boxes = ids.map(function(id) {
        var n = nodes[id],
          p = at(id),
          text = n.label.length * 7 + 12 > NW ? n.label.slice(0, Math.floor((NW - 24) / 7)) +
          "\u2026" : n.label;
        return '<a href="' + n.href + '"><g ' + n.attrs + ' class="node s-' + esc(n.status) +
          (n.stale ? " stale" : "") + '" transform="translate(' + p[0] + "," + p[1] +
          ')"><title>' + esc(n.title || n.label) + '</title><rect width="' + NW + '" height="' +
          NH + '" rx="3"></rect><text x="6" y="14">' + esc(text) + "</text></g></a>";
      }).join("");
      return '<div class="graphbox"><svg class="graph" width="' + (cols.length * (NW + GX)) +
        '" height="' + (height + 4) + '">' + lines + boxes + "</svg></div>";
    }

    function neighbourhood(p, l) { // a partition's lineage (as fetched) as a graph
      var nodes = {},
        edges = [];
      var add = function(n) {
        nodes[n.ref] = {
          label: n.ref,
          status: n.status,
          stale: n.stale,
          title: n.ref + " " + n.status,
          href: link("partitions/" + encodeURIComponent(n.ref)),
          attrs: 'data-ref="' + esc(n.ref) + '" data-status="' + esc(n.status) + '"' + (n.ref ===
            p.ref ? " data-focus" : "")
        };
      };
      var walk = function(n, key) {
        add(n);
        (n[key] || []).forEach(function(m) {
          edges.push(key === "upstream" ? [m.ref, n.ref] : [n.ref, m.ref]);
          walk(m, key);
        });
      };
      walk(Object.assign({}, p, {
        upstream: l.upstream
      }), "upstream");
      walk(Object.assign({}, p, {
        downstream: l.downstream
      }), "downstream");
      return Object.keys(nodes).length > 1 ? drawGraph(nodes, edges) :
        '<p class="muted">no recorded lineage</p>';
    }

    function lineageTree(nodes, key) {
      if (!nodes || !nodes.length) return "";
      return '<ul class="tree">' + nodes.map(function(n) {
        return "<li>" + refLink(n.ref) + " " + st(n.status) + (n.truncated ?
          ' <span class="muted">&hellip;</span>' : "") + lineageTree(n[key], key) + "</li>";
      }).join("") + "</ul>";
    }

    function partitionView(ref) {
      var e = encodeURIComponent(ref);
      return Promise.all([api("/api/partition", {
          ref: ref
        }), api("/api/partition/lineage", {
          ref: ref,
          depth: 3
        }),
        api("/api/partition/explain", {
          ref: ref
        })
      ]).then(function(a) {
        var p = a[0].data,
          l = a[1].data,
          x = a[2] && a[2].data;
        var acts = p.stale ? [action("Rebuild", "primary", function() {
          return send("POST", "/api/wants", {
            partitions: [p.ref],
            comment: "rebuild of a stale partition"
          }).then(function(j) {
            location.hash = "#/wants/" + encodeURIComponent(j.data.want_id);
            return "Wanted";
          });
        })] : [];
        acts = acts.concat(p.status === "Live" ? [action("Taint", "danger", function() {
            var why = prompt("Taint " + p.ref + "? Reason:");
            if (why === null) return;
            return send("POST", "/api/partition/taint?ref=" + e, {
              reason: why || null
            }).then(function() {
              return "Tainted";
            });
          }),
          action("Taint with downstream", "danger", function() {
            var why = prompt("Taint " + p.ref + " and everything built from it? Reason:");
            if (why === null) return;
            return send("POST", "/api/partition/taint?ref=" + e, {
              reason: why || null,
              downstream: true
            }).then(function(j) {
              return "Tainted " + j.data.tainted.length;
            });
          })
        ] : []);
        return {
          html: "<h1>Partition " + esc(p.ref) + " " + st(p.status) + staleMark(p) + "</h1>" +
            actions(acts) +
            '<div class="grid"><div>' + fields([
              ["status", st(p.status)],
              ["stale", p.stale ? '<ul class="reasons">' + p.stale_reasons.map(function(x) {
                return "<li>" + esc(x) + "</li>";
              }).join("") + "</ul>" : "no"],
              ["job", esc(p.job_label)],
              ["code version", '<span class="mono">' + esc(p.code_version || "\u2013") +
                "</span>"],
              ["built at", when(p.built_at)],
              ["built by", runLink(p.built_by_job_run_id)],
              ["last run", runLink(p.last_job_run_id)],
              ["wants", few(p.want_ids, wantLink, 6)],
              ["missing deps", few(p.missing_deps, refLink, 6)],
              ["retry at", when(p.retry_at)],
              ["updated", when(p.updated_at)]
            ]) + "</div><div>" +
            '<h2 style="margin-top:0">Built from</h2>' + (lineageTree(l.upstream, "upstream") ||
              '<p class="muted">no recorded upstream</p>') +
            "<h2>Built into</h2>" + (lineageTree(l.downstream, "downstream") ||
              '<p class="muted">nothing recorded</p>') + "</div></div>" +
            "<h2>Neighbourhood</h2>" + neighbourhood(p, l) +
            "<h2>Explain</h2>" + (x ? "<p>" + esc(x.summary) + "</p>" + table([
              ["#", function(s) {
                return esc(s.event_id);
              }],
              ["time", function(s) {
                return when(s.timestamp);
              }],
              ["what happened", function(s) {
                return esc(s.text) + (s.job_run_id ? " " + runLink(s.job_run_id) : "");
              }]
            ], x.steps) : '<p class="muted">not while looking at the past</p>')
        };
      });
    }

    function runView(id) {
      return api("/api/job_runs/" + encodeURIComponent(id)).then(function(j) {
        var r = j.data;
        var live = !asOf && (r.status === "Running" || r.status === "Queued");
        var logs = live ? Promise.resolve(["", ""]) : Promise.all(["stdout", "stderr"].map(
          function(s) {
            return fetch("/api/job_runs/" + encodeURIComponent(r.job_run_id) + "/logs/" +
                s + "?tail=262144", {
                  credentials: "same-origin"
                })
              .then(function(x) {
                return x.ok ? x.text() : "";
              });
          }));
        return logs.then(function(l) {
          var acts = live ? [action("Cancel run", "danger", function() {
            if (!confirm("Cancel job run " + r.job_run_id + "?")) return;
            return send("POST", "/api/job_runs/" + encodeURIComponent(r.job_run_id) +
              "/cancel").then(function() {
              return "Run canceled";
            });
          })] : [];
          return {
            html: "<h1>Job run " + esc(r.job_run_id) + " " + st(r.status) + "</h1>" +
              actions(acts) +
              fields([
                ["status", st(r.status)],
                ["job", esc(r.job_label)],
                ["partitions", few(r.partitions, refLink, 10)],
                ["wants", few(r.want_ids, wantLink, 6)],
                ["attempt", esc(r.attempt)],
                ["executor", esc(r.executor) + (r.external_id ? " (job " + esc(r
                  .external_id) + ")" : "")],
                ["exit code", esc(r.exit_code)],
                ["error", esc(r.error)],
                ["missing deps", few(r.missing_deps, refLink, 6)],
                ["queued", when(r.queued_at)],
                ["started", when(r.started_at)],
                ["finished", when(r.finished_at)],
                ["duration", r.duration_ms == null ? "\u2013" : (r.duration_ms / 1000)
                  .toFixed(2) + " s"
                ]
              ]) +
              '<div class="grid"><div><h2>stdout' + (live ?
                ' <span class="muted">(live)</span>' : "") + '</h2><pre id="log-stdout">' +
              esc(l[0] || "") +
              '</pre></div><div><h2>stderr' + (live ? ' <span class="muted">(live)</span>' :
                "") + '</h2><pre id="log-stderr">' + esc(l[1] || "") + "</pre></div></div>",
            wire: function() {
              if (live) follow(r.job_run_id);
            },
            keep: live && follower && follower.id === r.job_run_id
          };
        });
      });
    }

    function follow(id) {
      stopFollow();
      follower = {
        id: id,
        sources: []
      };
      ["stdout", "stderr"].forEach(function(s) {
        var src = new EventSource("/api/job_runs/" + encodeURIComponent(id) + "/logs/" + s +
            "?follow=true"),
          pre = $("log-" + s);
        if (pre) pre.textContent = "";
        src.addEventListener("log", function(ev) {
          var p = $("log-" + s);
          if (p) {
            p.textContent += ev.data + "\n";
            p.scrollTop = p.scrollHeight;
          }
        });
        src.addEventListener("complete", function() {
          src.close();
          if (s === "stdout") setTimeout(function() {
            follower = null;
            render();
          }, 200);
        });
        src.onerror = function() {
          src.close();
        };
        follower.sources.push(src);
      });
    }

    function stopFollow() {
      if (follower) {
        follower.sources.forEach(function(s) {
          s.close();
        });
        follower = null;
      }
    }

    function render() {
      if (busy) {
        again = true;
        return;
      }
      busy = true;
      again = false;
      var r = route(),
        v = views[r.kind] || views.wants;
      if (r.q.as_of && r.q.as_of !== asOf) showAsOf(r.q.as_of); // a link to the past
      else if (!r.q.as_of && asOf) history.replaceState(null, "", withAsOf(location.hash ||
        "#/wants")); // the past stays until Now
      Array.prototype.forEach.call(document.querySelectorAll("nav a"), function(a) {
        a.setAttribute("href", link(a.getAttribute("href").replace(/^#\/([^?]*).*$/, "$1")));
      });
      Promise.resolve(v(r)).then(function(out) {
        if (!(out.keep && follower)) {
          stopFollow();
          clearInterval(grow);
          var y = window.scrollY,
            open = Array.prototype.map.call(document.querySelectorAll(
              "details[open][data-event-id]"), function(d) {
              return d.dataset.eventId;
            });
          $("view").innerHTML = out.html;
          open.forEach(function(id) { // an event's details stay open as the page renews
            var d = document.querySelector('details[data-event-id="' + id + '"]');
            if (d) d.open = true;
          });
          window.scrollTo(0, y);
          wireActions();
          if (out.wire) out.wire();
          applyFinder();
        }
      }).catch(function(e) {
        stopFollow();
        $("view").innerHTML = "<h1>" + esc(e.status === 404 ? "Not found" : "Error") +
          "</h1><p>" + esc(e.message) + "</p>";
        if (e.status === 401) $("view").innerHTML +=
          '<p>Open the URL that <span class="mono">databuild.py dashboard</span> prints: it logs this browser in.</p>';
      }).then(function() {
        busy = false;
        if (again) render();
      });
    }

    function poll() {
      fetch("/health", {
        credentials: "same-origin"
      }).then(answer).then(function(h) {
        say((asOf ? "as of event " + asOf + " of " + h.latest_event_id : "event " + h
          .latest_event_id) + " \u00b7 v" + h.version + (h.config_error ?
          " \u00b7 config error: " + h.config_error : ""), !!h.config_error);
        document.body.dataset.latest = h.latest_event_id;
        if (!asOf && lastEvent !== h.latest_event_id && !editing()) {
          lastEvent = h.latest_event_id;
          render();
        }
      }).catch(function(e) {
        say("server unreachable: " + e.message, true);
      });
    }

    function editing() {
      var a = document.activeElement;
      return a && (a.tagName === "INPUT" || a.tagName === "TEXTAREA" || a.tagName === "SELECT");
    }

    function setAsOf(v) {
      showAsOf(v);
      history.replaceState(null, "", withAsOf(location.hash || "#/wants"));
      render();
      poll();
    }
    $("asof").onchange = function() {
      setAsOf(this.value);
    };
    $("live").onclick = function() {
      setAsOf(null);
    };
    $("theme").onclick = function() {
      var c = document.documentElement.classList,
        dark = c.contains("dark") ||
        (!c.contains("light") && matchMedia("(prefers-color-scheme: dark)").matches);
      c.toggle("dark", !dark);
      c.toggle("light", dark);
      try {
        localStorage.setItem("databuild-theme", dark ? "light" : "dark");
      } catch (e) {}
    };
    try {
      var t = localStorage.getItem("databuild-theme");
      if (t) document.documentElement.classList.add(t);
    } catch (e) {}
    $("new").onclick = function() {
      $("create").classList.toggle("open");
      $("refs").focus();
    };
    $("cancelnew").onclick = function() {
      $("create").classList.remove("open");
    };
    $("create").onsubmit = function(ev) {
      ev.preventDefault();
      var refs = $("refs").value.split(/\s+/).filter(Boolean);
      var body = {
        partitions: refs,
        priority: +$("priority").value || 0
      };
      if ($("ttl").value) body.ttl_seconds = +$("ttl").value;
      if ($("comment").value) body.comment = $("comment").value;
      send("POST", "/api/wants", body).then(function(j) {
        $("create").classList.remove("open");
        $("refs").value = "";
        location.hash = "#/wants/" + encodeURIComponent(j.data.want_id);
        say("Want created");
      }).catch(function(e) {
        say(e.message, true);
      });
    };
    window.onhashchange = function() {
      stopFollow();
      render();
    };
    render();
    poll();
    setInterval(poll, 2000);

  </script>
</body>

</html>
""".replace("/*STATUSES*/", json.dumps({
    "wants": WANT_STATUSES, "partitions": PARTITION_STATUSES, "job_runs": JOB_RUN_STATUSES,
    "alerts": ALERT_STATUSES})).replace(
    "/*EVENT_TYPES*/", json.dumps(EVENT_TYPES))


###############################################################################
# Client ######################################################################
###############################################################################

def _lines_or_unreachable(resp, url):
    # A stream cut in the middle is a server gone away, not a traceback.
    try:
        yield from resp
    except (OSError, http.client.HTTPException) as e:
        raise ServerUnreachable("The databuild server at %s went away: %s" % (url, e),
                                url=url) from None


_ERROR_FOR_STATUS = {400: InvalidRequest, 401: Unauthorized, 404: NotFound, 405: InvalidRequest,
                     409: Conflict, 413: PayloadTooLarge, 415: UnsupportedMediaType,
                     503: Unavailable}


class Client:
    """A urllib client of the HTTP API; one method per route.

    Errors come back as the module's own exceptions (NotFound, Conflict, ...),
    carrying the server's message and fields; an unreachable server raises
    ServerUnreachable.  ``token`` is the server's access token (README "Security"; in
    the workspace's ``.databuild/server.json``), sent as a Bearer header.
    """

    def __init__(self, url, timeout=60.0, token=None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token = token

    @classmethod
    def for_workspace(cls, path=None, start=True, timeout=60.0, on_start=None):
        """A client of a workspace's server, found as the CLI finds it: the
        workspace at or above ``path`` (default: the current folder), its
        ``.databuild/server.json`` (URL and token); if no server answers and
        ``start``, one is started in the background first.

        Raises ConfigError if there is no workspace, ServerUnreachable if no
        server runs (and ``start`` is false) or it does not come up.
        ``on_start(workspace)`` is called when a server is being started (the
        CLI says so on stderr).
        """
        workspace = find_workspace(path)
        if workspace is None:
            raise ConfigError("No %s in %s or above" % (CONFIG_FILE, os.path.abspath(
                path or os.getcwd())))
        state_dir = os.path.join(workspace, STATE_DIR)
        info = read_server_info(state_dir)
        if not (info and info.get("url") and _server_alive(info["url"])):
            if not start:
                raise ServerUnreachable("No server is running for workspace %s" % workspace,
                                        workspace=workspace)
            info = _start_server(workspace, on_start)
        return cls(info["url"], timeout=timeout, token=info.get("token"))

    def wait_want(self, want_id, timeout=None, poll=0.1):
        """Poll a want until it is terminal and return it.  WaitTimeout if it
        is not within ``timeout`` seconds (None: wait as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(poll, 0.05)
        while True:
            want = self.get_want(want_id)
            if want["status"] in TERMINAL_WANT_STATUSES:
                return want
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout("Want %s is still %s after %s seconds"
                                  % (want["want_id"], want["status"], timeout),
                                  want_id=want["want_id"], status=want["status"])
            time.sleep(delay if deadline is None else
                       max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(poll * 5, delay * 1.5)

    def _headers(self, accept):
        headers = {"Accept": accept}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        return headers

    def request(self, method, path, body=None, params=None, raw=False):
        """Send one request; returns the decoded JSON (or bytes with ``raw``)."""
        url = self.url + urllib.parse.quote(path, safe="/=:@")
        params = {k: v for k, v in (params or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None
        headers = self._headers("application/json")
        if method in ("POST", "PUT"):
            data = dumps(body if body is not None else {}).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            raise self._error(e) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            # HTTPException: the server went away in the middle of its answer.
            reason = getattr(e, "reason", None) or e
            raise ServerUnreachable("Cannot reach the databuild server at %s: %s"
                                    % (self.url, reason), url=self.url) from None
        if raw:
            return payload
        return json.loads(payload) if payload else {}

    @staticmethod
    def _error(e):
        try:
            body = json.loads(e.read())
            message = body.pop("error")
        except Exception:
            body, message = {}, "HTTP %d %s" % (e.code, e.reason)
        cls = _ERROR_FOR_STATUS.get(e.code, DatabuildError)
        error = cls(message, **body)
        error.status = e.code
        return error

    def health(self):
        """GET /health."""
        return self.request("GET", "/health")

    def list_wants(self, status=None, limit=None, offset=None, as_of=None):
        """GET /api/wants: the list envelope."""
        return self.request("GET", "/api/wants", params=dict(
            status=status, limit=limit, offset=offset, as_of=as_of))

    def create_want(self, partitions, **fields):
        """POST /api/wants; returns the want.  Refs may hold a range
        ``[FROM..TO]`` (README "Backfills")."""
        body = {"partitions": list(partitions)}
        body.update({k: v for k, v in fields.items() if v is not None})
        return self.request("POST", "/api/wants", body)["data"]

    def plan_want(self, partitions, **fields):
        """POST /api/wants?dry_run=true; returns the plan, writes nothing."""
        body = {"partitions": list(partitions)}
        body.update({k: v for k, v in fields.items() if v is not None})
        return self.request("POST", "/api/wants", body, params={"dry_run": "true"})["data"]

    def retry_want(self, want_id):
        """POST /api/wants/<want_id>/retry; returns the new want."""
        return self.request("POST", "/api/wants/%s/retry" % want_id, {})["data"]

    def get_want(self, want_id, as_of=None):
        """GET /api/wants/<want_id>."""
        return self.request("GET", "/api/wants/" + want_id, params={"as_of": as_of})["data"]

    def cancel_want(self, want_id):
        """DELETE /api/wants/<want_id>; returns the canceled want."""
        return self.request("DELETE", "/api/wants/" + want_id)["data"]

    def list_partitions(self, status=None, prefix=None, limit=None, offset=None, as_of=None,
                        stale=False):
        """GET /api/partitions: the list envelope (``stale``: only the stale ones)."""
        return self.request("GET", "/api/partitions", params=dict(
            status=status, prefix=prefix, limit=limit, offset=offset, as_of=as_of,
            stale="true" if stale else None))

    # The partition calls send the ref as a query parameter (GET
    # /api/partition?ref=R, ...): that works for every ref, one that ends
    # in /lineage or /taint too.

    def get_partition(self, ref, as_of=None):
        """GET /api/partition?ref=<ref>."""
        return self.request("GET", "/api/partition", params={"ref": ref, "as_of": as_of})["data"]

    def taint(self, ref, reason=None):
        """POST /api/partition/taint?ref=<ref>; returns the partition."""
        body = {"reason": reason} if reason is not None else {}
        return self.request("POST", "/api/partition/taint", body, params={"ref": ref})["data"]

    def taint_downstream(self, ref, reason=None, dry_run=False):
        """Taint ``ref`` and every Live partition built from it (README "Lineage"); returns
        ``{"data": partition, "tainted": [refs, upstream first], "dry_run"}``.
        With ``dry_run`` nothing is tainted: ``tainted`` says what would be."""
        body = {"downstream": True, "dry_run": dry_run}
        if reason is not None:
            body["reason"] = reason
        return self.request("POST", "/api/partition/taint", body, params={"ref": ref})

    def lineage(self, ref, depth=None, as_of=None):
        """GET /api/partition/lineage?ref=<ref>: upstream and downstream trees."""
        return self.request("GET", "/api/partition/lineage",
                            params={"ref": ref, "depth": depth, "as_of": as_of})["data"]

    def explain(self, ref, as_of=None):
        """GET /api/partition/explain?ref=<ref>: why the partition is in its state."""
        return self.request("GET", "/api/partition/explain",
                            params={"ref": ref, "as_of": as_of})["data"]

    def list_job_runs(self, status=None, job_label=None, want_id=None, limit=None,
                      offset=None, as_of=None):
        """GET /api/job_runs: the list envelope."""
        return self.request("GET", "/api/job_runs", params=dict(
            status=status, job_label=job_label, want_id=want_id, limit=limit,
            offset=offset, as_of=as_of))

    def get_job_run(self, job_run_id, as_of=None):
        """GET /api/job_runs/<id>."""
        return self.request("GET", "/api/job_runs/" + job_run_id, params={"as_of": as_of})["data"]

    def cancel_job_run(self, job_run_id):
        """POST /api/job_runs/<id>/cancel; returns the job run."""
        return self.request("POST", "/api/job_runs/%s/cancel" % job_run_id)["data"]

    def logs(self, job_run_id, stream="stdout", tail=None):
        """GET /api/job_runs/<id>/logs/<stream> as text (``tail``: the last N bytes)."""
        return self.request("GET", "/api/job_runs/%s/logs/%s" % (job_run_id, stream),
                            params={"tail": tail}, raw=True).decode("utf-8", "replace")

    def follow_logs(self, job_run_id, stream="stdout"):
        """Follow a job run's log live: yields ``("log", line)`` per line as the
        job writes it, then ``("complete", {"status", "exit_code", "duration_ms"})``."""
        url = self.url + "/api/job_runs/%s/logs/%s?follow=true" % (
            urllib.parse.quote(job_run_id, safe=""), urllib.parse.quote(stream, safe=""))
        req = urllib.request.Request(url, headers=self._headers("text/event-stream"))
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise self._error(e) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise ServerUnreachable("Cannot reach the databuild server at %s: %s"
                                    % (self.url, getattr(e, "reason", None) or e),
                                    url=self.url) from None
        with resp:
            event, data = None, []
            for raw in _lines_or_unreachable(resp, self.url):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:][1:] if line[5:6] == " " else line[5:])
                elif not line and event is not None:
                    text = "\n".join(data)
                    if event == "complete":
                        yield event, json.loads(text)
                        return
                    yield event, text
                    event, data = None, []

    def list_schedules(self):
        """GET /api/schedules: the configured schedules (list envelope)."""
        return self.request("GET", "/api/schedules")

    def list_sensors(self):
        """GET /api/sensors: the configured sensors and their evaluations (list envelope)."""
        return self.request("GET", "/api/sensors")

    def list_alerts(self, status=None, limit=None, offset=None, as_of=None):
        """GET /api/alerts: alerts raised, newest first (list envelope)."""
        return self.request("GET", "/api/alerts", params=dict(
            status=status, limit=limit, offset=offset, as_of=as_of))

    def list_jobs(self, as_of=None):
        """GET /api/jobs: the configured jobs (list envelope)."""
        return self.request("GET", "/api/jobs", params={"as_of": as_of})

    def events(self, since=0, limit=None, type=None, before=None):
        """GET /api/events: events after ``since``, oldest first (with
        ``before``: the newest before it first); ``type``: of that type only."""
        return self.request("GET", "/api/events", params={
            "since": since, "limit": limit, "type": type, "before": before})

    def shutdown(self):
        """POST /api/shutdown."""
        return self.request("POST", "/api/shutdown")


def _server_alive(url):
    try:
        Client(url, timeout=2).health()
        return True
    except DatabuildError:
        return False


def _start_server(workspace, on_start=None):
    """Start ``serve`` in the background, detached, logging to server.log; wait
    for it and return its server.json.

    Starters take turns on ``.databuild/start.lock``: of many CLIs started
    at once on a workspace with no server, one starts it and the others,
    once it answers, use it.
    """
    state_dir = os.path.join(workspace, STATE_DIR)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(state_dir, "server.log")
    deadline = time.monotonic() + DEFAULTS["cli_start_timeout_seconds"]
    with open(os.path.join(state_dir, "start.lock"), "a+") as start_lock:
        # The starter holds this lock until its server answers (or fails).
        while True:
            try:
                fcntl.flock(start_lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise ServerUnreachable("Another command is starting the server for %s "
                                            "and it did not answer in time (see %s)"
                                            % (workspace, log_path)) from None
                time.sleep(0.05)
        info = read_server_info(state_dir)
        if info and info.get("url") and _server_alive(info["url"]):
            return info  # started by the command that held the lock before us
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "serve", "--workspace", workspace],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=workspace)
        if on_start is not None:
            on_start(workspace)
        while time.monotonic() < deadline:
            info = read_server_info(state_dir)
            if info and info.get("pid") == proc.pid and _server_alive(info["url"]):
                return info
            code = proc.poll()
            if code is not None:
                info = read_server_info(state_dir)  # a server started by `serve` meanwhile?
                if info and info.get("url") and _server_alive(info["url"]):
                    return info
                message = _last_line(log_path)
                if message.startswith("databuild: error: "):
                    message = message[len("databuild: error: "):]
                if code == 2:  # a config error: say it once, as `serve` would
                    raise ConfigError(message)
                raise ServerUnreachable("The server exited with status %d while starting: %s "
                                        "(see %s)" % (code, message, log_path))
            time.sleep(0.05)
    raise ServerUnreachable("The server did not answer within %.0f seconds (see %s)"
                            % (DEFAULTS["cli_start_timeout_seconds"], log_path))


def _last_line(path):
    try:
        with open(path, "rb") as f:
            lines = [l for l in f.read()[-4096:].decode("utf-8", "replace").splitlines()
                     if l.strip()]
        return lines[-1] if lines else ""
    except OSError:
        return ""


###############################################################################
# CLI #########################################################################
###############################################################################

_CLI_DESCRIPTION = """\
databuild: declare the data you want; the server builds it.

A workspace is a folder holding databuild.toml.  Commands other than `serve`
talk to the workspace's server over HTTP; if none is running, they start one
in the background (see --no-start).  IDs of wants and job runs may be given
by any unique prefix of 4 or more characters, as in git.

examples:
  %(prog)s serve --workspace examples/reviews
  %(prog)s build 'report/weekly/week=2025-01-06' --wait
  %(prog)s want list --status building
  %(prog)s job-runs list --job daily_aggregates
  %(prog)s logs 3f2a --stderr --follow
  %(prog)s events --limit 50
"""


def _add_global_options(parser, suppress):
    default = argparse.SUPPRESS if suppress else None
    flag = argparse.SUPPRESS if suppress else False
    group = parser.add_argument_group("global options (before or after the command)")
    group.add_argument("--server", metavar="URL", default=default,
                       help="server URL (default: $DATABUILD_URL, else the workspace's server)")
    group.add_argument("--workspace", metavar="DIR", default=default,
                       help="workspace folder (default: nearest folder upward with databuild.toml)")
    group.add_argument("--token", metavar="TOKEN", default=default,
                       help="the server's access token (default: $DATABUILD_TOKEN, else the "
                            "workspace's .databuild/server.json)")
    group.add_argument("--json", action="store_true", default=flag,
                       help="machine-readable JSON output")
    group.add_argument("--no-start", action="store_true", default=flag,
                       help="do not start a server if none is running")


def _choice(values, what):
    """An argparse type: one of ``values``, in any letter case (``--status live``)."""
    by_lower = {v.lower(): v for v in values}

    def parse(text):
        try:
            return by_lower[text.lower()]
        except KeyError:
            raise argparse.ArgumentTypeError("%r is not a %s (one of %s)"
                                             % (text, what, ", ".join(values))) from None
    parse.__name__ = what
    return parse


class _Parsers:
    """What the parts of ``_build_parser`` share: the top parser, its
    subcommands, the global options every command takes (``common``), and
    the arguments several commands have."""

    def __init__(self):
        self.parser = argparse.ArgumentParser(
            description=_CLI_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.parser.add_argument("--version", action="version",
                                 version="databuild " + __version__)
        _add_global_options(self.parser, suppress=False)
        self.common = argparse.ArgumentParser(add_help=False)
        _add_global_options(self.common, suppress=True)
        self.commands = self.parser.add_subparsers(dest="command", metavar="COMMAND")
        self.commands.required = True

    def command(self, parent, name, help_text, func, parents=None, **kw):
        """A (sub)command of ``parent`` run by ``func(args)``."""
        sub = parent.add_parser(name, help=help_text, description=help_text,
                                parents=list((self.common,) if parents is None else parents),
                                **kw)
        sub.set_defaults(func=func)
        return sub

    def group(self, name, help_text):
        """A command with actions of its own (``want list``, ``want get`` ...)."""
        sub = self.commands.add_parser(name, help=help_text, description=help_text,
                                       parents=[self.common]).add_subparsers(
            dest=name.replace("-", "_") + "_command", metavar="ACTION")
        sub.required = True
        return sub

    @staticmethod
    def refs(p, what):
        p.add_argument("refs", nargs="+", metavar="REF", help=what)

    @staticmethod
    def want_fields(p):
        p.add_argument("--comment", metavar="TEXT", help="a note stored with the want")
        p.add_argument("--priority", type=int, metavar="N",
                       help="queued runs for higher priorities start first (default 0; "
                            "derivative wants inherit it)")
        p.add_argument("--ttl", type=float, metavar="S",
                       help="expire the want if it is not done S seconds after its data time")
        p.add_argument("--sla", type=float, metavar="S",
                       help="flag the want as breached if it is not done after S seconds")

    @staticmethod
    def listing(p, statuses, noun):
        p.add_argument("--status", type=_choice(statuses, "status"), metavar="STATUS",
                       help="only %s in this status, any case (%s)" % (noun, ", ".join(statuses)))
        p.add_argument("--limit", type=int, default=DEFAULTS["list_limit"], metavar="N",
                       help="show at most N (default %d, at most %d)"
                            % (DEFAULTS["list_limit"], DEFAULTS["list_limit_max"]))


_RANGE_HELP = (" A ref may hold one range [FROM..TO] of days (2025-01-01), months "
               "(2025-01), hours (2025-01-01T00) or integers: quote it for the shell.")


def _build_parser():
    parsers = _Parsers()
    for add in (_parser_serve_and_build, _parser_wants, _parser_partitions_and_runs,
                _parser_logs_and_lineage, _parser_server):
        add(parsers)
    return parsers.parser


def _parser_serve_and_build(c):
    """serve and build."""
    commands = c.commands
    # serve takes only what applies to it: no server to reach, no output format.
    serve_options = argparse.ArgumentParser(add_help=False)
    serve_options.add_argument("--workspace", metavar="DIR", default=argparse.SUPPRESS,
                               help="workspace folder (default: nearest folder upward with "
                                    "databuild.toml)")
    p = c.command(commands, "serve", "run the server for a workspace (in the foreground)",
                  _cli_serve, parents=(serve_options,))
    def from_config(key):  # the help of a [server] setting (README "The workspace")
        setting = SETTINGS_OF["server"][key]
        return "%s (default: [server] %s, else %s)" % (setting.help, key, setting.default)
    p.add_argument("--host", help=from_config("host"))
    p.add_argument("--port", type=int, help=from_config("port"))
    p.add_argument("--idle-timeout", type=float, metavar="S",
                   help=from_config("idle_timeout_seconds"))

    p = c.command(commands, "build", "want partitions built (and optionally wait for them)",
                  _cli_build)
    p.add_argument("refs", nargs="*", metavar="REF",
                   help="a partition to build, e.g. 'raw/reviews/date=2025-01-01' or "
                        "'raw/reviews/date=[2025-01-01..2025-01-31]'." + _RANGE_HELP)
    p.add_argument("--stale", action="store_true",
                   help="want every stale partition (instead of REFs): what was built from "
                        "data or code that changed since")
    p.add_argument("--prefix", metavar="P", help="with --stale: only refs starting with P")
    p.add_argument("--wait", action="store_true",
                   help="follow the want until every partition has settled, showing "
                        "progress; exit 0 only if Successful")
    p.add_argument("--dry-run", action="store_true",
                   help="only show the plan: the runs the want would start, over declared "
                        "deps; nothing is written")
    c.want_fields(p)


def _parser_wants(c):
    """want create, list, get, cancel, retry."""
    want = c.group("want", "create, list, show, cancel and retry wants")
    p = c.command(want, "create", "create a want for partitions (without waiting)", _cli_build)
    c.refs(p, "a partition the want asks for." + _RANGE_HELP)
    p.add_argument("--dry-run", action="store_true",
                   help="only show the plan; nothing is written")
    c.want_fields(p)
    p.set_defaults(wait=False)
    p = c.command(want, "list", "list wants, newest first", _cli_want_list)
    c.listing(p, WANT_STATUSES, "wants")
    p = c.command(want, "get", "show one want", _cli_want_get)
    p.add_argument("want_id", metavar="ID", help="the want's id, or a unique prefix of it")
    p = c.command(want, "cancel", "cancel a want (and the work only it needs)", _cli_want_cancel)
    p.add_argument("want_id", metavar="ID", help="the want's id, or a unique prefix of it")
    p = c.command(want, "retry", "want every partition of a want that is not Live (Failed, "
                  "UpstreamFailed, Canceled, never built) again, as a new want", _cli_want_retry)
    p.add_argument("want_id", metavar="ID", help="the want's id, or a unique prefix of it")
    p.add_argument("--wait", action="store_true",
                   help="follow the new want until it ends; exit 0 only if Successful")


def _parser_partitions_and_runs(c):
    """partitions, job-runs, jobs and schedules."""
    commands = c.commands
    parts = c.group("partitions", "list and show partitions")
    p = c.command(parts, "list", "list partitions, newest first", _cli_partitions_list)
    c.listing(p, PARTITION_STATUSES, "partitions")
    p.add_argument("--prefix", metavar="P", help="only refs starting with P")
    p.add_argument("--stale", action="store_true",
                   help="only stale partitions, with why (an upstream rebuilt since, or "
                        "their job's code changed)")
    p = c.command(parts, "get", "show one partition", _cli_partitions_get)
    p.add_argument("ref", metavar="REF", help="the partition's ref")

    runs = c.group("job-runs", "list, show and cancel job runs")
    p = c.command(runs, "list", "list job runs, newest first", _cli_job_runs_list)
    c.listing(p, JOB_RUN_STATUSES, "job runs")
    p.add_argument("--job", metavar="LABEL", help="only runs of this job")
    p.add_argument("--want", metavar="WANT_ID", help="only runs for this want")
    p = c.command(runs, "get", "show one job run", _cli_job_runs_get)
    p.add_argument("job_run_id", metavar="ID", help="the job run's id, or a unique prefix of it")
    p = c.command(runs, "cancel", "stop one job run (its partitions are rebuilt if still "
                  "wanted; to stop building, cancel the want)", _cli_job_runs_cancel)
    p.add_argument("job_run_id", metavar="ID", help="the job run's id, or a unique prefix of it")

    c.command(commands, "jobs", "list the configured jobs, with their job runs by status",
              _cli_jobs)
    schedules = c.group("schedules", "show the schedules of databuild.toml")
    c.command(schedules, "list", "list the schedules: when they tick, their last want and "
              "its status, their next tick", _cli_schedules_list)
    sensors = c.group("sensors", "show the sensors of databuild.toml")
    c.command(sensors, "list", "list the sensors: their last evaluation, its error, their "
              "cursor and how many wants they made", _cli_sensors_list)
    alerts = c.group("alerts", "show the alerts raised and their delivery")
    p = c.command(alerts, "list", "list alerts, newest first: kind, summary, delivery "
                  "(owed, delivered, given_up)", _cli_alerts_list)
    c.listing(p, ALERT_STATUSES, "alerts")


def _parser_logs_and_lineage(c):
    """logs, taint, lineage, explain and events."""
    commands = c.commands
    p = c.command(commands, "logs", "print a job run's stdout (or stderr), or follow it live",
                  _cli_logs)
    p.add_argument("job_run_id", metavar="JOB_RUN_ID",
                   help="the job run's id, or a unique prefix of it")
    p.add_argument("--stderr", action="store_true", help="stderr instead of stdout")
    p.add_argument("--follow", "-f", action="store_true",
                   help="print lines as the job writes them, until the run ends")
    p.add_argument("--tail", type=int, metavar="BYTES",
                   help="print only the last BYTES bytes of the log")

    p = c.command(commands, "taint", "mark partitions Tainted (rebuilt when wanted)", _cli_taint)
    c.refs(p, "a partition to taint")
    p.add_argument("--reason", metavar="TEXT", help="why (stored in the event)")
    p.add_argument("--downstream", action="store_true",
                   help="also taint every Live partition built from it, transitively")
    p.add_argument("--dry-run", action="store_true",
                   help="only list what would be tainted")

    p = c.command(commands, "lineage", "show what a partition was built from and what was "
                  "built from it", _cli_lineage)
    p.add_argument("ref", metavar="REF", help="the partition's ref")
    p.add_argument("--depth", type=int, default=3, metavar="N",
                   help="levels each way (default 3)")

    p = c.command(commands, "explain", "say why a partition is in its state: the wants, "
                  "runs, dep misses, failures and taints that led there", _cli_explain)
    p.add_argument("ref", metavar="REF", help="the partition's ref")

    p = c.command(commands, "events", "print events of the build event log (the newest, "
                  "oldest first, unless --since)", _cli_events)
    p.add_argument("--since", type=int, metavar="N",
                   help="the events after event N, oldest first (default: the newest)")
    p.add_argument("--limit", type=int, default=20, metavar="N",
                   help="show at most N events (default 20, at most %d)"
                        % DEFAULTS["list_limit_max"])
    p.add_argument("--type", choices=EVENT_TYPES, metavar="TYPE",
                   help="only events of this type (%s)" % ", ".join(EVENT_TYPES))


def _parser_server(c):
    """status, stop, dashboard and init."""
    commands = c.commands
    p = c.command(commands, "status", "show the workspace's server and what it holds (exit 1 "
                  "if none is running)", _cli_status)
    p.add_argument("--start", action="store_true",
                   help="start the server if none is running, then show it")
    c.command(commands, "stop", "stop the workspace's server gracefully", _cli_stop)
    p = c.command(commands, "dashboard", "print the dashboard's URL (it carries the access "
                  "token, which the page then keeps in a cookie)", _cli_dashboard)
    p.add_argument("--open", action="store_true", help="also open it in a web browser")
    p = c.command(commands, "init", "write a starter workspace (databuild.toml, a job script, "
                  "a .gitignore) and print the command that builds its example",
                  _cli_init, parents=())
    p.add_argument("dir", nargs="?", default=".", metavar="DIR",
                   help="the folder to make a workspace of (default: this one); an "
                        "existing databuild.toml is never overwritten")


def _opt(args, name, default=None):
    return getattr(args, name, default)


def _workspace(args):
    workspace = _opt(args, "workspace")
    if workspace:
        if not os.path.isdir(workspace):
            raise ConfigError("--workspace %s: no such folder" % os.path.abspath(workspace))
        if not os.path.isfile(os.path.join(workspace, CONFIG_FILE)):
            raise ConfigError("%s holds no %s" % (os.path.abspath(workspace), CONFIG_FILE))
        return os.path.abspath(workspace)
    found = find_workspace()
    if found is None:
        raise ConfigError("No %s in this folder or above: use --workspace DIR or --server URL"
                          % CONFIG_FILE)
    return found


def _connect(args):
    """A Client for the server: --server, $DATABUILD_URL, or the workspace's own.

    The token (README "Security"): --token, else $DATABUILD_TOKEN, else the one in the
    workspace's server.json.
    """
    token = _opt(args, "token") or os.environ.get("DATABUILD_TOKEN") or None
    url = _opt(args, "server") or os.environ.get("DATABUILD_URL")
    if url:
        if token is None:
            # The workspace's token, but only for the workspace's own server:
            # never send it to another one.
            workspace = _opt(args, "workspace") or find_workspace()
            info = read_server_info(os.path.join(workspace, STATE_DIR)) if workspace else None
            if info and info.get("url", "").rstrip("/") == url.rstrip("/"):
                token = info.get("token")
        return Client(url, token=token)
    client = Client.for_workspace(
        _workspace(args), start=not _opt(args, "no_start"),
        on_start=lambda ws: print("Starting databuild server for %s ..." % ws, file=sys.stderr))
    client.token = token or client.token
    return client


def _out(args, obj, text):
    if _opt(args, "json"):
        print(json.dumps(obj, indent=2, ensure_ascii=False))
    else:
        print(text)


def format_table(rows, columns):
    """Aligned plain-text table: ``columns`` are (header, key-or-function)."""
    cells = [[h for h, _ in columns]]
    for row in rows:
        cells.append([str(f(row) if callable(f) else ("-" if row.get(f) is None else row[f]))
                      for _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def format_object(obj, keys=None):
    """Readable ``key: value`` lines for one object."""
    keys = keys or list(obj)
    width = max(len(k) for k in keys)
    lines = []
    for key in keys:
        value = obj.get(key)
        if isinstance(value, dict):
            value = ", ".join("%s=%s" % kv for kv in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "-"
        elif value is None:
            value = "-"
        elif key == "data_timestamp":
            value = "%s (%s)" % (value, _date(value))
        lines.append("%s  %s" % ((key + ":").ljust(width + 1), value))
    return "\n".join(lines)


def _listing(args, envelope, columns, noun):
    rows = envelope["data"]
    text = format_table(rows, columns) if rows else "No %s." % noun
    if envelope["total"] > len(rows):
        text += "\n(%d of %d shown; use --limit or --json)" % (len(rows), envelope["total"])
    _out(args, envelope, text)
    return 0


def _source_text(source):
    """Who made a want, in a few words: ``manual``, ``schedule daily_agg``,
    ``deps out/date=2025-01-01``, ``retry 1a2b3c4d``."""
    detail = source.get("name") or source.get("ref") or _short(source.get("want_id"))
    return "%s %s" % (source.get("type"), detail) if detail else source.get("type")


def _date(ts):
    """Epoch seconds as ``2025-01-01 00:00Z`` (a data time, for people)."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%MZ", time.gmtime(ts))


_WANT_COLUMNS = [("WANT_ID", "want_id"), ("STATUS", "status"),
                 ("LIVE", lambda w: "%d/%d" % (w["counts"].get(LIVE, 0), w["counts"]["total"])),
                 ("PARTITIONS", lambda w: _few(w["partitions"], 1)),
                 ("SOURCE", lambda w: _source_text(w["source"])),
                 ("DATA_TIME", lambda w: _date(w["data_timestamp"])), ("CREATED", "created_at")]
_PARTITION_COLUMNS = [("REF", "ref"),
                      ("STATUS", lambda p: p["status"] + (" (stale)" if p.get("stale") else "")),
                      ("JOB", "job_label"), ("UPDATED", "updated_at")]
_JOB_RUN_COLUMNS = [("JOB_RUN_ID", "job_run_id"), ("STATUS", "status"), ("JOB", "job_label"),
                    ("ATTEMPT", "attempt"), ("PARTITIONS", lambda r: _few(r["partitions"], 1)),
                    ("START", lambda r: r["started_at"][:19].replace("T", " ") + "Z"
                     if r["started_at"] else "-"),
                    ("DURATION", lambda r: "-" if r["duration_ms"] is None
                     else "%.1fs" % (r["duration_ms"] / 1000.0))]


def _cli_serve(args):
    config = load_config(_workspace(args))
    # A server lives in its workspace (jobs run there; see LocalExecutor).
    os.chdir(config.root)
    # Loading the working set allocates many objects that live as long as the
    # server: no cyclic GC while loading, and none of it scanned again later.
    gc.disable()
    try:
        server = Server(config, host=args.host, port=args.port, idle_timeout=args.idle_timeout)
    finally:
        gc.enable()
    gc.freeze()
    server.orchestrator.adopt_orphans = become_subreaper()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: server.request_stop(
            "signal %s" % signal.Signals(signum).name))
    url = server.bind()
    logger.info("Workspace %s, event log at event %d", config.root,
                server.orchestrator.state.latest_event_id)
    if not config.jobs:
        logger.warning("%s has no [[jobs]]: every want is refused until you add one "
                       "(the server reloads the file when it changes)", config.path)
    print("Listening on %s" % url, flush=True)
    server.serve()
    return 0


def _cli_build(args):
    if _opt(args, "stale") == bool(args.refs):
        raise UsageError("give partitions to build, or --stale (not both)")
    if _opt(args, "prefix") and not _opt(args, "stale"):
        raise UsageError("--prefix goes with --stale")
    client = _connect(args)
    fields = {"comment": args.comment, "user": _user(), "priority": _opt(args, "priority"),
              "ttl_seconds": _opt(args, "ttl"), "sla_seconds": _opt(args, "sla")}
    if _opt(args, "stale"):
        return _build_stale(args, client, fields)
    if _opt(args, "dry_run"):
        plan = client.plan_want(args.refs, **fields)
        _out(args, plan, format_plan(plan))
        return 0
    return _follow_new_want(args, client, lambda: client.create_want(args.refs, **fields))


def _build_stale(args, client, fields):
    # build --stale (README "Freshness"): every stale partition (under a
    # prefix), in wants of at most max_partitions_per_want refs.
    refs, offset = [], 0
    while True:
        page = client.list_partitions(stale=True, prefix=args.prefix,
                                      limit=DEFAULTS["list_limit_max"], offset=offset)
        refs += [p["ref"] for p in page["data"]]
        offset += len(page["data"])
        if not page["data"] or offset >= page["total"]:
            break
    if not refs:
        _out(args, {"partitions": [], "wants": []}, "No stale partitions%s: nothing to build."
             % (" under %r" % args.prefix if args.prefix else ""))
        return 0
    refs = sorted(set(refs))
    size = DEFAULTS["max_partitions_per_want"]
    fields["comment"] = fields["comment"] or "stale partitions%s" % (
        " under " + args.prefix if args.prefix else "")
    code = 0
    for i in range(0, len(refs), size):
        chunk = refs[i:i + size]
        if _opt(args, "dry_run"):
            plan = client.plan_want(chunk, **fields)
            _out(args, plan, format_plan(plan))
            continue
        code = max(code, _follow_new_want(args, client,
                                          lambda: client.create_want(chunk, **fields)))
    return code


def format_plan(plan):
    """A want's plan (README "Backfills") as a table with its totals."""
    columns = [("REF", "ref"), ("JOB", "job_label"), ("ACTION", "action"),
               ("DEPS", lambda e: _few(e["deps"], 2) if e["deps"] else "-")]
    actions = collections.Counter(e["action"] for e in plan["plan"])
    lines = [format_table(plan["plan"], columns), "",
             "%d partitions wanted, %d in the plan: %s." % (
                 len(plan["partitions"]), len(plan["plan"]),
                 ", ".join("%d %s" % (actions[a], a) for a in ("build", "waiting", "building",
                                                               "live") if actions[a])),
             "%d job runs would start%s" % (plan["runs"], ": " + ", ".join(
                 "%s %d" % kv for kv in sorted(plan["jobs"].items())) if plan["jobs"] else ".")]
    return "\n".join(lines)


def _follow_new_want(args, client, create):
    # Create a want (``create()``); with --wait, follow it to its end.
    cursor = client.health()["latest_event_id"] if args.wait else 0
    want = create()
    if not args.wait:
        _out(args, want, "Want %s: %s (%d partitions)" % (
            want["want_id"], want["status"], len(want["partitions"])))
        return 0
    try:
        print("Want %s: %d partitions" % (want["want_id"], len(want["partitions"])),
              file=sys.stderr)
        want = _follow_want(client, want, cursor, sys.stderr)
    except KeyboardInterrupt:
        print("\nStopped following. Want %s goes on building; cancel it with: "
              "%s want cancel %s" % (want["want_id"], _prog(), want["want_id"]),
              file=sys.stderr)
        return 130
    if _opt(args, "json"):
        _out(args, want, "")
    else:
        print(_want_outcome(client, want))
    return 0 if want["status"] == SUCCESSFUL else 1


def _prog():
    return os.path.basename(sys.argv[0] or "databuild.py")


def _cli_want_retry(args):
    client = _connect(args)
    return _follow_new_want(args, client, lambda: client.retry_want(args.want_id))


def _cli_job_runs_cancel(args):
    run = _connect(args).cancel_job_run(args.job_run_id)
    _out(args, run, "Job run %s: %s" % (run["job_run_id"], run["status"]))
    return 0


def _cli_schedules_list(args):
    envelope = _connect(args).list_schedules()
    columns = [("SCHEDULE", "name"),
               ("WHEN", lambda s: s["cron"] or "every %ds" % s["interval_seconds"]),
               ("TZ", "timezone"), ("NEXT", "next_tick_at"), ("LAST", "last_tick_at"),
               ("LAST_WANT", lambda s: s["last_want_id"] or "-"),
               ("STATUS", "last_want_status")]
    text = (format_table(envelope["data"], columns) if envelope["data"]
            else "No schedules: add [[schedules]] to %s" % CONFIG_FILE)
    _out(args, envelope, text)
    return 0


def _cli_sensors_list(args):
    envelope = _connect(args).list_sensors()
    columns = [("SENSOR", "name"), ("EVERY", lambda s: "%gs" % s["interval_seconds"]),
               ("LAST", lambda s: s["last_evaluated_at"] or "-"),
               ("STATUS", lambda s: s["last_status"] or "-"), ("WANTS", "wants_created"),
               ("CURSOR", lambda s: _shown(s["cursor"], 30) if s["cursor"] else "-"),
               ("ERROR", lambda s: _shown(s["last_error"], 60) if s["last_error"] else "-")]
    text = (format_table(envelope["data"], columns) if envelope["data"]
            else "No sensors: add [[sensors]] to %s" % CONFIG_FILE)
    _out(args, envelope, text)
    return 0


def _cli_alerts_list(args):
    envelope = _connect(args).list_alerts(status=args.status, limit=args.limit)
    columns = [("ALERT_ID", "alert_id"), ("ALERT", "alert"), ("KIND", "kind"),
               ("STATUS", "status"), ("TRIES", "attempts"),
               ("RAISED", lambda a: a["timestamp"][:19].replace("T", " ") + "Z"),
               ("SUMMARY", lambda a: _shown(a["summary"], 70)),
               ("ERROR", lambda a: _shown(a["last_error"], 50) if a["last_error"] else "-")]
    return _listing(args, envelope, columns, "alerts")


def _cli_jobs(args):
    envelope = _connect(args).list_jobs()
    columns = [("JOB", "label"), ("EXECUTOR", "executor"),
               ("PATTERNS", lambda j: " ".join(j["partition_patterns"])),
               ("BATCH", "max_partitions_per_run"), ("RETRIES", "max_retries"),
               ("TIMEOUT", lambda j: "%gs" % j["timeout_seconds"] if j["timeout_seconds"]
                else "-"),
               ("JOB_RUNS", lambda j: ", ".join("%d %s" % (n, s) for s, n in sorted(
                   j["job_runs"].items())) or "none")]
    if envelope["data"]:
        text = format_table(envelope["data"], columns)
    else:
        text = "No jobs: add [[jobs]] to %s" % CONFIG_FILE
    _out(args, envelope, text)
    return 0


def _user():
    try:
        return getpass.getuser()
    except Exception:
        return None


def _progress_line(want, runs):
    counts = want["counts"]
    rest = ", ".join("%d %s" % (n, s) for s, n in sorted(counts.items())
                     if s not in ("total", LIVE) and n)
    return "%s: %d/%d live%s; job runs: %d started, %d succeeded, %d missing deps, " \
        "%d failed" % (want["status"], counts.get(LIVE, 0), counts["total"],
                       ", " + rest if rest else "", runs[JOB_RUN_START], runs[JOB_RUN_SUCCESS],
                       runs[JOB_RUN_MISSING_DEPS], runs[JOB_RUN_FAILURE])


def _follow_want(client, want, cursor, out, clock=time.monotonic):
    """Poll a want until it is terminal, showing one progress line on ``out``.

    On a terminal the line is rewritten in place; elsewhere (a log, a CI
    job) a line is printed when the want's status changes, when another
    tenth of its partitions has settled, or every 30 seconds: a long
    backfill's output stays short.  Job runs are counted from the event
    feed, from ``cursor`` (the latest event id before the want was made).
    """
    started = last_print = clock()
    tty = out.isatty()
    runs = collections.Counter()
    shown, shown_status, shown_tenth = None, None, -1
    delay = 0.05
    while True:
        while True:
            events = client.events(since=cursor, limit=1000)["data"]
            for event in events:
                runs[event["type"]] += 1
            if not events:
                break
            cursor = events[-1]["event_id"]
        line = "[%6.1fs] %s" % (clock() - started, _progress_line(want, runs))
        counts = want["counts"]
        settled = sum(counts.get(s, 0) for s in SETTLED)
        tenth = settled * 10 // max(1, counts["total"])
        terminal = want["status"] in TERMINAL_WANT_STATUSES
        if tty:
            if line[9:] != shown:
                out.write("\r\x1b[K" + line)
                out.flush()
                shown = line[9:]
        elif (want["status"] != shown_status or tenth != shown_tenth or terminal
              or clock() - last_print >= 30):
            print(line, file=out, flush=True)
            shown_status, shown_tenth, last_print = want["status"], tenth, clock()
        if terminal:
            if tty:
                out.write("\n")
            return want
        time.sleep(delay)
        delay = min(0.5, delay * 1.5)
        want = client.get_want(want["want_id"])


def _want_outcome(client, want, most=10):
    """How a want ended, for people: its counts, then its partitions that are
    not Live with why (at most ``most``, then "and N more")."""
    counts = want["counts"]
    lines = ["Want %s: %s, %d/%d live" % (want["want_id"], want["status"],
                                          counts.get(LIVE, 0), counts["total"])]
    bad = [(ref, s) for ref, s in want["partition_statuses"].items() if s != LIVE]
    bad.sort(key=lambda rs: (rs[1] != FAILED, rs[1] != UPSTREAM_FAILED))
    for ref, status in bad[:most]:
        lines.append("  %s  %s  %s" % (ref, status, _why_not_live(client, ref, status)))
    if len(bad) > most:
        lines.append("  and %d more (%s want get %s)" % (len(bad) - most, _prog(),
                                                         want["want_id"]))
    if bad and want["status"] in TERMINAL_WANT_STATUSES:
        lines.append("Retry what is not Live with: %s want retry %s" % (_prog(),
                                                                       want["want_id"]))
    return "\n".join(lines)


def _why_not_live(client, ref, status):
    # One short reason: a failed run's error, the upstream that failed.
    try:
        part = client.get_partition(ref)
    except NotFound:
        return "never built"
    if status == FAILED and part["last_job_run_id"]:
        error = client.get_job_run(part["last_job_run_id"])["error"] or "failed"
        return _shown(error.splitlines()[0] if error.strip() else error, 160)
    if status == UPSTREAM_FAILED:
        return "upstream failed: " + _few(part["missing_deps"] or part["upstream"], 2)
    return "-"


def _cli_want_list(args):
    envelope = _connect(args).list_wants(status=args.status, limit=args.limit)
    return _listing(args, envelope, _WANT_COLUMNS, "wants")


def _cli_want_get(args):
    want = _connect(args).get_want(args.want_id)
    _out(args, want, format_object(want))
    return 0


def _cli_want_cancel(args):
    want = _connect(args).cancel_want(args.want_id)
    _out(args, want, "Want %s: %s" % (want["want_id"], want["status"]))
    return 0


def _cli_partitions_list(args):
    envelope = _connect(args).list_partitions(status=args.status, prefix=args.prefix,
                                              limit=args.limit, stale=args.stale)
    if args.stale:
        columns = [("REF", "ref"), ("JOB", "job_label"), ("BUILT", "built_at"),
                   ("WHY", lambda p: "; ".join(p["stale_reasons"]))]
        if not envelope["data"] and not _opt(args, "json"):
            print("No stale partitions%s." % (" under %r" % args.prefix if args.prefix else ""))
            return 0
        return _listing(args, envelope, columns, "stale partitions")
    return _listing(args, envelope, _PARTITION_COLUMNS, "partitions")


def _cli_partitions_get(args):
    part = _connect(args).get_partition(args.ref)
    _out(args, part, format_object(part))
    return 0


def _cli_job_runs_list(args):
    envelope = _connect(args).list_job_runs(status=args.status, job_label=args.job,
                                            want_id=args.want, limit=args.limit)
    return _listing(args, envelope, _JOB_RUN_COLUMNS, "job runs")


def _cli_job_runs_get(args):
    run = _connect(args).get_job_run(args.job_run_id)
    _out(args, run, format_object(run))
    return 0


def _cli_logs(args):
    stream = "stderr" if args.stderr else "stdout"
    if args.follow:
        for event, data in _connect(args).follow_logs(args.job_run_id, stream):
            if event == "log":
                print(json.dumps({"line": data}) if _opt(args, "json") else data, flush=True)
            elif event == "complete":
                if _opt(args, "json"):
                    print(json.dumps({"complete": data}), flush=True)
                else:
                    print("[job run %s: %s, exit code %s]" % (args.job_run_id, data["status"],
                                                              data["exit_code"]),
                          file=sys.stderr)
        return 0
    text = _connect(args).logs(args.job_run_id, stream, tail=args.tail)
    if _opt(args, "json"):
        _out(args, {"job_run_id": args.job_run_id, "text": text}, "")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


def _cli_taint(args):
    client = _connect(args)
    if not (args.downstream or args.dry_run):
        parts = [client.taint(ref, args.reason) for ref in args.refs]
        _out(args, parts, "\n".join("%s: %s" % (p["ref"], p["status"]) for p in parts))
        return 0
    answers = [client.request("POST", "/api/partition/taint", {
        "reason": args.reason, "downstream": args.downstream, "dry_run": args.dry_run},
        params={"ref": ref}) for ref in args.refs]
    lines = []
    for ref, answer in zip(args.refs, answers):
        verb = "would taint" if args.dry_run else "tainted"
        lines.append("%s: %s %d partition%s" % (ref, verb, len(answer["tainted"]),
                                               "" if len(answer["tainted"]) == 1 else "s"))
        lines.extend("  " + r for r in answer["tainted"])
    _out(args, answers, "\n".join(lines))
    return 0


def _cli_lineage(args):
    tree = _connect(args).lineage(args.ref, depth=args.depth)
    lines = ["%s  %s" % (tree["ref"], tree["status"])]

    def walk(items, arrow, indent):
        for item in items:
            lines.append("%s%s %s  %s%s" % ("  " * indent, arrow, item["ref"],
                                             item["status"] or "not built",
                                             "  ..." if item.get("truncated") else ""))
            walk(item.get("upstream", item.get("downstream", [])), arrow, indent + 1)
    if tree["upstream"]:
        lines.append("built from:")
        walk(tree["upstream"], "<-", 1)
    if tree["downstream"]:
        lines.append("built into:")
        walk(tree["downstream"], "->", 1)
    if not tree["upstream"] and not tree["downstream"]:
        lines.append("(no lineage recorded: jobs record it with %s, and by reporting "
                     "missing deps)" % READ_DEPS_MARKER)
    _out(args, tree, "\n".join(lines))
    return 0


def _cli_explain(args):
    story = _connect(args).explain(args.ref)
    lines = ["%s: %s" % (story["ref"], story["summary"])]
    for step in story["steps"]:
        lines.append("  #%-6d %s  %s" % (step["event_id"], step["timestamp"][:19] + "Z",
                                          step["text"]))
        for line in step.get("stderr_tail", [])[-4:-1]:  # the last one is in the error
            lines.append("           | %s" % line)
    for upstream in story["upstream_failures"]:
        lines.append("upstream %s: %s" % (upstream["ref"], upstream["summary"]))
        failures = [s for s in upstream["steps"] if s["type"] == JOB_RUN_FAILURE]
        for step in failures[-1:]:
            lines.append("  #%-6d %s  %s" % (step["event_id"], step["timestamp"][:19] + "Z",
                                              step["text"]))
    _out(args, story, "\n".join(lines))
    return 0


def _cli_events(args):
    client = _connect(args)
    limit = max(0, min(args.limit, DEFAULTS["list_limit_max"]))
    since = args.since
    if args.type and since is None:  # the newest of that type, shown oldest first
        envelope = client.events(type=args.type, before=MAX_INT, limit=limit)
        envelope["data"].reverse()
        _out(args, envelope, format_table(envelope["data"], _EVENT_COLUMNS)
             if envelope["data"] else "No %s events." % args.type)
        return 0
    if since is None:  # the newest events, still shown oldest first (newest last)
        since = max(0, client.health()["latest_event_id"] - limit)
    envelope = client.events(since=since, limit=limit, type=args.type)
    events = envelope["data"]
    text = format_table(events, _EVENT_COLUMNS) if events else "No events."
    if envelope["total"] is not None and (envelope["total"] > len(events) or since):
        first = events[0]["event_id"] if events else since + 1
        text += "\n(%d of %d events shown: %d to %d; use --since N and --limit N, or --json)" % (
            len(events), envelope["latest_event_id"], first,
            events[-1]["event_id"] if events else since)
    _out(args, envelope, text)
    return 0


_EVENT_COLUMNS = [("EVENT_ID", "event_id"), ("TIME", lambda e: e["timestamp"][:19] + "Z"),
                  ("TYPE", "type"), ("WHAT", lambda e: _summarise_payload(e["payload"]))]


def _summarise_payload(payload, width=60):
    """An event's payload as one readable line: ``key=value`` pairs, long lists
    as their first item and a count, long text shortened -- never JSON cut in
    the middle."""
    parts = []
    for key, value in payload.items():
        if value is None or value == [] or value == {} or key in ("counted", "pid_start_time"):
            continue
        if isinstance(value, list):
            shown = _few(value, 1)
        elif (key.endswith(("_at", "timestamp")) and isinstance(value, (int, float))
              and not isinstance(value, bool)):
            shown = _date(value).replace(" ", "T")  # a time, not an epoch
        elif isinstance(value, dict):
            shown = ",".join("%s:%s" % kv for kv in value.items())
        else:
            shown = str(_short(value))
        if len(shown) > width:
            shown = shown[:width - 3] + "..."
        parts.append("%s=%s" % (key, shown))
    return " ".join(parts)


def _cli_status(args):
    if not args.start:
        args.no_start = True  # report on the server; do not start one to do it
    try:
        client = _connect(args)
        health = client.health()
    except ServerUnreachable as e:
        where = _opt(args, "server") or os.environ.get("DATABUILD_URL") or _workspace(args)
        _out(args, {"running": False, "error": e.message},
             "No server is running for %s (start one with `status --start` or any command)"
             % where)
        return 1
    counts = {}
    for noun, method, statuses in (("wants", client.list_wants, WANT_STATUSES),
                                   ("job runs", client.list_job_runs, JOB_RUN_STATUSES)):
        counts[noun] = {s: method(status=s, limit=0)["total"] for s in statuses}
    info = {"url": client.url, **health, "counts": counts}
    keys = ["url", "pid", "status", "version", "uptime_seconds", "latest_event_id"]
    if info.get("config_error"):
        keys.append("config_error")  # an edit of databuild.toml that does not load
    lines = [format_object(info, keys)]
    if "kept_up_by" in health:  # why it will not stop for idleness (README "Lifecycle")
        lines.append("%s  %s" % ("kept up by:".ljust(16),
                                 "; ".join(health["kept_up_by"]) or "nothing (stops when idle)"))
    for noun, by_status in counts.items():
        shown = ", ".join("%d %s" % (n, s) for s, n in by_status.items() if n) or "none"
        lines.append("%s  %s" % ((noun + ":").ljust(16), shown))
    _out(args, info, "\n".join(lines))
    return 0


_STARTER_TOML = """\
# A databuild workspace (see README.rst, "The workspace and databuild.toml").
# Build the example:   %(build)s

[server]
idle_timeout_seconds = 1800        # stop after 30 idle minutes (0 = never)
max_concurrent_job_runs = 4

[[jobs]]
label = "greetings"
entrypoint = ["python3", "jobs/greetings.py"]
partition_patterns = ['greetings/date=(?P<date>\\d{4}-\\d{2}-\\d{2})']
executor = "python"                # a warm interpreter: each run is a fork
# max_partitions_per_run = 7       # give a run up to 7 refs at once
# max_retries = 2                  # retry a failed run twice
# deps = ["raw/date={date}"]       # declared deps, built before this job runs

# A job run by the local executor: any program, a process per run.
# [[jobs]]
# label = "export"
# entrypoint = ["sh", "jobs/export.sh"]
# partition_patterns = ['export/date=(?P<date>\\d{4}-\\d{2}-\\d{2})']
# deps = ["greetings/date={date}"]

# A job run on a Slurm cluster (the workspace on a filesystem the nodes share).
# [[jobs]]
# label = "train"
# executor = "slurm"
# entrypoint = ["python3", "jobs/train.py"]
# partition_patterns = ['models/week=\\d{4}-\\d{2}-\\d{2}']
# sbatch_options = ["--mem=4G", "--time=01:00:00"]
"""

_STARTER_JOB = '''\
"""The starter job: ``python3 jobs/greetings.py greetings/date=2025-01-01 ...``.

A job gets the refs to build as arguments, runs in the workspace, and exits
0 once they are built (README.rst, "Job protocol").
"""
import os
import sys

for ref in sys.argv[1:]:
    date = ref.split("=", 1)[1]
    folder = os.path.join("data", ref)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "greeting.txt"), "w") as f:
        f.write("Hello from %s\\n" % date)
    print("wrote", os.path.join(folder, "greeting.txt"))
'''


def _cli_init(args):
    root = os.path.abspath(args.dir)
    path = os.path.join(root, CONFIG_FILE)
    if os.path.exists(path):
        raise Conflict("%s already exists: init writes a new workspace only" % path, path=path)
    me = sys.argv[0] if sys.argv[0].endswith(".py") else None
    build = " ".join(shlex.quote(part) for part in (
        ([sys.executable, os.path.abspath(me)] if me else [os.path.basename(sys.argv[0])])
        + ["--workspace", root, "build", "greetings/date=[2025-01-01..2025-01-07]", "--wait"]))
    try:
        os.makedirs(os.path.join(root, "jobs"), exist_ok=True)
        files = [("jobs/greetings.py", _STARTER_JOB), (".gitignore", STATE_DIR + "/\ndata/\n"),
                 (CONFIG_FILE, _STARTER_TOML % {"build": build})]
        for name, text in files:
            target = os.path.join(root, name)
            if name == CONFIG_FILE or not os.path.exists(target):  # (config: checked above)
                with open(target, "x" if name == CONFIG_FILE else "w") as f:
                    f.write(text)
    except OSError as e:
        raise DatabuildError("Cannot write the workspace in %s: %s" % (root, e.strerror or e),
                             path=root) from None
    print("Wrote a workspace in %s: %s, jobs/greetings.py, .gitignore.\n"
          "Build its example (seven days, in a server started for it):\n\n    %s"
          % (root, CONFIG_FILE, build))
    return 0


def _cli_dashboard(args):
    client = _connect(args)
    url = client.url + "/"
    if client.token:
        url += "?token=" + urllib.parse.quote(client.token, safe="")
    _out(args, {"url": url}, url)
    if args.open:
        import webbrowser
        webbrowser.open(url)
    return 0


def _cli_stop(args):
    args.no_start = True
    try:
        client = _connect(args)
    except ServerUnreachable:
        _out(args, {"stopped": False}, "No server is running.")
        return 0
    pid = None
    if not _opt(args, "server") and not os.environ.get("DATABUILD_URL"):
        pid = (read_server_info(os.path.join(_workspace(args), STATE_DIR)) or {}).get("pid")
    client.shutdown()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if pid is not None and not _pid_alive(pid):
            break
        if pid is None and not _server_alive(client.url):
            break
        time.sleep(0.05)
    else:
        raise Unavailable("The server at %s did not stop within 60 seconds" % client.url)
    _out(args, {"stopped": True, "url": client.url}, "Server at %s stopped." % client.url)
    return 0


def describe_error(error):
    """An error as one line that names what it is about: the message, then
    those of its fields (``ref``, ``want_id``, ...) the message does not
    already show, e.g. ``Partition not found (ref: raw/x)``."""
    extra = []
    for key, value in error.fields.items():
        if key in ("status",) or value is None:
            continue
        text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        if not isinstance(value, dict) and text and text not in error.message:
            extra.append("%s: %s" % (key, text))
    return error.message + (" (%s)" % "; ".join(extra) if extra else "")


def main(argv=None):
    """Command-line entry point; returns the exit status (README "CLI")."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.func is _cli_serve:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, UsageError) as e:
        print("databuild: error: %s" % describe_error(e), file=sys.stderr)
        return 2
    except DatabuildError as e:
        print("databuild: error: %s" % describe_error(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("databuild: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # a bug: one line for the user, the traceback on request
        if os.environ.get("DATABUILD_DEBUG"):
            traceback.print_exc()
        print("databuild: internal error: %s: %s (set DATABUILD_DEBUG=1 for the traceback)"
              % (type(e).__name__, e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
