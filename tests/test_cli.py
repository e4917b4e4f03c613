"""The `dsv4` command line: each subcommand end to end, and bad input as one clear line with exit code 2."""
import json

import pytest

from dsv4_portable.cli import main


def test_devices_explain_reports_unavailable_backends_with_reasons(capsys):
    assert main(["devices", "--explain"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    cuda = next(l for l in lines if l.startswith("cuda"))
    ascend = next(l for l in lines if l.startswith("ascend"))
    assert "unavailable:" in cuda and "CUDA" in cuda
    assert "unavailable:" in ascend and "torch_npu" in ascend
    assert any(l.strip().startswith("sparse_attn") and "-> reference" in l for l in lines)
    assert lines[-1].startswith("summary: 1 of 3 backends usable here: cpu")


def test_run_tiny_prints_tokens_and_summary(capsys):
    assert main(["run", "--max-new-tokens", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["generated_tokens"]) == 3
    assert summary["prompt_tokens"] == 32
    assert summary["kv_cache_layout"] == "fp8" and summary["kv_cache_bytes"] > 0
    assert set(summary["providers"]["window_sparse_attn"]) == {"reference"}


def test_plan_flash_1m(capsys):
    assert main(["plan", "--config", "flash", "--context", "1048576", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # DESIGN.md section 6: about 3.8 GiB per sequence in DeepSeek's FP8 layout at 1M tokens.
    assert 3.5 < plan["kv_per_sequence"]["deepseek_fp8_layout"] / 2**30 < 4.0


@pytest.mark.parametrize("argv, needle", [
    (["run", "--device", "tpu"], "tpu"),
    (["run", "--device", "cuda"], "CUDA"),
    (["run", "--device", "ascend"], "torch_npu"),
    (["run", "--model", "/nonexistent/dir"], "/nonexistent/dir"),
    (["plan", "--config", "huge"], "huge"),
])
def test_bad_input_is_one_clear_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]
