"""Results: finished training runs side by side (task score, general retention, time, memory, adapter size), their
loss curves, and the routing shift before/after tuning on the same prompts (trained vs frozen experts), computed by a
background job. Everything comes from esft_core.runs (one reader of a run directory)."""

import polars as pl
import streamlit as st

from esft_core import jobs, runs
from explorer import charts, results, state

st.title("Results")
work = state.workdir()
all_runs = runs.list_runs(work)
if not all_runs:
    st.info("No training runs yet. Start one with the **Train** button on the Select & Train page.")
    st.page_link("explorer/page_select_train.py", label="Go to Select & Train", icon=":material/build:")
    st.stop()

status = st.multiselect("Status", ["complete", "failed", "stopped", "running"], default=["complete"],
                        key="res_status")
shown = [r for r in all_runs if r.status in status]
table = results.runs_table(shown)
if table.height:
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"adapter MB": st.column_config.NumberColumn(format="%.2f"),
                                "peak RSS MB": st.column_config.NumberColumn(format="%.0f"),
                                "s/step": st.column_config.NumberColumn(format="%.3f")})
    for r in shown:
        if r.status in ("failed", "stopped"):
            st.error(f"{r.name}: {r.status} — {r.error}")
            if st.button("Resume from the last checkpoint", key=f"res_resume_{r.name}"):
                jobs.resume_training(work, r.dir)
                st.rerun()
else:
    st.info("No runs with that status.")

untuned = {r.name: r.baseline for r in shown if r.baseline}
if untuned:
    st.caption("Untuned model on the same eval files: " + "; ".join(
        f"{k}: " + ", ".join(f"{c} {v:.4f}" for c, v in results.eval_rows(b).items() if v is not None)
        for k, b in list(untuned.items())[:3]))

curves = [pl.DataFrame(r.metrics).select("step", "loss").with_columns(run=pl.lit(r.name))
          for r in shown if r.metrics]
if curves:
    st.subheader("Training loss")
    state.chart(charts.loss_chart(pl.concat(curves)))

# ------------------------------------------------------------------------------------------------- routing shift
st.subheader("Routing shift after tuning")
done = [r for r in all_runs if r.status == "complete" and r.adapter_dir.is_dir()]
if not done:
    st.info("No completed run with an adapter yet.")
    st.stop()
pick = st.selectbox("Run", [r.name for r in done], key="res_shift_run")
r = next(x for x in done if x.name == pick)
n_prompts = st.slider("Prompts (first N examples of the task's eval data)", 2, 64, 8, key="res_shift_n")
shift_jobs = [j for j in jobs.list_jobs(work, "shift") if j.meta.get("run") == str(r.dir)]
running = next((j for j in shift_jobs if not j.done), None)

ready, why = state.model_ready(r.config.get("model", "demo"))
if not ready:
    st.warning(f"Base model not available: {why}")
elif running is None and st.button("Compute routing shift", key="res_shift_go"):
    running = jobs.start_routing_shift(work, r.dir, n_prompts)


@st.fragment(run_every=1.0 if running is not None else None)
def shift_panel():
    job = jobs.load_job(running.dir) if running is not None else None
    if job is not None and not job.done:
        state.job_box(job, show_log=False)
        return
    if job is not None and job.state == "failed":
        st.error(f"Routing shift failed: {job.error}")
    shift = runs.read_run(r.dir).routing_shift
    if not shift:
        return
    if job is not None and st.session_state.get("res_shift_seen") != job.id:
        st.session_state["res_shift_seen"] = job.id
        st.rerun(scope="app")  # stop polling
    st.caption(f"Same {shift['n']} prompts through the untuned model and the tuned one: `{shift['data']}`")
    df = pl.DataFrame(shift["rows"])
    state.chart(charts.shift_chart(df))
    if shift.get("trained") is not None:
        st.caption("ESFT freezes the routers, so routing only moves where tuned experts upstream change the hidden "
                   "states. 'weight on trained experts' = share of routed gate weight landing on the tuned experts.")
    else:
        st.caption(f"{r.config.get('method')} run: no expert selection, so only the top-k change is shown.")
    st.dataframe(df.pivot(on="measure", index="layer", values="value"), hide_index=True)


shift_panel()
