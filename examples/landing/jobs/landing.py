"""The jobs of the landing example: ``python3 jobs/landing.py STAGE REF...``.

``raw`` copies ``landing/D.csv`` to ``data/raw/date=D/rows.csv``; ``clean``
checks each row (``item,amount`` with a number) and fails on a bad one;
``summary`` totals a clean day.  Each prints the refs it read, so databuild
knows what was built from what (README "Lineage") and what turns stale when
an upstream is rebuilt (README "Freshness").
"""
import csv
import json
import os
import shutil
import sys


def out(ref, name):
    os.makedirs(os.path.join("data", ref), exist_ok=True)
    return os.path.join("data", ref, name)


def day(ref):
    return ref.rsplit("=", 1)[1]


def read(refs):
    print("DATABUILD_READ_DEPS_JSON: " + json.dumps({"read_deps": refs}), flush=True)


def raw(ref):
    shutil.copyfile(os.path.join("landing", day(ref) + ".csv"), out(ref, "rows.csv"))


def clean(ref):
    source = "raw/date=" + day(ref)
    rows = []
    with open(os.path.join("data", source, "rows.csv"), newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            try:
                rows.append({"item": row["item"], "amount": float(row["amount"])})
            except (KeyError, TypeError, ValueError):
                sys.exit("%s line %d: not an item,amount row: %r" % (source, n, row))
    with open(out(ref, "rows.json"), "w") as f:
        json.dump(rows, f)
    read([source])


def summary(ref):
    source = "clean/date=" + day(ref)
    with open(os.path.join("data", source, "rows.json")) as f:
        rows = json.load(f)
    with open(out(ref, "summary.json"), "w") as f:
        json.dump({"date": day(ref), "rows": len(rows),
                   "total": sum(r["amount"] for r in rows)}, f)
    read([source])


if __name__ == "__main__":
    stage = {"raw": raw, "clean": clean, "summary": summary}[sys.argv[1]]
    for ref in sys.argv[2:]:
        stage(ref)
        print("built", ref)
