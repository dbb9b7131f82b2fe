"""What a worker does: the runtime that schedules and answers commands, the command
handlers (`_commands/`), and what they build on — the object store, argument checks,
private execution and pacing, privacy rules, aggregation, fairness, leases, limits,
plans, datasets."""
