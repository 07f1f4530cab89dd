"""Access-log sinks: exact bytes written, drops counted, failures survived, recovery."""

from __future__ import annotations

import array
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kmeshd.accesslog.render import AccessRecord, fields, journal_fields
from kmeshd.accesslog.sinks import (
    SNDBUF,
    STALL_WAIT_S,
    Fanout,
    FileSink,
    JournaldSink,
    NullSink,
    Sink,
    encode_native,
    journal_socket,
)
from tests.test_render import FAILED, IPV6, SEED

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

SEED_LINE = (
    '{"time": "2024-09-14T08:19:26.552709932Z", "src.addr": "10.244.0.17:51842", '
    '"src.workload": "prometheus-5fb7f6f8d8-h9cts", "src.namespace": "istio-system", '
    '"dst.addr": "10.244.0.13:9080", "dst.service": "productpage.echo-1-27855.svc.cluster.local", '
    '"dst.workload": "productpage-v1-8499c849b9-bz9t9", "dst.namespace": "echo-1-27855", '
    '"direction": "INBOUND", "sent_bytes": 5, "received_bytes": 292, '
    '"duration": "2.733902ms", "duration_ns": 2733902, '
    '"srtt_us": 412, "min_rtt_us": 97, "retransmits": 0, "segs_in": 6, "segs_out": 5}\n'
)


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def read_lines(path: Path) -> list[list[tuple[str, object]]]:
    """Each JSON line of a file as its (key, value) pairs, in file order."""
    return [json.loads(line, object_pairs_hook=list) for line in path.read_text().splitlines()]


def as_pairs(r: AccessRecord) -> list[tuple[str, object]]:
    return list(fields(r).items())


def kmeshd_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kmeshd"]


# -- FileSink ----------------------------------------------------------------------------


def test_standard_output_gets_the_exact_json_line() -> None:
    """ "-" writes one JSON object per record, keys in fields() order, nothing else."""
    out = io.BytesIO()
    sink = FileSink("-", stdout=out)
    assert sink.write(SEED)
    assert out.getvalue() == SEED_LINE.encode()


def test_non_ascii_stays_readable() -> None:
    """The µ of a microsecond duration is written as UTF-8, not as a \\u escape."""
    out = io.BytesIO()
    FileSink("-", stdout=out).write(IPV6)
    assert '"duration": "850µs"'.encode() in out.getvalue()


def test_file_lines_parse_back_to_the_records(tmp_path: Path) -> None:
    """Each line of the file parses to fields(record), same keys in the same order."""
    path = tmp_path / "access.json"
    sink = FileSink(str(path))
    for r in (SEED, IPV6, FAILED):
        assert sink.write(r)
    sink.close()
    assert read_lines(path) == [as_pairs(SEED), as_pairs(IPV6), as_pairs(FAILED)]
    assert (sink.up, sink.dropped) == (True, 0)


def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    """Lines already in the file are kept; new records follow them."""
    path = tmp_path / "access.json"
    path.write_text('{"old": 1}\n')
    sink = FileSink(str(path))
    sink.write(SEED)
    sink.close()
    assert path.read_text() == '{"old": 1}\n' + SEED_LINE


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.usefixtures("umask_022")
def test_a_new_file_is_created_0640(tmp_path: Path) -> None:
    """A missing file is created with mode 0640 (owner writes, group reads)."""
    path = tmp_path / "access.json"
    FileSink(str(path)).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_new_file_is_0640_under_the_units_umask_and_an_old_one_keeps_its_mode(
    tmp_path: Path,
) -> None:
    """The unit's UMask=0077 would make it 0600, which group adm could not read."""
    path, old = tmp_path / "access.json", tmp_path / "old.json"
    old.touch(mode=0o600)
    mask = os.umask(0o077)
    try:
        FileSink(str(path)).close()
        FileSink(str(old)).close()
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


def test_reopen_after_logrotate_moved_the_file(tmp_path: Path) -> None:
    """After a rename and reopen(), new records go to a new file at the path."""
    path = tmp_path / "access.json"
    sink = FileSink(str(path))
    sink.write(SEED)
    path.rename(tmp_path / "access.json.1")
    sink.reopen()
    sink.write(FAILED)
    sink.close()
    assert read_lines(tmp_path / "access.json.1") == [as_pairs(SEED)]
    assert read_lines(path) == [as_pairs(FAILED)]


def test_a_full_disk_is_counted_and_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Writes to /dev/full (ENOSPC) are dropped, counted, mark the sink down, never raise.
    (The sink itself opens only regular files: the device is handed to it.)"""
    clock = Clock()
    device = open("/dev/full", "ab", buffering=0)  # noqa: SIM115 - the sink closes it
    sink = FileSink("-", stdout=device, clock=clock)  # "-": the stream it is handed
    sink.path = "/dev/full"  # what its messages name
    with caplog.at_level(logging.WARNING, logger="kmeshd"):
        assert [sink.write(SEED) for _ in range(3)] == [False, False, False]
        clock.now += 59
        sink.write(SEED)
        clock.now += 2
        sink.write(SEED)
    sink.close()
    assert (sink.up, sink.dropped) == (False, 5)
    assert kmeshd_logs(caplog) == [
        "access log /dev/full: [Errno 28] No space left on device; 1 records dropped so far",
        "access log /dev/full: [Errno 28] No space left on device; 5 records dropped so far",
    ]


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_only_a_regular_file_is_written_never_a_fifo_or_device(tmp_path: Path, kind: str) -> None:
    """A FIFO (even one nobody reads: opening it would block), a directory or a device
    at the path: refused at once when the sink opens, and when it reopens after a
    rotation put one there (a drop, counted; the sink down)."""
    path = tmp_path / "access.json"

    def make() -> None:
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "directory":
            path.mkdir()
        else:
            path.symlink_to("/dev/null")

    make()
    with pytest.raises(OSError, match="not a regular file|Is a directory"):
        FileSink(str(path))
    if kind == "directory":
        path.rmdir()
    else:
        path.unlink()
    sink = FileSink(str(path))
    assert sink.write(SEED)
    path.rename(tmp_path / "access.json.1")
    make()
    sink.reopen()
    assert (sink.write(FAILED), sink.up, sink.dropped) == (False, False, 1)
    sink.close()
    assert read_lines(tmp_path / "access.json.1") == [as_pairs(SEED)]


def test_a_removed_directory_drops_until_it_is_back(tmp_path: Path) -> None:
    """A reopen() into a removed directory marks the sink down; it recovers when the
    directory exists again, without another reopen()."""
    directory = tmp_path / "log"
    directory.mkdir()
    path = directory / "access.json"
    sink = FileSink(str(path))
    assert sink.write(SEED)

    shutil.rmtree(directory)
    sink.reopen()
    assert (sink.up, sink.write(IPV6), sink.dropped) == (False, False, 1)

    directory.mkdir()
    assert sink.write(FAILED)
    assert (sink.up, sink.dropped) == (True, 1)
    sink.close()
    assert read_lines(path) == [as_pairs(FAILED)]


class FillingDisk(io.BytesIO):
    """A stream that takes `room` more bytes, then fails with ENOSPC (None = no limit)."""

    def __init__(self) -> None:
        super().__init__()
        self.room: int | None = None

    def write(self, data: ReadableBuffer, /) -> int:
        chunk = bytes(data)
        if self.room is not None:
            if self.room == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            chunk = chunk[: self.room]
            self.room -= len(chunk)
        return super().write(chunk)


def test_a_line_cut_short_is_ended_before_the_next_one() -> None:
    """After a write fails mid-line, the next line starts on a line of its own."""
    out = FillingDisk()
    sink = FileSink("-", stdout=out)
    out.room = 10
    assert not sink.write(SEED)
    out.room = None
    assert sink.write(SEED)
    assert out.getvalue() == SEED_LINE[:10].encode() + b"\n" + SEED_LINE.encode()
    assert (sink.up, sink.dropped) == (True, 1)


def test_records_never_reach_the_root_logger(caplog: pytest.LogCaptureFixture) -> None:
    """The sink's logger is its own: nothing it writes shows up in the logging tree."""
    with caplog.at_level(logging.DEBUG):
        FileSink("-", stdout=io.BytesIO()).write(SEED)
    assert caplog.records == []


# -- journald ----------------------------------------------------------------------------


def le64(n: int) -> bytes:
    return struct.pack("<Q", n)


def test_encode_native_plain_and_binary_fields() -> None:
    """Plain values are KEY=value; a value with a newline is KEY, its u64 LE length, value."""
    entry = {"MESSAGE": "hi", "MULTI": "a\nb", "EMPTY": ""}
    assert encode_native(entry) == (b"MESSAGE=hi\nMULTI\n" + le64(3) + b"a\nb\nEMPTY=\n")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for journald's."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(tmp_path / "journal.sock"))
        s.settimeout(5)
        yield s


def test_journald_gets_the_exact_datagram(server: socket.socket) -> None:
    """One record is one datagram of journal_fields() in native encoding, binary form for
    the values holding a newline."""
    odd = replace(SEED, dst_service="a\nb")
    sink = JournaldSink(server.getsockname())
    assert sink.write(odd)
    msg = (
        b"src.addr=10.244.0.17:51842, src.workload=prometheus-5fb7f6f8d8-h9cts, "
        b"src.namespace=istio-system, dst.addr=10.244.0.13:9080, dst.service=a\nb, "
        b"dst.workload=productpage-v1-8499c849b9-bz9t9, dst.namespace=echo-1-27855, "
        b"direction=INBOUND, sent_bytes=5, received_bytes=292, duration=2.733902ms"
    )
    assert server.recv(65536) == b"".join(
        [
            b"MESSAGE\n" + le64(len(msg)) + msg + b"\n",
            b"MESSAGE_ID=2fbe419c00fb412cafa2600c22093fd2\n",
            b"SYSLOG_IDENTIFIER=kmeshd\n",
            b"PRIORITY=6\n",
            b"KMESHD_TIME=2024-09-14T08:19:26.552709932Z\n",
            b"KMESHD_SRC_ADDR=10.244.0.17:51842\n",
            b"KMESHD_SRC_WORKLOAD=prometheus-5fb7f6f8d8-h9cts\n",
            b"KMESHD_SRC_NAMESPACE=istio-system\n",
            b"KMESHD_DST_ADDR=10.244.0.13:9080\n",
            b"KMESHD_DST_SERVICE\n" + le64(3) + b"a\nb\n",
            b"KMESHD_DST_WORKLOAD=productpage-v1-8499c849b9-bz9t9\n",
            b"KMESHD_DST_NAMESPACE=echo-1-27855\n",
            b"KMESHD_DIRECTION=INBOUND\n",
            b"KMESHD_SENT_BYTES=5\n",
            b"KMESHD_RECEIVED_BYTES=292\n",
            b"KMESHD_DURATION=2.733902ms\n",
            b"KMESHD_DURATION_NS=2733902\n",
            b"KMESHD_SRTT_US=412\n",
            b"KMESHD_MIN_RTT_US=97\n",
            b"KMESHD_RETRANSMITS=0\n",
            b"KMESHD_SEGS_IN=6\n",
            b"KMESHD_SEGS_OUT=5\n",
        ]
    )
    sink.close()
    assert (sink.up, sink.dropped) == (True, 0)


def too_big_for_a_datagram(path: str, payload: bytes) -> bool:
    """True when a socket set up like the sink's cannot send payload as one datagram."""
    with closing(journal_socket()) as s:
        s.connect(path)
        try:
            s.send(payload)
        except OSError as exc:
            return exc.errno in (errno.EMSGSIZE, errno.ENOBUFS)
    return False


def test_an_oversize_entry_goes_through_a_sealed_memfd(server: socket.socket) -> None:
    """An entry over the datagram limit arrives as an empty datagram carrying one sealed
    memfd that holds the whole entry."""
    big = replace(SEED, dst_service="s" * (SNDBUF + 1))
    entry = encode_native(journal_fields(big))
    assert too_big_for_a_datagram(server.getsockname(), entry)
    with closing(JournaldSink(server.getsockname())) as sink:
        assert sink.write(big)

    data, ancillary, _flags, _addr = server.recvmsg(1024, socket.CMSG_SPACE(4))
    assert data == b""
    [(level, kind, raw)] = ancillary
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = array.array("i", raw)[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        content = os.pread(fd, 2 * len(entry), 0)
    finally:
        os.close(fd)
    assert content == entry
    for seal in (fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE, fcntl.F_SEAL_SEAL):
        assert seals & seal


def test_missing_socket_is_down_counts_drops_and_retries_every_few_seconds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without journald the sink is down, warns once and drops; it connects again no more
    often than every few seconds, and delivers once the socket exists."""
    path = tmp_path / "journal.sock"
    clock = Clock()
    with caplog.at_level(logging.WARNING, logger="kmeshd"):
        sink = JournaldSink(str(path), clock=clock, reconnect_every=5)
        assert [sink.write(SEED) for _ in range(3)] == [False, False, False]
    assert (sink.up, sink.dropped) == (False, 3)
    assert kmeshd_logs(caplog) == [
        f"journald not reachable at {path} (No such file or directory): access records "
        "to journald are dropped and counted until it is"
    ]

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        clock.now += 4
        assert not sink.write(SEED)  # too soon to look again
        clock.now += 1
        assert sink.write(IPV6)
        assert (sink.up, sink.dropped) == (True, 4)
        assert server.recv(65536) == encode_native(journal_fields(IPV6))
    sink.close()


def test_a_restarted_journald_is_reached_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When journald goes away the record is dropped and the sink down; the next write
    after journald is back reconnects and delivers. Both are logged, the recovery even
    within the minute that throttles the warnings."""
    path = str(tmp_path / "journal.sock")
    old = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old.bind(path)
    sink = JournaldSink(path)
    assert sink.write(SEED)
    old.close()
    os.unlink(path)

    with caplog.at_level(logging.WARNING, logger="kmeshd"):
        assert not sink.write(SEED)
        assert (sink.up, sink.dropped) == (False, 1)

        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as new:
            new.bind(path)
            assert sink.write(FAILED)
            assert sink.up
            assert new.recv(65536) == encode_native(journal_fields(FAILED))
    sink.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"journald not reachable at {path} (Connection refused): access records to"
        " journald are dropped and counted until it is",
        f"journald reachable again at {path}",
    ]


def test_a_stalled_journald_costs_records_not_the_sink(server: socket.socket) -> None:
    """With journald's queue full and nobody reading, a write waits STALL_WAIT_S once, then
    drops at once for STALL_BACKOFF_S: writes return False and count drops, never raise,
    never hold the caller long, and the sink stays up."""
    sink = JournaldSink(server.getsockname())
    started = time.monotonic()
    results = [sink.write(SEED) for _ in range(2000)]  # nobody reads: the queue fills
    took = time.monotonic() - started
    sink.close()
    assert results.count(False) == sink.dropped > 0
    assert sink.up
    assert STALL_WAIT_S <= took < STALL_WAIT_S + 0.5


def test_a_busy_journald_is_waited_for_not_dropped(server: socket.socket) -> None:
    """A reader slower than the writer, but reading: every record arrives, none dropped."""
    sink = JournaldSink(server.getsockname())
    got: list[bytes] = []

    def slow_reader() -> None:
        while len(got) < 3000:
            got.append(server.recv(65536))
            if len(got) % 100 == 0:
                time.sleep(0.005)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    results = [sink.write(SEED) for _ in range(3000)]
    reader.join(30)
    sink.close()
    assert (results.count(True), sink.dropped, len(got)) == (3000, 0, 3000)


# -- NullSink and Fanout -----------------------------------------------------------------


def test_null_sink_takes_everything_and_writes_nothing() -> None:
    """A disabled sink accepts records and never counts a drop."""
    sink = NullSink("journald")
    assert sink.write(SEED)
    sink.reopen()
    sink.close()
    assert (sink.name, sink.up, sink.dropped) == ("journald", True, 0)


class Recorder:
    """A sink that keeps what it gets and refuses what `refuse` says."""

    def __init__(self, name: str, refuse: bool = False) -> None:
        self.name = name
        self.up = True
        self.dropped = 0
        self.records: list[AccessRecord] = []
        self.reopened = 0
        self.closed = 0
        self.refuse = refuse

    def write(self, r: AccessRecord) -> bool:
        if self.refuse:
            self.dropped += 1
            return False
        self.records.append(r)
        return True

    def reopen(self) -> None:
        self.reopened += 1

    def close(self) -> None:
        self.closed += 1


def test_fanout_gives_every_record_to_every_sink() -> None:
    """Each sink gets every record whatever the others do; drops are counted per sink."""
    ok, refusing = Recorder("file"), Recorder("journald", refuse=True)
    fanout = Fanout([ok, refusing])
    fanout.write(SEED)
    fanout.write(FAILED)
    fanout.reopen()
    fanout.close()
    assert ok.records == [SEED, FAILED]
    assert [(s.name, s.dropped) for s in fanout.sinks] == [("file", 0), ("journald", 2)]
    assert (ok.reopened, ok.closed, refusing.reopened, refusing.closed) == (1, 1, 1, 1)


def test_fanout_exports_only_enabled_sinks() -> None:
    """NullSinks are left out of `sinks`, so a disabled sink has no up/dropped series."""
    file_sink: Sink = Recorder("file")
    fanout = Fanout([file_sink, NullSink("journald")])
    assert [s.name for s in fanout.sinks] == ["file"]
