"""The landing sensor: wants each file of ``landing/`` built, once per content.

Its cursor (README "Sensors") is a JSON object of file name -> content hash
of what it has seen.  A new ``D.csv`` -> a want for ``summary/date=D`` (key
``D``); a changed one -> a taint of ``raw/date=D`` through the server's API
(``DATABUILD_URL``, ``DATABUILD_TOKEN``) and a want for it again (key
``D:<hash>``): what was built from the old file is stale and rebuilt by itself.
"""
import hashlib
import json
import os
import urllib.parse
import urllib.request

seen = json.loads(os.environ.get("DATABUILD_SENSOR_CURSOR") or "{}")


def taint(ref, reason):
    url = "%s/api/partition/taint?ref=%s" % (os.environ["DATABUILD_URL"], urllib.parse.quote(ref))
    request = urllib.request.Request(url, data=json.dumps({"reason": reason}).encode(),
                                     method="POST", headers={
                                         "Content-Type": "application/json",
                                         "Authorization": "Bearer " + os.environ["DATABUILD_TOKEN"]})
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as e:
        if e.code != 404:  # never built: nothing to taint
            raise


def want(refs, key):
    print("DATABUILD_WANT_JSON: " + json.dumps({"partitions": refs, "key": key}))


names = sorted(n for n in os.listdir("landing") if n.endswith(".csv")) \
    if os.path.isdir("landing") else []
for name in names:
    with open(os.path.join("landing", name), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    date = name[:-len(".csv")]
    if name not in seen:
        want(["summary/date=" + date], date)
    elif seen[name] != digest:
        taint("raw/date=" + date, "landing/%s changed" % name)
        want(["raw/date=" + date], "%s:%s" % (date, digest))
    seen[name] = digest
print("DATABUILD_SENSOR_CURSOR: " + json.dumps(seen, sort_keys=True))
