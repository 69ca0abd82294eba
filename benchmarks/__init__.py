"""Every benchmark of the project, one module each; each prints ours against a baseline measured in
the same run, as a ratio (`python -m benchmarks.<name> --help`). Figures, machines and commands are
recorded in docs/benchmarks.md; `make bench` runs them all."""
