"""Gradient compression on push: codecs, error feedback, malformed payloads, convergence.

The training and rejection tests run the PS over real gRPC on loopback.
"""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
import torch

from elasticd.codec_names import NAMES
from elasticd.compression import (
    CODECS,
    CompressionError,
    GradientEncoder,
    check_payload,
    codec_for,
    decode_payload,
)
from elasticd.jobspec import COMPRESSIONS
from elasticd.placement import TensorSpec, place
from elasticd.ps_client import PSTier
from elasticd.rpc import ps_pb2
from elasticd.task import load_task
from elasticd.wire import TensorHeader, as_bytes, dtype_name, header_of
from tests.fixtures.ps import JOB, PS, PSCluster
from tests.test_ps_service import assert_same_state, shard_state, tiny_tensors

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

LINREG = str(Path(__file__).resolve().parents[1] / "examples" / "linreg.py")


def round_trip(spec: str, g: torch.Tensor, seed: int = 0) -> torch.Tensor:
    codec = codec_for(spec, seed)
    parts = codec.encode(g)
    target = header_of("g", g)
    check_payload(codec, [target], codec.part_headers("g", parts))
    (out,) = decode_payload(codec, [target], parts)
    assert out.dtype == g.dtype and out.shape == g.shape
    return out


def grad(shape: tuple[int, ...] = (64, 33), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- names ------------------------------------------------------------------------------


def test_every_codec_is_a_job_spec_choice() -> None:
    assert set(CODECS) <= set(COMPRESSIONS)
    assert set(CODECS) == set(NAMES)  # the torch-free names are the codecs there are


@pytest.mark.parametrize(
    ("spec", "name"),
    [("", "none"), ("none", "none"), ("fp16", "fp16"), ("bf16", "bf16"), ("topk", "topk:0.01"),
     ("topk:0.25", "topk:0.25"), ("qsgd", "qsgd:127"), ("qsgd:4", "qsgd:4")],
)  # fmt: skip
def test_codec_names(spec: str, name: str) -> None:
    assert codec_for(spec).name == name


@pytest.mark.parametrize(
    ("spec", "message"),
    [("zstd", "unknown compression 'zstd'"), ("fp16:2", "takes no argument"),
     ("topk:0", "ratio must be in (0, 1]"), ("topk:x", "ratio must be a number"),
     ("qsgd:200", "levels must be in [1, 127]"), ("qsgd:1.5", "must be an integer")],
)  # fmt: skip
def test_bad_codec_names(spec: str, message: str) -> None:
    with pytest.raises(CompressionError, match=message.replace("(", r"\(").replace("[", r"\[")):
        codec_for(spec)


# -- codecs -------------------------------------------------------------------------------


def test_casts_keep_values_to_their_precision() -> None:
    g = grad()
    assert torch.allclose(round_trip("fp16", g), g, rtol=1e-3, atol=1e-6)
    assert torch.allclose(round_trip("bf16", g), g, rtol=1e-2, atol=1e-6)
    huge = torch.tensor([1e6, -1e6, 1.0])
    assert round_trip("fp16", huge).tolist() == [65504.0, -65504.0, 1.0]  # clamped, not inf
    assert round_trip("bf16", huge)[0].item() == pytest.approx(1e6, rel=1e-2)


def test_topk_sends_the_largest_entries() -> None:
    g = grad()
    out = round_trip("topk:0.1", g)
    k = math.ceil(0.1 * g.numel())
    sent = out != 0
    assert int(sent.sum()) == k
    assert torch.equal(out[sent], g[sent])
    assert g[sent].abs().min() >= g[~sent].abs().max()
    codec = codec_for("topk")
    wire = sum(p.numel() * p.element_size() for p in codec.encode(g))
    assert wire == 8 * math.ceil(0.01 * g.numel())  # int32 index + float32 value


def test_topk_error_feedback_delivers_every_coordinate() -> None:
    encoder = GradientEncoder(codec_for("topk:0.05"))
    target = TensorHeader("g", "float32", (40,))
    sent_total = torch.zeros(40)
    grads_total = torch.zeros(40)
    for step in range(60):
        g = grad((40,), step)
        headers, parts, pending = encoder.encode("g", g)
        assert [h.key for h in headers] == ["g#indices", "g#values"]
        (decoded,) = decode_payload(encoder.codec, [target], parts)
        sent_total += decoded
        grads_total += g
        encoder.commit({"g": pending})
        # Nothing is lost: what was sent plus what is kept is what was computed.
        assert torch.allclose(sent_total + encoder.residuals["g"], grads_total, atol=1e-4)
    # An uncommitted (refused) push leaves the residual as it was.
    before = encoder.residuals["g"].clone()
    encoder.encode("g", grad((40,), 99))
    assert torch.equal(encoder.residuals["g"], before)


def test_qsgd_is_unbiased_and_bounded() -> None:
    g = grad((256,))
    codec = codec_for("qsgd:4", seed=1)
    target = header_of("g", g)
    total = torch.zeros_like(g)
    n = 2000
    for _ in range(n):
        parts = codec.encode(g)
        scale, levels = parts
        assert levels.dtype == torch.int8 and int(levels.abs().max()) <= 4
        assert scale.item() == pytest.approx(g.abs().max().item() / 4)
        total += decode_payload(codec, [target], parts)[0]
    mean = total / n
    # Each entry's quantization variance is at most scale^2 / 4; the mean of n draws is close.
    bound = 5 * (g.abs().max().item() / 4) / 2 / math.sqrt(n)
    assert (mean - g).abs().max().item() < bound
    wire = sum(p.numel() * p.element_size() for p in codec.encode(g))
    assert wire == g.numel() + 4


def test_qsgd_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    codec_for("qsgd").encode(grad())
    assert torch.equal(torch.rand(3), expected)


# -- training through the PS ------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "fp16", "bf16", "topk", "qsgd"])
def test_linreg_trains_with_each_codec(ps_cluster: PSCluster, compression: str) -> None:
    servers = ps_cluster.start(2)
    task = load_task(LINREG, 32, 0)
    model = task.build_model()
    params = dict(model.named_parameters())
    specs = [TensorSpec(n, dtype_name(p.dtype), tuple(p.shape)) for n, p in params.items()]
    placement = place(specs, [s.ps_id for s in servers])
    assert len(placement.ps_ids) == 2  # weight on one PS, bias on the other
    tier = ps_cluster.tier(servers, placement)
    data = {n: p.detach() for n, p in params.items()}
    tier.init(data, "sgd", {"lr": 0.1}, -1, 1, 0)

    losses = []
    for index in range(100):
        versions = tier.pull_into(data)
        model.zero_grad(set_to_none=True)
        loss = task.loss(model, task.batch(index))
        loss.backward()
        losses.append(loss.item())
        outcomes = tier.push({n: p.grad for n, p in params.items()}, versions, compression)
        assert all(o.applied for o in outcomes.values())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last * 10 <= first, f"{compression}: loss {first:.4f} -> {last:.4f}"
    for ps in servers:
        assert ps.servicer.shard(JOB).version == 100


# -- malformed compressed pushes -----------------------------------------------------------

W, B = TensorHeader("w", "float32", (3, 4)), TensorHeader("b", "float32", (4,))


def meta(key: str, dtype: str, shape: tuple[int, ...]) -> ps_pb2.TensorMeta:
    return ps_pb2.TensorMeta(key=key, dtype=dtype, shape=shape)


def request(compression: str, metas: list, tensors: list[torch.Tensor]) -> list:
    header = ps_pb2.PushRequest(
        header=ps_pb2.PushHeader(
            fence=ps_pb2.Fence(job_id=JOB, generation=1),
            worker_id="w.0",
            base_version=1,
            compression=compression,
            payload=metas,
        )
    )
    chunks = [
        ps_pb2.PushRequest(chunk=ps_pb2.Chunk(index=i, offset=0, data=bytes(as_bytes(t))))
        for i, t in enumerate(tensors)
    ]
    return [header, *chunks]


def topk_push(w_index: list[int], w_values: list[float], index_dtype=torch.int32) -> list:
    wi = torch.tensor(w_index, dtype=index_dtype)
    wv = torch.tensor(w_values)
    bi, bv = torch.tensor([0], dtype=torch.int32), torch.tensor([1.0])
    metas = [
        meta("w#indices", dtype_name(index_dtype), (len(w_index),)),
        meta("w#values", "float32", (len(w_values),)),
        meta("b#indices", "int32", (1,)),
        meta("b#values", "float32", (1,)),
    ]
    return request("topk:0.1", metas, [wi, wv, bi, bv])


def qsgd_push(scale: float, w_shape=(3, 4), w_dtype=torch.int8) -> list:
    metas = [
        meta("w#scale", "float32", ()),
        meta("w#levels", dtype_name(w_dtype), w_shape),
        meta("b#scale", "float32", ()),
        meta("b#levels", "int8", (4,)),
    ]
    tensors = [
        torch.tensor(scale),
        torch.ones(w_shape, dtype=w_dtype),
        torch.tensor(0.5),
        torch.ones(4, dtype=torch.int8),
    ]
    return request("qsgd", metas, tensors)


def cast_push(w_dtype: str = "float16", w_shape=(3, 4)) -> list:
    metas = [meta("w#cast", w_dtype, w_shape), meta("b#cast", "float16", (4,))]
    w = torch.ones(w_shape, dtype=getattr(torch, "bfloat16" if w_dtype == "bfloat16" else w_dtype))
    return request("fp16", metas, [w, torch.ones(4, dtype=torch.float16)])


MALFORMED = {
    "topk-index-out-of-range": (topk_push([0, 12], [1.0, 2.0]), "index out of range [0, 12)"),
    "topk-negative-index": (topk_push([-1], [1.0]), "index out of range"),
    "topk-repeated-index": (topk_push([3, 3], [1.0, 2.0]), "top-k indices repeat"),
    "topk-more-entries-than-elements": (
        topk_push(list(range(13)), [1.0] * 13),
        "13 entries for a tensor of 12 elements",
    ),
    "topk-float-indices": (
        topk_push([1], [1.0], index_dtype=torch.float32),
        "must be 1-d int32 or int64 indices",
    ),
    "topk-values-unlike-indices": (
        request(
            "topk",
            [
                meta("w#indices", "int32", (2,)),
                meta("w#values", "float32", (3,)),
                meta("b#indices", "int32", (1,)),
                meta("b#values", "float32", (1,)),
            ],
            [
                torch.tensor([0, 1], dtype=torch.int32),
                torch.ones(3),
                torch.tensor([0], dtype=torch.int32),
                torch.ones(1),
            ],
        ),  # fmt: skip
        "like its indices",
    ),
    "qsgd-nan-scale": (qsgd_push(float("nan")), "scale nan is not a finite number"),
    "qsgd-negative-scale": (qsgd_push(-1.0), "scale -1.0 is not a finite number"),
    "qsgd-wrong-shape": (qsgd_push(1.0, w_shape=(4, 3)), "must be int8[3, 4]"),
    "qsgd-wide-levels": (qsgd_push(1.0, w_dtype=torch.int16), "must be int8[3, 4]"),
    "cast-wrong-dtype": (cast_push("bfloat16"), "expected float16[3, 4]"),
    "cast-wrong-shape": (cast_push(w_shape=(12,)), "is float16[12], expected float16[3, 4]"),
    "parts-missing": (
        request("fp16", [meta("w#cast", "float16", (3, 4))], [torch.ones(3, 4).half()]),
        "payload lists 1 parts; the shard's 2 tensors need 1 each",
    ),
    "parts-misnamed": (
        request(
            "fp16",
            [meta("b#cast", "float16", (4,)), meta("w#cast", "float16", (3, 4))],
            [torch.ones(4).half(), torch.ones(3, 4).half()],
        ),
        "parts ['b#cast'], expected ['w#cast']",
    ),
    "payload-without-compression": (
        request("none", [meta("w", "float32", (3, 4))], [torch.ones(3, 4)]),
        "an uncompressed push lists no payload parts",
    ),
    "bytes-short-of-payload": (
        request(
            "fp16",
            [meta("w#cast", "float16", (3, 4)), meta("b#cast", "float16", (4,))],
            [torch.ones(3, 4).half()],
        ),
        "'b#cast': 0 bytes received, expected 8",
    ),  # fmt: skip
    "bad-codec-argument": (request("topk:2", [], []), "ratio must be in (0, 1]"),
}


@pytest.fixture
def tiny(ps_cluster: PSCluster) -> tuple[PS, PSTier]:
    (ps,) = ps_cluster.start(1)
    placement = place(
        [TensorSpec("w", "float32", (3, 4)), TensorSpec("b", "float32", (4,))], ["ps-0"]
    )
    tier = ps_cluster.tier([ps], placement)
    tier.init(tiny_tensors(), "sgd", {"lr": 0.1, "momentum": 0.9}, -1, 1, 0)
    tier.push({k: torch.ones_like(v) for k, v in tiny_tensors().items()}, {ps.ps_id: 0})
    return ps, tier


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_compressed_push_is_rejected(
    ps_cluster: PSCluster, tiny: tuple[PS, PSTier], case: str
) -> None:
    ps, tier = tiny
    stub = ps_cluster.stub(ps)
    requests, message = MALFORMED[case]
    before = shard_state(ps)
    with pytest.raises(grpc.RpcError) as err:
        stub.Push(iter(requests), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()
    assert_same_state(before, shard_state(ps))
    # Still serving: a well-formed compressed push from the same client applies.
    outcome = tier.push(
        {k: torch.ones_like(v) for k, v in tiny_tensors().items()}, {"ps-0": 1}, "qsgd"
    )
    assert (outcome["ps-0"].version, outcome["ps-0"].applied) == (2, True)
