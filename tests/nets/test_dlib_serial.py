"""Our reader of dlib's serialisation (refbuild/nets/dlib_serial.py) on bytes the test writes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dlib_writer import pack_alias, pack_bool, pack_float, pack_int, pack_str, pack_tensor, write_dlib_facenet
from refbuild.errors import RefbuildError
from refbuild.nets.dlib_serial import DlibFormatError, Stream, read_dnn


@pytest.mark.parametrize("v", [0, 1, -1, 2, 127, 128, 255, 256, -256, 0x1280, 65535, -65536, 2**31 - 1, -(2**31),
                               2**63 - 1, -(2**63 - 1)])
def test_integers_round_trip(v):
    data = pack_int(v)
    s = Stream(data)
    assert s.int() == v and s.pos == len(data)


def test_integer_bytes_are_dlibs():
    """Byte-exact cases as dlib writes them (and as they stand in dlib_face_recognition_resnet_model_v1.dat)."""
    assert pack_int(0) == b"\x01\x00" and pack_int(150) == b"\x01\x96" and pack_int(-5) == b"\x81\x05"
    assert Stream(b"\x02\x80\x12").int() == 4736  # the stem conv's params: 32*3*7*7 + 32
    assert Stream(b"\x02\x00\x01").int() == 256


FLOATS = [0.0, 1.0, -1.0, 0.5, -2.5, 0.04, 0.6, 122.782, 1e-30, -3.4e38]


@pytest.mark.parametrize("v", FLOATS + [5e-324, 1.7976931348623157e308])
def test_doubles_round_trip(v):
    data = pack_float(v, 53)
    s = Stream(data)
    assert s.float() == v and s.pos == len(data)


@pytest.mark.parametrize("v", FLOATS + [1.4e-45, 3.4028234663852886e38])
def test_floats_round_trip(v):
    expect = float(np.float32(v))
    data = pack_float(expect, 24)
    s = Stream(data)
    assert s.float() == expect and s.pos == len(data)


def test_float_specials_and_dlibs_bytes():
    for v in (math.inf, -math.inf):
        assert Stream(pack_float(v)).float() == v
    assert math.isnan(Stream(pack_float(math.nan)).float())
    # the file's loss margin and distance threshold, byte for byte: mantissa first, then exponent
    assert Stream(bytes.fromhex("030ad7a3811c")).float() == float(np.float32(0.04))
    assert Stream(bytes.fromhex("039a99998118")).float() == float(np.float32(0.6))


def test_strings_bools_tensors():
    t = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4) - 7.5
    data = pack_str("con_4") + pack_bool(True) + pack_bool(False) + pack_tensor(t) + pack_alias(32, 3, 7, 7)
    s = Stream(data)
    assert s.string() == "con_4" and s.bool() is True and s.bool() is False
    assert np.array_equal(s.tensor(), t) and s.alias_tensor() == (32, 3, 7, 7) and s.pos == len(data)


def test_bad_bytes_say_where():
    with pytest.raises(DlibFormatError, match="truncated"):
        Stream(b"\x04\x01\x02").int()
    with pytest.raises(DlibFormatError, match="control byte"):
        Stream(b"\x31").int()
    with pytest.raises(DlibFormatError, match="bool"):
        Stream(b"x").bool()
    assert issubclass(DlibFormatError, RefbuildError)  # the CLI prints it as one line


def test_a_whole_net_round_trips():
    """A random DlibFaceNet written as dlib nests it, read back: every tensor and setting in place."""
    import torch

    from refbuild.nets.dlib_resnet import DlibFaceNet, state_from_dlib

    torch.manual_seed(0)
    model = DlibFaceNet()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    data = write_dlib_facenet(model)
    net = read_dnn(data)
    assert net.loss["kind"] == "loss_metric" and net.loss["distance_threshold"] == float(np.float32(0.6))
    assert net.input["size"] == (150, 150) and net.input["avg_rgb"][0] == float(np.float32(122.782))
    kinds = [layer.kind for layer in net.layers]
    assert kinds.count("con") == 29 and kinds.count("affine") == 29 and kinds.count("add_prev") == 14
    state = state_from_dlib(net, DlibFaceNet())
    for k, v in model.state_dict().items():
        assert torch.equal(state[k].view_as(v), v), k
    with pytest.raises(DlibFormatError, match="left over"):
        read_dnn(data + b"\x00")
    with pytest.raises(DlibFormatError, match="truncated"):
        read_dnn(data[:-5])


def test_the_shipped_file_parses_to_the_end():
    """The real .dat (a package, not a photo): every byte accounted for, 29 convs, 128-D output."""
    from refbuild.nets.dlib_resnet import recogniser_weights_path

    try:
        path = recogniser_weights_path()
    except RefbuildError as e:
        pytest.skip(str(e))
    net = read_dnn(path.read_bytes())
    convs = [layer for layer in net.layers if layer.kind == "con"]
    assert len(convs) == 29 and net.layers[-1].params["weight"].shape == (256, 128)
    assert convs[0].params["weight"].shape == (32, 3, 7, 7) and convs[0].params["padding"] == (0, 0)
    assert net.input["size"] == (150, 150)
