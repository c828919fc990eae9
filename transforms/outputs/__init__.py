"""Outputs: the output contract (layout: every name), the schemas of scores and errors, the Parquet sink, the restart ledger, and reading a finished run's scores back (finished)."""
