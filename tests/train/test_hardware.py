"""The precision rule: bf16 only where it pays, and the peak MFU is measured against."""
import torch

from mmrec.train.hardware import BF16_MIN_GAIN, bf16_pays, peak_flops, resolve_precision


def test_bf16_flags_without_a_faster_gemm_keep_fp32_and_say_why():
    # The project's VM without AMX: avx512_bf16 advertised, bf16 GEMM at half the fp32 rate.
    ok, why = bf16_pays(["avx512_bf16"], bf16_flops=35e9, fp32_flops=71e9)
    assert not ok and "avx512_bf16" in why and "35 GFLOP/s" in why and "71" in why and "not be faster" in why
    ok, why = bf16_pays(["amx_bf16", "avx512_bf16"], bf16_flops=1570e9, fp32_flops=290e9)
    assert ok and "1,570" in why
    assert not bf16_pays(["amx_bf16"], BF16_MIN_GAIN * 100e9 * 0.99, 100e9)[0]


def test_auto_follows_this_machines_measured_gemm_rates(tmp_path, monkeypatch):
    monkeypatch.setattr("mmrec.train.hardware._CACHE", tmp_path / "peak_flops.json")
    cpu = torch.device("cpu")
    dtype, why = resolve_precision("auto", cpu)
    bf16, fp32 = peak_flops(cpu, torch.bfloat16)[0], peak_flops(cpu, None)[0]  # cached by the call above
    flags = open("/proc/cpuinfo").read()
    expect_bf16 = ("amx_bf16" in flags or "avx512_bf16" in flags) and bf16 >= BF16_MIN_GAIN * fp32
    assert (dtype == torch.bfloat16) == expect_bf16, why
    assert resolve_precision("fp32", cpu)[0] is None and resolve_precision("bf16", cpu)[0] == torch.bfloat16
