"""SQL: a read-only console on the trace DB (external file access disabled, row cap, time limit) with example
queries; results as a table and a quick chart."""

import streamlit as st

from explorer import charts, queries, sql_console, state

st.title("SQL")
db = state.db_path()
st.caption(f"Read-only DuckDB on `{db}`. External files/URLs are disabled; writes are rejected. "
           "Tables: runs, samples, tokens, routes, expert_stats, expert_tokens.")
if not db.exists():
    st.info("The trace database does not exist yet. Record a trace on the **Runs** page first.")
    st.page_link("explorer/page_runs.py", label="Go to Runs", icon=":material/database:")
    st.stop()

example = st.selectbox("Example queries", list(sql_console.EXAMPLE_QUERIES), key="sql_example")
sql = st.text_area("Query", value=sql_console.EXAMPLE_QUERIES[example], height=180, key=f"sql_text_{example}")
c1, c2, _ = st.columns([1, 1, 3])
cap = c1.number_input("Row cap", 1, 100_000, 1000, key="sql_cap")
limit = c2.number_input("Time limit (s)", 1, 120, 10, key="sql_limit")
clicked = st.button("Run", type="primary", key="sql_run")
if clicked or "sql_last" not in st.session_state:
    if not clicked and not state.query(queries.db_summary):
        st.info("The database holds no tables yet; record a trace on the **Runs** page, or run any query above.")
        st.stop()
    st.session_state["sql_last"] = (sql, int(cap), int(limit))
q, cap_, limit_ = st.session_state["sql_last"]
try:
    res = sql_console.run_sql(db, q, row_cap=cap_, timeout_s=limit_)
except (ValueError, queries.DbBusy) as e:
    st.error(f"Query failed: {e}")
    st.stop()
st.caption(f"{res.frame.height:,} rows{' (capped)' if res.truncated else ''} · {res.ms:.0f} ms")
st.dataframe(res.frame, hide_index=True, width="stretch")
ch = charts.quick_chart(res.frame)
if ch is not None:
    with st.expander("Quick chart", expanded=True):
        state.chart(ch, export="sql-quick-chart")
