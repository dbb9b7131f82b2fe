"""Running workers: configuration, fleets of daemons, the launcher, logs."""
