"""Sweeps: many recipes on one model, and the report that compares them (sweep-layout: runs/NAME/)."""
