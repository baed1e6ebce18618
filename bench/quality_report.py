"""The BENCHMARKS.md quality section of bench/quality.py v2: the table, the tuning list, the
ablations, the reading against #13's targets, the cost, and docs/img/quality.png."""

from __future__ import annotations

import argparse
import json
from datetime import date
from typing import Any

import benchlib as bl
from benchlib import LABELS, ROOT, SOURCES, SPLIT_SEED, TRAINED, mean_spread

PLOT = ROOT / "docs" / "img" / "quality.png"
# FLOPs per training example, in units of N * T (N parameters, T tokens of one prompt + reply):
# 6 per trained pass, 2 per frozen pass. DPO / preference step 1: chosen and rejected, plus the
# reference's frozen passes per step; SCIT step 1: own and swapped instruction; fit: 1 trained + 3 frozen.
FLOPS = {"sft": 6, "dpo": 16, "step1": 12, "step1_preferred": 6, "step1_dispreferred": 6, "fit": 12}
GUARDS = "reply tokens within ±10 % of base, limit-hit ≤ base + 10 points, 4-gram repetition ≤ base + 3 points, over-refusal ≤ 5 %"


def row(label: str, runs: list[dict], base: dict, budget: Any) -> tuple[str, dict]:
    """One table row (accuracy, margin vs base, win (LC) with behaviour beside it, cost) and its summary."""
    if not runs:
        return f"| {label} | 0 | " + " | ".join(["pending"] * 7) + " |", {}
    summ = bl.summary([r.get("eval", r) for r in runs], base)
    cells = []
    for s, m in summ.items():
        ci = f" [{m['cis'][0]['low']:+.3f}, {m['cis'][0]['high']:+.3f}]" if len(runs) == 1 else f" ± {m['dm'][1]:.3f}"
        refusal = f"ref {m['refusal_rate']:.0%}" if SOURCES[s][1] else f"over {m['over_refusal_rate']:.0%}"
        cells += [f"{m['acc'][0]:.1%}", f"{m['dm'][0]:+.3f}{ci} ({m['up']}/{len(runs)}↑)",
                  f"{m['win']:.0%} ({m['lc']:.0%}) · tok {m['tokens']:+.0%} · lim {m['hit_limit_rate']:.0%} · rep {m['repetition_rate']:.0%} · {refusal}"]
    trains = [r["train"] for r in runs if "train" in r]
    cost = "free"
    if trains:
        cost = (f"{mean_spread([t['cpu_seconds'] for t in trains])[0]:.0f} / {mean_spread([t['wall_seconds'] for t in trains])[0] / 60:.0f} min"
                f" / {flops(trains[0], budget):.1e}")
    return f"| {label} | {len(runs)} | " + " | ".join(cells) + f" | {cost} |", summ


def flops(trained: dict, budget: Any, n_params: float = 134.5e6) -> float:
    """Estimate: FLOPS[stage] x N x T x batch x steps, T = both windows (an upper bound per example)."""
    per = {"baseline": ["sft", "dpo"], "step1": ["step1", "step1_preferred", "step1_dispreferred"], "fit": ["fit"]}
    pref = trained["knobs"].get("objective") == "preference"  # Dual step 1 as DPO: 16 per side
    return sum(sum(16 if pref and s.startswith("step1_") else FLOPS[s] for s in per[section] if s in trained["stage_cpu"]) * n_params * sum(budget.windows) * budget.batch_size * steps
               for section, steps in trained["steps"].items())


def reading(summ: dict[str, dict], candidates: list[tuple[str, str]]) -> list[str]:
    """Per source, each RAHF candidate (``(summary key, label)``: the best variant's pick, and
    any variant confirmed on every seed) against #13's targets (3 seeds wanted)."""
    notes = []
    for key, label in candidates:
        notes += _reading(summ, key, label)
    return notes or ["- RAHF: pending."]


def _reading(summ: dict[str, dict], key: str, label: str) -> list[str]:
    rahf, dpo = summ.get(key), summ.get("dpo")
    if not rahf:
        return [f"- {label}: pending."]
    notes = []
    for s, m in rahf.items():
        n = len(m["cis"])
        text = f"- {s}: {label} margin − base {m['dm'][0]:+.3f}, CI above 0 in {m['up']} of {n} seeds (target ≥ 2 of 3: {'met' if m['up'] >= 2 else 'missed'})"
        if dpo:
            gap = (m["acc"][0] - dpo[s]["acc"][0]) * 100
            need = 0.0 if s == "hh" else -2.0
            text += f"; pref. accuracy {gap:+.1f} points vs DPO (target ≥ {need:+.0f}: {'met' if gap >= need else f'missed by {need - gap:.1f}'})"
        text += (f"; reply tokens {m['tokens']:+.0%} vs base, limit-hit {m['hit_limit_rate']:.0%}, repetition {m['repetition_rate']:.0%},"
                 f" {'refusal' if SOURCES[s][1] else 'over-refusal'} {m['refusal_rate' if SOURCES[s][1] else 'over_refusal_rate']:.0%}.")
        free = {label: v[s] for label, v in summ.items() if label.startswith(("prompt", "steer")) and v}
        if free:  # what the LoRA fit adds over doing nothing clever (#12, #13)
            name, f = max(free.items(), key=lambda kv: kv[1]["dm"][0])
            text += (f" Best free baseline here by margin: {name}, margin − base {f['dm'][0]:+.3f}"
                     f" ({'above' if f['dm'][0] > m['dm'][0] else 'not above'} RAHF's {m['dm'][0]:+.3f}),"
                     f" repetition {f['repetition_rate']:.0%}: read it with the table's behaviour.")
        notes.append(text)
    return notes


STOPS = ("both cut", "only rejected ends", "only chosen ends", "both end")


def stop_groups(pairs: dict[str, list[dict]], tokenizer: Any, window: int) -> dict[str, dict[str, list[bool]]]:
    """Per source and :data:`STOPS` group, which validation pairs belong to it: whether each
    reply's end-of-reply token fits in the scored reply window. Why: where only one reply ends
    in the window, the margin also measures whether a model "stops here", a length signal; where
    both are cut, it measures what the replies say."""
    from rahf.data.render import encode_reply

    def ends(reply: Any) -> bool:
        text = reply if isinstance(reply, str) else reply[-1]["content"]
        return not encode_reply(tokenizer, text, max_reply_tokens=window)[1]

    groups = {}
    for source, rows in pairs.items():
        flags = [(ends(r["chosen"]), ends(r["rejected"])) for r in rows]
        groups[source] = {name: [f == want for f in flags]
                          for name, want in zip(STOPS, [(False, False), (False, True), (True, False), (True, True)], strict=True)}
    return groups


def stop_table(rows: list[tuple[str, list[dict]]], base: dict, groups: dict[str, dict[str, list[bool]]]) -> list[str]:
    """Mean margin change from the base per stop group (runs averaged), one line per labelled list of evaluations."""
    import numpy as np

    head = " | ".join(f"{s}: {name} ({sum(groups[s][name])})" for s in SOURCES for name in STOPS)
    lines = [f"| run | {head} |", "|---" * (1 + len(SOURCES) * len(STOPS)) + "|"]
    for label, evals in rows:
        cells = []
        for s in SOURCES:
            delta = np.mean([np.asarray(e["sources"][s]["pair_margins"]) - np.asarray(base["sources"][s]["pair_margins"]) for e in evals], axis=0)
            cells += [f"{delta[np.asarray(groups[s][name])].mean():+.3f}" if any(groups[s][name]) else "–" for name in STOPS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _stop_row(label: str, runs: list[dict]) -> tuple[str, list[dict]]:
    """A main-table row's line of the stop-group table: its runs' evaluations."""
    return f"{label}, {len(runs)} run{'s' * (len(runs) > 1)}", [r["eval"] for r in runs]


def report(args: argparse.Namespace, ctx: dict, state: dict, command_line: str, whys: dict[str, dict[str, str]]) -> str:
    """The BENCHMARKS.md section (and docs/img/quality.png unless --smoke / --no-write)."""
    base, budget, picks = ctx["base"], ctx["budget"], state["picks"]
    names = " | ".join(f"pref. acc. {s} | margin − base {s} (nats) | RM win (LC) {s} · behaviour vs base" for s in SOURCES)
    lines = [f"| method | runs | {names} | training CPU-s / wall / FLOPs |", "|---" * 9 + "|"]
    summ, plot, jobs = {}, {}, [ctx["base"]]
    stop_rows = []  # (label, evaluations) for the stop-group table
    for method in [m for m in args.methods if m in TRAINED]:
        runs = [r for r in [state["tune"].get((method, picks.get(method)))] + [state["seeds"].get((method, s)) for s in args.seeds if s] if r]
        line, summ[method] = row(f"{LABELS[method]} ({picks.get(method) or 'pending'})", runs, base, budget)
        lines.append(line)
        if runs:
            stop_rows.append(_stop_row(f"{LABELS[method]} ({picks[method]})", runs))
    best = state.get("best")
    candidates = [(best, f"{LABELS[best]} ({picks[best]})")] if best and picks.get(best) else []
    for knob, value in state.get("variants", []) if candidates else ():  # ablations confirmed on every seed
        flip = state["ablate"].get(("ablate", knob))  # a tuned knob's ablation is keyed without its value
        seed0 = state["ablate"].get(("ablate", knob, value)) or (flip if flip and flip["train"]["knobs"][knob] == value else None)
        runs = [r for r in [seed0] + [state.get("confirm", {}).get((knob, value, s)) for s in args.seeds if s] if r]
        label = f"{LABELS[best]} ({picks[best]} + {knob} {value:g})" if isinstance(value, float) else f"{LABELS[best]} ({picks[best]} + {knob} {value})"
        line, summ[label] = row(label, runs, base, budget)
        lines.append(line)
        candidates.append((label, label))
        if runs:
            stop_rows.append(_stop_row(label, runs))
    for key, result in state["free"].items():
        line, summ[f"{key[0]} {key[1]}"] = row(f"{LABELS[key[0]]} {key[1]}", [result] if result else [], base, budget)
        lines.append(line)
    for label, m in summ.items():
        plot[label] = {s: (v["dm"][0], v["dm"][0] - (v["dm"][1] or 0), v["dm"][0] + (v["dm"][1] or 0)) if len(v["cis"]) > 1
                       else (v["dm"][0], v["cis"][0]["low"], v["cis"][0]["high"]) for s, v in m.items()}
    tried = ["| method | setting | why | margin − base alpacaeval / hh | guards | excess | CPU-s | steps |", "|---" * 8 + "|"]
    for (method, name), r in sorted(state["tune"].items(), key=lambda kv: (TRAINED.index(kv[0][0]), list(whys[kv[0][0]]).index(kv[0][1]))):
        if not r:
            tried.append(f"| {method} | {name} | {whys[method][name]} | pending | | | | |")
            continue
        v, g = bl.versus_base(r["eval"], base), bl.guards(r["eval"], base)
        tried.append(f"| {method} | {name}{' **(pick)**' if picks[method] == name else ''} | {whys[method][name]}"
                     f" | {v['alpacaeval']['margin']['value']:+.3f} / {v['hh']['margin']['value']:+.3f}"
                     f" | {'ok' if all(g.values()) else 'broken: ' + ', '.join(k for k, ok in g.items() if not ok)}"
                     f" | {sum(bl.guard_excess(r['eval'], base).values()):.1f}"
                     f" | {r['train']['cpu_seconds']:.0f} | {r['train']['steps']} |")
    ablations = ["| one change from the pick | " + " | ".join(f"margin − base {s} (95% CI)" for s in SOURCES)
                 + " | reply tokens vs base " + " / ".join(SOURCES) + " | guards |", "|---|---|---|---|---|"]
    rows = [(f"none: the pick ({picks[best]}), seed 0", state["tune"].get((best, picks[best])))] if best and picks.get(best) else []
    rows += [(f"{key[1]} → {r['train']['knobs'][key[1]]}" if r else " ".join(map(str, key[1:])), r)
             for key, r in state["ablate"].items()]  # key: ("ablate", knob[, value])
    for label, r in rows:
        if not r:
            ablations.append(f"| {label} | pending | pending | | |")
            continue
        stop_rows.append((f"ablation {label}", [r["eval"]]))
        v, g = bl.versus_base(r["eval"], base), bl.guards(r["eval"], base)
        tokens = bl.summary([r["eval"]], base)
        ablations.append(f"| {label} | " + " | ".join(
            f"{v[s]['margin']['value']:+.3f} [{v[s]['margin']['low']:+.3f}, {v[s]['margin']['high']:+.3f}]" for s in SOURCES)
            + " | " + " / ".join(f"{tokens[s]['tokens']:+.0%}" for s in SOURCES)
            + f" | {'ok' if all(g.values()) else 'broken: ' + ', '.join(k for k, ok in g.items() if not ok)} |")
    done = [r for part in ("tune", "seeds", "ablate", "confirm") for r in state.get(part, {}).values() if r]
    jobs += [r["train"] for r in done] + [r["eval"] for r in done] + [r for r in state["free"].values() if r]
    per_seed = {s: sum(r["train"]["cpu_seconds"] + r["eval"]["cpu_seconds"] for (m, x), r in state["seeds"].items() if x == s and r)
                for s in args.seeds if s}
    commits = sorted({j["commit"][:7] for j in jobs})
    eval_cpu = mean_spread([r["eval"]["cpu_seconds"] for r in done] or [base["cpu_seconds"]])[0]
    if not (args.smoke or args.no_write):
        bl.bar_plot(PLOT, plot, "margin − base (nats)", "validation margin change from the base (seed 0: 95% CI; 3 seeds: ± sd)")
    rm = json.loads((ctx["rm"] / "metrics.json").read_text()) if "rm" in ctx and (ctx["rm"] / "metrics.json").exists() else None
    rm_line = (f"Reward model: `rahf train-rm` (v1's settings) on {rm['n_train']} alpacaeval pairs whose prompts no policy and no"
               f" validation pair has; held-out accuracy {rm['validation_accuracy']['value']:.1%} (\"longer reply wins\""
               f" {rm['longer_wins_accuracy']['value']:.1%}): it mostly rewards length, so read LC and tokens." if rm else "")
    failed = "".join(f"\n- failed (a rerun retries it): {f}" for f in state["failed"])
    stops = stop_table(stop_rows, base, ctx["stop_groups"]) if ctx.get("stop_groups") else []
    return f"""
## Quality v2: matched compute, tuned on the validation split, free baselines (#13)

```
{command_line}
```

Machine: {ctx['machine']}; 1 thread per job, mean 1-min load during the jobs {mean_spread([j.get('load', 0) for j in jobs])[0]:.1f}.
Date: {date.today().isoformat()}. rahf commits (run from `git archive`): {', '.join(commits)}. Model SmolLM2-135M-Instruct.
Data: `../shared/data` dev files split by prompt ({budget.val_fraction:.0%} validation, seed {SPLIT_SEED}): {budget.eval_pairs}
validation pairs and {budget.eval_prompts} prompts per source; training pool {budget.train_pairs} pairs, half per source.
**Matched compute:** {budget.cpu_seconds:.0f} training CPU-seconds per method and seed, all stages; each setting's steps
per stage come from a {budget.calib_steps}-step calibration (seed 0) and are reused by every seed (the column shows what
each run used). Budget arithmetic: the full table is 12 trained runs (4 methods x 3 seeds) and 15 evaluations
(12 + base + prompting + the picked steering strength); one evaluation costs {eval_cpu:.0f} CPU-s here (mean), so
12 x {budget.cpu_seconds:.0f} + 15 x {eval_cpu:.0f} = {(12 * budget.cpu_seconds + 15 * eval_cpu) / 3600:.1f} CPU-hours ≈ {(12 * budget.cpu_seconds + 15 * eval_cpu) / 7200:.1f} h
with `--jobs 2` on an otherwise idle machine; seed-0 tuning (12 more settings, 3 more steering strengths), calibration
and ablations come on top.
Cost per extra seed so far (train + eval CPU-s): {', '.join(f'seed {s}: {c:.0f}' for s, c in per_seed.items()) or 'pending'}.
FLOPs: estimate, 6 per trained and 2 per frozen pass x N x T (T = {sum(budget.windows)} window tokens: an upper bound).
Margin − base: mean-token l(y+) − l(y−) change from the base, paired over the same pairs (one run: its 95%
CI; more: ± seed sd; ↑ counts runs whose CI is above 0). RM win (LC): reward-model win rate vs the base's greedy
replies (length-controlled), with reply tokens vs base, limit-hit, 4-gram repetition, refusal (hh) / over-refusal.
{rm_line}

{chr(10).join(lines)}

![validation margin change from the base per method](docs/img/quality.png)

Tuning (seed 0, validation split only; 4 settings per method; done so far: {sum(1 for r in state['tune'].values() if r)} of
{len(state['tune'])}, and a pick is made among the done ones). Pick: the highest mean margin − base over
both sources among the settings that keep every guard ({GUARDS}); if none does, the highest among
those that exceed the guards least (points past each bound, summed over guards and sources: the
"excess" column). Until 2026-12-01 that fallback was the highest margin overall; it picked Dual
`preferred`, whose replies repeat 4-grams 49 % / 42 % of the time (base 7 % / 12 %).

{chr(10).join(tried)}

Ablations of the best RAHF variant ({LABELS.get(state['best'] or '', 'pending')}), seed 0, one knob changed from its pick:

{chr(10).join(ablations)}

Where the margin moves: the mean margin change from the base over the validation pairs grouped
by whether each reply's end-of-reply token fits in the {budget.windows[1]}-token reply window (pairs per group
in brackets). Where only one reply ends, a model that stops later gains (or loses) margin whatever
the replies say; "both cut" pairs carry no stop signal, so their column is the margin with length
taken out.

{chr(10).join(stops) or '(needs the validation files)'}

Reading against #13's targets:

{chr(10).join(reading(summ, candidates))}{failed}
"""
