"""Write an evaluation's report.md and plots from its summary (see els.eval.harness)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.ticker
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from els.core.io import write_atomic
from els.eval.summary import Rate, Summary
from els.steering.artefact import Artefact
from els.steering.energy import STATES
from els.steering.manifest import Manifest

MARKERS = ("o", "s", "^", "D", "v", "P", "X")
STATE_COLOURS = {
    "helpful": "tab:green",
    "false_refusal": "tab:orange",
    "safe_refusal": "tab:blue",
    "jailbreak": "tab:red",
}


def figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure drawn by the Agg backend whatever backend the caller's matplotlib uses (no GUI, no global state)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def with_ci(r: Rate) -> str:
    lo, hi = r.ci95
    return f"{100 * r.refusal_rate:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def _err(r: Rate, value: float, flip: bool = False) -> list[float]:
    lo, hi = r.ci95
    if flip:
        lo, hi = 1 - hi, 1 - lo
    return [max(0.0, value - lo), max(0.0, hi - value)]


def plot_tradeoff(summary: Summary, path: Path) -> bool:
    """x: refusal rate on the harmful sets, y: compliance on the benign sets (pooled), one point per method."""
    benign, harmful = summary.overall.benign, summary.overall.harmful
    if benign is None or harmful is None:
        return False
    fig, ax = figure(5.5, 5)
    for i, (method, harm) in enumerate(harmful.items()):
        ben = benign[method]
        x, y = harm.refusal_rate, 1 - ben.refusal_rate
        # Distinct markers, shrinking, and staggered labels keep coinciding methods visible.
        ax.errorbar(
            [x],
            [y],
            xerr=[[v] for v in _err(harm, x)],
            yerr=[[v] for v in _err(ben, y, flip=True)],
            fmt=MARKERS[i % len(MARKERS)],
            capsize=4,
            color=f"C{i}",
            label=method,
            markersize=max(4, 9 - 1.5 * i),
            alpha=0.9,
        )
        ax.annotate(method, (x, y), textcoords="offset points", xytext=(7, -14 - 11 * i), color=f"C{i}", fontsize=9)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("refusal rate on harmful prompts (higher is safer)")
    ax.set_ylabel("compliance on benign prompts (higher is more helpful)")
    ax.set_title(f"Safety vs over-refusal\n{summary.model}, judge: {summary.judge}, 95% Wilson intervals", fontsize=10)
    ax.plot([1], [1], marker="*", color="gold", markersize=14, markeredgecolor="k", linestyle="none", label="ideal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    save_figure(fig, path)
    return True


def plot_refusal_rates(summary: Summary, path: Path) -> None:
    """Grouped bars: refusal rate per benchmark (x) and method (bars), with 95% intervals."""
    names = list(summary.benchmarks)
    methods = summary.reported_methods()
    width = 0.8 / len(methods)
    fig, ax = figure(max(6.0, 1.4 * len(names) * max(1, len(methods)) / 2 + 2), 4.5)
    for j, method in enumerate(methods):
        xs: list[float] = []
        ys: list[float] = []
        errs: list[list[float]] = [[], []]
        for i, name in enumerate(names):
            r = summary.benchmarks[name].methods[method]
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(r.refusal_rate)
            lo, hi = _err(r, r.refusal_rate)
            errs[0].append(lo)
            errs[1].append(hi)
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=method, color=f"C{j}", alpha=0.85)
    for i, name in enumerate(names):
        if summary.benchmarks[name].kind == "harmful":
            ax.axvspan(i - 0.5, i + 0.5, color="0.9", zorder=0)
    labels = [f"{n}\n({summary.benchmarks[n].kind}, n={summary.benchmarks[n].n})" for n in names]
    ax.set_xticks(range(len(names)), labels, fontsize=8)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("refusal rate")
    ax.set_title(
        f"Refusal rate per benchmark, 95% Wilson intervals; judge: {summary.judge}\n"
        "(grey: harmful sets, where refusing is right)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def plot_layer_auc(manifest: Manifest, path: Path) -> None:
    """Validation (and training) AUC of each layer's energy model; the steered layers marked."""
    auc, train_auc = manifest.auc(), manifest.train_auc()
    layers = sorted(auc)
    val = [auc[k] for k in layers]
    fig, ax = figure(7, 3.8)
    ax.plot(layers, val, "o-", label="validation AUC")
    if train_auc is not None:
        ax.plot(layers, [train_auc[k] for k in layers], "--", color="0.5", label="train AUC")
    steered = manifest.steer.layers
    ax.scatter(
        steered,
        [auc[k] for k in steered],
        s=140,
        facecolors="none",
        edgecolors="red",
        linewidths=2,
        label="steered",
        zorder=3,
    )
    ax.axhline(0.5, color="k", linewidth=0.8, linestyle=":", label="chance")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("AUC: P[E(good) < E(bad)]")
    ax.set_ylim(min(0.45, min(val) - 0.05), 1.01)
    ax.set_title(f"Energy model per layer ({manifest.base_model})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


@torch.no_grad()
def plot_energy_histograms(art: Artefact, states_dir: Path, path: Path) -> dict:
    """Energy of the collected activations (states.safetensors) by state, at each steered layer."""
    from els.training.collect import load_collection

    col = load_collection(states_dir)
    layers = art.layers
    members = [art.member_index(layer) for layer in layers]
    acts = col.activations[:, layers].float().transpose(0, 1)  # [S, N, d]
    energy = art.energy.select(members).eval()(acts)  # [S, N]
    states = col.states
    fig, axes = figure(4.2 * len(layers), 3.6, 1, len(layers), squeeze=False)
    counts = {s: states.count(s) for s in STATES}
    for ax, layer, e in zip(axes[0], layers, energy):
        lo, hi = float(e.min()), float(e.max())
        bins = torch.linspace(lo, hi, 31).tolist()
        for s in STATES:
            vals = [float(v) for v, st in zip(e, states) if st == s]
            if vals:
                ax.hist(vals, bins=bins, alpha=0.5, color=STATE_COLOURS[s], label=f"{s} ({len(vals)})", density=True)
        ax.axvline(art.manifest.gate_offset_of(layer), color="k", linestyle="--", linewidth=1, label="gate offset")
        ax.set_title(f"layer {layer} (val AUC {art.manifest.auc()[layer]:.3f})", fontsize=10)
        ax.set_xlabel("energy")
    axes[0][0].set_ylabel("density")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(
        "Energies of the collected states (train and validation rows); good states should sit low", fontsize=10
    )
    save_figure(fig, path)
    return counts


def write_report(
    summary: Summary, out: Path, artefact: Artefact | None = None, states: Path | None = None
) -> list[Path]:
    """report.md and PNG plots in `out`; returns the plots written."""
    out = Path(out)
    plots: list[Path] = []
    notes: list[str] = []
    if plot_tradeoff(summary, out / "tradeoff.png"):
        plots.append(out / "tradeoff.png")
    else:
        notes.append("No trade-off plot: it needs at least one benign and one harmful benchmark.")
    plot_refusal_rates(summary, out / "refusal_rates.png")
    plots.append(out / "refusal_rates.png")
    if artefact is not None:
        plot_layer_auc(artefact.manifest, out / "layer_auc.png")
        plots.append(out / "layer_auc.png")
        if states is not None:
            plot_energy_histograms(artefact, states, out / "energy_hist.png")
            plots.append(out / "energy_hist.png")
        else:
            notes.append("No energy histograms: pass --states DIR (the artefact's collection).")
    write_atomic(out / "report.md", markdown(summary, [p.name for p in plots], notes, artefact, states))
    return plots


def markdown(
    summary: Summary, plots: list[str], notes: list[str], artefact: Artefact | None, states: Path | None
) -> str:
    methods = summary.reported_methods()
    base = methods[0]
    g = summary.generation
    lines = [
        "# ELS evaluation",
        "",
        f"- model: `{summary.model}` (fingerprint {summary.model_fingerprint}, {g.dtype} on {g.device})",
        f"- judge: **{summary.judge}** (partial refusals count as refusals)"
        + (f"; also recorded: {', '.join(j.name for j in summary.judges[1:])}" if len(summary.judges) > 1 else ""),
        f"- generation: greedy, max {g.max_new_tokens} new tokens, batch {g.batch_size}"
        + (f", seeded sample of {g.limit} prompts per benchmark (seed {g.seed})" if g.limit else ""),
        f"- methods: {', '.join(methods)}",
    ]
    if artefact is not None:
        s = artefact.manifest.steer
        els_settings = summary.method_settings("els")
        lines.append(
            f"- artefact: layers {s.layers}, eta {els_settings.get('eta', s.eta)}, "
            f"K {els_settings.get('steps', s.steps)}, energy gate {artefact.settings.energy_gate}"
            + (f"; states from `{states}`" if states else "")
        )
    run = summary.run
    lines.append(
        f"- run: {run.generated} answers generated this run (the rest cached); "
        f"times {', '.join(f'{k} {v:.0f} s' for k, v in run.timings_s.stages().items())}"
    )
    lines += ["", f"## Refusal rate per benchmark (judge: {summary.judge}, 95% Wilson interval)", ""]
    lines.append("| benchmark | kind | n | " + " | ".join(methods) + " |")
    lines.append("|---|---|---|" + "---|" * len(methods))
    for name, b in summary.benchmarks.items():
        cells = [with_ci(b.methods[m]) for m in methods]
        lines.append(f"| {name} | {b.kind} | {b.n} | " + " | ".join(cells) + " |")
    for kind, per in summary.overall.by_kind().items():
        cells = [with_ci(per[m]) for m in methods]
        lines.append(f"| **all {kind}** | {kind} | {per[base].n} | " + " | ".join(cells) + " |")
    lines += ["", "Compliance on benign sets is 1 − refusal rate. On harmful sets a higher refusal rate is safer.", ""]
    fallbacks = {
        (n, m): r.judge_fallbacks
        for n, b in summary.benchmarks.items()
        for m, r in b.methods.items()
        if r.judge_fallbacks
    }
    if fallbacks:
        lines += [
            "Unparseable model-judge replies (fell back to the prefix judge): "
            + ", ".join(f"{n}/{m}: {k}" for (n, m), k in fallbacks.items()),
            "",
        ]
    other = summary.judges[1:]
    if other:
        lines += [
            "Refusal rate by the other judges:",
            "",
            "| benchmark | method | " + " | ".join(j.name for j in other) + " |",
            "|---|---|" + "---|" * len(other),
        ]
        for name, b in summary.benchmarks.items():
            for m in methods:
                oj = b.methods[m].other_judges
                if oj is None:
                    continue  # a composed method (system-prompt-gated) has only the headline judge's verdicts
                lines.append(f"| {name} | {m} | " + " | ".join(pct(oj[j.name]) for j in other) + " |")
        lines.append("")

    cat_sets = [(n, b, cats) for n, b in summary.benchmarks.items() if (cats := b.methods[base].categories)]
    if cat_sets:
        lines += ["## Per category", ""]
        for name, b, cats in cat_sets:
            lines += [
                f"**{name}** ({b.kind})",
                "",
                "| category | n | " + " | ".join(methods) + " |",
                "|---|---|" + "---|" * len(methods),
            ]
            for cat, r in cats.items():
                cells = [with_ci((b.methods[m].categories or {})[cat]) for m in methods]
                lines.append(f"| {cat or '(none)'} | {r.n} | " + " | ".join(cells) + " |")
            lines.append("")

    if summary.quality:
        lines += [
            "## Quality kept",
            "",
            "KL: mean per-token KL(base ‖ method) of the next-token distribution along base's own greedy "
            "answers, teacher-forced through both. Unchanged: share of answers identical to base's.",
            "",
            "| method | KL mean (nats/token) | tokens | unchanged (harmless set) "
            "| unchanged (benign prompts base answered) |",
            "|---|---|---|---|---|",
        ]
        for m, q in summary.quality.items():
            kl = f"{q.kl_mean:.4f}" if q.kl_mean is not None else "–"
            harmless = (
                f"{pct(q.unchanged_share)} of {q.quality_n or 0} {q.quality_set or ''}"
                if q.unchanged_share is not None
                else "–"
            )
            lines.append(
                f"| {m} | {kl} | {q.kl_tokens if q.kl_tokens is not None else '–'} | {harmless} | "
                f"{pct(q.unchanged_share_benign_answered)} of {q.benign_answered_n} |"
            )
        lines.append("")

    if summary.speed:
        lines += [
            "## Cost",
            "",
            "Generated tokens per second on the same prompts in the same run, each answer forced "
            f"to {g.max_new_tokens} tokens, after a warm-up, in rounds of alternating order. On a shared CPU "
            "other jobs add noise: compare the ratios more than the rates.",
            "",
            "| method | batch | tokens | seconds | tokens/s | ratio to base |",
            "|---|---|---|---|---|---|",
        ]
        for m, entries in summary.speed.items():
            for e in entries:
                lines.append(
                    f"| {m} | {e.batch} | {e.tokens} | {e.seconds:.1f} | {e.tokens_per_s:.1f} | {e.ratio_to_base:.3f} |"
                )
        lines.append("")

    examples = summary.examples
    if any(v for ex in examples.values() for v in ex.values()):
        lines += ["## Answers whose verdict changed", ""]
        for m, kinds in examples.items():
            for kind, items in kinds.items():
                for ex in items:
                    flip = "refused → answered" if ex.base_refused else "answered → refused"
                    lines += [
                        f"- **{m}, {ex.set_name} ({kind}), {flip}**: {_quote(ex.prompt)}",
                        f"  - {base}: {_quote(ex.answer(base))}",
                        f"  - {m}: {_quote(ex.answer(m))}",
                    ]
        lines.append("")

    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _quote(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return "“" + (text if len(text) <= limit else text[:limit] + "…") + "”"
