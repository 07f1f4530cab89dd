"""What a reload changes, as a typed diff of two configs; and that a bad new config opens
nothing and changes nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kmeshd.config import AccessLogConfig, BpfConfig, Config, KubernetesConfig, MetricsConfig
from kmeshd.errors import ConfigError
from kmeshd.identity.model import Identities
from kmeshd.identity.sources import IdentitySource, StaticSource
from kmeshd.reload import SourceOpener, identities_changed, needs_restart, prepare

BASE = Config()


def changed(**sections: object) -> Config:
    return dataclasses.replace(BASE, **sections)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("new", "restart"),
    [
        (BASE, []),
        (changed(metrics=MetricsConfig(listen="[::1]:15020")), ["metrics.listen"]),
        (changed(metrics=MetricsConfig(interval=1.0)), []),
        (changed(bpf=BpfConfig(cgroup="/sys/fs/cgroup/x")), ["bpf.cgroup"]),
        (
            changed(bpf=BpfConfig(cgroup="/sys/fs/cgroup/x", pin_dir="/sys/fs/bpf/other")),
            ["bpf.cgroup", "bpf.pin_dir"],
        ),
        (changed(bpf=BpfConfig(live_updates=False)), []),
        (changed(accesslog=AccessLogConfig(max_rate=5)), []),
    ],
)
def test_keys_that_need_a_restart(new: Config, restart: list[str]) -> None:
    """Only the listener, the cgroup and the pin directory wait for a restart."""
    assert needs_restart(BASE, new) == restart


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        (BASE, False),
        (changed(kubernetes=KubernetesConfig(node_name="n1")), True),
        (changed(metrics=MetricsConfig(interval=1.0)), False),
    ],
)
def test_identity_settings_changed(new: Config, expected: bool) -> None:
    assert identities_changed(BASE, new) is expected


def opener(opened: list[Config]) -> SourceOpener:
    """Opens an empty inventory source, noting each config it was asked for."""

    def open_source(config: Config, previous: IdentitySource | None) -> IdentitySource:
        opened.append(config)
        return StaticSource(Identities())

    return open_source


def test_prepare_reads_the_file_again_and_opens_what_changed(tmp_path: Path) -> None:
    """The inventory source is opened anew; unchanged access-log settings keep the sinks."""
    path = tmp_path / "kmeshd.toml"
    path.write_text('[metrics]\ninterval = "2s"\nlisten = "127.0.0.1:1"\n')
    running = dataclasses.replace(BASE, path=path)
    opened: list[Config] = []
    plan = prepare(running, StaticSource(Identities()), opener(opened))
    assert plan.config.metrics.interval == 2.0
    assert plan.restart_keys == ["metrics.listen"]
    assert plan.source is not None and opened == [plan.config]
    assert plan.sinks is None


def test_prepare_of_a_bad_config_raises_and_opens_nothing(tmp_path: Path) -> None:
    path = tmp_path / "kmeshd.toml"
    path.write_text("[metrics]\ninterval = 5\n")
    opened: list[Config] = []
    with pytest.raises(ConfigError, match=r"metrics\.interval"):
        prepare(dataclasses.replace(BASE, path=path), StaticSource(Identities()), opener(opened))
    assert opened == []
