"""The example's pager: the alert JSON on stdin (README "Alerts") -> a line in
``pages.log`` (a real one would call a pager's or a chat's API, or use
``webhook =`` instead of a command).  Exit 0 = delivered; otherwise databuild
tries again later."""
import json
import sys

alert = json.load(sys.stdin)
with open("pages.log", "a") as f:
    f.write("%s [%s] %s\n" % (alert["timestamp"], alert["kind"], alert["summary"]))
