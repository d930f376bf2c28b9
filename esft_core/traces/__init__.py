"""Traces: the routing-trace recorder, its writer process, the DuckDB store and staging, export/import, the authors'
log importer and the SQL sandbox."""
