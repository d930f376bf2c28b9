"""Experts: the expert config (which experts of which layer train), the fused-expert ESFT wrapping that trains only
those, and ESFT adapters (save, load, merge). Below selection, evaluation and tuning."""
