"""Input and output: DuckDB sources, prompt rendering and tokenization, the Parquet sink."""
