"""Names of full KV blocks for the prefix cache (server.engine.block_manager).

A block's keys and values are a function of every token up to its end and of the weights that
computed them. So a block is named by a hash over (the previous block's hash, its own tokens), and
the chain starts from the identity of the weights: "" for the base model, an adapter version's
content hash (plus, for a per-user family, the user's state hash) otherwise. Two adapters, two
versions of one name, or two states of one user never share a block; a name reused for new
contents does not either, since the identity is the contents, not the name.
"""
from __future__ import annotations

import hashlib
from array import array


def block_hashes(token_ids: list[int], block_size: int, identity: str, parent: bytes | None) -> list[bytes]:
    """Hashes of the full blocks of `token_ids` (a multiple of block_size tokens) that follow the block
    hashed `parent` (None: they start the sequence, under `identity`)."""
    assert len(token_ids) % block_size == 0
    out = []
    prev = parent if parent is not None else hashlib.blake2b(identity.encode(), digest_size=16, person=b"hotswap-prefix").digest()
    for i in range(0, len(token_ids), block_size):
        prev = hashlib.blake2b(prev + array("q", token_ids[i : i + block_size]).tobytes(), digest_size=16).digest()
        out.append(prev)
    return out
