"""The built-in presets and suites, shipped inside the package, found by name.

Presets are ``condcomp/presets/<name>.toml`` and suites ``condcomp/presets/suites/<name>.toml``.
They are read through :mod:`importlib.resources`, so an installed wheel finds them as well as
the source tree does. Each file's first comment line is its one-line description
(``condcomp presets`` lists them).

Wherever a config is named (``--config``, ``bench models --configs``, ``extends``, a suite's
``base`` and ``preset``), an existing file wins, so a user's own TOML always works; otherwise
the name (``switch`` or ``switch.toml``) is a built-in.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from condcomp.errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    # A config file: a path on disk, or a built-in read through importlib.resources.
    Source = Path | Traversable


@dataclass(frozen=True)
class _Collection:
    """One kind of built-in file: where it lives in the package and how it is used."""

    kind: str  # "preset" or "suite"
    file_noun: str  # what a path to one is called in messages
    folder: tuple[str, ...]  # below condcomp/presets
    example: str  # how a built-in is named on the command line

    def root(self) -> Traversable:
        return files(__name__).joinpath(*self.folder)

    def names(self) -> list[str]:
        return sorted(f.name[: -len(".toml")] for f in self.root().iterdir()
                      if f.is_file() and f.name.endswith(".toml"))

    def builtin(self, name: str) -> Traversable | None:
        # Only a bare name is a built-in: "switch" or "switch.toml", never "dir/switch.toml".
        if PurePath(name).name != name or not name:
            return None
        entry = self.root().joinpath(name if name.endswith(".toml") else f"{name}.toml")
        return entry if entry.is_file() else None

    def find(self, name: str | Path, relative_to: Source | None) -> Source:
        text = str(name)
        path = Path(text).expanduser()
        if isinstance(relative_to, Path):
            path = relative_to.parent / path  # an absolute path stays as it is
        # Beside a file that is not on disk (a built-in in a zipped package) only names resolve.
        if (relative_to is None or isinstance(relative_to, Path)) and path.is_file():
            return path
        found = self.builtin(text)
        if found is not None:
            return found
        if (relative_to is None or isinstance(relative_to, Path)) and path.is_dir():
            where = f" (relative to {relative_to})" if relative_to is not None else ""
            raise ConfigError(f"{self.file_noun} {text} is a directory{where}, not a TOML file; "
                              "name the .toml file itself")
        raise ConfigError(self._unknown(text, relative_to))

    def _unknown(self, name: str, relative_to: Source | None) -> str:
        where = f" (relative to {relative_to})" if relative_to is not None else ""
        if PurePath(name).name == name:
            head = f"no built-in {self.kind} named {name!r} and no such file{where}"
        else:
            head = f"{self.file_noun} {name} does not exist{where}"
        if "configs" in PurePath(name).parts:
            # An old-style path: the presets moved from the repository's configs/ into the
            # package, and are named now.
            stem = PurePath(name).stem
            use = f": use {stem!r}" if stem in self.names() else f" (e.g. {self.example})"
            head += f"; the built-in {self.kind}s are now named, not paths{use}"
        return (f"{head}; built-in {self.kind}s: {', '.join(self.names())} "
                "(condcomp presets describes them)")

    def listing(self) -> list[tuple[str, str]]:
        return [(name, description(self.root().joinpath(f"{name}.toml")))
                for name in self.names()]


PRESETS = _Collection("preset", "config file", (), "--config switch")
SUITES = _Collection("suite", "suite file", ("suites",), "condcomp compare demo")


def find_preset(name: str | Path, relative_to: Source | None = None) -> Source:
    """A run config: the file ``name`` (beside ``relative_to``, a config that refers to it,
    when given; else from the working directory) if it exists, else the built-in preset."""
    return PRESETS.find(name, relative_to)


def find_suite(name: str | Path) -> Source:
    """A suite: the file ``name`` if it exists, else the built-in suite of that name."""
    return SUITES.find(name, None)


def description(source: Source) -> str:
    """The file's first comment line: its one-line description."""
    for line in source.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every built-in preset."""
    return PRESETS.listing()


def list_suites() -> list[tuple[str, str]]:
    """(name, description) of every built-in suite."""
    return SUITES.listing()


def builtin_text(name: str) -> str:
    """The TOML text of the built-in preset, or else suite, ``name`` (to copy and edit)."""
    for collection in (PRESETS, SUITES):
        found = collection.builtin(name)
        if found is not None:
            return found.read_text(encoding="utf-8")
    raise ConfigError(f"no built-in preset or suite named {name!r}; presets: "
                      f"{', '.join(PRESETS.names())}; suites: {', '.join(SUITES.names())}")
