"""KServe v2 tensors and parameters ⇄ Python values.

Tensor elements come either in ``raw_input_contents`` (little-endian, row-major; each BYTES element
preceded by its 4-byte little-endian length) or in the typed ``contents`` field of the tensor's data type.
Both are read here.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.server.grpc.proto import grpc_predict_v2_pb2 as pb

ParamValue = bool | int | float | str
Element = bool | int | float | bytes

_INT64_MAX = 2**63 - 1
_LEN = struct.Struct("<I")

# Data type → numpy dtype of its raw layout, and the typed contents field that holds it.
_RAW_DTYPES: dict[str, str] = {
    "BOOL": "?",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(param: pb.InferParameter) -> ParamValue | None:
    """The value an InferParameter holds, or None when none of its fields is set."""
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def set_parameter(param: pb.InferParameter, value: ParamValue) -> None:
    """Store a Python value in the InferParameter field of its type."""
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if value > _INT64_MAX:
            param.uint64_param = value
        else:
            param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = value


def parameters_dict(params: Mapping[str, pb.InferParameter]) -> dict[str, ParamValue]:
    """A protobuf ``map<string, InferParameter>`` as a plain dict (unset parameters left out)."""
    out: dict[str, ParamValue] = {}
    for key, param in params.items():
        value = parameter_value(param)
        if value is not None:
            out[key] = value
    return out


def encode_bytes_elements(items: Sequence[bytes]) -> bytes:
    """BYTES elements in the raw layout: each preceded by its 4-byte little-endian length."""
    return b"".join(_LEN.pack(len(item)) + item for item in items)


def decode_bytes_elements(raw: bytes, tensor: str) -> list[bytes]:
    """The BYTES elements of a raw tensor; a truncated length or element is an InvalidRequestError."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidRequestError(f"raw contents of input '{tensor}' end inside a length prefix", param=tensor)
        (size,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise InvalidRequestError(
                f"raw contents of input '{tensor}' end inside an element of {size} bytes", param=tensor
            )
        items.append(raw[pos : pos + size])
        pos += size
    return items


def element_count(shape: Sequence[int], tensor: str) -> int:
    if any(dim < 0 for dim in shape):
        raise InvalidRequestError(f"shape of input '{tensor}' has a negative dimension: {list(shape)}", param=tensor)
    return math.prod(shape)


def tensor_elements(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[Element]:
    """The flattened elements of an input tensor, checked against its shape and data type."""
    name, datatype = tensor.name, tensor.datatype
    if datatype != "BYTES" and datatype not in _RAW_DTYPES:
        raise InvalidRequestError(f"input '{name}' has an unsupported data type '{datatype}'", param=name)
    if raw is not None:
        elements: list[Element] = (
            list(decode_bytes_elements(raw, name)) if datatype == "BYTES" else _raw_numbers(raw, datatype, name)
        )
    else:
        if datatype not in _CONTENTS_FIELD:
            raise InvalidRequestError(f"input '{name}' of type {datatype} must be sent as raw contents", param=name)
        elements = list(getattr(tensor.contents, _CONTENTS_FIELD[datatype]))
    expected = element_count(tensor.shape, name)
    if len(elements) != expected:
        raise InvalidRequestError(
            f"input '{name}' holds {len(elements)} elements; its shape {list(tensor.shape)} needs {expected}",
            param=name,
        )
    return elements


def _raw_numbers(raw: bytes, datatype: str, tensor: str) -> list[Element]:
    dtype = np.dtype(_RAW_DTYPES[datatype])
    if len(raw) % dtype.itemsize:
        raise InvalidRequestError(
            f"raw contents of input '{tensor}' ({len(raw)} bytes) are not whole {datatype} elements",
            param=tensor,
        )
    return np.frombuffer(raw, dtype=dtype).tolist()


def input_elements(request: pb.ModelInferRequest) -> dict[str, tuple[str, list[Element]]]:
    """{input name: (data type, elements)} of a request, from raw contents or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequestError(
            f"raw_input_contents has {len(raw)} entries but the request has {len(request.inputs)} inputs; "
            "give one entry per input, in order",
            param="raw_input_contents",
        )
    out: dict[str, tuple[str, list[Element]]] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in out:
            raise InvalidRequestError(f"input '{tensor.name}' is given twice", param=tensor.name)
        if raw and tensor.HasField("contents"):
            raise InvalidRequestError(
                f"input '{tensor.name}' has contents although the request uses raw_input_contents",
                param=tensor.name,
            )
        out[tensor.name] = (tensor.datatype, tensor_elements(tensor, raw[i] if raw else None))
    return out
