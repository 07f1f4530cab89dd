"""The Kubernetes identity cache: what the kubelet and the apiserver said, merged, answering
the same questions as the static inventory (`IdentityView`).

Updates arrive as whole lists (a kubelet poll, an apiserver list) or single changes (a
watch event). Nothing is forgotten at once: a pod that every source stopped reporting, or
that finished (Succeeded/Failed), is *dead* but still answers for its addresses for
`grace` seconds, because its connections close after it is gone and are published up to
a metrics interval later. A live pod always beats a dead one for an address (IPs are
reused), and among equals the newest pod wins. Services and EndpointSlices die the same
way.

Only the main thread touches the cache (the sources hand it updates through a queue), so
it needs no locks and every lookup is one or two dict accesses.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kmeshd.identity.model import (
    IPAddress,
    Name,
    Service,
    Workload,
    ip_key,
    plain_ip,
    service_name,
    workload_names,
)
from kmeshd.identity.objects import Endpoints, Pod

K = TypeVar("K", bound=Hashable)  # an object's key
C = TypeVar("C", bound=Hashable)  # what an object claims: an address, an address and port
E = TypeVar("E")

KUBELET = "kubelet"
APISERVER = "apiserver"
PODS, SERVICES, SLICES = "pods", "services", "endpointslices"

DEFAULT_GRACE_S = 120.0


_SOURCE_SETS: dict[frozenset[str], frozenset[str]] = {}


def _shared(sources: frozenset[str]) -> frozenset[str]:
    """One object per distinct set of sources: 150,000 pods share two or three of them."""
    return _SOURCE_SETS.setdefault(sources, sources)


@dataclass(slots=True, eq=False)
class _Entry(Generic[E]):
    """One object and its life: which sources report it, and since when it is dead."""

    value: E
    sources: frozenset[str] = frozenset()
    dead_since: float | None = None
    answer: Any = None  # what a lookup returns, kept here to save it a hop through memory

    @property
    def alive(self) -> bool:
        return self.dead_since is None


class _Index(Generic[C, E]):
    """claim -> the best entry making it, by `rank` (smallest wins). Almost every claim has
    one claimant, kept in `best` alone; the lists of rivals exist only where there are any.
    `answers` holds the best entry's answer for each claim: a lookup is one dict access,
    with no hop through the entry (lookups are memory-bound at cluster scale)."""

    def __init__(self, rank: Callable[[_Entry[E]], Any]) -> None:
        self._rank = rank
        self.best: dict[C, _Entry[E]] = {}
        self.answers: dict[C, Any] = {}
        self._rivals: dict[C, list[_Entry[E]]] = {}  # every claimant, where more than one

    def add(self, key: C, entry: _Entry[E]) -> None:
        current = self.best.get(key)
        if current is None:
            self._choose(key, entry)
            return
        self._rivals.setdefault(key, [current]).append(entry)
        self.elect(key)

    def remove(self, key: C, entry: _Entry[E]) -> None:
        rivals = self._rivals.get(key)
        if rivals is None:
            if self.best.get(key) is entry:
                del self.best[key]
                del self.answers[key]
            return
        if entry in rivals:
            rivals.remove(entry)
        if len(rivals) == 1:
            del self._rivals[key]
            self._choose(key, rivals[0])
        else:
            self.elect(key)

    def elect(self, key: C) -> None:
        """Choose again after a claimant changed (its life, or its answer)."""
        rivals = self._rivals.get(key)
        if rivals:
            self._choose(key, min(rivals, key=self._rank))
        elif key in self.best:
            self.answers[key] = self.best[key].answer

    def _choose(self, key: C, entry: _Entry[E]) -> None:
        self.best[key] = entry
        self.answers[key] = entry.answer


def _pod_rank(e: _Entry[Pod]) -> tuple[bool, float, str]:
    return (not e.alive, -e.value.created, e.value.uid)


def _service_rank(e: _Entry[Service]) -> tuple[bool, str, str]:
    return (not e.alive, e.value.namespace, e.value.name)


def _slice_rank(e: _Entry[Endpoints]) -> tuple[bool, tuple[str, str], str]:
    return (not e.alive, e.value.service, e.value.name)


def _service_names(s: Service) -> tuple[Name]:
    return (service_name(s),)


def _pod_ips(p: Pod) -> tuple[int, ...]:
    # A host-network pod's address is its node's, shared with every other such pod and
    # with the node's own processes: no single pod may claim it.
    return () if p.host_network else tuple(map(ip_key, p.workload.addresses))


def _at(key: int, port: int) -> int:
    """An address key and a port as one int: no tuple per endpoint (150,000 of them in a
    large cluster), and a faster dict lookup. Only for a port of 16 bits: port 65616 at one
    address would be port 80 at the next. Lookups pass the kernel's u16 ports; claims go
    through _port() first."""
    return key << 16 | port


def _port(port: int) -> bool:
    """Whether a port can be claimed. The parsers reject any other, and this makes sure
    that no object that bypassed them makes one address's port alias another's."""
    return 0 < port <= 0xFFFF


def _vip_ports(s: Service) -> tuple[int, ...]:
    return tuple(_at(ip_key(ip), p.port) for ip in s.addresses for p in s.ports if _port(p.port))


def _endpoints(s: Endpoints) -> tuple[int, ...]:
    return tuple(_at(ip, port) for ip in s.addresses for port in s.ports if _port(port))


class _Store(Generic[K, C, E]):
    """Objects of one kind by key, with the index of their claims; handles life and death."""

    def __init__(
        self,
        key: Callable[[E], K],
        claims: Callable[[E], Iterable[C]],
        rank: Callable[[_Entry[E]], Any],
        answer: Callable[[E], Any] = lambda value: value,
        finished: Callable[[E], bool] = lambda _value: False,
        names: Callable[[E], Iterable[Name]] = lambda _value: (),
    ) -> None:
        self.key, self._claims, self._finished = key, claims, finished
        self._answer = answer
        self._names = names
        # hash(name) -> entries answering to it, dead ones too. Hashes, not the names: a
        # name tuple per pod would cost 150,000 pods tens of MiB. Two names that collide
        # make a gone identity look known: its series stay a little longer, no worse.
        self.names: dict[int, int] = {}
        self.entries: dict[K, _Entry[E]] = {}
        self._reported: dict[str, set[K]] = {}  # source -> keys it reports now
        self.index: _Index[C, E] = _Index(rank)
        self._dead: set[K] = set()  # so that gc looks at these, not at every entry
        self.claims_changed = 0  # bumped when what entries claim (or who reports them) changed

    def put(self, source: str, value: E, now: float) -> None:
        """`source` reports `value`: alive, unless it is finished (a Succeeded/Failed pod),
        which is dead from the first time it is seen so."""
        key = self.key(value)
        old = self.entries.get(key)
        sources = _shared((old.sources if old else frozenset()) | {source})
        self._reported.setdefault(source, set()).add(key)
        dead_since = None
        if self._finished(value):
            dead_since = old.dead_since if old and old.dead_since is not None else now
        claims = self._claims(value)
        self._rename(old.value if old is not None else None, value)
        if old is not None and self._claims(old.value) == claims:
            # Most updates change labels or status, not addresses: update in place.
            if old.sources != sources:
                self.claims_changed += 1
            old.value, old.sources, old.dead_since = value, sources, dead_since
            old.answer = self._answer(value)
            for claim in claims:
                self.index.elect(claim)
        else:
            self._unindex(old)
            self.entries[key] = _Entry(value, sources, dead_since, self._answer(value))
            for claim in claims:
                self.index.add(claim, self.entries[key])
            self.claims_changed += 1
        if dead_since is None:
            self._dead.discard(key)
        else:
            self._dead.add(key)

    def delete(self, source: str, key: K, now: float) -> None:
        entry = self.entries.get(key)
        if entry is None:
            return
        entry.sources = _shared(entry.sources - {source})
        self._reported.get(source, set()).discard(key)
        if not entry.sources and entry.alive:
            entry.dead_since = now
            self._dead.add(key)
            for claim in self._claims(entry.value):
                self.index.elect(claim)

    def replace(self, source: str, values: Iterable[E], now: float) -> None:
        """The whole list from `source`: what it no longer reports, it deleted."""
        listed = set()
        for value in values:
            listed.add(self.key(value))
            self.put(source, value, now)
        for key in self._reported.get(source, set()) - listed:
            self.delete(source, key, now)

    def gc(self, now: float, grace: float) -> int:
        expired = [k for k in self._dead if now - (self.entries[k].dead_since or now) >= grace]
        for key in expired:
            self._dead.discard(key)
            entry = self.entries.pop(key)
            for source in entry.sources:
                self._reported[source].discard(key)
            self._forget(entry)
        self.claims_changed += bool(expired)
        return len(expired)

    def _unindex(self, entry: _Entry[E] | None) -> None:
        if entry is not None:
            for claim in self._claims(entry.value):
                self.index.remove(claim, entry)

    def _forget(self, entry: _Entry[E]) -> None:
        self._unindex(entry)
        self._rename(entry.value, None)

    def _rename(self, old: E | None, new: E | None) -> None:
        """Keep `names` counting the entries that answer to each name."""
        before = tuple(map(hash, self._names(old))) if old is not None else ()
        after = tuple(map(hash, self._names(new))) if new is not None else ()
        if before == after:
            return
        for name in before:
            left = self.names[name] - 1
            if left:
                self.names[name] = left
            else:
                del self.names[name]
        for name in after:
            self.names[name] = self.names.get(name, 0) + 1


class IdentityCache:
    """Pods, services and endpoint slices from every source; an `IdentityView`."""

    def __init__(self, node: str, grace: float = DEFAULT_GRACE_S) -> None:
        self.node = node
        self.grace = grace
        self._pods: _Store[str, int, Pod] = _Store(
            lambda p: p.uid,
            _pod_ips,
            _pod_rank,
            lambda p: p.workload,
            lambda p: p.terminal,
            lambda p: workload_names(p.workload),
        )
        self._services: _Store[tuple[str, str], int, Service] = _Store(
            lambda s: (s.namespace, s.name), _vip_ports, _service_rank, names=_service_names
        )
        self._slices: _Store[tuple[str, str], int, Endpoints] = _Store(
            lambda s: (s.namespace, s.name), _endpoints, _slice_rank, lambda s: s.service
        )
        self._known: tuple[int, frozenset[IPAddress]] | None = None
        # (source, resource) -> objects skipped as not valid: kept here so that a reload,
        # which keeps the cache, keeps the counts (kmeshd_identity_objects_rejected_total)
        self.rejected: dict[tuple[str, str], int] = {}
        self.version = 0  # moves with every change (IdentityView.version)
        self._stores: dict[str, _Store[Any, Any, Any]] = {
            PODS: self._pods,
            SERVICES: self._services,
            SLICES: self._slices,
        }

    # -- updates: `resource` is PODS, SERVICES or SLICES ----------------------------------

    def put(self, resource: str, source: str, value: Pod | Service | Endpoints, now: float) -> None:
        """`source` reports this object (new or changed)."""
        self.version += 1
        self._stores[resource].put(source, value, now)

    def delete(self, resource: str, source: str, key: Hashable, now: float) -> None:
        """`source` no longer has the object with this key (a pod's uid, else (namespace,
        name)); it dies when no source has it."""
        self.version += 1
        self._stores[resource].delete(source, key, now)

    def replace(self, resource: str, source: str, values: Iterable[Any], now: float) -> None:
        """All `source` has of `resource` now: what it no longer lists, it deleted."""
        self.version += 1
        self._stores[resource].replace(source, values, now)

    def gc(self, now: float) -> int:
        """Forget what has been dead longer than the grace period; returns how many."""
        gone = sum(s.gc(now, self.grace) for s in self._stores.values())
        self.version += bool(gone)
        return gone

    @property
    def known_version(self) -> int:
        """Changes whenever known_addresses() may have: not on label or status changes."""
        return self._pods.claims_changed + self._services.claims_changed

    # -- lookups (IdentityView) -----------------------------------------------------------

    def workload_at(self, ip: IPAddress) -> Workload | None:
        answer: Workload | None = self._pods.index.answers.get(ip_key(ip))
        return answer

    def service_at(self, ip: IPAddress, port: int) -> Service | None:
        """The service whose cluster IP and port these are."""
        answer: Service | None = self._services.index.answers.get(_at(ip_key(ip), port))
        return answer

    def service_behind(self, ip: IPAddress, port: int) -> Service | None:
        """The service whose EndpointSlices list this address and target port."""
        key = self._slices.index.answers.get(_at(ip_key(ip), port))
        if key is None:
            return None
        service = self._services.entries.get(key)
        return service.value if service is not None else None

    def known_addresses(self) -> frozenset[IPAddress]:
        """This node's pod addresses and every cluster IP: the sockets worth tracking here
        have one of these at an end. Remote pods are resolved, but not tracked for. Made
        again only when known_version moved."""
        version = self.known_version
        if self._known is not None and self._known[0] == version:
            return self._known[1]
        local = {
            plain_ip(ip)
            for e in self._pods.entries.values()
            if (e.value.node == self.node or KUBELET in e.sources) and not e.value.host_network
            for ip in e.value.workload.addresses
        }
        vips = {plain_ip(ip) for e in self._services.entries.values() for ip in e.value.addresses}
        self._known = (version, frozenset(local | vips))
        return self._known[1]

    def knows(self, name: Name) -> bool:
        """Whether a pod, workload or service of this name is in the cache (alive, or dead
        within the grace period)."""
        key = hash(name)
        return key in self._pods.names or key in self._services.names

    def counts(self) -> dict[str, int]:
        """Objects held, by kind (dead ones included): for logs and self-metrics."""
        return {
            "pods": len(self._pods.entries),
            "services": len(self._services.entries),
            "endpointslices": len(self._slices.entries),
        }
