"""SparseDelta <-> bytes: index codecs, value codecs and the framed message format.

    from sparsecomm.codec import encode, decode
    buf = encode(delta, index="auto", value="bf16")   # bytes, header included
    same = decode(buf)                                 # or CodecError

See `message.py` for the wire format, `index.py` and `values.py` for the codecs.
"""
from .errors import CodecError
from .index import INDEX_CODECS, choose_index_codec, information_floor_bits
from .message import DEFAULT_LIMITS, FORMAT_VERSION, Limits, decode, decode_model, encode, encode_model, roundtrip_values
from .values import VALUE_CODECS

__all__ = [
    "CodecError", "INDEX_CODECS", "VALUE_CODECS", "DEFAULT_LIMITS", "FORMAT_VERSION", "Limits",
    "choose_index_codec", "information_floor_bits", "encode", "decode", "encode_model", "decode_model",
    "roundtrip_values",
]
