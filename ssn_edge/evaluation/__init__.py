"""Evaluation: metrics and the evaluation of trained models."""
