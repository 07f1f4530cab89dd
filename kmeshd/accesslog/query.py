"""`kmeshd accesslog`: the access log read back from journald.

journalctl does the reading (it knows the journal's file formats, permissions and
`--since` syntax); this module only says what to ask it for and judges and renders what
comes back:

    Filters ──journalctl_args()──> journalctl -o json MESSAGE_ID=... KMESHD_*=...
    JSON line ──parse()──> entry ──written_by_kmeshd()──> or counted as another writer's
              ──decode()──> Record, or counted as malformed
              ──wanted()──> Record.fields   the JSON object the file sink writes (--output json)
                            Record.line     the seed's "accesslog: ..." line      (--output text)

Exact fields are matched by journalctl, which uses the journal's indexes. A short service
name ("reviews" for "reviews.default.svc.cluster.local") cannot be, and is matched here.

Any local user can send journald an entry with kmeshd's MESSAGE_ID and KMESHD_* fields;
only the fields journald itself sets (those starting with "_") say who wrote it, so an
entry is shown only when they name kmeshd (see written_by_kmeshd). Even kmeshd's entries
are checked before they are rendered: a damaged one is skipped and counted, never a
traceback that hides the records after it.
"""

from __future__ import annotations

import itertools
import json
import pwd
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

from kmeshd.accesslog.render import JSON_KEYS, MESSAGE_ID, journal_key, text_line
from kmeshd.errors import UnavailableError
from kmeshd.kernel.layout import Reason
from kmeshd.ratelimit import Throttle

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

# Keys every record has had since the first release: the time and the seed's line. The
# later ones (segs_in, ...) and the optional ones are checked when present.
REQUIRED_KEYS = JSON_KEYS[: JSON_KEYS.index("duration") + 1]

# Who writes access records (see written_by_kmeshd): root, as the unit, or as the program.
KMESHD_UNIT = "kmeshd.service"
KMESHD_COMM = "kmeshd"  # /usr/bin/kmeshd is a script: the kernel names the process after it
ROOT = frozenset({"0"})
KMESHD_USER = "kmeshd"  # the unit's User=: the daemon writes as it, `kmeshd run` by hand as root


def kmeshd_uids() -> frozenset[str]:
    """The uids kmeshd writes as: root's, and its own user's where there is one."""
    try:
        return frozenset({"0", str(pwd.getpwnam(KMESHD_USER).pw_uid)})
    except KeyError:
        return frozenset({"0"})


COUNT_MAX = 2**64 - 1  # every count is a kernel u64
_COUNT = re.compile(r"[0-9]{1,20}")  # not \d: that takes every script's digits
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{9}Z")
_NS_PER_S = 1_000_000_000

REPORT_EVERY_S = 10.0  # --follow: how often, at most, the skipped entries are reported


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
    """The journalctl command line for these filters. Who wrote an entry is judged
    afterwards (written_by_kmeshd), so that other writers' entries can be counted."""
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


def since_problem(since: str, parse: Callable[[str], str | None]) -> str | None:
    """Why `since` is no timestamp journalctl takes, in one line; None if it is one.
    `parse` is systemd's own parser (systemd_parses), whose error it passes on."""
    if not since.strip():
        return "an empty time: give one as journalctl --since takes it (-1h, today, ...)"
    if not since.isprintable():
        return f"{json.dumps(since)} has control characters: give a time such as -1h or today"
    error = parse(since)
    if error is None:
        return None
    return f'"{since}" is not a time journalctl takes ({error}): use e.g. -1h, "2 days ago", today'


def systemd_parses(since: str) -> str | None:
    """systemd's parser of timestamps, the one journalctl uses, asked through
    `systemd-analyze timestamp` (same package); None when it takes `since`, or when it is
    not installed (journalctl then judges)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return None
    done = subprocess.run(
        [analyze, "timestamp", "--", since], capture_output=True, text=True, check=False
    )
    if done.returncode == 0:
        return None
    # "Failed to parse "x": Invalid argument" -> "Invalid argument"
    last = (done.stderr.strip().splitlines() or ["not a timestamp"])[-1]
    return last.rpartition(": ")[2] or last


# -- an entry, judged ---------------------------------------------------------------------


class Malformed(ValueError):
    """An entry kmeshd wrote that is not an access record after all; the message says why."""


def _shown(value: str, limit: int = 40) -> str:
    """A value quoted for a one-line message: escaped, and cut if long."""
    cut = value if len(value) <= limit else value[:limit] + "..."
    return json.dumps(cut)


def parse(line: str) -> dict[str, object]:
    """One line of `journalctl -o json` -> the entry."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise Malformed(f"not a JSON line ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise Malformed("not a JSON line (nested too deeply)") from None
    except ValueError:  # an integer past sys.get_int_max_str_digits()
        raise Malformed("not a JSON line (a number too long)") from None
    if not isinstance(entry, dict):
        raise Malformed(f"a JSON {type(entry).__name__}, not an entry object")
    return entry


def _trusted(entry: Mapping[str, object], name: str) -> str | None:
    value = entry.get(name)
    return value if isinstance(value, str) else None


def _runs_kmeshd_module(cmdline: str | None) -> bool:
    """ "python3 -m kmeshd.cli run": kmeshd run as a module (`make run`, the tests)."""
    words = (cmdline or "").split(" ")
    return any(
        word == "-m" and (module == "kmeshd" or module.startswith("kmeshd."))
        for word, module in itertools.pairwise(words)
    )


def written_by_kmeshd(entry: Mapping[str, object], uids: frozenset[str] = ROOT) -> bool:
    """Whether kmeshd wrote `entry`, by the fields journald sets itself and no client can:
    one of `uids` (root's, and user kmeshd's: kmeshd_uids()), and either kmeshd's unit,
    or the kmeshd program run outside it (the script, _COMM=kmeshd, or `python3 -m
    kmeshd...` in _CMDLINE). Root could pass for kmeshd anyway; the second half keeps
    other root programs' entries out."""
    if _trusted(entry, "_UID") not in uids:
        return False
    return (
        _trusted(entry, "_SYSTEMD_UNIT") == KMESHD_UNIT
        or _trusted(entry, "_COMM") == KMESHD_COMM
        or _runs_kmeshd_module(_trusted(entry, "_CMDLINE"))
    )


def writer(entry: Mapping[str, object]) -> str:
    """Who wrote `entry`, as journald says: "_UID=1000 _COMM=python3"."""
    names = ("_UID", "_SYSTEMD_UNIT", "_COMM")
    said = [f"{name}={_trusted(entry, name)}" for name in names if _trusted(entry, name)]
    return " ".join(said) or "a writer journald does not name"


def field_text(entry: Mapping[str, object], name: str) -> str | None:
    """A field's value as text; None when absent. journalctl prints a value that is not
    printable UTF-8 as an array of its bytes, and a field given twice as an array of
    values: the first is decoded if it is UTF-8, the second never comes from kmeshd."""
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, list) and value and all(type(b) is int for b in value):
        if not all(0 <= b <= 255 for b in value):
            raise Malformed(f"{name}: an array that is not bytes")
        value = _utf8(name, bytes(value))
    if isinstance(value, list):
        raise Malformed(f"{name}: {len(value)} values, where kmeshd writes one")
    if not isinstance(value, str):
        raise Malformed(f"{name}: a JSON {type(value).__name__}, not a journal value")
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape
        raise Malformed(f"{name}: not UTF-8") from None
    return value


def _utf8(name: str, data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise Malformed(f"{name}: not UTF-8 (binary data)") from None


def _count(name: str, text: str) -> int:
    if _COUNT.fullmatch(text) is None or int(text) > COUNT_MAX:
        raise Malformed(f"{name}: {_shown(text)} is not a count (0 to 2^64-1)")
    return int(text)


def _time_ns(name: str, rfc3339: str) -> int:
    """ "2024-09-14T08:19:26.552709932Z" -> ns since the epoch (datetime stops at µs)."""
    if _TIME.fullmatch(rfc3339) is None:
        raise Malformed(f"{name}: {_shown(rfc3339)} is not an RFC 3339 time in UTC")
    whole, _, fraction = rfc3339.rstrip("Z").partition(".")
    try:
        seconds = int(datetime.fromisoformat(whole + "+00:00").timestamp())
    except ValueError:  # month 13, day 32, ...
        raise Malformed(f"{name}: {_shown(rfc3339)} is not a date and time") from None
    if seconds < 0:
        raise Malformed(f"{name}: {_shown(rfc3339)} is before 1970")
    return seconds * _NS_PER_S + int(fraction)


@dataclass(frozen=True)
class Record:
    """An access record read back: the file sink's JSON object and the seed's line."""

    fields: dict[str, object]
    line: str


def decode(entry: Mapping[str, object]) -> Record:
    """An entry kmeshd wrote -> its Record; Malformed (with the field) if it is not one."""
    out: dict[str, object] = {}
    for key in JSON_KEYS:
        name = journal_key(key)
        text = field_text(entry, name)
        if text is None:
            if key in REQUIRED_KEYS:
                raise Malformed(f"{name}: missing")
            continue
        out[key] = _count(name, text) if key in _INTEGERS else text
    message = field_text(entry, "MESSAGE")
    if message is None:
        raise Malformed("MESSAGE: missing")
    time_ns = _time_ns(journal_key("time"), str(out["time"]))
    return Record(out, text_line(time_ns, message))


def wanted(fields: Mapping[str, object], f: Filters) -> bool:
    """What journalctl could not match: a short service name."""
    if f.service is None or "." in f.service:
        return True
    return str(fields.get("dst.service", "")).split(".", 1)[0] == f.service


# -- what was skipped, and saying so --------------------------------------------------------


def _cursor(entry: Mapping[str, object]) -> str | None:
    """The entry's journal cursor, if it can be shown in single quotes."""
    cursor = _trusted(entry, "__CURSOR")
    return cursor if cursor and cursor.isprintable() and "'" not in cursor else None


@dataclass
class Skipped:
    """Entries not shown, by why; the first of each kind described, and its cursor."""

    foreign: int = 0  # kmeshd's MESSAGE_ID, another writer
    first_writer: str = ""
    writer_cursor: str | None = None
    malformed: int = 0
    first_problem: str = ""
    problem_cursor: str | None = None

    def other_writer(self, entry: Mapping[str, object]) -> None:
        self.foreign += 1
        if self.foreign == 1:
            self.first_writer, self.writer_cursor = writer(entry), _cursor(entry)

    def damaged(self, problem: Malformed, entry: Mapping[str, object] | None) -> None:
        self.malformed += 1
        if self.malformed == 1:
            self.first_problem = str(problem)
            self.problem_cursor = _cursor(entry) if entry is not None else None

    def report(self, directory: str | None = None) -> list[str]:
        """One line for each kind skipped: how many, the first, and how to see it."""
        where = f" --directory={directory}" if directory is not None else ""

        def see(cursor: str | None) -> str:
            if cursor is None:
                return f"journalctl{where} -o verbose MESSAGE_ID={MESSAGE_ID} shows them"
            return f"journalctl{where} -o verbose -n 1 --cursor='{cursor}' shows it"

        lines = []
        if self.foreign:
            lines.append(
                f"kmeshd: skipped {self.foreign} entries with kmeshd's MESSAGE_ID not written"
                f" by kmeshd (the first by {self.first_writer}): {see(self.writer_cursor)}"
            )
        if self.malformed:
            lines.append(
                f"kmeshd: skipped {self.malformed} malformed entries (the first: "
                f"{self.first_problem}): {see(self.problem_cursor)}"
            )
        return lines


def one(
    line: str, f: Filters, output: str, skipped: Skipped, uids: frozenset[str] = ROOT
) -> str | None:
    """One line of journalctl's -> what `kmeshd accesslog` prints for it, or None (a blank
    line, an entry filtered out, or one counted in `skipped`); `uids`: see
    written_by_kmeshd. Never raises."""
    if not line.strip():
        return None
    entry = None
    try:
        entry = parse(line)
        if not written_by_kmeshd(entry, uids):
            skipped.other_writer(entry)
            return None
        record = decode(entry)
    except Malformed as problem:
        skipped.damaged(problem, entry)
        return None
    if not wanted(record.fields, f):
        return None
    if output == "json":
        return json.dumps(record.fields, ensure_ascii=False)
    return record.line


def render(
    lines: Iterable[str], f: Filters, output: str, skipped: Skipped, uids: frozenset[str] = ROOT
) -> Iterator[str]:
    """journalctl's JSON lines -> what `kmeshd accesslog` prints, one string per record."""
    for line in lines:
        shown = one(line, f, output, skipped, uids)
        if shown is not None:
            yield shown


class Reporter:
    """Says on `err` what was skipped: at the end, and with --follow also as it happens,
    at most every `every` seconds."""

    def __init__(
        self,
        err: TextIO,
        directory: str | None = None,
        every: float = REPORT_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._err = err
        self._directory = directory
        self._throttle = Throttle(every, clock)
        self._said: tuple[int, int] = (0, 0)

    def _say(self, skipped: Skipped) -> None:
        now = (skipped.foreign, skipped.malformed)
        if now == self._said:
            return
        self._said = now
        for line in skipped.report(self._directory):
            self._err.write(line + "\n")
        self._err.flush()

    def meanwhile(self, skipped: Skipped) -> None:
        if (skipped.foreign, skipped.malformed) != self._said and self._throttle.ready():
            self._say(skipped)

    def finally_(self, skipped: Skipped) -> None:
        self._say(skipped)


def show(f: Filters, output: str, out: TextIO, err: TextIO = sys.stderr) -> int:
    """Run journalctl and print the records it returns; its exit status is ours. Its
    errors (an unreadable directory) reach stderr as it wrote them; the entries skipped
    are said there too, and are no failure."""
    try:
        child = subprocess.Popen(
            journalctl_args(f),
            stdout=subprocess.PIPE,
            encoding="utf-8",
            errors="replace",  # JSON it is, whatever the locale; a bad byte fails parse()
        )
    except FileNotFoundError as exc:
        raise UnavailableError(
            "journalctl not found: install systemd (the package that ships journalctl)"
        ) from exc
    assert child.stdout is not None
    skipped = Skipped()
    reporter = Reporter(err, f.directory)
    uids = kmeshd_uids()
    try:
        for line in child.stdout:
            shown = one(line, f, output, skipped, uids)
            if shown is not None:
                out.write(shown + "\n")
            if f.follow:  # someone is watching: each record, and what was skipped, as it comes
                out.flush()
                reporter.meanwhile(skipped)
        out.flush()
    except (BrokenPipeError, KeyboardInterrupt):
        # `| head` closed the pipe, or Ctrl-C ended a --follow: both are a normal end.
        child.terminate()
        child.wait()
        reporter.finally_(skipped)
        return 0
    reporter.finally_(skipped)
    return child.wait()
