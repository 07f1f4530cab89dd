"""Which kmeshd was measured: HEAD and a digest of the daemon's sources (kmeshd/, bpf/).

Each run starts a fresh daemon from the working tree, so a change to those files while the
benchmark runs would mix versions in one table; the report flags that.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("kmeshd", "bpf")


def sources_digest(root: Path = ROOT) -> str:
    digest = hashlib.sha256()
    for top in SOURCES:
        for path in sorted((root / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode() + b"\0")
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def head(root: Path = ROOT) -> str:
    out = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def fingerprint() -> dict[str, Any]:
    return {"head": head(), "sources_sha256": sources_digest()}
