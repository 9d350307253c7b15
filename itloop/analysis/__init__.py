"""Estimators and figures over recorded responses (numpy and scipy only)."""
