"""Everything that talks to MLflow, in three modules: `store` (where the runs live),
`write` (a stage recording its run) and `read` (audit and registry reading runs back).
The two sides share only the store, so neither imports the other."""
