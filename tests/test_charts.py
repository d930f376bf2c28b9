"""Chart builders: valid Vega-Lite with tooltips and selections, readable at 64 experts × 26 layers; HTML renderers
escape token text and carry the routing in their hover titles."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from explorer import charts
from explorer import queries as q


@pytest.fixture(scope="module")
def big_scores():
    rng = np.random.default_rng(0)
    rows = []
    for task in ("math", "law", "code"):
        for layer in range(1, 27):
            s = rng.dirichlet(np.full(64, 0.3))
            rows += [(task, layer, e, float(s[e])) for e in range(64)]
    return pl.DataFrame(rows, schema={"task": pl.Utf8, "layer": pl.Int32, "expert": pl.Int32, "score": pl.Float64},
                        orient="row")


def spec(chart) -> dict:
    return json.loads(chart.to_json())  # to_json validates against the Vega-Lite schema


def find(obj, key):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from find(v, key)


def test_heatmap_scales_to_64_experts_26_layers(big_scores):
    sel = q.select_top_p(big_scores.filter(pl.col("task") == "law"), 0.2)
    ch = charts.score_heatmap(sel, title="t", selected=sel.filter(pl.col("selected")).select("layer", "expert"))
    d = spec(ch)
    assert d["height"]["step"] >= charts.CELL_H  # a fixed px step per layer row: the layout cannot squeeze rows
    assert next(v["axis"]["labelOverlap"] for v in find(d, "y") if isinstance(v, dict) and "axis" in v) is False
    axis_values = next(v["axis"]["values"] for v in find(d, "x") if isinstance(v, dict) and "axis" in v)
    assert axis_values == list(range(0, 64, 4))  # every 4th expert labelled, not 64 overlapping labels
    assert any(p.get("name") == "cell" and p["select"]["type"] == "point" for p in find(d, "params")
               for p in (p if isinstance(p, list) else [p]))
    tips = [t["field"] for t in next(find(d, "tooltip"))]
    assert tips[:3] == ["layer", "expert", "score"] and "rank" in tips
    assert len(d["layer"]) == 2  # heatmap + outline of the selected cells


def test_concentration_and_overlap_charts(big_scores):
    conc = q.concentration(big_scores)
    ch = charts.concentration_chart(conc, q.concentration_spread(conc), p=0.2, max_n=24)
    d = spec(ch)
    assert len(d["layer"]) == 4  # band, per-layer lines, mean, p rule
    line_data = [v for k, v in d["datasets"].items()]
    assert max(r["n"] for ds in line_data for r in ds if "n" in r) == 24
    shared = q.shared_topk(big_scores, 6)
    d = spec(charts.task_matrix(shared, "shared", "Shared"))
    assert d["layer"][1]["mark"]["type"] == "text"
    jac = q.jaccard_by_layer(q.select_top_p(big_scores, 0.2))
    assert [p for ps in find(spec(charts.jaccard_chart(jac)), "params") for p in ps][0]["bind"] == "legend"
    d = spec(charts.experts_needed_chart(q.experts_needed(big_scores, 0.2), 0.2))
    assert d["encoding"]["xOffset"]["field"] == "task"


def test_loss_shift_convergence_topk_charts():
    m = pl.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.5, 2.2], "run": ["a"] * 3})
    params = [p for ps in find(spec(charts.loss_chart(m)), "params") for p in ps]
    assert any(p["select"].get("nearest") is True for p in params)
    shift = pl.DataFrame({"layer": [1, 1], "measure": ["top-k set changed", "top-k overlap"], "value": [0.1, 0.9]})
    assert spec(charts.shift_chart(shift))["encoding"]["xOffset"]["field"] == "measure"
    spec(charts.convergence_chart(pl.DataFrame({"tokens": [10, 20], "jaccard": [0.5, 1.0]})))
    tt = pl.DataFrame({"label": ["law", "law"], "token_text": [" the", "\n"], "n": [5, 3], "mean_gate": [0.2, 0.1],
                       "share": [0.5, 1.0]})
    d = spec(charts.top_tokens_chart(tt))
    rows = [r["row"] for ds in d["datasets"].values() for r in ds]
    assert rows == ["law · ␣the", "law · ↵"] and d["encoding"]["y"]["sort"] == rows


def test_quick_chart_picks_a_sensible_view():
    heat = pl.DataFrame({"layer": [1, 1, 2], "expert": [0, 1, 0], "n": [3.0, 4.0, 5.0]})
    assert spec(charts.quick_chart(heat))["mark"]["type"] == "rect"
    bars = pl.DataFrame({"task": ["a", "b"], "tokens": [10, 20]})
    assert spec(charts.quick_chart(bars))["mark"]["type"] == "bar"
    assert charts.quick_chart(pl.DataFrame({"a": ["x"], "b": ["y"]})) is None
    assert charts.quick_chart(pl.DataFrame()) is None


def test_token_html_escapes_and_shows_k_experts():
    r = pl.DataFrame({"token_text": ["<b>", " x&y", None], "experts": [[3, 9], [9, 3], None],
                      "weights": [[0.7, 0.2], [0.6, 0.3], None], "top_expert": [3, 9, None]})
    h = charts.token_html(r)
    assert "&lt;b&gt;" in h and "<b>" not in h and "x&amp;y" in h
    assert 'title="e3: 0.700 | e9: 0.200"' in h and 'title="no routing recorded"' in h
    assert h.count('class="tok"') == 3
    assert charts.expert_color(3) != charts.expert_color(9)
    assert len({charts.expert_color(e) for e in range(64)}) == 64  # 64 distinct colours


def test_attribution_html_colours_by_sign():
    h = charts.attribution_html(["a", "<", "c"], [1.0, -0.5, 0.0], target=2)
    assert "rgba(22,163,74,1.00)" in h and "rgba(220,38,38,0.50)" in h
    assert "&lt;" in h and "border-bottom" in h


def test_linked_and_comparison_charts():
    m = pl.DataFrame({"task_a": ["a", "a", "b", "b"], "task_b": ["a", "b", "a", "b"], "shared": [4.0, 1.0, 1.0, 4.0]})
    d = spec(charts.task_matrix(m, "shared", "t"))
    assert any(p.get("name") == "pair" for ps in find(d, "params") for p in (ps if isinstance(ps, list) else [ps]))
    # 21 task pairs: 20 distinct colours, every pair in the legend
    pairs = pl.DataFrame({"task_a": [f"t{i}" for i in range(21)], "task_b": ["z"] * 21, "layer": [1] * 21,
                          "jaccard": [0.5] * 21})
    enc = spec(charts.jaccard_chart(pairs))["encoding"]["color"]
    assert enc["scale"]["scheme"] == "category20" and enc["legend"]["symbolLimit"] == 0
    pts = pl.DataFrame({"label": ["r1", "r2", "r3"], "method": ["ESFT-Token", "FFT", "random experts"],
                        "task": ["law"] * 3, "task score": [0.5, 0.6, 0.2], "task loss": [1.0, 0.9, 2.0],
                        "general loss rise": [0.1, 0.8, 0.3], "lr": [1e-3] * 3, "steps": [40] * 3,
                        "pareto": [True, True, False]})
    d = spec(charts.tradeoff_chart(pts))
    assert len(d["layer"]) == 2 and d["layer"][0]["mark"]["interpolate"] == "step-after"  # front + points
    assert d["layer"][1]["encoding"]["color"]["scale"]["domain"] == ["ESFT-Token", "FFT", "random experts"]
    assert len(spec(charts.tradeoff_chart(pts, "task loss"))["layer"]) == 1
    import vl_convert  # what the pages' SVG/PNG export buttons render with

    assert vl_convert.vegalite_to_svg(charts.tradeoff_chart(pts).to_json()).lstrip().startswith("<svg")
    lc = spec(charts.loss_chart(pl.DataFrame({"step": [1, 2], "loss": [2.0, 1.0], "elapsed": [0.5, 1.0],
                                              "run": ["a long run label"] * 2}), x="elapsed"))
    assert lc["layer"][0]["encoding"]["x"]["field"] == "elapsed"


def test_attribution_scale_ignores_the_target_and_has_a_legend():
    h = charts.attribution_html(["a", "b", "t"], [0.5, -0.25, 10.0], target=2)
    assert "rgba(22,163,74,1.00)" in h and "rgba(220,38,38,0.50)" in h  # context scaled on its own peak 0.5
    assert "colour scale" in h
