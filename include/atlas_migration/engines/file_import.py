"""Parse JSON and CSV/TSV files into BSON documents the way ``mongoimport`` does, in bounded memory.

Formats (``mongoimport --type``):

- ``json``: one document per line (JSON Lines); ``json_array``: one top-level array (``--jsonArray``),
  read element by element, never whole. Both are MongoDB Extended JSON v2, canonical or relaxed, parsed by
  ``bson.json_util`` so dates, ObjectIds, Decimal128, binary (any subtype, UUIDs stay subtype 4 binary) and
  longs keep their BSON types byte for byte.
- ``csv`` and ``tsv``: a header line (``--headerline``) or a field list (``--fields``); with
  ``columns_have_types`` (``--columnsHaveTypes``) every name is ``name.type(arg)`` with mongoimport's types
  (``auto``, ``string``, ``int32``, ``int64``, ``double``, ``decimal``, ``boolean``, ``date``/``date_go``
  with a Go layout, ``date_ms``, ``date_oracle``, ``binary(base64|base32|hex)``); without it every column
  is ``auto`` (int32, else int64, else double, else string). Dotted names build nested documents; blank
  fields are kept as empty strings (typed columns then fail to parse) or skipped (``ignore_blanks``).
  CSV follows RFC 4180 (quoted fields may hold the delimiter, doubled quotes and newlines); TSV is one
  record per line split on tabs, without quoting, as mongoimport reads it. Fields past the header become
  ``field<N>`` (auto-typed), as in mongoimport.
- Any of them gzip-compressed (``.gz``, or detected from the magic bytes).

Bad rows follow ``parse_errors`` (``--parseGrace``): ``stop`` (the default: fail with file and line),
``skip_row``, ``skip_field`` or ``auto_cast`` (re-parse the value as ``auto``). A JSON line that is not a
document is a bad row too: ``stop`` stops, any other policy skips the row (it has no field to skip). Every
rejection is recorded as file, line and reason, never the row's values: they may hold personal data.

Splitting (``plan_ranges``): a file is cut into byte ranges that each begin at a record boundary, so mapped
tasks import one file in parallel. The boundary rule: a range ends just after a newline byte that ends a
record. For JSON Lines and TSV every newline ends a record. For CSV a newline ends a record only when the
number of quote characters before it in the file is even (RFC 4180 doubles quotes inside quoted fields, so
an odd count means the newline is inside a quoted field); the scan that finds boundaries also counts the
physical lines before each one, so every range knows the line number of its first record, and the header
(parsed once, from the file's first record) travels with each range. A compressed file or a JSON array is
one range (neither can be entered in the middle).

Identity (insert mode): a document without ``_id`` gets ``<file tag>:<line>`` (the tag is a hash of the
file's location and size, the line is the physical line its record starts on), so a retried or re-run range
produces the same ``_id``s and the target's unique ``_id`` index turns a repeated insert into a no-op
instead of a duplicate. ``_id`` is always written first, as mongod stores it, so the digest of the parsed
documents is comparable with the target's.

Pure: no server, no Airflow. Readers take a binary file object (local or S3), so the same code serves both.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from atlas_migration.errors import ConfigurationError, MigrationError

FORMATS = ("json", "json_array", "csv", "tsv")
PARSE_ERROR_POLICIES = ("stop", "skip_row", "skip_field", "auto_cast")
MODES = ("insert", "upsert", "merge", "delete")
GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = 8 << 20  # bytes read at a time by the boundary scan and the readers
MAX_RECORD_BYTES = 16 << 20  # a record longer than a BSON document can be is refused, not buffered


class FileFormatError(MigrationError):
    """A file (not one row) cannot be read: unknown format, bad header, malformed array."""


class RowRejected(Exception):
    """One row cannot become a document; ``reason`` never contains the row's values."""

    def __init__(self, reason: str, *, field_name: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field_name = field_name


@dataclass(frozen=True)
class Rejection:
    """A rejected row or field: where it is and why, without its contents."""

    file: str
    line: int
    reason: str
    action: str  # row_skipped | field_skipped | stopped

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- typed columns


_TYPED_NAME = re.compile(r"(?s)^(.*)\.(\w+)\((.*)\)$")
_INT = re.compile(r"^[+-]?[0-9]+$")
_FLOAT = re.compile(r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
_FLOAT_SPECIAL = re.compile(r"^[+-]?(?:inf|infinity|nan)$", re.IGNORECASE)
_HEX_FLOAT = re.compile(r"^[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?[0-9]+$")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _parse_int(text: str, low: int, high: int, kind: str) -> int:
    # Go's strconv.ParseInt(base 10): an optional sign and digits; no spaces, no underscores.
    if not _INT.match(text):
        raise RowRejected(f"not an {kind}")
    value = int(text)
    if not low <= value <= high:
        raise RowRejected(f"out of range for {kind}")
    return value


def _parse_double(text: str) -> float:
    # Go's strconv.ParseFloat: decimal or hexadecimal notation, Inf/Infinity/NaN in any case.
    if _FLOAT.match(text) or _FLOAT_SPECIAL.match(text):
        return float(text)
    if _HEX_FLOAT.match(text):
        return float.fromhex(text)
    raise RowRejected("not a double")


def auto_value(text: str) -> Any:
    """mongoimport's ``auto``: int32 when it fits, else int64, else a double, else the string."""
    if _INT.match(text):
        value = int(text)
        if INT32_MIN <= value <= INT32_MAX:
            return value
        if INT64_MIN <= value <= INT64_MAX:
            from bson.int64 import Int64

            return Int64(value)
    try:
        return _parse_double(text)
    except RowRejected:
        return text


def _int64(text: str) -> Any:
    from bson.int64 import Int64

    return Int64(_parse_int(text, INT64_MIN, INT64_MAX, "int64"))


def _decimal(text: str) -> Any:
    from bson.decimal128 import Decimal128

    try:
        return Decimal128(text)
    except Exception:  # decimal.InvalidOperation, ValueError: inexact or not a number
        raise RowRejected("not a decimal128") from None


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered == "true" or text == "1":
        return True
    if lowered == "false" or text == "0":
        return False
    raise RowRejected("not a boolean (true/false/1/0)")


def _binary_parser(arg: str) -> Callable[[str], Any]:
    def decode(text: str, how: Callable[[str], bytes]) -> Any:
        from bson.binary import Binary

        try:
            return Binary(how(text), 0)
        except (binascii.Error, ValueError):
            raise RowRejected(f"not {arg or 'base64'} binary") from None

    decoders: dict[str, Callable[[str], bytes]] = {
        "base64": lambda t: base64.b64decode(t, validate=True),
        "base32": lambda t: base64.b32decode(t),
        "hex": bytes.fromhex,
    }
    # mongoimport's binary() with no argument is base64.
    how = decoders.get(arg or "base64")
    if how is None:
        raise ConfigurationError(f"invalid binary encoding {arg!r}: use base64, base32 or hex")
    return lambda text: decode(text, how)


# Go reference-time layout elements, longest first so "2006" wins over "2" and "January" over "Jan".
_GO_ELEMENTS: list[tuple[str, str]] = [
    ("January", r"(?P<month_name>[A-Za-z]+)"), ("Monday", r"(?:[A-Za-z]+)"), ("Z07:00", r"(?P<tz>Z|[+-]\d{2}:\d{2})"),
    ("-07:00", r"(?P<tz>[+-]\d{2}:\d{2})"), ("Z0700", r"(?P<tz>Z|[+-]\d{4})"), ("-0700", r"(?P<tz>[+-]\d{4})"),
    ("Z07", r"(?P<tz>Z|[+-]\d{2})"), ("-07", r"(?P<tz>[+-]\d{2})"), ("2006", r"(?P<year>\d{4})"),
    ("Jan", r"(?P<month_abbr>[A-Za-z]{3})"), ("Mon", r"(?:[A-Za-z]{3})"), ("MST", r"(?P<tzname>[A-Z]{3,5})"),
    ("002", r"(?P<yday>\d{3})"), ("01", r"(?P<month>\d{2})"), ("02", r"(?P<day>\d{2})"),
    ("_2", r" ?(?P<day>\d{1,2})"), ("15", r"(?P<hour>\d{2})"), ("03", r"(?P<hour12>\d{2})"),
    ("04", r"(?P<minute>\d{2})"), ("05", r"(?P<second>\d{2})"), ("06", r"(?P<year2>\d{2})"),
    ("PM", r"(?P<ampm>AM|PM)"), ("pm", r"(?P<ampm>am|pm)"), ("1", r"(?P<month>\d{1,2})"),
    ("2", r"(?P<day>\d{1,2})"), ("3", r"(?P<hour12>\d{1,2})"), ("4", r"(?P<minute>\d{1,2})"),
    ("5", r"(?P<second>\d{1,2})"),
]
_GO_FRACTION = re.compile(r"[.,](0+|9+)")
_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december"]


@dataclass(frozen=True)
class GoLayout:
    """A Go ``time.Parse`` layout compiled to a regular expression (UTC unless the layout has a zone)."""

    layout: str
    pattern: re.Pattern[str]

    @classmethod
    def compile(cls, layout: str) -> GoLayout:
        if not layout:
            raise ConfigurationError("a date() column needs a layout, e.g. date(2006-01-02T15:04:05Z07:00)")
        out: list[str] = []
        used: set[str] = set()
        i = 0
        while i < len(layout):
            fraction = _GO_FRACTION.match(layout, i)
            if fraction:
                digits = len(fraction.group(1))
                # .000 needs exactly that many digits; .999 takes up to that many (trailing zeros dropped).
                count = f"{{{digits}}}" if fraction.group(1)[0] == "0" else f"{{1,{digits}}}"
                out.append(rf"[.,](?P<fraction>\d{count})")
                i = fraction.end()
                continue
            for element, regex in _GO_ELEMENTS:
                if layout.startswith(element, i):
                    group = re.search(r"\?P<(\w+)>", regex)
                    if group and group.group(1) in used:  # a repeated element: match it, keep the first
                        regex = re.sub(r"\?P<\w+>", "?:", regex)
                    elif group:
                        used.add(group.group(1))
                    out.append(regex)
                    i += len(element)
                    break
            else:
                out.append(re.escape(layout[i]))
                i += 1
        # Go accepts fractional seconds right after the seconds even when the layout has none.
        text = "".join(out)
        if "fraction" not in used and "(?P<fraction>" not in text and "second" in used:
            text = text.replace(r"(?P<second>\d{2})", r"(?P<second>\d{2})(?:[.,](?P<fraction>\d{1,9}))?", 1)
            text = text.replace(r"(?P<second>\d{1,2})", r"(?P<second>\d{1,2})(?:[.,](?P<fraction>\d{1,9}))?", 1)
        return cls(layout, re.compile(f"^{text}$"))

    def parse(self, text: str) -> dt.datetime:
        match = self.pattern.match(text)
        if not match:
            raise RowRejected(f"does not match the date layout {self.layout!r}")
        g = {k: v for k, v in match.groupdict().items() if v is not None}
        try:
            year = int(g["year"]) if "year" in g else (2000 + int(g["year2"]) if int(g.get("year2", 0)) < 69
                                                        else 1900 + int(g["year2"])) if "year2" in g else 0
            month = int(g.get("month", 1))
            if "month_name" in g or "month_abbr" in g:
                name = (g.get("month_name") or g["month_abbr"]).lower()
                month = next(i for i, m in enumerate(_MONTHS, 1) if m == name or m[:3] == name)
            day = int(g.get("day", 1))
            hour = int(g.get("hour", 0))
            if "hour12" in g:
                hour = int(g["hour12"]) % 12 + (12 if g.get("ampm", "").lower() == "pm" else 0)
            fraction = g.get("fraction", "")
            micro = int((fraction + "000000")[:6]) if fraction else 0
            if year == 0:
                year = 1  # Go's zero year is 0; BSON dates before year 1 are out of Python's range
            value = dt.datetime(year, month, day, hour, int(g.get("minute", 0)), int(g.get("second", 0)), micro,
                                tzinfo=dt.UTC)
            if "yday" in g:
                value = value.replace(month=1, day=1) + dt.timedelta(days=int(g["yday"]) - 1)
            tz = g.get("tz")
            if tz and tz != "Z":
                sign = -1 if tz[0] == "-" else 1
                digits = tz[1:].replace(":", "")
                offset = dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
                value = value - sign * offset  # the wall time was at that offset: UTC is earlier for +hh
        except (ValueError, StopIteration, OverflowError):
            raise RowRejected(f"not a valid date for the layout {self.layout!r}") from None
        # Millisecond precision, as BSON dates are (mongoimport truncates the same way).
        return value.replace(microsecond=value.microsecond // 1000 * 1000)


# mongoimport's date_ms (Microsoft-style) and date_oracle tokens, converted to Go layout elements.
_MS_TOKENS = [("yyyy", "2006"), ("yy", "06"), ("MMMM", "January"), ("MMM", "Jan"), ("MM", "01"), ("M", "1"),
              ("dddd", "Monday"), ("ddd", "Mon"), ("dd", "02"), ("d", "2"), ("HH", "15"), ("H", "15"),
              ("hh", "03"), ("h", "3"), ("mm", "04"), ("m", "4"), ("ss", "05"), ("s", "5"), ("fff", ".000"),
              ("ff", ".00"), ("f", ".0"), ("tt", "PM"), ("zzz", "-07:00"), ("zz", "-07")]
_ORACLE_TOKENS = [("YYYY", "2006"), ("YY", "06"), ("MONTH", "January"), ("MON", "Jan"), ("MM", "01"),
                  ("DAY", "Monday"), ("DY", "Mon"), ("DD", "02"), ("HH24", "15"), ("HH12", "03"), ("HH", "03"),
                  ("MI", "04"), ("SS", "05"), ("FF", ".000"), ("AM", "PM"), ("PM", "PM"), ("TZH:TZM", "-07:00"),
                  ("TZR", "MST")]


def _convert_layout(layout: str, tokens: list[tuple[str, str]], upper: bool) -> str:
    out: list[str] = []
    i = 0
    while i < len(layout):
        for token, go in tokens:
            piece = layout[i:i + len(token)]
            if (piece.upper() if upper else piece) == token:
                out.append(go)
                i += len(token)
                break
        else:
            out.append(layout[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class ColumnSpec:
    """One CSV/TSV column: its (possibly dotted) name and how its values are typed."""

    name: str
    type_name: str = "auto"
    arg: str = ""

    @property
    def parts(self) -> list[str]:
        return self.name.split(".")

    def parser(self) -> Callable[[str], Any]:
        t, arg = self.type_name, self.arg
        if t not in ("binary", "date", "date_go", "date_ms", "date_oracle") and arg:
            raise ConfigurationError(f"column {self.name!r}: type {t} takes no argument (got {arg!r})")
        if t == "auto":
            return auto_value
        if t == "string":
            return str
        if t == "int32":
            return lambda s: _parse_int(s, INT32_MIN, INT32_MAX, "int32")
        if t == "int64":
            return _int64
        if t == "double":
            return _parse_double
        if t == "decimal":
            return _decimal
        if t == "boolean":
            return _boolean
        if t == "binary":
            return _binary_parser(arg)
        if t in ("date", "date_go"):
            return GoLayout.compile(arg).parse
        if t == "date_ms":
            return GoLayout.compile(_convert_layout(arg, _MS_TOKENS, upper=False)).parse
        if t == "date_oracle":
            return GoLayout.compile(_convert_layout(arg, _ORACLE_TOKENS, upper=True)).parse
        raise ConfigurationError(
            f"column {self.name!r}: unknown type {t!r} (auto, string, int32, int64, double, decimal, boolean, "
            "date, date_go, date_ms, date_oracle, binary)")


_ESCAPES = re.compile(r"\\(.)")


def parse_column(text: str, typed: bool) -> ColumnSpec:
    """``name.type(arg)`` (with ``columns_have_types``) or a plain, auto-typed name."""
    if not typed:
        return ColumnSpec(text)
    match = _TYPED_NAME.match(text)
    if not match:
        raise FileFormatError(f"column {text!r} has no type: with columns_have_types every column is "
                              "name.type(), e.g. age.int32() or created.date(2006-01-02)")
    # mongoimport unescapes \\, \( and \) in the argument.
    return ColumnSpec(match.group(1), match.group(2), _ESCAPES.sub(r"\1", match.group(3)))


def check_columns(columns: list[ColumnSpec]) -> None:
    """mongoimport's field checks: no leading/trailing dot, no '$' start, no '..', no duplicates, and no
    name that is both a value and a document (``a`` and ``a.b``)."""
    tree: dict[str, Any] = {}
    for column in columns:
        name = column.name
        if not name:
            raise FileFormatError("a column has an empty name")
        if name.startswith(".") or name.endswith(".") or ".." in name:
            raise FileFormatError(f"column {name!r}: a name cannot start or end with '.' or contain '..'")
        if name.startswith("$"):
            raise FileFormatError(f"column {name!r}: a name cannot start with '$'")
        node = tree
        parts = column.parts
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            existing = node.get(part)
            if last:
                if existing is not None:
                    what = "repeated" if existing is True else "both a value and a document"
                    raise FileFormatError(f"column {name!r} is {what} in the header")
                node[part] = True
            else:
                if existing is True:
                    raise FileFormatError(f"column {name!r} is both a value and a document in the header")
                node = node.setdefault(part, {})
        column.parser()  # bad types and arguments fail here, before any row is read


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class ImportOptions:
    """How one file is read (mongoimport's options, spelled as this project's params)."""

    format: str  # json | json_array | csv | tsv
    gzip: bool = False
    header_line: bool = True
    fields: tuple[str, ...] = ()
    columns_have_types: bool = False
    ignore_blanks: bool = False
    parse_errors: str = "stop"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigurationError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.parse_errors not in PARSE_ERROR_POLICIES:
            raise ConfigurationError(f"parse_errors={self.parse_errors!r} is not one of "
                                     f"{', '.join(PARSE_ERROR_POLICIES)}")
        if self.format in ("csv", "tsv"):
            if self.fields and self.header_line:
                raise ConfigurationError("header_line and fields exclude each other (as mongoimport's --headerline "
                                         "and --fields): set header_line=false to name the columns")
            if not self.fields and not self.header_line:
                raise ConfigurationError("a CSV/TSV file needs header_line=true or a fields list")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fields"] = list(self.fields)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImportOptions:
        return cls(**{**data, "fields": tuple(data.get("fields") or ())})


def format_from_name(name: str) -> tuple[str | None, bool]:
    """(format, gzip) from a file name: ``.json``/``.jsonl``/``.ndjson``, ``.csv``, ``.tsv``, ``.gz``."""
    lowered = name.lower()
    compressed = lowered.endswith(".gz")
    if compressed:
        lowered = lowered[:-3]
    for suffix, fmt in ((".jsonl", "json"), (".ndjson", "json"), (".json", "json"), (".csv", "csv"),
                        (".tsv", "tsv"), (".tab", "tsv")):
        if lowered.endswith(suffix):
            return fmt, compressed
    return None, compressed


def file_stem(name: str) -> str:
    """``orders.json.gz`` -> ``orders`` (the default collection name, as mongoimport takes the file's)."""
    base = name.rsplit("/", 1)[-1]
    if base.lower().endswith(".gz"):
        base = base[:-3]
    stem, dot, suffix = base.rpartition(".")
    return stem if dot and stem and suffix.lower() in ("json", "jsonl", "ndjson", "csv", "tsv", "tab") else base


def file_tag(location: str, size: int) -> str:
    """A short, stable identity of a file's content location (its ``_id`` prefix in insert mode)."""
    return hashlib.sha256(f"{location}\0{size}".encode()).hexdigest()[:12]


# ---------------------------------------------------------------- documents from rows


def _set_nested(document: dict[str, Any], parts: list[str], value: Any) -> None:
    node = document
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise RowRejected(f"field {'.'.join(parts)!r} is nested under a value")
        node = child
    node[parts[-1]] = value


@dataclass
class RowConverter:
    """Tokens of one CSV/TSV record -> a document, following ``parse_errors`` and ``ignore_blanks``."""

    columns: list[ColumnSpec]
    ignore_blanks: bool
    parse_errors: str
    parsers: list[Callable[[str], Any]] = field(init=False)

    def __post_init__(self) -> None:
        check_columns(self.columns)
        self.parsers = [c.parser() for c in self.columns]

    def convert(self, tokens: list[str], skipped: list[str]) -> dict[str, Any]:
        """The document; names of fields skipped under ``skip_field`` are appended to ``skipped``."""
        document: dict[str, Any] = {}
        names = {c.name for c in self.columns}
        for index, token in enumerate(tokens):
            if token == "" and self.ignore_blanks:
                continue
            if index >= len(self.columns):
                key = f"field{index}"
                if key in names:
                    raise RowRejected(f"extra value #{index + 1} would be named {key!r}, which is a column already")
                document[key] = auto_value(token)
                continue
            column = self.columns[index]
            try:
                value = self.parsers[index](token)
            except RowRejected as exc:
                reason = f"column {column.name!r} ({column.type_name}): {exc.reason}"
                if self.parse_errors == "auto_cast":
                    value = auto_value(token)
                elif self.parse_errors == "skip_field":
                    skipped.append(reason)
                    continue
                else:
                    raise RowRejected(reason, field_name=column.name) from None
            if len(column.parts) > 1:
                _set_nested(document, column.parts, value)
            else:
                document[column.name] = value
        return document


# ---------------------------------------------------------------- Extended JSON


def _json_options():
    from bson.codec_options import DatetimeConversion
    from bson.json_util import JSONMode, JSONOptions

    # DATETIME_AUTO: dates outside Python's range stay DatetimeMS instead of failing; tz-aware UTC dates.
    return JSONOptions(json_mode=JSONMode.RELAXED, tz_aware=True, tzinfo=dt.UTC,
                       datetime_conversion=DatetimeConversion.DATETIME_AUTO)


def parse_json_document(text: str, json_options=None) -> dict[str, Any]:
    """One Extended JSON v2 document (canonical or relaxed)."""
    from bson import json_util
    from bson.errors import BSONError

    try:
        value = json_util.loads(text, json_options=json_options or _json_options())
    except json.JSONDecodeError as exc:
        raise RowRejected(f"invalid JSON at column {exc.colno}: {exc.msg}") from None
    except (ValueError, TypeError, KeyError, OverflowError, BSONError) as exc:
        # json_util's own errors (a bad $date, $oid, $binary...) name the operator, not the value.
        raise RowRejected(f"invalid Extended JSON: {type(exc).__name__}: {_safe_reason(exc)}") from None
    if not isinstance(value, dict):
        raise RowRejected(f"a {type(value).__name__} where a document was expected")
    return value


def _safe_reason(exc: Exception) -> str:
    # Keep the message only when it is short and carries no quoted input (json_util messages may quote it).
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if len(text) <= 120 and "'" not in text and '"' not in text else "malformed value"


def encode_document(document: dict[str, Any], doc_id: Any | None) -> bytes:
    """BSON with ``_id`` first (as mongod stores it); ``doc_id`` fills a missing ``_id``."""
    import bson

    if "_id" in document:
        if next(iter(document)) != "_id":
            document = {"_id": document["_id"], **{k: v for k, v in document.items() if k != "_id"}}
    elif doc_id is not None:
        document = {"_id": doc_id, **document}
    try:
        return bson.encode(document)
    except (bson.errors.InvalidDocument, OverflowError, ValueError) as exc:
        raise RowRejected(f"cannot be stored as BSON: {type(exc).__name__}") from None


# ---------------------------------------------------------------- byte ranges


@dataclass(frozen=True)
class ByteRange:
    """One task's share of a file: records whose first byte lies in [start, end)."""

    index: int
    start: int
    end: int  # -1: to the end of the stream (compressed files, arrays)
    first_line: int  # physical line number (1-based) of the first record in the range

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def header_end(stream: IO[bytes], options: ImportOptions) -> tuple[list[str], int, int]:
    """The header record's tokens, the byte offset after it, and the physical lines it spans.

    ``stream`` must be buffered (``readline``); it is left just after the header."""
    if not (options.format in ("csv", "tsv") and options.header_line):
        return [], 0, 0
    if options.format == "tsv":
        raw = stream.readline(MAX_RECORD_BYTES)
        return raw.decode("utf-8-sig").rstrip("\r\n").split("\t"), len(raw), 1
    raw, lines = _read_csv_record_raw(stream)
    if not raw:
        raise FileFormatError("the file is empty: no header line")
    tokens = next(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")), [])
    return tokens, len(raw), lines


def _read_csv_record_raw(stream) -> tuple[bytes, int]:
    """The bytes of one CSV record (quote parity decides where it ends) and its physical line count."""
    parts: list[bytes] = []
    quotes = 0
    lines = 0
    size = 0
    while True:
        line = stream.readline(MAX_RECORD_BYTES)
        if not line:
            break
        parts.append(line)
        lines += 1
        size += len(line)
        quotes += line.count(b'"')
        if quotes % 2 == 0:
            break
        if size > MAX_RECORD_BYTES:
            raise FileFormatError(f"a record runs past {MAX_RECORD_BYTES >> 20} MiB: an unclosed quote?")
    return b"".join(parts), lines


def plan_ranges(stream: IO[bytes], size: int, options: ImportOptions, target_bytes: int) -> tuple[list[str], list[ByteRange]]:
    """The header (CSV/TSV with a header line) and the byte ranges for ``size`` bytes of ``stream``.

    One sequential pass in ``_BLOCK`` pieces (bounded memory): it counts newlines (and, for CSV, quote
    characters) so that each cut lands after a newline that ends a record and each range knows its first
    line number. A compressed file or a JSON array is one range.
    """
    if options.gzip:
        # The header is read through the decompressor; the range is the whole (compressed) file.
        unpacked = io.BufferedReader(gzip.GzipFile(fileobj=stream, mode="rb"), 1 << 20)  # type: ignore[arg-type]
        header, _, lines = header_end(unpacked, options)
        return header, [ByteRange(0, 0, -1, lines + 1)]
    header, offset, lines = header_end(stream, options)
    if options.format == "json_array" or target_bytes <= 0 or size - offset <= target_bytes:
        return header, [ByteRange(0, offset, -1, lines + 1)]
    ranges: list[ByteRange] = []
    start, start_line = offset, lines + 1
    position = offset  # absolute offset of the next byte to read
    line = lines + 1  # line number of the byte at ``position``
    quotes = 0  # quote characters seen since the file's start (parity only matters), header excluded: even
    quoted = options.format == "csv"
    next_cut = start + target_bytes
    while True:
        block = stream.read(_BLOCK)
        if not block:
            break
        cursor = 0
        while position + cursor < size:
            local_cut = next_cut - position
            if local_cut >= len(block):
                break
            local_cut = max(local_cut, cursor)
            newline = block.find(b"\n", local_cut)
            if newline < 0:
                break
            if quoted:
                quotes += block.count(b'"', cursor, newline)
                if quotes % 2:
                    # inside a quoted field: this newline is data; look again after it
                    line += block.count(b"\n", cursor, newline + 1)
                    cursor = newline + 1
                    next_cut = position + cursor
                    continue
            line += block.count(b"\n", cursor, newline + 1)
            cursor = newline + 1
            cut = position + cursor
            if cut < size:
                ranges.append(ByteRange(len(ranges), start, cut, start_line))
                start, start_line = cut, line
            next_cut = cut + target_bytes
        if quoted:
            quotes += block.count(b'"', cursor)
        line += block.count(b"\n", cursor)
        position += len(block)
    ranges.append(ByteRange(len(ranges), start, -1, start_line))
    return header, ranges


class _RangeReader(io.RawIOBase):
    """At most ``limit`` bytes of ``stream`` (which is positioned at the range's start)."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.stream = stream
        self.left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left == 0:
            return 0
        want = len(buffer) if self.left < 0 else min(len(buffer), self.left)
        data = self.stream.read(want)
        buffer[: len(data)] = data
        if self.left > 0:
            self.left -= len(data)
        return len(data)


def open_range(raw: IO[bytes], rng: ByteRange, options: ImportOptions) -> IO[bytes]:
    """A buffered binary stream of the range from ``raw``, which is positioned at ``rng.start``:
    decompressed when the file is gzip, cut at ``rng.end``."""
    if options.gzip:
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), 1 << 20)  # type: ignore[arg-type]
    limit = -1 if rng.end < 0 else rng.end - rng.start
    return io.BufferedReader(_RangeReader(raw, limit), 1 << 20)


# ---------------------------------------------------------------- records of a range


@dataclass
class Record:
    """A parsed row: its physical line, and its document or why it was rejected."""

    line: int
    document: dict[str, Any] | None
    rejection: str | None = None
    skipped_fields: list[str] = field(default_factory=list)


def _lines(stream: IO[bytes]) -> Iterator[bytes | None]:
    """Lines of at most 16 MiB; a longer line is consumed and given as None (rejected, never buffered)."""
    while True:
        raw = stream.readline(MAX_RECORD_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = stream.readline(MAX_RECORD_BYTES)
            yield None
            continue
        yield raw


def json_lines_records(stream: IO[bytes], first_line: int) -> Iterator[Record]:
    options = _json_options()
    for offset, raw in enumerate(_lines(stream)):
        line = first_line + offset
        if raw is None:
            yield Record(line, None, "line longer than 16 MiB")
            continue
        if offset == 0 and first_line == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Record(line, None, f"not UTF-8 (byte {exc.start + 1} of the line)")
            continue
        if not text.strip():
            continue  # blank lines separate nothing and are skipped, as mongoimport does
        try:
            yield Record(line, parse_json_document(text, options))
        except RowRejected as exc:
            yield Record(line, None, exc.reason)


_ARRAY_TOKEN = re.compile(rb'["\[\]{},\n]')
_STRING_TOKEN = re.compile(rb'["\\\n]')


def json_array_records(stream: IO[bytes], first_line: int = 1) -> Iterator[Record]:
    """Elements of one top-level JSON array, each parsed alone (memory: one element at a time).

    A scanner tracks string state and nesting depth to find each element's bytes; a structural error (no
    opening '[', text after the closing ']', an unterminated array) fails the file, as it would fail
    mongoimport, because the rows after it cannot be located.
    """
    options = _json_options()
    line = first_line
    started = finished = False
    depth = 0
    in_string = escaped = False
    element: list[bytes] = []
    element_line = line
    element_size = 0
    pending = b""
    first_block = True
    while True:
        block = stream.read(1 << 20)
        if not block:
            break
        if first_block and block.startswith(codecs.BOM_UTF8):
            block = block[len(codecs.BOM_UTF8):]
        first_block = False
        data = pending + block
        pending = b""
        i = 0
        n = len(data)
        while i < n:
            if finished:
                rest = data[i:].strip()
                if rest:
                    raise FileFormatError(f"line {line}: text after the closing ']' of the JSON array")
                break
            if not started:
                stripped = data[i:].lstrip()
                line += data[i:n - len(stripped)].count(b"\n")
                if not stripped:
                    break
                if stripped[:1] != b"[":
                    raise FileFormatError(f"line {line}: a JSON array file must start with '['")
                started = True
                i = n - len(stripped) + 1
                element_line = line
                continue
            if in_string:
                if escaped:
                    element.append(data[i:i + 1])
                    escaped = False
                    i += 1
                    continue
                match = _STRING_TOKEN.search(data, i)
                if not match:
                    element.append(data[i:])
                    element_size += n - i
                    break
                j = match.start()
                element.append(data[i:j + 1])
                element_size += j + 1 - i
                i = j + 1
                c = data[j]
                if c == 0x5C:
                    escaped = True
                elif c == 0x0A:
                    line += 1
                else:
                    in_string = False
                continue
            match = _ARRAY_TOKEN.search(data, i)
            if not match:
                element.append(data[i:])
                element_size += n - i
                break
            j = match.start()
            c = data[j]
            if c == 0x0A:
                element.append(data[i:j + 1])
                element_size += j + 1 - i
                line += 1
                i = j + 1
                if depth == 0 and not b"".join(element).strip():
                    element, element_size, element_line = [], 0, line
                continue
            if c == 0x22:
                in_string = True
                element.append(data[i:j + 1])
                element_size += j + 1 - i
                i = j + 1
                continue
            if c in (0x7B, 0x5B):  # { [
                if depth == 0 and not b"".join(element).strip():
                    element_line = line
                depth += 1
            elif c in (0x7D, 0x5D) and depth > 0:  # } ]
                depth -= 1
            elif depth == 0 and c in (0x2C, 0x5D):  # , or the closing ]
                element.append(data[i:j])
                text = b"".join(element).strip()
                if text:
                    yield _array_element(text, element_line, options)
                elif c == 0x2C:
                    yield Record(element_line, None, "empty array element")
                element, element_size = [], 0
                element_line = line
                i = j + 1
                if c == 0x5D:
                    finished = True
                continue
            element.append(data[i:j + 1])
            element_size += j + 1 - i
            i = j + 1
            if element_size > MAX_RECORD_BYTES:
                raise FileFormatError(f"line {element_line}: an array element runs past 16 MiB")
    if started and not finished:
        raise FileFormatError(f"line {line}: the JSON array is not closed with ']'")
    if not started:
        return


def _array_element(text: bytes, line: int, options) -> Record:
    try:
        return Record(line, parse_json_document(text.decode("utf-8"), options))
    except UnicodeDecodeError:
        return Record(line, None, "not UTF-8")
    except RowRejected as exc:
        return Record(line, None, exc.reason)


def delimited_records(stream: IO[bytes], first_line: int, converter: RowConverter, fmt: str,
                      strip_bom: bool) -> Iterator[Record]:
    if fmt == "tsv":
        # mongoimport's TSV: one record per line, split on tabs, no quoting.
        for offset, raw in enumerate(_lines(stream)):
            number = first_line + offset
            if raw is None:
                yield Record(number, None, "line longer than 16 MiB")
                continue
            if offset == 0 and strip_bom and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                body = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield Record(number, None, f"not UTF-8 (byte {exc.start + 1} of the line)")
                continue
            if body:
                yield _convert(converter, body.split("\t"), number)
        return
    text = io.TextIOWrapper(stream, encoding="utf-8-sig" if strip_bom else "utf-8", newline="")
    reader = csv.reader(text, strict=True)
    consumed = 0
    while True:
        number = first_line + consumed
        try:
            tokens = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            consumed = reader.line_num
            yield Record(number, None, f"malformed CSV: {exc}")
            continue
        except UnicodeDecodeError as exc:
            raise FileFormatError(f"not UTF-8 text near line {number} (byte {exc.start + 1} of a read block); "
                                  "convert the file to UTF-8") from None
        consumed = reader.line_num
        if tokens:  # an empty line is not a record (mongoimport skips it)
            yield _convert(converter, tokens, number)


def _convert(converter: RowConverter, tokens: list[str], number: int) -> Record:
    skipped: list[str] = []
    try:
        return Record(number, converter.convert(tokens, skipped), skipped_fields=skipped)
    except RowRejected as exc:
        return Record(number, None, exc.reason)


def columns_for(options: ImportOptions, header: list[str]) -> list[ColumnSpec]:
    names = list(options.fields) if options.fields else header
    if not names:
        raise FileFormatError("no column names: the header line is empty")
    columns = [parse_column(n, options.columns_have_types) for n in names]
    check_columns(columns)
    return columns


def records(stream: IO[bytes], rng: ByteRange, options: ImportOptions, header: list[str]) -> Iterator[Record]:
    """Every record of one range, parsed; ``stream`` is what ``open_range`` returned."""
    if options.format == "json":
        return json_lines_records(stream, rng.first_line)
    if options.format == "json_array":
        return json_array_records(stream, rng.first_line)
    columns = columns_for(options, header)
    converter = RowConverter(columns, options.ignore_blanks, options.parse_errors)
    if options.gzip and options.header_line and rng.start == 0:
        # A compressed file is read from its start: skip the header record first.
        _skip_header(stream, options.format)
    return delimited_records(stream, rng.first_line, converter, options.format,
                             strip_bom=rng.start == 0 and not options.header_line)


def _skip_header(stream: IO[bytes], fmt: str) -> None:
    if fmt == "tsv":
        stream.readline()
        return
    quotes = 0
    while True:
        line = stream.readline(MAX_RECORD_BYTES)
        if not line:
            return
        quotes += line.count(b'"')
        if quotes % 2 == 0:
            return


def detect_format(head: bytes, name: str) -> tuple[str, bool]:
    """The format and compression of a file from its name, else from its first bytes."""
    fmt, compressed = format_from_name(name)
    compressed = compressed or head.startswith(GZIP_MAGIC)
    if compressed:
        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(head)).read1(64 << 10)  # type: ignore[attr-defined]
        except (OSError, EOFError):
            head = b""
    stripped = head.lstrip(codecs.BOM_UTF8).lstrip()
    if fmt in (None, "json"):
        if stripped.startswith(b"["):
            return "json_array", compressed
        if stripped.startswith(b"{"):
            return "json", compressed
    if fmt is None:
        first = stripped.split(b"\n", 1)[0]
        if b"\t" in first:
            return "tsv", compressed
        if b"," in first:
            return "csv", compressed
        raise FileFormatError(f"cannot tell the format of {name}: name it .json/.csv/.tsv or set its format")
    return fmt, compressed


# ---------------------------------------------------------------- writing a range to the target

MAX_REJECTIONS_KEPT = 1000  # per range: the report keeps this many locations and counts the rest
_BATCH_BYTES = 8 << 20


class ImportStopped(MigrationError):
    """``parse_errors=stop`` met a bad row (the message names file, line and reason, never values)."""


@dataclass
class RangeResult:
    """What importing one range did; small and JSON-safe (it travels through XCom)."""

    file: str
    namespace: str
    range_index: int
    mode: str
    rows: int = 0  # records read (documents produced + rows rejected)
    documents: int = 0  # rows that became documents
    rejected: int = 0  # rows rejected (bad input, or refused by the target)
    fields_skipped: int = 0
    inserted: int = 0
    already_present: int = 0  # insert mode: _id already in the target (an earlier attempt of this range)
    matched: int = 0
    modified: int = 0
    upserted: int = 0
    deleted: int = 0
    digest: str = ""  # multiset digest of the documents written (insert mode)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    rejections_not_listed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reject(self, line: int, reason: str, action: str) -> None:
        if len(self.rejections) < MAX_REJECTIONS_KEPT:
            self.rejections.append(Rejection(self.file, line, reason, action).to_dict())
        else:
            self.rejections_not_listed += 1


def _lookup(document: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = document
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def key_filter(document: dict[str, Any], upsert_fields: list[str]) -> dict[str, Any] | None:
    """The filter on ``upsert_fields``; None when the document has none of them; RowRejected when only some."""
    found = {f: _lookup(document, f) for f in upsert_fields}
    present = {f: v for f, (ok, v) in found.items() if ok}
    if not present:
        return None
    if len(present) < len(upsert_fields):
        missing = ", ".join(f for f in upsert_fields if f not in present)
        raise RowRejected(f"missing upsert field(s) {missing}")
    return present


def document_id(tag: str, line: int) -> str:
    """The ``_id`` a row without one gets in insert mode: the same on every attempt and every run."""
    return f"{tag}:{line}"


def import_records(collection, records_iter: Iterator[Record], *, result: RangeResult, tag: str, policy: str,
                   upsert_fields: list[str], batch_size: int, bypass_validation: bool = False) -> RangeResult:
    """Write the records of one range to ``collection`` in ``result.mode``, in bounded batches.

    insert: unordered ``insert_many`` of raw BSON; a duplicate ``_id`` is an earlier attempt's document (the
    ``_id`` is the row's file and line) and is counted as already present, never written twice.
    upsert: ``replace_one(filter, document, upsert=True)``; merge: ``update_one(filter, {$set: document},
    upsert=True)``; delete: ``delete_one(filter)``; the filter is the document's ``upsert_fields``. Rows
    without any of those fields are inserted (as mongoimport does), keyed by file and line.
    """
    from bson.raw_bson import RawBSONDocument
    from pymongo import DeleteOne, InsertOne, ReplaceOne, UpdateOne

    mode = result.mode
    id_keyed = upsert_fields == ["_id"]
    ops: list[Any] = []
    lines: list[int] = []
    size = 0
    raws: list[bytes] = []

    def flush() -> None:
        nonlocal ops, lines, size
        if ops:
            _write(collection, ops, lines, result, policy, bypass_validation)
        ops, lines, size = [], [], 0

    for record in records_iter:
        result.rows += 1
        if record.document is None:
            if policy == "stop":
                raise ImportStopped(f"{result.file} line {record.line}: {record.rejection} (parse_errors=stop; "
                                    "use skip_row to import the other rows)")
            result.rejected += 1
            result.reject(record.line, record.rejection or "unreadable", "row_skipped")
            continue
        for reason in record.skipped_fields:
            result.fields_skipped += 1
            result.reject(record.line, reason, "field_skipped")
        document = record.document
        try:
            key = None if mode == "insert" else key_filter(document, upsert_fields)
            if mode == "delete" and key is None:
                raise RowRejected(f"none of the upsert field(s) {', '.join(upsert_fields)}")
            fill = mode == "insert" or key is None or (id_keyed and mode != "delete")
            raw = encode_document(document, document_id(tag, record.line) if fill else None)
        except RowRejected as exc:
            if policy == "stop":
                raise ImportStopped(f"{result.file} line {record.line}: {exc.reason} (parse_errors=stop)") from None
            result.rejected += 1
            result.reject(record.line, exc.reason, "row_skipped")
            continue
        result.documents += 1
        doc = RawBSONDocument(raw)
        if mode == "insert" or key is None:
            ops.append(InsertOne(doc))
            raws.append(raw)
        elif mode == "upsert":
            ops.append(ReplaceOne(key, doc, upsert=True))
        elif mode == "merge":
            ops.append(UpdateOne(key, {"$set": doc}, upsert=True))
        else:
            ops.append(DeleteOne(key))
        lines.append(record.line)
        size += len(raw)
        if len(ops) >= batch_size or size >= _BATCH_BYTES:
            flush()
            result.digest = _add_digest(result.digest, raws)
            raws = []
    flush()
    result.digest = _add_digest(result.digest, raws)
    return result


def _add_digest(current: str, raws: list[bytes]) -> str:
    from atlas_migration.validation import multiset_digest

    if not raws:
        return current
    _, digest = multiset_digest(raws)
    return combine_digests([current, digest]) if current else digest


def combine_digests(digests: list[str]) -> str:
    """The multiset digest of the union of parts (sums of sha256 values add up)."""
    from atlas_migration.validation import multiset_digest

    prefix = multiset_digest([])[1].partition(":")[0]
    total = sum(int(d.partition(":")[2], 16) for d in digests if d)
    return f"{prefix}:{total % 2**256:064x}"


def _write(collection, ops: list[Any], lines: list[int], result: RangeResult, policy: str, bypass: bool) -> None:
    from pymongo.errors import BulkWriteError

    try:
        outcome = collection.bulk_write(ops, ordered=False, bypass_document_validation=bypass)
        details = outcome.bulk_api_result
    except BulkWriteError as exc:
        details = exc.details
    errors = details.get("writeErrors") or []
    refused = []
    for error in errors:
        line = lines[error["index"]]
        if error.get("code") == 11000 and result.mode == "insert" and (error.get("keyPattern") or {"_id": 1}) == {"_id": 1}:
            result.already_present += 1
            continue
        refused.append((line, f"the target refused the document: code {error.get('code')} "
                              f"({error.get('codeName') or 'write error'})"))
    result.inserted += details.get("nInserted", 0)
    result.matched += details.get("nMatched", 0)
    result.modified += details.get("nModified", 0)
    result.upserted += details.get("nUpserted", 0)
    result.deleted += details.get("nRemoved", 0)
    for line, reason in refused:
        if policy == "stop":
            raise ImportStopped(f"{result.file} line {line}: {reason} (parse_errors=stop)")
        result.rejected += 1
        result.documents -= 1
        result.reject(line, reason, "row_skipped")
