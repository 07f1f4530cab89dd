"""`kmeshd accesslog`: the access log read back from journald.

journalctl does the reading (it knows the journal's file formats, permissions and
`--since` syntax); this module only says what to ask it for and renders what comes back:

    Filters ──journalctl_args()──> journalctl -o json MESSAGE_ID=... KMESHD_*=...
    journal entry ──record_fields()──> the JSON object the file sink writes  (--output json)
                  └─text()───────────> the seed's "accesslog: ..." line       (--output text)

Exact fields are matched by journalctl, which uses the journal's indexes. A short service
name ("reviews" for "reviews.default.svc.cluster.local") cannot be, and is matched here.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

from kmeshd.accesslog.render import JSON_KEYS, MESSAGE_ID, journal_key, text_line
from kmeshd.errors import UnavailableError
from kmeshd.kernel.layout import Reason

# The failure_reason values a failed connect's record can carry (the access record's
# reason is the probe's, lower-cased).
FAILURE_REASONS = tuple(r.name.lower() for r in Reason if r is not Reason.NONE)

# JSON keys whose journal values are decimal integers (everything else is text).
_INTEGERS = frozenset(
    {
        "sent_bytes", "received_bytes", "duration_ns", "srtt_us", "min_rtt_us", "retransmits",
        "segs_in", "segs_out",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Filters:
    """What the user asked for; None = no condition."""

    src_workload: str | None = None
    dst_workload: str | None = None
    namespace: str | None = None  # either side
    service: str | None = None  # hostname, or its first label
    direction: str | None = None  # "inbound" | "outbound"
    failed: bool = False
    since: str | None = None  # journalctl's syntax, passed through
    follow: bool = False
    directory: str | None = None  # a journal directory instead of the system journal


def _conjunction(f: Filters) -> list[str]:
    """Matches that must all hold (journalctl ORs repeated values of one field)."""
    terms = [f"MESSAGE_ID={MESSAGE_ID}"]
    if f.src_workload is not None:
        terms.append(f"{journal_key('src.workload')}={f.src_workload}")
    if f.dst_workload is not None:
        terms.append(f"{journal_key('dst.workload')}={f.dst_workload}")
    if f.service is not None and "." in f.service:
        terms.append(f"{journal_key('dst.service')}={f.service}")
    if f.direction is not None:
        terms.append(f"{journal_key('direction')}={f.direction.upper()}")
    if f.failed:
        terms += [f"{journal_key('failure_reason')}={reason}" for reason in FAILURE_REASONS]
    return terms


def journalctl_args(f: Filters) -> list[str]:
    """The journalctl command line for these filters."""
    args = ["journalctl", "--output=json", "--all", "--no-pager"]
    if f.directory is not None:
        args.append(f"--directory={f.directory}")
    if f.since is not None:
        args.append(f"--since={f.since}")
    if f.follow:
        args.append("--follow")
    terms = _conjunction(f)
    if f.namespace is None:
        return args + terms
    # Either side: (terms AND src ns) OR (terms AND dst ns), "+" being journalctl's OR.
    src = f"{journal_key('src.namespace')}={f.namespace}"
    dst = f"{journal_key('dst.namespace')}={f.namespace}"
    return [*args, *terms, src, "+", *terms, dst]


def wanted(entry: Mapping[str, object], f: Filters) -> bool:
    """What journalctl could not match: a short service name."""
    if f.service is None or "." in f.service:
        return True
    hostname = str(entry.get(journal_key("dst.service"), ""))
    return hostname.split(".", 1)[0] == f.service


def record_fields(entry: Mapping[str, object]) -> dict[str, object]:
    """A journal entry -> the access record's JSON object, as the file sink writes it."""
    out: dict[str, object] = {}
    for key in JSON_KEYS:
        value = entry.get(journal_key(key))
        if value is None:
            continue
        text = value if isinstance(value, str) else _bytes_field(value)
        out[key] = int(text) if key in _INTEGERS else text
    return out


def _bytes_field(value: object) -> str:
    # journalctl -o json prints a field that is not valid UTF-8 as an array of bytes.
    if isinstance(value, list):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _time_ns(rfc3339: str) -> int:
    """ "2024-09-14T08:19:26.552709932Z" -> ns since the epoch (datetime stops at µs)."""
    whole, _, fraction = rfc3339.rstrip("Z").partition(".")
    seconds = int(datetime.fromisoformat(whole + "+00:00").timestamp())
    return seconds * 1_000_000_000 + int(fraction.ljust(9, "0")[:9])


def text(entry: Mapping[str, object]) -> str:
    """The seed's line, as the daemon would print it: "accesslog: <Go time> <MESSAGE>"."""
    stamp = entry.get(journal_key("time"))
    if isinstance(stamp, str):
        time_ns = _time_ns(stamp)
    else:  # not ours to judge: show the journal's own time
        time_ns = int(str(entry.get("__REALTIME_TIMESTAMP", 0))) * 1000
    message = entry.get("MESSAGE", "")
    return text_line(time_ns, message if isinstance(message, str) else _bytes_field(message))


def render(lines: Iterable[str], f: Filters, output: str) -> Iterable[str]:
    """journalctl's JSON lines -> what `kmeshd accesslog` prints, one string per record."""
    for line in lines:
        if not line.strip():
            continue
        entry = json.loads(line)
        if not wanted(entry, f):
            continue
        if output == "json":
            yield json.dumps(record_fields(entry), ensure_ascii=False)
        else:
            yield text(entry)


def show(f: Filters, output: str, out: TextIO) -> int:
    """Run journalctl and print the records it returns; its exit status is ours. Its
    errors (a bad --since, an unreadable directory) reach stderr as it wrote them."""
    try:
        child = subprocess.Popen(journalctl_args(f), stdout=subprocess.PIPE, text=True)
    except FileNotFoundError as exc:
        raise UnavailableError(
            "journalctl not found: install systemd (the package that ships journalctl)"
        ) from exc
    assert child.stdout is not None
    try:
        for line in render(child.stdout, f, output):
            out.write(line + "\n")
            if f.follow:
                out.flush()  # someone is watching: each record as it comes
        out.flush()
    except (BrokenPipeError, KeyboardInterrupt):
        # `| head` closed the pipe, or Ctrl-C ended a --follow: both are a normal end.
        child.terminate()
        child.wait()
        return 0
    return child.wait()
