"""Admin API: tenants, API keys and the adapter registry (upload, list, inspect, delete, pin)."""
