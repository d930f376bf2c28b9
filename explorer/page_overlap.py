"""Overlap: how much tasks share experts — shared top-k experts averaged over layers (paper Fig. 3), per-layer
Jaccard of the top-p selected sets, and the gate-weighted overlap of the routing distributions."""

import polars as pl
import streamlit as st

from explorer import charts, queries, state

st.title("Overlap")
model, tasks, lay = state.model_context()
metric, norm, p = state.score_controls("ov")
chosen = state.pick_tasks(tasks, "ov_tasks")
if len(chosen) < 2:
    if len(tasks) >= 2:
        st.info("Pick at least two tasks to compare.")
    else:
        st.info(f"Overlap compares tasks, and {model} has traces of {len(tasks)} task(s). Add a second one: record "
                "it on the **Runs** page (\"Record a new trace\", or `esft record --model M --data FILE --task NAME "
                "--db DB`), or import the authors' logs of another task (`esft import-official LOG_DIR --task NAME "
                "--db DB`).")
        st.page_link("explorer/page_runs.py", label="Record or import a task on Runs", icon=":material/database:")
    st.stop()
sc = state.scores(model, chosen, metric, norm)
k = st.slider("k (top experts per layer)", 1, max(lay["num_experts"], 1), min(lay["top_k"] or 6, lay["num_experts"]),
              key="ov_k", help="The paper's Figure 3 uses the top-6 experts of DeepSeek-V2-Lite")

c1, c2 = st.columns(2)
with c1:
    shared = queries.shared_topk(sc, k)
    ev = state.chart(charts.task_matrix(shared, "shared", f"Shared top-{k} experts (mean over layers)", fmt=".2f"),
                     key="ov_shared", on_select="rerun", export=f"overlap-shared-top{k}")
    st.caption(f"Diagonal = {k}. Off-diagonal values near {k} mean two tasks use the same experts. "
               "Click a cell to list the shared experts.")
with c2:
    wov = queries.weighted_overlap(sc)
    state.chart(charts.task_matrix(wov, "overlap", "Gate-weighted overlap Σ min(ŝa, ŝb)", fmt=".2f",
                                   scheme="purples"), export="overlap-gate-weighted")
    st.caption("Per layer, overlap of the two tasks' score distributions (1 = identical routing), averaged.")

pair = state.clicked(ev, "pair", ("task_a", "task_b"))
if pair:
    ta, tb = pair
    both = queries.shared_experts(sc, ta, tb, k)
    st.markdown(f"**{ta} × {tb}: {both.height} shared top-{k} experts** over {len(lay['layers'])} layers")
    if both.height:
        c1, c2 = st.columns([2, 1])
        c1.dataframe(both, hide_index=True, height=min(300, 36 + 35 * both.height))
        opts = [(int(r["layer"]), int(r["expert"])) for r in both.iter_rows(named=True)]
        pick = c2.selectbox("Expert", opts, format_func=lambda le: f"layer {le[0]}, expert {le[1]}", key="ov_open")
        if c2.button("Open on the Tokens page", key="ov_open_go", icon=":material/text_fields:"):
            st.session_state["focus_cell"] = pick
            st.switch_page("explorer/page_tokens.py")

st.subheader(f"Jaccard of selected sets per layer (top-p, p = {p:g})")
sel = queries.select_top_p(sc, p)
jac = queries.jaccard_by_layer(sel)
state.chart(charts.jaccard_chart(jac), export=f"overlap-jaccard-p{p:g}")
mean_j = jac.group_by(["task_a", "task_b"]).agg(mean_jaccard=pl.col("jaccard").mean().round(4)).sort("mean_jaccard",
                                                                                                    descending=True)
st.dataframe(mean_j, hide_index=True)
st.caption("Click a legend entry to highlight a pair. Low Jaccard = task-specific experts, what ESFT relies on.")
