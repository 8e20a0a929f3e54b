"""`whale plan` end to end: the table, --json, --chart files, config paths, hub ids and errors."""

import json

import huggingface_hub.constants
import pytest

from whale.cli import main


def run(capsys, *argv):
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_for_v3_on_h200(capsys):
    code, out, _ = run(capsys, "deepseek-v3", "--gpu", "H200")
    assert code == 0
    assert "GPUs needed        8 x H200" in out
    assert "TP8 + EP8 (8 GPUs): fits" in out
    assert "MLA latent: 61 layers x (512 + 64) x 2 B = 70,272 B/token" in out
    assert "vllm serve deepseek-ai/DeepSeek-V3 --trust-remote-code --tensor-parallel-size 8" in out
    assert "python3 -m sglang.launch_server --model-path deepseek-ai/DeepSeek-V3" in out


def test_json_has_the_contract_fields(capsys):
    code, out, _ = run(capsys, "deepseek-r1", "--gpu", "h200", "--context", "128k", "--concurrency", "4",
                       "--json")
    data = json.loads(out)
    assert code == 0 and data["fits"] is True and data["dtype"] == "fp8"
    # R1's card: 671B parameters, 37B activated; ~673 GB of FP8 weights with their block scales
    assert abs(data["total_params"] / 671e9 - 1) < 0.005 and abs(data["active_params"] / 36.7e9 - 1) < 0.005
    assert 670e9 < data["weights_bytes"] < 675e9
    assert data["context"] == 128 * 1024 and data["concurrency"] == 4
    assert data["kv_cache_bytes_per_token"] == 61 * 576 * 2
    assert data["gpus_needed"] == 8
    assert "--reasoning-parser deepseek_r1" in data["launch"]["vllm"]
    assert "--reasoning-parser deepseek-r1" in data["launch"]["sglang"]


def test_does_not_fit_exits_1(capsys):
    code, out, _ = run(capsys, "deepseek-v3", "--gpu", "H100", "--gpus", "8", "--json")
    data = json.loads(out)
    assert code == 1 and data["fits"] is False and data["gpus_needed"] == 16


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<svg")])
def test_chart_files(capsys, tmp_path, suffix, magic):
    target = tmp_path / f"plan{suffix}"
    code, _, _ = run(capsys, "r1-distill-qwen-7b", "--gpu", "L40S", "--concurrency", "8", "--chart", str(target))
    assert code == 0
    assert magic in target.read_bytes()[:400]


def test_errors_are_clean(capsys):
    code, _, err = run(capsys, "deepseek-v9", "--gpu", "H200")
    assert code == 2 and "unknown model 'deepseek-v9'" in err and "deepseek-v3" in err
    code, _, err = run(capsys, "deepseek-v3", "--gpu", "TPUv5")
    assert code == 2 and "unknown GPU 'TPUv5'" in err and "H200" in err
    code, _, err = run(capsys, "deepseek-v3", "--context", "lots")
    assert code == 2 and "token count" in err
    code, _, err = run(capsys, "deepseek-v3", "--chart", "plan.pdf")
    assert code == 2 and ".png or .svg" in err


def _llama_config(vocab=32000):
    return {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 16,
            "num_key_value_heads": 4, "intermediate_size": 2816, "vocab_size": vocab,
            "max_position_embeddings": 8192, "tie_word_embeddings": True}


def test_local_config_path(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_llama_config()))
    code, out, _ = run(capsys, str(tmp_path), "--gpu", "RTX4090", "--json")
    data = json.loads(out)
    layer = 1024 * 1024 * 2 + 2 * 256 * 1024 + 3 * 1024 * 2816 + 2 * 1024  # q, o; k, v (4 x 64); MLP; norms
    assert data["total_params"] == 4 * layer + 32000 * 1024 + 1024  # tied head
    assert data["kv_cache_bytes_per_token"] == 4 * 2 * 4 * 64 * 2
    assert code == 0 and data["gpus_needed"] == 1 and "whale" in data["launch"]


def test_hub_id_from_an_offline_cache(capsys, tmp_path, monkeypatch):
    snapshot = tmp_path / "models--someorg--tiny-llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(_llama_config(vocab=1000)))
    (tmp_path / "models--someorg--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny-llama" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, out, _ = run(capsys, "someorg/tiny-llama", "--gpu", "H100", "--json")
    assert code == 0 and json.loads(out)["model"] == "someorg/tiny-llama"
    code, _, err = run(capsys, "someorg/absent-model", "--gpu", "H100")
    assert code == 2 and "someorg/absent-model" in err


def test_planner_never_imports_torch():
    import subprocess
    import sys

    code = ("import contextlib, io, sys; from whale.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['plan', 'deepseek-v3', '--json'])\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
