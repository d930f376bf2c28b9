"""Tokens: a sample's tokens coloured by their top expert at a layer (hover: the K experts and gate weights), and for
one (layer, expert): its top tokens and example contexts per task."""

import html

import polars as pl
import streamlit as st

from explorer import charts, queries, state

st.title("Tokens")
model, tasks, lay = state.model_context()
layers = lay["layers"]

# ------------------------------------------------------------------------------------------------ a sample's routing
st.subheader("Routing of one sample")
c1, c2, c3 = st.columns([1, 2, 1])
run_id, sid = state.pick_sample(c1, c2, model, tasks, "tok", 300)
layer = c3.selectbox("Layer", layers, key="tok_layer")
routes = state.query(queries.sample_routes, run_id, sid, layer, 1024)
st.html(charts.token_html(routes))
# position 0 is the BOS token, routed the same way in every sample: it must not pick the default expert
top = routes.filter(pl.col("position") > 0)["top_expert"].drop_nulls()
counts = top.value_counts(sort=True).head(12)
st.caption("Background = the token's top-1 expert at this layer; hover a token for its K experts and gate weights. "
           "Most frequent top experts in this sample:")
st.html(charts.legend_html([int(e) for e in counts[counts.columns[0]].to_list()]))
if routes.height >= 1024:
    st.caption("Showing the first 1,024 tokens.")

# from a token to its experts: pick a position, open one of its K experts below
with st.expander("A token's experts", expanded=False):
    pos_labels = {r["position"]: f"{r['position']}: {charts.visible_token(r['token_text'])}"
                  for r in routes.iter_rows(named=True)}
    pos = st.selectbox("Token", list(pos_labels), index=min(1, len(pos_labels) - 1), format_func=pos_labels.get,
                       key=f"tok_pos_{run_id}_{sid}")
    row = routes.filter(pl.col("position") == pos).row(0, named=True) if pos is not None else {}
    cols = st.columns(max(len(row.get("experts") or []), 1))
    for col, e, w in zip(cols, row.get("experts") or [], row.get("weights") or [], strict=False):
        if col.button(f"expert {e} · gate {w:.3f}", key=f"tok_open_{pos}_{e}"):
            st.session_state["focus_cell"] = (layer, int(e))
            st.rerun()

# ------------------------------------------------------------------------------------------------ one expert's view
st.subheader("What one expert does")
counts_top = top.value_counts(sort=True)
default_layer, default_expert = st.session_state.get(
    "focus_cell", (layer, int(counts_top[counts_top.columns[0]][0]) if len(top) else 0))
if st.session_state.get("tok_focus_applied") != st.session_state.get("focus_cell"):
    # a click elsewhere (Specialization, Overlap, a token above) sets focus_cell: it overrides the widgets once
    st.session_state["tok_focus_applied"] = st.session_state.get("focus_cell")
    if "focus_cell" in st.session_state:
        st.session_state["tok_e_layer"], st.session_state["tok_expert"] = default_layer, int(default_expert)
if st.session_state.get("tok_e_layer") not in layers:
    st.session_state["tok_e_layer"] = default_layer if default_layer in layers else layers[0]
st.session_state.setdefault("tok_expert", int(default_expert))
d1, d2, d3 = st.columns([1, 1, 2])
e_layer = d1.selectbox("Layer ", layers, key="tok_e_layer")  # values come from session state (set above)
expert = d2.number_input("Expert", 0, max(lay["num_experts"] - 1, 0), key="tok_expert")
which = state.pick_tasks(tasks, "tok_e_tasks", "Tasks ", container=d3)
run_ids = {t: state.query(queries.latest_run, model, t) for t in which}
tt = state.query(queries.top_tokens, [r for r in run_ids.values() if r is not None], e_layer, int(expert), 12)
if tt is None or tt.height == 0:
    st.info(f"Expert {expert} of layer {e_layer} was never selected in these tasks.")
else:
    names = {r: t for t, r in run_ids.items()}
    tt = tt.with_columns(label=pl.col("run_id").replace_strict(names, default=None))
    state.chart(charts.top_tokens_chart(tt), export=f"top-tokens-L{e_layer}-E{expert}")
    st.caption("Bar colour: share of all uses of that token (at this layer) routed to this expert — 1.0 means the "
               "expert owns the token.")
for t, r in run_ids.items():
    if r is None:
        continue
    ctx = state.query(queries.expert_contexts, r, e_layer, int(expert), 5, 8, 8192)
    with st.expander(f"{t}: example contexts ({0 if ctx is None else ctx.height})", expanded=False):
        if ctx is None or ctx.height == 0:
            st.write("No occurrences in the first 8,192 tokens of this trace.")
        for row in (ctx.iter_rows(named=True) if ctx is not None else []):
            st.html(f'<div style="font-family:monospace;white-space:pre-wrap">…{html.escape(row["left"])}'
                    f'<mark title="gate {row["weight"]:.3f}"><b>{html.escape(row["token"])}</b></mark>'
                    f'{html.escape(row["right"])}… <small>(sample {row["sample_id"]}, pos {row["position"]}, '
                    f'gate {row["weight"]:.3f})</small></div>')
