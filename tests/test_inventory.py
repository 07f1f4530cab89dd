"""kmeshd.identity.inventory: the static inventory file -> an Identities snapshot."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest

from kmeshd.errors import ConfigError
from kmeshd.identity.inventory import load_inventory, parse_inventory
from kmeshd.identity.model import Identities, Service, ServicePort, Workload

P = Path("/etc/kmeshd/inventory.toml")
F = f"{P}: "
ETC = Path(__file__).resolve().parent.parent / "etc"

HTTPBIN = """
[[workload]]
name = "httpbin-5c5944c58c-v9mlk"
workload = "httpbin"
addresses = ["10.244.0.11"]
"""
SLEEP = """
[[workload]]
name = "sleep-7656cf8794-9kjq2"
workload = "sleep"
addresses = ["10.244.0.17"]
"""
KNOWN_TOP = "(known: cluster, service, trust_domain, workload)"
KNOWN_WORKLOAD = (
    "(known: addresses, canonical_revision, canonical_service, name, namespace,"
    " service_account, workload)"
)
KNOWN_SERVICE = "(known: addresses, hostname, name, namespace, ports, workloads)"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_inventory(text, P)
    return e.value.problems


def test_empty_inventory_has_no_identities() -> None:
    """An empty file is valid: nothing is known."""
    assert parse_inventory("", P) == Identities()


def test_workload_with_every_key() -> None:
    """Every workload key lands in its Workload field; the principal is a SPIFFE ID."""
    toml = """
cluster = "east"
trust_domain = "example.org"
[[workload]]
name = "httpbin-5c5944c58c-v9mlk"
workload = "httpbin"
namespace = "web"
addresses = ["10.244.0.11", "fd00::11"]
canonical_service = "httpbin-svc"
canonical_revision = "v1"
service_account = "httpbin"
"""
    assert parse_inventory(toml, P).workloads == (
        Workload(
            name="httpbin-5c5944c58c-v9mlk",
            workload="httpbin",
            namespace="web",
            canonical_service="httpbin-svc",
            canonical_revision="v1",
            principal="spiffe://example.org/ns/web/sa/httpbin",
            cluster="east",
            addresses=(IPv4Address("10.244.0.11"), IPv6Address("fd00::11")),
        ),
    )


def test_workload_defaults() -> None:
    """Only name and addresses are required; the rest default as kmeshd.toml(5) says."""
    toml = '[[workload]]\nname = "vm-1"\naddresses = ["192.0.2.1"]'
    assert parse_inventory(toml, P).workloads == (
        Workload(
            name="vm-1",
            workload="vm-1",
            namespace="default",
            canonical_service="vm-1",
            canonical_revision="latest",
            principal="-",
            cluster="Kubernetes",
            addresses=(IPv4Address("192.0.2.1"),),
        ),
    )


def test_canonical_service_defaults_to_workload() -> None:
    """Without canonical_service, the workload name (not the instance name) is used."""
    (workload,) = parse_inventory(HTTPBIN, P).workloads
    assert workload.canonical_service == "httpbin"


def test_default_trust_domain_in_principal() -> None:
    """A service account without a trust_domain gives a cluster.local principal."""
    toml = HTTPBIN + 'namespace = "prod"\nservice_account = "web"'
    (workload,) = parse_inventory(toml, P).workloads
    assert workload.principal == "spiffe://cluster.local/ns/prod/sa/web"


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("10.244.0.11", IPv4Address("10.244.0.11")),
        ("fd00::11", IPv6Address("fd00::11")),
        ("FD00:0::11", IPv6Address("fd00::11")),
        ("::ffff:10.244.0.11", IPv4Address("10.244.0.11")),
        ("::1", IPv6Address("::1")),
    ],
)
def test_address_literals(literal: str, expected: IPv4Address | IPv6Address) -> None:
    """IPv4 stays IPv4, IPv6 is IPv6, and a v4-mapped IPv6 literal becomes its IPv4 address."""
    toml = f'[[workload]]\nname = "a"\naddresses = ["{literal}"]'
    (workload,) = parse_inventory(toml, P).workloads
    assert workload.addresses == (expected,)
    assert type(workload.addresses[0]) is type(expected)


def test_service_with_every_key() -> None:
    """Every service key lands in its Service field."""
    toml = (
        HTTPBIN
        + """
[[service]]
name = "httpbin"
namespace = "default"
hostname = "httpbin.example"
addresses = ["10.96.0.20", "fd00:96::20"]
ports = [{ port = 8000, target_port = 80 }, { port = 8443, target_port = 443 }]
workloads = ["httpbin"]
"""
    )
    assert parse_inventory(toml, P).services == (
        Service(
            name="httpbin",
            namespace="default",
            hostname="httpbin.example",
            addresses=(IPv4Address("10.96.0.20"), IPv6Address("fd00:96::20")),
            ports=(ServicePort(8000, 80), ServicePort(8443, 443)),
            workloads=("httpbin",),
        ),
    )


def test_service_defaults() -> None:
    """A service needs only a name: default namespace and hostname, no VIPs, ports or workloads."""
    assert parse_inventory('[[service]]\nname = "db"', P).services == (
        Service(name="db", namespace="default", hostname="db.default.svc.cluster.local"),
    )


def test_hostname_default_uses_the_namespace() -> None:
    """The default hostname is <name>.<namespace>.svc.cluster.local."""
    (service,) = parse_inventory('[[service]]\nname = "db"\nnamespace = "data"', P).services
    assert service.hostname == "db.data.svc.cluster.local"


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ("[{ port = 80 }]", (ServicePort(80, 80),)),
        ("[{ port = 8000, target_port = 80 }]", (ServicePort(8000, 80),)),
        ("[{ port = 1 }, { port = 65535 }]", (ServicePort(1, 1), ServicePort(65535, 65535))),
        ("[]", ()),
    ],
)
def test_service_ports(ports: str, expected: tuple[ServicePort, ...]) -> None:
    """target_port defaults to port; 1 and 65535 are valid ports."""
    (service,) = parse_inventory(f'[[service]]\nname = "s"\nports = {ports}', P).services
    assert service.ports == expected


def test_ports_as_array_of_tables() -> None:
    """Ports may also be written as [[service.ports]] tables."""
    toml = '[[service]]\nname = "s"\n[[service.ports]]\nport = 80\ntarget_port = 8080\n'
    (service,) = parse_inventory(toml, P).services
    assert service.ports == (ServicePort(80, 8080),)


def test_lookups_on_the_parsed_inventory() -> None:
    """The parsed inventory answers by address, by VIP:port and by workload:target port."""
    toml = (
        HTTPBIN
        + """
[[service]]
name = "httpbin"
addresses = ["10.96.0.20"]
ports = [{ port = 8000, target_port = 80 }]
workloads = ["httpbin"]
"""
    )
    identities = parse_inventory(toml, P)
    workload = identities.workload_at(ip_address("::ffff:10.244.0.11"))
    assert workload is not None and workload.name == "httpbin-5c5944c58c-v9mlk"
    assert identities.service_at(ip_address("10.96.0.20"), 8000) == identities.services[0]
    assert identities.service_behind(workload.addresses[0], 80) == identities.services[0]


def test_file_order_is_kept() -> None:
    """Workloads and services come out in file order, the same on every parse."""
    toml = SLEEP + HTTPBIN + '[[service]]\nname = "b"\n[[service]]\nname = "a"\n'
    first, second = parse_inventory(toml, P), parse_inventory(toml, P)
    assert [w.workload for w in first.workloads] == ["sleep", "httpbin"]
    assert [s.name for s in first.services] == ["b", "a"]
    assert first == second


W0 = '[[workload]]\nname = "a"\naddresses = ["10.0.0.1"]\n'


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ("colour = 1", f"colour: unknown key {KNOWN_TOP}"),
        ("[services]", f"services: unknown table {KNOWN_TOP}"),
        ('cluster = ""', "cluster: must not be empty"),
        ("trust_domain = 1", "trust_domain: expected a string, got the integer 1"),
        ("[workload]", "workload: expected an array of tables, got a table"),
        ("workload = [1]", "workload[0]: expected a table, got the integer 1"),
        (W0 + 'app = "a"', f"workload[0].app: unknown key {KNOWN_WORKLOAD}"),
        ('[[workload]]\naddresses = ["10.0.0.1"]', "workload[0].name: missing (required)"),
        (
            '[[workload]]\nname = ""\naddresses = ["10.0.0.1"]',
            "workload[0].name: must not be empty",
        ),
        ('[[workload]]\nname = "a"', "workload[0].addresses: missing (required)"),
        (
            '[[workload]]\nname = "a"\naddresses = []',
            "workload[0].addresses: must list at least one IPv4 or IPv6 address",
        ),
        (
            '[[workload]]\nname = "a"\naddresses = "10.0.0.1"',
            'workload[0].addresses: expected an array of strings, got the string "10.0.0.1"',
        ),
        (
            '[[workload]]\nname = "a"\naddresses = [167772161]',
            "workload[0].addresses[0]: expected a string, got the integer 167772161",
        ),
        (
            '[[workload]]\nname = "a"\naddresses = ["10.0.0.300"]',
            'workload[0].addresses[0]: "10.0.0.300" is not an IP address',
        ),
        (
            '[[workload]]\nname = "a"\naddresses = ["10.0.0.1/32"]',
            'workload[0].addresses[0]: "10.0.0.1/32" is not an IP address',
        ),
        (
            '[[workload]]\nname = "a"\naddresses = ["10.0.0.1", "::ffff:10.0.0.1"]',
            "workload[0].addresses[1]: 10.0.0.1 is listed twice",
        ),
        (W0 + "namespace = 5", "workload[0].namespace: expected a string, got the integer 5"),
        (W0 + 'workload = ""', "workload[0].workload: must not be empty"),
        (W0 + 'service_account = ""', "workload[0].service_account: must not be empty"),
        (
            W0 + "canonical_revision = 1.0",
            "workload[0].canonical_revision: expected a string, got the float 1.0",
        ),
        (
            W0 + '[[workload]]\nname = "a"\naddresses = ["10.0.0.2"]',
            'workload[1].name: "a" in namespace "default" is already workload[0]',
        ),
    ],
)
def test_workload_problem(toml: str, problem: str) -> None:
    """Each bad top-level or workload entry is reported as `file: key.path: problem`, exactly."""
    assert problems(toml) == [F + problem]


def test_address_of_two_workloads() -> None:
    """An address used by two workloads is reported at the second, naming the first."""
    toml = (
        HTTPBIN
        + SLEEP
        + '[[workload]]\nname = "other"\naddresses = ["fd00::1", "10.244.0.11", "fd00::1:0"]'
    )
    assert problems(toml) == [
        F + "workload[2].addresses[1]: 10.244.0.11 is already the address of"
        " workload[0] (httpbin-5c5944c58c-v9mlk)"
    ]


def test_v4_mapped_address_collides_with_its_ipv4() -> None:
    """A v4-mapped literal and the plain IPv4 address are one address."""
    toml = HTTPBIN + '[[workload]]\nname = "b"\naddresses = ["::ffff:10.244.0.11"]'
    assert problems(toml) == [
        F + "workload[1].addresses[0]: 10.244.0.11 is already the address of"
        " workload[0] (httpbin-5c5944c58c-v9mlk)"
    ]


def test_same_name_in_other_namespace_is_fine() -> None:
    """Instance names need only be unique within their namespace."""
    toml = W0 + '[[workload]]\nname = "a"\nnamespace = "b"\naddresses = ["10.0.0.2"]'
    assert len(parse_inventory(toml, P).workloads) == 2


S0 = HTTPBIN + '[[service]]\nname = "httpbin"\n'
S1 = S0 + 'addresses = ["10.96.0.20"]\nports = [{ port = 8000 }]\n'


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        (S0 + "colour = 1", f"service[0].colour: unknown key {KNOWN_SERVICE}"),
        ("[[service]]\nports = []", "service[0].name: missing (required)"),
        (S0 + "hostname = 1", "service[0].hostname: expected a string, got the integer 1"),
        (S0 + 'addresses = ["vip"]', 'service[0].addresses[0]: "vip" is not an IP address'),
        (
            S0 + 'workloads = ["httpbin", "foo"]',
            'service[0].workloads[1]: no workload named "foo" in namespace "default"',
        ),
        (
            S0 + 'namespace = "web"\nworkloads = ["httpbin"]',
            'service[0].workloads[0]: no workload named "httpbin" in namespace "web"',
        ),
        (
            S0 + 'workloads = ["httpbin-5c5944c58c-v9mlk"]',
            'service[0].workloads[0]: no workload named "httpbin-5c5944c58c-v9mlk"'
            ' in namespace "default"',
        ),
        (
            S0 + 'workloads = "httpbin"',
            'service[0].workloads: expected an array of strings, got the string "httpbin"',
        ),
        (S0 + "ports = 80", "service[0].ports: expected an array of tables, got the integer 80"),
        (S0 + "ports = [80]", "service[0].ports[0]: expected a table, got the integer 80"),
        (S0 + "ports = [{ port = 0 }]", "service[0].ports[0].port: 0 is not a port (use 1-65535)"),
        (
            S0 + "ports = [{ port = 65536 }]",
            "service[0].ports[0].port: 65536 is not a port (use 1-65535)",
        ),
        (
            S0 + "ports = [{ port = 80, target_port = -1 }]",
            "service[0].ports[0].target_port: -1 is not a port (use 1-65535)",
        ),
        (
            S0 + 'ports = [{ port = "80" }]',
            'service[0].ports[0].port: expected an integer, got the string "80"',
        ),
        (
            S0 + "ports = [{ port = true }]",
            "service[0].ports[0].port: expected an integer, got the boolean true",
        ),
        (S0 + "ports = [{ target_port = 80 }]", "service[0].ports[0].port: missing (required)"),
        (
            S0 + 'ports = [{ port = 80, protocol = "TCP" }]',
            "service[0].ports[0].protocol: unknown key (known: port, target_port)",
        ),
        (
            S0 + "ports = [{ port = 80 }, { port = 80, target_port = 8080 }]",
            "service[0].ports[1].port: 80 is listed twice",
        ),
        (
            S0 + 'addresses = ["10.96.0.20", "10.96.0.20"]',
            "service[0].addresses[1]: 10.96.0.20 is listed twice",
        ),
        (
            S0 + 'addresses = ["10.244.0.11"]',
            "service[0].addresses[0]: 10.244.0.11 is already the address of"
            " workload[0] (httpbin-5c5944c58c-v9mlk)",
        ),
        (
            S1
            + '[[service]]\nname = "other"\naddresses = ["10.96.0.20"]\nports = [{ port = 8000 }]',
            "service[1].addresses[0]: 10.96.0.20:8000 is already a port of service[0] (httpbin)",
        ),
        (
            S1 + '[[service]]\nname = "httpbin"\nports = [{ port = 1 }]',
            'service[1].name: "httpbin" in namespace "default" is already service[0]',
        ),
    ],
)
def test_service_problem(toml: str, problem: str) -> None:
    """Each bad service entry is reported as `file: key.path: problem`, exactly."""
    assert problems(toml) == [F + problem]


def test_duplicate_ipv6_vip_port_is_bracketed() -> None:
    """An IPv6 VIP:port conflict prints the address in brackets."""
    svc = '[[service]]\nname = "{}"\naddresses = ["fd00::20"]\nports = [{{ port = 80 }}]\n'
    assert problems(svc.format("a") + svc.format("b")) == [
        F + "service[1].addresses[0]: [fd00::20]:80 is already a port of service[0] (a)"
    ]


def test_one_vip_on_different_ports_is_fine() -> None:
    """Two services may share a VIP as long as their ports differ."""
    svc = '[[service]]\nname = "{}"\naddresses = ["10.96.0.1"]\nports = [{{ port = {} }}]\n'
    services = parse_inventory(svc.format("a", 80) + svc.format("b", 443), P).services
    assert [s.name for s in services] == ["a", "b"]


def test_every_problem_at_once_in_a_fixed_order() -> None:
    """All problems come in one error, in the order the file is walked."""
    toml = """
trust_domain = ""
[[workload]]
name = "a"
addresses = ["10.0.0.300", "10.0.0.1"]
colour = "red"
[[workload]]
addresses = ["10.0.0.1"]
[[service]]
name = "s"
ports = [{ port = 0 }]
workloads = ["a", "b"]
"""
    assert problems(toml) == [
        F + "trust_domain: must not be empty",
        F + f"workload[0].colour: unknown key {KNOWN_WORKLOAD}",
        F + 'workload[0].addresses[0]: "10.0.0.300" is not an IP address',
        F + "workload[1].name: missing (required)",
        F + "workload[1].addresses[0]: 10.0.0.1 is already the address of workload[0] (a)",
        F + "service[0].ports[0].port: 0 is not a port (use 1-65535)",
        F + 'service[0].workloads[1]: no workload named "b" in namespace "default"',
    ]


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ("[[workload]\n", "line 1: Expected ']]' at the end of an array declaration"),
        (W0 + 'name = "b"\n', "line 4: Cannot overwrite a value"),
        ('[[workload]]\naddresses = ["10.0.0.1"\n', "line 2: Unclosed array"),
    ],
)
def test_syntax_error_names_the_line(toml: str, problem: str) -> None:
    """A TOML syntax error is one problem naming the line."""
    assert problems(toml) == [F + problem]


def test_load_reads_the_file(tmp_path: Path) -> None:
    """load_inventory parses the file it is given, without warnings."""
    path = tmp_path / "inventory.toml"
    path.write_text(HTTPBIN)
    identities, warnings = load_inventory(path, explicit=True)
    assert [w.name for w in identities.workloads] == ["httpbin-5c5944c58c-v9mlk"]
    assert warnings == []


def test_missing_default_inventory_is_empty_with_a_warning(tmp_path: Path) -> None:
    """An inventory left at its default path that does not exist means no identities."""
    path = tmp_path / "inventory.toml"
    assert load_inventory(path, explicit=False) == (
        Identities(),
        [f"{path}: not found; starting with no identities"],
    )


def test_missing_explicit_inventory_is_an_error(tmp_path: Path) -> None:
    """An inventory path the config sets must exist."""
    path = tmp_path / "inventory.toml"
    with pytest.raises(ConfigError) as e:
        load_inventory(path, explicit=True)
    assert e.value.problems == [f"{path}: cannot read: No such file or directory"]


@pytest.mark.parametrize("explicit", [True, False])
def test_directory_cannot_be_read(tmp_path: Path, explicit: bool) -> None:
    """An inventory path that exists but cannot be read is an error, default or not."""
    with pytest.raises(ConfigError) as e:
        load_inventory(tmp_path, explicit=explicit)
    assert e.value.problems == [
        f"{tmp_path}: is a directory, not a regular file (name a regular file)"
    ]


def test_non_utf8_inventory_cannot_be_read(tmp_path: Path) -> None:
    """An inventory that is not UTF-8 text is reported with the offending byte."""
    path = tmp_path / "inventory.toml"
    path.write_bytes(b"cluster = '\xe9'\n")
    with pytest.raises(ConfigError) as e:
        load_inventory(path, explicit=False)
    assert e.value.problems == [f"{path}: cannot read: not UTF-8 text (byte 0xe9 at offset 11)"]


def test_load_reports_problems_with_the_files_path(tmp_path: Path) -> None:
    """Problems found by load_inventory name the file it read."""
    path = tmp_path / "inventory.toml"
    path.write_text('[[workload]]\nname = "a"\naddresses = ["x"]\n')
    with pytest.raises(ConfigError) as e:
        load_inventory(path, explicit=True)
    assert e.value.problems == [f'{path}: workload[0].addresses[0]: "x" is not an IP address']


def test_shipped_example_inventory() -> None:
    """etc/inventory.toml parses, with an IPv6 address and a service reached by its VIP."""
    identities, warnings = load_inventory(ETC / "inventory.toml", explicit=True)
    httpbin = identities.workload_at(IPv6Address("fd00::11"))
    assert warnings == []
    assert (
        httpbin is not None and httpbin.principal == "spiffe://cluster.local/ns/default/sa/httpbin"
    )
    service = identities.service_at(IPv4Address("10.96.0.20"), 8000)
    assert service is not None and service.workloads == ("httpbin",)
    assert identities.service_behind(httpbin.addresses[0], 80) == service


NEVER = "which can never be a connection's address"


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("fe80::1%eth0", f'"fe80::1%eth0" has a zone index, {NEVER} (write "fe80::1")'),
        ("0.0.0.0", f'"0.0.0.0" is the unspecified address, {NEVER}'),
        ("::", f'"::" is the unspecified address, {NEVER}'),
        ("::ffff:0.0.0.0", f'"::ffff:0.0.0.0" is the unspecified address, {NEVER}'),
        ("255.255.255.255", f'"255.255.255.255" is the broadcast address, {NEVER}'),
        ("224.0.0.1", f'"224.0.0.1" is a multicast address, {NEVER}'),
        ("ff02::1", f'"ff02::1" is a multicast address, {NEVER}'),
        ("10.0.0.1\x00", '"10.0.0.1\\u0000" is not an IP address'),
    ],
)
def test_address_that_no_connection_has(address: str, problem: str) -> None:
    """Workload addresses and service VIPs that the kernel never reports are refused."""
    toml = f'[[workload]]\nname = "a"\naddresses = [{json.dumps(address)}]\n'
    assert problems(toml) == [F + "workload[0].addresses[0]: " + problem]
    vip = f'[[service]]\nname = "s"\nports = [{{port = 80}}]\naddresses = [{json.dumps(address)}]\n'
    assert problems(vip) == [F + "service[0].addresses[0]: " + problem]


LABEL_RULE = 'lower-case letters, digits and "-", starting and ending with a letter or digit'


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        (
            W0 + 'namespace = "a/b"',
            f'workload[0].namespace: "a/b" is not a namespace: at most 63 {LABEL_RULE}',
        ),
        (
            W0 + 'namespace = "Prod"',
            f'workload[0].namespace: "Prod" is not a namespace: at most 63 {LABEL_RULE}',
        ),
        (
            W0 + f'namespace = "{"n" * 64}"',
            f'workload[0].namespace: "{"n" * 64}" is not a namespace: at most 63 {LABEL_RULE}',
        ),
        (
            W0 + 'service_account = "sa/../x"',
            f'workload[0].service_account: "sa/../x" is not a service account: at most 253'
            f' {LABEL_RULE}, or such names joined by "."',
        ),
        (
            '[[workload]]\nname = "a b"\naddresses = ["10.0.0.1"]',
            f'workload[0].name: "a b" is not an instance name: at most 253 {LABEL_RULE}, or'
            ' such names joined by "."',
        ),
        (
            '[[service]]\nname = "s.x"\nports = [{port = 80}]',
            f'service[0].name: "s.x" is not a service name: at most 63 {LABEL_RULE}',
        ),
        (
            '[[service]]\nname = "s"\nnamespace = "-x"\nports = [{port = 80}]',
            f'service[0].namespace: "-x" is not a namespace: at most 63 {LABEL_RULE}',
        ),
        (
            'trust_domain = "a/b"',
            'trust_domain: "a/b" is not a trust domain: lower-case letters, digits, ".", "-"'
            ' and "_"',
        ),
    ],
)
def test_names_that_would_corrupt_the_principal_or_labels(toml: str, problem: str) -> None:
    """Namespaces, names and service accounts follow Kubernetes' rules: a "/" would make
    spiffe://<domain>/ns/<namespace>/sa/<account> name another principal."""
    assert problems(toml) == [F + problem]
