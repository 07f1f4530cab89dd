"""Command line: `kmeshd run | check-config | accesslog | sweep-sockets | --version`.

The ONLY place that maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kmeshd import __version__
from kmeshd.config import DEFAULT_CONFIG_PATH, Config, load_config, load_config_leniently
from kmeshd.errors import ConfigError, KmeshdError, UnavailableError

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
        ("check-config", "validate the config and inventory; exit 0 or 78"),
        (
            "sweep-sockets",
            "forget the state of sockets that closed while kmeshd was stopped (needs"
            " CAP_SYS_ADMIN and CAP_SYS_PTRACE; the unit runs it after each start)",
        ),
    ):
        verb = verbs.add_parser(name, help=help_text)
        verb.add_argument(
            "--config",
            type=Path,
            default=None,
            help=f"config file (default {DEFAULT_CONFIG_PATH})",
        )
    add_accesslog(verbs)
    return p


def add_accesslog(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = verbs.add_parser(
        "accesslog",
        help="read access logs back from journald",
        description="Print the access records kmeshd wrote to journald, oldest first. "
        "Filters combine with AND. Needs read access to the journal: root, or a member "
        "of the systemd-journal group.",
    )
    a.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    a.add_argument("--since", metavar="TIME", help='journalctl syntax: "-1h", "today", ...')
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


def check_config(path: Path | None) -> int:
    """Every problem of the config and of the inventory (or credentials) it names, at once;
    the identity source is checked only where the config's own keys for it are valid."""
    from kmeshd.export.webaccess import open_access
    from kmeshd.identity.sources import check_source

    config, problems = load_config_leniently(path or DEFAULT_CONFIG_PATH, explicit=path is not None)
    if not any(key.split(".")[0] in SOURCE_TABLES for key in problems.keys):
        try:
            check_source(config)
        except ConfigError as exc:
            problems.lines.extend(exc.problems)
    try:
        open_access(config)  # metrics.web_config and the certificates it names
    except ConfigError as exc:
        problems.lines.extend(exc.problems)
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


def run(path: Path | None) -> int:
    from kmeshd.daemon import Daemon
    from kmeshd.identity.sources import open_source
    from kmeshd.kernel.probe import HostKernel

    daemon = Daemon(read_config(path), HostKernel(), open_source)
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
