"""ESFT Explorer core library: record routing traces, score and select experts, train only those experts.

This package never imports streamlit; the explorer (explorer/) is a thin UI over it.
"""

__version__ = "0.1.0"
