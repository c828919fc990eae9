"""Inputs: one split type (split) and a sibling module per format (parquet, jsonl, tar); files plans and reads any of them; ids checks id columns and skips rows earlier outputs hold."""
