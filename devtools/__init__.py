"""Local stand-ins used by the demo, the tests and the benchmark: MongoDB-compatible server processes on
127.0.0.1, the sample dataset, and helpers to run Airflow commands in a throw-away home. Not imported by
the DAGs."""
