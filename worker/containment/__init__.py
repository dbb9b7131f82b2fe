"""How a worker survives its commands: the daemon's loop, the supervisor that watches
the executor running the commands, the journal and the mirror of the store that let a
new executor take over."""
