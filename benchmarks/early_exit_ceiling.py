"""How much of an early-exit cascade's possible skip its gates find (issue 16), on the trained tiny-llama fixture, in
one run: `main`.

1. Exit heads 1-5 fitted as `exit_gates.calibrate_cascade` fits them (ridge least squares on the first ¾ of `--calib`
   512-token windows spread over train.txt, default 64), each with its temperature (`fit_temperature`); the logit lens
   (identity translation) and the distilled heads (`exit_heads.distill_heads`, `head="distilled"`) beside them.
2. Teacher-forced on `--windows` validation windows (default 16 × 512): per exit, top-1 agreement with the full
   model and the KL(full ‖ exit) each token would add by exiting there.
3. The perfect-information ceiling (`exit_ceiling.skip_ceiling`) at each of `--budgets` (min_agreement:
   max_perplexity_increase; none: no bound), for each kind of head: the share of decoder-layer evaluations skipped
   by the best assignment of validation tokens to exits within the budgets, and the bound no assignment beats, so
   no gate, whatever it sees. Budgets summed plainly over the tokens ((1 − a)·n errors, n·log(1 + p) nats; no margin).
4. The gates: `calibrate_cascade` (logits gates, layer counts as prices, `--gate-budget`, its usual held-back margin)
   with fitted and with distilled heads, teacher-forced on the same validation tokens (`exit_gates.teacher_forced`):
   skip, agreement and added nats, and their share of the ceiling of their heads.
5. Oracle gates at `--gate-budget` for each kind of head: a cascade whose gate score is each token's own KL and
   top-1 agreement (−KL − 10 if the top-1 differs: agreeing tokens ranked by KL, ahead of every wrong one), exits
   and thresholds chosen by `exit_gates.choose_exits` as the real gates' are. Thresholds set on the held-back
   calibration rows with the usual margins ("held-back"), and on the validation tokens themselves with plain budgets
   ("on validation"): what the cascade's shape (one threshold per exit, first open exit taken) leaves of the ceiling
   even for a gate that knew the answer.

Teacher-forced: the running cascade's drift (approximate K/V fills) lowers what either reaches; see
early_exit_cascade.py. JSON (`--out`, default benchmarks/results/early_exit_ceiling.json): {device, commit, versions,
threads, setup, exits: {E: {lens | fitted | distilled: {agreement, mean_kl, temperature}}}, ceilings: {"a/p": {lens |
fitted | distilled: {feasible, upper, agreement, perplexity_increase, exit_share}}}, gates: {fitted | distilled:
{budget, exits, skip_fraction, agreement, perplexity_increase, share_of_ceiling}}, oracle_gates: {lens | fitted |
distilled: {held-back | on validation: {exits, skip_fraction, agreement, perplexity_increase}}}}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from llmcompress.exit_ceiling import skip_ceiling
from llmcompress.exit_gates import (
    BUDGET_Z,
    CascadeCosts,
    GateScores,
    allowed_errors,
    allowed_nll,
    calibrate_cascade,
    choose_exits,
    fit_temperature,
    kl_to_full,
    nll_contributions,
    simulate_cascade,
    split_calibration,
    teacher_forced,
)
from llmcompress.exit_heads import (
    DISTILL_STEPS,
    ExitHead,
    decoder_parts,
    distill_heads,
    fit_heads_from_states,
    layer_states,
)
from llmcompress.testing.fixtures import (
    WINDOW,
    corpus_windows,
    fixtures_dir,
    load_model,
    load_tokenizer,
    spread_windows,
)
from llmcompress.testing.results import run_info, write_results

ROOT = Path(__file__).resolve().parents[1]


def parse_budgets(text: str) -> list[tuple[float, float | None]]:
    return [(float(a), None if p == "none" else float(p)) for a, p in (x.split(":") for x in text.split(",") if x)]


@torch.no_grad()
def exit_tables(parts, heads: dict[int, ExitHead], temperatures: dict[int, float], states, full_logp):
    """Per exit: (KL(full ‖ exit / T) (n,), exit top-1 == full top-1 (n,)) on teacher-forced states."""
    full_top = full_logp.argmax(-1).flatten()
    out = {}
    for e, head in sorted(heads.items()):
        logits = torch.cat([head.logits(parts, c).float() for c in states[e].split(4)]) / temperatures[e]
        out[e] = (kl_to_full(full_logp, logits).flatten(), logits.argmax(-1).flatten() == full_top)
    return out


def oracle_scores(table) -> GateScores:
    """A gate that knows each token's cost of exiting: agreeing tokens ranked by their KL, every wrong one after."""
    return GateScores({e: -kl - 10.0 * (~ag).double() for e, (kl, ag) in table.items()},
                      {e: ag for e, (_, ag) in table.items()}, kl={e: kl for e, (kl, _) in table.items()})


def judged(scores_held: GateScores, scores_val: GateScores, num_layers: int, a: float, p: float | None) -> dict:
    """Exits and thresholds chosen by `choose_exits` (layer counts) on the held-back rows (with `calibrate_cascade`'s
    margins) and on the validation tokens (plain budgets), each run teacher-forced on the validation tokens."""
    costs = CascadeCosts(1.0, 0.0, 0.0, 0.0, 0.0, 0.0, num_layers)
    nh, nv = next(iter(scores_held.agree.values())).numel(), next(iter(scores_val.agree.values())).numel()
    out = {}
    for name, chosen_on, errors, nll, z in (
            ("held-back", scores_held, allowed_errors(nh, a), allowed_nll(nh, p), BUDGET_Z),
            ("on validation", scores_val, (1 - a) * nv, allowed_nll(nv, p), 0.0)):
        exits, thresholds, _, _ = choose_exits(sorted(scores_val.score), chosen_on, costs, True, errors, a, nll,
                                               budget_z=z)
        wrong, _, exit_at = simulate_cascade(exits, thresholds, scores_val, costs, True)
        skipped = torch.where(exit_at > 0, num_layers - exit_at, 0).double().sum().item()
        out[name] = {"exits": exits, "skip_fraction": skipped / (nv * num_layers), "agreement": 1 - wrong / nv,
                     "perplexity_increase": math.expm1(nll_contributions(scores_val, exit_at, num_layers).sum().item()
                                                       / nv)}
    return out


def oracle_cascade(held, val, num_layers: int, a: float, p: float | None) -> dict[str, dict]:
    """Oracle gates judged as `judged` judges any gate."""
    return judged(oracle_scores(held), oracle_scores(val), num_layers, a, p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=WINDOW, help="tokens per window (smaller only for smoke runs)")
    parser.add_argument("--budgets", default="0.99:0.02,0.99:none,1.0:0.02,0.98:0.05,0.95:0.1,0.9:none")
    parser.add_argument("--gate-budget", default="0.99:0.02", help="the budget the gates are calibrated to")
    parser.add_argument("--gate-heads", default="fitted,distilled", help="the heads the gates are calibrated with")
    parser.add_argument("--distill-steps", type=int, default=DISTILL_STEPS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "early_exit_ceiling.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fixtures = fixtures_dir()
    model, tokenizer = load_model(fixtures, "tiny-llama"), load_tokenizer(fixtures)
    parts = decoder_parts(model)
    exits = list(range(1, parts.num_layers))
    train = spread_windows(fixtures, tokenizer, "train.txt", args.calib, args.window)
    val = corpus_windows(fixtures, tokenizer, "validation.txt", args.windows, args.window)
    fit_rows, held_rows = split_calibration(train)

    t = time.perf_counter()
    with torch.no_grad():
        fit_states = layer_states(model, fit_rows)
        fitted = fit_heads_from_states(fit_states, exits, dtype=parts.lm_head.weight.dtype)
        lens = {e: ExitHead.identity(e, fit_states[e].shape[-1], fitted[e].weight) for e in exits}
        distilled = distill_heads(parts, fit_states, fitted, steps=args.distill_steps)
        kinds = {"lens": lens, "fitted": fitted, "distilled": distilled}
        fit_top = torch.cat([parts.lm_head(parts.norm(c)).argmax(-1) for c in fit_states[-1].split(4)])
        temps = {}
        for name, heads in kinds.items():
            for e in exits:
                logits = torch.cat([heads[e].logits(parts, c).float() for c in fit_states[e].split(4)])
                agree = (logits.argmax(-1) == fit_top).flatten()
                temps[name, e] = fit_temperature(parts, logits, fit_states[-1], agree)
                del logits
        del fit_states
        val_states = layer_states(model, val)
        full_logp = torch.cat([torch.log_softmax(parts.lm_head(parts.norm(c)).float(), -1)
                               for c in val_states[-1].split(4)])
        tables = {name: exit_tables(parts, heads, {e: temps[name, e] for e in exits}, val_states, full_logp)
                  for name, heads in kinds.items()}
        del val_states
        held_states = layer_states(model, held_rows)
        held_logp = torch.cat([torch.log_softmax(parts.lm_head(parts.norm(c)).float(), -1)
                               for c in held_states[-1].split(4)])
        held_tables = {name: exit_tables(parts, heads, {e: temps[name, e] for e in exits}, held_states, held_logp)
                       for name, heads in kinds.items()}
        del held_states, held_logp
    n = full_logp.shape[0] * full_logp.shape[1]
    print(f"tables: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    exit_rows = {e: {name: {"agreement": tables[name][e][1].double().mean().item(),
                            "mean_kl": tables[name][e][0].double().mean().item(), "temperature": temps[name, e]}
                     for name in tables} for e in exits}

    ceilings = {}
    for a, p in parse_budgets(args.budgets):
        key = f"{a}/{'none' if p is None else p}"
        ceilings[key] = {}
        for name, table in tables.items():
            c = skip_ceiling({e: kl for e, (kl, _) in table.items()}, {e: ag for e, (_, ag) in table.items()},
                             parts.num_layers, allowed_errors=(1 - a) * n,
                             allowed_nll=math.inf if p is None else n * math.log1p(p))
            ceilings[key][name] = {"feasible": c.feasible, "upper": c.upper, "agreement": c.agreement,
                                   "perplexity_increase": math.expm1(c.nll_per_token), "exit_share": c.exit_share}
            print(f"ceiling {key} {name}: skip {c.feasible:.3f} (bound {c.upper:.3f}) agreement {c.agreement:.4f} "
                  f"+{100 * math.expm1(c.nll_per_token):.2f} %", file=sys.stderr)

    (a, p), = parse_budgets(args.gate_budget)
    key = f"{a}/{'none' if p is None else p}"
    layers_only = CascadeCosts(1.0, 0.0, 0.0, 0.0, 0.0, 0.0, parts.num_layers)
    gates = {}
    for head in args.gate_heads.split(","):
        t = time.perf_counter()
        plan = calibrate_cascade(model, train, min_agreement=a, max_perplexity_increase=p, features="logits",
                                 costs=layers_only, head=head, distill_steps=args.distill_steps)
        row = gates[head] = {"budget": args.gate_budget, "exits": plan.exits, "declined": plan.declined,
                             "calibrate_s": time.perf_counter() - t, "held_back": plan.held_back}
        if plan.declined:
            print(f"gates {head} {args.gate_budget}: {plan.declined}", file=sys.stderr)
            continue
        tf = teacher_forced(model, plan, val)
        exit_at = tf["exit_at"].flatten()
        plan_kl = exit_tables(parts, plan.heads, {e: plan.temperatures.get(e, 1.0) for e in plan.exits},
                              layer_states(model, val), full_logp)
        added = sum(float(plan_kl[e][0][exit_at == e].double().sum()) for e in plan.exits)
        ceiling = ceilings.get(key, {}).get(head, {}).get("feasible")
        row.update({"skip_fraction": tf["skip_fraction"], "agreement": tf["agreement"],
                    "perplexity_increase": math.expm1(added / n), "exit_tokens": tf["exits"],
                    "share_of_ceiling": tf["skip_fraction"] / ceiling if ceiling else None})
        print(f"gates {head} {args.gate_budget}: exits {plan.exits} skip {tf['skip_fraction']:.3f} agreement "
              f"{tf['agreement']:.4f} +{100 * row['perplexity_increase']:.2f} % (share of the ceiling "
              f"{row['share_of_ceiling']})", file=sys.stderr)

    oracle = {}
    for name, table in tables.items():
        oracle[name] = oracle_cascade(held_tables[name], table, parts.num_layers, a, p)
        for where, row in oracle[name].items():
            print(f"oracle gates {name} {args.gate_budget} thresholds {where}: exits {row['exits']} skip "
                  f"{row['skip_fraction']:.3f} agreement {row['agreement']:.4f} "
                  f"+{100 * row['perplexity_increase']:.2f} %", file=sys.stderr)

    held = max(1, args.calib // 4)
    write_results(args.out, {
        **run_info(ROOT, args.threads),
        "setup": {"calibration": f"train.txt, {args.calib} x {args.window} spread windows (heads and gates on the "
                                 f"first {args.calib - held}, gate thresholds on the last {held})",
                  "validation": f"{args.windows} x {args.window} from validation.txt, teacher-forced (the full "
                                "model's states)",
                  "budgets": "plain sums over the validation tokens: (1 - a) n errors, n log(1 + p) nats",
                  "distill_steps": args.distill_steps},
        "exits": exit_rows, "ceilings": ceilings, "gates": gates, "oracle_gates": oracle})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
