"""The inference engine: scheduler (bookkeeping only), model runner (tensors), engine loop."""
