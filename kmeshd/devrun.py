"""`make run`: kmeshd in the foreground on an embedded config for this host.

Identities come from a generated inventory naming this host as one workload with all
its addresses, so local traffic shows up at once; /metrics on 127.0.0.1:15020, the
access log to the terminal and to journald, no textfile.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from kmeshd import cli


def host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True)
    return sorted(
        {a["local"] for link in json.loads(out.stdout) for a in link.get("addr_info", [])}
    )


def inventory(hostname: str, addresses: list[str]) -> str:
    quoted = ", ".join(f'"{a}"' for a in addresses)
    return f'[[workload]]\nname = "{hostname}"\nnamespace = "host"\naddresses = [{quoted}]\n'


def config(inventory_path: Path, listen: str) -> str:
    state = inventory_path.parent / "counters.json.gz"
    return (
        f'[identity]\ninventory = "{inventory_path}"\n'
        f'[metrics]\nlisten = "{listen}"\ntextfile = ""\nstate_file = "{state}"\n'
        '[accesslog]\nfile = "-"\njournald = true\n'
    )


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="kmeshd-run-"))
    inv = workdir / "inventory.toml"
    inv.write_text(inventory(socket.gethostname(), host_addresses()))
    cfg = workdir / "kmeshd.toml"
    cfg.write_text(config(inv, os.environ.get("KMESHD_LISTEN", "127.0.0.1:15020")))
    print(f"kmeshd: config {cfg}; metrics at http://127.0.0.1:15020/metrics", file=sys.stderr)
    return cli.main(["run", "--config", str(cfg)])


if __name__ == "__main__":
    sys.exit(main())
