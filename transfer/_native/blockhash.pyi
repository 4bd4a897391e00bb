from collections.abc import Buffer

def hash_blocks(
    buf: Buffer,
    block_size: int,
    out: Buffer,
    zero: Buffer | None = ...,
    zero_digest: Buffer | None = ...,
) -> int: ...
