"""The GPU fast path, checked on the CPU: which attention route each q/k PE and kernel takes, and
that the tensors handed to torch's fused SDPA under bf16 autocast are ones its flash /
memory-efficient CUDA kernels accept; train.precision=auto; bench's device errors and --compile."""
import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.models import kernels


def flash_ok(q, k, v):
    """torch's CUDA flash-attention constraints (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp:
    check_tensor_shapes, check_last_dim_stride_equals_1, check_dtypes_low_precision,
    check_head_dim_size_flash): 4-D, fp16/bf16 alike, last dim contiguous, equal head dims,
    a multiple of 8 and at most 256."""
    d = q.shape[-1]
    return (all(t.dim() == 4 and t.stride(-1) == 1 and t.dtype == q.dtype for t in (q, k, v))
            and q.dtype in (torch.bfloat16, torch.float16) and k.shape[-1] == d == v.shape[-1]
            and d % 8 == 0 and d <= 256)


def efficient_ok(q, k, v):
    """The memory-efficient kernel's (check_head_dim_size_mem_efficient): q/k widths equal, every width
    a multiple of 8 in half precision; v may be narrower than q/k."""
    return (all(t.dim() == 4 and t.stride(-1) == 1 and t.dtype == q.dtype for t in (q, k, v))
            and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] == k.shape[-1]
            and q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0)


def test_routes():
    assert kernels.fused_route("cuda", torch.bfloat16, 32, 32) and kernels.fused_route("cuda", torch.bfloat16, 64, 32)
    assert kernels.fused_route("cuda", torch.float32, 32, 32)
    assert kernels.fused_route("cpu", torch.float32, 32, 32)
    assert not kernels.fused_route("cpu", torch.bfloat16, 32, 32)  # written out: faster on CPU
    assert not kernels.fused_route("cpu", torch.float32, 64, 32)  # PoPE on CPU


@pytest.mark.parametrize("qk_pe", ["none", "rope_axial", "rope_mixed", "string_cayley", "string_reflection", "pope"])
@pytest.mark.parametrize("attn", ["standard", "differential", "diffsim"])
def test_qk_pes_hand_sdpa_flash_eligible_bf16_tensors(qk_pe, attn, monkeypatch):
    """Under bf16 autocast, as on CUDA (the route forced to the fused one), every kernel that uses SDPA
    gets bf16, last-dim-contiguous q/k/v: flash-eligible where q/k and v are equally wide; PoPE's
    twice-wide q/k, and the differential kernels' twice-wide values (2d per differential head, as
    in the reference code), go to the memory-efficient kernel. The rotations themselves run in
    float32 (their tables are float32 and autocast does not touch them)."""
    real = F.scaled_dot_product_attention
    seen = []

    def recorder(q, k, v, *args, **kwargs):
        seen.append((q, k, v))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(kernels, "fused_route", lambda *a: True)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recorder)
    model = vitlab.create_model(img_size=16, patch_size=4, in_chans=3, num_classes=4, dim=64, depth=2, heads=2,
                                qk_pe=qk_pe, attn=attn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 16, 16)).float().sum().backward()
    calls_per_block = 2 if attn == "differential" else 1
    assert len(seen) == 2 * calls_per_block
    for q, k, v in seen:
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16
        wide_qk, wide_v = qk_pe == "pope", attn == "differential"
        if wide_qk == wide_v:  # pope + differential: both twice as wide
            assert q.shape[-1] == v.shape[-1] and flash_ok(q, k, v), (q.shape, q.stride(), v.shape, v.stride())
        else:
            assert q.shape[-1] != v.shape[-1] and not flash_ok(q, k, v) and efficient_ok(q, k, v)


def test_cpu_bf16_keeps_the_written_out_path(monkeypatch):
    called = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: called.append(1))
    model = vitlab.create_model(img_size=16, patch_size=4, in_chans=3, num_classes=4, dim=64, depth=1, heads=2,
                                qk_pe="rope_axial")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    assert not called


def test_rope_rotation_under_compile_is_the_same_arithmetic(monkeypatch):
    from vitlab.models.qk_base import rope_rotate, rope_tables

    x = torch.randn(2, 3, 10, 16, requires_grad=True)
    cos2, sin2 = rope_tables(torch.randn(3, 10, 8), num_prefix=0)
    eager = rope_rotate(x, cos2, sin2)
    (g_eager,) = torch.autograd.grad(eager.pow(2).sum(), x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = rope_rotate(x, cos2, sin2)
    (g_traced,) = torch.autograd.grad(traced.pow(2).sum(), x)
    torch.testing.assert_close(traced, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_traced, g_eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("qk_pe", ["rope_axial", "rope_mixed", "string_cayley"])
def test_rope_family_compiles_to_one_graph(qk_pe):
    import torch._dynamo

    model = vitlab.create_model(img_size=16, patch_size=4, in_chans=3, num_classes=4, dim=64, depth=2, heads=2,
                                qk_pe=qk_pe)
    torch._dynamo.reset()
    report = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16))
    assert report.graph_break_count == 0, report.break_reasons


def test_precision_auto():
    from vitlab.config import load_config
    from vitlab.train.loop import resolve_precision

    assert load_config("fashion-mnist-quick", ["train.precision=auto"]).train.precision == "auto"
    from vitlab.config import TrainSection
    assert TrainSection().precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"  # the CPU default is unchanged
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_precision_auto_is_bf16_on_a_bf16_gpu(monkeypatch):
    from vitlab.train.loop import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp32"


def test_each_torchrun_process_takes_its_local_rank_gpu(monkeypatch):
    """train.device=cuda under torchrun must mean cuda:LOCAL_RANK, as auto does (it put every process
    on the current GPU, and NCCL refuses two ranks on one GPU); cuda:N is refused there."""
    from vitlab.train.distributed import DistInfo
    from vitlab.train.loop import pick_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    rank1 = DistInfo(rank=1, world=2, local_rank=1)
    assert pick_device("cuda", rank1) == torch.device("cuda", 1)
    assert pick_device("auto", rank1) == torch.device("cuda", 1)
    assert pick_device("cuda") == torch.device("cuda", 0) and pick_device("cuda:1") == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", i) for i in (1, 1, 0, 1)]
    with pytest.raises(ValueError, match="all 2 torchrun processes on one GPU"):
        pick_device("cuda:0", rank1)
    assert pick_device("cpu", rank1) == torch.device("cpu")


def test_random_draws_reach_a_gpu_through_pinned_memory(monkeypatch):
    """A copy from ordinary host memory to a GPU makes the host wait for the GPU; augmentation's
    draws go through pinned memory without blocking (recorded here, as this machine has no GPU)."""
    from vitlab.train.augment import to_device

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append((a, k)) or self)
    t = torch.zeros(3)
    to_device(t, torch.device("cuda", 0))
    assert calls == ["pin", ((torch.device("cuda", 0),), {"non_blocking": True})]
    calls.clear()
    assert to_device(t, torch.device("cpu")) is t and not calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_bench_cuda_without_a_gpu_is_one_line(capsys):
    from vitlab.cli import main

    assert main(["bench", "--device", "cuda", "--variants", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err and "valid here: cpu" in err
    assert main(["bench", "--device", "gpu0"]) == 2
    assert "'gpu0'" in capsys.readouterr().err


def test_bench_times_compiled_models():
    """--compile times the compiled models, and reports each one's first call (which compiles it: dynamo
    tracing takes far longer than a step at this size) apart, as its excess over the median step."""
    from vitlab.bench import format_table, run_bench

    for attempt in range(2):  # the second bench in this process compiles cold again: nothing reused
        logged = []
        result = run_bench(shape="string-mnist", variants=["rope_axial", "string_cayley"], batch=2, steps=1,
                           warmup=1, compile=True, compile_backend="aot_eager",  # dynamo + autograd, no C++
                           log=logged.append)
        rows = {r["variant"]: r for r in result["rows"]}
        assert result["compile"] == "aot_eager" and result["dtype"] == "float32"  # auto on CPU: fp32
        row = rows["rope_axial"]
        assert row["train_ms"] > 0 and row["infer_ms"] > 0 and row["params"] > 0
        for k in ("rope_axial", "string_cayley"):  # tracing takes > 10 steps' time at this size
            assert rows[k]["compile_s"] > 10 * rows[k]["train_ms"] / 1e3
            assert rows[k]["infer_compile_s"] > 10 * rows[k]["infer_ms"] / 1e3
            assert f"compiled {k} (train step) in " in "\n".join(logged)
    # The folded copy (inference only) runs the graphs dynamo compiled for rope_axial's code: no compile,
    # so its first call's excess over the median is noise of either sign, reported as 0 or more.
    folded = rows["string_cayley (folded)"]
    assert 0 <= folded["infer_compile_s"] < rows["rope_axial"]["infer_compile_s"] / 10 and "compile_s" not in folded
    table = format_table(result)
    assert "torch.compile (aot_eager)" in table and "| compile s | infer compile s |" in table
    eager = run_bench(shape="string-mnist", variants=["none"], batch=2, steps=1, warmup=0)
    assert eager["rows"][0]["infer_compile_s"] is None and "compile s" not in format_table(eager)
    with pytest.raises(ValueError, match="warmup"):
        run_bench(shape="string-mnist", variants=["none"], warmup=0, compile=True)


def test_bench_reports_the_attention_kernel_each_variant_runs():
    """The bench's ``attention`` column is read off torch's profiler. On CPU in fp32 the equal-width
    kernels go to torch's CPU flash kernel, PoPE (q/k twice as wide as v) and the differential kernel
    (v twice as wide) to vitlab's written-out route, PoPE + differential (both twice as wide) back to
    flash; timm's Attention uses SDPA too. In bf16 on CPU every vitlab kernel is written out."""
    from vitlab.bench import run_bench

    res = run_bench(shape="string-mnist", variants=["none", "rope_axial", "pope", "string_cayley", "differential",
                                                     "pope+differential", "timm"], batch=2, steps=1, warmup=0)
    got = {r["variant"]: r["attention"] for r in res["rows"]}
    assert got == {"none": "flash (cpu)", "rope_axial": "flash (cpu)", "pope": "written out",
                   "string_cayley": "flash (cpu)", "string_cayley (folded)": "flash (cpu)",
                   "differential": "written out", "pope+differential": "flash (cpu)", "timm": "flash (cpu)"}
    bf16 = run_bench(shape="string-mnist", variants=["none", "pope"], batch=2, steps=1, warmup=0, precision="bf16")
    assert {r["attention"] for r in bf16["rows"]} == {"written out"}


def test_attention_kernels_names_sdpa_fallbacks():
    """A call that torch serves with its unfused math fallback is reported as such, not as a fused kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vitlab.bench import attention_kernels

    q = torch.randn(1, 2, 5, 8)

    def run():
        with sdpa_kernel([SDPBackend.MATH]):
            F.scaled_dot_product_attention(q, q, q)

    assert attention_kernels(run) == "math"
    assert attention_kernels(lambda: F.scaled_dot_product_attention(q, q, q)) == "flash (cpu)"
    assert attention_kernels(lambda: (q @ q.transpose(-1, -2)).softmax(-1) @ q) == "written out"


# Ops after which the host waits for the GPU: reading a value back, or an error check on one.
HOST_SYNC_OPS = {"_local_scalar_dense", "_linalg_check_errors", "nonzero", "masked_select", "unique",
                 "_unique2", "is_nonzero", "equal", "item"}


def sync_ops_in_train_step(model, x):
    """Names of host-synchronising ops in one forward and backward pass (read at the dispatcher, so
    on the CPU the ops a CUDA step would run)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        seen = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if name in HOST_SYNC_OPS:
                self.seen[name] += 1
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        F.cross_entropy(model(x).float(), torch.zeros(len(x), dtype=torch.long)).backward()
    return dict(rec.seen)


def test_no_train_step_makes_the_gpu_wait():
    """A host sync inside the model stalls every layer on CUDA (STRING's linalg.solve did: its error
    check read the GPU's status four times a step). No PE x kernel may have one."""
    found = {}
    for qk in vitlab.QK_PES.names():
        for attn in vitlab.KERNELS.names():
            m = vitlab.create_model(img_size=16, patch_size=4, dim=48, depth=2, heads=4, num_classes=5,
                                    qk_pe=qk, attn=attn, token_pe="learned")
            if ops := sync_ops_in_train_step(m, torch.randn(2, 3, 16, 16)):
                found[f"{qk}+{attn}"] = ops
    volume = vitlab.create_model(size="volume", img_size=(16, 16, 8), patch_size=(8, 8, 4), in_chans=1,
                                 num_classes=3, token_pe="learned3d", qk_pe="string_cayley")
    if ops := sync_ops_in_train_step(volume, torch.randn(2, 1, 16, 16, 8)):
        found["volume"] = ops
    assert not found, found
