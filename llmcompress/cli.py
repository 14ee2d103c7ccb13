"""The `llmcompress` command: `llmcompress passes` lists the registered passes (plugins included),
`llmcompress recipes` the built-in recipes, `llmcompress report MODEL` a model's roofline cost report.
`llmcompress calibrate` measures this device for the cost model. `llmcompress cache ls|clear` shows or empties the
cache folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _passes(args: argparse.Namespace) -> int:
    from llmcompress.passes.registry import plugin_errors, registered_passes

    for name, cls in registered_passes().items():
        origin = cls.__module__.split(".")[0]
        print(f"{name:24s} {cls.description}  [{origin}]")
    for name, error in plugin_errors.items():
        print(f"{name:24s} FAILED TO LOAD: {error}", file=sys.stderr)
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from llmcompress.recipes import builtin_recipes, load_recipe

    for name in builtin_recipes():
        recipe = load_recipe(name)
        passes = ", ".join(p.name for p in recipe.passes)
        print(f"{name:18s} {recipe.description.strip()}\n{'':18s} passes: {passes}")  # 18: sparse-2of4-w4a16
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def _hardware_name(text: str) -> str:
    from llmcompress.cost.hardware import HARDWARE
    from llmcompress.errors import did_you_mean

    if text != "auto" and text not in HARDWARE:
        raise argparse.ArgumentTypeError(f"unknown hardware {text!r}{did_you_mean(text, ['auto', *HARDWARE])}; "
                                         f"expected auto or one of {', '.join(HARDWARE)}")
    return text


def _report(args: argparse.Namespace) -> int:
    from llmcompress.errors import OptionError
    from llmcompress.report.cost_report import render, report_model
    from llmcompress.report.lowrank_plot import LowrankInputError, lowrank_section
    from llmcompress.report.model_loading import ModelLoadError

    if args.kv_len is not None and args.seq not in (None, 1):
        args.parser.error(f"argument --seq: must be 1 with --kv-len (a report of one decode step), got {args.seq}")
    if args.output is not None and not Path(args.output).expanduser().resolve().parent.is_dir():
        args.parser.error(f"argument -o/--output: folder of {args.output!r} does not exist")
    try:  # before the trace: a wrong file fails in a second, not after it
        lowrank = lowrank_section(compile_report=args.compile_report, quality=args.lowrank_quality)
    except LowrankInputError as e:
        args.parser.error(str(e))  # names the file and what it lacks
    moe = _moe_load(args.compile_report)
    if args.compile_report is not None and lowrank is None:
        print(f"note: {args.compile_report} has no lowrank-split layer with an error curve: no low-rank section",
              file=sys.stderr)
    if args.compile_report is not None and moe is None:
        print(f"note: {args.compile_report} has no MoE layer with load statistics: no MoE expert load section",
              file=sys.stderr)
    try:
        report = report_model(args.model, batch=args.batch, seq=args.seq, kv_len=args.kv_len,
                              hardware=args.hardware, recipe=args.recipe, full_trace=args.full_trace)
    except (ModelLoadError, OptionError) as e:
        args.parser.error(str(e))  # exits 2, like any usage error
    report["lowrank"] = lowrank
    report["moe_load"] = moe
    text = render(report, args.format)
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).expanduser().write_text(text, encoding="utf-8")
        print(f"wrote {args.output} ({args.format}, {len(report['nodes'])} nodes)", file=sys.stderr)
    return 0


def _moe_load(path: str | None) -> dict | None:
    """The MoE load statistics of a compile report file (`report/moe_heatmap.moe_load`), or None."""
    if path is None:
        return None
    import json

    from llmcompress.report.moe_heatmap import moe_load

    return moe_load(json.loads(Path(path).expanduser().read_text(encoding="utf-8")))


def _calibrate(args: argparse.Namespace) -> int:
    import dataclasses

    from llmcompress.cost.device_profile import default_grid, format_table, profile_device
    from llmcompress.cost.hardware import resolve
    from llmcompress.errors import OptionError

    try:
        grid = None
        if args.m:
            grid = dataclasses.replace(default_grid(resolve(args.hardware).kind, args.quick), m=tuple(args.m))
        profile = profile_device(args.hardware, dtypes=tuple(args.dtype or ("bfloat16",)), grid=grid, quick=args.quick,
                            out=args.output)
    except OptionError as e:
        args.parser.error(str(e))
    print(format_table(profile))
    print(f"wrote {profile['path']}", file=sys.stderr)
    return 0


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # unreachable


def _cache(args: argparse.Namespace) -> int:
    from llmcompress.passes.weight_store import WeightStore, weights_dir

    store = WeightStore(weights_dir())
    kernels = weights_dir().parent / "kernels"
    sources = list(kernels.glob("*.py")) if kernels.is_dir() else []
    if args.action == "ls":
        entries = list(store.entries())
        if entries:
            print(f"{'key':12s}  {'pass':16s}  {'size':>9s}  {'created (UTC)':19s}  weight")
        for e in entries:
            print(f"{e.key[:12]:12s}  {e.pass_name:16s}  {_size(e.bytes):>9s}  {e.created[:19].replace('T', ' '):19s}"
                  f"  {e.weights}")
        print(f"{len(entries)} derived weights, {_size(sum(e.bytes for e in entries))} in {store.root}")
        print(f"{len(sources)} generated kernel sources, {_size(sum(p.stat().st_size for p in sources))} in {kernels}")
        return 0
    count, size = store.clear()
    for p in sources:
        p.unlink(missing_ok=True)
    print(f"removed {count} derived weights ({_size(size)}) from {store.root} and {len(sources)} generated kernel "
          f"sources from {kernels}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a did-you-mean for a misspelled choice (a sub-command, `--format`): Python 3.11's says only
    "invalid choice" (3.14 adds `suggest_on_error`)."""

    def _check_value(self, action: argparse.Action, value: object) -> None:
        if action.choices is not None and value not in action.choices:
            from llmcompress.errors import did_you_mean

            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{did_you_mean(value, action.choices)} "
                                                 f"(choose from {choices})")
        super()._check_value(action, value)


def _full_trace_help() -> str:
    from llmcompress.report.layer_repeat import TRACED_LAYERS

    return (f"trace every decoder layer (default: trace {TRACED_LAYERS} and repeat the last one's costs up to the "
            "model's depth when the config's layers are alike; same numbers, seconds instead of minutes for deep "
            "models)")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="llmcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list registered passes, plugins included").set_defaults(func=_passes)
    sub.add_parser("recipes", help="list built-in recipes").set_defaults(func=_recipes)
    report = sub.add_parser(
        "report", help="roofline cost report of a model: per-layer table and totals (text, json, html)",
        description="Predict a model's per-node and per-layer cost with the roofline model. The model is built on "
                    "the meta device from its config: no weights are read, so large configs report without memory.")
    report.add_argument("model", metavar="MODEL", help="local transformers model folder (with config.json), or a "
                        "config .json file")
    report.add_argument("--batch", type=_positive_int, default=1, metavar="B", help="batch size (default 1)")
    report.add_argument("--seq", type=_positive_int, default=None, metavar="S",
                        help="tokens per sequence (default 128; 1 with --kv-len)")
    report.add_argument("--kv-len", type=_positive_int, default=None, metavar="L",
                        help="report one decode step over a static KV cache of L slots instead of a prefill")
    report.add_argument("--hardware", type=_hardware_name, default="auto", metavar="NAME|auto",
                        help="hardware row to price on (default auto: this machine's device)")
    report.add_argument("--recipe", default=None, metavar="R",
                        help="built-in recipe name or recipe file: adds before/after columns")
    report.add_argument("--format", choices=("text", "json", "html"), default="text", help="default text")
    report.add_argument("--full-trace", action="store_true", help=_full_trace_help())
    report.add_argument("--compile-report", default=None, metavar="PATH",
                        help="compile report JSON (options['report']) of a compile that ran lowrank-split with a "
                             "ratio: the HTML plots its layers' error curves against kept fraction, chosen ranks "
                             "marked (json: the 'lowrank' key); of one with MoE load statistics (moe-prune, "
                             "moe-skip): a per-layer per-expert load heat-map (json: the 'moe_load' key)")
    report.add_argument("--lowrank-quality", default=None, metavar="PATH",
                        help="JSON of benchmarks/lowrank_quality.py (e.g. benchmarks/results/lowrank_quality_64.json):"
                             " the HTML plots perplexity against kept fraction per method (svd, asvd, svd-llm)")
    report.add_argument("-o", "--output", default=None, metavar="PATH", help="write here (default stdout)")
    report.set_defaults(func=_report, parser=report)
    calibrate = sub.add_parser(
        "calibrate", help="measure this device's bandwidth, launch overhead and matmul efficiency for the cost model",
        description="Measure the current device (a large copy, a one-element kernel, F.linear over a grid of M x "
                    "(N, K)) and store the profile the cost model uses instead of datasheet peaks.")
    calibrate.add_argument("--hardware", type=_hardware_name, default="auto", metavar="NAME|auto",
                           help="hardware row the profile calibrates (default auto: this machine's device)")
    calibrate.add_argument("--dtype", action="extend", nargs="+", default=None, metavar="DTYPE",
                           help="matmul dtypes (default bfloat16), e.g. --dtype bfloat16 float16")
    calibrate.add_argument("--m", type=_positive_int, nargs="+", default=None, metavar="M",
                           help="matmul M values instead of the grid's (default 1 16 64 256 4096 on a GPU)")
    calibrate.add_argument("--quick", action="store_true", help="a small grid and short measurements (seconds)")
    calibrate.add_argument("-o", "--output", default=None, metavar="PATH",
                           help="write here (default llmcompress/cost/profiles/<device>.json, or under "
                                "$LLMCOMPRESS_PROFILE_DIR)")
    calibrate.set_defaults(func=_calibrate, parser=calibrate)
    cache = sub.add_parser(
        "cache", help="list or empty the cache folder (calibrated weights, generated kernels)",
        description="The cache folder is $LLMCOMPRESS_CACHE_DIR (default $XDG_CACHE_HOME/llmcompress or "
                    "~/.cache/llmcompress): derived weights under weights/ (calibrated quantization: loaded instead "
                    "of calibrating again), generated Triton kernels under kernels/. It can be copied to another "
                    "machine compiling the same model with the same recipe.")
    cache.add_argument("action", choices=("ls", "clear"),
                       help="ls: one line per derived weight (key, pass, size, date, weight) and totals; clear: "
                            "delete them and the generated kernels")
    cache.set_defaults(func=_cache, parser=cache)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
