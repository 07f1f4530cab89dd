"""kmeshd.config: kmeshd.toml -> frozen dataclasses, every problem as `file: key: problem`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from kmeshd.config import (
    DEFAULT_CONFIG_PATH,
    AccessLogConfig,
    BpfConfig,
    Config,
    IdentityConfig,
    KubernetesConfig,
    MetricsConfig,
    load_config,
    parse_config,
    parse_duration,
    parse_listen,
)
from kmeshd.errors import ConfigError

P = DEFAULT_CONFIG_PATH
ETC = Path(__file__).resolve().parent.parent / "etc"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, P)
    return e.value.problems


def value(config: Config, dotted: str) -> object:
    table, key = dotted.split(".")
    return getattr(getattr(config, table), key)


def test_empty_file_is_all_defaults() -> None:
    """An empty file is valid and means every default."""
    assert parse_config("", P) == Config(path=P)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("identity.source", "inventory"),
        ("identity.inventory", Path("/etc/kmeshd/inventory.toml")),
        ("identity.inventory_explicit", False),
        ("kubernetes.kubeconfig", ""),
        ("kubernetes.node_name", ""),
        ("kubernetes.kubelet_url", "https://127.0.0.1:10250"),
        ("kubernetes.kubelet_token_file", ""),
        ("kubernetes.kubelet_ca_file", ""),
        ("kubernetes.kubelet_interval", 10.0),
        ("kubernetes.cluster", "Kubernetes"),
        ("kubernetes.trust_domain", "cluster.local"),
        ("kubernetes.cluster_domain", "cluster.local"),
        ("metrics.listen", "127.0.0.1:15020"),
        ("metrics.textfile", "/var/lib/prometheus/node-exporter/kmeshd.prom"),
        ("metrics.interval", 5.0),
        ("metrics.connection_security_policy", "unknown"),
        ("metrics.textfile_explicit", False),
        ("metrics.web_config", ""),
        ("accesslog.file", "/var/log/kmeshd/accesslog.json"),
        ("accesslog.journald", True),
        ("accesslog.max_rate", 1000),
        ("accesslog.periodic", 0.0),
        ("accesslog.file_explicit", False),
        ("bpf.cgroup", "auto"),
        ("bpf.pin_dir", "/sys/fs/bpf/kmeshd"),
        ("bpf.live_updates", True),
    ],
)
def test_default(key: str, expected: object) -> None:
    """Each key's default is the one kmeshd.toml(5) documents."""
    assert value(parse_config("", P), key) == expected


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ('[identity]\nsource = "kubernetes"', "identity.source", "kubernetes"),
        ('[identity]\ninventory = "/srv/inv.toml"', "identity.inventory", Path("/srv/inv.toml")),
        ('[identity]\ninventory = "/srv/inv.toml"', "identity.inventory_explicit", True),
        (
            '[kubernetes]\nkubeconfig = "/root/.kube/config"',
            "kubernetes.kubeconfig",
            "/root/.kube/config",
        ),
        ('[kubernetes]\nnode_name = "node-1"', "kubernetes.node_name", "node-1"),
        ('[kubernetes]\nkubelet_url = ""', "kubernetes.kubelet_url", ""),
        (
            '[kubernetes]\nkubelet_url = "http://127.0.0.1:10255"',
            "kubernetes.kubelet_url",
            "http://127.0.0.1:10255",
        ),
        ('[kubernetes]\nkubelet_token_file = "/t"', "kubernetes.kubelet_token_file", "/t"),
        ('[kubernetes]\nkubelet_ca_file = "/ca.crt"', "kubernetes.kubelet_ca_file", "/ca.crt"),
        ('[kubernetes]\nkubelet_interval = "30s"', "kubernetes.kubelet_interval", 30.0),
        ('[kubernetes]\ncluster = "prod"', "kubernetes.cluster", "prod"),
        ('[kubernetes]\ntrust_domain = "example.org"', "kubernetes.trust_domain", "example.org"),
        ('[kubernetes]\ncluster_domain = "k8s.local"', "kubernetes.cluster_domain", "k8s.local"),
        ('[metrics]\nlisten = ""', "metrics.listen", ""),
        ('[metrics]\nlisten = "[::]:9100"', "metrics.listen", "[::]:9100"),
        ('[metrics]\ntextfile = ""', "metrics.textfile", ""),
        ('[metrics]\ntextfile = ""', "metrics.textfile_explicit", True),
        ('[metrics]\ntextfile = "/run/k.prom"', "metrics.textfile", "/run/k.prom"),
        ('[metrics]\ninterval = "250ms"', "metrics.interval", 0.25),
        (
            '[metrics]\nconnection_security_policy = "mutual_tls"',
            "metrics.connection_security_policy",
            "mutual_tls",
        ),
        (
            '[metrics]\nweb_config = "/etc/kmeshd/web.yml"',
            "metrics.web_config",
            "/etc/kmeshd/web.yml",
        ),
        ('[accesslog]\nfile = "-"', "accesslog.file", "-"),
        ('[accesslog]\nfile = ""', "accesslog.file", ""),
        ('[accesslog]\nfile = "/tmp/a.json"', "accesslog.file", "/tmp/a.json"),
        ('[accesslog]\nfile = "/tmp/a.json"', "accesslog.file_explicit", True),
        ("[accesslog]\njournald = false", "accesslog.journald", False),
        ("[accesslog]\nmax_rate = 0", "accesslog.max_rate", 0),
        ("[accesslog]\nmax_rate = 20000", "accesslog.max_rate", 20000),
        ('[accesslog]\nperiodic = ""', "accesslog.periodic", 0.0),
        ('[accesslog]\nperiodic = "5m"', "accesslog.periodic", 300.0),
        ('[bpf]\ncgroup = "/sys/fs/cgroup/kubepods"', "bpf.cgroup", "/sys/fs/cgroup/kubepods"),
        ('[bpf]\npin_dir = "/sys/fs/bpf/other"', "bpf.pin_dir", "/sys/fs/bpf/other"),
        ("[bpf]\nlive_updates = false", "bpf.live_updates", False),
        ('metrics = { interval = "1m" }', "metrics.interval", 60.0),
    ],
)
def test_each_key(toml: str, key: str, expected: object) -> None:
    """A key set in the file takes that value; its *_explicit flag says it was set."""
    assert value(parse_config(toml, P), key) == expected


def test_a_key_set_to_its_default_is_explicit() -> None:
    """Writing the default value still counts as set: then a missing path is an error."""
    text = '[identity]\ninventory = "/etc/kmeshd/inventory.toml"'
    assert parse_config(text, P).identity == IdentityConfig(inventory_explicit=True)


def test_config_is_frozen() -> None:
    """The parsed config cannot be changed by whoever holds it."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_config("", P).metrics.interval = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h2m3s", 3723.0),
        ("1.5s", 1.5),
        ("100ms", 0.1),
        ("500us", 0.0005),
        ("500µs", 0.0005),
        ("1ns", 1e-9),
        ("+2s", 2.0),
    ],
)
def test_duration(text: str, seconds: float) -> None:
    """Durations take Go's units, decimals and compounds, and are exact."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("5 s", '"5 s" is not a duration (use a number with a unit: 250ms, 5s, 1m)'),
        ("5", '"5" is not a duration (use a number with a unit: 250ms, 5s, 1m)'),
        ("", '"" is not a duration (use a number with a unit: 250ms, 5s, 1m)'),
        ("s", '"s" is not a duration (use a number with a unit: 250ms, 5s, 1m)'),
        ("5d", '"5d" is not a duration (use a number with a unit: 250ms, 5s, 1m)'),
        ("5S", '"5S" is not a duration (use a number with a unit: 250ms, 5s, 1m)'),
        ("1m30", '"1m30" is not a duration (use a number with a unit: 250ms, 5s, 1m)'),
        (".5s", '".5s" is not a duration (use a number with a unit: 250ms, 5s, 1m)'),
        ("0s", '"0s" must be more than 0'),
        ("0ms0s", '"0ms0s" must be more than 0'),
        ("-5s", '"-5s" must be more than 0'),
    ],
)
def test_bad_duration(text: str, problem: str) -> None:
    """A duration without a unit, with an unknown unit, or not above zero is refused."""
    with pytest.raises(ValueError) as e:
        parse_duration(text)
    assert str(e.value) == problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:15020", ("127.0.0.1", 15020)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:15020", ("::1", 15020)),
        ("[::]:65535", ("::", 65535)),
        ("[fd00::11]:80", ("fd00::11", 80)),
        ("localhost:9100", ("localhost", 9100)),
        ("node-1.example.com.:15020", ("node-1.example.com.", 15020)),
    ],
)
def test_listen(text: str, expected: tuple[str, int]) -> None:
    """A listen address is host:port or [IPv6]:port, with a name or an IP literal."""
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("127.0.0.1", '"127.0.0.1" has no port (use host:port, such as 127.0.0.1:15020)'),
        ("localhost", '"localhost" has no port (use host:port, such as 127.0.0.1:15020)'),
        ("[::1]", '"[::1]" has no port (use host:port, such as 127.0.0.1:15020)'),
        ("127.0.0.1:", '"" is not a port number'),
        ("127.0.0.1:http", '"http" is not a port number'),
        ("127.0.0.1:-1", '"-1" is not a port number'),
        ("127.0.0.1:0", "port 0 is out of range (1-65535)"),
        ("[::1]:65536", "port 65536 is out of range (1-65535)"),
        (":15020", '":15020" has no host (use 0.0.0.0 or [::] for all addresses)'),
        ("[]:15020", '"[]:15020" has no host (use 0.0.0.0 or [::] for all addresses)'),
        ("::1:80", '"::1:80" is ambiguous (write IPv6 addresses in brackets: [::1]:80)'),
        ("[10.0.0.1]:80", '"10.0.0.1" is not an IPv6 address'),
        ("10.0.0.300:80", '"10.0.0.300" is not an IP address or host name'),
        ("bad_host:80", '"bad_host" is not an IP address or host name'),
        ("-host:80", '"-host" is not an IP address or host name'),
        ("a..b:80", '"a..b" is not an IP address or host name'),
        ("[::1]80", '"[::1]80" is not host:port or [IPv6]:port'),
    ],
)
def test_bad_listen(text: str, problem: str) -> None:
    """A listen address without a port, a host, or a valid one of either is refused."""
    with pytest.raises(ValueError) as e:
        parse_listen(text)
    assert str(e.value) == problem


F = f"{P}: "
NOT_DURATION = "is not a duration (use a number with a unit: 250ms, 5s, 1m)"
KNOWN_METRICS = (
    "(known: connection_security_policy, histograms, interval, listen, max_series,"
    " series_ttl, state_file, textfile, web_config)"
)
KNOWN_TABLES = "(known: accesslog, bpf, identity, kubernetes, metrics)"


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('[metrics]\ninterval = "5 s"', f'metrics.interval: "5 s" {NOT_DURATION}'),
        (
            "[metrics]\ninterval = 5",
            'metrics.interval: expected a duration string such as "5s", got the integer 5',
        ),
        (
            '[kubernetes]\nkubelet_interval = "0s"',
            'kubernetes.kubelet_interval: "0s" must be more than 0',
        ),
        ("[metrics]\nport = 1", f"metrics.port: unknown key {KNOWN_METRICS}"),
        ("[metric]\nlisten = 1", f"metric: unknown table {KNOWN_TABLES}"),
        ("listen = 1", f"listen: unknown key {KNOWN_TABLES}"),
        ("metrics = 1", "metrics: expected a table, got the integer 1"),
        (
            "[metrics]\nlisten = 15020",
            'metrics.listen: expected a string such as "127.0.0.1:15020", got the integer 15020',
        ),
        (
            '[metrics]\nlisten = "15020"',
            'metrics.listen: "15020" has no port (use host:port, such as 127.0.0.1:15020)',
        ),
        (
            '[metrics]\nweb_config = "web.yml"',
            'metrics.web_config: "web.yml" is not an absolute path (or "" to disable)',
        ),
        (
            '[metrics]\ntextfile = "k.prom"',
            'metrics.textfile: "k.prom" is not an absolute path (or "" to disable)',
        ),
        (
            "[metrics]\ntextfile = false",
            "metrics.textfile: expected a string, got the boolean false",
        ),
        (
            '[identity]\nsource = "k8s"',
            'identity.source: "k8s" is not a source (use "inventory" or "kubernetes")',
        ),
        ('[identity]\ninventory = ""', 'identity.inventory: "" is not an absolute path'),
        (
            '[identity]\ninventory = "inv.toml"',
            'identity.inventory: "inv.toml" is not an absolute path',
        ),
        (
            '[kubernetes]\nkubeconfig = "~/.kube/config"',
            'kubernetes.kubeconfig: "~/.kube/config" is not an absolute path'
            ' (or "" for the default)',
        ),
        (
            '[kubernetes]\nkubelet_url = "127.0.0.1:10250"',
            'kubernetes.kubelet_url: "127.0.0.1:10250" is not an http:// or https:// URL'
            ' (or "" for no kubelet)',
        ),
        (
            '[kubernetes]\nkubelet_url = "https://"',
            'kubernetes.kubelet_url: "https://" is not an http:// or https:// URL'
            ' (or "" for no kubelet)',
        ),
        ('[kubernetes]\ncluster = ""', "kubernetes.cluster: must not be empty"),
        ("[kubernetes]\nnode_name = [1]", "kubernetes.node_name: expected a string, got an array"),
        (
            "[accesslog]\nmax_rate = -1",
            "accesslog.max_rate: must be 0 (no limit) or from 1 to 1,000,000 records per"
            " second, got -1",
        ),
        (
            '[accesslog]\nmax_rate = "fast"',
            'accesslog.max_rate: expected an integer, got the string "fast"',
        ),
        (
            '[accesslog]\nperiodic = "soon"',
            'accesslog.periodic: "soon" is not a duration (use a number with a unit: 250ms, 5s,'
            " 1m)",
        ),
        (
            "[accesslog]\nperiodic = 5",
            'accesslog.periodic: expected "" or a duration string such as "5s", got the integer 5',
        ),
        (
            '[accesslog]\nperiodic = "5m"\n[bpf]\nlive_updates = false',
            'accesslog.periodic: needs bpf.live_updates = true: set it, or set periodic = ""'
            " for records at close only",
        ),
        (
            '[accesslog]\njournald = "yes"',
            'accesslog.journald: expected true or false, got the string "yes"',
        ),
        (
            "[accesslog]\njournald = 1",
            "accesslog.journald: expected true or false, got the integer 1",
        ),
        (
            '[accesslog]\nfile = "log.json"',
            'accesslog.file: "log.json" is not an absolute path'
            ' (or "" to disable, "-" for standard output)',
        ),
        (
            '[bpf]\ncgroup = "kubepods"',
            'bpf.cgroup: "kubepods" is not an absolute path (or "auto" for the cgroup v2 root)',
        ),
        ('[bpf]\npin_dir = ""', 'bpf.pin_dir: "" is not an absolute path'),
        (
            "[bpf]\npin_dir = 2024-01-01",
            "bpf.pin_dir: expected a string, got the date/time 2024-01-01",
        ),
        ("[bpf]\ncgroup = 1.5", "bpf.cgroup: expected a string, got the float 1.5"),
        (
            '[bpf]\nlive_updates = "no"',
            'bpf.live_updates: expected true or false, got the string "no"',
        ),
        ("[bpf]\ncgroup = {}", "bpf.cgroup: expected a string, got a table"),
        (
            "[metrics]\ntextfile_explicit = true",
            f"metrics.textfile_explicit: unknown key {KNOWN_METRICS}",
        ),
        ('[bpf]\nflow_expiry = "500ms"', "bpf.flow_expiry: must be from 1s to 24h"),
        ('[bpf]\nflow_expiry = "25h"', "bpf.flow_expiry: must be from 1s to 24h"),
        ("[bpf]\nmax_flows = 100", "bpf.max_flows: must be from 1,024 to 1,048,576, got 100"),
        ('[metrics]\nseries_ttl = "200h"', "metrics.series_ttl: must be from 1s to 168h"),
        ("[metrics]\nmax_series = 0", "metrics.max_series: must be from 1 to 1,000,000, got 0"),
        (
            '[metrics]\nhistograms = ["srtt", "p99"]',
            'metrics.histograms[1]: "p99" is not a histogram (use duration, srtt, min_rtt,'
            " connect)",
        ),
        (
            '[metrics]\nhistograms = ["srtt", "srtt"]',
            'metrics.histograms[1]: "srtt" is listed twice',
        ),
        (
            '[metrics]\nhistograms = "srtt"',
            'metrics.histograms: expected an array of strings, got the string "srtt"',
        ),
    ],
)
def test_problem(toml: str, problem: str) -> None:
    """Each bad value is reported as `file: key.path: problem`, exactly."""
    assert problems(toml) == [F + problem]


def test_every_problem_at_once_in_a_fixed_order() -> None:
    """All problems come in one error: unknown keys of a table first, then its values in order."""
    toml = """
[bpf]
cgroup = "x"
[metrics]
interval = "5 s"
listen = "::1:80"
colour = "blue"
[identity]
source = "k8s"
[extra]
"""
    assert problems(toml) == [
        F + f"extra: unknown table {KNOWN_TABLES}",
        F + 'identity.source: "k8s" is not a source (use "inventory" or "kubernetes")',
        F + f"metrics.colour: unknown key {KNOWN_METRICS}",
        F + 'metrics.listen: "::1:80" is ambiguous (write IPv6 addresses in brackets: [::1]:80)',
        F + f'metrics.interval: "5 s" {NOT_DURATION}',
        F + 'bpf.cgroup: "x" is not an absolute path (or "auto" for the cgroup v2 root)',
    ]


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ("[metrics\n", "line 1: Expected ']' at the end of a table declaration"),
        ('[metrics]\ninterval = "5s"\ninterval = "6s"\n', "line 3: Cannot overwrite a value"),
        ("[bpf]\ncgroup = \n", "line 2: Invalid value"),
        ("[bpf]\ncgroup =", "line 2: Invalid value"),
    ],
)
def test_syntax_error_names_the_line(toml: str, problem: str) -> None:
    """A TOML syntax error is one problem naming the line, without tomllib's position suffix."""
    assert problems(toml) == [F + problem]


def test_load_reads_the_file(tmp_path: Path) -> None:
    """load_config parses the file it is given and records its path."""
    path = tmp_path / "kmeshd.toml"
    path.write_text('[metrics]\ninterval = "1m30s"\n')
    config = load_config(path)
    assert (config.path, config.metrics.interval) == (path, 90.0)


def test_missing_file_at_the_default_path_is_the_defaults(tmp_path: Path) -> None:
    """An absent config file that nobody named means every default."""
    path = tmp_path / "absent.toml"
    assert load_config(path, explicit=False) == Config(path=path)


def test_missing_file_named_explicitly_is_an_error(tmp_path: Path) -> None:
    """An absent config file named on the command line is a config error."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as e:
        load_config(path, explicit=True)
    assert e.value.problems == [f"{path}: cannot read: No such file or directory"]


@pytest.mark.parametrize("explicit", [True, False])
def test_directory_cannot_be_read(tmp_path: Path, explicit: bool) -> None:
    """A config path that exists but is not a readable file is an error, named or not."""
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path, explicit=explicit)
    assert e.value.problems == [
        f"{tmp_path}: is a directory, not a regular file (name a regular file)"
    ]


def test_non_utf8_file_cannot_be_read(tmp_path: Path) -> None:
    """A file that is not UTF-8 text is reported with the offending byte."""
    path = tmp_path / "kmeshd.toml"
    path.write_bytes(b'[bpf]\ncgroup = "\xff"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == [f"{path}: cannot read: not UTF-8 text (byte 0xff at offset 16)"]


def test_load_reports_problems_with_the_files_path(tmp_path: Path) -> None:
    """Problems found by load_config name the file it read."""
    path = tmp_path / "kmeshd.toml"
    path.write_text("[bpf]\ncgroup = 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == [f"{path}: bpf.cgroup: expected a string, got the integer 1"]


def uncommented(text: str) -> str:
    """The shipped config with every `# key = value` line made live."""
    return re.sub(r"^# (\w+ = )", r"\1", text, flags=re.MULTILINE)


def test_shipped_config_is_the_defaults() -> None:
    """etc/kmeshd.toml as shipped means exactly the defaults (its keys are commented out)."""
    path = ETC / "kmeshd.toml"
    assert load_config(path) == Config(path=path)


def test_shipped_config_documents_every_default() -> None:
    """Uncommenting every key in etc/kmeshd.toml changes nothing but the *_explicit flags."""
    path = ETC / "kmeshd.toml"
    config = parse_config(uncommented(path.read_text()), path)
    assert config == Config(
        path=path,
        identity=IdentityConfig(inventory_explicit=True),
        kubernetes=KubernetesConfig(),
        metrics=MetricsConfig(textfile_explicit=True, state_file_explicit=True),
        accesslog=AccessLogConfig(file_explicit=True),
        bpf=BpfConfig(),
    )


def test_shipped_config_shows_every_key() -> None:
    """Every key the parser takes appears in etc/kmeshd.toml, in its table."""
    text = (ETC / "kmeshd.toml").read_text()
    shown = set(re.findall(r"^# (\w+) = ", text, flags=re.MULTILINE))
    tables = [IdentityConfig, KubernetesConfig, MetricsConfig, AccessLogConfig, BpfConfig]
    keys = {f.name for t in tables for f in dataclasses.fields(t)}
    assert shown == {k for k in keys if not k.endswith("_explicit")}


HUGE_HEX = "0x" + "f" * 100  # 400 bits: more digits in decimal than a message can show


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        (
            '[kubernetes]\nkubelet_interval = "1ns"',
            "kubernetes.kubelet_interval: must be from 100ms to 1h",
        ),
        (
            '[kubernetes]\nkubelet_interval = "2h"',
            "kubernetes.kubelet_interval: must be from 100ms to 1h",
        ),
        ('[metrics]\ninterval = "99ms"', "metrics.interval: must be from 100ms to 1h"),
        (
            '[metrics]\ninterval = "99999999999999999999h"',
            "metrics.interval: must be from 100ms to 1h",
        ),
        ('[accesslog]\nperiodic = "999ms"', 'accesslog.periodic: must be from 1s to 24h, or ""'),
        ('[accesslog]\nperiodic = "25h"', 'accesslog.periodic: must be from 1s to 24h, or ""'),
        (
            "[accesslog]\nmax_rate = 1000001",
            "accesslog.max_rate: must be 0 (no limit) or from 1 to 1,000,000 records per second,"
            " got 1,000,001",
        ),
        (
            f"[metrics]\nmax_series = {HUGE_HEX}",
            "metrics.max_series: must be from 1 to 1,000,000, got an integer of 400 bits",
        ),
        (
            f"[metrics]\nlisten = {HUGE_HEX}",
            'metrics.listen: expected a string such as "127.0.0.1:15020", got an integer of 400'
            " bits",
        ),
        (
            '[metrics]\nlisten = "127.0.0.1:99999"',
            "metrics.listen: port 99999 is out of range (1-65535)",
        ),
        (
            '[kubernetes]\nkubelet_url = "https://127.0.0.1:99999"',
            'kubernetes.kubelet_url: "https://127.0.0.1:99999" is not an http:// or https:// URL'
            ' (or "" for no kubelet): its port is not a number from 1 to 65535',
        ),
        (
            '[kubernetes]\nkubelet_url = "https://127.0.0.1:0"',
            'kubernetes.kubelet_url: "https://127.0.0.1:0" is not an http:// or https:// URL'
            ' (or "" for no kubelet): its port is not a number from 1 to 65535',
        ),
        (
            '[kubernetes]\nkubelet_url = "https://[::1"',
            'kubernetes.kubelet_url: "https://[::1" is not an http:// or https:// URL'
            ' (or "" for no kubelet): Invalid IPv6 URL',
        ),
        (
            '[kubernetes]\nkubelet_url = "https://a b"',
            'kubernetes.kubelet_url: "https://a b" is not an http:// or https:// URL'
            ' (or "" for no kubelet): it contains a space or a control character',
        ),
        (
            '[identity]\ninventory = "/etc/\\u0000"',
            'identity.inventory: "/etc/\\u0000" contains a NUL byte, which no path can (remove it)',
        ),
        (
            f'[metrics]\ntextfile = "/{"a" * 4095}"',
            f'metrics.textfile: "/{"a" * 99}..." (4,096 characters) is longer than 4095 bytes,'
            " which no path can be",
        ),
        (
            '[kubernetes]\nnode_name = "a/b"',
            'kubernetes.node_name: "a/b" is not a node name: at most 253 lower-case letters,'
            ' digits and "-", starting and ending with a letter or digit, or such names joined'
            ' by "."',
        ),
        (
            '[kubernetes]\ntrust_domain = "Example.org/x"',
            'kubernetes.trust_domain: "Example.org/x" is not a trust domain: lower-case letters,'
            ' digits, ".", "-" and "_"',
        ),
    ],
)
def test_range_and_hostile_value(toml: str, problem: str) -> None:
    """Values that would make the daemon spin, never wake, or fail later are refused, each
    in one line that never prints a number too long to print."""
    assert problems(toml) == [F + problem]


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ('[kubernetes]\nkubelet_interval = "100ms"', "kubernetes.kubelet_interval", 0.1),
        ('[kubernetes]\nkubelet_interval = "1h"', "kubernetes.kubelet_interval", 3600.0),
        ('[metrics]\ninterval = "1h"', "metrics.interval", 3600.0),
        ('[accesslog]\nperiodic = "1s"', "accesslog.periodic", 1.0),
        ('[accesslog]\nperiodic = "24h"', "accesslog.periodic", 86400.0),
        ("[accesslog]\nmax_rate = 1000000", "accesslog.max_rate", 1_000_000),
        (
            '[kubernetes]\nnode_name = "ip-10-0-0-1.ec2.internal"',
            "kubernetes.node_name",
            "ip-10-0-0-1.ec2.internal",
        ),
        (
            '[kubernetes]\ntrust_domain = "prod_eu-1.example.org"',
            "kubernetes.trust_domain",
            "prod_eu-1.example.org",
        ),
    ],
)
def test_range_bounds_are_valid(toml: str, key: str, expected: object) -> None:
    """Each range includes its bounds."""
    assert value(parse_config(toml, P), key) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a = " + "[" * 5000 + "]" * 5000, "arrays or tables are nested too deeply (flatten them)"),
        (
            "a = " + "{b = " * 5000 + "1" + "}" * 5000,
            "arrays or tables are nested too deeply (flatten them)",
        ),
        (
            "[metrics]\nmax_series = " + "9" * 5000,
            "a number has more than 4300 digits (shorten it)",
        ),
        ('a = "\x00"', "line 1: Illegal character '\\x00'"),
    ],
)
def test_documents_no_parser_survives_are_one_line(text: str, problem: str) -> None:
    """Deep nesting, a number of 5000 digits, a NUL: one problem each, not a traceback."""
    assert problems(text) == [F + problem]
