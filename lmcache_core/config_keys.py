"""One configuration value: how a key is typed, bounded, parsed from text and checked (`Key`), and the
byte sizes it may hold (`ByteSize`). `lmcache_core.config` builds the table of keys from these. MASK,
BOOL_WORDS and did_you_mean live in `lmcache_core.remote_url` (which this module builds on)."""

import json
import math
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from lmcache_core.errors import ConfigError
from lmcache_core.remote_url import BOOL_WORDS, MASK, RemoteURL, did_you_mean, parse_remote_url

ENV_PREFIX = "LMCACHE_"
GB, MiB = 10**9, 2**20
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_TEXT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*\Z")
_NONE_TEXT = ("", "none", "null")


class ByteSize(int):
    """A number of bytes; str() gives the shortest exact form ("50GB", "16MiB", "1000B")."""

    def __repr__(self) -> str:
        return f"ByteSize({int(self)})"

    def __str__(self) -> str:
        for unit in ("TB", "TiB", "GB", "GiB", "MB", "MiB", "KB", "KiB"):
            scale = _UNITS[unit.lower()]
            if self and self % scale == 0:
                return f"{self // scale}{unit}"
        return f"{int(self)}B"


@dataclass(frozen=True)
class Key:
    """One row of the key table: how a key is typed, bounded, parsed and documented."""

    name: str
    default: Any
    kind: str  # int | float | seconds | bool | size | choice | str | path | url | prompts
    meaning: str
    section: str = "cache_config"
    optional: bool = False  # None allowed (and "", "none", "null" mean None)
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    choices: tuple[str, ...] = ()
    unit: int = GB  # what a plain number means, for sizes
    multiple_of: int | None = None
    secret: bool = False

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def type_text(self) -> str:
        text = {"int": "int", "float": "float", "seconds": "seconds", "bool": "bool", "str": "string",
                "path": "path", "url": "URL", "choice": " \\| ".join(f"`{c}`" for c in self.choices),
                "prompts": "list of prompts (text, or \"ids:1,2,...\")",
                "size": "size (number = GB)" if self.unit == GB else "size (number = bytes)"}[self.kind]
        return text + self._bounds() + (", or null" if self.optional else "")

    def expected(self) -> str:
        what = {"int": "an integer", "float": "a number", "seconds": "a number of seconds",
                "bool": "true or false", "str": "a string", "path": "a directory path",
                "url": "a redis://, rediss://, unix://, redis-cluster:// or rediss-cluster:// URL",
                "choice": f"one of {', '.join(self.choices)}",
                "prompts": "a list of prompts, each text or \"ids:<int>,<int>,...\" (environment: a JSON array)",
                "size": f"a size like 50, 512MB or 2GiB (plain number = {'GB' if self.unit == GB else 'bytes'})",
                }[self.kind]
        return what + self._bounds() + (", or null" if self.optional else "")

    def _bounds(self) -> str:
        show = (lambda x: str(ByteSize(x)) if x else "0") if self.kind == "size" else (lambda x: f"{x:g}")
        if self.low is not None and self.high is not None and not self.low_open:
            text = f" in {show(self.low)}..{show(self.high)}"
        elif self.low is not None:
            text = f" {'>' if self.low_open else '>='} {show(self.low)}"
        else:
            text = "" if self.high is None else f" <= {show(self.high)}"
        return text + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")

    def fail(self, source: str, value: Any, why: str = "") -> ConfigError:
        shown = MASK if self.secret else repr(value)
        return ConfigError(f"{source}: {self.name}: expected {self.expected()}, got {shown} "
                           f"({type(value).__name__}){why}")

    def from_text(self, text: str, source: str) -> Any:
        """A value given as text (an environment variable) converted to this key's type, then checked."""
        t = text.strip()
        if self.optional and t.lower() in _NONE_TEXT:
            return None
        if self.kind == "bool":
            if t.lower() not in BOOL_WORDS:
                raise self.fail(source, text, "; accepted: true/false/1/0/yes/no")
            return BOOL_WORDS[t.lower()]
        if self.kind == "int":
            if not re.fullmatch(r"[+-]?\d{1,18}", t):
                raise self.fail(source, text)
            return self.coerce(int(t), source)
        if self.kind in ("float", "seconds"):
            try:
                number = float(t)
            except ValueError:
                raise self.fail(source, text) from None
            return self.coerce(number, source)
        if self.kind == "prompts":
            try:
                value = json.loads(t)
            except ValueError:
                raise self.fail(source, text, "; write a JSON array of strings") from None
            return self.coerce(value, source)
        return self.coerce(text if self.kind == "str" else t, source)

    def coerce(self, value: Any, source: str) -> Any:
        """A typed value (constructor, YAML, overrides) checked and normalized to the stored form."""
        if value is None or (self.optional and isinstance(value, str) and value == ""):
            if self.optional:
                return None
            raise self.fail(source, value)
        kind, original = self.kind, value
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.fail(source, value)
            return value
        if kind == "size":
            value = self._size(value, source)
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(source, value)
        elif kind in ("float", "seconds"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise self.fail(source, value)
            value = float(value)
        elif kind in ("str", "choice"):
            if not isinstance(value, str) or (kind == "choice" and value not in self.choices):
                hint = did_you_mean(value.lower(), self.choices) if isinstance(value, str) else ""
                raise self.fail(source, value, hint)
            if any(not c.isprintable() for c in value):
                raise self.fail(source, value, "; control characters are not allowed")
        elif kind == "prompts":
            return self._prompts(value, source)
        elif kind == "path":
            if not isinstance(value, (str, os.PathLike)) or "\0" in str(value):
                raise self.fail(source, value)
            value = os.path.expanduser(os.fspath(value))
        elif kind == "url":
            if isinstance(value, RemoteURL):
                return value
            if not isinstance(value, str):
                raise self.fail(source, value)
            try:
                return parse_remote_url(value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {self.name}: {e}") from None
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high or (self.multiple_of and value % self.multiple_of):
            raise self.fail(source, original)
        return value

    def _prompts(self, value: Any, source: str) -> tuple[str, ...]:
        """A tuple of non-empty prompts: text (newlines and tabs allowed) or "ids:<int>,<int>,..."."""
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise self.fail(source, value)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise self.fail(source, value, f"; item {i} is not a non-empty string")
            if any(not (c.isprintable() or c in "\n\t\r") for c in item):
                raise self.fail(source, value, f"; item {i} has control characters")
            if item.startswith("ids:") and not re.fullmatch(r"ids:\d+(,\d+)*", item):
                raise self.fail(source, value, f"; item {i}: write token ids as ids:13,198")
        return tuple(value)

    def _size(self, value: Any, source: str) -> ByteSize:
        if isinstance(value, ByteSize):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self.fail(source, value)
        if isinstance(value, str):
            m = _SIZE_TEXT.match(value)
            unit = m.group(2).lower() if m else None
            if unit is None or (unit and unit not in _UNITS):
                raise self.fail(source, value, "; units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
            number, scale = Decimal(m.group(1)), _UNITS[unit] if unit else self.unit
        else:
            if not math.isfinite(value) or value < 0:
                raise self.fail(source, value)
            number, scale = Decimal(repr(value)), self.unit
        if scale == GB and number > 10**6 and not (isinstance(value, str) and unit):
            # a plain number above a petabyte: surely bytes written where GB are meant
            raise self.fail(source, value, f"; a plain number here is GB, for bytes write '{value}B'")
        return ByteSize(int((number * scale).to_integral_value()))

