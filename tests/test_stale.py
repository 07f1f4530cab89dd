"""Sockets that closed while no probe ran: swept out of the state map and counted as
closes, only when every live socket is known; and who may look for them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kmeshd.kernel import sockdiag
from kmeshd.kernel.layout import FLOW_KEY, SOCK_STATE, Direction, SockFlag, without_generation
from kmeshd.kernel.stale import may_enter_namespaces, sweep_closed_sockets


class FakeMap(dict[bytes, bytes]):
    """What sweep_closed_sockets uses of a map (stale.SweptMap), over a dict."""

    def pop(self, key: bytes) -> bytes | None:  # type: ignore[override]
        return super().pop(key, None)

    def insert(self, key: bytes, value: bytes) -> bool:
        return self.setdefault(key, value) is value

    def per_flow(self) -> dict[bytes, int]:
        """The inbox's closes summed by flow (slot byte zeroed)."""
        totals: dict[bytes, int] = {}
        for key, value in self.items():
            flow = without_generation(key)
            totals[flow] = totals.get(flow, 0) + int.from_bytes(value, sys.byteorder)
        return totals


def flow_key(port: int) -> bytes:
    return FLOW_KEY.codec.pack(bytes(16), bytes(16), port, Direction.OUTBOUND, 0)


def sock_state(port: int, established: bool) -> bytes:
    flags = SockFlag.ESTABLISHED if established else 0
    return SOCK_STATE.codec.pack(flow_key(port), flags, *[0] * 10)


def fake_socks(states: dict[int, bytes]) -> FakeMap:
    return FakeMap({c.to_bytes(8, sys.byteorder): v for c, v in states.items()})


def test_sweep_removes_only_cookies_that_are_not_alive() -> None:
    """Dead sockets go; of those, the established ones count as closes of their flow (the
    connect that never finished opened nothing, so closes nothing)."""
    socks = fake_socks(
        {
            1: sock_state(80, established=True),
            2: sock_state(80, established=True),
            3: sock_state(80, established=False),
            4: sock_state(443, established=True),
            5: sock_state(80, established=True),
        }
    )
    unseen = FakeMap()
    assert sweep_closed_sockets(socks, unseen, lambda: {2, 4, 99}) == 3
    assert sorted(int.from_bytes(k, sys.byteorder) for k in socks) == [2, 4]
    assert unseen.per_flow() == {flow_key(80): 2}
    sweep_closed_sockets(fake_socks({7: sock_state(80, established=True)}), unseen, set)
    assert unseen.per_flow() == {flow_key(80): 3}  # added, not replaced
    assert len(unseen) == 2  # each sweep's closes in an entry of their own


def test_a_full_inbox_loses_closes_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """When all 256 slots of a flow wait already, a further close cannot be handed over:
    it is logged as not counted, and the others still are."""
    unseen = FakeMap({flow_key(80)[:-1] + bytes([slot]): bytes(8) for slot in range(256)})
    socks = fake_socks({1: sock_state(80, True), 2: sock_state(443, True)})
    assert sweep_closed_sockets(socks, unseen, set) == 2
    assert unseen.per_flow()[flow_key(443)] == 1
    assert "1 closes of sockets closed while kmeshd was stopped are not counted" in caplog.text


def test_sweep_counts_only_what_it_removed() -> None:
    """An entry the old program deleted between listing and sweeping was counted by that
    program: the sweep does not count it again."""

    class Racing(FakeMap):
        def pop(self, key: bytes) -> bytes | None:  # type: ignore[override]
            return None

    unseen = FakeMap()
    assert sweep_closed_sockets(Racing(fake_socks({1: sock_state(80, True)})), unseen, set) == 0
    assert unseen == {}


def test_sweep_keeps_everything_when_live_sockets_cannot_be_listed() -> None:
    def refuse() -> set[int]:
        raise sockdiag.SockDiagError(1, "cannot enter network namespace /proc/1/ns/net")

    socks = fake_socks({1: sock_state(80, True), 2: sock_state(80, True)})
    unseen = FakeMap()
    assert sweep_closed_sockets(socks, unseen, refuse) is None
    assert len(socks) == 2 and unseen == {}


def test_sweep_of_an_empty_map_lists_nothing() -> None:
    def never() -> set[int]:
        raise AssertionError("not needed")

    assert sweep_closed_sockets(FakeMap(), FakeMap(), never) == 0


@pytest.mark.parametrize(
    ("cap_eff", "expected"),
    [
        ("000001ffffffffff", True),  # root, every capability
        (f"{1 << 21 | 1 << 19:016x}", True),  # CAP_SYS_ADMIN and CAP_SYS_PTRACE only
        (f"{1 << 39 | 1 << 38 | 1 << 21 | 1 << 12:016x}", False),  # the unit's: no SYS_PTRACE
        (f"{1 << 19:016x}", False),  # CAP_SYS_PTRACE alone: may look, not enter
    ],
)
def test_may_enter_namespaces(tmp_path: Path, cap_eff: str, expected: bool) -> None:
    status = tmp_path / "status"
    status.write_text(f"Name:\tkmeshd\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n")
    assert may_enter_namespaces(status) is expected
