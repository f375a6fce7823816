"""Model definitions and the embedded default model (see ``embedded``)."""
