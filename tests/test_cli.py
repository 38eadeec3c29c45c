"""The command line: list, bench, and one-line errors."""
import json

import pytest
import torch

import vitlab

from vitlab.bench import parse_variant, run_bench
from vitlab.cli import main


def test_list_json_names_the_whole_catalogue(capsys):
    assert main(["list", "--json"]) == 0
    cat = json.loads(capsys.readouterr().out)
    assert set(cat["qk_pe"]) == {"none", "rope_axial", "rope_mixed", "pope", "string_cayley", "string_reflection"}
    assert set(cat["token_pe"]) == {"none", "learned", "sincos", "learned3d"}
    assert set(cat["attn"]) == {"standard", "eager", "differential", "differential_entropy", "suppression", "diffsim"}
    assert {"tiny", "small", "string-cifar", "minivit", "volume"} <= set(cat["sizes"])
    assert cat["qk_pe"]["string_cayley"]["options"]["sparsity"] == 1.0


def test_list_text(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "rope_mixed" in out and "differential_entropy" in out and "Size presets" in out


def test_parse_variant():
    v = parse_variant("string_cayley:sparsity=0.5+learned+differential")
    assert v.kwargs == {"qk_pe": "string_cayley", "qk_pe_kwargs": {"sparsity": 0.5}, "token_pe": "learned",
                        "token_pe_kwargs": {}, "attn": "differential", "attn_kwargs": {}}
    assert parse_variant("timm").timm
    with pytest.raises(ValueError, match="unknown name 'ropex'.*rope_axial"):
        parse_variant("ropex")


def test_bench_smoke():
    res = run_bench(shape="string-mnist", variants=["none", "rope_axial", "string_cayley", "timm"],
                    batch=4, steps=2, warmup=0)
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"none", "rope_axial", "string_cayley", "string_cayley (folded)", "timm"}
    assert rows["none"]["train_vs_none"] == 1.0 and rows["timm"]["train_vs_timm"] == 1.0
    assert all(r["infer_ms"] > 0 for r in rows.values())
    assert 0 < rows["none"]["mfu"] and rows["none"]["gflops_step"] > 0
    assert res["matmul_peak_gflops"] > 0


@pytest.mark.parametrize("argv,words", [
    (["bench", "--variants", "none,bogus"], ["unknown name 'bogus'"]),
    (["bench", "--shape", "huge"], ["unknown shape 'huge'", "string-cifar"]),
    (["bench", "--batch", "0", "--variants", "none"], ["batch must be >= 1"]),
])
def test_cli_errors_are_one_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitlab: error: ") and err.count("\n") == 1
    for w in words:
        assert w in err


def test_flops_count_the_cpu_fused_attention_kernel():
    """torch's FlopCounterMode has no formula for the CPU's fused SDPA kernel: a model that runs it
    (vitlab's kernels in fp32, timm's ViT) counted no attention. The same model's forward must count
    the same FLOPs on the fused kernel (fp32) and on vitlab's written-out route (bf16 autocast on
    CPU), and the attention must be there: 4·B·H·N²·d per block over the count without it."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitlab.flops import flop_counter

    model = vitlab.create_model(size="string-cifar", num_classes=10, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)

    def forward(counter, bf16=False):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), counter as c:
            model(x)
        return c.get_total_flops()

    fused, written_out, torch_alone = forward(flop_counter()), forward(flop_counter(), True), \
        forward(FlopCounterMode(display=False))
    b, h, n, d = 2, 4, 65, 192 // 4
    assert fused == written_out and fused - torch_alone == 2 * 4 * b * h * n * n * d


def test_train_step_flops_are_model_flops_on_either_attention_route():
    """torch's formula for a fused attention backward adds the scores' recomputation (hardware FLOPs);
    the written-out route has none. A train step counts the same model FLOPs on both routes, and
    a step is three forwards less the input gradient of the patch convolution."""
    from vitlab.bench import step_flops
    from vitlab.flops import flop_counter

    model = vitlab.create_model(size="string-cifar", num_classes=10, depth=2)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    fused = step_flops(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        written_out = step_flops(model, x, y)
    with torch.no_grad(), flop_counter() as c:
        model(x)
    conv_input_grad = 2 * 2 * 64 * 192 * 3 * 4 * 4  # the patch conv's gradient wrt the image, not computed
    assert fused == written_out == 3 * c.get_total_flops() - conv_input_grad


@pytest.mark.parametrize("variants,words", [
    ("rope_axial+pope", ["variant 'rope_axial+pope': two q/k PEs (rope_axial, pope); give one"]),
    ("learned+sincos", ["two token PEs (learned, sincos)"]),
    ("differential+eager", ["two attention kernels"]),
    ("none,rope_axial,none", ["--variants names none more than once"]),
    ("", ["--variants is empty"]),
])
def test_bench_variants_that_would_mislabel_a_row_are_refused(capsys, variants, words):
    assert main(["bench", "--shape", "string-mnist", "--variants", variants, "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err


def test_bench_table_says_what_mfu_and_none_are_relative_to(capsys):
    assert main(["bench", "--shape", "minivit", "--variants", "none,rope_axial", "--batch", "2", "--steps", "1",
                 "--warmup", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "over the matmul peak measured above on this device, not the vendor's datasheet figure" in out
    assert "keeps the size preset's token PE (sincos)" in out


def test_bench_volume_shape_leaves_out_timm(capsys):
    assert main(["bench", "--shape", "volume", "--variants", "none,timm", "--steps", "1"]) == 2
    assert "timm's VisionTransformer takes 2D images" in capsys.readouterr().err


def test_bench_save_writes_json_and_table(tmp_path, capsys):
    from vitlab.cli import main

    out = tmp_path / "nested" / "cpu.json"
    assert main(["bench", "--shape", "string-mnist", "--variants", "none,pope", "--batch", "2", "--steps", "1",
                 "--warmup", "0", "--quiet", "--save", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert [r["variant"] for r in saved["rows"]] == ["none", "pope"] and saved["shape"] == "string-mnist"
    assert out.with_suffix(".md").read_text() == printed  # the table printed is the table saved
    assert not list(out.parent.glob(".*.tmp"))


def test_bench_table_shows_step_memory_only_where_measured():
    from vitlab.bench import format_table

    res = run_bench(shape="string-mnist", variants=["none", "pope"], batch=2, steps=1, warmup=0)
    assert all(r["step_mib"] is None for r in res["rows"])  # CPU: not measured, not shown
    assert "step MiB" not in format_table(res)
    res["rows"][0]["step_mib"], res["rows"][1]["step_mib"] = 1234.4, 2048.0  # as a CUDA run records them
    header, rule, none, pope = format_table(res).splitlines()[:4]
    col = header.split(" | ").index("step MiB")
    assert none.split(" | ")[col] == "1,234" and pope.split(" | ")[col] == "2,048"
    assert len(rule.split("|")) == len(header.split("|"))


def test_compare_with_only_overrides_runs_the_default_study(capsys, tmp_path, monkeypatch):
    """`vitlab compare train.epochs=1`: no study named, so the default one with that override (it was
    "experiment file not found: train.epochs=1"); and validate's usage names only what is required."""
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "train.epochs=1", "--dry-run"]) == 0
    assert "dry run, nothing trained or written: 24 to run" in capsys.readouterr().out
    assert main(["compare", "train.epochs=0", "--dry-run"]) == 2  # the override is applied, and checked
    assert "train.epochs" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        main(["validate"])
    assert "required: config (" in capsys.readouterr().err
