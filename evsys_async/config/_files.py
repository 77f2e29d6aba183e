"""Config files: YAML, TOML or JSON text to data, with the line of every place.

What this module promises: a :class:`Source` reads a file as UTF-8 text (a
binary file, a NUL byte, a malformed document is a
:class:`~evsys_async.errors.ConfigError` naming the file and the line) and,
for YAML, keeps the node tree so that an error's path inside the config maps
to a line (:meth:`Source.error`). YAML is read with ``yaml.SafeLoader`` only
(no Python objects), reads ``1e-5`` as a float, and refuses duplicate keys,
recursive aliases and a file whose aliases expand past
:data:`YAML_EXPANSION_BUDGET` values. :func:`encode_config` writes a config
back as text that loads equal. Reading blocks on the file system.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from ..errors import ConfigError, ConfigPath, PlacedConfigError, format_path
from ._schema import AnyConfig

__all__ = ["YAML_EXPANSION_BUDGET", "Source", "encode_config", "read_source"]

_FORMATS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}


def _format_of(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"{path}: unknown config format {path.suffix or '(no suffix)'!r}; "
            "use .yaml/.yml, .toml or .json"
        )
    return fmt


class Source:
    """A config file's text and, for YAML, its node tree (to map paths to lines)."""

    def __init__(self, path: Path, text: str, fmt: str) -> None:
        self.path = path
        self.text = text
        self.fmt = fmt
        self.root: yaml.Node | None = None
        #: a leading part of every error's path that the file itself does not spell
        #: (a callbacks file that is a bare list: its errors say ``callbacks[1]...``)
        self.implicit: ConfigPath = ()

    def parse(self) -> object:
        """The file's data: YAML (safe, with its node tree kept), TOML or JSON.

        Raises :class:`ConfigError` naming the file and the line for malformed
        text, a duplicate YAML key, a recursive alias or an alias bomb.
        """
        if self.fmt == "yaml":
            loader = _YamlLoader(self.text)
            try:
                self.root = loader.get_single_node()
                _check_yaml_tree(self.root, self)
                return loader.construct_document(self.root) if self.root is not None else None
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or exc.context_mark
                line = f":{mark.line + 1}" if mark is not None else ""
                problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
                raise ConfigError(f"{self.path}{line}: malformed YAML: {problem}") from None
            except yaml.reader.ReaderError as exc:  # a character YAML does not allow
                at = self.text.count("\n", 0, exc.position) + 1
                raise ConfigError(
                    f"{self.path}:{at}: malformed YAML: character {exc.character!r} "
                    "is not allowed in a YAML file"
                ) from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{self.path}: malformed YAML: {exc}") from None
            except RecursionError:
                raise ConfigError(
                    f"{self.path}: malformed YAML: nested too deeply to be a config"
                ) from None
            finally:
                loader.dispose()
        if self.fmt == "toml":
            try:
                return tomllib.loads(self.text)
            except tomllib.TOMLDecodeError as exc:
                m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
                line = f":{m.group(1)}" if m else ""
                raise ConfigError(f"{self.path}{line}: malformed TOML: {exc}") from None
        try:
            return json.loads(self.text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{self.path}:{exc.lineno}: malformed JSON: {exc.msg}") from None

    def line_of(self, path: ConfigPath) -> int | None:
        """The 1-based line of the deepest node ``path`` reaches (YAML only)."""
        node = self.root
        if node is None:
            return None
        if self.implicit and path[: len(self.implicit)] == self.implicit:
            path = path[len(self.implicit) :]
        line = node.start_mark.line + 1
        for part in path:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if key.value == str(part):
                        line = key.start_mark.line + 1
                        node = value
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if part >= len(node.value):
                    return line
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    def error(self, exc: PlacedConfigError) -> ConfigError:
        """``exc`` as the error a user reads: ``<file>:<line>: <path>: <problem>``."""
        line = self.line_of(exc.path)
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        return ConfigError(f"{where}: {exc}")


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e308`` and ``1E-5`` as floats.

    YAML 1.1 (PyYAML's default) wants a dot in a float, so ``drain_timeout: 1e308``
    would be the string ``"1e308"``; YAML 1.2 and every other format read it as a
    number, and so does this loader.
    """


class _YamlDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes the strings :class:`_YamlLoader` would read as
    floats (``"0E0"``), so :func:`encode_config` round-trips them."""


for _cls in (_YamlLoader, _YamlDumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )

#: How many values a YAML file may expand to once its aliases are followed. Anchors
#: and aliases keep working (a shared block of params is a few hundred values);
#: a "billion laughs" file, a few lines that expand to millions, stops here.
YAML_EXPANSION_BUDGET = 100_000


def _check_yaml_tree(root: yaml.Node | None, source: Source) -> None:
    """Duplicate keys, recursive aliases and the expansion budget, each node once.

    An aliased node is one object shared by every reference, so it is checked
    once and its expanded size is remembered, however many times it is used.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, path: ConfigPath) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(
                f"{source.path}:{node.start_mark.line + 1}: {_place(path)}: an alias refers "
                "to the block that contains it, which would never end; write the value out"
            )
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                line = k.start_mark.line + 1
                if k.value in seen:
                    raise ConfigError(
                        f"{source.path}:{line}: duplicate key {k.value!r} "
                        f"(first on line {seen[k.value]}); YAML keeps only the last"
                    )
                seen[k.value] = line
                total += size(v, (*path, str(k.value)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                total += size(item, (*path, i))
        active.discard(key)
        if total > YAML_EXPANSION_BUDGET:
            raise ConfigError(
                f"{source.path}:{node.start_mark.line + 1}: {_place(path)}: its aliases expand "
                f"to more than {YAML_EXPANSION_BUDGET:,} values, far more than a config holds "
                "(an alias bomb?); write the values out or use fewer nested aliases"
            )
        sizes[key] = total
        return total

    if root is not None:
        size(root, ())


def _place(path: ConfigPath) -> str:
    return format_path(path) or "the top level"


def _text_of(file: Path, data: bytes) -> str:
    """The file's text; a binary file or a NUL byte is one line naming the place."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{file}:{line}: byte 0x{data[exc.start]:02x} at column {column} is not UTF-8 "
            "text: is this a binary file? A config is YAML, TOML or JSON text"
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        column = nul - (text.rfind("\n", 0, nul) + 1) + 1
        raise ConfigError(
            f"{file}:{line}: a NUL byte at column {column}: a config is text, and NUL is "
            "not allowed in YAML, TOML or JSON (was the file saved by a binary tool?)"
        )
    return text.removeprefix("\ufeff")  # a BOM some editors write


def read_source(file: Path) -> Source:
    """The config file at ``file``, read and decoded (not parsed yet).

    Raises :class:`ConfigError` for an unknown suffix, a file that cannot be read,
    bytes that are not UTF-8 text, or a NUL byte, each naming the file (and the
    line, where there is one).
    """
    fmt = _format_of(file)
    try:
        data_bytes = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config: {exc.strerror or exc}") from None
    return Source(file, _text_of(file, data_bytes), fmt)


def encode_config(config: AnyConfig, fmt: Literal["yaml", "json"] = "yaml") -> str:
    """``config`` as YAML or JSON text that :func:`load_config` reads back equal."""
    data = msgspec.to_builtins(config)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    text: str = yaml.dump(data, Dumper=_YamlDumper, sort_keys=False, allow_unicode=True)
    return text
