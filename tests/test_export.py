"""``rubric-fast export`` and ``checkpoint.export_hf``: the exported folder is a plain HF model that gives the
trainer policy's logits exactly (fp32), from ddp and fsdp2-sharded checkpoints, with LoRA merged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from rubric_fast.cli import main as cli_main
from rubric_fast.trainer.command import DEFAULT_CONFIG
from rubric_fast.trainer.config import load_config
from rubric_fast.trainer.loop import train
from procs import free_port

SMALL = ["max_steps=2", "data.prompts_per_step=2", "rollout.num_generations=4", "rollout.max_new_tokens=8",
         "logging.tensorboard=false", "logging.progress=false", "logging.samples_every=0",
         "model.tiny.hidden_size=32", "model.tiny.intermediate_size=48", "optimization.lr=1e-2",
         "algorithm.drop_zero_variance_groups=false", "rollout.temperature=0.9", "rollout.top_k=7"]


def _train(run_dir: Path, *overrides: str):
    cfg = load_config(DEFAULT_CONFIG, SMALL + [f"logging.run_dir={run_dir}", *overrides])
    return train(cfg)


def _trainer_policy(run_dir: Path, *overrides: str):
    """The policy exactly as the trainer holds it after the run: rebuilt from the final checkpoint's
    state dict by the trainer's own constructor (not through the export code)."""
    from rubric_fast.trainer.models import build_char_tokenizer, load_policy

    cfg = load_config(DEFAULT_CONFIG, SMALL + [f"logging.run_dir={run_dir}", *overrides])
    state = torch.load(run_dir / "checkpoints" / "step_00000002" / "state.pt", weights_only=True)
    tok = build_char_tokenizer()
    policy = load_policy(cfg.model, tok, torch.device("cpu"))
    policy.load_state_dict(state["model"])
    return policy.eval(), tok


def _ids(tok, n=3):
    texts = ["Write a few words with the letter e.\n>", "hello there", "x"][:n]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_export_round_trips_the_policy_exactly(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run_dir = tmp_path / "run"
    _train(run_dir, "checkpoint.export_hf=true")
    policy, tok = _trainer_policy(run_dir)
    out = tmp_path / "exported"
    assert cli_main(["export", str(run_dir), "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids, mask = _ids(tok)
    want = _logits(policy, ids, mask)
    got = _logits(model, ids, mask)
    assert torch.equal(got, want), float((got - want).abs().max())
    # trained weights, not the initial ones: the export would fail this against a fresh model
    fresh = type(policy)(policy.config).eval()
    assert not torch.equal(_logits(fresh, ids, mask), want)
    # tokenizer and sampling settings travel with it
    tok2 = AutoTokenizer.from_pretrained(str(out))
    text = "Write a few words."
    assert tok2(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert tok2.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                    add_generation_prompt=True) == "hi\n>"
    gc = GenerationConfig.from_pretrained(str(out))
    assert gc.do_sample and gc.temperature == 0.9 and gc.top_k == 7 and gc.eos_token_id == tok.eos_token_id
    # checkpoint.export_hf=true wrote the same model at the end of training, from the live policy
    live = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf"), dtype=torch.float32).eval()
    assert torch.equal(_logits(live, ids, mask), want)


def test_export_merges_lora_into_the_base_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    lora = ["model.lora.enabled=true", "model.lora.r=4", "optimization.lr=5e-2"]
    run_dir = tmp_path / "run"
    _train(run_dir, *lora)
    policy, tok = _trainer_policy(run_dir, *lora)
    assert any(float(p.detach().abs().max()) > 0 for n, p in policy.named_parameters() if "lora_B" in n)  # adapters trained
    out = tmp_path / "merged"
    assert cli_main(["export", str(run_dir / "checkpoints" / "step_00000002"), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    ids, mask = _ids(tok)
    want = _logits(policy, ids, mask)          # the peft model: x W + s (x A^T) B^T
    with policy.disable_adapter():
        base = _logits(policy, ids, mask)
    got = _logits(model, ids, mask)            # the merged model: x (W + s B A)
    # merging reassociates the sum, so equality is up to fp32 rounding, far below the adapters' effect
    assert float((got - want).abs().max()) < 1e-4 * float((want - base).abs().max()) + 1e-5
    assert float((want - base).abs().max()) > 1e-3


def test_export_from_an_fsdp2_sharded_checkpoint(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "rubric_fast.cli", "train", *SMALL,
           f"logging.run_dir={run_dir}", "distributed.strategy=fsdp2", "checkpoint.export_hf=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = run_dir / "checkpoints" / "step_00000002"
    assert "model" not in torch.load(ck / "state.pt", weights_only=True)  # really sharded
    out = tmp_path / "exported"
    assert cli_main(["export", str(run_dir), "--step", "2", "--out", str(out)]) == 0
    # oracle: torch's own converter of the sharded checkpoint into one state dict
    dcp_to_torch_save(ck / "sharded", tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    sd = model.state_dict()
    for k, v in full.items():
        assert torch.equal(sd[k.removeprefix("policy.")], v), k
    live = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf"), dtype=torch.float32).eval()
    for k, v in live.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_export_bad_input_is_one_line_naming_the_argument(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"rubric-fast export: RUN_DIR: no such directory: {tmp_path / 'nope'}"
    (tmp_path / "empty_run").mkdir()
    assert cli_main(["export", str(tmp_path / "empty_run"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("rubric-fast export: RUN_DIR: no complete checkpoint")
    run_dir = tmp_path / "run"
    _train(run_dir, "max_steps=1")
    capsys.readouterr()
    assert cli_main(["export", str(run_dir), "--step", "5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--step: no complete checkpoint for step 5" in err and "available: 1" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    assert cli_main(["export", str(run_dir), "--out", str(busy)]) == 2
    assert "--out:" in capsys.readouterr().err and (busy / "x").read_text() == "keep me"
    assert cli_main(["export", str(run_dir), "--out", str(busy), "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("step_00000001")
    assert not (busy / "x").exists()
