"""Crash loop: ``kill -9`` of the server at random moments under writing
threads, restart, again; then every acknowledged want is looked up.

Prints the kills, the acknowledged wants, how many of them were lost (the
figure that must be 0), whether the event ids are gapless, and whether every
want finished.  Not a speed figure: a durability soak with a fixed seed.

    python tests/benchmarks/bench_crash.py [--tiny] [--kills N] [--writers N]
"""
import os
import random
import sqlite3
import tempfile
import threading
import time

import _workload as w
import databuild

TOML = """
[server]
idle_timeout_seconds = 0

[[jobs]]
label = "p"
entrypoint = ["sh", "-c", "exit 0"]
partition_patterns = ['p/\\d+']
"""


def crash_loop(workspace, kills, writers, seed=5, pause=(0.2, 1.5)):
    """``kills`` rounds of: serve, ``writers`` threads creating wants, ``kill -9``
    after a random pause.  Then one more server: how many acknowledged wants
    it lost, whether the event ids are gapless, how many wants never end."""
    rng = random.Random(seed)
    acknowledged, refused = [], [0]  # list.append is atomic: the writers share it
    rows = []
    for round_ in range(kills):
        server = w.Serve(workspace)
        stop = threading.Event()

        def writer(k):
            client = databuild.Client(server.url, timeout=5, token=server.token)
            i = 0
            while not stop.is_set():
                want_id = "r%d-t%d-w%d" % (round_, k, i)
                try:
                    client.create_want(["p/%d" % (i % 50)], want_id=want_id)
                except databuild.ServerUnreachable:
                    return  # the server died under us: this one was not acknowledged
                except databuild.DatabuildError:
                    refused[0] += 1  # an honest error (503): not acknowledged
                    continue
                acknowledged.append(want_id)
                i += 1
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(*pause))
        server.proc.kill()
        server.proc.wait()
        stop.set()
        for t in threads:
            t.join(10)
        server.stop()
        rows.append({"kill": round_ + 1, "acknowledged_so_far": len(acknowledged)})
    final = w.Serve(workspace)
    try:
        client = final.client
        lost = sum(1 for want_id in acknowledged if not _exists(client, want_id))
        conn = sqlite3.connect(os.path.join(workspace, ".databuild", "events.db"))
        ids = [r[0] for r in conn.execute("SELECT event_id FROM events ORDER BY event_id")]
        conn.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and w.live_wants(client):
            time.sleep(0.2)
        unfinished = w.live_wants(client)
    finally:
        final.stop()
    return rows, {"kills": kills, "writers": writers, "acknowledged": len(acknowledged),
                  "lost": lost, "refused_503": refused[0], "events": len(ids),
                  "gapless": ids == list(range(1, len(ids) + 1)),
                  "unfinished_wants": unfinished}


def main():
    args = w.parse_args(__doc__, ("--kills", {"type": int, "default": 22}),
                        ("--writers", {"type": int, "default": 8}))
    ws = w.make_workspace(tempfile.mkdtemp(prefix="bench-crash-") + "/ws", TOML)
    rows, figures = crash_loop(ws, 3 if args.tiny else args.kills, args.writers)
    w.report("crash", rows, {**figures, "target": "lost == 0", "machine": w.machine()})


def _exists(client, want_id):
    try:
        client.get_want(want_id)
        return True
    except databuild.NotFound:
        return False


if __name__ == "__main__":
    main()
