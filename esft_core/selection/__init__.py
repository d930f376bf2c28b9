"""Selection: expert relevance scores over traces and the per-layer top-p selection (the trace maths lives here,
once)."""
