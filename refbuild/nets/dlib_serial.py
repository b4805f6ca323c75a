"""Our reader of dlib's serialisation format, for the DNN files dlib writes (`.dat`).

dlib is not imported: the format is read from its definition in dlib's sources
(dlib/serialize.h, dlib/float_details.h, dlib/dnn/{core,tensor,layers,input,loss}.h):

- integers (every C++ integral type but char): one control byte, then that many bytes of the
  absolute value, little-endian. Control byte: bit 0x80 = negative, low 4 bits = byte count,
  bits 0x70 always 0. (0 is written as `01 00`.)
- floats and doubles: a `float_details`, i.e. two such integers, the int64 mantissa and then the
  int16 exponent; value = mantissa * 2**exponent (exponents 32000/32001/32002: +inf, -inf, NaN).
  (serialize.h's header comment says "exponent then mantissa"; its code writes the mantissa first.)
- bool: one ASCII byte, '1' or '0'. std::string: integer length, then the bytes.
- tensor (`resizable_tensor`, version 2): num_samples, k, nr, nc as integers, then
  num_samples*k*nr*nc raw little-endian IEEE float32 (not the float format above).
- alias_tensor (version 1): its four dimensions; it names a slice of a layer's `params` tensor.

A network is a nest of templates, each written as its version, then its subnetwork, then (layers
with details only) its own data; so a file holds all the versions, outermost first, then the input
layer, then each layer's data from the input outwards. Tag and skip layers (version 1) write
nothing else, not even their tag number: the topology (which tag an add_prev or a skip names)
comes from the network's definition, not from the file (`refbuild.nets.dlib_resnet`).

`read_dnn(data)` returns the layers in forward order (input first) as plain records with
numpy arrays; it reads the layer kinds dlib_face_recognition_resnet_model_v1.dat uses
(con, affine, relu, max_pool, avg_pool, add_prev, fc; input_rgb_image(_sized); loss_metric)
and raises `DlibFormatError` on anything else or on a byte out of place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from refbuild.errors import RefbuildError

FLOAT_INF, FLOAT_NINF, FLOAT_NAN = 32000, 32001, 32002  # float_details' special exponents


class DlibFormatError(RefbuildError):
    """The bytes are not (or not all) a dlib DNN file of a kind this reader knows."""


class Stream:
    """dlib's primitive types read from bytes, front to back."""

    def __init__(self, data: bytes):
        self.data, self.pos = memoryview(data), 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"dlib file truncated: {n} bytes wanted at offset {self.pos}, "
                                  f"{len(self.data) - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        """An integer of any width (serialize.h `pack_int`)."""
        at = self.pos
        ctrl = self._take(1)[0]
        size = ctrl & 0x0F
        if ctrl & 0x70 or size > 8:
            raise DlibFormatError(f"dlib file: byte {ctrl:#04x} at offset {at} is not an integer's control byte")
        value = int.from_bytes(self._take(size), "little")
        return -value if ctrl & 0x80 else value

    def float(self) -> float:
        """A float or double (`float_details`: mantissa, then exponent), as a Python float."""
        mantissa, exponent = self.int(), self.int()
        if exponent == FLOAT_INF:
            return math.inf
        if exponent == FLOAT_NINF:
            return -math.inf
        if exponent == FLOAT_NAN:
            return math.nan
        return math.ldexp(mantissa, exponent)

    def bool(self) -> bool:
        at, ch = self.pos, bytes(self._take(1))
        if ch not in (b"0", b"1"):
            raise DlibFormatError(f"dlib file: {ch!r} at offset {at} is not a bool ('0' or '1')")
        return ch == b"1"

    def string(self) -> str:
        n = self.int()
        if n < 0:
            raise DlibFormatError(f"dlib file: negative string length {n} at offset {self.pos}")
        return bytes(self._take(n)).decode("latin-1")

    def tensor(self) -> np.ndarray:
        """A `resizable_tensor` (version 2): N, K, NR, NC float32."""
        version = self.int()
        if version != 2:
            raise DlibFormatError(f"dlib file: tensor version {version} at offset {self.pos}; only version 2 is read")
        dims = tuple(self.int() for _ in range(4))
        if min(dims) < 0:
            raise DlibFormatError(f"dlib file: tensor dimensions {dims} at offset {self.pos}")
        n = math.prod(dims)
        return np.frombuffer(self._take(4 * n), dtype="<f4").astype(np.float32).reshape(dims)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        """An `alias_tensor` (version 1): the N, K, NR, NC of a slice of a params tensor."""
        version = self.int()
        if version != 1:
            raise DlibFormatError(f"dlib file: alias_tensor version {version} at offset {self.pos}")
        return tuple(self.int() for _ in range(4))  # type: ignore[return-value]

    def peek_int(self) -> int:
        at = self.pos
        try:
            return self.int()
        finally:
            self.pos = at


@dataclass
class Layer:
    """One layer of a dlib net. kind: con, affine, relu, max_pool, avg_pool, add_prev, fc, or
    tag_or_skip (a tag or skip layer: the file does not say which, nor its tag number)."""

    kind: str
    version: str = ""  # the layer's version string in the file ("con_4", "affine_", ...)
    params: dict = field(default_factory=dict)  # arrays and settings, per kind (see `_read_details`)


@dataclass
class DlibNet:
    loss: dict  # {"kind": "loss_metric", "margin": .., "distance_threshold": ..}
    input: dict  # {"kind": "input_rgb_image", "avg_rgb": (r, g, b), "size": (nr, nc) or None}
    layers: list[Layer]  # forward order: the first layer reads the input


def _slice(params: np.ndarray, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    n = math.prod(shape)
    flat = params.reshape(-1)
    if offset + n > flat.size:
        raise DlibFormatError(f"dlib file: an alias of {shape} at {offset} overruns a params tensor of {flat.size}")
    return flat[offset : offset + n].reshape(shape).copy()


def _read_con(s: Stream, version: str) -> dict:
    params = s.tensor()
    num_filters, nr, nc = s.int(), s.int(), s.int()
    stride, padding = (s.int(), s.int()), (s.int(), s.int())
    filters, biases = s.alias_tensor(), s.alias_tensor()
    _lr, _wd, _blr, _bwd = s.float(), s.float(), s.float(), s.float()
    use_bias = s.bool() if version in ("con_5", "con_6") else True
    use_relu = s.bool() if version == "con_6" else False
    if use_relu:
        raise DlibFormatError("dlib file: a con_ layer with a fused relu (con_6 use_relu); not read here")
    weight = _slice(params, 0, filters)  # num_filters, k, nr, nc: torch's Conv2d layout (cross-correlation)
    if weight.shape[0] != num_filters or weight.shape[2:] != (nr, nc):
        raise DlibFormatError(f"dlib file: con_ filters {weight.shape} do not match {num_filters} x {nr} x {nc}")
    bias = _slice(params, math.prod(filters), (num_filters,)) if use_bias and math.prod(biases) else None
    return {"weight": weight, "bias": bias, "stride": stride, "padding": padding}


def _read_affine(s: Stream, version: str) -> dict:
    if version not in ("affine_", "affine_2"):
        raise DlibFormatError(f"dlib file: {version!r} where an affine_ layer was expected "
                              "(a bn_ layer still in training form is not read here)")
    params = s.tensor()
    gamma, beta = s.alias_tensor(), s.alias_tensor()
    mode = s.int()  # 0: CONV_MODE, one gamma/beta per channel; 1: FC_MODE, one per element
    if version == "affine_2" and s.bool():  # disabled: the layer passes its input through
        return {"gamma": None, "beta": None, "mode": mode}
    return {"gamma": _slice(params, 0, gamma), "beta": _slice(params, math.prod(gamma), beta), "mode": mode}


def _read_pool(s: Stream, version: str) -> dict:
    nr, nc, sy, sx, py, px = (s.int() for _ in range(6))
    return {"window": (nr, nc), "stride": (sy, sx), "padding": (py, px)}  # window 0: the whole map


def _read_fc(s: Stream, version: str) -> dict:
    num_outputs, num_inputs = s.int(), s.int()
    params = s.tensor()
    weights, biases = s.alias_tensor(), s.alias_tensor()
    _mode = s.int()
    _lr, _wd, _blr, _bwd = s.float(), s.float(), s.float(), s.float()
    # params are (num_inputs [+ 1 bias row]) x num_outputs: output = input @ W (+ bias row)
    weight = _slice(params, 0, (num_inputs, num_outputs))
    has_bias = params.size == (num_inputs + 1) * num_outputs and math.prod(biases) > 0
    bias = _slice(params, num_inputs * num_outputs, (num_outputs,)) if has_bias else None
    return {"weight": weight, "bias": bias}


# version string -> (kind, reader of what follows it)
_LAYERS = {
    "con_4": ("con", _read_con), "con_5": ("con", _read_con), "con_6": ("con", _read_con),
    "affine_": ("affine", _read_affine), "affine_2": ("affine", _read_affine),
    "bn_con2": ("affine", _read_affine), "bn_fc2": ("affine", _read_affine),  # refused with a reason
    "relu_": ("relu", lambda s, v: {}),
    "max_pool_2": ("max_pool", _read_pool), "avg_pool_2": ("avg_pool", _read_pool),
    "add_prev_": ("add_prev", lambda s, v: {}),
    "fc_2": ("fc", _read_fc),
}


def _read_layer(s: Stream) -> Layer:
    at = s.pos
    version = s.string()
    if version not in _LAYERS:
        raise DlibFormatError(f"dlib file: unknown layer {version!r} at offset {at}")
    kind, read = _LAYERS[version]
    return Layer(kind, version, read(s, version))


def _skip_add_layer_state(s: Stream, version: int, is_input: bool) -> None:
    """What add_layer writes after its layer: 3 bools and its cached tensors (outputs, gradients)."""
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, get_output_..._disabled
        s.bool()
    n_tensors = 3 if (is_input or version >= 2) else 2  # x_grad, cached_output, then grad_final / params_grad
    for _ in range(n_tensors):
        s.tensor()
    if is_input and version >= 3:
        s.int()  # _sample_expansion_factor


def _read_input(s: Stream) -> dict:
    at = s.pos
    name = s.string()
    if name not in ("input_rgb_image", "input_rgb_image_sized"):
        raise DlibFormatError(f"dlib file: input layer {name!r} at offset {at}; only input_rgb_image(_sized) is read")
    avg = (s.float(), s.float(), s.float())
    size = (s.int(), s.int()) if name == "input_rgb_image_sized" else None
    return {"kind": name, "avg_rgb": avg, "size": size}


def read_dnn(data: bytes) -> DlibNet:
    """Parse a whole dlib DNN file (`add_loss_layer<...>` as written by `serialize(net, out)`)."""
    s = Stream(data)
    if s.int() != 1:
        raise DlibFormatError("not a dlib DNN file: the loss layer's version is not 1")
    loss_name = s.string()
    if loss_name != "loss_metric_2":
        raise DlibFormatError(f"dlib file: loss {loss_name!r}; only loss_metric_2 (the face recogniser's) is read")
    loss = {"kind": "loss_metric", "margin": s.float(), "distance_threshold": s.float()}
    versions = []  # outermost first: 2 an add_layer, 1 a tag or skip layer, 2-3 the add_layer holding the input
    while s.peek_int() in (1, 2, 3):  # the input layer starts with its name (an integer length > 3)
        versions.append(s.int())
    if not versions or versions[-1] not in (2, 3):
        raise DlibFormatError(f"dlib file: no layer holding the input found before offset {s.pos}")
    input_version = versions.pop()
    inp = _read_input(s)
    first = _read_layer(s)  # the layer the innermost add_layer holds, on the input
    _skip_add_layer_state(s, input_version, is_input=True)
    layers = [first]
    for v in reversed(versions):
        if v == 1:
            layers.append(Layer("tag_or_skip"))
        else:
            layers.append(_read_layer(s))
            _skip_add_layer_state(s, v, is_input=False)
    if s.pos != len(s.data):
        raise DlibFormatError(f"dlib file: {len(s.data) - s.pos} bytes left over after the network")
    return DlibNet(loss=loss, input=inp, layers=layers)
