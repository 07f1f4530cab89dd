"""Command line: `kmeshd run | check-config | load | accesslog | sweep-sockets | --version`.

The ONLY place that maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kmeshd import __version__
from kmeshd.config import DEFAULT_CONFIG_PATH, Config, load_config, load_config_leniently
from kmeshd.errors import ConfigError, KmeshdError, UnavailableError

if TYPE_CHECKING:
    from kmeshd.identity.sources import IdentitySource

EX_OK = 0
EX_UNAVAILABLE = 69
EX_CONFIG = 78
SOURCE_TABLES = ("identity", "kubernetes")  # config tables that say where identities come from

log = logging.getLogger("kmeshd")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kmeshd", description="Node-level TCP telemetry: Kmesh L4 metrics and access logs."
    )
    p.add_argument("--version", action="version", version=f"kmeshd {__version__}")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, help_text in (
        ("run", "run the daemon in the foreground (what systemd starts)"),
        (
            "check-config",
            "make every check `run` makes before it touches the kernel, changing nothing;"
            " exit 0, 78 (config) or 69 (host)",
        ),
        (
            "sweep-sockets",
            "forget the state of sockets that closed while kmeshd was stopped (needs"
            " CAP_SYS_ADMIN and CAP_SYS_PTRACE; `kmeshd load` does it before each start)",
        ),
    ):
        verb = verbs.add_parser(name, help=help_text)
        verb.add_argument(
            "--config",
            type=Path,
            default=None,
            help=f"config file (default {DEFAULT_CONFIG_PATH})",
        )
    add_load(verbs)
    add_accesslog(verbs)
    return p


def add_load(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = verbs.add_parser(
        "load",
        help="compile the probe, attach it and pin it for `run` (the unit's privileged"
        " ExecStartPre=; needs root)",
        description="Make every check `run` makes, then compile the probe, forget sockets"
        " that closed while kmeshd was stopped, attach the probe and pin its maps and links"
        " under bpf.pin_dir, where `run` opens them without the privileges this takes.",
    )
    a.add_argument(
        "--config", type=Path, default=None, help=f"config file (default {DEFAULT_CONFIG_PATH})"
    )
    a.add_argument(
        "--user",
        metavar="USER",
        help="hand the pins to USER, the user `kmeshd run` runs as (the unit's: kmeshd)",
    )


def add_accesslog(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = verbs.add_parser(
        "accesslog",
        help="read access logs back from journald",
        description="Print the access records kmeshd wrote to journald, oldest first. "
        "Filters combine with AND. Needs read access to the journal: root, or a member "
        "of the systemd-journal group.",
    )
    # journalctl's relative times start with "-" ("-1h", "-2d"): read them as values, as
    # argparse reads negative numbers, so that `--since -1h` works as documented.
    a._negative_number_matcher = re.compile(r"-\.?[0-9]")
    a.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    a.add_argument(
        "--since",
        metavar="TIME",
        type=since_time,
        help='journalctl syntax: "-1h", "today", ...',
    )
    a.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default="text",
        help="text: the seed's line (default); json: the access-log file's objects",
    )
    a.add_argument("--src-workload", metavar="POD", help="source instance (pod) name")
    a.add_argument("--dst-workload", metavar="POD", help="destination instance (pod) name")
    a.add_argument("--namespace", metavar="NS", help="source or destination namespace")
    a.add_argument(
        "--service",
        metavar="NAME",
        help="destination service: its hostname, or the hostname's first label",
    )
    a.add_argument(
        "--direction",
        choices=("inbound", "outbound"),
        type=str.lower,
        help="the reporting side: inbound (server) or outbound (client)",
    )
    a.add_argument("--failed", action="store_true", help="only connects that failed")
    a.add_argument(
        "-D",
        "--directory",
        metavar="DIR",
        help="read the journal files in DIR (journalctl -D), not the system journal",
    )


def since_time(text: str) -> str:
    """--since, checked as journalctl will parse it: a bad one is a usage error (exit 2)."""
    from kmeshd.accesslog.query import since_problem, systemd_parses

    problem = since_problem(text, systemd_parses)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def accesslog(args: argparse.Namespace) -> int:
    from kmeshd.accesslog.query import Filters, show

    filters = Filters(
        src_workload=args.src_workload,
        dst_workload=args.dst_workload,
        namespace=args.namespace,
        service=args.service,
        direction=args.direction,
        failed=args.failed,
        since=args.since,
        follow=args.follow,
        directory=args.directory,
    )
    status = show(filters, args.output, sys.stdout)
    if status == 0:
        return EX_OK
    # journalctl said why on stderr; keep its status, but never collide with ours.
    return status if status not in (EX_UNAVAILABLE, EX_CONFIG) else 1


def read_config(path: Path | None) -> Config:
    return load_config(path or DEFAULT_CONFIG_PATH, explicit=path is not None)


# The files `run` writes, by the key that names each: (value, set in the file).
WRITTEN: dict[str, Callable[[Config], tuple[str, bool]]] = {
    "accesslog.file": lambda c: (c.accesslog.file, c.accesslog.file_explicit),
    "metrics.textfile": lambda c: (c.metrics.textfile, c.metrics.textfile_explicit),
    "metrics.state_file": lambda c: (c.metrics.state_file, c.metrics.state_file_explicit),
}


def host_problems(config: Config, bad_keys: list[str]) -> tuple[list[str], list[str]]:
    """(config problems, host problems) of what `run` needs of the host before it touches
    the kernel, found without changing anything: the files it writes can be written, the
    cgroup is one, the pin directory is on a bpf filesystem. Keys in `bad_keys` already
    have a problem: their stand-in defaults are not checked."""
    from kmeshd.export.webaccess import open_access
    from kmeshd.files import writable_problem
    from kmeshd.kernel import cgroup, pins

    problems, host = [], []
    for key, setting in WRITTEN.items():
        value, explicit = setting(config)
        if value in ("", "-") or key in bad_keys:
            continue
        if (problem := writable_problem(Path(value), explicit, key)) is not None:
            problems.append(f"{config.path}: {key}: {problem}")
    if "bpf.cgroup" not in bad_keys:
        try:
            cgroup.directory(config.bpf.cgroup, f"{config.path}: bpf.cgroup")
        except ConfigError as exc:
            problems.extend(exc.problems)
        except UnavailableError as exc:
            host.append(str(exc))
    if "metrics.web_config" not in bad_keys:
        try:
            open_access(config)  # metrics.web_config and the certificates it names
        except ConfigError as exc:
            problems.extend(exc.problems)
    pin_dir = Path(config.bpf.pin_dir)
    if "bpf.pin_dir" not in bad_keys and not pins.is_bpffs(pin_dir):
        host.append(
            f"{pin_dir} is not on a BPF filesystem: mount one (mount -t bpf bpf /sys/fs/bpf)"
            " or set bpf.pin_dir; under kmeshd.service the directory itself must exist"
            " before the start (systemd-tmpfiles --create kmeshd.conf makes the default one)"
        )
    return problems, host


def preflight(config: Config, bad_keys: list[str]) -> IdentitySource | None:
    """Every check `run` makes before it touches the kernel, `check-config`'s and `run`'s
    alike, writing nothing: the host's files and the identity source, opened (not
    started; None where the config's own keys for it are bad). ConfigError with every
    problem, else UnavailableError for what the host lacks."""
    from kmeshd.identity.sources import open_source

    problems, host = host_problems(config, bad_keys)
    source = None
    if not any(key.split(".")[0] in SOURCE_TABLES for key in bad_keys):
        try:
            source = open_source(config)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems or host:
        if source is not None:
            source.close()
        if problems:
            raise ConfigError(problems)
        raise UnavailableError("; ".join(host))
    return source


def check_config(path: Path | None) -> int:
    """Every problem of the config, of the inventory (or credentials) it names and of the
    host's paths, at once; nothing is written."""
    config, problems = load_config_leniently(path or DEFAULT_CONFIG_PATH, explicit=path is not None)
    try:
        source = preflight(config, problems.keys)
    except ConfigError as exc:
        problems.lines.extend(exc.problems)
    except UnavailableError:
        problems.raise_if_any()  # the file's own problems first: exit 78
        raise
    else:
        if source is not None:
            source.close()
    problems.raise_if_any()
    print(f"{config.path}: ok")
    return EX_OK


def sweep_sockets(path: Path | None) -> int:
    from kmeshd.kernel.stale import NOT_PINNED, sweep_pinned

    config = read_config(path)
    pins = Path(config.bpf.pin_dir)
    try:
        swept = sweep_pinned(pins)
    except OSError as exc:
        raise UnavailableError(f"cannot open the pinned socket map: {exc}") from exc
    if swept == NOT_PINNED:
        print(f"{pins}: no kmeshd maps pinned there; nothing to sweep")
    elif swept is None:  # the warning said why; the state is kept, which is safe
        print(f"{pins}: swept nothing: the live sockets could not all be listed")
    else:
        print(f"{pins}: forgot {swept} sockets that closed while kmeshd was stopped")
    return EX_OK


def owner_of(user: str | None) -> tuple[int, int] | None:
    """The uid and primary gid of `user` (None: keep root's)."""
    import pwd

    if user is None:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise UnavailableError(
            f"there is no user {user!r}: create it (the package does, with systemd-sysusers)"
            " or name another with --user"
        ) from None
    return entry.pw_uid, entry.pw_gid


def load_probe(path: Path | None, user: str | None) -> int:
    from kmeshd.kernel.load import load
    from kmeshd.kernel.probe import HostKernel

    config = read_config(path)
    owner = owner_of(user)
    source = preflight(config, [])
    if source is not None:
        source.close()
    cgroup_dir = HostKernel().cgroup(config)
    bpf = config.bpf
    pins, swept = load(
        Path(bpf.pin_dir), cgroup_dir, sweep=bpf.live_updates, max_flows=bpf.max_flows, owner=owner
    )
    forgot = "" if swept is None else f"; forgot {swept} sockets that closed while it was not"
    print(f"probe attached to {cgroup_dir} and pinned in {pins}{forgot}")
    return EX_OK


def run(path: Path | None) -> int:
    from kmeshd.daemon import Daemon
    from kmeshd.identity.sources import open_source
    from kmeshd.kernel.probe import HostKernel

    config = read_config(path)
    checked = [preflight(config, [])]

    def open_first(cfg: Config, previous: IdentitySource | None) -> IdentitySource:
        # The source the checks opened is the one start-up uses: the inventory is read
        # once. A reload opens its own.
        source = checked.pop() if checked and previous is None else None
        return source or open_source(cfg, previous)

    daemon = Daemon(config, HostKernel(), open_first)
    daemon.install_signals()
    try:
        daemon.startup()
        daemon.run()
    finally:
        daemon.shutdown()
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    faulthandler.enable()  # a watchdog abort leaves a traceback in the journal
    try:
        if args.verb == "check-config":
            return check_config(args.config)
        if args.verb == "accesslog":
            return accesslog(args)
        if args.verb == "sweep-sockets":
            return sweep_sockets(args.config)
        if args.verb == "load":
            return load_probe(args.config, args.user)
        return run(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    except UnavailableError as exc:
        print(f"kmeshd: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except KmeshdError as exc:  # pragma: no cover - every error has a subclass above
        print(f"kmeshd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
