"""The gather-on-load Triton expert kernels against their plain PyTorch reference, forward and
backward, in Triton's interpreter on CPU tensors; and the MoE layer through them against its
default grouped-GEMM path."""

import argparse
import json

import pytest
import torch

triton = pytest.importorskip("triton")

from condcomp.bench.moe import check_args  # noqa: E402
from condcomp.conditional.experts import expert_kernel  # noqa: E402
from condcomp.conditional.moe import MoE  # noqa: E402
from condcomp.errors import CondcompError, ConfigError  # noqa: E402
from condcomp.kernels import triton_moe  # noqa: E402
from condcomp.kernels.expert_ffn import resolve_impl, swiglu_experts  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    # triton.jit reads TRITON_INTERPRET when it wraps a function; the kernels are wrapped on
    # first use, once per value of the flag (triton_moe.kernels), so setting it per test runs
    # them in the interpreter here and leaves every other test file's kernels compiled.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def routed(T, D, H, E, k, dtype=torch.float32, used_experts=None, dropped=0):
    """Inputs of :func:`swiglu_experts`: tokens, expert weights (leaves), a random top-k
    routing over ``used_experts`` (default: all E), its first ``dropped`` slots dropped."""
    used = used_experts or list(range(E))
    x = torch.randn(T, D).to(dtype).requires_grad_()
    w1, w3 = ((torch.randn(E, D, H) / D**0.5).to(dtype).requires_grad_() for _ in range(2))
    w2 = (torch.randn(E, H, D) / H**0.5).to(dtype).requires_grad_()
    ids_TK = torch.stack([torch.tensor(used)[torch.randperm(len(used))[:k]] for _ in range(T)])
    weights_TK = torch.rand(T, k).requires_grad_()
    ids_N = ids_TK.reshape(-1).clone()
    ids_N[:dropped] = E  # a virtual expert past the last, as the layer sorts dropped slots
    order_N = torch.argsort(ids_N, stable=True)
    offsets_E = torch.cumsum(torch.bincount(ids_N, minlength=E + 1)[:E], 0)
    return (x, w1, w2, w3, weights_TK), (order_N, offsets_E)


def forward_backward(impl, leaves, routing, grad_TD=None):
    x, w1, w2, w3, weights_TK = leaves
    order_N, offsets_E = routing
    y = swiglu_experts(x, w1, w2, w3, order_N, offsets_E, weights_TK, impl=impl)
    grad_TD = torch.randn(y.shape).to(y.dtype) if grad_TD is None else grad_TD
    return (y, *torch.autograd.grad(y, leaves, grad_TD)), grad_TD


NAMES = ("y", "grad x", "grad w1", "grad w2", "grad w3", "grad routing weights")


@pytest.mark.parametrize("shape", [
    dict(T=9, D=24, H=40, E=4, k=2),  # D, H not multiples of the tiles
    dict(T=7, D=20, H=72, E=6, k=1, used_experts=[1, 4]),  # empty experts, first and last
    dict(T=1, D=16, H=24, E=4, k=3),  # one token
    dict(T=3, D=16, H=24, E=128, k=8),  # many experts, few tokens
    dict(T=70, D=16, H=24, E=2, k=2),  # an expert's rows over several row tiles
    dict(T=8, D=16, H=24, E=4, k=2, dropped=5),  # capacity-dropped slots add nothing
])
def test_kernels_equal_the_reference_in_fp32(shape):
    leaves, routing = routed(**shape)
    ref, grad_TD = forward_backward("reference", leaves, routing)
    out, _ = forward_backward("triton", leaves, routing, grad_TD)
    for name, a, b in zip(NAMES, out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    if shape.get("dropped"):
        # The tokens whose every slot was dropped come out zero, with zero input gradients.
        assert shape["k"] == 2 and out[0][:2].abs().max() == 0 and out[1][:2].abs().max() == 0


def test_kernels_in_bf16_stay_near_the_fp32_reference():
    leaves, routing = routed(T=12, D=24, H=40, E=4, k=2, dtype=torch.bfloat16)
    out, grad_TD = forward_backward("triton", leaves, routing)
    leaves_fp32 = [t.detach().float().requires_grad_() for t in leaves]
    ref, _ = forward_backward("reference", leaves_fp32, routing, grad_TD.float())
    assert out[0].dtype == torch.bfloat16
    for name, a, b in zip(NAMES, out, ref):
        # bf16 keeps 8 bits of mantissa: a relative error of a few 1e-3 per element.
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 2e-2, f"{name}: relative error {rel:.3g}"


def test_block_schedule_covers_each_row_once_in_its_experts_blocks():
    offsets_E = torch.tensor([0, 0, 130, 131, 131, 200, 200])  # empty, 130, 1, empty, 69, empty
    sched = triton_moe.BlockSchedule(offsets_E, rows=230)  # rows 200-229: dropped slots
    covered = torch.zeros(230, dtype=torch.int64)
    bounds = list(zip([0, *offsets_E[:-1].tolist()], offsets_E.tolist()))
    for e, start, end in zip(sched.expert_B.tolist(), sched.start_B.tolist(),
                             sched.end_B.tolist()):
        if start < end:
            first, last = bounds[e] if e >= 0 else (200, 230)  # -1: rows of no expert
            assert first <= start and end == last, (e, start, end)
            covered[start:min(end, start + triton_moe.BLOCK_M)] += 1
    assert covered.eq(1).all()


@pytest.mark.parametrize("options", [dict(top_k=2), dict(top_k=1, capacity_factor=1.0)])
def test_moe_layer_through_the_kernels_equals_its_default_path(options):
    moe = MoE(d_model=16, d_expert=40, num_experts=4, **options).train()
    x = torch.randn(2, 9, 16, requires_grad=True)
    grad = torch.randn(2, 9, 16)
    results = []
    for kernel in ("grouped_mm", "triton"):
        with expert_kernel(moe, kernel):
            y = moe(x)
        params = [x, *moe.parameters()]
        results.append((y, *torch.autograd.grad(y, params, grad)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_moe_layer_through_the_kernels_under_bf16_autocast():
    # As training runs it: fp32 weights cast to bf16 on the way in, bf16 output, fp32 grads.
    moe = MoE(d_model=16, d_expert=40, num_experts=4, top_k=2).train()
    x = torch.randn(2, 9, 16)
    results = []
    for kernel in ("grouped_mm", "triton"):
        with expert_kernel(moe, kernel), torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(x)
        results.append((y, *torch.autograd.grad(y.float().square().sum(), [*moe.parameters()])))
    assert results[1][0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in results[1][1:])
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


def test_impl_choice_and_its_errors(monkeypatch):
    x = torch.zeros(2, 4)
    assert resolve_impl("auto", x) == "reference"  # CPU tensors: the reference
    assert resolve_impl("triton", x) == "triton"  # under the interpreter
    with pytest.raises(ConfigError, match="choose one of auto, triton, reference"):
        resolve_impl("cutlass", x)
    with pytest.raises(ConfigError, match="choose one of grouped_mm"):
        with expert_kernel(MoE(d_model=8, d_expert=8, num_experts=2), "fast"):
            pass
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(CondcompError, match="TRITON_INTERPRET=1"):
        resolve_impl("triton", x)


def test_bench_moe_times_the_kernels_beside_the_default_path(tmp_path, monkeypatch):
    from condcomp.cli import main

    launches = []
    up = triton_moe.swiglu_up
    monkeypatch.setattr(triton_moe, "swiglu_up", lambda *a: launches.append(1) or up(*a))
    out = tmp_path / "moe.json"
    assert main(["bench", "moe", "--d-model", "16", "--d-ff", "32", "--tokens", "32",
                 "--experts", "4:2", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--peer", "none", "--expert-kernel", "triton", "--json", str(out)]) == 0
    rows = {(r["layer"], r["E:k"]): r for r in json.loads(out.read_text())["rows"]}
    assert ("condcomp MoE", "4:2") in rows
    assert rows["condcomp MoE [triton experts]", "4:2"]["tokens_per_s"] > 0
    assert launches  # the row timed the kernels, not the default path


def test_bench_refuses_to_count_bytes_of_kernels_outside_the_graph():
    args = argparse.Namespace(count_bytes=True, expert_kernel="triton", profile=False,
                              ep_path=False)
    with pytest.raises(ConfigError, match="drop --expert-kernel"):
        check_args(args)


# Each launch of the autograd functions: _rows_gemm's modes and _expert_weight_grad's.
ROWS_GEMM_MODES = {
    "up + SwiGLU": dict(GATHER_A=True, SWIGLU=True),
    "down + combine": dict(SCALE=True, SCATTER_C=True),
    "grad h + grad routing weights": dict(GATHER_A=True, SCALE=True, ROW_DOT=True),
    "grad x": dict(DUAL=True, SCATTER_C=True),
}
WEIGHT_GRAD_MODES = {"grad w1, w3": dict(GATHER_A=True), "grad w2": dict(GATHER_G=True, SCALE=True)}


def pointer_type(name: str, activations: str) -> str:
    """The element type behind kernel argument ``name`` (``..._ptr``) in the launches."""
    base = name.removesuffix("_ptr")
    if base in ("a_rows", "c_rows", "g_rows"):
        return "*i64"  # token and slot indices (argsort's int64)
    if base.startswith("block") or base in ("starts", "ends"):
        return "*i32"  # the block schedule
    if base in ("scale", "dot", "out"):
        return "*fp32"  # routing weights, row dots, weight gradients
    return "*" + activations


def compile_for_hopper(fn, activations: str, constants: dict) -> bytes:
    """``fn`` compiled for an H100 (sm_90) by Triton's whole pipeline, ptxas included: no GPU
    needed. Flags not in ``constants`` are off."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    flags = ("GATHER_A", "GATHER_G", "DUAL", "SWIGLU", "SCALE", "SCATTER_C", "ROW_DOT")
    constants = {**{f: False for f in flags if f in fn.arg_names}, **constants}
    signature = {name: "constexpr" if name in constants
                 else pointer_type(name, activations) if name.endswith("_ptr") else "i32"
                 for name in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, constants),
                          target=GPUTarget("cuda", 90, 32)).asm["cubin"]


@pytest.mark.parametrize("activations", ["bf16", "fp32"])
def test_kernels_compile_for_an_h100_without_a_gpu(monkeypatch, tmp_path, activations):
    # The interpreter runs the kernels' Python; only Triton's compiler checks that they are
    # kernels Triton compiles (constexpr branches, dynamic loop bounds, the tile shapes).
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no CUDA backend")
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compiled here, not found cached
    rows_gemm, weight_grad, swiglu_grad = triton_moe.kernels()
    tiles = dict(BLOCK_M=triton_moe.BLOCK_M, BLOCK_N=triton_moe.BLOCK_N,
                 BLOCK_K=triton_moe.BLOCK_K, FP32_DOT=activations == "fp32")
    for flags in ROWS_GEMM_MODES.values():
        assert compile_for_hopper(rows_gemm, activations, {**flags, **tiles})
    for flags in WEIGHT_GRAD_MODES.values():
        assert compile_for_hopper(weight_grad, activations, {**flags, **tiles})
    assert compile_for_hopper(swiglu_grad, activations,
                              dict(BLOCK=triton_moe.SWIGLU_GRAD_BLOCK))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_on_cuda_equal_the_reference(monkeypatch, dtype):
    monkeypatch.delenv("TRITON_INTERPRET")
    leaves, routing = routed(T=300, D=128, H=200, E=8, k=2, dtype=dtype, dropped=7)
    leaves = [t.detach().cuda().requires_grad_() for t in leaves]
    routing = [t.cuda() for t in routing]
    out, grad_TD = forward_backward("auto", leaves, routing)
    ref, _ = forward_backward("reference", leaves, routing, grad_TD)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(NAMES, out, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=name)


def _moe_model_cfg(**ffn):
    from helpers import tiny_model_cfg

    return tiny_model_cfg(ffn=dict(kind="moe", layers="all",
                                   options=dict(num_experts=4, top_k=2, **ffn)))


def test_the_config_key_runs_a_models_experts_through_the_kernels():
    from condcomp.model import TransformerLM

    torch.manual_seed(0)
    cfgs = [_moe_model_cfg(), _moe_model_cfg(expert_kernel="triton")]
    for cfg in cfgs:
        cfg.validate()
    default, through = (TransformerLM(cfg) for cfg in cfgs)
    through.load_state_dict(default.state_dict())
    assert {m.experts.kernel for m in through.modules() if isinstance(m, MoE)} == {"triton"}
    tokens = torch.randint(0, 97, (2, 12))
    losses = [m(tokens, tokens).loss for m in (default, through)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(loss, list(m.parameters()))
             for loss, m in zip(losses, (default, through))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ffn,model,message", [
    (dict(expert_kernel="triton"), dict(activation="gelu"), "another activation"),
    (dict(expert_kernel="auto", routing="expert_choice", capacity_factor=2.0), {},
     "routing = .expert_choice."),
    (dict(expert_kernel="auto", expert_dropout=0.1), {}, "expert_dropout > 0"),
    (dict(expert_kernel="cutlass"), {}, "is unknown"),
])
def test_the_kernels_refuse_layers_they_cannot_run(ffn, model, message):
    from helpers import tiny_model_cfg

    cfg = tiny_model_cfg(**model, ffn=dict(kind="moe", layers="all",
                                           options=dict(num_experts=4, top_k=2, **ffn)))
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
