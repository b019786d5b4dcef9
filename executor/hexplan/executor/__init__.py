"""hexplan.executor: gRPC node servers and gateway (a later issue). Needs the [executor] extra."""
