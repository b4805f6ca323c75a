"""A tiny writer of dlib's serialisation, for the tests only: dlib/serialize.h and dlib/dnn/*.h transcribed
the other way round (`pack_int`, `float_details`, tensors, and a whole DlibFaceNet as dlib nests it)."""
from __future__ import annotations

import math

import numpy as np
import torch


def pack_int(v: int) -> bytes:
    """serialize.h `pack_int`: control byte (0x80 negative | byte count), |v| little-endian, at least 1 byte."""
    neg, a = v < 0, abs(v)
    body = a.to_bytes(max(1, (a.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if neg else 0)]) + body


def float_details(v: float, digits: int) -> tuple[int, int]:
    """float_details.h `convert_from_T`: (mantissa, exponent); digits 24 for float, 53 for double."""
    if v == math.inf:
        return 0, 32000
    if v == -math.inf:
        return 0, 32001
    if math.isnan(v):
        return 0, 32002
    m, e = math.frexp(v)
    mantissa, exponent = int(m * (1 << digits)), e - digits
    for _ in range(8):  # shift off zero low bytes
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
    return mantissa, exponent


def pack_float(v: float, digits: int = 53) -> bytes:
    """A double (digits 53), or a float (24: the value is a float32 first, as it is in C++)."""
    mantissa, exponent = float_details(float(np.float32(v)) if digits == 24 else v, digits)
    return pack_int(mantissa) + pack_int(exponent)  # mantissa first, as serialize.h's code does


def pack_str(s: str) -> bytes:
    return pack_int(len(s)) + s.encode()


def pack_bool(b: bool) -> bytes:
    return b"1" if b else b"0"


def pack_tensor(a: np.ndarray) -> bytes:
    a = np.asarray(a, np.float32)
    dims = tuple(a.shape) + (1,) * (4 - a.ndim)
    return pack_int(2) + b"".join(pack_int(d) for d in dims) + a.astype("<f4").tobytes()


def pack_alias(*dims: int) -> bytes:
    dims = tuple(dims) + (1,) * (4 - len(dims))
    return pack_int(1) + b"".join(pack_int(d) for d in dims)


EMPTY = pack_tensor(np.zeros((0, 0, 0, 0), np.float32))
STATE = b"110" + EMPTY * 3  # add_layer's bools and x_grad, cached_output, params_grad


def con(conv: torch.nn.Conv2d) -> bytes:
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    params = np.concatenate([w.ravel(), b.ravel()])
    return (pack_str("con_4") + pack_tensor(params.reshape(-1, 1, 1, 1)) + pack_int(w.shape[0]) + pack_int(w.shape[2])
            + pack_int(w.shape[3]) + pack_int(conv.stride[0]) + pack_int(conv.stride[1]) + pack_int(conv.padding[0])
            + pack_int(conv.padding[1]) + pack_alias(*w.shape) + pack_alias(1, w.shape[0])
            + b"".join(pack_float(x) for x in (1.0, 1.0, 1.0, 0.0)))


def affine(aff) -> bytes:
    g, b = aff.weight.detach().numpy(), aff.bias.detach().numpy()
    params = np.concatenate([g, b])
    return (pack_str("affine_") + pack_tensor(params.reshape(-1, 1, 1, 1)) + pack_alias(1, len(g))
            + pack_alias(1, len(b)) + pack_int(0))


def pool(kind: str, window: int, stride: int) -> bytes:
    return pack_str(f"{kind}_pool_2") + b"".join(pack_int(v) for v in (window, window, stride, stride, 0, 0))


def fc(linear: torch.nn.Linear) -> bytes:
    w = linear.weight.detach().numpy().T  # in, out
    return (pack_str("fc_2") + pack_int(w.shape[1]) + pack_int(w.shape[0]) + pack_tensor(w.reshape(w.shape[0], w.shape[1], 1, 1))
            + pack_alias(w.shape[0], w.shape[1]) + pack_alias(0, 0, 0, 0) + pack_int(1)
            + b"".join(pack_float(x) for x in (1.0, 1.0, 1.0, 0.0)))


def write_dlib_facenet(model, avg_rgb=(122.782, 117.001, 104.298)) -> bytes:
    """A DlibFaceNet as dlib serialises `anet_type`: loss; every wrapper's version, outermost first;
    the input layer; then each layer's data in forward order (tags and skips write nothing more)."""
    layers: list[bytes | None] = [con(model.stem_conv), affine(model.stem_aff), pack_str("relu_"), pool("max", 3, 2)]
    for stage in model.stages:
        for b in stage:
            layers += [None, con(b.conv1), affine(b.aff1), pack_str("relu_"), con(b.conv2), affine(b.aff2)]
            layers += [None, None, pool("avg", 2, 2)] if b.down else []
            layers += [pack_str("add_prev_"), pack_str("relu_")]
    layers += [pool("avg", 0, 1), fc(model.fc)]
    versions = [1 if x is None else 2 for x in layers]
    versions[0] = 3  # the add_layer holding the input layer
    out = pack_int(1) + pack_str("loss_metric_2") + pack_float(0.04, 24) + pack_float(0.6, 24)
    out += b"".join(pack_int(v) for v in reversed(versions))
    out += pack_str("input_rgb_image_sized") + b"".join(pack_float(v, 24) for v in avg_rgb) + pack_int(150) + pack_int(150)
    for i, data in enumerate(layers):
        if data is not None:
            out += data + (STATE + pack_int(1) if i == 0 else STATE)
    return out
