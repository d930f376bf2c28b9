"""End-to-end latencies of the explorer on the shipped demo (real server, real headless chromium), the measured goals
of issue 11 (on an idle machine):

- first start: seconds from opening the app with no trace DB until every demo task's run is complete;
- cold page load: a new browser session opening a page until Streamlit's script is idle (goal ≤ 3 s), per page;
- warm interaction: changing a control on an open page until idle (goal ≤ 1 s);
- Train button → first loss point on screen with the page's default settings (goal ≤ 10 s);
- routing shift of 32 prompts as the page's background job (launchers.start_routing_shift), start → result (goal ≤
15 s).

    .venv/bin/python bench/explorer_ui_latency.py        # prints one JSON line at the end
    .venv/bin/python bench/explorer_ui_latency.py --db BIG.duckdb   # an existing trace DB (e.g. the 81.8 M-row one
        # bench/explorer_queries.py --db keeps): cold loads and warm interactions only (its synthetic model cannot
        # train or run a routing shift)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from explorer_support import free_port  # noqa: E402

IDLE_JS = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  const st = app && app.getAttribute('data-test-script-state');
  return st && st !== 'initial' && st !== 'running' && !document.querySelector('[data-testid="stSkeleton"]');
}"""


def idle(page) -> None:
    page.wait_for_timeout(100)
    page.wait_for_function(IDLE_JS, timeout=120_000)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def main() -> None:
    import argparse

    from playwright.sync_api import sync_playwright

    from esft_core.workspace import jobs, launchers, runs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", help="an existing trace DB: measure cold loads and warm interactions on it only")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="esft-ui-"))
    port = free_port()
    env = {**os.environ, "ESFT_DB": str(tmp / "traces.duckdb"), "ESFT_WORKDIR": str(tmp / "work")}
    if args.db:
        import duckdb

        with duckdb.connect(args.db, read_only=True) as con:
            model = con.execute("SELECT model FROM runs WHERE status = 'complete' LIMIT 1").fetchone()[0]
        env.update(ESFT_DB=str(Path(args.db).resolve()), ESFT_AUTO_RECORD="0", ESFT_MODEL=model)
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.port",
                             str(port), "--server.headless", "true", "--server.fileWatcherType", "none",
                             "--browser.gatherUsageStats", "false"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    out: dict = {}
    try:
        while True:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.3)
        n_tasks = len([d for d in (REPO / "data" / "tasks").iterdir() if (d / "train.jsonl").is_file()])
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(180_000)
            t0 = time.monotonic()
            page.goto(url + "/")
            page.get_by_text("Runs in this database").wait_for()
            if not args.db:
                page.locator('[data-testid="stMetricValue"]', has_text=re.compile(rf"^{n_tasks}$")).nth(1).wait_for()
                out["first_start_record_s"] = round(time.monotonic() - t0, 1)
                out["tasks"] = n_tasks
            else:
                out["db"] = str(args.db)

            # cold loads: a new session (new browser context) per page; the server's query cache is shared, as it
            # is between real visitors, so the first visit of each page warms it and the second is measured too
            cold: dict[str, list[float]] = {}
            for path in ("specialization", "overlap", "tokens", "select-train", "results", "runs"):
                for _ in range(2):
                    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
                    pg = ctx.new_page()
                    t = time.monotonic()
                    pg.goto(f"{url}/{path}")
                    pg.wait_for_selector('[data-testid="stApp"]')
                    idle(pg)
                    cold.setdefault(path, []).append(round(time.monotonic() - t, 2))
                    ctx.close()
            out["cold_load_s"] = cold
            out["cold_load_max_s"] = max(v[-1] for v in cold.values())

            # warm interactions on an open page: flip the score radio back and forth
            page.goto(url + "/specialization")
            page.get_by_text("Concentration: cumulative score").wait_for()
            idle(page)
            warm = []
            for label in ("token", "gate", "token", "gate"):
                t = time.monotonic()
                page.get_by_text(label, exact=True).first.click()
                idle(page)
                warm.append(round(time.monotonic() - t, 2))
            out["warm_interaction_s"] = warm
            out["warm_interaction_median_s"] = median(warm)
            if args.db:
                browser.close()
                print(json.dumps(out))
                return

            page.goto(url + "/select-train")
            page.get_by_text("Experts to train").wait_for()
            idle(page)
            page.wait_for_timeout(15_000)  # let the warm runner finish importing, as it would for a user reading
            t1 = time.monotonic()
            page.get_by_role("button", name="Train", exact=True).click()
            page.get_by_text(re.compile(r"step \d+/\d+ · loss")).first.wait_for()
            out["train_click_to_first_loss_s"] = round(time.monotonic() - t1, 2)
            page.get_by_text("Training finished").first.wait_for(timeout=600_000)
            out["train_click_to_finished_with_eval_s"] = round(time.monotonic() - t1, 1)
            browser.close()

        # routing shift of 32 prompts, as the Results page starts it (a background job)
        run = runs.list_runs(tmp / "work")[0]
        t2 = time.monotonic()
        job = launchers.start_routing_shift(tmp / "work", run.dir, 32)
        while not jobs.load_job(job.dir).done:
            time.sleep(0.2)
        out["routing_shift_32_prompts_s"] = round(time.monotonic() - t2, 1)
        out["routing_shift_state"] = jobs.load_job(job.dir).state
    finally:
        proc.terminate()
        proc.wait(10)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
