"""A Debian bookworm booted with systemd-nspawn, with kmeshd's .deb installed by apt.

How:

- the rootfs comes from debootstrap (minbase, plus systemd, dbus, python3 and iproute2 for
  the test's namespaces), cached in CACHE: building it takes ~45 s, copying it ~2 s;
- the .deb is installed with apt inside (dependencies from Debian's archive; downloaded
  packages are kept in CACHE/apt-archives between runs);
- the boot binds in what the container lacks: the host's kernel headers (bcc compiles
  against them), a fresh bpffs at /sys/fs/bpf (the container's /sys is read-only), and
  lets bpf() and perf_event_open() through nspawn's seccomp filter;
- commands run inside with nsenter; traffic runs as transient units (`systemd-run`),
  because nsenter does not enter the container's cgroup, which the probe is attached to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE = Path("/var/cache/kmeshd-test")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
INCLUDE = "systemd,systemd-sysv,dbus,python3,iproute2"
ROOTFS = CACHE / f"rootfs-{SUITE}-{INCLUDE.replace(',', '-')}"
APT_ARCHIVES = CACHE / "apt-archives"


def run(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
    return done


def cached_rootfs() -> Path:
    """The debootstrapped rootfs, built once per machine (atomically: a rename)."""
    if (ROOTFS / "etc" / "os-release").exists():
        return ROOTFS
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = ROOTFS.with_name(ROOTFS.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    run(
        "debootstrap",
        "--variant=minbase",
        f"--include={INCLUDE}",
        SUITE,
        str(partial),
        MIRROR,
        timeout=900,
    )
    partial.rename(ROOTFS)
    return ROOTFS


class Container:
    """A booted container: run commands inside, read its files."""

    def __init__(self, root: Path, leader: int, process: subprocess.Popen[bytes]) -> None:
        self.root, self.leader, self._process = root, leader, process

    def sh(
        self, script: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`sh -c script` inside every namespace of the container (not its cgroup)."""
        return run(
            "nsenter",
            "-t",
            str(self.leader),
            "-a",
            "sh",
            "-c",
            script,
            timeout=timeout,
            check=check,
        )

    def unit(self, script: str, *properties: str, timeout: float = 120) -> str:
        """Run `script` as a transient unit (in the container's cgroup), wait, its stdout."""
        props = " ".join(f"-p '{p}'" for p in properties)
        quoted = script.replace("'", "'\"'\"'")
        return self.sh(
            f"systemd-run --wait --pipe --quiet {props} sh -c '{quoted}'", timeout=timeout
        ).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def cgroup(self) -> str:
        """The container's cgroup v2 path on the host (what its systemd sees as /)."""
        for line in Path(f"/proc/{self.leader}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
        raise RuntimeError("the container has no cgroup v2 path")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()  # nspawn halts the container on SIGTERM
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def install(root: Path, deb: Path, *also: str) -> str:
    """apt-get install the .deb (and packages `also`) in the rootfs, not booted yet."""
    APT_ARCHIVES.mkdir(parents=True, exist_ok=True)
    shutil.copy(deb, root / "root" / deb.name)  # the container's /tmp is a fresh tmpfs
    script = (
        "apt-get update -q >/dev/null && "
        f"apt-get install -y -q --no-install-recommends /root/{deb.name} {' '.join(also)}"
    )
    done = run(
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--pipe",
        f"--directory={root}",
        f"--bind={APT_ARCHIVES}:/var/cache/apt/archives",
        "--setenv=DEBIAN_FRONTEND=noninteractive",
        "sh",
        "-c",
        script,
        timeout=600,
    )
    return done.stdout


def _leader(process: subprocess.Popen[bytes], timeout: float) -> int:
    """The container's PID 1 (a child of systemd-nspawn), once it runs systemd."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {process.returncode}")
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        for pid in children.read_text().split():
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return int(pid)
        time.sleep(0.1)
    raise RuntimeError("the container's systemd did not start")


def _wait_running(container: Container, log: Path, timeout: float) -> None:
    """Until the container's systemd says running (or degraded). Right after PID 1 starts
    its bus is not up yet, and systemctl fails to connect: ask again."""
    deadline = time.monotonic() + timeout
    while True:
        state = container.sh("systemctl is-system-running --wait", check=False, timeout=timeout)
        if state.stdout.strip() in ("running", "degraded"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the container did not boot: {state.stdout}{state.stderr}" f"{log.read_text()}"
            )
        time.sleep(0.2)


@contextmanager
def booted(root: Path, bpffs: Path, log: Path, timeout: float = 60) -> Iterator[Container]:
    """Boot the rootfs; yield once its systemd reached `running`; halt it after."""
    bpffs.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "bpf", "-o", "mode=0700", "bpf", str(bpffs))  # as systemd mounts it
    release = os.uname().release
    command = [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--boot",
        f"--directory={root}",
        "--capability=all",
        "--private-network",
        "--system-call-filter=bpf perf_event_open",
        f"--bind-ro=/lib/modules/{release}",
        "--bind-ro=/usr/src",
        f"--bind={bpffs}:/sys/fs/bpf",
        "--console=passive",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    container = None
    try:
        container = Container(root, _leader(process, timeout), process)
        _wait_running(container, log, timeout)
        yield container
    finally:
        if container is not None:
            container.stop()
        elif process.poll() is None:
            process.kill()
            process.wait()
        run("umount", "--lazy", str(bpffs), check=False)
