"""Observability: GPU and host telemetry, anomaly detection and early warnings, tracing."""
