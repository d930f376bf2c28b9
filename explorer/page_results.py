"""Results: finished training runs side by side (task score, general retention, time, memory, adapter size), their
loss curves, and the routing shift before/after tuning on the same prompts (trained vs frozen experts), computed by a
background job. Everything comes from esft_core.workspace.runs (one reader of a run directory). The "Benchmark
results" view
shows a saved bench/compare_methods.py comparison instead (explorer/benchmarks.py shapes it)."""

from pathlib import Path

import polars as pl
import streamlit as st

from esft_core.errors import EsftError
from esft_core.workspace import jobs, launchers, runs
from explorer import benchmarks, charts, results, state

st.title("Results")
work = state.workdir()
all_runs = runs.list_runs(work)
view = st.radio("Compare", ["Your runs", "Benchmark results"], horizontal=True, key="res_view",
                help="Your training runs side by side, or a saved method comparison (bench/compare_methods.py)")

# ---------------------------------------------------------------------------------------------- benchmark results
if view == "Benchmark results":
    st.subheader("Benchmark results")
    st.caption("The method comparison `bench/compare_methods.py` saves (`compare_methods*.json`): every method's lr "
               "chosen on a validation split, scores on the eval split with two-level bootstrap 95% CIs.")
    folder = st.text_input("Results folder", str(benchmarks.RESULTS_DIR), key="bench_dir")
    files = benchmarks.list_files(folder)
    if not files:
        st.info(f"No `compare_methods*.json` in `{folder}`. Run `python bench/compare_methods.py --quick`.")
        st.stop()
    loaded = {str(f): benchmarks.load(f) for f in files}
    pick = st.selectbox("Results file (newest first)", list(loaded), key="bench_file",
                        format_func=lambda f: benchmarks.label(f, loaded[f][0]))
    data, warning = loaded[pick]
    if data is None:
        st.warning(warning)
        st.stop()
    for note in benchmarks.notes(data):
        st.info(note)
    st.caption(benchmarks.describe(data))
    b_methods = benchmarks.methods(data)
    scores = benchmarks.score_table(data)
    st.markdown("**Task score per method** (at each method's chosen lr, every seed)")
    if scores.height:
        state.chart(charts.score_ci_chart(scores, benchmarks.task_order(scores), b_methods),
                    export=f"bench-scores-{Path(pick).stem}")
    else:
        st.info("This file has no per-method scores ('means').")

    st.markdown("**Trade-off: task score vs general-loss rise** (every method × lr × swept setting, first seed)")
    b_tasks = benchmarks.tasks(data)
    c1, c2 = st.columns([1, 1])
    on = c1.selectbox("Task", ["mean over tasks", *b_tasks], key="bench_task")
    task = None if on == "mean over tasks" else on
    pts = benchmarks.points(data, task)
    mine = c2.toggle("Add my runs on this task", key="bench_mine", disabled=task is None or not all_runs,
                     help="Your finished runs from the Runs list evaluated on this task (their own untuned "
                          "baseline and eval size, so a rough comparison)")
    if mine and task is not None:
        pts = benchmarks.with_user_runs(pts, results.runs_table(all_runs), task)
    rise = benchmarks.with_rise(pts)
    if rise.height:
        state.chart(charts.tradeoff_chart(rise, order=b_methods), export=f"bench-tradeoff-{Path(pick).stem}")
        st.caption("Dashed = Pareto front (no other point scores higher for less forgetting); the rise is over "
                   f"the untuned model's ('{benchmarks.BASELINE}') general held-out loss.")
    else:
        st.info("No trade-off points: the file's rows lack eval scores, general losses or the untuned baseline.")

    pp = benchmarks.params_points(pts)
    if pp.height:
        swept = benchmarks.swept(data)
        state.chart(charts.params_chart(pp, swept, b_methods), export=f"bench-params-{Path(pick).stem}")
        st.caption("Dashed = front over trainable parameters (no other point scores higher with fewer)"
                   + (f"; swept: {', '.join(swept)}" if swept else "") + ".")

    st.markdown("**Learning-rate sweep** (first seed, mean over tasks, validation split; the ticked row is the lr "
                "chosen)")
    sweep = benchmarks.lr_sweep(data)
    if sweep.height:
        st.dataframe(sweep, hide_index=True, key="bench_sweep", column_config={
            "lr": st.column_config.NumberColumn(format="%.0e"),
            "validation score": st.column_config.NumberColumn(format="%.3f"),
            "validation general loss": st.column_config.NumberColumn(format="%.3f"),
            "chosen": st.column_config.CheckboxColumn()})
    else:
        st.info("No learning-rate sweep in this file (lrs fixed, or an older format).")
    st.markdown("**Paired comparisons** (bootstrap; p two-sided; significant = p < 0.05)")
    comp = benchmarks.comparisons(data)
    if comp.height:
        st.dataframe(comp, hide_index=True, key="bench_comp", column_config={
            c: st.column_config.NumberColumn(format="%.4f") for c in ("value", "lo", "hi", "p")})
    else:
        st.info("No paired comparisons in this file.")
    st.stop()

if not all_runs:
    st.info("No training runs yet. Start one with the **Train** button on the Select & Train page, or look at "
            "**Benchmark results** above.")
    st.page_link("explorer/page_select_train.py", label="Go to Select & Train", icon=":material/build:")
    st.stop()

status = st.multiselect("Status", ["complete", "stopped", "failed", "running"],
                        default=["complete", "stopped", "failed", "running"], key="res_status")
candidates = [r for r in all_runs if r.status in status]
labels = {r.name: f"{r.label} ({r.method_label}, {r.task}, {r.status})" for r in candidates}
picked = st.multiselect("Runs to compare", list(labels), default=list(labels)[:8], format_func=labels.get,
                        key="res_runs", help="Newest first; the first 8 are shown by default")
shown = [r for r in candidates if r.name in picked]
if not shown:
    st.info("No runs picked.")
    st.stop()
table = results.runs_table(shown)
# the standalone evaluations the table was built from: an eval job that finishes while this page runs writes one the
# table has not seen, and the panel below then refreshes the page instead of showing the two out of step
table_evals = {r.name: set(r.extra_evals) for r in shown}
group = st.toggle("Group by method (mean of the runs)", key="res_group")
view = table
if group and table.height:
    num = [c for c in table.columns if table[c].dtype.is_numeric()]
    view = table.group_by("method").agg(pl.len().alias("runs"), *[pl.col(c).mean() for c in num]).sort("method")
st.dataframe(view, hide_index=True, width="stretch",
             column_config={"label": st.column_config.TextColumn(pinned=True),
                            "task score": st.column_config.NumberColumn(format="%.4f"),
                            "task loss": st.column_config.NumberColumn(format="%.4f"),
                            "general loss": st.column_config.NumberColumn(format="%.4f"),
                            "general loss rise": st.column_config.NumberColumn(format="%+.4f"),
                            "lr": st.column_config.NumberColumn(format="%.0e"),
                            "adapter MB": st.column_config.NumberColumn(format="%.2f"),
                            "peak RSS MB": st.column_config.NumberColumn(format="%.0f"),
                            "s/step": st.column_config.NumberColumn(format="%.3f")})
st.download_button("Download table (CSV)", view.write_csv(), file_name="esft-runs-comparison.csv", mime="text/csv",
                   key="res_csv")
base = results.baselines_table(shown)
if base.height:
    st.caption("Untuned model on the same eval files (the 'rise' is measured against it):")
    st.dataframe(base, hide_index=True)

for r in shown:
    if r.status in ("failed", "stopped"):
        box = st.warning if r.status == "stopped" else st.error
        at_step = int(r.run.get("step") or (r.metrics[-1]["step"] if r.metrics else 0))
        box(f"{r.label}: **{r.status}** at step {at_step} — {r.error}. The last checkpoint is kept.")
        c1, c2 = st.columns([1, 3])
        planned = int(r.config.get("steps") or at_step + 1)
        total = c1.number_input("Total steps", at_step + 1, 10_000_000, max(planned, at_step + 1),
                                key=f"res_resume_steps_{r.name}", help="Resume to the planned step count or extend it")
        c2.write("")
        if c2.button(f"Resume {r.label} from the last checkpoint", key=f"res_resume_{r.name}"):
            launchers.resume_training(work, r.dir, steps=int(total) if int(total) != planned else None)
            st.rerun()

# -------------------------------------------------------------------------------------------------- trade-off chart
st.subheader("Trade-off: task gain against forgetting")
pts = results.tradeoff(table)
if pts.height:
    c1, c2 = st.columns(2)
    with c1:
        state.chart(charts.tradeoff_chart(pts, "task score"), export="tradeoff-task-score")
    with c2:
        state.chart(charts.tradeoff_chart(pts, "task loss"), export="tradeoff-task-loss")
    st.caption("One point per run; x = rise of the general held-out loss over the untuned model (the paper's "
               "'general ability' cost), dashed = Pareto front (no other run scores higher for less forgetting). "
               "Chart menu (⋯): save as SVG/PNG.")
else:
    st.info("The trade-off chart needs runs evaluated with the task's eval data and the general held-out set.")

# ---------------------------------------------------------------------------------------------------- loss curves
curves = [pl.DataFrame(r.metrics).select("step", "loss", *(["elapsed"] if "elapsed" in r.metrics[0] else []))
          .with_columns(run=pl.lit(r.label)) for r in shown if r.metrics]
if curves:
    st.subheader("Training loss")
    c1, c2 = st.columns([1, 2])
    x = c1.radio("x axis", ["step", "elapsed"], horizontal=True, key="res_x",
                 format_func={"step": "step", "elapsed": "time (s)"}.get)
    alpha = c2.slider("Smoothing (exponential moving average)", 0.0, 0.95, 0.0, 0.05, key="res_smooth")
    df = pl.concat(curves, how="diagonal_relaxed")
    if x == "elapsed" and "elapsed" not in df.columns:
        x = "step"
    state.chart(charts.loss_chart(results.smooth(df, alpha), x=x), export=f"training-loss-{x}")

# ----------------------------------------------------------------------------------------------- manage the runs
with st.expander("Rename, tag, annotate or delete a run"):
    target = st.selectbox("Run", [r.name for r in shown], format_func=labels.get, key="res_edit_run")
    tr = next(r for r in shown if r.name == target)
    with st.form(f"res_edit_{target}"):
        label = st.text_input("Label", tr.notes.get("label") or "", max_chars=80, placeholder=tr.name)
        tags = st.text_input("Tags (comma-separated)", ", ".join(tr.notes.get("tags") or []))
        notes = st.text_area("Notes", tr.notes.get("notes") or "")
        if st.form_submit_button("Save"):
            try:
                runs.annotate(tr.dir, label=label, tags=tags.split(","), notes=notes)
                st.rerun()
            except EsftError as e:
                st.error(str(e))
    confirm = st.checkbox(f"I want to delete {tr.label} and its checkpoints", key=f"res_del_ok_{target}")
    if st.button("Delete run", key=f"res_del_{target}", disabled=not confirm):
        try:
            runs.delete_run(tr.dir)
            st.rerun()
        except EsftError as e:
            st.error(str(e))

# ------------------------------------------------------------------------------------------------- routing shift
st.subheader("Routing shift after tuning")
done = [r for r in all_runs if r.status == "complete" and r.adapter_dir.is_dir()]
if not done:
    st.info("No completed run with an adapter yet.")
    st.stop()
pick = st.selectbox("Run", [r.name for r in done], format_func=lambda n: runs.read_run(work / "runs" / n).label,
                    key="res_shift_run")
r = next(x for x in done if x.name == pick)
n_prompts = st.slider("Prompts (first N examples of the task's eval data)", 2, 64, 8, key="res_shift_n")
shift_jobs = [j for j in jobs.list_jobs(work, "shift") if j.meta.get("run") == str(r.dir)]
running = next((j for j in shift_jobs if not j.done), None)

ready, why = state.model_ready(r.config.get("model", "demo"))
if not ready:
    st.warning(f"Base model not available: {why}")
elif running is None and st.button("Compute routing shift", key="res_shift_go"):
    running = launchers.start_routing_shift(work, r.dir, n_prompts)


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
    state.chart(charts.shift_chart(df), export=f"routing-shift-{pick}")
    if shift.get("trained") is not None:
        st.caption("ESFT freezes the routers, so routing only moves where tuned experts upstream change the hidden "
                   "states. 'weight on trained experts' = share of routed gate weight landing on the tuned experts.")
    else:
        st.caption(f"{r.config.get('method')} run: no expert selection, so only the top-k change is shown.")
    st.dataframe(df.pivot(on="measure", index="layer", values="value"), hide_index=True)


shift_panel()

# ------------------------------------------------------------------------------------- evaluate on more examples
st.subheader("Evaluate a finished run on more examples")
st.caption("Training evaluates on a few examples per file (`eval_limit`); this runs `esft eval` with the run's adapter "
           "on its eval files in a background job. The largest evaluation shows in the table above as the "
           "'more-examples' columns.")
c1, c2, c3 = st.columns([2, 1, 1])
ev_pick = c1.selectbox("Run", [x.name for x in done], format_func=lambda n: runs.read_run(work / "runs" / n).label,
                       key="res_eval_run")
er = next(x for x in done if x.name == ev_pick)
n_ex = c2.number_input("Examples per eval file", 1, 1_000_000, 4 * int(er.config.get("eval_limit") or 32),
                       key=f"res_eval_n_{ev_pick}")
eval_jobs = [j for j in jobs.list_jobs(work, "eval") if j.meta.get("run") == str(er.dir)]
ev_running = next((j for j in eval_jobs if not j.done), None)
ev_ready, ev_why = state.model_ready(er.config.get("model", "demo"))
c3.write("")
if not ev_ready:
    st.warning(f"Base model not available: {ev_why}")
elif ev_running is None and c3.button("Evaluate on more examples", key="res_eval_go"):
    try:
        ev_running = launchers.start_eval(work, er.dir, int(n_ex))
    except EsftError as e:
        st.error(str(e))


@st.fragment(run_every=1.0 if ev_running is not None else None)
def eval_panel():
    job = jobs.load_job(ev_running.dir) if ev_running is not None else (eval_jobs[0] if eval_jobs else None)
    if job is not None and not job.done:
        state.job_box(job, show_log=False)
        return
    if job is not None and job.state == "failed":
        st.error(f"Evaluation failed: {job.error}")
    extra = runs.read_run(er.dir).extra_evals
    if ev_running is not None or (er.name in table_evals and set(extra) != table_evals[er.name]):
        st.rerun(scope="app")  # finished while polling (or while this page ran): refresh the table, stop the timer
    if extra:
        st.dataframe(pl.DataFrame([{"examples per file": n, **results.eval_rows(ev)} for n, ev in extra.items()],
                                  strict=False), hide_index=True)


eval_panel()
