"""Results: finished training runs side by side (task score, general retention, time, memory, adapter size), their
loss curves, and the routing shift before/after tuning on the same prompts (trained vs frozen experts)."""

import json
from pathlib import Path

import polars as pl
import streamlit as st

from esft_core import jobs
from explorer import charts, results, state

st.title("Results")
work = state.workdir()
runs = results.training_runs(work)
if not runs:
    st.info("No training runs yet. Start one with the **Train** button on the Select & Train page.")
    st.page_link("explorer/page_select_train.py", label="Go to Select & Train", icon=":material/build:")
    st.stop()

# Peak memory comes from the job that ran the training (the runner records its peak RSS).
baselines, peaks = {}, {}
for r in runs:
    job_file = Path(r["dir"] + ".job")
    if job_file.is_file():
        job = jobs.load_job(job_file.read_text().strip())
        peaks[r["name"]] = job.status.get("peak_rss")
        r["meta"] = {**job.meta, **r["meta"]}
        if job.meta.get("baseline"):
            baselines[r["name"]] = state.read_json(job.meta["baseline"])
    if peaks.get(r["name"]):
        r["run"] = {**r["run"], "peak_rss": peaks[r["name"]]}

status = st.multiselect("Status", ["complete", "failed", "running"], default=["complete"], key="res_status")
shown = [r for r in runs if r["run"].get("status") in status]
table = results.runs_table(shown, baselines)
if table.height:
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"adapter MB": st.column_config.NumberColumn(format="%.2f"),
                                "peak RSS MB": st.column_config.NumberColumn(format="%.0f"),
                                "s/step": st.column_config.NumberColumn(format="%.3f")})
    for r in shown:
        if r["run"].get("status") == "failed":
            st.error(f"{r['name']}: {r['run'].get('error')}")
else:
    st.info("No runs with that status.")

untuned = {k: v for k, v in baselines.items() if v}
if untuned:
    st.caption("Untuned model on the same eval files: " + "; ".join(
        f"{k}: " + ", ".join(f"{c} {v:.4f}" for c, v in results.eval_rows(b).items() if v is not None)
        for k, b in list(untuned.items())[:3]))

curves = [pl.DataFrame(r["metrics"]).select("step", "loss").with_columns(run=pl.lit(r["name"]))
          for r in shown if r["metrics"]]
if curves:
    st.subheader("Training loss")
    state.chart(charts.loss_chart(pl.concat(curves)))

# ------------------------------------------------------------------------------------------------- routing shift
st.subheader("Routing shift after tuning")
done = [r for r in runs if r["run"].get("status") == "complete" and (Path(r["dir"]) / "adapter").is_dir()]
if not done:
    st.info("No completed run with an adapter yet.")
    st.stop()
pick = st.selectbox("Run", [r["name"] for r in done], key="res_shift_run")
r = next(x for x in done if x["name"] == pick)
run = r["run"]
data_file = r["meta"].get("eval_data") or (run.get("config") or {}).get("eval_data") or [run.get("data")]
data_file = next((f for f in data_file if f and Path(f).is_file() and "general" not in Path(f).parts), run.get("data"))
n_prompts = st.slider("Prompts (first N examples of the task's eval data)", 2, 64, 8, key="res_shift_n")
st.caption(f"Same prompts through the untuned model and the tuned one: `{data_file}`")


@st.cache_data(show_spinner="Routing the prompts through both models…", max_entries=8)
def shift(run_dir: str, model: str, data: str, n: int, mtime: float) -> tuple[list[dict], dict | None]:
    from esft_core.attribution import routing_shift
    from esft_core.data import encode_record, read_records
    from esft_core.evaluate import load_for_eval
    from esft_core.models import load_model

    base, tok = load_model(model)
    tuned, _, kind = load_for_eval(model, run_dir)
    ids = [encode_record(rec, tok)[0][:256] for rec in read_records(data, limit=n)]
    cfg_path = Path(run_dir) / "adapter" / "expert_cfg.json"
    trained = None
    if cfg_path.is_file():
        trained = {int(k): v for k, v in json.loads(cfg_path.read_text()).get("experts", {}).items()}
    return routing_shift(base, tuned, ids, trained), trained


ready, why = state.model_ready(run.get("model", "demo"))
if not ready:
    st.warning(f"Base model not available: {why}")
elif st.button("Compute routing shift", key="res_shift_go") or st.session_state.get("res_shift_for") == pick:
    st.session_state["res_shift_for"] = pick
    rows, trained = shift(r["dir"], run.get("model", "demo"), str(data_file), n_prompts,
                          (Path(r["dir"]) / "run.json").stat().st_mtime)
    df = pl.DataFrame(rows)
    state.chart(charts.shift_chart(df))
    if trained is not None:
        st.caption("ESFT freezes the routers, so routing only moves where tuned experts upstream change the hidden "
                   "states. 'weight on trained experts' = share of routed gate weight landing on the tuned experts.")
    else:
        st.caption(f"{run.get('method')} run: no expert selection, so only the top-k change is shown.")
    st.dataframe(df.pivot(on="measure", index="layer", values="value"), hide_index=True)
