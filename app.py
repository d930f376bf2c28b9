"""ESFT Explorer — `streamlit run app.py`. Only the router: every page lives in explorer/page_*.py."""

import streamlit as st

st.set_page_config(page_title="ESFT Explorer", page_icon=":material/explore:", layout="wide")


def page(name: str, title: str, icon: str, url: str, **kw) -> st.Page:
    return st.Page(f"explorer/page_{name}.py", title=title, icon=f":material/{icon}:", url_path=url, **kw)


pages = {
    "Traces": [
        page("runs", "Runs", "database", "home", default=True),
        page("specialization", "Specialization", "local_fire_department", "specialization"),
        page("overlap", "Overlap", "join_inner", "overlap"),
        page("tokens", "Tokens", "text_fields", "tokens"),
        page("attribution", "Attribution", "target", "attribution"),
    ],
    "Tune": [
        page("select_train", "Select & Train", "build", "select-train"),
        page("results", "Results", "leaderboard", "results"),
    ],
    "Tools": [page("sql", "SQL", "terminal", "sql"),
              # the default page is served at /; /runs (a bookmark, a shared link) opens the same page
              page("runs", "Runs", "database", "runs", visibility="hidden")],
}
st.navigation(pages).run()
