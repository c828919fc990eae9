"""Beam wiring: the scoring step (decode, RunInference, score rows), the public transforms (stage), counters, progress and a clean stop on Ctrl-C."""
