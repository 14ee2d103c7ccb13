"""The `llmcompress` command: `llmcompress passes` lists the registered passes (plugins included),
`llmcompress recipes` the built-in recipes. Later verbs (report, calibrate) join here."""

from __future__ import annotations

import argparse
import sys


def _passes(args: argparse.Namespace) -> int:
    from .passes.registry import plugin_errors, registered_passes

    for name, cls in registered_passes().items():
        origin = cls.__module__.split(".")[0]
        print(f"{name:24s} {cls.description}  [{origin}]")
    for name, error in plugin_errors.items():
        print(f"{name:24s} FAILED TO LOAD: {error}", file=sys.stderr)
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from .recipes import builtin_recipes, load_recipe

    for name in builtin_recipes():
        recipe = load_recipe(name)
        passes = ", ".join(p.name for p in recipe.passes)
        print(f"{name:16s} {recipe.description.strip()}\n{'':16s} passes: {passes}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list registered passes, plugins included").set_defaults(func=_passes)
    sub.add_parser("recipes", help="list built-in recipes").set_defaults(func=_recipes)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
