"""The frame stream: the engine's checked, compressed form of disk ranges (frames.py: the
format; codec.py: encoding and decoding). The network hop and `stream:FILE` speak it."""
