"""Altair chart builders and small HTML renderers for the explorer pages. No streamlit here.

Every chart takes a Polars frame from explorer/queries.py and returns an `alt.Chart` (or layered chart) with tooltips.
Sizes scale with the data so 64+ experts × 26+ layers stay readable: heatmap cells keep a minimum height per layer,
expert axes label every 8th expert, and dense charts use selection (click a cell) instead of text labels.
"""

from __future__ import annotations

import html

import altair as alt
import polars as pl

CELL_H = 14  # px per layer row of a heatmap; 26 layers → 364 px


def _layer_height(n_layers: int, lo: int = 160) -> int:
    return max(lo, CELL_H * max(n_layers, 1))


def _expert_axis(n_experts: int) -> alt.Axis:
    step = 1 if n_experts <= 16 else (4 if n_experts <= 64 else 8)
    return alt.Axis(values=list(range(0, max(n_experts, 1), step)), labelAngle=0, title="expert")


def score_heatmap(scores: pl.DataFrame, value: str = "score", title: str = "", selected: pl.DataFrame | None = None,
                  name: str = "cell", scheme: str = "viridis") -> alt.LayerChart | alt.Chart:
    """Layer × expert heatmap of `value`; click selects a cell (selection parameter `name`). When `selected`
    (columns layer, expert) is given, those cells get a white outline."""
    n_exp = int(scores["expert"].max() or 0) + 1 if scores.height else 1
    n_layers = scores["layer"].n_unique() if scores.height else 1
    pick = alt.selection_point(name=name, fields=["layer", "expert"], on="click", clear="dblclick")
    tooltip = [alt.Tooltip("layer:O"), alt.Tooltip("expert:O"), alt.Tooltip(f"{value}:Q", format=".4f")]
    for extra in ("rank", "cum", "raw", "contrast_mean", "prob"):
        if extra in scores.columns and extra != value:
            tooltip.append(alt.Tooltip(f"{extra}:Q", format="d" if extra == "rank" else ".4f"))
    base = alt.Chart(scores).mark_rect().encode(
        x=alt.X("expert:O", axis=_expert_axis(n_exp), sort="ascending"),
        y=alt.Y("layer:O", title="layer", sort="ascending", axis=alt.Axis(labelOverlap=False)),
        color=alt.Color(f"{value}:Q", scale=alt.Scale(scheme=scheme), title=value),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.55)),
        tooltip=tooltip,
    ).add_params(pick)
    chart = base
    if selected is not None and selected.height:
        outline = alt.Chart(selected.select("layer", "expert")).mark_rect(
            fill=None, stroke="white", strokeWidth=1.5).encode(x="expert:O", y="layer:O")
        chart = alt.layer(base, outline)
    # a fixed step per layer row (not a total height the layout may squeeze): every layer labelled, ≥ CELL_H px
    return chart.properties(title=title, height=alt.Step(max(CELL_H + 4, 160 // max(n_layers, 1))))


def concentration_chart(conc: pl.DataFrame, spread: pl.DataFrame, p: float | None = None,
                        max_n: int | None = None) -> alt.LayerChart:
    """Paper Fig. 2: cumulative score of the top-n experts, one faint line per layer, the inter-quartile band and
    the mean across layers; a rule at p. Columns: conc (task, layer, n, cum), spread (task, n, mean, q25, q75, ...)."""
    if max_n is not None:
        conc = conc.filter(pl.col("n") <= max_n)
        spread = spread.filter(pl.col("n") <= max_n)
    x = alt.X("n:Q", title="number of top experts", scale=alt.Scale(zero=False))
    hover = alt.selection_point(name="layer_hover", fields=["layer"], on="pointerover", clear="pointerout")
    lines = alt.Chart(conc).mark_line(strokeWidth=1).encode(
        x=x, y=alt.Y("cum:Q", title="cumulative score"), detail="layer:N",
        color=alt.Color("task:N", scale=alt.Scale(scheme="dark2"), legend=alt.Legend(labelLimit=300)),
        opacity=alt.condition(hover, alt.value(0.9), alt.value(0.25)),
        tooltip=["task:N", "layer:O", "n:Q", alt.Tooltip("cum:Q", format=".3f")],
    ).add_params(hover)
    band = alt.Chart(spread).mark_area(opacity=0.25).encode(x=x, y="q25:Q", y2="q75:Q", color="task:N")
    mean = alt.Chart(spread).mark_line(strokeWidth=3).encode(
        x=x, y="mean:Q", color="task:N",
        tooltip=["task:N", "n:Q", alt.Tooltip("mean:Q", format=".3f"), alt.Tooltip("lo:Q", format=".3f"),
                 alt.Tooltip("hi:Q", format=".3f")])
    layers = [band, lines, mean]
    if p is not None:
        layers.append(alt.Chart(pl.DataFrame({"p": [p]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="p:Q"))
    return alt.layer(*layers).properties(height=320)


def experts_needed_chart(needed: pl.DataFrame, p: float) -> alt.Chart:
    """Bars: experts the top-p rule needs per layer, one colour per task (grouped)."""
    return alt.Chart(needed).mark_bar().encode(
        x=alt.X("layer:O", title="layer"), xOffset="task:N",
        y=alt.Y("n_experts:Q", title=f"experts to reach p = {p:g}"),
        color="task:N", tooltip=["task:N", "layer:O", "n_experts:Q"],
    ).properties(height=240)


def task_matrix(df: pl.DataFrame, value: str, title: str, fmt: str = ".2f", scheme: str = "blues") -> alt.LayerChart:
    """Task × task matrix with the value printed in each cell (few tasks, so labels stay legible)."""
    base = alt.Chart(df).encode(x=alt.X("task_b:N", title=None, axis=alt.Axis(labelOverlap=False, labelAngle=-30)),
                                y=alt.Y("task_a:N", title=None, axis=alt.Axis(labelOverlap=False)))
    rect = base.mark_rect().encode(color=alt.Color(f"{value}:Q", scale=alt.Scale(scheme=scheme), title=value),
                                   tooltip=["task_a:N", "task_b:N", alt.Tooltip(f"{value}:Q", format=fmt)])
    lo, hi = float(df[value].min() or 0), float(df[value].max() or 0)
    text = base.mark_text(fontSize=12).encode(  # white on the dark half of the colour scale, black on the light half
        text=alt.Text(f"{value}:Q", format=fmt),
        color=alt.condition(f"datum.{value} > {(lo + hi) / 2}", alt.value("white"), alt.value("black")))
    n = max(df["task_a"].n_unique(), 1)
    # click a cell: selection parameter `pair` (task_a, task_b) for the linked list of shared experts
    pick = alt.selection_point(name="pair", fields=["task_a", "task_b"], on="click", clear="dblclick")
    rect = rect.add_params(pick)
    return alt.layer(rect, text).properties(title=title, width=max(200, 60 * n), height=alt.Step(max(28, 160 // n)))


def jaccard_chart(jac: pl.DataFrame) -> alt.Chart:
    """Per-layer Jaccard of selected sets, one line per task pair; legend click highlights a pair."""
    df = jac.with_columns(pair=pl.col("task_a") + " · " + pl.col("task_b"))
    sel = alt.selection_point(name="pair", fields=["pair"], bind="legend")
    n_pairs = df["pair"].n_unique()
    # up to 20 pairs get distinct colours (category20); the legend lists every pair, never truncated
    color = alt.Color("pair:N", scale=alt.Scale(scheme="category10" if n_pairs <= 10 else "category20"),
                      legend=alt.Legend(labelLimit=300, symbolLimit=0, columns=1 if n_pairs <= 12 else 2))
    return alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("layer:O"), y=alt.Y("jaccard:Q", scale=alt.Scale(domain=[0, 1])), color=color,
        opacity=alt.condition(sel, alt.value(1.0), alt.value(0.15)),
        tooltip=["pair:N", "layer:O", alt.Tooltip("jaccard:Q", format=".3f")],
    ).add_params(sel).properties(height=260)


def bar_chart(df: pl.DataFrame, x: str, y: str, color: str | None = None, title: str = "",
              sort: str | None = "-y", height: int = 240) -> alt.Chart:
    enc = dict(x=alt.X(f"{x}:N", sort=sort, title=x), y=alt.Y(f"{y}:Q", title=y),
               tooltip=[c for c in df.columns if not df[c].dtype.is_nested()])
    if color:
        enc["color"] = alt.Color(f"{color}:N")
    return alt.Chart(df).mark_bar().encode(**enc).properties(title=title, height=height)


def top_tokens_chart(df: pl.DataFrame) -> alt.Chart:
    """Top tokens of an expert: one bar per (task, token), grouped by task, sorted by count within the task; bar
    colour = share of the token's uses routed to this expert. (No facets, so the chart stretches to the page.)"""
    d = (df.with_columns(token=pl.col("token_text").map_elements(visible_token, return_dtype=pl.Utf8))
         .sort(["label", "n"], descending=[False, True])
         .with_columns(row=pl.col("label") + " · " + pl.col("token")))
    return alt.Chart(d).mark_bar().encode(
        y=alt.Y("row:N", sort=d["row"].to_list(), title=None, axis=alt.Axis(labelOverlap=False, labelLimit=240)),
        x=alt.X("n:Q", title="times routed here"),
        color=alt.Color("share:Q", scale=alt.Scale(scheme="oranges", domain=[0, 1]),
                        title="share of token's uses"),
        tooltip=[alt.Tooltip("label:N", title="task"), "token:N", "n:Q", alt.Tooltip("mean_gate:Q", format=".3f"),
                 alt.Tooltip("share:Q", format=".2f")],
    ).properties(height=max(120, 18 * d.height))


def loss_chart(metrics: pl.DataFrame, color: str = "run", x: str = "step") -> alt.Chart:
    """Training loss vs `x` (step, or elapsed seconds) one line per run, with hover points showing values; the
    legend keeps full run labels."""
    hover = alt.selection_point(name="step_hover", fields=[x], nearest=True, on="pointerover", empty=False)
    title = {"step": "step", "elapsed": "seconds"}.get(x, x)
    line = alt.Chart(metrics).mark_line().encode(
        x=alt.X(f"{x}:Q", title=title), y=alt.Y("loss:Q", scale=alt.Scale(zero=False)),
        color=alt.Color(f"{color}:N", legend=alt.Legend(labelLimit=400, orient="bottom", columns=2)))
    pts = line.mark_point().encode(
        opacity=alt.condition(hover, alt.value(1), alt.value(0)),
        tooltip=[f"{color}:N", f"{x}:Q", alt.Tooltip("loss:Q", format=".4f")]).add_params(hover)
    return alt.layer(line, pts).properties(height=260)


METHOD_COLORS = {"ESFT-Token": "#1f77b4", "ESFT-Gate": "#17becf", "ESFT": "#2ca02c", "FFT": "#d62728",
                 "LoRA": "#9467bd", "random experts": "#7f7f7f"}


# colours for methods without a fixed one (benchmark method names, the user's runs): tableau10/20 minus the
# above, strong ones first
_SPARE_COLORS = ["#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39",
                 "#7b4173", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#9edae5"]


def method_color(methods: list[str], order: list[str] | None = None) -> alt.Color:
    """One colour per method: the fixed METHOD_COLORS for the explorer's method labels, distinct spare colours for
    any other name in `order` (then any name not in it), so a benchmark's methods keep one colour across its charts."""
    present = set(methods)
    every = list(dict.fromkeys([*(order or []), *methods]))  # colours follow this order; the legend shows `methods`
    spare = [m for m in every if m not in METHOD_COLORS]
    dom = [m for m in METHOD_COLORS if m in present] + [m for m in spare if m in present]
    rng = [METHOD_COLORS.get(m) or _SPARE_COLORS[spare.index(m) % len(_SPARE_COLORS)] for m in dom]
    return alt.Color("method:N", scale=alt.Scale(domain=dom, range=rng), legend=alt.Legend(labelLimit=300))


def tradeoff_chart(points: pl.DataFrame, y: str = "task score", order: list[str] | None = None) -> alt.LayerChart:
    """The paper's trade-off: `y` (task score or task loss) against the rise of the general held-out loss, one point
    per run coloured by method, the Pareto front (best score for its forgetting) drawn as a step line. `order`: the
    methods' colour order (see method_color)."""
    color = method_color(sorted(points["method"].unique().to_list()), order)
    tip = ["label:N", "method:N", "task:N", alt.Tooltip(f"{y}:Q", format=".4f"),
           alt.Tooltip("general loss rise:Q", format="+.4f"), "lr:Q", "steps:Q"]
    base = alt.Chart(points).encode(x=alt.X("general loss rise:Q", title="general held-out loss rise (lower = "
                                            "less forgetting)", scale=alt.Scale(zero=False)),
                                    y=alt.Y(f"{y}:Q", scale=alt.Scale(zero=False)))
    dots = base.mark_point(filled=True, size=110).encode(color=color, tooltip=tip)
    layers = [dots]
    if y == "task score" and "pareto" in points.columns:
        front = points.filter(pl.col("pareto"))
        layers.insert(0, alt.Chart(front).mark_line(interpolate="step-after", color="#444", strokeDash=[5, 3])
                      .encode(x="general loss rise:Q", y=f"{y}:Q"))
    return alt.layer(*layers).properties(height=320, title=f"{y} vs general-loss rise")


def score_ci_chart(scores: pl.DataFrame, tasks: list[str], methods: list[str]) -> alt.LayerChart:
    """Task score per method with its 95% CI as an error bar, grouped by task (the mean over tasks last).
    Columns: method, task, score, lo, hi, lr (explorer.benchmarks.score_table)."""
    order, methods = methods, [m for m in methods if m in set(scores["method"].to_list())]
    x = alt.X("task:N", sort=tasks, title=None, axis=alt.Axis(labelAngle=0, labelOverlap=False))
    off = alt.XOffset("method:N", sort=methods)
    tip = ["method:N", "task:N", alt.Tooltip("score:Q", format=".3f"), alt.Tooltip("lo:Q", format=".3f", title="CI lo"),
           alt.Tooltip("hi:Q", format=".3f", title="CI hi"), alt.Tooltip("lr:Q", format="g")]
    base = alt.Chart(scores).encode(x=x, xOffset=off)
    bars = base.mark_bar(opacity=0.85).encode(y=alt.Y("score:Q", title="task score (95% CI)"),
                                              color=method_color(methods, order), tooltip=tip)
    err = base.mark_rule(color="black", strokeWidth=1.5).encode(y="lo:Q", y2="hi:Q", tooltip=tip)
    return alt.layer(bars, err).properties(height=300, title="task score per method (95% bootstrap CI)")


def params_chart(points: pl.DataFrame, settings: list[str] | None = None,
                 order: list[str] | None = None) -> alt.LayerChart:
    """Task score against trainable parameters (log x), one point per (method, lr, swept setting), the Pareto front
    (best score for its parameter count) as a dashed step line; the paper's Fig. 5 with parameters as the cost."""
    settings = [s for s in settings or [] if s in points.columns]
    tip = ["label:N", "method:N", alt.Tooltip("task score:Q", format=".4f"),
           alt.Tooltip("trainable params:Q", format=",.0f"), alt.Tooltip("general loss rise:Q", format="+.4f"),
           alt.Tooltip("lr:Q", format="g"), *settings]
    x = alt.X("trainable params:Q", scale=alt.Scale(type="log"), title="trainable parameters (log)")
    dots = alt.Chart(points).mark_point(filled=True, size=110).encode(
        x=x, y=alt.Y("task score:Q", scale=alt.Scale(zero=False)),
        color=method_color(sorted(points["method"].unique().to_list()), order), tooltip=tip)
    front = alt.Chart(points.filter(pl.col("pareto")).sort("trainable params")).mark_line(
        interpolate="step-after", color="#444", strokeDash=[5, 3]).encode(x=x, y="task score:Q")
    return alt.layer(front, dots).properties(height=320, title="task score vs trainable parameters")


def convergence_chart(curve: pl.DataFrame) -> alt.Chart:
    return alt.Chart(curve).mark_line(point=True).encode(
        x=alt.X("tokens:Q", title="tokens seen"), y=alt.Y("jaccard:Q", title="Jaccard to final selection",
                                                           scale=alt.Scale(domain=[0, 1])),
        tooltip=["tokens:Q", alt.Tooltip("jaccard:Q", format=".3f")]).properties(height=220)


def shift_chart(shift: pl.DataFrame) -> alt.Chart:
    """Routing shift per layer: columns layer, measure, value (e.g. changed top-k share, trained-expert share)."""
    return alt.Chart(shift).mark_bar().encode(
        x=alt.X("layer:O"), xOffset="measure:N", y=alt.Y("value:Q"),
        color=alt.Color("measure:N", legend=alt.Legend(labelLimit=400, orient="bottom", columns=2)),
        tooltip=["layer:O", "measure:N", alt.Tooltip("value:Q", format=".3f")]).properties(height=240)


def quick_chart(df: pl.DataFrame) -> alt.Chart | None:
    """A best-guess chart of a SQL result: first column on x, first numeric column (other than x) on y.
    Two integer key columns plus a number → heatmap. None when nothing numeric to plot."""
    if df.height == 0 or df.width < 2:
        return None
    num = [c for c in df.columns if df[c].dtype.is_numeric()]
    if len(num) >= 3 and df[num[0]].dtype.is_integer() and df[num[1]].dtype.is_integer():
        return alt.Chart(df.head(5000)).mark_rect().encode(
            x=f"{num[1]}:O", y=f"{num[0]}:O", color=f"{num[2]}:Q",
            tooltip=[num[0], num[1], num[2]]).properties(height=_layer_height(df[num[0]].n_unique()))
    x = df.columns[0]
    ys = [c for c in num if c != x]
    if not ys:
        return None
    d = df.head(2000).select(x, ys[0])
    kind = "Q" if d[x].dtype.is_numeric() else "N"
    mark = alt.Chart(d).mark_line(point=True) if kind == "Q" else alt.Chart(d).mark_bar()
    return mark.encode(x=alt.X(f"{x}:{kind}", sort=None), y=f"{ys[0]}:Q", tooltip=[x, ys[0]]).properties(height=260)


# ------------------------------------------------------------------------------------------------------------- HTML
def visible_token(t: str | None) -> str:
    """Token text with whitespace made visible (␣, ↵, ⇥) so spaces and newlines can be told apart."""
    if t is None:
        return "∅"
    return t.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def expert_color(e: int | None, light: bool = True) -> str:
    """A distinct colour per expert id for 64+ experts: golden-angle hue steps with 3 alternating lightness bands."""
    if e is None:
        return "#eeeeee"
    hue = (int(e) * 137.508) % 360
    lum = (82, 72, 90)[int(e) % 3] if light else 40
    return f"hsl({hue:.0f}, 70%, {lum}%)"


def token_html(routes: pl.DataFrame) -> str:
    """A sample's tokens as spans coloured by their top expert; hovering shows the K experts and gate weights.
    Input columns: token_text, experts, weights, top_expert (from queries.sample_routes)."""
    spans = []
    for row in routes.iter_rows(named=True):
        exps, ws = row.get("experts") or [], row.get("weights") or []
        tip = " | ".join(f"e{e}: {w:.3f}" for e, w in zip(exps, ws, strict=False)) or "no routing recorded"
        text = html.escape(row["token_text"] or "").replace("\n", "↵<br>")
        spans.append(f'<span class="tok" title="{html.escape(tip)}" data-expert="{row.get("top_expert")}" '
                     f'style="background:{expert_color(row.get("top_expert"))}">{text or "∅"}</span>')
    return ('<div class="esft-tokens" style="font-family:monospace;line-height:1.9;white-space:pre-wrap;'
            'word-break:break-word">' + "".join(spans) + "</div>")


def legend_html(experts: list[int]) -> str:
    items = "".join(f'<span style="background:{expert_color(e)};padding:1px 6px;margin:2px;border-radius:3px;'
                    f'font-family:monospace">e{e}</span>' for e in experts)
    return f'<div style="line-height:2">{items}</div>'


def attribution_html(tokens: list[str], scores: list[float], target: int | None = None) -> str:
    """Tokens highlighted by attribution: green pushes the router logit up, red pushes it down; the target token
    (whose router logit is explained) is underlined. Hover shows the value."""
    # the target token usually dominates; scale the colours on the context so its tokens stay visible
    ctx = [abs(s) for i, s in enumerate(scores) if i != target]
    peak = max(ctx, default=0.0) or max((abs(s) for s in scores), default=0.0) or 1.0
    spans = []
    for i, (t, s) in enumerate(zip(tokens, scores, strict=False)):
        a = min(abs(s) / peak, 1.0)
        rgb = "22,163,74" if s >= 0 else "220,38,38"
        style = f"background:rgba({rgb},{a:.2f});"
        if i == target:
            style += "border-bottom:3px solid #1d4ed8;"
        text = html.escape(t).replace("\n", "↵<br>") or "∅"
        spans.append(f'<span title="{i}: {s:+.4f}" style="{style}">{text}</span>')
    legend = ('<div style="font-size:0.8em;margin-top:4px">colour scale (context tokens, target excluded): '
              '<span style="background:rgba(220,38,38,1.0);padding:0 6px">−' + f"{peak:.3g}" + '</span> '
              '<span style="background:rgba(220,38,38,0.3);padding:0 6px">−</span> '
              '<span style="padding:0 6px;border:1px solid #ddd">0</span> '
              '<span style="background:rgba(22,163,74,0.3);padding:0 6px">+</span> '
              '<span style="background:rgba(22,163,74,1.0);padding:0 6px">+' + f"{peak:.3g}" + '</span>; '
              'stronger = larger |attribution|; values beyond the scale are clipped; target underlined</div>')
    return ('<div class="esft-attr" style="font-family:monospace;line-height:1.9;white-space:pre-wrap">'
            + "".join(spans) + "</div>" + legend)
