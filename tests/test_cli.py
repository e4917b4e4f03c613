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
    (["run", "--prompt", "hello"], "no tokenizer.json"),
    (["run", "--ep", "0"], "--ep must be >= 1"),
    (["run", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["run", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["run", "--temperature", "-1"], "--temperature must be >= 0"),
    (["run", "--prompt", "5,6", "--prompt", "3,1024"], "--prompt: token ids must be in [0, 1024); got 1024"),
    (["run", "--cache-layout", "fp8", "--dtype", "fp32"], "needs --dtype bf16"),
    (["run", "--cache-layout", "fp8", "--no-quant-sim"], "--no-quant-sim"),
    (["run", "--dtype", "int4"], "--dtype 'int4' is unknown"),
    (["run", "--max-new-tokens", "65536"], "max_position_embeddings 65536"),
])
def test_bad_input_is_one_clear_line_before_loading(capsys, monkeypatch, argv, needle):
    import dsv4_portable.api as api

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(api, "load_model", no_load)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_run_checks_are_the_apis_in_flag_words_and_leave_the_backend_alone(capsys):
    import dsv4_portable as dsv4
    from dsv4_portable.commands import check_run_args
    from dsv4_portable.model.transformer import ModelInputError
    m = dsv4.load_model("tiny", quiet=True)
    for argv, kw in ((["--temperature", "-0.5"], dict(temperature=-0.5)), (["--top-p", "1.5"], dict(top_p=1.5)),
                     (["--max-new-tokens", "0"], dict(max_new_tokens=0))):
        with pytest.raises(ModelInputError) as api:
            m.generate([[5, 6]], **kw)
        assert main(["run", *argv]) == 2
        flag = argv[0][2:].replace("-", "_")
        assert capsys.readouterr().err.strip() == "error: " + str(api.value).replace(flag, argv[0])
    with dsv4.use_backend("ascend", require_available=False):
        args = build_run_args(["--prompt", "5,6", "--prompt", "7"])
        assert check_run_args(args) == [[5, 6], [7]]            # the parsed prompts run_main generates for
        assert dsv4.active_backend().name == "ascend"          # --device cpu was checked, not made active


def build_run_args(argv):
    from dsv4_portable.cli import build_parser
    return build_parser().parse_args(["run", *argv])


def test_run_a_batch_of_prompts_prints_each(capsys):
    assert main(["run", "--prompt", "5,6,7", "--prompt", "9,10", "--prompt", "11,12,13", "--max-new-tokens", "2",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompt_tokens"] == 8 and summary["weights"] == "native"
    outs = [o["generated_tokens"] for o in summary["outputs"]]
    assert len(outs) == 3 and all(len(t) == 2 for t in outs)
    import dsv4_portable as dsv4
    alone = dsv4.load_model("tiny", quiet=True).generate([[9, 10]], max_new_tokens=2).tokens[0]
    assert outs[1] == alone                              # the 2-token prompt, batched apart from the others
    assert main(["run", "--prompt", "5,6,7", "--prompt", "9,10", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("generated[0]: [") and out[1].startswith("generated[1]: [")
    assert out[-1].startswith("summary: 4 tokens for 2 prompt(s) on cpu (weights native)")
