"""Local fakes of the services the connector talks to, for tests and benchmarks."""
