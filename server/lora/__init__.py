"""Adapters on the engine side: reading PEFT files and placing weights in the device row pools."""
