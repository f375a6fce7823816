"""Building blocks of the decoder: rotary embeddings, paged attention, adapter-aware linears."""
