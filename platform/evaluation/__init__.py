"""Evaluation: metrics under the paper's protocol, per-task evaluation of a network, and the reports it writes."""
