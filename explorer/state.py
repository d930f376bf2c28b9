"""Shared helpers of the Streamlit pages: configuration from the environment, cached read-only queries, the model
picker, job helpers. The only explorer module besides the pages that imports streamlit.

Configuration: the ESFT_* environment variables of esft_core/settings.py (ESFT_DB, ESFT_WORKDIR, ESFT_DATA_DIR,
ESFT_MODEL, ESFT_AUTO_RECORD, ESFT_AUTO_TOKENS, ESFT_UPLOAD_MB), so tests and deployments can point the app elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from esft_core import settings
from esft_core.workspace import jobs, launchers
from explorer import queries

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Config:
    db_default: Path
    workdir: Path
    data_dir: Path
    model: str
    auto_record: bool
    auto_tokens: int
    upload_mb: int


def config() -> Config:
    return Config(
        db_default=settings.path("ESFT_DB"),
        workdir=settings.path("ESFT_WORKDIR"),
        data_dir=settings.path("ESFT_DATA_DIR"),
        model=settings.get("ESFT_MODEL"),
        auto_record=settings.flag("ESFT_AUTO_RECORD"),
        auto_tokens=settings.integer("ESFT_AUTO_TOKENS"),
        upload_mb=settings.integer("ESFT_UPLOAD_MB"),
    )


def db_path() -> Path:
    """The trace DB this session looks at (Runs page can switch it)."""
    if "db" not in st.session_state:
        st.session_state["db"] = str(config().db_default)
    return Path(st.session_state["db"])


def workdir() -> Path:
    w = config().workdir
    w.mkdir(parents=True, exist_ok=True)
    return w


# ------------------------------------------------------------------------------------------------- cached queries
@st.cache_data(show_spinner=False, max_entries=512, ttl=3600)
def _cached(db: str, version: tuple, name: str, _fn, args: tuple):
    # `name` (module.qualname) is the cache key of `_fn`; the leading underscore keeps the function unhashed
    with queries.reading(db) as con:
        return _fn(con, *args)


def query(fn, *args):
    """fn(con, *args) (a query function, e.g. queries.tasks) on a short-lived read-only connection, cached until the
    DB file changes.
    A DB that is busy longer than the retry window shows a warning and stops the page (never a traceback)."""
    db = db_path()
    if not db.exists():
        return None
    try:
        return _cached(str(db), queries.db_version(db), f"{fn.__module__}.{fn.__qualname__}", fn, tuple(args))
    except queries.DbBusy as e:
        st.warning(f"The trace database is busy ({e}). The page will work again when the writer is done.")
        st.stop()


# ------------------------------------------------------------------------------------------------ session context
# One context per browser session: model and task live under non-widget keys (`ctx_model`, `ctx_task`) so they
# survive pages that do not draw their widget (Streamlit deletes a widget's key when a run does not render it).
# Changing the model drops the page widgets that depend on it, so every page starts from that model's defaults.
DEPENDENT_PREFIXES = ("tok_", "att_", "spec_", "ov_", "sel_", "tr_data")


def _model_changed() -> None:
    st.session_state["ctx_model"] = st.session_state["_w_model"]
    for k in ("ctx_task", "ctx_tasks", "focus_cell"):
        st.session_state.pop(k, None)
    for k in list(st.session_state):
        if isinstance(k, str) and k.startswith(DEPENDENT_PREFIXES):
            del st.session_state[k]


def model_context() -> tuple[str, list[str], dict]:
    """(model, its tasks, its MoE layout) for pages that need traces; stops the page with an explanation when the
    database has no complete run yet."""
    model = pick_model()
    if model is None:
        st.stop()
    return model, query(queries.tasks, model), query(queries.model_layout, model)


def default_model(models: list[str]) -> str:
    """A new session's model: ESFT_MODEL when it has traces, else the newest model with per-token rows (an imported
    log has none, so it never becomes a newcomer's first view), else the newest."""
    want = config().model
    for m in models:
        if m == want or Path(m).name == want:
            return m
    with_tokens = query(queries.models_with_tokens) or []
    return next((m for m in with_tokens if m in models), models[0])


def pick_model() -> str | None:
    """Sidebar model picker (models with complete runs), kept in the session context across pages; None with an
    explanation when there is no data."""
    models = query(queries.models) if db_path().exists() else None
    if not models:
        active = [j for j in jobs.active_jobs(workdir()) if j.kind in ("record", "import")]
        if active:
            st.info("A recording is running — this page fills in when it completes. Progress is on the **Runs** page.")
        else:
            st.info("No complete traces in this database yet. Record one on the **Runs** page.")
        st.page_link("explorer/page_runs.py", label="Go to Runs", icon=":material/database:")
        return None
    if st.session_state.get("ctx_model") not in models:
        st.session_state["ctx_model"] = default_model(models)
    st.session_state["_w_model"] = st.session_state["ctx_model"]
    return st.sidebar.selectbox("Model", models, key="_w_model", on_change=_model_changed,
                                help="Traces are compared within one model. The choice holds on every page.")


def pick_task(container, tasks: list[str], key: str, label: str = "Task", prefer: str | None = None) -> str | None:
    """A task picker that follows the session's task (`ctx_task`) and sets it; `prefer` is the first choice of a
    session that has not picked a task yet."""
    if not tasks:
        return None
    ctx = st.session_state.get("ctx_task")
    if ctx in tasks:
        st.session_state[key] = ctx
    elif st.session_state.get(key) not in tasks:
        st.session_state[key] = prefer if prefer in tasks else tasks[0]
    task = container.selectbox(label, tasks, key=key)
    st.session_state["ctx_task"] = task
    return task


def no_token_note(model: str, task: str) -> None:
    st.info(f"The latest '{task}' run of {model} has **no token text**: it is an import of the authors' routing logs "
            "or an aggregate-only recording (`--routes none`), which keep expert scores but not the tokens. "
            "Scores, Specialization, Overlap and Select & Train work on it; for token views record the task with "
            "per-token routes on the **Runs** page (\"Record a new trace\", or `esft record --model M --data FILE "
            f"--task {task} --db DB`) or pick another model in the sidebar.")
    st.page_link("explorer/page_runs.py", label="Record this task with per-token routes on Runs",
                 icon=":material/database:")


def pick_sample(task_col, sample_col, model: str, tasks: list[str], prefix: str, limit: int) -> tuple[int, int]:
    """Task + sample pickers of the per-token pages over the task's latest run: (run_id, sample_id). Stops the page
    with a note when that run has no token text (imported logs, aggregate-only recordings) or no samples."""
    task = pick_task(task_col, tasks, f"{prefix}_task")
    run_id = query(queries.latest_run, model, task)
    if not query(queries.run_detail, run_id)["tokens"]:
        no_token_note(model, task)
        st.stop()
    samples = query(queries.list_samples, run_id, limit)
    if samples is None or samples.height == 0:
        st.info("This run has no samples.")
        st.stop()
    labels = {r["sample_id"]: f"#{r['sample_id']} ({r['n_tokens']} tok) {(r['preview'] or '(no text)')[:60]}"
              for r in samples.iter_rows(named=True)}
    sid = sample_col.selectbox("Sample", list(labels), format_func=labels.get, key=f"{prefix}_sample_{run_id}")
    return run_id, sid


def _follow(key: str, ctx: str, default):
    """Seed widget `key` from the session context `ctx` (or `default`) when the page draws it anew; pages read the
    widget and write `ctx` back, so a control keeps its value across pages (Streamlit drops a widget's key on a run
    that does not draw it; ctx_* keys stay). While the page stays, the widget's own state (a user's change) wins."""
    if key not in st.session_state:
        st.session_state[key] = st.session_state.get(ctx, default)


def score_controls(prefix: str, default_metric: str = "gate", p: bool = True) -> tuple[str, str, float | None]:
    """Metric / normalisation / p controls (paper defaults: p = 0.1 for gate, 0.2 for token), one set for the whole
    session: what Specialization shows is what Select & Train selects (a cell toggled on one page lands in the
    selection of the other with the same scores). `default_metric` only seeds a session's first page."""
    c1, c2, c3 = st.columns([1, 1, 2])
    from esft_core.selection.scores import SCORES

    _follow(f"{prefix}_metric", "ctx_metric", default_metric)
    metric = c1.radio("Score", list(SCORES), horizontal=True, key=f"{prefix}_metric",
                      help="; ".join(f"{f.name}: {f.help}" for f in SCORES.values()))
    st.session_state["ctx_metric"] = metric
    _follow(f"{prefix}_norm", "ctx_norm", "token")
    norm = c2.radio("Normalise per", ["token", "sample"], horizontal=True, key=f"{prefix}_norm",
                    help="token: Σ over all tokens ÷ tokens (the authors' shipped files); sample: the paper's "
                         "per-sample average")
    st.session_state["ctx_norm"] = norm
    pv = None
    if p:
        _follow(f"{prefix}_p_{metric}", f"ctx_p_{metric}", SCORES[metric].default_p)
        pv = c3.slider("Top-p threshold p", 0.01, 1.0, step=0.01, key=f"{prefix}_p_{metric}")
        st.session_state[f"ctx_p_{metric}"] = pv
    return metric, norm, pv


def pick_tasks(tasks: list[str], key: str, label: str = "Tasks", container=None) -> list[str]:
    """The task set of the comparison pages (Specialization, Overlap, Tokens): one default (every task of the model)
    and one choice for the session, reset when the model changes (`ctx_tasks` is dropped with the model)."""
    _follow(key, "ctx_tasks", tasks)
    st.session_state[key] = [t for t in st.session_state[key] if t in tasks]  # tasks of another model never show
    out = (container or st).multiselect(label, tasks, key=key)
    st.session_state["ctx_tasks"] = out
    return out


def scores(model: str, tasks: list[str] | None, metric: str, normalize: str):
    return query(queries.expert_scores, model, None if tasks is None else list(tasks), metric, normalize)


def chart(ch, key: str | None = None, on_select: str = "ignore", export: str | None = None, **kw):
    """st.altair_chart with the selection API when asked (returns the selection state); `export` (a file stem,
    unique on the page) adds SVG/PNG downloads rendered on click (Streamlit's chart has no export menu)."""
    out = None
    if on_select == "rerun":
        out = st.altair_chart(ch, key=key, on_select="rerun", width="stretch", **kw)
    else:
        st.altair_chart(ch, width="stretch", **kw)
    if export:
        export_buttons(ch, export)
    return out


def export_buttons(ch, name: str) -> None:
    """Download the chart as SVG and PNG (vl-convert renders the Vega-Lite spec when the button is clicked)."""
    import re

    stem = "esft-" + re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:80]

    def render(fmt: str):
        import vl_convert as vlc

        spec = ch.to_json()
        return vlc.vegalite_to_svg(spec) if fmt == "svg" else vlc.vegalite_to_png(spec, scale=2)

    row = st.container(horizontal=True)  # buttons at their natural width (columns cut the labels to "S…")
    c1 = c2 = row
    c1.download_button("SVG", data=lambda: render("svg"), file_name=f"{stem}.svg", mime="image/svg+xml",
                       on_click="ignore", icon=":material/download:", type="tertiary")
    c2.download_button("PNG", data=lambda: render("png"), file_name=f"{stem}.png", mime="image/png",
                       on_click="ignore", icon=":material/download:", type="tertiary")


def clicked_cell(state) -> tuple[int, int] | None:
    """(layer, expert) of a heatmap click from st.altair_chart(on_select='rerun') state."""
    try:
        sel = state.selection
        for v in sel.values():
            if isinstance(v, list) and v and "layer" in v[0] and "expert" in v[0]:
                return int(v[0]["layer"]), int(v[0]["expert"])
    except AttributeError:
        return None
    return None


def clicked(state, name: str, fields: tuple[str, ...]) -> tuple | None:
    """The clicked point of selection parameter `name` as a tuple of `fields` (None when nothing is clicked)."""
    try:
        v = state.selection.get(name)
    except AttributeError:
        return None
    if isinstance(v, list) and v and all(f in v[0] for f in fields):
        return tuple(v[0][f] for f in fields)
    return None


# -------------------------------------------------------------------------------------------------------- jobs & IO
def task_files(data_dir: Path | None = None) -> dict[str, dict[str, Path]]:
    """Shipped tasks: {task: {'train': path, 'eval': path}} from ESFT_DATA_DIR/tasks/."""
    root = (data_dir or config().data_dir) / "tasks"
    out = {}
    if root.is_dir():
        for d in sorted(root.iterdir()):
            files = {s: d / f"{s}.jsonl" for s in ("train", "eval") if (d / f"{s}.jsonl").is_file()}
            if "train" in files:
                out[d.name] = files
    return out


def general_heldout() -> Path | None:
    p = config().data_dir / "general" / "heldout.jsonl"
    return p if p.is_file() else None


def model_ready(model: str) -> tuple[bool, str]:
    """Whether `model` can be loaded here without a download: 'demo' needs data/demo-moe; a path needs config.json.
    Hub ids are allowed (they may download)."""
    DEMO_MODEL = REPO_ROOT / "data" / "demo-moe"  # = esft_core.models.loading.DEMO_MODEL, without importing torch here
    if model in ("", "demo"):
        ok = (DEMO_MODEL / "config.json").is_file()
        return ok, "" if ok else f"the demo model is not built yet ({DEMO_MODEL}); run `make demo-model`"
    p = Path(model).expanduser()
    if model.startswith((".", "/", "~")) or p.exists():
        ok = (p / "config.json").is_file()
        return ok, "" if ok else f"{p} has no config.json"
    return True, ""


def job_box(job: jobs.Job, show_log: bool = True) -> None:
    """Status, progress bar and error of a job (used inside auto-refreshing fragments)."""
    frac, label = launchers.progress(job)
    icon = {"complete": ":material/check_circle:", "failed": ":material/error:",
            "stopped": ":material/stop_circle:"}.get(job.state, ":material/hourglass_top:")
    st.markdown(f"{icon} **{job.title}** — `{job.state}` · job `{job.id}`")
    if not job.done:
        st.progress(frac if frac is not None else 0.0, text=label)
    if job.state == "failed":
        st.error(f"Job failed: {job.error or 'see the log'}. Earlier data is untouched.")
    if show_log:
        with st.expander("Log", expanded=job.state == "failed"):
            st.code(jobs.log_tail(job, 3000) or "(empty)", language=None)
