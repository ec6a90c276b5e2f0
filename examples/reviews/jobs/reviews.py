"""The jobs of the reviews example, one per stage: ``raw``, ``daily``, ``weekly``.

Invoked by databuild as ``python3 jobs/reviews.py STAGE REF...`` from the
workspace root.  Each stage writes its partition under ``data/<ref>/`` and a
``_SUCCESS`` marker last.  ``daily``'s input is declared in databuild.toml
(``deps``), so databuild builds it first; ``weekly`` finds out what it misses
at run time: it prints the databuild missing-deps line and exits, databuild
builds them and runs it again.  A
stage that built its partition prints the refs it read (the read-deps line),
so databuild records the lineage: ``explain``, ``lineage`` and
``taint --downstream`` then know that the report was built from the dailies,
and each daily from its raw day.
"""
import csv
import datetime
import json
import os
import random
import sys

DATA = "data"
PRODUCTS = ["kettle", "toaster", "blender", "mixer", "grinder"]


def path(ref, name):
    return os.path.join(DATA, ref, name)


def done(ref):
    return os.path.exists(path(ref, "_SUCCESS"))


def publish(ref, name, write):
    """Write one output file atomically, then the _SUCCESS marker."""
    os.makedirs(os.path.join(DATA, ref), exist_ok=True)
    tmp = path(ref, name + ".tmp")
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path(ref, name))
    open(path(ref, "_SUCCESS"), "w").close()


def missing(refs):
    """Report upstream refs that are not built yet; True if there were any."""
    absent = [r for r in refs if not done(r)]
    if absent:
        print("DATABUILD_MISSING_DEPS_JSON: " + json.dumps({"missing_deps": absent}), flush=True)
    return bool(absent)


def read(refs):
    """Tell databuild which partitions this run read (its lineage)."""
    print("DATABUILD_READ_DEPS_JSON: " + json.dumps({"read_deps": refs}), flush=True)


def date_of(ref):
    return datetime.date.fromisoformat(ref.rsplit("=", 1)[1])


def raw(refs):
    for ref in refs:
        day = date_of(ref)
        rng = random.Random(day.toordinal())  # deterministic: rebuilds give the same data
        def write(f):
            out = csv.writer(f)
            out.writerow(["review_id", "product", "rating"])
            for i in range(rng.randint(20, 60)):
                out.writerow(["%s-%03d" % (day, i), rng.choice(PRODUCTS), rng.randint(1, 5)])
        publish(ref, "reviews.csv", write)
        print("wrote", path(ref, "reviews.csv"))


def daily(refs):
    for ref in refs:
        day = date_of(ref)
        upstream = "raw/reviews/date=%s" % day
        if missing([upstream]):
            return
        with open(path(upstream, "reviews.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        ratings = [int(r["rating"]) for r in rows]
        summary = {"date": str(day), "reviews": len(rows),
                   "average_rating": round(sum(ratings) / len(ratings), 3)}
        publish(ref, "summary.json", lambda f: json.dump(summary, f, indent=2))
        print("wrote", path(ref, "summary.json"), summary)
        read([upstream])


def weekly(refs):
    for ref in refs:
        monday = date_of(ref)
        if monday.weekday() != 0:
            print("%s: a week starts on a Monday, %s is a %s"
                  % (ref, monday, monday.strftime("%A")), file=sys.stderr)
            sys.exit(3)
        days = ["agg/daily/date=%s" % (monday + datetime.timedelta(d)) for d in range(7)]
        if missing(days):
            return
        summaries = [json.load(open(path(d, "summary.json"))) for d in days]
        total = sum(s["reviews"] for s in summaries)
        def write(f):
            f.write("# %s, week of %s\n\n" % (os.environ.get("REPORT_TITLE", "Report"), monday))
            f.write("| date | reviews | average rating |\n| --- | --- | --- |\n")
            for s in summaries:
                f.write("| %s | %d | %.2f |\n" % (s["date"], s["reviews"], s["average_rating"]))
            f.write("\n%d reviews in the week.\n" % total)
        publish(ref, "report.md", write)
        print("wrote", path(ref, "report.md"), "with", total, "reviews")
        read(days)


if __name__ == "__main__":
    stage, refs = sys.argv[1], sys.argv[2:]
    {"raw": raw, "daily": daily, "weekly": weekly}[stage](refs)
