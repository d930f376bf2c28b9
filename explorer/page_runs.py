"""Runs: pick or create a trace DB, list its runs, record new traces (demo/local/hub model; shipped task, upload or
the authors' log folder) as background jobs with progress. A first start with no DB records the demo tasks."""

import re
import time
from pathlib import Path

import streamlit as st

from esft_core.workspace import jobs, launchers
from explorer import queries, state

cfg = state.config()
work = state.workdir()
st.title("Runs")
st.caption("Routing traces live in a DuckDB file. Recording runs in the background; pages keep working meanwhile.")

# ---------------------------------------------------------------------------------------------------- the database
with st.container(border=True):
    c1, c2 = st.columns([3, 2])
    known = sorted({str(p) for p in work.glob("*.duckdb")} | {str(cfg.db_default), str(state.db_path())})
    pick = c2.selectbox("Databases in the work folder", known, index=known.index(str(state.db_path())),
                        key="db_pick")
    typed = c1.text_input("Trace database (a new path creates it on the first recording)", value=pick,
                          key=f"db_typed_{pick}")
    if typed and typed != str(state.db_path()):
        target = Path(typed).expanduser()
        if target.suffix != ".duckdb":
            st.error("A trace database path must end in .duckdb")
        elif not target.parent.exists():
            st.error(f"Folder {target.parent} does not exist")
        else:
            st.session_state["db"] = str(target.resolve())
            st.rerun()
    db = state.db_path()

launchers.ensure_standby(work)  # warm runner for the next recording/training job
record_jobs = [j for j in jobs.list_jobs(work) if j.kind in ("record", "import") and j.meta.get("db") == str(db)]
active = [j for j in record_jobs if not j.done]


# ------------------------------------------------------------------------------- first start: record the demo tasks
marker = work / f".auto-record-{re.sub(r'[^A-Za-z0-9]+', '_', str(db))[-80:]}"
if not db.exists() and not record_jobs and cfg.auto_record and not marker.exists():
    ready, why = state.model_ready(cfg.model)
    tasks = state.task_files()
    if ready and tasks:
        reqs = [launchers.RecordRequest(cfg.model, str(f["train"]), t, str(db), cfg.auto_tokens, 256, 8)
                for t, f in tasks.items()]
        job = launchers.start_record(work, reqs, title=f"First start: recording {len(reqs)} demo tasks",
                                meta={"auto": True})
        marker.write_text(job.id)
        record_jobs, active = [job], [job]
    elif not ready:
        st.info(f"No trace database yet and the default model cannot be loaded: {why}.")

# -------------------------------------------------------------------------------------------- jobs (live progress)
seen = st.session_state.setdefault("runs_done_seen", set())


@st.fragment(run_every=1.0 if active else None)
def job_panel():
    current = [jobs.load_job(j.dir) for j in record_jobs[:3]]
    for j in current:
        with st.container(border=True):
            state.job_box(j)
            if not j.done and st.button("Stop", key=f"stop_{j.id}"):
                jobs.stop_job(j)
                st.rerun(scope="app")
    newly_done = [j.id for j in current if j.done and j.id not in seen and j.id in {a.id for a in active}]
    if newly_done:
        seen.update(newly_done)
        st.rerun(scope="app")  # refresh the runs table and stop polling


if record_jobs:
    st.subheader("Recording jobs")
    job_panel()

# ------------------------------------------------------------------------------------------------------ runs table
st.subheader("Runs in this database")
if not db.exists():
    st.info(f"`{db}` does not exist yet; it is created by the first recording below.")
else:
    runs = state.query(queries.list_runs)
    summary = state.query(queries.db_summary)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Runs", runs.height)
    m2.metric("Complete", int((runs["status"] == "complete").sum()) if runs.height else 0)
    m3.metric("Tokens", f"{int(runs['n_tokens'].fill_null(0).sum()):,}" if runs.height else "0")
    m4.metric("Route rows", f"{summary.get('routes', 0):,}")
    if runs.height:
        st.dataframe(runs, hide_index=True, width="stretch",
                     column_config={"n_tokens": st.column_config.NumberColumn("tokens", format="%d"),
                                    "status": st.column_config.TextColumn("status")})
        if (runs["status"] == "failed").any():
            st.caption("Failed runs are ignored by every score; their partial rows never mix with complete runs.")
    else:
        st.info("The database has no runs yet.")

# --------------------------------------------------------------------------------------------- record a new trace
tasks = state.task_files()
with st.expander(":material/add: Record a new trace", expanded=not db.exists()):
    source = st.radio("Data", ["Shipped task", "Upload JSONL/Parquet", "File path", "Authors' log folder (import)"],
                      horizontal=True, key="rec_source")
    c1, c2 = st.columns(2)
    importing = source.startswith("Authors")
    model = cfg.model if importing else c1.text_input("Model: 'demo', a local directory or a hub id", value=cfg.model,
                                                      key="rec_model")
    if importing:
        c1.caption("The authors' logs hold expert scores only (no tokens): they are imported as a run of "
                   "deepseek-ai/ESFT-vanilla-lite, usable by Specialization, Overlap and Select & Train.")
    data_path: Path | None = None
    task_default = ""
    if source == "Shipped task":
        if tasks:
            t = c2.selectbox("Task", list(tasks), key="rec_task_pick")
            data_path, task_default = tasks[t]["train"], t
        else:
            c2.warning(f"No shipped tasks under {cfg.data_dir / 'tasks'}")
    elif source == "Upload JSONL/Parquet":
        up = c2.file_uploader(f"Chat/text JSONL or Parquet (≤ {cfg.upload_mb} MB)", type=["jsonl", "parquet"],
                              key="rec_upload")
        if up is not None:
            if up.size > cfg.upload_mb * 2**20:
                c2.error(f"{up.name} is {up.size / 2**20:.1f} MB; the limit is {cfg.upload_mb} MB (ESFT_UPLOAD_MB).")
            else:
                safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(up.name).name)
                dest = work / "uploads" / safe
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(up.getvalue())
                from esft_core.data import read_records
                from esft_core.errors import EsftError

                try:
                    n = len(read_records(dest))
                    c2.success(f"{safe}: {n} valid records")
                    data_path, task_default = dest, Path(safe).stem
                except EsftError as e:
                    c2.error(f"Rejected: {str(e).replace(str(dest), safe)}")
                    dest.unlink(missing_ok=True)
    elif source == "File path":
        typed = c2.text_input("Path to a .jsonl or .parquet file", key="rec_path")
        if typed:
            pth = Path(typed).expanduser()
            if not pth.is_file():
                c2.error(f"{pth} is not a file")
            else:
                data_path, task_default = pth.resolve(), pth.stem
    else:
        typed = c2.text_input("Folder with expert_weights_<layer>.txt files", key="rec_logdir")
        if typed:
            pth = Path(typed).expanduser()
            files = sorted(pth.glob("expert_weights_*.txt")) if pth.is_dir() else []
            if not files:
                c2.error(f"{pth} holds no expert_weights_<layer>.txt files")
            else:
                c2.success(f"{len(files)} layer files")
                data_path, task_default = pth.resolve(), pth.name
    c3, c4, c5, c6 = st.columns(4)
    task = c3.text_input("Task name", value=task_default, key=f"rec_taskname_{task_default}")
    max_tokens, seq_len, batch = 8192, 512, 8
    if not importing:  # recording settings mean nothing to an import
        max_tokens = c4.number_input("Token budget", 256, 10_000_000, 8192, step=1024, key="rec_tokens",
                                     help="the authors used 131,072 tokens per task")
        seq_len = c5.number_input("Sequence length", 16, 32768, 512, step=64, key="rec_seq")
        batch = c6.number_input("Batch size", 1, 256, 8, key="rec_batch")
    if st.button("Import the logs" if importing else "Start recording", type="primary",
                 disabled=data_path is None or not task, key="rec_start"):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", task):
            st.error("Task names use letters, digits, '.', '_' or '-' (at most 64).")
        elif source.startswith("Authors"):
            job = launchers.start_import(work, data_path, task, db)
            st.toast(f"Started {job.id}")
            time.sleep(0.3)
            st.rerun()
        else:
            ready, why = state.model_ready(model)
            if not ready:
                st.error(f"Model not usable: {why}")
            else:
                job = launchers.start_record(work, [launchers.RecordRequest(model, str(data_path), task, str(db),
                                                                  int(max_tokens), int(seq_len), int(batch))])
                st.toast(f"Started {job.id}")
                time.sleep(0.3)
                st.rerun()
