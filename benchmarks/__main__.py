"""`python -m benchmarks`: run the benchmark and print the table."""

from __future__ import annotations

from benchmarks.cli import main

raise SystemExit(main())
