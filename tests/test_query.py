"""kmeshd.accesslog.query and `kmeshd accesslog`: filters as journalctl matches, journal
entries rendered back, and the whole verb against a real systemd-journald."""

from __future__ import annotations

import base64
import io
import json
import shlex
import socket
import struct
import subprocess
import sys
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kmeshd.accesslog.query import (
    Filters,
    Malformed,
    Reporter,
    Skipped,
    decode,
    journalctl_args,
    parse,
    render,
    since_problem,
    systemd_parses,
    wanted,
    written_by_kmeshd,
)
from kmeshd.accesslog.render import (
    MESSAGE_ID,
    AccessRecord,
    fields,
    journal_fields,
    message,
    text_line,
)
from kmeshd.accesslog.sinks import JournaldSink, encode_native
from tests.journald import Journald
from tests.test_render import FAILED, IPV6, SEED

BASE = ["journalctl", "--output=json", "--all", "--no-pager"]
ID = f"MESSAGE_ID={MESSAGE_ID}"


def printed(r: AccessRecord) -> str:
    """What `kmeshd accesslog` prints for the record `r`."""
    return text_line(r.time_ns, message(r))


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (Filters(), [*BASE, ID]),
        (
            Filters(since="-1h", follow=True, directory="/j"),
            [*BASE, "--directory=/j", "--since=-1h", "--follow", ID],
        ),
        (
            Filters(src_workload="a", dst_workload="b", direction="inbound"),
            [
                *BASE,
                ID,
                "KMESHD_SRC_WORKLOAD=a",
                "KMESHD_DST_WORKLOAD=b",
                "KMESHD_DIRECTION=INBOUND",
            ],
        ),
        (  # a hostname is matched by journalctl; a short name is not (see `wanted`)
            Filters(service="web.shop.svc.cluster.local"),
            [*BASE, ID, "KMESHD_DST_SERVICE=web.shop.svc.cluster.local"],
        ),
        (Filters(service="web"), [*BASE, ID]),
        (  # repeated values of one field: journalctl ORs them
            Filters(failed=True),
            [
                *BASE,
                ID,
                "KMESHD_FAILURE_REASON=refused",
                "KMESHD_FAILURE_REASON=timeout",
                "KMESHD_FAILURE_REASON=other",
            ],
        ),
        (  # either side: every other term repeated on both sides of "+"
            Filters(namespace="shop", direction="outbound"),
            [
                *BASE,
                ID,
                "KMESHD_DIRECTION=OUTBOUND",
                "KMESHD_SRC_NAMESPACE=shop",
                "+",
                ID,
                "KMESHD_DIRECTION=OUTBOUND",
                "KMESHD_DST_NAMESPACE=shop",
            ],
        ),
    ],
)
def test_journalctl_args(filters: Filters, expected: list[str]) -> None:
    assert journalctl_args(filters) == expected


@pytest.mark.parametrize(
    ("service", "hostname", "expected"),
    [
        (None, "web.shop.svc.cluster.local", True),
        ("web", "web.shop.svc.cluster.local", True),
        ("web", "webapp.shop.svc.cluster.local", False),
        ("web", "-", False),
        ("web.shop.svc.cluster.local", "anything", True),  # journalctl matched it already
    ],
)
def test_short_service_names(service: str | None, hostname: str, expected: bool) -> None:
    assert wanted({"dst.service": hostname}, Filters(service=service)) is expected


# What journald adds to an entry the daemon sends: the kmeshd script run as root.
KMESHD = {"_UID": "0", "_COMM": "kmeshd", "_PID": "4242"}


def as_journalctl_prints(r: Any) -> dict[str, object]:
    """What `journalctl -o json` prints for an entry the journald sink sent."""
    return {**journal_fields(r), "__REALTIME_TIMESTAMP": "1726301967000000", **KMESHD}


@pytest.mark.parametrize("record", [SEED, IPV6, FAILED], ids=["seed", "ipv6", "failed"])
def test_entries_render_as_the_daemon_writes(record: Any) -> None:
    """Read back, a record is the file sink's JSON object and the daemon's text line."""
    read = decode(as_journalctl_prints(record))
    assert read.fields == fields(record)
    assert list(read.fields) == list(fields(record))  # same key order
    assert read.line == printed(record)


def test_fractions_and_fields_printed_as_bytes() -> None:
    """A whole second has no fraction; a field journalctl prints as bytes (UTF-8 that is
    not printable) is decoded."""
    whole = replace(SEED, time_ns=1726301966_000000000)
    entry = as_journalctl_prints(whole)
    assert decode(entry).line == printed(whole)
    entry["KMESHD_SRC_WORKLOAD"] = list("café\x07".encode())
    assert decode(entry).fields["src.workload"] == "café\x07"


@pytest.mark.parametrize(
    ("fields_", "expected"),
    [
        ({"_UID": "0", "_SYSTEMD_UNIT": "kmeshd.service", "_COMM": "python3"}, True),
        ({"_UID": "0", "_COMM": "kmeshd"}, True),  # /usr/bin/kmeshd outside the unit
        ({"_UID": "0", "_COMM": "python", "_CMDLINE": "/usr/bin/python3 -m kmeshd.cli run"}, True),
        ({"_UID": "0", "_CMDLINE": "python3 -X dev -m kmeshd.devrun"}, True),
        ({"_UID": "0", "_CMDLINE": "python3 -m kmeshd"}, True),
        ({"_UID": "65534", "_COMM": "kmeshd"}, False),  # anyone can name a program kmeshd
        ({"_UID": "1000", "_SYSTEMD_UNIT": "kmeshd.service"}, False),
        ({"_UID": "1000", "_CMDLINE": "python3 -m kmeshd.cli run"}, False),
        ({"_COMM": "kmeshd"}, False),  # no _UID: not from a local process journald saw
        ({"_UID": "0", "_COMM": "logger"}, False),  # root, but another program
        ({"_UID": "0", "_SYSTEMD_UNIT": "cron.service", "_COMM": "python3"}, False),
        ({"_UID": "0", "_CMDLINE": "python3 -m kmeshdx run"}, False),
        ({"_UID": "0", "_CMDLINE": "python3 /tmp/x.py -m"}, False),
        ({"_UID": "0", "_CMDLINE": "python3 x.py kmeshd.cli"}, False),
        ({"_UID": ["0", "0"], "_COMM": "kmeshd"}, False),  # not what journald writes
        ({"_UID": 0, "_COMM": "kmeshd"}, False),
    ],
)
def test_only_kmeshd_writes_access_records(fields_: dict[str, object], expected: bool) -> None:
    """Who wrote an entry is judged by journald's own fields: root, and kmeshd's unit or
    program; client-sent fields say nothing."""
    assert written_by_kmeshd({**journal_fields(SEED), **fields_}) is expected


@pytest.mark.parametrize(
    ("fields_", "expected"),
    [
        ({"_UID": "998", "_SYSTEMD_UNIT": "kmeshd.service", "_COMM": "kmeshd"}, True),
        ({"_UID": "0", "_SYSTEMD_UNIT": "kmeshd.service"}, True),
        ({"_UID": "998", "_COMM": "logger"}, False),  # user kmeshd, but another program
        ({"_UID": "997", "_SYSTEMD_UNIT": "kmeshd.service"}, False),
    ],
)
def test_the_kmeshd_user_writes_too(fields_: dict[str, object], expected: bool) -> None:
    """The unit runs the daemon as user kmeshd: its uid is trusted beside root's."""
    uids = frozenset({"0", "998"})
    assert written_by_kmeshd({**journal_fields(SEED), **fields_}, uids) is expected


def test_kmeshd_uids_are_roots_and_the_kmeshd_users(monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    from kmeshd.accesslog import query

    def getpwnam(name: str) -> pwd.struct_passwd:
        if name != "kmeshd":
            raise KeyError(name)
        return pwd.struct_passwd(("kmeshd", "x", 998, 998, "", "/", "/usr/sbin/nologin"))

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    assert query.kmeshd_uids() == {"0", "998"}
    monkeypatch.setattr(query, "KMESHD_USER", "nobody-here")
    assert query.kmeshd_uids() == {"0"}


def entry_with(**changes: object) -> dict[str, object]:
    """SEED's entry as journalctl prints it, fields changed (None: removed)."""
    entry = as_journalctl_prints(SEED)
    for name, value in changes.items():
        if value is None:
            entry.pop(name, None)
        else:
            entry[name] = value
    return entry


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (entry_with(KMESHD_SENT_BYTES=None), "KMESHD_SENT_BYTES: missing"),
        (entry_with(KMESHD_TIME=None), "KMESHD_TIME: missing"),
        (entry_with(MESSAGE=None), "MESSAGE: missing"),
        (
            entry_with(KMESHD_SENT_BYTES="five"),
            'KMESHD_SENT_BYTES: "five" is not a count (0 to 2^64-1)',
        ),
        (
            entry_with(KMESHD_SENT_BYTES="-5"),
            'KMESHD_SENT_BYTES: "-5" is not a count (0 to 2^64-1)',
        ),
        (entry_with(KMESHD_SENT_BYTES=""), 'KMESHD_SENT_BYTES: "" is not a count (0 to 2^64-1)'),
        (
            entry_with(KMESHD_SENT_BYTES=" 5"),
            'KMESHD_SENT_BYTES: " 5" is not a count (0 to 2^64-1)',
        ),
        (  # Arabic-Indic digits: int() takes them, the kernel never wrote them
            entry_with(KMESHD_SENT_BYTES="٥"),
            'KMESHD_SENT_BYTES: "\\u0665" is not a count (0 to 2^64-1)',
        ),
        (
            entry_with(KMESHD_SRTT_US=str(2**64)),
            'KMESHD_SRTT_US: "18446744073709551616" is not a count (0 to 2^64-1)',
        ),
        (
            entry_with(KMESHD_DURATION_NS="9" * 5000),
            'KMESHD_DURATION_NS: "' + "9" * 40 + '..." is not a count (0 to 2^64-1)',
        ),
        (entry_with(KMESHD_SEGS_IN="x"), 'KMESHD_SEGS_IN: "x" is not a count (0 to 2^64-1)'),
        (
            entry_with(KMESHD_SRC_WORKLOAD=list(b"caf\xc3\xa9-\xff")),
            "KMESHD_SRC_WORKLOAD: not UTF-8 (binary data)",
        ),
        (
            entry_with(KMESHD_SRC_WORKLOAD=[0, 256]),
            "KMESHD_SRC_WORKLOAD: an array that is not bytes",
        ),
        (
            entry_with(KMESHD_DST_SERVICE=["a.b", "c.d"]),
            "KMESHD_DST_SERVICE: 2 values, where kmeshd writes one",
        ),
        (
            entry_with(KMESHD_DST_SERVICE=[]),
            "KMESHD_DST_SERVICE: 0 values, where kmeshd writes one",
        ),
        (entry_with(MESSAGE=5), "MESSAGE: a JSON int, not a journal value"),
        (entry_with(MESSAGE={"a": 1}), "MESSAGE: a JSON dict, not a journal value"),
        (
            entry_with(KMESHD_DIRECTION=[True]),
            "KMESHD_DIRECTION: 1 values, where kmeshd writes one",
        ),
        (entry_with(KMESHD_SRC_ADDR="\ud800"), "KMESHD_SRC_ADDR: not UTF-8"),
        (
            entry_with(KMESHD_TIME="2024-09-14 08:19:26"),
            'KMESHD_TIME: "2024-09-14 08:19:26" is not an RFC 3339 time in UTC',
        ),
        (
            entry_with(KMESHD_TIME="2024-13-14T08:19:26.552709932Z"),
            'KMESHD_TIME: "2024-13-14T08:19:26.552709932Z" is not a date and time',
        ),
        (
            entry_with(KMESHD_TIME="1969-12-31T23:59:59.000000000Z"),
            'KMESHD_TIME: "1969-12-31T23:59:59.000000000Z" is before 1970',
        ),
    ],
)
def test_malformed_entries_say_why(entry: dict[str, object], problem: str) -> None:
    """An entry that is no access record is Malformed, naming the field and the problem."""
    with pytest.raises(Malformed) as caught:
        decode(entry)
    assert str(caught.value) == problem


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{", "not a JSON line (Expecting property name enclosed in double quotes at "
         "character 1)"),
        ("[1]", "a JSON list, not an entry object"),
        ('"x"', "a JSON str, not an entry object"),
        ("[" * 100_000 + "]" * 100_000, "not a JSON line (nested too deeply)"),
        ('{"a": ' + "1" * 5000 + "}", "not a JSON line (a number too long)"),
    ],
    ids=["cut", "array", "string", "deep", "long-integer"],
)  # fmt: skip
def test_lines_that_are_no_entry(line: str, problem: str) -> None:
    with pytest.raises(Malformed) as caught:
        parse(line)
    assert str(caught.value) == problem


def test_render_skips_what_it_should_and_counts_it() -> None:
    """Blank lines and other services' records are left out; another writer's entry and a
    malformed one are counted, the first of each described; the rest is printed."""
    nobody = {**as_journalctl_prints(SEED), "_UID": "65534", "__CURSOR": "s=1;i=2"}
    lines = [
        json.dumps(as_journalctl_prints(SEED)),
        "",
        json.dumps(nobody),
        json.dumps(entry_with(KMESHD_SENT_BYTES="lots", __CURSOR="s=1;i=3")),
        "not json",
        json.dumps(as_journalctl_prints(IPV6)),
        json.dumps({**nobody, "_UID": "1000"}),
    ]
    skipped = Skipped()
    out = list(render(lines, Filters(service="httpbin"), "json", skipped))
    assert [json.loads(line) for line in out] == [fields(IPV6)]
    assert skipped.report("/j") == [
        "kmeshd: skipped 2 entries with kmeshd's MESSAGE_ID not written by kmeshd (the first "
        "by _UID=65534 _COMM=kmeshd): journalctl --directory=/j -o verbose -n 1 "
        "--cursor='s=1;i=2' shows it",
        'kmeshd: skipped 2 malformed entries (the first: KMESHD_SENT_BYTES: "lots" is not a '
        "count (0 to 2^64-1)): journalctl --directory=/j -o verbose -n 1 --cursor='s=1;i=3' "
        "shows it",
    ]


def test_a_problem_without_a_cursor_points_at_all_entries() -> None:
    skipped = Skipped()
    assert list(render(["[]"], Filters(), "text", skipped)) == []
    assert skipped.report() == [
        "kmeshd: skipped 1 malformed entries (the first: a JSON list, not an entry object): "
        f"journalctl -o verbose MESSAGE_ID={MESSAGE_ID} shows them"
    ]


def test_following_reports_as_it_goes_at_most_every_ten_seconds() -> None:
    """-f: the first skipped entry is said at once, later ones at most every 10 s, and
    what is left at the end; nothing is said twice."""
    now = [0.0]
    err = io.StringIO()
    reporter = Reporter(err, clock=lambda: now[0])
    skipped = Skipped()

    def skip(n: int) -> None:
        for _ in range(n):
            skipped.damaged(Malformed("MESSAGE: missing"), None)
            reporter.meanwhile(skipped)

    skip(1)
    now[0] = 5.0
    skip(3)
    now[0] = 10.0
    reporter.meanwhile(skipped)
    now[0] = 11.0
    skip(1)
    reporter.finally_(skipped)
    reporter.finally_(skipped)
    counts = [line.split(" ")[2] for line in err.getvalue().splitlines()]
    assert counts == ["1", "4", "5"]


@pytest.mark.parametrize(
    ("since", "problem"),
    [
        ("-1h", None),
        ("-1h 30min", None),
        ("2 days ago", None),
        ("today", None),
        ("2026-12-02 10:00", None),
        ("Mon 2024-01-01", None),
        ("@1700000000", None),
        (
            "the day before yesterday-ish",
            '"the day before yesterday-ish" is not a time journalctl takes (Invalid '
            'argument): use e.g. -1h, "2 days ago", today',
        ),
        (
            "2024-01-01T10:00:00",
            '"2024-01-01T10:00:00" is not a time journalctl takes (Invalid argument): use '
            'e.g. -1h, "2 days ago", today',
        ),
        (
            "--1h",
            '"--1h" is not a time journalctl takes (Numerical result out of range): use e.g. '
            '-1h, "2 days ago", today',
        ),
        ("", "an empty time: give one as journalctl --since takes it (-1h, today, ...)"),
        (" ", "an empty time: give one as journalctl --since takes it (-1h, today, ...)"),
        ("-1h\n", '"-1h\\n" has control characters: give a time such as -1h or today'),
    ],
)
def test_since_is_checked_by_systemds_parser(since: str, problem: str | None) -> None:
    assert since_problem(since, systemd_parses) == problem


@pytest.mark.parametrize(
    "since", ["-1h", "-2d", "bogus", "2024-01-01T10:00:00", "today -3h", "@1700000000", "-"]
)
def test_systemd_analyze_judges_as_journalctl_does(since: str, tmp_path: Path) -> None:
    """The parser asked (systemd-analyze timestamp) takes what journalctl takes."""
    done = subprocess.run(
        ["journalctl", f"--directory={tmp_path}", f"--since={since}", "-n0", "-q"],
        capture_output=True,
        check=False,
    )
    assert (systemd_parses(since) is None) is (done.returncode == 0)


# -- the verb, against a real journald ---------------------------------------------------

# A writer of raw journal entries: its payloads (base64 JSON on stdin) go out on the
# connected socket it inherits (its fd number the first argument); then it waits for its
# stdin to close, so that journald finds it alive when it reads its _COMM, _CMDLINE and
# _UID from /proc.
WRITER = """
import base64, ctypes, json, socket, sys
if len(sys.argv) > 2:  # the name to show in _COMM (prctl PR_SET_NAME)
    ctypes.CDLL(None).prctl(15, sys.argv[2].encode(), 0, 0, 0)
sock = socket.socket(fileno=int(sys.argv[1]))
for payload in json.loads(sys.stdin.readline()):
    sock.send(base64.b64decode(payload))
print("sent", flush=True)
sys.stdin.read()
"""


def binary_field(name: str, data: bytes) -> bytes:
    """A field in the native protocol's length-prefixed form, any bytes in it."""
    return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


def write_entries(
    journald: Journald, command: list[str], payloads: list[bytes], *names: str
) -> None:
    """Send `payloads` to journald from a process started as `command`, calling itself
    by `names` (at most one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(journald.socket_path)
        fd = sock.fileno()
        with subprocess.Popen(
            [*command, str(fd), *names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=(fd,),
        ) as child:
            assert child.stdin is not None and child.stdout is not None
            encoded = [base64.b64encode(p).decode() for p in payloads]
            child.stdin.write(json.dumps(encoded) + "\n")
            child.stdin.flush()
            assert child.stdout.readline() == "sent\n"
            journald.query()  # journalctl --sync: journald has taken them all
            child.stdin.close()


def as_kmeshd(journald: Journald, tmp_path: Path, payloads: list[bytes]) -> None:
    """Entries sent as kmeshd outside its unit sends them: root, from a script named
    kmeshd (/usr/bin/kmeshd is one), so journald's _COMM is "kmeshd"."""
    script = tmp_path / "bin" / "kmeshd"
    script.parent.mkdir(exist_ok=True)
    script.write_text(f"#!{sys.executable}\n{WRITER}")
    script.chmod(0o755)
    write_entries(journald, [str(script)], payloads)


def as_nobody(journald: Journald, payloads: list[bytes]) -> None:
    """Entries sent by an unprivileged user whose program calls itself kmeshd."""
    setpriv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    write_entries(journald, [*setpriv, sys.executable, "-c", WRITER], payloads, "kmeshd")


def sent(*records: AccessRecord) -> list[bytes]:
    return [encode_native(journal_fields(r)) for r in records]


def accesslog(journald: Journald, *args: str) -> subprocess.CompletedProcess[str]:
    journald.query()  # journalctl --sync: everything sent is on disk
    return subprocess.run(
        [sys.executable, "-m", "kmeshd.cli", "accesslog", "-D", journald.journal_dir, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.consumers
def test_accesslog_reads_back_from_journald(journald: Journald, tmp_path: Path) -> None:
    """Records kmeshd sent come back through `kmeshd accesslog`, filtered, as text and as
    JSON; other programs' entries never show."""
    other_ns = replace(
        IPV6,
        src_namespace="shop",
        dst_namespace="default",
        dst_workload="cart-1",
        src_workload="ui-1",
    )
    records = [SEED, IPV6, FAILED, other_ns]
    as_kmeshd(journald, tmp_path, sent(*records))
    subprocess.run(
        [
            "logger",
            "--socket-errors=on",
            "-u",
            journald.syslog_path,
            "-t",
            "kmeshd",
            "not a record",
        ],
        check=True,
    )

    def lines(*args: str) -> list[str]:
        done = accesslog(journald, *args)
        assert (done.returncode, done.stderr) == (0, "")
        return done.stdout.splitlines()

    assert lines() == [printed(r) for r in records]
    assert [json.loads(x) for x in lines("--output", "json")] == [fields(r) for r in records]
    assert lines("--failed") == [printed(FAILED)]
    assert lines("--namespace", "shop") == [printed(other_ns)]
    assert lines("--namespace", "default") == [printed(IPV6), printed(other_ns)]
    assert lines("--direction", "OUTBOUND") == [printed(FAILED)]
    assert lines("--service", "httpbin") == [printed(IPV6), printed(other_ns)]
    assert lines("--service", SEED.dst_service) == [printed(SEED), printed(FAILED)]
    assert lines("--dst-workload", "cart-1", "--src-workload", "ui-1") == [printed(other_ns)]
    assert lines("--since", "2000-01-01", "--dst-workload", "nobody") == []
    # As the documentation writes it: a relative time after a space, and after "=".
    assert lines("--since", "-1h", "--namespace", "default", "--service", "httpbin") == [
        printed(IPV6),
        printed(other_ns),
    ]
    assert lines("--since=-1h", "--failed") == [printed(FAILED)]


@pytest.mark.consumers
def test_accesslog_shows_only_what_kmeshd_wrote(journald: Journald, tmp_path: Path) -> None:
    """Entries with kmeshd's MESSAGE_ID and fields from an unprivileged user, even one
    whose program is named kmeshd, and from the test process itself (root, another
    program), are not shown; they are counted on stderr, and the command it names shows
    the first."""
    forged = replace(SEED, src_workload="forged", sent_bytes=999)
    as_nobody(journald, sent(forged))
    as_kmeshd(journald, tmp_path, sent(SEED))
    with closing(JournaldSink(journald.socket_path)) as sink:  # root, but python -m pytest
        assert sink.write(replace(forged, sent_bytes=998))

    done = accesslog(journald)
    assert (done.returncode, done.stdout) == (0, printed(SEED) + "\n")
    [line] = done.stderr.splitlines()
    first, _, command = line.partition("): ")
    assert first == (
        "kmeshd: skipped 2 entries with kmeshd's MESSAGE_ID not written by kmeshd (the first"
        " by _UID=65534 _COMM=kmeshd"
    )
    assert command.endswith(" shows it")
    shown = subprocess.run(
        shlex.split(command.removesuffix(" shows it")), capture_output=True, text=True, check=True
    )
    assert "KMESHD_SRC_WORKLOAD=forged" in shown.stdout
    assert "KMESHD_SENT_BYTES=999" in shown.stdout


@pytest.mark.consumers
def test_accesslog_skips_malformed_entries(journald: Journald, tmp_path: Path) -> None:
    """Entries kmeshd's writer sent that are no access record (a count that is no
    number, a huge one, a field missing, invalid UTF-8, binary data) are skipped with one
    line on stderr; the records around them are printed and the exit status is 0."""
    good = encode_native(journal_fields(SEED))
    payloads = [
        good.replace(b"KMESHD_SENT_BYTES=5\n", b"KMESHD_SENT_BYTES=five\n"),
        good.replace(b"KMESHD_SENT_BYTES=5\n", b"KMESHD_SENT_BYTES=" + b"9" * 30 + b"\n"),
        good.replace(b"KMESHD_DST_ADDR=10.244.0.13:9080\n", b""),
        good.replace(b"KMESHD_DST_WORKLOAD=", b"KMESHD_DST_WORKLOAD=\xff\xfe"),
        good + binary_field("KMESHD_SRC_WORKLOAD", b"\0\x01\x02\xff"),
        encode_native(journal_fields(IPV6)),
    ]
    assert all(p != good for p in payloads[:5])
    as_kmeshd(journald, tmp_path, payloads)

    for output, expected in (
        ("text", printed(IPV6)),
        ("json", json.dumps(fields(IPV6), ensure_ascii=False)),
    ):
        done = accesslog(journald, "--output", output)
        assert (done.returncode, done.stdout) == (0, expected + "\n")
        [line] = done.stderr.splitlines()
        assert line.startswith(
            'kmeshd: skipped 5 malformed entries (the first: KMESHD_SENT_BYTES: "five" is not'
            f" a count (0 to 2^64-1)): journalctl --directory={journald.journal_dir} -o verbose"
            " -n 1 --cursor='"
        )
        assert "Traceback" not in done.stderr


@pytest.mark.consumers
def test_accesslog_follow_reports_skipped_entries_as_they_come(
    journald: Journald, tmp_path: Path
) -> None:
    """-f: a malformed entry is reported on stderr while kmeshd accesslog keeps following,
    and the records after it are printed."""
    good = encode_native(journal_fields(SEED))
    as_kmeshd(journald, tmp_path, [good.replace(b"KMESHD_TIME=", b"KMESHD_TIME=x"), good])
    child = subprocess.Popen(
        [sys.executable, "-m", "kmeshd.cli", "accesslog", "-f", "-D", journald.journal_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stderr is not None
        assert child.stderr.readline().startswith(
            'kmeshd: skipped 1 malformed entries (the first: KMESHD_TIME: "x2024-09-14T08:19:'
        )
        assert child.stdout.readline() == printed(SEED) + "\n"
    finally:
        child.terminate()
        child.wait(timeout=10)


def test_since_as_the_documentation_writes_it() -> None:
    """`--since -1h` (the documented form) and `--since=-1h` reach journalctl as -1h."""
    from kmeshd.cli import parser

    for argv in (["--since", "-1h"], ["--since=-1h"], ["-f", "--since", "-2d", "-o", "json"]):
        args = parser().parse_args(["accesslog", *argv])
        assert args.since in ("-1h", "-2d")


@pytest.mark.parametrize(
    ("since", "problem"),
    [
        (
            "the day before yesterday-ish",
            '"the day before yesterday-ish" is not a time journalctl takes (Invalid argument):'
            ' use e.g. -1h, "2 days ago", today',
        ),
        ("-1x", '"-1x" is not a time journalctl takes (Invalid argument): use e.g. -1h, "2 days'
         ' ago", today'),
        ("", "an empty time: give one as journalctl --since takes it (-1h, today, ...)"),
    ],
)  # fmt: skip
def test_a_bad_since_is_a_usage_error(since: str, problem: str, tmp_path: Path) -> None:
    """A --since journalctl would not take: exit 2 with one line naming it, and nothing run."""
    done = subprocess.run(
        [sys.executable, "-m", "kmeshd.cli", "accesslog", "-D", str(tmp_path), "--since", since],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines()[-1] == f"kmeshd accesslog: error: argument --since: {problem}"


@pytest.mark.consumers
def test_a_reader_that_stops_early_ends_it_quietly(journald: Journald, tmp_path: Path) -> None:
    """`kmeshd accesslog | head -1`: the pipe closes early; kmeshd ends with 0 and says
    nothing (no BrokenPipeError, no traceback)."""
    as_kmeshd(journald, tmp_path, sent(*[replace(SEED, sent_bytes=i) for i in range(3000)]))
    journald.query()
    done = subprocess.run(
        f"{sys.executable} -m kmeshd.cli accesslog -D {journald.journal_dir} | head -1;"
        " echo status=${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.splitlines() == [printed(replace(SEED, sent_bytes=0)), "status=0"]
    assert done.stderr == ""
