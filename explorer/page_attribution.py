"""Attribution: which input tokens drive an expert's router logit at one position (captum Layer Integrated Gradients
on the input embeddings), shown as highlighted text."""

import polars as pl
import streamlit as st

from esft_core.files import read_json
from esft_core.workspace import jobs, launchers
from explorer import charts, queries, state

st.title("Attribution")
st.caption("Integrated gradients from a baseline (all tokens → pad) to the sample, on the input embeddings, of the "
           "router logit of one expert at one position. Green tokens push that expert's logit up, red push it down.")
model_name = state.pick_model()
if model_name is None:
    st.stop()
tasks = state.query(queries.tasks, model_name)
lay = state.query(queries.model_layout, model_name)
ready, why = state.model_ready(model_name)
if not ready:
    st.warning(f"The traced model '{model_name}' cannot be loaded here: {why}. Attribution needs the model itself.")
    st.stop()

c1, c2, c3, c4 = st.columns([1, 2, 1, 1])
run_id, sid = state.pick_sample(c1, c2, model_name, tasks, "att", 200)
layer = c3.selectbox("Layer", lay["layers"], key="att_layer")
routes = state.query(queries.sample_routes, run_id, sid, layer, 256)
# Default expert: the one that wins most positions of this sample at this layer.
top = routes["top_expert"].drop_nulls()
default_e = int(top.mode().sort()[0]) if len(top) else 0
expert = c4.number_input("Expert", 0, max(lay["num_experts"] - 1, 0), default_e, key=f"att_expert_{sid}_{layer}")
weights = routes.with_columns(
    w=pl.struct("experts", "weights").map_elements(
        lambda r: next((w for e, w in zip(r["experts"] or [], r["weights"] or [], strict=False) if e == expert),
                       0.0), return_dtype=pl.Float64))
best = int(weights.sort("w", descending=True)["position"][0]) if weights.height else 0
target = st.slider("Target position (whose router logit is explained)", 0, max(routes.height - 1, 0),
                   min(best, max(routes.height - 1, 0)), key=f"att_target_{sid}_{layer}_{expert}",
                   help="Defaults to the position where this expert gets its highest gate weight in the sample "
                        "(first 256 tokens).")
tok_at = routes["token_text"][target] if routes.height else ""
st.markdown(f"Explaining layer **{layer}**, expert **{expert}** at position **{target}** "
            f"(token `{charts.visible_token(tok_at)}`).")
steps = st.select_slider("Integration steps", [16, 32, 64, 128], 64, key="att_steps",
                         help="More steps → smaller completeness error (δ), slower.")

ids = state.query(queries.sample_token_ids, run_id, sid, target + 1)
work = state.workdir()
req = launchers.AttributionRequest(model_name, [int(i) for i in ids], int(layer), int(expert), int(target), int(steps))
out = req.path(work)
running = next((j for j in jobs.list_jobs(work, "attribution") if j.meta.get("out") == str(out) and not j.done), None)
if running is None and st.button("Compute attribution", type="primary", key="att_go"):
    running = launchers.start_attribution(work, req)
    st.session_state["att_job"] = str(running.dir)
last = st.session_state.get("att_job")
job_dir = running.dir if running is not None else (last if last and jobs.load_job(last).meta.get("out") == str(out)
                                                   else None)


@st.fragment(run_every=1.0 if running is not None else None)
def result_panel():
    job = jobs.load_job(job_dir) if job_dir is not None else None
    if job is not None and not job.done:
        state.job_box(job, show_log=False)
        return
    if job is not None and job.state == "failed":
        st.error(f"Attribution failed: {job.error}")
    res = read_json(out)
    if not res:
        st.info("Press **Compute attribution**: a background job loads the model and integrates the gradients "
                "(a few seconds on the demo model).")
        return
    if running is not None:
        st.rerun(scope="app")  # finished while polling: rerun once without the timer
    m1, m2, m3 = st.columns(3)
    m1.metric("Router logit", f"{res['logit']:.3f}")
    m2.metric("Baseline logit", f"{res['baseline_logit']:.3f}")
    change = abs(res["logit"] - res["baseline_logit"])
    rel = res["delta"] / change if change > 1e-9 else 0.0
    m3.metric("Completeness error δ", f"{res['delta']:.4f}", f"{rel:.1%} of the logit change", delta_color="off",
              help="|Σ attributions − (logit − baseline)|; integrated gradients are trusted below 5 %")
    if rel > 0.05:
        st.warning(f"δ is {rel:.1%} of the logit change, above the 5 % at which the attributions are trusted: "
                   "raise the integration steps.")
    st.html(charts.attribution_html(res["tokens"], res["scores"], res["target"]))
    df = pl.DataFrame({"position": list(range(len(res["tokens"]))),
                       "token": [charts.visible_token(t) for t in res["tokens"]], "attribution": res["scores"]})
    st.dataframe(df.sort(pl.col("attribution").abs(), descending=True).head(15), hide_index=True)


result_panel()
