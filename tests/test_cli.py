"""The command line: exit codes and one-line reasons for bad input at start-up."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmeshd import __version__
from kmeshd.errors import UnavailableError
from tests.netns import is_root


def kmeshd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmeshd.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kmeshd.toml"
    inventory = tmp_path / "inventory.toml"
    inventory.write_text('[[workload]]\nname = "a"\naddresses = ["10.0.0.1"]\n')
    path.write_text(f'[identity]\ninventory = "{inventory}"\n' + text)
    return path


def test_version() -> None:
    """--version prints the version and exits 0."""
    result = kmeshd("--version")
    assert (result.returncode, result.stdout) == (0, f"kmeshd {__version__}\n")


def test_check_config_ok(tmp_path: Path) -> None:
    """A valid config and inventory: exit 0 and say so."""
    path = config(tmp_path, "")
    result = kmeshd("check-config", "--config", str(path))
    assert (result.returncode, result.stdout) == (0, f"{path}: ok\n")


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    """Several problems: exit 78 with one `file: key: problem` line each, config and inventory."""
    path = config(tmp_path, '[metrics]\ninterval = "5 s"\nport = 1\n')
    result = kmeshd("check-config", "--config", str(path))
    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: metrics.port: unknown key")
    assert lines[1].startswith(f'{path}: metrics.interval: "5 s" is not a duration')


def test_check_config_reports_web_config_problems(tmp_path: Path) -> None:
    """metrics.web_config's file, and the certificate it names, are checked: exit 78."""
    web = tmp_path / "web.yml"
    web.write_text(
        f"tls_server_config:\n  cert_file: {tmp_path}/none.crt\n  key_file: k.key\n"
        "  min_version: TLS11\n"
    )
    path = config(tmp_path, f'[metrics]\nweb_config = "{web}"\n')
    result = kmeshd("check-config", "--config", str(path))
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        f'{web}: tls_server_config.min_version: "TLS11" is refused: this host\'s OpenSSL'
        ' policy allows TLS 1.2 and 1.3 only (use "TLS12" or "TLS13")'
    ]
    web.write_text(web.read_text().replace("  min_version: TLS11\n", ""))
    result = kmeshd("check-config", "--config", str(path))
    assert (result.returncode, result.stderr) == (
        78,
        f"{web}: tls_server_config.cert_file: {tmp_path}/none.crt: does not exist\n",
    )


def bad_inventory(tmp_path: Path) -> Path:
    """Replace config()'s inventory with one whose address is no IP address."""
    inventory = tmp_path / "inventory.toml"
    inventory.write_text('[[workload]]\nname = "a"\naddresses = ["10.0.0.300"]\n')
    return inventory


def test_check_config_reports_config_and_inventory_problems_together(tmp_path: Path) -> None:
    """A bad config value and a bad inventory: both files' problems in one run, config first."""
    path = config(tmp_path, '[metrics]\ninterval = "5 s"\n')
    inventory = bad_inventory(tmp_path)
    result = kmeshd("check-config", "--config", str(path))
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        f'{path}: metrics.interval: "5 s" is not a duration (use a number with a unit: 250ms,'
        " 5s, 1m)",
        f'{inventory}: workload[0].addresses[0]: "10.0.0.300" is not an IP address',
    ]


def test_check_config_skips_the_inventory_a_bad_identity_key_would_name(tmp_path: Path) -> None:
    """When identity.inventory itself is bad, no inventory is checked in its place."""
    path = tmp_path / "kmeshd.toml"
    path.write_text("[identity]\ninventory = 5\n")
    result = kmeshd("check-config", "--config", str(path))
    assert result.returncode == 78
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{path}: identity.inventory: ")


def test_check_config_reports_inventory_problems(tmp_path: Path) -> None:
    """A bad inventory address fails check-config with the inventory's file and key path."""
    path = config(tmp_path, "")
    inventory = bad_inventory(tmp_path)
    result = kmeshd("check-config", "--config", str(path))
    assert result.returncode == 78
    assert (
        result.stderr
        == f'{inventory}: workload[0].addresses[0]: "10.0.0.300" is not an IP address\n'
    )


def test_missing_explicit_config_file(tmp_path: Path) -> None:
    """--config naming a file that does not exist is a config error (78)."""
    result = kmeshd("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 78
    assert str(tmp_path / "nope.toml") in result.stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def run_fails(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = config(tmp_path, text + '\n[bpf]\npin_dir = "/sys/fs/bpf/kmeshd-cli-test"\n')
    return kmeshd("run", "--config", str(path))


def test_listen_port_in_use_is_unavailable(tmp_path: Path, busy_port: int) -> None:
    """metrics.listen on a port in use: exit 69, one line naming the key and the fix."""
    result = run_fails(tmp_path, f'[metrics]\nlisten = "127.0.0.1:{busy_port}"\ntextfile = ""')
    assert result.returncode == 69
    assert result.stderr.strip().splitlines()[-1] == (
        f"kmeshd: metrics.listen 127.0.0.1:{busy_port}: address already in use: "
        f"stop the other listener or change metrics.listen in {tmp_path / 'kmeshd.toml'}"
    )


def test_missing_textfile_directory_set_explicitly(tmp_path: Path) -> None:
    """An explicit textfile in a missing directory: exit 78 naming file, key and directory."""
    missing = tmp_path / "missing"
    result = run_fails(tmp_path, f'[metrics]\nlisten = ""\ntextfile = "{missing}/k.prom"')
    assert result.returncode == 78
    assert result.stderr.strip().splitlines()[-1] == (
        f"{tmp_path / 'kmeshd.toml'}: metrics.textfile: directory {missing} does not exist "
        "(create it or change metrics.textfile)"
    )


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A real read-only filesystem (root ignores permission bits)."""
    if not is_root():
        pytest.skip("mounting needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)], check=True)
    yield ro
    subprocess.run(["umount", str(ro)], check=True)


def test_read_only_textfile_directory(tmp_path: Path, read_only_dir: Path) -> None:
    """A textfile directory on a read-only filesystem: exit 78 with the reason."""
    result = run_fails(tmp_path, f'[metrics]\nlisten = ""\ntextfile = "{read_only_dir}/k.prom"')
    assert result.returncode == 78
    assert result.stderr.strip().splitlines()[-1] == (
        f"{tmp_path / 'kmeshd.toml'}: metrics.textfile: directory {read_only_dir} is not "
        "writable (Read-only file system) (create it or change metrics.textfile)"
    )


def test_read_only_accesslog_directory(tmp_path: Path, read_only_dir: Path) -> None:
    """An access-log directory that cannot be written: exit 78 with the key."""
    text = f'[metrics]\nlisten = ""\ntextfile = ""\n[accesslog]\nfile = "{read_only_dir}/a.json"'
    result = run_fails(tmp_path, text)
    assert result.returncode == 78
    assert result.stderr.strip().splitlines()[-1] == (
        f"{tmp_path / 'kmeshd.toml'}: accesslog.file: directory {read_only_dir} is not "
        "writable (Read-only file system) (create it or change accesslog.file)"
    )


def test_cgroup_that_is_not_cgroup2(tmp_path: Path) -> None:
    """bpf.cgroup naming a plain directory: exit 78 naming the key."""
    text = f'[metrics]\nlisten = ""\ntextfile = ""\n[bpf]\ncgroup = "{tmp_path}"'
    path = config(tmp_path, text)
    result = kmeshd("run", "--config", str(path))
    assert result.returncode == 78
    assert result.stderr.strip().splitlines()[-1] == (
        f'{path}: bpf.cgroup: {tmp_path} is not a cgroup v2 directory (use "auto", or a'
        " directory on a cgroup2 mount)"
    )


def test_run_without_bcc_is_unavailable_in_one_line(tmp_path: Path) -> None:
    """`kmeshd run` where the bcc bindings do not import: exit 69, one line naming the
    package, and nothing attached."""
    shadow = tmp_path / "shadow" / "bcc"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("no module named bcc (test)")\n')
    path = config(tmp_path, '[metrics]\nlisten = ""\ntextfile = ""\n[accesslog]\nfile = ""')
    shadowed = {**os.environ, "PYTHONPATH": f"{tmp_path / 'shadow'}:{Path.cwd()}"}
    result = kmeshd("run", "--config", str(path), env=shadowed)
    assert result.returncode == 69
    assert [line for line in result.stderr.splitlines() if line.startswith("kmeshd:")] == [
        "kmeshd: the bcc Python bindings cannot be imported (no module named bcc (test)):"
        " apt-get install python3-bpfcc, and run kmeshd with /usr/bin/python3"
    ]


def test_missing_bcc_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the bcc bindings the error names python3-bpfcc."""
    from kmeshd.kernel import build

    monkeypatch.setitem(sys.modules, "bcc", None)
    with pytest.raises(UnavailableError, match="apt-get install python3-bpfcc"):
        build.import_bcc()


def snapshot(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `roots` with its mode, size and mtime."""
    found = {}
    for root in roots:
        for directory, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                st = os.lstat(os.path.join(directory, name))
                found[os.path.join(directory, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


EMBEDDED = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")


def test_check_config_changes_nothing(tmp_path: Path) -> None:
    """check-config of a config whose every file is yet to be written, with a kubeconfig
    of embedded certificates: ok, and no file or directory made, here or in /run/kmeshd
    (the running daemon's)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "clusters: [{name: c, cluster: {server: 'https://10.0.0.1:6443',"
        f" certificate-authority-data: {EMBEDDED.decode()}}}}}]\n"
        f"users: [{{name: u, user: {{client-certificate-data: {EMBEDDED.decode()},"
        f" client-key-data: {EMBEDDED.decode()}}}}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
    )
    (tmp_path / "out").mkdir()
    path = tmp_path / "kmeshd.toml"
    path.write_text(
        f'[identity]\nsource = "kubernetes"\n[kubernetes]\nkubeconfig = "{kubeconfig}"\n'
        f'[metrics]\ntextfile = "{tmp_path}/out/k.prom"\nstate_file = "{tmp_path}/out/s.gz"\n'
        f'[accesslog]\nfile = "{tmp_path}/out/a.json"\n'
    )
    before = snapshot(tmp_path, Path("/run/kmeshd"))
    result = kmeshd("check-config", "--config", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{path}: ok\n", "")
    assert snapshot(tmp_path, Path("/run/kmeshd")) == before


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '[accesslog]\nfile = "{t}"',
            "accesslog.file: {t} is a directory, not a regular file (change accesslog.file)",
        ),
        (
            '[metrics]\ntextfile = "{t}/missing/k.prom"',
            "metrics.textfile: directory {t}/missing does not exist (create it or change"
            " metrics.textfile)",
        ),
        (
            '[metrics]\nstate_file = "{t}/kmeshd.toml/s.gz"',
            "metrics.state_file: {t}/kmeshd.toml is not a directory (create it or change"
            " metrics.state_file)",
        ),
        (
            '[bpf]\ncgroup = "{t}/no-such-cgroup"',
            'bpf.cgroup: {t}/no-such-cgroup is not a cgroup v2 directory (use "auto", or a'
            " directory on a cgroup2 mount)",
        ),
    ],
)
def test_check_config_refuses_what_run_refuses(tmp_path: Path, text: str, problem: str) -> None:
    """Paths that `run` cannot use: check-config says so (78), as `run` does, before any
    kernel work."""
    path = config(tmp_path, text.format(t=tmp_path) + "\n")
    expected = f"{path}: {problem.format(t=tmp_path)}"
    for verb in ("check-config", "run"):
        result = kmeshd(verb, "--config", str(path))
        assert (result.returncode, result.stderr.splitlines()[-1:]) == (78, [expected]), verb


def test_a_token_no_header_can_carry_stops_check_config_and_run(tmp_path: Path) -> None:
    """A kubelet token file with a line break inside: exit 78 naming the file, both verbs."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "clusters: [{name: c, cluster: {server: 'https://10.0.0.1:6443'}}]\n"
        "users: [{name: u, user: {token: abc}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
    )
    token = tmp_path / "token"
    token.write_text("abc\ndef\n")
    path = tmp_path / "kmeshd.toml"
    path.write_text(
        f'[identity]\nsource = "kubernetes"\n[kubernetes]\nkubeconfig = "{kubeconfig}"\n'
        f'kubelet_token_file = "{token}"\n[metrics]\nlisten = ""\ntextfile = ""\n'
        '[accesslog]\nfile = ""\n'
    )
    expected = (
        f'{path}: kubernetes.kubelet_token_file: "{token}": the token has a line break at'
        " character 4, which no HTTP header can carry (a token is one line of ASCII text)"
    )
    for verb in ("check-config", "run"):
        result = kmeshd(verb, "--config", str(path))
        assert (result.returncode, result.stderr.splitlines()[-1:]) == (78, [expected]), verb


def test_load_for_a_user_that_does_not_exist_says_so_before_touching_the_kernel(
    tmp_path: Path,
) -> None:
    """`kmeshd load --user` names the missing user and the fix, exit 69, nothing loaded."""
    cfg = config(tmp_path, f'[bpf]\npin_dir = "{tmp_path / "pins"}"\n')
    done = kmeshd("load", "--config", str(cfg), "--user", "no-such-kmeshd-user")
    assert (done.returncode, done.stdout) == (69, "")
    assert done.stderr == (
        "kmeshd: there is no user 'no-such-kmeshd-user': create it (the package does, with"
        " systemd-sysusers) or name another with --user\n"
    )
    assert not (tmp_path / "pins").exists()


def test_load_with_a_bad_config_exits_78_like_check_config(tmp_path: Path) -> None:
    cfg = config(tmp_path, "[metrics]\ninterval = 5\n")
    done = kmeshd("load", "--config", str(cfg))
    assert done.returncode == 78
    assert "metrics.interval" in done.stderr
