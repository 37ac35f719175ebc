"""The one exception type decoding may raise."""


class CodecError(ValueError):
    """Input that cannot be encoded, or bytes that are not a valid sparsecomm message.

    Decoding raises only this, whatever the bytes: truncated, corrupted, inconsistent or
    hostile input never crashes, hangs or allocates more than a small multiple of its size.
    """
