"""The C/Python contract: bpf/tcp_probe.h, compiled by the C compiler, says exactly what
kmeshd/kernel/layout.py says: every #define, every struct's size, every field's offset
and size, and the histogram bounds. A change on one side alone fails here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kmeshd.kernel import layout

HEADER = Path(__file__).parent.parent / "bpf" / "tcp_probe.h"
BOUNDS = {
    "LATENCY_BOUNDS_US": layout.LATENCY_BOUNDS_US,
    "DURATION_BOUNDS_US": layout.DURATION_BOUNDS_US,
}


def header_defines(header: Path) -> list[str]:
    """Names of the header's object-like #defines that carry a value (not the include
    guard, not the X-macros)."""
    return re.findall(r"^#define ([A-Za-z_]\w*)[ \t]+\S", header.read_text(), re.MULTILINE)


def probe_program(header: Path) -> str:
    """C that prints, as JSON, what the compiler makes of the header: each define's value,
    each mirrored struct's size and its fields' offsets and sizes, the bounds' lists."""
    lines = [
        "#include <linux/types.h>",
        "#include <stddef.h>",
        "#include <stdio.h>",
        f'#include "{header.name}"',
        '#define BOUND(b) printf(" %llu", (unsigned long long)(b));',
        "int main(void) {",
        'printf("{\\"defines\\": {");',
    ]
    for name in header_defines(header):
        lines.append(f'printf("\\"{name}\\": %lld, ", (long long)({name}));')
    lines.append('printf("\\"\\": 0}, \\"structs\\": {");')
    for mirror in layout.MIRRORS:
        t = f"struct {mirror.c_name}"
        lines.append(f'printf("\\"{mirror.c_name}\\": {{\\"size\\": %zu", sizeof({t}));')
        for name, _code in mirror.fields:
            lines.append(
                f'printf(", \\"{name}\\": [%zu, %zu]", offsetof({t}, {name}),'
                f" sizeof((({t} *)0)->{name}));"
            )
        lines.append('printf("}, ");')
    lines.append('printf("\\"\\": {}}, \\"bounds\\": {");')
    for name in BOUNDS:
        lines.append(f'printf("\\"{name}\\": \\""); {name}(BOUND) printf("\\", ");')
    lines += ['printf("\\"\\": \\"\\"}}\\n");', "return 0;", "}"]
    return "\n".join(lines)


def compiled(header: Path, workdir: Path) -> dict[str, Any]:
    """What the C compiler says the header holds."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is missing (make host-deps installs it)")
    source, binary = workdir / "layout.c", workdir / "layout"
    source.write_text(probe_program(header))
    subprocess.run(
        ["gcc", "-Wall", "-Werror", f"-I{header.parent}", "-o", str(binary), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    out = json.loads(subprocess.run([str(binary)], check=True, capture_output=True).stdout)
    for section in out.values():
        section.pop("")
    return out  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def c_side(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return compiled(HEADER, tmp_path_factory.mktemp("layout"))


def test_every_define_has_a_python_counterpart(c_side: dict[str, Any]) -> None:
    """The header defines no constant Python lacks, and Python none the header lacks."""
    assert sorted(c_side["defines"]) == sorted(layout.defines())


@pytest.mark.parametrize(("name", "value"), sorted(layout.defines().items()))
def test_define_has_the_python_value(c_side: dict[str, Any], name: str, value: int) -> None:
    """Each #define has the value its Python mirror has."""
    assert c_side["defines"].get(name) == value


@pytest.mark.parametrize("mirror", layout.MIRRORS, ids=lambda m: m.c_name)
def test_struct_layout_matches(c_side: dict[str, Any], mirror: layout.Mirror) -> None:
    """Each mirrored struct has the C struct's size, and each field its offset and size."""
    c_struct = dict(c_side["structs"][mirror.c_name])
    assert c_struct.pop("size") == mirror.size
    assert {name: tuple(place) for name, place in c_struct.items()} == mirror.places()


@pytest.mark.parametrize("mirror", layout.MIRRORS, ids=lambda m: m.c_name)
def test_struct_size_is_the_one_the_header_asserts(mirror: layout.Mirror) -> None:
    """The header's _Static_assert, which the BPF compile checks too, gives the same size."""
    asserted = re.findall(r"sizeof\(struct (\w+)\) == (\d+)", HEADER.read_text())
    assert int(dict(asserted)[mirror.c_name]) == mirror.size


@pytest.mark.parametrize(("name", "bounds"), sorted(BOUNDS.items()))
def test_histogram_bounds_match(c_side: dict[str, Any], name: str, bounds: tuple[int, ...]) -> None:
    """The kernel buckets by the same bounds user space labels them with: ascending, one
    fewer than BUCKETS (the last bucket holds everything above)."""
    assert tuple(map(int, c_side["bounds"][name].split())) == bounds
    assert list(bounds) == sorted(set(bounds))
    assert len(bounds) == layout.BUCKETS - 1


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("#define SETTING_PERIODIC 1", "#define SETTING_PERIODIC 3"),
        ("#define STAT_COUNT 8\n", "#define STAT_COUNT 8\n#define STAT_EXTRA 9\n"),
        ("    __u16 client_port;", "    __u8 client_port;\n    __u8 spare;"),
    ],
)
def test_a_change_on_the_c_side_alone_is_caught(tmp_path: Path, old: str, new: str) -> None:
    """The comparison above does fail when only the header changes: a value, a new
    constant, a field's type."""
    text = HEADER.read_text()
    assert old in text
    changed = tmp_path / HEADER.name
    changed.write_text(text.replace(old, new).replace("_Static_assert", "//"))
    c = compiled(changed, tmp_path)
    structs = {
        m.c_name: {"size": m.size, **{n: list(p) for n, p in m.places().items()}}
        for m in layout.MIRRORS
    }
    assert (c["defines"], c["structs"]) != (layout.defines(), structs)


def test_the_histograms_config_names_are_the_structs() -> None:
    """metrics.histograms names struct flow_counters' histograms, in the struct's order,
    after its ten scalar counters."""
    from kmeshd.aggregate import SCALARS
    from kmeshd.config import HISTOGRAMS

    names = [name for name, _code in layout.FLOW_COUNTERS.fields]
    assert (len(SCALARS), tuple(names[len(SCALARS) :])) == (10, HISTOGRAMS)
