"""The inputs of a captured graph for each chunk of calibration data, or the reason the graph cannot be fed.

`graph_feeds(example_inputs, input_names, data)` takes the graph's placeholders (fake values and names, as in
`PassContext`) and the data of `calibration/data.py`:
* token windows feed the graph's token-id input; its other inputs are derived from the chunk's sizes (attention mask
  -> ones, positions -> arange, token types -> zeros, KV caches and buffers the graph writes -> fresh zeros);
* rows of the model's own inputs are matched to the placeholders by name, and whatever they lack is derived as
  above. Rows of different lengths are padded (the mask marks the padding) when the graph takes an attention mask,
  and cut to the shortest of their chunk when it does not (a static sequence length: rows are cut to it, and
  shorter ones padded, or dropped without a mask input).
Dynamo names placeholders after the traced frame's locals: `L_input_ids_`, `l_kwargs_token_type_ids_`, and
`l_args_0_` for the first positional argument, which is every transformers model's `input_ids`; `input_key` strips
a name to the model's argument name. Inputs passed positionally after the first cannot be matched (pass them by
keyword). A static batch or sequence length is kept (the data is cut into chunks of that shape); a dynamic one
takes chunks of `_DYNAMIC_BATCH` sequences of the data's own length.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import sympy
import torch

# Sequences per chunk when the batch dimension is dynamic: bounds the activation memory of one node's evaluation.
_DYNAMIC_BATCH = 8
# Model inputs that are integer (batch, seq) tensors but not the token ids.
_NOT_IDS = ("attention_mask", "token_type_ids", "position_ids", "cache_position", "labels")


@dataclasses.dataclass
class Feeds:
    """The graph's arguments for every chunk of calibration data."""

    args: list[list[Any]]
    """One value per placeholder, per chunk."""
    tokens: int
    """Real tokens fed (padding not counted)."""
    masks: list[torch.Tensor | None]
    """Per chunk, (batch, seq) bool marking the real tokens, or None when every position is one: statistics of
    activations laid out (batch, seq, ...) leave the others out."""


def input_key(name: str) -> str:
    """Dynamo's placeholder name -> the model's argument name: `L_input_ids_`, `l_kwargs_input_ids_` and
    `l_args_0_` -> `input_ids`."""
    key = re.sub(r"^l_", "", name.lower()).rstrip("_")
    key = re.sub(r"^(kwargs|args)_", "", key)
    return "input_ids" if key == "0" else key


def _expr(x: Any) -> sympy.Expr:
    return sympy.sympify(x.node.expr) if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def _size(x: Any, bind: dict) -> int | None:
    e = sympy.sympify(_expr(x).xreplace(bind))  # a bare symbol is replaced by the int itself
    return int(e) if e.is_number else None


def token_ids_position(example_inputs: Sequence[Any], input_names: Sequence[str]) -> int | None:
    """The graph input holding the token ids (what the feeds put the calibration tokens in), or None."""
    values = list(example_inputs)
    names = list(input_names or [f"input {i}" for i in range(len(values))])
    return _ids_position([input_key(n) for n in names], values)


def _ids_position(keys: Sequence[str], values: Sequence[Any]) -> int | None:
    """The placeholder of the token ids: the integer (batch, seq) input named input_ids, else the only one not named
    as another model input."""
    ints = [i for i, v in enumerate(values)
            if isinstance(v, torch.Tensor) and v.dtype in (torch.int64, torch.int32) and v.dim() == 2]
    named = [i for i in ints if keys[i] == "input_ids" or keys[i].endswith("input_ids")]
    if named:
        return named[0]
    rest = [i for i in ints if not any(n in keys[i] for n in _NOT_IDS)]
    if len(rest) == 1:
        return rest[0]
    return ints[0] if len(ints) == 1 else None


@dataclasses.dataclass
class _Graph:
    """What the graph's placeholders say about how to feed it."""

    values: list[Any]
    names: list[str]
    keys: list[str]
    pos: int
    batch: sympy.Expr
    seq: sympy.Expr
    scalars: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Real 0-d inputs known at compile time ({position: value}), fed as they are."""

    @property
    def mask_input(self) -> bool:
        return any("attention_mask" in k and isinstance(v, torch.Tensor) and not v.is_floating_point()
                   for k, v in zip(self.keys, self.values))


def _graph(example_inputs: Sequence[Any], input_names: Sequence[str]) -> _Graph | str:
    values = list(example_inputs)
    names = list(input_names or [f"input {i}" for i in range(len(values))])
    keys = [input_key(n) for n in names]
    pos = _ids_position(keys, values)
    if pos is None:
        return "no input is a (batch, seq) tensor of token ids (the graph follows a graph break, or takes " \
               "embeddings)"
    ids = values[pos]
    g = _Graph(values, names, keys, pos, _expr(ids.shape[0]), _expr(ids.shape[1]))
    if g.seq.is_number and int(g.seq) == 1:
        return "the graph is a decode step (one token per sequence)"
    return g


def graph_feeds(example_inputs: Sequence[Any], input_names: Sequence[str], data: Any,
                scalars: dict[int, torch.Tensor] | None = None) -> Feeds | str:
    """The graph's arguments for each chunk of `data` (token windows (n, L), or rows of model inputs), or why the
    graph cannot be fed from it. scalars: {position: value} of 0-d inputs whose compile-time value is real (a
    model's float attribute Dynamo lifted), fed to every chunk."""
    g = _graph(example_inputs, input_names)
    if isinstance(g, str):
        return g
    g.scalars = {i: v for i, v in (scalars or {}).items()
                 if isinstance(v, torch.Tensor) and v.dim() == 0 and i < len(g.values)}
    if isinstance(data, torch.Tensor):
        return _from_windows(g, data)
    return _from_rows(g, data)


def _from_windows(g: _Graph, windows: torch.Tensor) -> Feeds | str:
    """A dynamic sequence dimension takes windows of L tokens; a static one of S tokens the same tokens cut into
    S-token windows."""
    stream = windows.reshape(-1)
    seq = int(g.seq) if g.seq.is_number else windows.shape[1]
    batch = int(g.batch) if g.batch.is_number else _DYNAMIC_BATCH
    rows = stream.numel() // seq
    if rows == 0:
        return f"the graph takes {seq}-token sequences, longer than the {stream.numel()} calibration tokens"
    cut = stream[: rows * seq].reshape(rows, seq)
    if g.batch.is_number:
        usable = rows // batch * batch
        if usable == 0:
            return f"the graph takes a static batch of {batch} sequences of {seq} tokens; calibration holds {rows}"
        cut = cut[:usable]
    feeds = Feeds([], 0, [])
    for chunk in cut.split(batch):
        args = _arguments(g, {"input_ids": chunk})
        if isinstance(args, str):
            return args
        feeds.args.append(args)
        feeds.masks.append(None)
        feeds.tokens += chunk.numel()
    return feeds


def _token_aligned(row: dict[str, torch.Tensor]) -> list[str]:
    n = row["input_ids"].shape[0]
    return [k for k, v in row.items() if v.dim() >= 1 and v.shape[0] == n]


def _fit(row: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """The row's token-aligned values cut or zero-padded to `length` tokens; `attention_mask` marks the padding
    (and is added, all ones on the real tokens, when the row has none)."""
    n = row["input_ids"].shape[0]
    out = dict(row)
    if "attention_mask" not in out:
        out["attention_mask"] = torch.ones(n, dtype=torch.int64)
    for k in _token_aligned(out):
        v = out[k][:length]
        if v.shape[0] < length:
            v = torch.cat([v, v.new_zeros((length - v.shape[0], *v.shape[1:]))])
        out[k] = v
    return out


def _from_rows(g: _Graph, rows: list[dict[str, torch.Tensor]]) -> Feeds | str:
    static_seq = int(g.seq) if g.seq.is_number else None
    if static_seq is not None:
        if not g.mask_input:
            # Padding without a mask would change what the real tokens see: keep the rows long enough.
            kept = [r for r in rows if r["input_ids"].shape[0] >= static_seq]
            if not kept:
                return f"the graph takes {static_seq}-token sequences and no attention mask; every calibration " \
                       f"sequence is shorter (the longest has {max(r['input_ids'].shape[0] for r in rows)})"
            rows = kept
        rows = [_fit(r, static_seq) for r in rows]
    batch = int(g.batch) if g.batch.is_number else _DYNAMIC_BATCH
    usable = len(rows) // batch * batch if g.batch.is_number else len(rows)
    if usable == 0:
        return f"the graph takes a static batch of {batch} sequences; calibration holds {len(rows)}"
    feeds = Feeds([], 0, [])
    for start in range(0, usable, batch):
        group = rows[start:start + batch]
        if static_seq is None:
            lengths = [r["input_ids"].shape[0] for r in group]
            length = max(lengths) if g.mask_input else min(lengths)
            group = [_fit(r, length) for r in group]
        keys = set.intersection(*(set(r) for r in group))
        chunk = {}
        for k in keys:
            shapes = {tuple(r[k].shape) for r in group}
            if len(shapes) > 1:
                if any(k == key for key in g.keys):
                    return f"calibration input {k!r} has different shapes within one chunk: {sorted(shapes)}"
                continue  # ragged, and no graph input takes it
            chunk[k] = torch.stack([r[k] for r in group])
        args = _arguments(g, chunk)
        if isinstance(args, str):
            return args
        mask = chunk["attention_mask"].bool() if "attention_mask" in chunk else None
        if mask is not None and mask.shape != chunk["input_ids"].shape:
            mask = None
        feeds.args.append(args)
        feeds.tokens += int(mask.sum()) if mask is not None else chunk["input_ids"].numel()
        feeds.masks.append(None if mask is None or bool(mask.all()) else mask)
    return feeds


def _arguments(g: _Graph, chunk: dict[str, torch.Tensor]) -> list[Any] | str:
    """One value per placeholder for a chunk {input name: (batch, seq, ...) tensor}: the data's where the names
    match, derived from the chunk's sizes elsewhere."""
    ids = chunk["input_ids"]
    bind = {}
    if not g.batch.is_number:
        bind[g.batch] = ids.shape[0]
    if not g.seq.is_number:
        bind[g.seq] = ids.shape[1]
    for name, v in zip(g.names, g.values):
        # A dynamic static-cache length (transformers' `cache_layers_<i>_max_cache_len` under dynamic shapes): the
        # chunk fills an empty cache, so one as long as the chunk holds it and attends as a longer one would.
        e = _expr(v) if isinstance(v, torch.SymInt) else None
        if isinstance(e, sympy.Symbol) and e not in bind and "cache" in name.lower() and "len" in name.lower():
            bind[e] = ids.shape[1]
    args = []
    for i, (name, key, v) in enumerate(zip(g.names, g.keys, g.values)):
        if i in g.scalars and isinstance(v, torch.Tensor) and v.dim() == 0:
            args.append(g.scalars[i].to(device=v.device, dtype=v.dtype))
            continue
        given = chunk.get("input_ids" if i == g.pos else key)
        if given is not None and isinstance(v, torch.Tensor):
            shape = [_size(d, bind) for d in v.shape]
            if shape != list(given.shape):
                return f"graph input {name} takes {tuple(shape)}, calibration input {key!r} is {tuple(given.shape)}"
            args.append(given.to(device=v.device, dtype=v.dtype))
            continue
        arg = _derive_input(name, key, v, bind, tuple(ids.shape))
        if isinstance(arg, str):
            return arg
        args.append(arg)
    return args


def _derive_input(name: str, key: str, v: Any, bind: dict, chunk_shape: tuple[int, int]) -> Any:
    """A value for an input the data does not hold, from the chunk's sizes; a string says why there is none."""
    if isinstance(v, torch.SymInt):
        size = _size(v, bind)
        return size if size is not None else f"graph input {name} (a size) does not follow from batch and sequence"
    if not isinstance(v, torch.Tensor):
        return v
    shape = [_size(d, bind) for d in v.shape]
    if any(d is None for d in shape):
        return f"graph input {name} has a size that does not follow from batch and sequence"
    lname = name.lower()
    s = chunk_shape[1]
    if "attention_mask" in lname and not v.is_floating_point():
        return torch.ones(shape, dtype=v.dtype, device=v.device)
    if "token_type_ids" in lname and not v.is_floating_point():
        return torch.zeros(shape, dtype=v.dtype, device=v.device)  # one segment, as tokenizers give one text
    if ("cache_position" in lname or "position_ids" in lname) and not v.is_floating_point() and shape[-1] == s:
        return torch.arange(s, dtype=v.dtype, device=v.device).expand(shape).contiguous()
    # transformers 5's StaticCache passes each layer's fill counter (`cache_layers_<i>_cumulative_length`, int64)
    if "past_key_values" in lname or (v.is_floating_point() and ("cache" in lname or not lname.startswith("l_"))) \
            or ("cache" in lname and lname.endswith("cumulative_length")):
        # A KV cache, its fill counters, or another buffer the graph writes: fresh zeros, never the user's tensors.
        return torch.zeros(shape, dtype=v.dtype, device=v.device)
    hint = "; pass the model's inputs by keyword (model(input_ids=..., ...)) so that calibration data can match " \
           "them by name" if key.isdigit() else \
           f"; give calibration batches of the model's inputs holding {key!r}"
    return f"graph input {name} ({str(v.dtype).removeprefix('torch.')} {tuple(shape)}) cannot be derived from " \
           f"token ids{hint}"
