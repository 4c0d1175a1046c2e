"""The edge service: configuration, the inference loop, systemd integration, health and metrics."""
