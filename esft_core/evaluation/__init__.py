"""Evaluation: task and general metrics, evaluation of a model or adapter, statistics over seeds, and attribution."""
