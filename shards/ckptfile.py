"""The stage checkpoint's file format: a JSON header that describes the tree of the checkpoint dict (dicts,
lists, tuples, numbers, strings, None) and the tensors' dtypes, shapes and offsets, then the tensors' raw
bytes. Nothing is unpickled to read it, and reading costs a copy of the bytes (torch's zip format with its
``weights_only`` unpickler took ~10x longer for a 1 MB checkpoint, once per retrained shard).

    MAGIC (8 bytes) | header length (8 bytes, little-endian) | header (UTF-8 JSON) | tensor bytes

A checkpoint holding something the header cannot describe (an object in a user's scheduler state, say) is
written in torch's format instead; `decode` reads both, and the checkpoints of older workdirs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

MAGIC = b"SISACKP1"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
)}  # fmt: skip


class Unsupported(TypeError):
    """The checkpoint holds a value the header cannot describe: write it in torch's format."""


def encode(obj) -> bytes:
    """The checkpoint ``obj`` in this format; `Unsupported` if it holds another kind of value."""
    blobs: list = []
    size = [0]
    tree = _tree(obj, blobs, size)
    head = json.dumps(tree, separators=(",", ":"), allow_nan=True).encode()
    return b"".join([MAGIC, len(head).to_bytes(8, "little"), head, *blobs])


def is_own(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


def decode(data: bytes):
    """The checkpoint dict; every tensor is its own copy (aligned, writable, independent of ``data``).
    Raises ValueError on a malformed file."""
    if not is_own(data) or len(data) < 16:
        raise ValueError("not a sisa checkpoint file")
    n = int.from_bytes(data[8:16], "little")
    if 16 + n > len(data):
        raise ValueError("truncated header")
    tree = json.loads(data[16 : 16 + n])
    body = memoryview(data)[16 + n :]
    end = [0]
    out = _build(tree, body, end)
    if end[0] != len(body):
        raise ValueError(f"{len(body) - end[0]} bytes after the last tensor")
    return out


def _tree(obj, blobs: list, size: list):
    if isinstance(obj, torch.Tensor):
        plain = type(obj) is torch.Tensor and not obj.requires_grad and obj.layout == torch.strided
        if not plain or obj.is_quantized or obj.is_conj() or obj.is_neg():
            raise Unsupported("a tensor subclass, one that requires grad, or a non-strided/quantized/lazy view")
        t = obj.detach().to("cpu").contiguous()
        if str(t.dtype).removeprefix("torch.") not in _DTYPES:
            raise Unsupported(f"tensor of {t.dtype}")
        raw = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""  # joined once, not copied
        blobs.append(raw)
        node = {
            "t": str(t.dtype).removeprefix("torch."),
            "s": list(t.shape),
            "o": size[0],
            "n": raw.nbytes if t.numel() else 0,
        }
        size[0] += node["n"]
        return node
    if isinstance(obj, dict):
        if type(obj) is not dict:
            raise Unsupported(type(obj).__name__)
        if all(type(k) is str for k in obj):
            return {"d": {k: _tree(v, blobs, size) for k, v in obj.items()}}
        if not all(type(k) in (int, str) for k in obj):
            raise Unsupported("dict key")
        return {"k": [[k, _tree(v, blobs, size)] for k, v in obj.items()]}
    if type(obj) in (list, tuple):
        return {"l" if type(obj) is list else "u": [_tree(v, blobs, size) for v in obj]}
    if obj is None or type(obj) in (bool, int, str):
        return {"v": obj}
    if type(obj) is float:
        return {"f": obj if math.isfinite(obj) else repr(obj)}
    raise Unsupported(type(obj).__name__)


def _build(node: dict, body: memoryview, end: list):
    """The value ``node`` describes. Tensors must follow one another in the order they are met, each
    exactly as long as its dtype and shape say (`encode` writes nothing else): one checkpoint, one file."""
    if "t" in node:
        dtype = _DTYPES[node["t"]]
        shape, start, n = node["s"], node["o"], node["n"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"bad tensor shape {shape!r}")
        if type(start) is not int or type(n) is not int or start != end[0]:
            raise ValueError("tensor bytes out of order")
        if n != math.prod(shape) * dtype.itemsize or start + n > len(body):
            raise ValueError("tensor bytes out of range")
        end[0] = start + n
        flat = torch.empty(n, dtype=torch.uint8)  # torch's own (aligned) memory, one copy
        if n:
            flat.numpy()[:] = np.frombuffer(body[start : start + n], dtype=np.uint8)
        return flat.view(dtype).reshape(shape)
    if "d" in node:
        return {k: _build(v, body, end) for k, v in node["d"].items()}
    if "k" in node:
        return {k: _build(v, body, end) for k, v in node["k"]}
    if "l" in node:
        return [_build(v, body, end) for v in node["l"]]
    if "u" in node:
        return tuple(_build(v, body, end) for v in node["u"])
    if "f" in node:
        return float(node["f"])
    return node["v"]
