"""Which addresses the kernel tracks: every workload address and service VIP the identity
source knows. A connection with neither end among them costs the probe one lookup and
is counted as unattributed, nothing more.

Recomputing the set over a large cluster costs milliseconds, so it is handed to the
kernel only when the identities changed, and at most once every `every` seconds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Protocol

from kmeshd.events import encode_address
from kmeshd.identity.model import IPAddress
from kmeshd.identity.sources import IdentitySource

KNOWN_EVERY_S = 1.0  # new pod addresses reach the kernel's known set within this


class KnownSetter(Protocol):
    def set_known(self, keys: Iterable[bytes]) -> int:
        """Make the kernel's set equal `keys`; returns the entries refused (map full)."""
        ...


@functools.lru_cache(maxsize=1 << 17)
def _encoded(address: IPAddress) -> bytes:
    """An address as the kernel keeps it, encoded once: a cluster has tens of thousands of
    service addresses, and the set is handed over again whenever one changes."""
    return encode_address(address)


class KnownAddresses:
    """Keeps the kernel's known-address set equal to the identity source's."""

    def __init__(
        self, probe: KnownSetter, clock: Callable[[], float], every: float = KNOWN_EVERY_S
    ) -> None:
        self._probe = probe
        self._clock = clock
        self._every = every
        self._version = -1
        self._at = 0.0
        self.refused = 0  # entries the last update could not add: kmeshd_bpf_map_full_total

    def update(self, source: IdentitySource, force: bool = False) -> None:
        """Hand over the source's addresses if they changed (or `force`), and if the last
        update is at least `every` seconds old."""
        now = self._clock()
        if not force and (source.known_version == self._version or now - self._at < self._every):
            return
        self._version, self._at = source.known_version, now
        addresses = source.view().known_addresses()
        self.refused = self._probe.set_known(map(_encoded, addresses))
