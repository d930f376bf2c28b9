"""ESFT Explorer UI: Streamlit pages (page_*.py) over queries.py (DuckDB/Polars) and charts.py (Altair)."""
