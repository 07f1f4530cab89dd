"""Walking a parsed document while collecting every problem, not just the first.

kmeshd.toml, the inventory (TOML) and kubeconfigs (YAML) are read the same way: a `Table`
over one mapping hands out typed values with their defaults, and for anything wrong (an
unknown key, a wrong type, a missing required key) it records a `file: key.path: problem`
line in a shared `Problems` and returns a harmless stand-in. The caller raises one
ConfigError at the end, so an operator fixes the whole file in one pass instead of one
error per restart. Each format names its values in its own words (`describe_toml`,
`describe_yaml`): "an array" in TOML is "a list" in YAML.
"""

from __future__ import annotations

import datetime
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml  # type: ignore[import-untyped,unused-ignore]

from kmeshd.errors import ConfigError
from kmeshd.files import CONFIG_LIMIT, NotRegularError, read_regular

# tomllib puts the position at the end of its message; Python 3.11 has no lineno attribute.
T = TypeVar("T")

_POSITION = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)$")


_QUOTE_MAX = 200  # characters of a value a message shows; a 60 MiB line would drown it


def quote(value: str) -> str:
    """A string as TOML (and the error messages) would write it: in double quotes, control
    characters escaped (a message stays one line), a long one cut short."""
    if len(value) > _QUOTE_MAX:
        cut = json.dumps(value[: _QUOTE_MAX // 2], ensure_ascii=False)
        return f'{cut[:-1]}..." ({len(value):,} characters)'
    return json.dumps(value, ensure_ascii=False)


def huge(value: object) -> str | None:
    """An integer too long to print, by its size ("an integer of 70,000 bits"): Python
    refuses to turn one of more than 4300 digits into text. None for any other value."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length():,} bits"
    return None


def one_line(text: str) -> str:
    """A parser's message as one line of a problem."""
    return " ".join(text.split())


def describe_toml(value: object) -> str:
    """What a TOML value is, for "expected X, got Y" messages."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if (size := huge(value)) is not None:
        return size
    if isinstance(value, int | float):
        return f"the {'integer' if isinstance(value, int) else 'float'} {value}"
    if isinstance(value, str):
        return f"the string {quote(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return f"the date/time {value.isoformat()}"
    return type(value).__name__


def describe_yaml(value: object) -> str:
    """What a YAML value is, for "expected X, got Y" messages."""
    if isinstance(value, str):
        return f"the string {quote(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if (size := huge(value)) is not None:
        return size
    if isinstance(value, bytes):  # !!binary
        return f"binary data of {len(value):,} bytes"
    return "null" if value is None else f"the value {value!r}"


class Problems:
    """Every problem found in one file, in the order they were found."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self.keys: list[str] = []  # the key path of each line

    def add(self, key: str, problem: str) -> None:
        self.lines.append(f"{self.path}: {key}: {problem}")
        self.keys.append(key)

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.lines)


def read_text(path: Path, missing_ok: bool, limit: int = CONFIG_LIMIT) -> str | None:
    """The text of the regular file `path` (at most `limit` bytes); None if it does not
    exist and that is allowed; else ConfigError, one line naming the file."""
    try:
        data = read_regular(path, limit)
    except FileNotFoundError as e:
        if missing_ok:
            return None
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from e
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from e
    except NotRegularError as e:
        raise ConfigError([f"{path}: {e}"]) from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte 0x{e.object[e.start]:02x} at offset {e.start}"
        raise ConfigError([f"{path}: cannot read: not UTF-8 text ({where})"]) from e


def read_toml(text: str, path: Path) -> dict[str, Any]:
    """The parsed document, or a ConfigError naming the line of the syntax error."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = one_line(str(e))
        match = _POSITION.search(message)
        if match is None:
            raise ConfigError([f"{path}: {message}"]) from e
        # "at end of document" is the last line, which is where an editor should jump.
        line = match[1] or max(1, len(text.splitlines()))
        raise ConfigError([f"{path}: line {line}: {message[: match.start()]}"]) from e
    except RecursionError as e:
        raise ConfigError([f"{path}: {TOO_DEEP}"]) from e
    except ValueError as e:  # the only one tomllib lets through: int() of a too long number
        raise ConfigError([f"{path}: {too_long_number(e)}"]) from e


TOO_DEEP = "arrays or tables are nested too deeply (flatten them)"
TOO_DEEP_YAML = "sequences or mappings are nested too deeply (flatten them)"


def read_yaml(text: str, path: Path) -> object:
    """The parsed document (None for an empty one), or a ConfigError in one line naming
    the line or character at fault: the kubeconfig's and the web config's reader."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise ConfigError([f"{path}: {where}{one_line(str(e.problem))}"]) from e
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, such as NUL
        what = f"U+{e.character:04X}" if isinstance(e.character, int) else "a byte"
        where = f"character {e.position + 1}"
        raise ConfigError([f"{path}: {where}: {what} is not allowed in YAML (remove it)"]) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: {one_line(str(e))}"]) from e
    except RecursionError as e:
        raise ConfigError([f"{path}: {TOO_DEEP_YAML}"]) from e
    except (ValueError, OverflowError) as e:
        # Values PyYAML builds with Python's own constructors: int() of more than 4300
        # digits, a date such as 2024-13-45.
        raise ConfigError([f"{path}: {too_long_number(e)}"]) from e


def too_long_number(e: Exception) -> str:
    """The problem of a number Python refuses to read (more than 4300 digits)."""
    if "digits" in str(e):
        return "a number has more than 4300 digits (shorten it)"
    return f"not valid: {one_line(str(e))}"


def url_problem(text: str, what: str) -> str | None:
    """Why `text` is not an http:// or https:// URL with a host (and a port of 1-65535),
    or None; `what` names the URL the key takes."""
    bad = f"{quote(text)} is not {what}"
    if any(c.isspace() or not c.isprintable() for c in text):
        return f"{bad}: it contains a space or a control character"
    try:
        parts = urlsplit(text)
        port = parts.port  # ValueError for a port out of range or not a number
    except ValueError as e:  # "Port out of range 0-65535", "Invalid IPv6 URL"
        problem = "its port is not a number from 1 to 65535" if "Port" in str(e) else str(e)
        return f"{bad}: {one_line(problem)}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return bad
    if port == 0:
        return f"{bad}: its port is not a number from 1 to 65535"
    return None


_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_LABEL_RULE = 'lower-case letters, digits and "-", starting and ending with a letter or digit'


def dns_label_problem(text: str, what: str) -> str | None:
    """Why `text` is not a DNS label (RFC 1123), as Kubernetes namespaces and service names
    are; `what` names the value ("a namespace"). None if it is one."""
    if _DNS_LABEL.fullmatch(text):
        return None
    return f"{quote(text)} is not {what}: at most 63 {_LABEL_RULE}"


def dns_subdomain_problem(text: str, what: str) -> str | None:
    """Why `text` is not a DNS subdomain (RFC 1123), as Kubernetes pod, node and service
    account names are: labels joined by "."; None if it is one."""
    if len(text) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in text.split(".")):
        return None
    return f'{quote(text)} is not {what}: at most 253 {_LABEL_RULE}, or such names joined by "."'


def trust_domain_problem(text: str) -> str | None:
    """Why `text` cannot be a SPIFFE trust domain (spiffe://<it>/ns/...), or None."""
    if _TRUST_DOMAIN.fullmatch(text):
        return None
    return f'{quote(text)} is not a trust domain: lower-case letters, digits, ".", "-" and "_"'


class Table:
    """One table (a mapping) at `key`; getters record problems and fall back to the
    default. `known`, when given, lists the keys it may have: any other is a problem."""

    def __init__(
        self,
        data: Mapping[str, object],
        key: str,
        problems: Problems,
        known: tuple[str, ...] | None = None,
        describe: Callable[[object], str] = describe_toml,
    ) -> None:
        self._data = data
        self.key = key  # its own path: "metrics", "workload[3]", "" for the document
        self.problems = problems
        self.describe = describe
        if known is not None:
            self._unknown_keys(known)

    def _unknown_keys(self, known: tuple[str, ...]) -> None:
        for name, value in self._data.items():
            if name not in known:
                what = "table" if isinstance(value, dict) else "key"
                self.problem(name, f"unknown {what} (known: {', '.join(sorted(known))})")

    def path(self, name: str) -> str:
        """The full key path of `name` in this table, e.g. workload[3].addresses; the
        table's own for ""."""
        return f"{self.key}.{name}" if self.key and name else self.key or name

    def problem(self, name: str, problem: str) -> None:
        self.problems.add(self.path(name), problem)

    def has(self, name: str) -> bool:
        """Whether the file sets this key (so its value was chosen, not defaulted)."""
        return name in self._data

    def raw(self, name: str) -> object:
        """The value as the file has it, None if absent: for checks the getters don't make."""
        return self._data.get(name)

    def _get(self, name: str, expected: str, ok: type) -> object:
        """The raw value, or None if absent or of the wrong type (then a problem is noted)."""
        value = self._data.get(name)
        # bool is an int in Python but not in TOML: `port = true` is a wrong type.
        if value is None or (isinstance(value, ok) and not isinstance(value, bool)):
            return value
        self.problem(name, f"expected {expected}, got {self.describe(value)}")
        return None

    def _require(self, name: str) -> None:
        # A present key of the wrong type already has its problem; only absence is noted here.
        if not self.has(name):
            self.problem(name, "missing (required)")

    def optional(self, name: str) -> str | None:
        """A string that may be absent, null or "" (all three None)."""
        value = self._data.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            self.problem(name, f"expected a string, got {self.describe(value)}")
            return None
        return value

    def string(self, name: str, default: str | None = None) -> str:
        """A string; default None makes the key required."""
        value = self._get(name, "a string", str)
        if isinstance(value, str):
            return value
        if default is None:
            self._require(name)
            return ""
        return default

    def parsed(
        self, name: str, default: T, parse: Callable[[str], T], expected: str = "a string"
    ) -> T:
        """A string turned into a value by `parse`, whose ValueError text is the problem."""
        value = self._get(name, expected, str)
        if not isinstance(value, str):
            return default
        try:
            return parse(value)
        except ValueError as e:
            self.problem(name, str(e))
            return default

    def nonempty(self, name: str, default: str | None = None) -> str:
        """A string that must not be "" (names, domains)."""
        value = self.string(name, default)
        if self._data.get(name) == "":
            self.problem(name, "must not be empty")
        return value

    def integer(self, name: str, default: int | None = None) -> int:
        """An integer; default None makes the key required."""
        value = self._get(name, "an integer", int)
        if isinstance(value, int):
            return value
        if default is None:
            self._require(name)
            return 0
        return default

    def boolean(self, name: str, default: bool) -> bool:
        value = self._data.get(name, default)
        if isinstance(value, bool):
            return value
        self.problem(name, f"expected true or false, got {self.describe(value)}")
        return default

    def strings(self, name: str) -> list[tuple[str, str]]:
        """An array of strings as (key path, value) pairs; a wrong element is noted and skipped."""
        items = self._get(name, "an array of strings", list)
        pairs: list[tuple[str, str]] = []
        for i, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, str):
                pairs.append((self.path(f"{name}[{i}]"), item))
            else:
                self.problem(f"{name}[{i}]", f"expected a string, got {self.describe(item)}")
        return pairs

    def table(self, name: str, known: tuple[str, ...]) -> Table:
        """A sub-table; absent (or wrong) means empty, so every key takes its default."""
        value = self._get(name, "a table", dict)
        data = value if isinstance(value, dict) else {}
        return Table(data, self.path(name), self.problems, known, self.describe)

    def tables(self, name: str, known: tuple[str, ...]) -> list[Table]:
        """An array of tables ([[name]] or [{...}, ...]) as key[0], key[1], ..."""
        items = self._get(name, "an array of tables", list)
        tables: list[Table] = []
        for i, item in enumerate(items if isinstance(items, list) else []):
            key = f"{name}[{i}]"
            if isinstance(item, dict):
                tables.append(Table(item, self.path(key), self.problems, known, self.describe))
            else:
                self.problem(key, f"expected a table, got {self.describe(item)}")
        return tables
