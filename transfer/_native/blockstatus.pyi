OK: int
NO_REPLY: int
ODD: int
ZERO_LENGTH: int

def block_status(handle: object, context: str, offset: int, length: int,
                 cap: int) -> tuple[int, list[tuple[int, int, int]], int, bool]: ...
