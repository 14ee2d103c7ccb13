"""Recipes: an ordered list of passes with their options, plus settings (see `config.RECIPE_SETTINGS`).

A recipe is a built-in name (a YAML file in this folder) or a path to a YAML or JSON file::

    name: my-recipe
    description: what it is for
    passes:
      - canonicalize                      # a pass with default options
      - some-pass: {threshold: 0.5}       # a pass with options
    settings:
      lowering: inductor
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from llmcompress.errors import RecipeError, did_you_mean

_HERE = Path(__file__).parent
_TOP_KEYS = ("name", "description", "passes", "settings")
# Keys a recipe's `settings` may set (everything a recipe can sensibly fix; `report` and `recipe` cannot).
RECIPE_SETTINGS = ("lowering", "hardware", "verify", "strict", "release_weights", "mode")


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    passes: tuple[PassSpec, ...]
    settings: Mapping[str, Any]
    source: str
    """Built-in name or the file path it came from."""


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in _HERE.glob("*.yaml"))


def parse_pass_specs(entries: Any, where: str) -> tuple[PassSpec, ...]:
    """`["a", {"b": {...}}]` or `{"a": {}, "b": {...}}` -> PassSpecs, in order."""
    if isinstance(entries, Mapping):
        entries = [{k: v} for k, v in entries.items()]
    if not isinstance(entries, list):
        raise RecipeError(f"{where}: 'passes' must be a list of pass names or {{name: {{option: value}}}}, got {entries!r}")
    specs = []
    for entry in entries:
        if isinstance(entry, str):
            specs.append(PassSpec(entry, {}))
        elif isinstance(entry, Mapping) and len(entry) == 1:
            (name, opts), = entry.items()
            opts = {} if opts is None else opts
            if not isinstance(name, str) or not isinstance(opts, Mapping):
                raise RecipeError(f"{where}: pass entry {entry!r} must be {{name: {{option: value}}}}")
            specs.append(PassSpec(name, dict(opts)))
        else:
            raise RecipeError(f"{where}: pass entry {entry!r} must be a name or a one-key mapping {{name: {{option: value}}}}")
    return tuple(specs)


def _from_mapping(data: Any, source: str) -> Recipe:
    where = f"recipe {source}"
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected a mapping with keys {', '.join(_TOP_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], _TOP_KEYS)}; allowed keys: "
                          f"{', '.join(_TOP_KEYS)}")
    if "passes" not in data:
        raise RecipeError(f"{where}: missing key 'passes'")
    settings = data.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise RecipeError(f"{where}: 'settings' must be a mapping, got {settings!r}")
    bad = sorted(set(settings) - set(RECIPE_SETTINGS))
    if bad:
        raise RecipeError(f"{where}: settings key {bad[0]!r} is not allowed; allowed: {', '.join(RECIPE_SETTINGS)}")
    name = data.get("name", Path(source).stem)
    description = data.get("description", "")
    if not isinstance(name, str) or not isinstance(description, str):
        raise RecipeError(f"{where}: 'name' and 'description' must be strings")
    return Recipe(name, description, parse_pass_specs(data["passes"], where), dict(settings), source)


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a recipe file (`.yaml`, `.yml`, `.json`) by path."""
    builtin = _HERE / f"{name_or_path}.yaml"
    if "/" not in name_or_path and "\\" not in name_or_path and builtin.is_file():
        path, source = builtin, name_or_path
    else:
        path, source = Path(name_or_path), name_or_path
        if path.suffix.lower() not in (".yaml", ".yml", ".json"):
            raise RecipeError(
                f"options: key 'recipe' got {name_or_path!r}{did_you_mean(name_or_path, builtin_recipes())}: not a "
                f"built-in recipe ({', '.join(builtin_recipes())}) nor a .yaml/.yml/.json file path"
            )
        if not path.is_file():
            raise RecipeError(f"options: key 'recipe' got {name_or_path!r}: no such file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RecipeError(f"recipe {source}: cannot parse {path.suffix[1:].upper()}: {e}") from e
    return _from_mapping(data, source)
