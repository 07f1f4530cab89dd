"""check-config on hostile input: any config, inventory, kubeconfig or token yields `ok` or
one-line problems (ConfigError, exit 78; UnavailableError, exit 69), never another
exception, and writes no file. The in-process targets run check-config's own code path
(kmeshd.cli.check_config); the subprocess tests run the real command on fixed hostile
files (a FIFO, /dev/zero, NUL bytes, deep nesting, a huge integer) within a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from hypothesis import given
from hypothesis import strategies as st

from kmeshd.cli import check_config
from kmeshd.errors import ConfigError, UnavailableError

RUN_DIR = Path("/run/kmeshd")  # the running daemon's: check-config must leave it alone


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` (and /run/kmeshd) with its mode, size and mtime."""
    found = {}
    for top in (root, RUN_DIR):
        for directory, dirs, files in os.walk(top):
            for name in [*dirs, *files]:
                st_ = os.lstat(os.path.join(directory, name))
                found[os.path.join(directory, name)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return found


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh directory per example (hypothesis runs many in one test)."""
    with tempfile.TemporaryDirectory(prefix="kmeshd-fuzz-") as d:
        yield Path(d)


def checked(root: Path, config: Path) -> list[str]:
    """check-config's problems for `config` (none: ok); asserts it raised nothing else,
    wrote nothing, and that each problem is one line naming a file or the host."""
    before = tree(root)
    try:
        check_config(config)
        problems: list[str] = []
    except ConfigError as exc:
        problems = exc.problems
        assert problems
    except UnavailableError as exc:
        problems = [f"kmeshd: {exc}"]
    assert tree(root) == before
    for line in problems:
        assert "\n" not in line and "\r" not in line, line
        assert line.startswith(("/", "kmeshd: ", "kubernetes.", "$KUBECONFIG")), line
    return problems


def write_config(root: Path, body: str) -> Path:
    """A config whose written files stay inside `root`, plus `body`."""
    path = root / "kmeshd.toml"
    path.write_text(
        f'[metrics]\nlisten = ""\ntextfile = "{root}/k.prom"\nstate_file = ""\n'
        f'[accesslog]\nfile = "{root}/a.json"\njournald = false\n' + body
    )
    return path


# -- the config --------------------------------------------------------------------------


@given(st.binary(max_size=2000))
def test_config_as_bytes(data: bytes) -> None:
    with scratch() as root:
        path = root / "kmeshd.toml"
        path.write_bytes(data)
        checked(root, path)


@given(st.text(max_size=2000))
def test_config_as_text(text: str) -> None:
    with scratch() as root:
        path = root / "kmeshd.toml"
        path.write_text(text, errors="surrogatepass")
        checked(root, path)


class Raw(str):
    """TOML text written as it is: a number of thousands of digits."""


def toml_value(value: object) -> str:
    """`value` as a TOML value (inline tables and arrays, strings as basic strings)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML's (\\uXXXX, \\n, \\")
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else "nan"
    if isinstance(value, int):
        return hex(value) if value.bit_length() > 64 else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


KEYS = {
    "identity": ["source", "inventory"],
    "kubernetes": ["kubeconfig", "node_name", "kubelet_url", "kubelet_interval", "trust_domain"],
    "metrics": ["listen", "textfile", "interval", "series_ttl", "max_series", "histograms"],
    "accesslog": ["file", "journald", "max_rate", "periodic"],
    "bpf": ["cgroup", "pin_dir", "live_updates", "flow_expiry", "max_flows"],
}
# Values near what the keys take, and hostile ones: huge numbers, NUL, special files.
WORDS = st.sampled_from(
    [
        "", "-", "auto", "inventory", "kubernetes", "1ns", "100ms", "5s", "1m30s", "25h",
        "99999999999999999999h", "/dev/zero", "/dev/null", "/proc/self/mem", "/", "/a\0b",
        "127.0.0.1:99999", "[::1]:0", "http://[::1", "https://h:0", "srtt", "fe80::1%eth0",
        "0.0.0.0", "a/b", "UPPER",
    ]
)  # fmt: skip
SCALARS = st.one_of(
    WORDS,
    st.text(max_size=30),
    st.integers(),
    st.builds(lambda bits: 2**bits - 1, st.integers(min_value=64, max_value=70_000)),
    st.builds(lambda digits: Raw("9" * digits), st.integers(min_value=1, max_value=6000)),
    st.floats(),
    st.booleans(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def documents(keys: dict[str, list[str]]) -> st.SearchStrategy[str]:
    """TOML documents of those tables, each with some of its keys, of any value."""
    tables = st.fixed_dictionaries(
        {},
        optional={
            name: st.dictionaries(st.sampled_from(names), VALUES, max_size=4)
            for name, names in keys.items()
        },
    )
    return tables.map(
        lambda t: "".join(
            f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in body.items())
            for name, body in t.items()
        )
    )


@given(documents(KEYS))
def test_config_as_toml(text: str) -> None:
    with scratch() as root:
        path = root / "kmeshd.toml"
        path.write_text(text)
        checked(root, path)


# -- the inventory -----------------------------------------------------------------------

ADDRESSES = st.lists(
    st.one_of(
        st.ip_addresses().map(str),
        st.sampled_from(["fe80::1%eth0", "0.0.0.0", "::", "255.255.255.255", "224.0.0.1"]),
        st.text(max_size=20),
    ),
    max_size=3,
)
NAMES = st.one_of(
    st.sampled_from(["a", "default", "a/b", "A", "-x", "a" * 300]), st.text(max_size=10)
)


def entry(
    required: dict[str, st.SearchStrategy[object]], optional: dict[str, st.SearchStrategy[object]]
) -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries(required, optional=optional)


WORKLOAD = entry(
    {"name": NAMES, "addresses": ADDRESSES},
    {"namespace": NAMES, "service_account": NAMES, "workload": NAMES, "x": VALUES},
)
PORT = entry({"port": st.integers()}, {"target_port": st.integers()})
SERVICE = entry(
    {"name": NAMES, "ports": st.lists(PORT, max_size=2)},
    {"namespace": NAMES, "addresses": ADDRESSES, "workloads": st.lists(NAMES, max_size=2)},
)
INVENTORIES = st.fixed_dictionaries(
    {},
    optional={
        "workload": st.lists(st.one_of(WORKLOAD, VALUES), max_size=3),
        "service": st.lists(st.one_of(SERVICE, VALUES), max_size=2),
        "trust_domain": NAMES,
    },
).map(lambda d: "".join(f"{k} = {toml_value(v)}\n" for k, v in d.items()))


@given(st.one_of(INVENTORIES, st.text(max_size=2000), st.binary(max_size=2000)))
def test_inventory(inventory: str | bytes) -> None:
    with scratch() as root:
        file = root / "inventory.toml"
        if isinstance(inventory, str):
            file.write_text(inventory, errors="surrogatepass")
        else:
            file.write_bytes(inventory)
        checked(root, write_config(root, f'[identity]\ninventory = "{file}"\n'))


# -- the kubeconfig and token --------------------------------------------------------------

B64 = st.one_of(
    st.sampled_from(["LS0tLS1CRUdJTiBYCg==", "not base64", "ÄÖÜ", "LS0t\nLS1C"]),
    st.text(max_size=20),
)
CLUSTER = st.fixed_dictionaries(
    {},
    optional={
        "server": st.one_of(WORDS, st.text(max_size=30), st.just("https://10.0.0.1:6443")),
        "certificate-authority-data": B64,
        "certificate-authority": st.one_of(WORDS, st.sampled_from(["ca.crt", "FIFO"])),
        "insecure-skip-tls-verify": VALUES,
    },
)
USER = st.fixed_dictionaries(
    {},
    optional={
        "token": st.one_of(st.text(max_size=30), st.just("a\nb")),
        "tokenFile": st.one_of(WORDS, st.sampled_from(["token", "FIFO"])),
        "client-certificate-data": B64,
        "client-key-data": B64,
        "client-key": st.one_of(WORDS, st.just("FIFO")),
        "exec": VALUES,
    },
)


class Dumper(yaml.SafeDumper):  # type: ignore[misc,unused-ignore]
    """Writes a Raw number as the plain scalar it is."""


Dumper.add_representer(Raw, lambda d, v: d.represent_scalar("tag:yaml.org,2002:int", str(v)))
# An integer too long for str(): YAML's hexadecimal, which Python turns back into one.
Dumper.add_representer(int, lambda d, v: d.represent_scalar("tag:yaml.org,2002:int", hex(v)))

KUBECONFIGS = st.fixed_dictionaries(
    {
        "clusters": st.one_of(
            st.just([]),
            st.lists(st.builds(lambda c: {"name": "c", "cluster": c}, CLUSTER), max_size=2),
            VALUES,
        ),
        "users": st.one_of(
            st.lists(st.builds(lambda u: {"name": "u", "user": u}, USER), max_size=2), VALUES
        ),
        "contexts": st.just([{"name": "x", "context": {"cluster": "c", "user": "u"}}]),
        "current-context": st.one_of(st.just("x"), VALUES),
    }
).map(lambda d: yaml.dump(d, Dumper=Dumper, allow_unicode=True))


def kubernetes_config(root: Path, kubeconfig: Path, token: Path | None = None) -> Path:
    os.mkfifo(root / "FIFO")
    (root / "token").write_text("t0k3n\n")
    (root / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")
    kubelet = f'kubelet_token_file = "{token}"\n' if token else 'kubelet_url = ""\n'
    body = f'[identity]\nsource = "kubernetes"\n[kubernetes]\nkubeconfig = "{kubeconfig}"\n'
    return write_config(root, body + kubelet)


@given(st.one_of(KUBECONFIGS, st.text(max_size=2000), st.binary(max_size=1000)))
def test_kubeconfig(kubeconfig: str | bytes) -> None:
    with scratch() as root:
        file = root / "kubeconfig"
        if isinstance(kubeconfig, str):
            file.write_text(kubeconfig, errors="surrogatepass")
        else:
            file.write_bytes(kubeconfig)
        checked(root, kubernetes_config(root, file))


GOOD_KUBECONFIG = """\
clusters: [{name: c, cluster: {server: "https://10.0.0.1:6443"}}]
users: [{name: u, user: {token: abc}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


@given(st.binary(max_size=300))
def test_kubelet_token_file(token: bytes) -> None:
    with scratch() as root:
        (root / "kubeconfig").write_text(GOOD_KUBECONFIG)
        file = root / "kubelet-token"
        file.write_bytes(token)
        problems = checked(root, kubernetes_config(root, root / "kubeconfig", file))
        text = token.decode("utf-8", "replace").strip()
        if text and text.isascii() and text.isprintable():
            assert problems == []
        else:
            assert len(problems) == 1 and str(file) in problems[0], problems


# -- the real command on fixed hostile files -----------------------------------------------


def kmeshd_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmeshd.cli", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,  # a hang fails the test here
        check=False,
    )


DEEP = "a = " + "[" * 100_000 + "]" * 100_000 + "\n"
HOSTILE = {
    "nul": b'[metrics]\nlisten = "\x00"\n',
    "nul escape": b'[identity]\ninventory = "/etc/\\u0000"\n',
    "deep nesting": DEEP.encode(),
    "huge integer": b"[metrics]\nmax_series = " + b"9" * 5000 + b"\n",
    "huge hex integer": b"[metrics]\nmax_series = 0x" + b"f" * 5000 + b"\n",
    "binary": bytes(range(256)) * 4,
}


@pytest.mark.parametrize("content", HOSTILE.values(), ids=HOSTILE.keys())
def test_command_on_hostile_config(tmp_path: Path, content: bytes) -> None:
    """Exit 78, one line per problem, each naming the file; no traceback."""
    path = tmp_path / "kmeshd.toml"
    path.write_bytes(content)
    result = kmeshd_check(path)
    assert (result.returncode, result.stdout) == (78, "")
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING ")]
    assert lines and all(line.startswith(f"{path}: ") for line in lines), lines


@pytest.mark.parametrize(
    ("special", "expected"),
    [
        ("fifo", "is a FIFO, not a regular file (name a regular file)"),
        ("/dev/zero", "is a character device, not a regular file (name a regular file)"),
        ("/dev/urandom", "is a character device, not a regular file (name a regular file)"),
        ("dir", "is a directory, not a regular file (name a regular file)"),
    ],
)
def test_command_on_special_files(tmp_path: Path, special: str, expected: str) -> None:
    """A FIFO, a device, a directory as the config, the inventory, the kubeconfig, the token
    or the CA: exit 78 at once with one line naming the file."""
    if special == "fifo":
        os.mkfifo(tmp_path / "fifo")
    if special == "dir":
        (tmp_path / "dir").mkdir()
    file = special if special.startswith("/") else str(tmp_path / special)
    good = tmp_path / "kubeconfig"
    good.write_text(GOOD_KUBECONFIG)
    k8s = '[identity]\nsource = "kubernetes"\n[kubernetes]\n'
    configs = {
        file: None,
        f"{tmp_path}/inv.toml": f'[identity]\ninventory = "{file}"\n',
        f"{tmp_path}/kube.toml": f'{k8s}kubeconfig = "{file}"\n',
        f"{tmp_path}/token.toml": f'{k8s}kubeconfig = "{good}"\nkubelet_token_file = "{file}"\n',
        f"{tmp_path}/ca.toml": f'{k8s}kubeconfig = "{good}"\nkubelet_ca_file = "{file}"\n',
    }
    for config, text in configs.items():
        if text is not None:
            Path(config).write_text(text)
        result = kmeshd_check(Path(config))
        assert (result.returncode, result.stdout) == (78, ""), config
        [line] = result.stderr.splitlines()
        assert line.startswith(f"{file}: ") or f'"{file}"' in line, line
        assert expected in line, line
