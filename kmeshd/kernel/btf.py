"""Where a field lies in a kernel struct, and what an enum member's value is, read from
the running kernel's BTF.

The probe (bpf/tcp_probe.c) reads a few fields of struct tcp_sock that no stable interface
offers: the socket's flags and error at close, and what the socket sweep
(`bpf_iter__task_file`) reads. The kernel headers bcc compiles against need not describe
the running kernel (README, "Kernel headers that do not match the kernel"), so the
offsets come from /sys/kernel/btf/vmlinux, the kernel's own description of its types,
and reach the probe as -D defines: what libbpf's CO-RE relocations do, for the handful of
fields we need.

Only what that needs is decoded: the type records' shapes (to step over them), names,
struct and union members, arrays, enums, and the qualifiers and typedefs between them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
MAGIC = 0xEB9F

_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type/str off+len
_TYPE = struct.Struct("<III")  # name_off, info, size or type
_MEMBER = struct.Struct("<III")  # name_off, type, offset
_ARRAY = struct.Struct("<III")  # type, index_type, nelems
_ENUM = struct.Struct("<II")  # name_off, value (signed when kind_flag is set)
_ENUM64 = struct.Struct("<III")  # name_off, low and high 32 bits of the value

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_ENUM64 = 19
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG = 8, 9, 10, 11, 18
# Bytes each kind carries after its 12-byte record: fixed, and per vlen item.
_EXTRA: dict[int, tuple[int, int]] = {
    1: (4, 0),  # INT: encoding
    3: (12, 0),  # ARRAY
    4: (0, 12),  # STRUCT: members
    5: (0, 12),  # UNION
    6: (0, 8),  # ENUM: values
    13: (0, 8),  # FUNC_PROTO: parameters
    14: (4, 0),  # VAR: linkage
    15: (0, 12),  # DATASEC: variables
    17: (4, 0),  # DECL_TAG: component index
    19: (0, 12),  # ENUM64
}
_MAX_KIND = 19
_ALIASES = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}
_SIZED = {KIND_INT, KIND_STRUCT, KIND_UNION, 6, 16, 19}  # INT, STRUCT, UNION, ENUM, FLOAT, ENUM64


class BtfError(Exception):
    """The BTF could not be read, or does not have the field asked for."""


@dataclass(frozen=True)
class Field:
    offset: int  # bytes from the start of the outermost struct
    size: int  # bytes


class Btf:
    """A parsed BTF blob: types by id, and where each starts in the blob."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError("too short for a BTF header")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = (
            _HEADER.unpack_from(data)
        )
        if magic != MAGIC:
            raise BtfError(f"bad magic {magic:#x}, expected {MAGIC:#x}")
        self._data = data
        self._types_start = hdr_len + type_off
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self._offsets = [0]  # type id 0 is void
        self._index(self._types_start, self._types_start + type_len)
        self._named: dict[tuple[int, str], int] | None = None

    def _index(self, pos: int, end: int) -> None:
        while pos < end:
            self._offsets.append(pos)
            _name, info, _size = _TYPE.unpack_from(self._data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind == 0 or kind > _MAX_KIND:
                raise BtfError(f"type {len(self._offsets) - 1}: unknown kind {kind}")
            fixed, per_item = _EXTRA.get(kind, (0, 0))
            pos += _TYPE.size + fixed + per_item * vlen
        if pos != end:
            raise BtfError("the type section ends inside a type")

    def name(self, offset: int) -> str:
        stop = self._strings.index(b"\0", offset)
        return self._strings[offset:stop].decode()

    def _type(self, type_id: int) -> tuple[int, int, int, int, int]:
        """(name_off, kind, vlen, kind_flag, size or type) of a type id."""
        if not 0 < type_id < len(self._offsets):
            raise BtfError(f"no type {type_id}")
        name_off, info, size_or_type = _TYPE.unpack_from(self._data, self._offsets[type_id])
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size_or_type

    def _by_name(self, kinds: tuple[int, ...], name: str, what: str) -> int:
        """The first type of one of `kinds` named `name` that is defined, not declared."""
        if self._named is None:
            self._named = {}
            for type_id in range(1, len(self._offsets)):
                name_off, kind, vlen, _flag, _size = self._type(type_id)
                if kind in (KIND_STRUCT, KIND_ENUM, KIND_ENUM64) and vlen and name_off:
                    self._named.setdefault((kind, self.name(name_off)), type_id)
        for kind in kinds:
            if (kind, name) in self._named:
                return self._named[(kind, name)]
        raise BtfError(f"no {what} {name}")

    def struct_id(self, name: str) -> int:
        return self._by_name((KIND_STRUCT,), name, "struct")

    def enum_value(self, enum_name: str, member: str) -> int:
        """The value of `member` in enum `enum_name`."""
        type_id = self._by_name((KIND_ENUM, KIND_ENUM64), enum_name, "enum")
        _name, kind, vlen, signed, _size = self._type(type_id)
        base, bits = self._offsets[type_id] + _TYPE.size, 32 if kind == KIND_ENUM else 64
        for i in range(vlen):
            if kind == KIND_ENUM:
                name_off, value = _ENUM.unpack_from(self._data, base + i * _ENUM.size)
            else:
                name_off, low, high = _ENUM64.unpack_from(self._data, base + i * _ENUM64.size)
                value = high << 32 | low
            if self.name(name_off) == member:
                return int(value - (1 << bits) if signed and value >> (bits - 1) else value)
        raise BtfError(f"enum {enum_name} has no {member}")

    def _resolve(self, type_id: int) -> tuple[int, int, int]:
        """Through typedefs and qualifiers: (type id, kind, vlen)."""
        while True:
            _name, kind, vlen, _flag, size_or_type = self._type(type_id)
            if kind not in _ALIASES:
                return type_id, kind, vlen
            type_id = size_or_type

    def size(self, type_id: int) -> int:
        type_id, kind, _vlen = self._resolve(type_id)
        _name, _kind, _vlen, _flag, size_or_type = self._type(type_id)
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _index, count = self._array(type_id)
            return count * self.size(elem)
        if kind in _SIZED:
            return size_or_type
        raise BtfError(f"type {type_id} (kind {kind}) has no size")

    def _array(self, type_id: int) -> tuple[int, int, int]:
        """(element type, index type, element count) of an array type."""
        elem, index, count = _ARRAY.unpack_from(self._data, self._offsets[type_id] + _TYPE.size)
        return int(elem), int(index), int(count)

    def _member(self, type_id: int, name: str) -> tuple[int, int]:
        """(type id, byte offset) of a struct or union member, looking into anonymous ones."""
        _name, kind, vlen, flag, _size = self._type(type_id)
        base = self._offsets[type_id] + _TYPE.size
        for i in range(vlen):
            name_off, member_type, offset = _MEMBER.unpack_from(self._data, base + i * 12)
            bits = offset & 0xFFFFFF if flag else offset
            if flag and offset >> 24:
                if self.name(name_off) == name:
                    raise BtfError(f"{name} is a bit field")
                continue
            if name_off == 0:  # anonymous struct or union: its members are ours
                inner, inner_kind, _ = self._resolve(member_type)
                if inner_kind in (KIND_STRUCT, KIND_UNION):
                    try:
                        found, at = self._member(inner, name)
                        return found, bits // 8 + at
                    except BtfError:
                        continue
            elif self.name(name_off) == name:
                if bits % 8:
                    raise BtfError(f"{name} does not start on a byte")
                return member_type, bits // 8
        raise BtfError(f"no member {name}")

    def field(self, struct_name: str, path: str) -> Field:
        """Offset and size of `path` (dotted members; an array stands for its first
        element) inside struct `struct_name`."""
        type_id, offset = self.struct_id(struct_name), 0
        for part in path.split("."):
            type_id, kind, _vlen = self._resolve(type_id)
            while kind == KIND_ARRAY:
                elem, _index, _count = self._array(type_id)
                type_id, kind, _vlen = self._resolve(elem)
            if kind not in (KIND_STRUCT, KIND_UNION):
                raise BtfError(f"{struct_name}.{path}: {part} is inside something not a struct")
            try:
                type_id, at = self._member(type_id, part)
            except BtfError as exc:
                raise BtfError(f"{struct_name}.{path}: {exc}") from None
            offset += at
        return Field(offset, self.size(type_id))


def load(path: Path = VMLINUX) -> Btf:
    try:
        return Btf(path.read_bytes())
    except OSError as exc:
        raise BtfError(f"cannot read {path}: {exc.strerror}") from exc
