"""Specialization: layer × expert score heatmap of a task, concentration curves with their spread over layers (paper
Fig. 2) and the number of experts the top-p rule needs per layer."""

import polars as pl
import streamlit as st

from explorer import charts, queries, state

st.title("Specialization")
model, tasks, lay = state.model_context()
st.caption(f"{model}: {len(lay['layers'])} MoE layers × {lay['num_experts']} routed experts, top-{lay['top_k']}.")

metric, norm, p = state.score_controls("spec")
chosen = state.pick_tasks(tasks, "spec_tasks")
if not chosen:
    st.info("Pick at least one task.")
    st.stop()
sc = state.scores(model, chosen, metric, norm)

# --------------------------------------------------------------------------------------------------------- heatmap
st.subheader("Score per layer and expert")
focus = state.pick_task(st, chosen, "spec_focus", "Heatmap task")
sel = queries.select_top_p(sc, p)
one = sel.filter(pl.col("task") == focus)
picked = one.filter(pl.col("selected")).select("layer", "expert")
event = state.chart(charts.score_heatmap(one, title=f"{focus}: {metric} score ({norm}-normalised); "
                                         f"outlined = selected at p = {p:g}", selected=picked),
                    key="spec_heatmap", on_select="rerun", export=f"{focus}-{metric}-heatmap")
cell = state.clicked_cell(event)
if cell:
    layer, expert = cell
    st.session_state["focus_cell"] = (layer, expert)
    row = one.filter((pl.col("layer") == layer) & (pl.col("expert") == expert))
    c1, c2 = st.columns([1, 2])
    c1.metric(f"Layer {layer}, expert {expert}", f"{row['score'][0]:.4f}", help="score of the clicked cell")
    c1.caption(f"rank {row['rank'][0]} in its layer; {'selected' if row['selected'][0] else 'not selected'} "
               f"at p = {p:g}")
    toggles: set = st.session_state.setdefault(f"sel_toggles_{focus}", set())
    flipped = (layer, expert) in toggles
    if c1.button("Undo the change to the training selection" if flipped else
                 ("Remove from" if row["selected"][0] else "Add to") + " the training selection",
                 key=f"spec_toggle_{layer}_{expert}"):
        toggles ^= {(layer, expert)}
        st.rerun()
    if toggles:
        c1.caption(f"{len(toggles)} expert(s) of {focus} changed by hand; see **Select & Train**.")
    run_ids = [state.query(queries.latest_run, model, t) for t in chosen]
    tt = state.query(queries.top_tokens, [r for r in run_ids if r is not None], layer, expert, 8)
    names = {r: t for r, t in zip(run_ids, chosen, strict=True)}
    if tt is not None and tt.height:
        c2.dataframe(tt.with_columns(task=pl.col("run_id").replace_strict(names, default=None),
                                     token=pl.col("token_text").map_elements(charts.visible_token,
                                                                             return_dtype=pl.Utf8))
                     .select("task", "token", "n", "mean_gate", "share"), hide_index=True, height=230)
    c2.page_link("explorer/page_tokens.py", label="Open this expert on the Tokens page", icon=":material/text_fields:")
else:
    st.caption("Click a cell to see the expert's top tokens (double-click clears).")

# --------------------------------------------------------------------------------------------------- concentration
st.subheader("Concentration: cumulative score of the top experts")
conc = queries.concentration(sc)
spread = queries.concentration_spread(conc)
max_n = st.slider("Show top n experts", 2, max(lay["num_experts"], 2), min(lay["num_experts"], 24), key="spec_maxn")
state.chart(charts.concentration_chart(conc, spread, p, max_n), export=f"concentration-{metric}")
st.caption("Thin lines: one per layer (hover to highlight); band: 25–75 % of layers; thick: mean over layers; "
           "dashed: p. A curve that rises steeply means a few experts carry the task in that layer.")

# --------------------------------------------------------------------------------------------------- experts needed
st.subheader(f"Experts needed to reach p = {p:g}")
need = queries.experts_needed(sc, p)
state.chart(charts.experts_needed_chart(need, p), export=f"experts-needed-p{p:g}")
summary = need.group_by("task").agg(mean=pl.col("n_experts").mean().round(2), min=pl.col("n_experts").min(),
                                    max=pl.col("n_experts").max(), total=pl.col("n_experts").sum()).sort("task")
st.dataframe(summary.with_columns(share=(pl.col("total") / (len(lay["layers"]) * max(lay["num_experts"], 1)))
                                  .round(4)), hide_index=True)
