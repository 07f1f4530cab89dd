"""BTF field lookup: tables on small hand-built blobs, then the running kernel's own."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kmeshd import btf, probe

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, CONST = 1, 2, 3, 4, 5, 6, 7, 8, 10


class Blob:
    """Builds a BTF blob type by type, the way the kernel lays one out."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.count = 0

    def _name(self, name: str) -> int:
        if not name:
            return 0
        at = len(self.strings)
        self.strings += name.encode() + b"\0"
        return at

    def _add(
        self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", flag: int = 0
    ) -> int:
        info = (flag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self._name(name), info, size_or_type) + extra
        self.count += 1
        return self.count

    def integer(self, name: str, size: int) -> int:
        return self._add(name, INT, 0, size, struct.pack("<I", size * 8))

    def ptr(self, to: int) -> int:
        return self._add("", PTR, 0, to)

    def array(self, elem: int, count: int, index: int = 1) -> int:
        return self._add("", ARRAY, 0, 0, struct.pack("<III", elem, index, count))

    def typedef(self, name: str, to: int) -> int:
        return self._add(name, TYPEDEF, 0, to)

    def const(self, to: int) -> int:
        return self._add("", CONST, 0, to)

    def enum(self, name: str, values: int) -> int:
        return self._add(name, ENUM, values, 4, bytes(8 * values))

    def fwd(self, name: str) -> int:
        return self._add(name, FWD, 0, 0)

    def record(
        self,
        name: str,
        size: int,
        members: list[tuple[str, int, int]],
        kind: int = STRUCT,
        bitfields: dict[str, int] | None = None,
    ) -> int:
        """members: (name, type id, bit offset); bitfields: name -> bit size (kind_flag=1)."""
        bitfields = bitfields or {}
        flag = 1 if bitfields else 0
        extra = b"".join(
            struct.pack(
                "<III", self._name(m), t, (bitfields.get(m, 0) << 24 | bits) if flag else bits
            )
            for m, t, bits in members
        )
        return self._add(name, kind, len(members), size, extra, flag)

    def encode(self, magic: int = btf.MAGIC) -> bytes:
        header = struct.pack(
            "<HBBIIIII", magic, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings)
        )
        return header + bytes(self.types) + bytes(self.strings)


def sample() -> btf.Btf:
    """struct inner { u32 v; u16 w; };
    struct outer {
        u64 head;                               // 0
        struct inner in;                        // 8
        union { u32 a; const u16_t b; };        // 16 (anonymous)
        struct { u8 pad[2]; u16 deep; };        // 20 (anonymous)
        struct inner arr[3];                    // 24
        struct inner *ptr;                      // 48
        u32 low:4, high:28;                     // 56 (bit fields)
        struct inner sized[2];                  // 60
    };  plus a forward declaration of struct outer before it."""
    b = Blob()
    u8, u16, u32, u64 = (
        b.integer("u8", 1),
        b.integer("u16", 2),
        b.integer("u32", 4),
        b.integer("u64", 8),
    )
    b.record("outer", 0, [])  # a declaration only: vlen 0, as vmlinux has them
    inner = b.record("inner", 8, [("v", u32, 0), ("w", u16, 32)])
    u16_t = b.typedef("u16_t", u16)
    anon_union = b.record("", 4, [("a", u32, 0), ("b", b.const(u16_t), 0)], kind=UNION)
    anon_struct = b.record("", 4, [("pad", b.array(u8, 2), 0), ("deep", u16, 16)])
    b.record(
        "outer",
        76,
        [
            ("head", u64, 0),
            ("in", inner, 64),
            ("", anon_union, 128),
            ("", anon_struct, 160),
            ("arr", b.array(inner, 3), 192),
            ("ptr", b.ptr(inner), 384),
            ("low", u32, 448),
            ("high", u32, 452),
            ("sized", b.typedef("pair", b.array(inner, 2)), 480),
        ],
        bitfields={"low": 4, "high": 28},
    )
    b.record("odd", 4, [("x", u8, 0), ("y", u8, 3)])  # no kind_flag: y starts mid-byte
    b.enum("state", 3)
    return btf.Btf(b.encode())


@pytest.mark.parametrize(
    ("path", "offset", "size"),
    [
        ("head", 0, 8),
        ("in", 8, 8),
        ("in.v", 8, 4),
        ("in.w", 12, 2),
        ("a", 16, 4),  # member of an anonymous union
        ("b", 16, 2),  # through const and a typedef
        ("deep", 22, 2),  # anonymous struct's member: 20 + 2
        ("pad", 20, 2),  # an array's size is its elements'
        ("arr", 24, 24),
        ("arr.w", 28, 2),  # an array stands for its first element
        ("ptr", 48, 8),
        ("sized", 60, 16),  # typedef of an array
        ("sized.v", 60, 4),
    ],
)
def test_field_offsets_and_sizes(path: str, offset: int, size: int) -> None:
    assert sample().field("outer", path) == btf.Field(offset, size)


@pytest.mark.parametrize(
    ("struct_name", "path", "problem"),
    [
        ("outer", "nothere", "outer.nothere: no member nothere"),
        ("outer", "in.nothere", "outer.in.nothere: no member nothere"),
        ("outer", "head.v", "outer.head.v: v is inside something not a struct"),
        ("outer", "ptr.v", "outer.ptr.v: v is inside something not a struct"),
        ("outer", "low", "outer.low: low is a bit field"),
        ("odd", "y", "odd.y: y does not start on a byte"),
        ("missing", "x", "no struct missing"),
        ("state", "x", "no struct state"),  # an enum is not a struct
    ],
)
def test_fields_that_cannot_be_read_are_named(struct_name: str, path: str, problem: str) -> None:
    with pytest.raises(btf.BtfError) as exc:
        sample().field(struct_name, path)
    assert str(exc.value) == problem


def test_a_field_after_bit_fields_is_still_found() -> None:
    b = Blob()
    u32 = b.integer("u32", 4)
    b.record(
        "s", 12, [("f", u32, 0), ("g", u32, 4), ("after", u32, 64)], bitfields={"f": 4, "g": 28}
    )
    assert btf.Btf(b.encode()).field("s", "after") == btf.Field(8, 4)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x9f\xeb\x01", "too short for a BTF header"),
        (Blob().encode(magic=0x9FEB), "bad magic 0x9feb, expected 0xeb9f"),
    ],
)
def test_a_blob_that_is_not_btf_is_refused(data: bytes, problem: str) -> None:
    with pytest.raises(btf.BtfError) as exc:
        btf.Btf(data)
    assert str(exc.value) == problem


def test_an_unknown_kind_is_refused_rather_than_misread() -> None:
    b = Blob()
    b.integer("u32", 4)
    b._add("future", 30, 0, 0)
    with pytest.raises(btf.BtfError) as exc:
        btf.Btf(b.encode())
    assert str(exc.value) == "type 2: unknown kind 30"


def test_a_type_section_cut_inside_a_type_is_refused() -> None:
    b = Blob()
    u32 = b.integer("u32", 4)
    b.record("s", 4, [("x", u32, 0)])
    data = b.encode()
    type_len = len(b.types) - 4  # the member record reaches past the section's end
    cut = data[:12] + struct.pack("<II", type_len, type_len) + data[20:]
    with pytest.raises(btf.BtfError) as exc:
        btf.Btf(cut)
    assert str(exc.value) == "the type section ends inside a type"


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(btf.BtfError) as exc:
        btf.load(tmp_path / "vmlinux")
    assert str(exc.value) == f"cannot read {tmp_path / 'vmlinux'}: No such file or directory"


def test_sweep_offsets_refuse_a_field_of_another_size(monkeypatch: pytest.MonkeyPatch) -> None:
    b = Blob()
    u32 = b.integer("u32", 4)
    b.record("tcp_sock", 8, [("bytes_acked", u32, 0), ("segs_in", u32, 32)])
    monkeypatch.setattr(
        probe, "SWEEP_FIELDS", {"SEGS": ("segs_in", 4), "ACKED": ("bytes_acked", 8)}
    )
    with pytest.raises(btf.BtfError) as exc:
        probe.sweep_offsets(btf.Btf(b.encode()))
    assert str(exc.value) == "tcp_sock.bytes_acked is 4 bytes, the probe reads 8"


@pytest.mark.skipif(not btf.VMLINUX.exists(), reason="this kernel publishes no BTF")
def test_the_running_kernel_has_every_field_the_sweep_reads() -> None:
    kernel = btf.load()
    offsets = probe.sweep_offsets(kernel)
    assert set(offsets) == set(probe.SWEEP_FIELDS)
    # skc_state has sat at byte 18 of struct sock_common, the start of tcp_sock, for years.
    assert offsets["TCP_STATE_OFF"] == 18
    tcp_sock = kernel.size(kernel.struct_id("tcp_sock"))
    for define, (_path, size) in probe.SWEEP_FIELDS.items():
        assert 0 < offsets[define] <= tcp_sock - size, define
    assert len(set(offsets.values())) == len(offsets)  # no two fields in one place
