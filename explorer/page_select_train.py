"""Select & Train: choose the experts to tune (metric, p, contrast and stability views, per-layer editing), see what
that costs, download expert_cfg.json, and train (ESFT, or FFT/LoRA for comparison) as a background job with live
loss; on completion compare the evaluation with the untuned model."""

import time

import polars as pl
import streamlit as st

from esft_core.errors import EsftError
from esft_core.experts.expert_config import ExpertConfig
from esft_core.files import read_metrics
from esft_core.tuning.registry import methods
from esft_core.workspace import jobs, launchers, runs
from explorer import charts, queries, results, state

st.title("Select & Train")
model, tasks, lay = state.model_context()
work = state.workdir()
files = state.task_files()
launchers.ensure_standby(work)  # a warm runner makes Train → first loss point several seconds faster

task = state.pick_task(st, tasks, "sel_task", "Task to tune", prefer="law")  # the demo task where ESFT shows fastest
metric, norm, p = state.score_controls("sel", default_metric="token")
sc = state.scores(model, tasks, metric, norm)

# on_change="rerun" tracks the open tab, so the bootstrap of the Stability tab only runs when it is open
tab_sel, tab_con, tab_stab = st.tabs(["Top-p selection", "Contrast", "Stability"], key="sel_tabs", on_change="rerun")
# Clicked cells toggle experts on top of the automatic selection: {(layer, expert)} per selection parameters.
tog_key = f"sel_toggles_{task}"  # shared with the Specialization page's "toggle in the selection" button
toggles: set = st.session_state.setdefault(tog_key, set())
n_clicks = st.session_state.setdefault("sel_clicks", 0)


def toggled(sel: pl.DataFrame) -> pl.DataFrame:
    """`sel` with the clicked cells flipped in its `selected` column."""
    if not toggles:
        return sel
    flip = pl.DataFrame([{"layer": a, "expert": b} for a, b in toggles],
                        schema={"layer": sel.schema["layer"], "expert": sel.schema["expert"]}).with_columns(
        _flip=pl.lit(True))
    return sel.join(flip, on=["layer", "expert"], how="left").with_columns(
        selected=pl.col("selected") ^ pl.col("_flip").fill_null(False)).drop("_flip")


with tab_sel:
    base_sel = toggled(queries.select_top_p(sc.filter(pl.col("task") == task), p))
    ev = state.chart(charts.score_heatmap(base_sel, title=f"{task}: {metric} score, outlined = selected (p = {p:g})",
                                          selected=base_sel.filter(pl.col("selected")).select("layer", "expert")),
                     key=f"sel_heat_{n_clicks}", on_select="rerun", export=f"{task}-selection-{metric}-p{p:g}")
    cell = state.clicked_cell(ev)
    if cell:  # toggle, then redraw the chart under a new key so the same cell can be clicked again
        toggles ^= {cell}
        st.session_state["sel_clicks"] = n_clicks + 1
        st.rerun()
    st.caption("Click a cell to add or remove that expert from the selection (outlined = selected)."
               + (f" {len(toggles)} cell(s) changed by hand." if toggles else ""))
    if toggles and st.button("Undo clicked changes", key="sel_untoggle"):
        toggles.clear()
        st.rerun()
with tab_con:
    others = [t for t in tasks if t != task]
    against = st.multiselect("Contrast against", others, default=others, key=f"sel_against_{task}",
                             help="Prefer experts this task uses more than the contrast tasks do")
    lam = st.number_input("Contrast weight λ", 0.0, 10.0, 1.0, 0.1, key="sel_lambda",
                          help="c = max(0, s_task − λ·s_contrast), renormalised per layer (esft select "
                               "--contrast-weight)")
    con_sel = toggled(state.query(queries.contrast_selection, model, task, tuple(against), metric, norm, p,
                                  float(lam)))
    state.chart(charts.score_heatmap(con_sel, title="contrast score max(0, s_task − s_contrast), per-layer share",
                                     selected=con_sel.filter(pl.col("selected")).select("layer", "expert"),
                                     scheme="magma", name="contrast_cell"), export=f"{task}-contrast-{metric}-p{p:g}")
    use_contrast = st.checkbox("Use the contrast selection for training", key="sel_use_contrast",
                               disabled=not against)
with tab_stab:
    if tab_stab.open:  # computed only when the tab is opened
        n_boot = st.slider("Bootstrap resamples", 10, 200, 40, 10, key="sel_boot")
        prob, curve = state.query(queries.stability_view, model, task, metric, norm, p, n_boot)
        c1, c2 = st.columns([3, 2])
        with c1:
            stab = charts.score_heatmap(prob, value="prob", title="P(selected) over bootstrap resamples of samples",
                                        selected=prob.filter(pl.col("selected")).select("layer", "expert"),
                                        scheme="greens", name="stab_cell")
            state.chart(stab, export=f"{task}-stability-{metric}-p{p:g}")
        with c2:
            state.chart(charts.convergence_chart(curve), export=f"{task}-convergence")
            unstable = prob.filter((pl.col("prob") > 0.05) & (pl.col("prob") < 0.95)).height
            st.caption(f"{unstable} (layer, expert) pairs are selected in between 5 % and 95 % of resamples. The "
                       "curve: how close the selection made from the first N tokens is to the final one.")

# ---------------------------------------------------------------------------------------------- editable selection
chosen_sel = (con_sel if use_contrast and against else base_sel)
selection = queries.selection_dict(chosen_sel.with_columns(task=pl.lit(task)), task, by_rank=True)
st.subheader("Experts to train")
edit_df = pl.DataFrame({"layer": list(selection), "experts": [", ".join(map(str, v)) for v in selection.values()]})
ed_key = (f"sel_editor_{task}_{metric}_{norm}_{p}_{bool(use_contrast)}_{'-'.join(against)}_{lam}_"
          f"{hash(frozenset(toggles))}")
edited = st.data_editor(edit_df, key=ed_key, hide_index=True, width="stretch", disabled=["layer"],
                        column_config={"experts": st.column_config.TextColumn(
                            "experts (comma-separated ids, editable)", width="large")})
final: dict[int, list[int]] = {}
bad = []
for row in edited.iter_rows(named=True) if isinstance(edited, pl.DataFrame) else edited.to_dict("records"):
    try:
        final[int(row["layer"])] = ExpertConfig.parse_ids(str(row["experts"] or ""), lay["num_experts"])
    except EsftError as e:
        bad.append(f"layer {row['layer']}: {e}")
        continue
    typed = str(row["experts"] or "").replace(",", " ").split()
    if len(typed) != len(final[int(row["layer"])]):
        st.warning(f"Layer {row['layer']}: duplicate expert ids were merged ({', '.join(typed)} → "
                   f"{', '.join(map(str, final[int(row['layer'])]))}).")
for b in bad:
    st.error(b)
if final:  # counts recomputed from the edited cells (the editor itself only holds text)
    st.caption("Experts per layer: " + " · ".join(f"L{k}: {len(v)}" for k, v in final.items()))
expert_cfg = ExpertConfig(final)
facts = results.model_facts(model)
n_sel = sum(len(v) for v in final.values())
m1, m2, m3, m4 = st.columns(4)
m1.metric("Selected experts", f"{n_sel}", help=f"{n_sel / max(len(final), 1):.1f} per layer on average")
m2.metric("Of all routed experts", f"{n_sel / max(len(final) * lay['num_experts'], 1):.1%}")
if facts.get("per_expert"):
    trainable = n_sel * facts["per_expert"]
    m3.metric("Trainable parameters", f"{trainable:,}")
    if facts.get("total"):
        m4.metric("Share of the model", f"{trainable / facts['total']:.2%}", help=f"of {facts['total']:,} parameters")
st.download_button("Download expert_cfg.json", expert_cfg.to_json(), file_name=f"{task}_expert_cfg.json",
                   mime="application/json", disabled=bool(bad), key="sel_download")

# ---------------------------------------------------------------------------------------------------------- train
st.subheader("Train")
active_train = [j for j in jobs.active_jobs(work) if j.kind == "train"]
with st.form("train_form"):
    c1, c2, c3, c4 = st.columns(4)
    registered = methods()
    method = c1.selectbox("Method", list(registered), key="tr_method", format_func=lambda n: registered[n].label,
                          help="; ".join(f"{m.label}: {m.help}" for m in registered.values()))
    # defaults measured on the demo (law, token score p = 0.2, batch 4, 16 eval examples): 60 steps at 3e-3 take
    # exact match 0 → 0.69 with general loss 4.18 → 4.76; 40 steps at 5e-3 gave 0.56 / 5.19; 30 steps at 1e-3 left
    # it at 0 while the loss fell
    steps = c2.number_input("Steps", 1, 100000, 60, key="tr_steps")
    lr = c3.number_input("Learning rate", 1e-6, 1.0, 3e-3, format="%.5f", key="tr_lr",
                         help="3e-3 makes ESFT visibly work on the demo in 60 steps; full fine-tuning (fft) usually "
                              "wants ~1e-4 and LoRA ~1e-3")
    batch = c4.number_input("Batch size", 1, 256, 4, key="tr_batch")
    c5, c6, c7 = st.columns([1, 1, 2])
    seq_len = c5.number_input("Sequence length", 32, 8192, 256, step=32, key="tr_seq")
    eval_limit = c6.number_input("Eval examples per file", 1, 10000, 16, key="tr_eval_limit")
    default_data = str(files[task]["train"]) if task in files else ""
    data = c7.text_input("Training data (chat JSONL/Parquet)", value=default_data, key=f"tr_data_{task}")
    c8, c9 = st.columns(2)
    also_shared = c8.checkbox("+ shared experts", key="tr_also_shared",
                              help="esft / random: also train the shared experts (the paper's Table 3 ablation)")
    also_non_expert = c9.checkbox("+ non-expert modules", key="tr_also_nonexpert",
                                  help="esft / random: also train attention, norms, embeddings, the dense MLP and "
                                       "the routers (Table 3); costs most of ESFT's memory savings")
    go = st.form_submit_button("Train", type="primary", disabled=bool(bad))
if active_train:
    st.caption(f"{len(active_train)} training job(s) running or queued; a new one waits in the queue (one runs at a "
               "time, so this machine stays responsive).")
if go:
    from pathlib import Path

    ready, why = state.model_ready(model)
    if not ready:
        st.error(f"Model not usable: {why}")
    elif not data or not Path(data).expanduser().is_file():
        st.error(f"Training data {data!r} is not a file")
    elif methods()[method].needs_experts and n_sel == 0:
        st.error("No experts selected; raise p or edit the selection.")
    else:
        from esft_core.tuning.config import TrainConfig

        selected = methods()[method].needs_experts  # the method trains the selection above
        eval_files = [str(files[task]["eval"])] if task in files and "eval" in files[task] else []
        if state.general_heldout():
            eval_files.append(str(state.general_heldout()))
        tcfg = TrainConfig(data=str(Path(data).expanduser().resolve()), out="", model=model, method=method,
                           experts=runs.EXPERT_CFG if selected else None, steps=int(steps),
                           lr=float(lr), batch_size=int(batch), seq_len=int(seq_len), eval_data=eval_files,
                           eval_limit=int(eval_limit),
                           train_shared=also_shared and selected, train_non_expert=also_non_expert and selected,
                           # a checkpoint at least every 50 steps: a stopped run resumes from close to where it was
                           save_every=max(1, min(int(steps) // 5, 50)))
        how = {"metric": metric, "normalize": norm, "p": p, "edited": bool(toggles) or final != selection,
               "contrast": list(against) if use_contrast and against else []} if selected else {}
        job, run_dir = launchers.start_training(work, tcfg, task, expert_cfg if selected else None, selection=how)
        st.session_state["train_job"] = str(job.dir)
        st.session_state["train_started"] = time.time()

job_dir = st.session_state.get("train_job")
if job_dir is None and active_train:
    job_dir = str(active_train[0].dir)
if job_dir:
    live = not jobs.load_job(job_dir).done

    @st.fragment(run_every=1.0 if live else None)
    def train_panel():
        job = jobs.load_job(job_dir)
        with st.container(border=True):
            state.job_box(job, show_log=False)
            rows = read_metrics(job.meta["out"])
            if rows:
                df = pl.DataFrame(rows).with_columns(run=pl.lit(job.meta.get("method", "run")))
                state.chart(charts.loss_chart(df.select("step", "loss", "run")), export=f"loss-{job.id}")
                last = rows[-1]
                # step and loss are in the progress bar while it runs (one source, so they never disagree)
                final = f"loss {last['loss']:.4f} at step {last['step']} · " if job.done else ""
                st.caption(f"{final}{last.get('tokens_per_s', 0):,.0f} tokens/s · {last.get('elapsed', 0):.1f} s "
                           "elapsed")
            elif not job.done:
                st.caption("Loading the model and packing the data…")
            if not job.done and st.button("Stop training", key=f"stop_{job.id}"):
                jobs.stop_job(job)
                st.rerun(scope="app")
            with st.expander("Log", expanded=job.state == "failed"):
                st.code(jobs.log_tail(job, 3000) or "(empty)", language=None)
            if job.state in ("stopped", "failed"):
                st.page_link("explorer/page_results.py", label="Resume it from its last checkpoint on Results",
                             icon=":material/play_arrow:")
            if job.state == "complete":
                info = runs.read_run(job.meta["run"])
                st.success(f"Training finished. Adapter: `{info.run.get('adapter') or info.adapter_dir}` "
                           f"({info.adapter_bytes / 2**20:.2f} MB)")
                if info.eval:
                    st.markdown("**Evaluation against the untuned model**")
                    st.dataframe(results.compare_eval(info.eval, info.baseline), hide_index=True,
                                 column_config={"change": st.column_config.NumberColumn(format="%+.4f")})
                st.page_link("explorer/page_results.py", label="Compare runs on the Results page",
                             icon=":material/leaderboard:")
            if job.done and st.session_state.get("train_live_seen") != job.id and live:
                st.session_state["train_live_seen"] = job.id
                st.rerun(scope="app")  # stop polling

    train_panel()
