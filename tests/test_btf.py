"""BTF field lookup: tables on small hand-built blobs, then the running kernel's own."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kmeshd.errors import UnavailableError
from kmeshd.kernel import btf, build

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, CONST, ENUM64 = 1, 2, 3, 4, 5, 6, 7, 8, 10, 19


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

    def named_enum(self, name: str, values: dict[str, int], signed: bool = False) -> int:
        extra = b"".join(
            struct.pack("<II", self._name(n), v & 0xFFFFFFFF) for n, v in values.items()
        )
        return self._add(name, ENUM, len(values), 4, extra, flag=int(signed))

    def enum64(self, name: str, values: dict[str, int]) -> int:
        extra = b"".join(
            struct.pack("<III", self._name(n), v & 0xFFFFFFFF, v >> 32) for n, v in values.items()
        )
        return self._add(name, ENUM64, len(values), 8, extra)

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
        build, "SWEEP_FIELDS", {"SEGS": ("segs_in", 4), "ACKED": ("bytes_acked", 8)}
    )
    with pytest.raises(btf.BtfError) as exc:
        build.sweep_offsets(btf.Btf(b.encode()))
    assert str(exc.value) == "tcp_sock.bytes_acked is 4 bytes, the probe reads 8"


def enums() -> btf.Btf:
    b = Blob()
    b.named_enum("", {"ANON": 7})  # an anonymous enum is never found by name
    b.named_enum("sock_flags", {"SOCK_DEAD": 0, "SOCK_DONE": 1, "SOCK_URGINLINE": 2})
    b.named_enum("signed", {"MINUS_ONE": -1}, signed=True)
    b.named_enum("unsigned", {"TOP": 0xFFFFFFFF})
    b.enum64("wide", {"BIG": 1 << 40})
    return btf.Btf(b.encode())


@pytest.mark.parametrize(
    ("enum", "member", "value"),
    [
        ("sock_flags", "SOCK_DEAD", 0),
        ("sock_flags", "SOCK_DONE", 1),
        ("sock_flags", "SOCK_URGINLINE", 2),
        ("signed", "MINUS_ONE", -1),  # kind_flag: the value is signed
        ("unsigned", "TOP", 0xFFFFFFFF),
        ("wide", "BIG", 1 << 40),  # ENUM64: two 32-bit halves
    ],
)
def test_enum_values(enum: str, member: str, value: int) -> None:
    assert enums().enum_value(enum, member) == value


@pytest.mark.parametrize(
    ("enum", "member", "problem"),
    [
        ("sock_flags", "SOCK_NOPE", "enum sock_flags has no SOCK_NOPE"),
        ("missing", "X", "no enum missing"),
        ("", "ANON", "no enum "),
    ],
)
def test_enum_members_that_are_not_there_are_named(enum: str, member: str, problem: str) -> None:
    with pytest.raises(btf.BtfError) as exc:
        enums().enum_value(enum, member)
    assert str(exc.value) == problem


@pytest.mark.skipif(not btf.VMLINUX.exists(), reason="this kernel publishes no BTF")
def test_the_running_kernel_has_what_the_close_reads() -> None:
    """The path through tcp_sock lands on sock_common's skc_flags and struct sock's sk_err
    (struct sock starts every TCP socket), and SOCK_DONE is the bit it has been since Linux
    2.6."""
    kernel = btf.load()
    skc_flags = kernel.field("sock_common", "skc_flags")
    sk_err = kernel.field("sock", "sk_err")
    assert (skc_flags.size, sk_err.size) == (8, 4)
    assert build.close_defines(kernel) == {
        "SOCK_FLAGS_OFF": skc_flags.offset,
        "SOCK_ERR_OFF": sk_err.offset,
        "SOCK_DONE_BIT": 1,
    }


@pytest.mark.skipif(not btf.VMLINUX.exists(), reason="this kernel publishes no BTF")
def test_the_running_kernel_has_every_field_the_sweep_reads() -> None:
    kernel = btf.load()
    offsets = build.sweep_offsets(kernel)
    assert offsets.pop("SOCKET_SK_OFF") == kernel.field("socket", "sk").offset
    assert set(offsets) == set(build.SWEEP_FIELDS)
    # skc_state has sat at byte 18 of struct sock_common, the start of tcp_sock, for years.
    assert offsets["TCP_STATE_OFF"] == 18
    tcp_sock = kernel.size(kernel.struct_id("tcp_sock"))
    for define, (_path, size) in build.SWEEP_FIELDS.items():
        assert 0 < offsets[define] <= tcp_sock - size, define
    assert len(set(offsets.values())) == len(offsets)  # no two fields in one place


def tiny_kernel() -> btf.Btf:
    b = Blob()
    u64 = b.integer("u64", 8)
    b.record("tcp_sock", 16, [("flags", u64, 0), ("acked", u64, 64)])
    b.named_enum("sock_flags", {"SOCK_DONE": 1})
    return btf.Btf(b.encode())


@pytest.fixture
def tiny_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(btf, "load", tiny_kernel)
    monkeypatch.setattr(build, "CLOSE_FIELDS", {"FLAGS_OFF": ("flags", 8)})
    monkeypatch.setattr(build, "ENUM_VALUES", {"DONE_BIT": ("sock_flags", "SOCK_DONE")})
    monkeypatch.setattr(build, "SWEEP_FIELDS", {"ACKED_OFF": ("acked", 8)})
    monkeypatch.setattr(build, "SOCKET_FIELDS", {})


@pytest.mark.usefixtures("tiny_probe")
@pytest.mark.parametrize(
    ("sweep", "defines"),
    [
        (False, {"FLAGS_OFF": 0, "DONE_BIT": 1}),
        (True, {"FLAGS_OFF": 0, "DONE_BIT": 1, "ACKED_OFF": 8}),
    ],
)
def test_kernel_defines_carry_the_sweeps_offsets_only_with_the_sweep(
    sweep: bool, defines: dict[str, int]
) -> None:
    assert build.kernel_defines(sweep) == defines


@pytest.mark.usefixtures("tiny_probe")
def test_a_kernel_without_what_the_close_reads_names_the_kernel_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(build, "ENUM_VALUES", {"DONE_BIT": ("sock_flags", "SOCK_GONE")})
    with pytest.raises(UnavailableError) as exc:
        build.kernel_defines(sweep=False)
    assert str(exc.value) == (
        "the probe cannot find what it reads in the kernel's BTF (enum sock_flags has no"
        " SOCK_GONE): kmeshd needs a kernel built with CONFIG_DEBUG_INFO_BTF=y, which"
        " publishes /sys/kernel/btf/vmlinux"
    )


@pytest.mark.usefixtures("tiny_probe")
def test_a_kernel_without_what_the_sweep_reads_names_live_updates_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(build, "SWEEP_FIELDS", {"ACKED_OFF": ("bytes_acked", 8)})
    assert build.kernel_defines(sweep=False) == {"FLAGS_OFF": 0, "DONE_BIT": 1}
    with pytest.raises(UnavailableError) as exc:
        build.kernel_defines(sweep=True)
    assert str(exc.value) == (
        "the socket sweep cannot find its fields in the kernel's BTF (tcp_sock.bytes_acked:"
        f" no member bytes_acked): {build.NO_SWEEP}"
    )
