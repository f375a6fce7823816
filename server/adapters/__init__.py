"""Server side of the adapter registry: which adapter a request may use, and bringing its weights to host RAM."""
