"""The IO end of the access-log chain: sinks that write rendered AccessRecords.

    Sink (protocol)   name, up, dropped; write(r) -> bool, reopen(), close()
     ├── NullSink      a disabled sink, chosen once at start-up: takes records, writes nothing
     ├── FileSink      JSON lines through python-json-logger, to a file or "-" (stdout)
     └── JournaldSink  journald's native protocol on its datagram socket (memfd when large)
    Fanout            every record to every sink; `sinks` lists the enabled ones for export
    open_sinks()      the sinks a config asks for

write() never raises: a record a sink cannot take is dropped and counted in `dropped`
(kmeshd_accesslog_records_dropped_total{sink}), `up` says whether the destination works
(kmeshd_sink_up{sink}), and problems are logged through the "kmeshd" logger at most once
a minute per sink. Rendering lives in accesslog.render; nothing here decides content.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import select
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Protocol

from kmeshd.accesslog.render import AccessRecord, fields, journal_fields
from kmeshd.config import Config
from kmeshd.errors import ConfigError
from kmeshd.files import prepare_directory
from kmeshd.ratelimit import LOG_EVERY_S, Throttle

try:  # python-json-logger >= 3.1
    from pythonjsonlogger.json import JsonFormatter
except ImportError:  # 2.0.x, Debian bookworm's python3-pythonjsonlogger
    from pythonjsonlogger.jsonlogger import JsonFormatter

log = logging.getLogger("kmeshd")

JOURNAL_SOCKET = "/run/systemd/journal/socket"
RECONNECT_EVERY_S = 5.0  # how often a down journald sink looks for the socket again


class Sink(Protocol):
    name: str
    up: bool
    dropped: int  # cumulative records this sink could not take

    def write(self, r: AccessRecord) -> bool:
        """Write one record; False = dropped (and already counted). Never raises."""
        ...

    def reopen(self) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """A disabled sink: every record is accepted and goes nowhere."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.up = True
        self.dropped = 0

    def write(self, r: AccessRecord) -> bool:
        return True

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


# -- file --------------------------------------------------------------------------------


# python-json-logger's serializer (its encoder, ensure_ascii off so "850µs" stays
# readable), called directly: a LogRecord and the logging machinery per access record
# cost more than rendering it.
_JSON = JsonFormatter(json_ensure_ascii=False)


def _write_some(stream: IO[bytes], data: bytes) -> int:
    n = stream.write(data)
    if n is None:  # a non-blocking raw stream that would block
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    return n


class _LineWriter:
    """Writes each line whole to the stream it is given. Errors propagate to the caller."""

    def __init__(self) -> None:
        self.stream: IO[bytes] | None = None
        self._torn = False  # an error cut the last line short

    def write_line(self, text: str) -> None:
        if self.stream is None:
            raise OSError(errno.EBADF, "access log file is not open")
        line = (text + "\n").encode()
        if self._torn:  # end the fragment first: only that one line is unreadable
            line = b"\n" + line
        done = 0
        try:
            while done < len(line):  # a raw file may take less than all of it
                done += _write_some(self.stream, line[done:])
            self.stream.flush()
        finally:
            self._torn = done < len(line) and (done > 0 or self._torn)


def _open_0640(path: str, flags: int) -> int:
    """Open, creating the file 0640 whatever the umask (the unit's is 0077): kmeshd writes,
    group adm (Debian's log readers: the unit's Group=) reads, nobody else, for records
    name addresses and workloads. An existing file keeps the mode it has, and must be a
    regular one: a FIFO or a device put there would block or swallow every write (opened
    non-blocking, so even a FIFO with no reader fails at once)."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_EXCL | os.O_NONBLOCK, 0o640)
    except FileExistsError:
        not_regular = OSError(errno.EINVAL, "not a regular file (remove it)", path)
        try:
            fd = os.open(path, (flags & ~os.O_CREAT) | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ENXIO:  # a FIFO nobody reads
                raise not_regular from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise not_regular from None
    else:
        os.fchmod(fd, 0o640)
    os.set_blocking(fd, True)
    return fd


class FileSink:
    """JSON lines appended to `path`, or to standard output for "-".

    The file is opened at construction (an OSError there is a start-up problem for the
    caller); afterwards nothing raises: write errors are counted as drops and mark the sink
    down until a write succeeds again, and a file that cannot be reopened is retried on
    each write. reopen() follows logrotate: close, open the path anew.
    """

    def __init__(
        self,
        path: str,
        *,
        stdout: IO[bytes] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "file",
    ) -> None:
        self.name = name
        self.path = path
        self.up = True
        self.dropped = 0
        self._stdout = stdout if stdout is not None else sys.stdout.buffer
        self._throttle = Throttle(LOG_EVERY_S, clock)
        self._writer = _LineWriter()
        self._writer.stream = self._open()

    def _open(self) -> IO[bytes]:
        if self.path == "-":
            return self._stdout
        # Unbuffered: each line is one write(2) on an O_APPEND file, and a failed write
        # leaves nothing in a buffer to resurface later.
        return open(self.path, "ab", buffering=0, opener=_open_0640)

    def write(self, r: AccessRecord) -> bool:
        try:
            if self._writer.stream is None:
                self._writer.stream = self._open()
            self._writer.write_line(_JSON.jsonify_log_record(fields(r)))
        except (OSError, ValueError) as exc:  # ValueError: a closed stream, unencodable text
            self.dropped += 1
            self._set_down(exc)
            return False
        self._set_up()
        return True

    def reopen(self) -> None:
        if self.path == "-":
            return
        self._close_stream()
        try:
            self._writer.stream = self._open()
        except OSError as exc:
            self._set_down(exc)

    def close(self) -> None:
        self._close_stream()

    def _close_stream(self) -> None:
        stream, self._writer.stream = self._writer.stream, None
        if stream is None:
            return
        try:
            if stream is self._stdout:
                stream.flush()
            else:
                stream.close()
        except (OSError, ValueError) as exc:
            self._set_down(exc)

    def _set_down(self, exc: BaseException) -> None:
        self.up = False
        if self._throttle.ready():
            log.error(
                "access log %s: %s; %d records dropped so far",
                self._where(),
                exc,
                self.dropped,
            )

    def _set_up(self) -> None:
        if not self.up:
            self.up = True
            if self._throttle.ready():
                log.warning("access log %s: writing again", self._where())

    def _where(self) -> str:
        return "standard output" if self.path == "-" else self.path


# -- journald ----------------------------------------------------------------------------


def encode_native(entry: Mapping[str, str]) -> bytes:
    """One journal entry in journald's native protocol: "KEY=value\\n" per field, and for a
    value containing a newline "KEY\\n" + its length (u64 little endian) + value + "\\n"."""
    parts = []
    for key, value in entry.items():
        name, data = key.encode("ascii"), value.encode()
        if b"\n" in data:
            parts.append(name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name + b"=" + data + b"\n")
    return b"".join(parts)


_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def send_memfd(sock: socket.socket, payload: bytes) -> None:
    """An entry too large for one datagram: write it to a sealed memfd and pass the fd in an
    empty datagram (SCM_RIGHTS), as sd_journal_sendv() does. journald wants the seals."""
    fd = os.memfd_create("kmeshd-accesslog", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        done = 0
        while done < len(payload):
            done += os.write(fd, payload[done:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    finally:
        os.close(fd)


SNDBUF = 8 * 1024 * 1024  # what sd-journal asks for
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # <asm-generic/socket.h>


def journal_socket() -> socket.socket:
    """A non-blocking datagram socket with sd-journal's 8 MiB send buffer: datagrams are
    charged to the sender until journald reads them, so a small buffer would turn a burst
    of records into EAGAIN drops long before journald's queue is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, SNDBUF)  # root: past wmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)  # capped at wmem_max
    return sock


# send() errors meaning journald is not there (socket gone, nobody listening, restarted).
_GONE = {errno.ENOENT, errno.ECONNREFUSED, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE}


STALL_WAIT_S = 0.2  # how long a record waits for a busy journald to take it
STALL_BACKOFF_S = 1.0  # after a wait that ran out: drop at once this long, then wait again


class JournaldSink:
    """Journal entries (see accesslog.render.journal_fields) sent to journald's native socket.

    journald's socket queue fills for a moment in a burst (its datagram queue holds a few
    hundred entries): a send that finds it full (EAGAIN) waits, up to STALL_WAIT_S, for
    room. Only when journald takes nothing for that long is the record dropped, counted,
    and for STALL_BACKOFF_S later records are dropped at once, so a journald that cannot
    keep up costs counted records, never the main loop's ticks. With no journald the sink
    is down, warns once, counts every record as dropped and looks for the socket again at
    most every RECONNECT_EVERY_S, so it recovers when journald appears.
    """

    def __init__(
        self,
        socket_path: str = JOURNAL_SOCKET,
        *,
        clock: Callable[[], float] = time.monotonic,
        reconnect_every: float = RECONNECT_EVERY_S,
        name: str = "journald",
    ) -> None:
        self.name = name
        self.socket_path = socket_path
        self.up = False
        self.dropped = 0
        self._clock = clock
        self._reconnect_every = reconnect_every
        self._next_connect = clock()
        self._sock: socket.socket | None = None
        self._warned_down = False
        self._throttle = Throttle(LOG_EVERY_S, clock)
        self._stalled_until = 0.0  # before this, a full queue drops the record at once
        self._connect()

    def _connect(self) -> socket.socket | None:
        now = self._clock()
        if now < self._next_connect:
            return None
        self._next_connect = now + self._reconnect_every
        sock = journal_socket()
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            self._set_down(exc)
            return None
        self._sock = sock
        self._set_up()
        return sock

    def write(self, r: AccessRecord) -> bool:
        try:
            payload = encode_native(journal_fields(r))
            sock = self._sock or self._connect()
            if sock is None:
                self.dropped += 1
                return False
            self._send(sock, payload)
        except OSError as exc:
            self.dropped += 1
            if exc.errno in _GONE:
                self._disconnect()
                self._next_connect = self._clock()  # journald may be back already: retry now
                self._set_down(exc)
            elif self._throttle.ready():
                log.warning("journald: %s; %d records dropped so far", exc, self.dropped)
            return False
        except ValueError as exc:  # text that cannot be encoded: this record only
            self.dropped += 1
            if self._throttle.ready():
                log.warning("journald: %s; %d records dropped so far", exc, self.dropped)
            return False
        return True

    def _send(self, sock: socket.socket, payload: bytes) -> None:
        while True:
            try:
                sock.send(payload)
                return
            except BlockingIOError:  # journald's queue is full for now: wait for room
                if not self._room(sock):
                    raise
            except OSError as exc:
                # Too large for a datagram, or for the kernel to allocate as one: like
                # sd_journal_sendv(), pass it in a memfd.
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                send_memfd(sock, payload)
                return

    def _room(self, sock: socket.socket) -> bool:
        """Whether journald made room for another entry within STALL_WAIT_S (not waited
        for while it is known to be stalled)."""
        now = self._clock()
        if now < self._stalled_until:
            return False
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        if poller.poll(STALL_WAIT_S * 1000):
            return True
        self._stalled_until = now + STALL_BACKOFF_S
        return False

    def reopen(self) -> None:
        """Connect anew (a restarted journald has a new socket)."""
        self._disconnect()
        self._next_connect = self._clock()
        self._connect()

    def close(self) -> None:
        self._disconnect()

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _set_down(self, exc: OSError) -> None:
        self.up = False
        if not self._warned_down and self._throttle.ready():
            self._warned_down = True  # until the recovery is logged: the two come in pairs
            log.warning(
                "journald not reachable at %s (%s): access records to journald are dropped "
                "and counted until it is",
                self.socket_path,
                exc.strerror or exc,
            )

    def _set_up(self) -> None:
        if self._warned_down:
            self._warned_down = False
            log.warning("journald reachable again at %s", self.socket_path)
        self.up = True


# -- fan-out -----------------------------------------------------------------------------


class Fanout:
    """Every record to every sink. `sinks` holds the enabled ones (NullSinks are left out:
    a disabled sink has no state worth exporting) for kmeshd_sink_up / records_dropped.
    One Fanout lives as long as the daemon: a reload replaces the sinks inside it, and the
    drops of the sinks it retires stay counted (`dropped`), since counters never go down."""

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.sinks: tuple[Sink, ...] = ()
        self._retired: dict[str, int] = {}  # sink name -> drops of sinks replaced
        self.replace(sinks)

    def write(self, r: AccessRecord) -> None:
        for sink in self.sinks:
            sink.write(r)

    def dropped(self, sink: Sink) -> int:
        """Records dropped by `sink` and by the sinks of its name it replaced."""
        return sink.dropped + self._retired.get(sink.name, 0)

    def replace(self, sinks: Iterable[Sink]) -> None:
        """Close the running sinks and use `sinks` from now on."""
        for old in self.sinks:
            self._retired[old.name] = self.dropped(old)
            old.close()
        self.sinks = tuple(s for s in sinks if not isinstance(s, NullSink))

    def reopen(self) -> None:
        for sink in self.sinks:
            sink.reopen()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_sinks(config: Config) -> list[Sink]:
    """The sinks `config` asks for, opened (ConfigError for an unusable access-log file)."""
    file_sink: Sink = NullSink("file")
    if config.accesslog.file:
        if config.accesslog.file != "-":
            path = Path(config.accesslog.file)
            explicit = config.accesslog.file_explicit
            prepare_directory(path, explicit, config.path, "accesslog.file", mode=0o750)
        try:
            file_sink = FileSink(config.accesslog.file)
        except OSError as exc:
            problem = f"cannot open {config.accesslog.file}: {exc.strerror}"
            raise ConfigError([f"{config.path}: accesslog.file: {problem}"]) from exc
    journal: Sink = JournaldSink() if config.accesslog.journald else NullSink("journald")
    return [file_sink, journal]
