"""The face of lvd: the `lvd` command and thin Prefect flows over the stage DAG."""
