"""Triton launchers in the interpreter (TRITON_INTERPRET=1, CPU) against the float64 reference.

TRITON_INTERPRET must be set before triton is imported, so under a plain ``pytest tests/`` this module
defines one test that re-runs this same file in a subprocess with TRITON_INTERPRET=1 and
RUBRIC_FAST_POISON=1 (fresh outputs NaN-filled before each launch). To run the cases one by one:

    TRITON_INTERPRET=1 RUBRIC_FAST_POISON=1 python -m pytest tests/test_triton_interp.py
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.triton_interp
INNER = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None

if not INNER:

    @pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
    def test_interpreter_suite():
        env = {**os.environ, "TRITON_INTERPRET": "1", "RUBRIC_FAST_POISON": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", os.path.abspath(__file__)],
            env=env, capture_output=True, text=True, timeout=900,
        )
        tail = (proc.stdout + proc.stderr)[-8000:]
        assert proc.returncode == 0, f"interpreter suite failed (rc={proc.returncode}):\n{tail}"

else:
    import torch
    from rubric_fast.kernels import fused_linear_policy_loss as fused_mod
    from rubric_fast.kernels import linear_logprob_entropy as lle
    from rubric_fast.kernels import policy_loss as pl

    from rubric_fast import reference as ref
    from rubric_fast.reference import PolicyLossConfig

    SEED = int.from_bytes(os.urandom(4), "little")

    @pytest.fixture
    def gen():
        g = torch.Generator().manual_seed(SEED)
        print(f"seed={SEED}")
        return g

    def _inputs(g, n, h, v, scale=1.0, n_ignored=1):
        x = torch.randn(n, h, generator=g, dtype=torch.float64) * scale
        w = torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5
        b = torch.randn(v, generator=g, dtype=torch.float64)
        t = torch.randint(0, v, (n,), generator=g)
        if n > 2:
            t[torch.randperm(n, generator=g)[:n_ignored]] = -100
        # kernels get fp32; the oracle gets the same values in float64
        x, w, b = (a.float().double() for a in (x, w, b))
        return x, w, b, t

    def _close(a, b, tol, what):
        a = a.double()
        b = b.double()
        assert torch.isfinite(a).all(), f"{what}: non-finite values (seed={SEED})"
        err = (a - b).abs().max().item() if a.numel() else 0.0
        scale = max(1.0, b.abs().max().item() if b.numel() else 0.0)
        assert err <= tol * scale, f"{what}: max err {err:.3e} > {tol:.1e} * {scale:.3e} (seed={SEED})"

    # ------------------------------------------------------------------ linear_logprob_entropy
    @pytest.mark.parametrize("n,h,v", [(1, 16, 37), (7, 24, 130), (33, 16, 257)])
    @pytest.mark.parametrize("with_bias,temperature", [(False, 1.0), (True, 0.7)])
    def test_linear_logprob_entropy_fwd_bwd(gen, n, h, v, with_bias, temperature):
        x, w, b, t = _inputs(gen, n, h, v)
        b = b if with_bias else None
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        br = b.clone().requires_grad_() if b is not None else None
        rl, re, rs = ref.linear_logprob_entropy(xr, wr, t, bias=br, temperature=temperature)
        lp, en, ls = lle.linear_logprob_entropy_fwd(x.float(), w.float(), t, b.float() if b is not None else None,
                                                    temperature, -100)
        for got, want, name in ((lp, rl, "logp"), (en, re, "entropy"), (ls, rs, "lse")):
            assert got.dtype == torch.float32 and got.shape == (n,)
            _close(got, want.detach(), 2e-5, name)
        ign = t == -100
        assert (lp[ign] == 0).all() and (en[ign] == 0).all() and (ls[ign] == 0).all()

        gl = torch.randn(n, generator=gen, dtype=torch.float64)
        gh = torch.randn(n, generator=gen, dtype=torch.float64)
        if n > 3:
            gl[1] = 0.0
            gh[1] = 0.0  # an inactive row: must get exactly zero dX
        (rl * gl + re * gh).sum().backward()
        dx, dw, db = lle.linear_logprob_entropy_bwd(x.float(), w.float(), t, b.float() if b is not None else None,
                                                    ls, en, gl.float(), gh.float(), temperature, -100,
                                                    True, True, True)
        _close(dx, xr.grad, 5e-5, "dhidden")
        _close(dw, wr.grad, 5e-5, "dweight")
        if b is not None:
            _close(db, br.grad, 5e-5, "dbias")
        else:
            assert db is None
        if n > 3:
            assert (dx[1] == 0).all()
        assert (dx[ign] == 0).all()

    def test_linear_logprob_entropy_large_logits(gen):
        # logits of about +-1e4: the online max / relative-entropy accumulation must stay finite and exact
        n, h, v = 7, 16, 130
        x, w, b, t = _inputs(gen, n, h, v)
        x = (x * 3e3).float().double()
        rl, re, rs = ref.linear_logprob_entropy(x, w, t, bias=b)
        z = x @ w.T + b
        assert z.abs().max() > 5e3
        lp, en, ls = lle.linear_logprob_entropy_fwd(x.float(), w.float(), t, b.float(), 1.0, -100)
        # fp32 logits of size 1e4 carry ~1e-3 absolute error; the values themselves are O(1e4)
        _close(ls, rs, 1e-6, "lse")
        _close(lp, rl, 1e-6, "logp")
        assert torch.isfinite(en).all() and (en >= 0).all()
        # fp32 logits of size 1e4 carry ~1e-3 rounding of their own (any fp32 matmul); what the kernel must get
        # right is the reduction: compare with the float64 entropy and lse of the kernel's own fp32 logits
        z_k = torch.empty(n, v)
        lle.forward_rows(x.float(), w.float(), t.clamp_min(0), b.float(), 1.0, -100, z_out=z_k)
        zd = z_k.double()
        ent_own = -(torch.softmax(zd, -1) * torch.log_softmax(zd, -1)).sum(-1)
        keep = t != -100
        err = (en.double() - ent_own)[keep].abs().max().item()
        assert err <= 1e-5 * max(1.0, ent_own.abs().max().item()), f"entropy: err {err:.3e} (seed={SEED})"
        _close(ls[keep], torch.logsumexp(zd, -1)[keep], 1e-7, "lse of the kernel's own logits")
        gl = torch.ones(n, dtype=torch.float32)
        dx, dw, db = lle.linear_logprob_entropy_bwd(x.float(), w.float(), t, b.float(), ls, en, gl, gl, 1.0, -100,
                                                    True, True, True)
        assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()

    def test_linear_logprob_entropy_bwd_chunks_and_flags(gen, monkeypatch):
        # a tiny workspace forces several row blocks; the Triton fp32-accumulate GEMM is forced too
        n, h, v = 9, 16, 130
        x, w, b, t = _inputs(gen, n, h, v)
        xr, wr, br = (a.clone().requires_grad_() for a in (x, w, b))
        rl, re, _ = ref.linear_logprob_entropy(xr, wr, t, bias=br, temperature=1.3)
        gl = torch.randn(n, generator=gen, dtype=torch.float64)
        (rl * gl).sum().backward()
        lp, en, ls = lle.linear_logprob_entropy_fwd(x.float(), w.float(), t, b.float(), 1.3, -100)
        monkeypatch.setenv("RUBRIC_FAST_WORKSPACE_MB", str(n * 32 * 4 / 2 ** 20))
        monkeypatch.setattr(lle, "FORCE_TRITON_MM", True)
        dx, dw, db = lle.linear_logprob_entropy_bwd(x.float(), w.float(), t, b.float(), ls, en, gl.float(), None,
                                                    1.3, -100, True, True, True)
        _close(dx, xr.grad, 5e-5, "dhidden (chunked)")
        _close(dw, wr.grad, 5e-5, "dweight (chunked)")
        _close(db, br.grad, 5e-5, "dbias (chunked)")
        dx2, dw2, db2 = lle.linear_logprob_entropy_bwd(x.float(), w.float(), t, b.float(), ls, en, gl.float(),
                                                       None, 1.3, -100, True, False, False)
        assert dw2 is None and db2 is None
        _close(dx2, xr.grad, 5e-5, "dhidden only")
        # no active row at all: zero gradients, no launch
        z = torch.zeros(n)
        dx3, dw3, _ = lle.linear_logprob_entropy_bwd(x.float(), w.float(), t, None, ls, en, z, z, 1.0, -100,
                                                     True, True, False)
        assert (dx3 == 0).all() and (dw3 == 0).all()

    def test_linear_logprob_entropy_bad_target():
        x = torch.randn(3, 16)
        w = torch.randn(37, 16)
        with pytest.raises(ValueError, match="targets"):
            lle.linear_logprob_entropy_fwd(x, w, torch.tensor([0, 37, 1]), None, 1.0, -100)

    # ------------------------------------------------------------------ policy loss
    def _pl_inputs(g, n):
        lp = torch.randn(n, generator=g, dtype=torch.float64) * 0.5 - 1.0
        old = lp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        adv = torch.randn(n, generator=g, dtype=torch.float64)
        w = (torch.rand(n, generator=g) > 0.2).double() * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))
        reflp = lp + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
        isw = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
        seq = torch.randint(0, 6, (n,), generator=g) * 7 - 3  # arbitrary ids
        ent = torch.rand(n, generator=g, dtype=torch.float64) * 3
        emask = torch.rand(n, generator=g) > 0.3
        return [a.float().double() if a.is_floating_point() else a for a in (lp, old, adv, w, reflp, isw, seq, ent)] + [emask]

    def _codes(cfg):
        return cfg.to_op_args()

    def _check_policy(cfg, lp, old, adv, w, reflp, isw, seq, ent, emask):
        lpr = lp.clone().requires_grad_()
        entr = ent.clone().requires_grad_() if ent is not None else None
        loss, stats = ref.policy_loss(lpr, old, adv, w, ref_logp=reflp, is_weight=isw, seq_index=seq, config=cfg,
                                      entropy=entr if ent is not None else None, entropy_mask=emask)
        loss.backward()
        f = (lambda a: a.float() if a is not None else None)
        l2, s2, gl, gh = pl.policy_loss_fwd_bwd(f(lp), f(old), f(adv), f(w), f(reflp), f(isw), seq, f(ent), emask,
                                                *_codes(cfg))
        assert l2.shape == () and l2.dtype == torch.float32 and s2.shape == (4,)
        _close(l2, loss.detach(), 2e-5, f"loss {cfg}")
        _close(s2, torch.stack([s.double() for s in stats]), 2e-5, f"stats {cfg}")
        _close(gl, lpr.grad, 2e-5, f"grad_logp {cfg}")
        if ent is not None:
            want_gh = entr.grad if entr.grad is not None else torch.zeros_like(ent)
            _close(gh, want_gh, 2e-5, f"grad_entropy {cfg}")
        else:
            _close(gh, torch.full_like(lp, 0.0) if cfg.entropy_coef == 0 else gh.double(), 2e-5, "grad_entropy")

    @pytest.mark.parametrize("loss", ["ppo_clip", "cispo", "sapo", "gspo"])
    @pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"])
    def test_policy_loss_all_codes(gen, loss, agg):
        for kl, n in itertools.product(["k1", "k2", "k3"], [1, 37]):
            lp, old, adv, w, reflp, isw, seq, ent, emask = _pl_inputs(gen, n)
            cfg = PolicyLossConfig(loss=loss, aggregation=agg, kl=kl, beta=0.1, entropy_coef=0.02, eps_high=0.28,
                                   delta=3.0 if loss in ("ppo_clip", "gspo") else None,
                                   dual_clip=3.0 if loss in ("ppo_clip", "gspo") else None,
                                   normalizer=64.0 if agg == "constant" else None)
            _check_policy(cfg, lp, old, adv, w, reflp, isw, seq, ent, emask)

    def test_policy_loss_optional_inputs(gen):
        lp, old, adv, w, reflp, isw, seq, ent, emask = _pl_inputs(gen, 33)
        cfg = PolicyLossConfig(loss="ppo_clip", aggregation="token_mean", normalizer=100.0)
        _check_policy(cfg, lp, old, adv, w, None, None, None, None, None)
        cfg = PolicyLossConfig(loss="sapo", aggregation="seq_mean_token_mean", normalizer=3.0, kl="k1", beta=0.0)
        _check_policy(cfg, lp, old, adv, w, reflp, None, seq, None, emask)
        w0 = torch.zeros_like(w)  # nothing counts: loss 0, stats 0, grads 0
        l2, s2, gl, gh = pl.policy_loss_fwd_bwd(lp.float(), old.float(), adv.float(), w0.float(), None, None, None,
                                                None, None, *_codes(PolicyLossConfig()))
        assert l2.item() == 0 and (s2 == 0).all() and (gl == 0).all() and (gh == 0).all()
        with pytest.raises(ValueError, match="seq_index"):
            pl.policy_loss_fwd_bwd(lp.float(), old.float(), adv.float(), w.float(), None, None, None, None, None,
                                   *_codes(PolicyLossConfig(loss="gspo")))

    # ------------------------------------------------------------------ fused linear policy loss
    def _check_fused(g, cfg, n, h, v, with_mask=False, with_bias=True, temperature=0.9, dtype=torch.float32,
                     tol=5e-5, on_policy=False):
        x, w, b, t = _inputs(g, n, h, v, n_ignored=2)
        b = b if with_bias else None
        x, w = x.to(dtype).double(), w.to(dtype).double()
        if b is not None:
            b = b.to(dtype).double()
        with torch.no_grad():
            lp0 = ref.linear_logprob_entropy(x, w, t, bias=b, temperature=temperature)[0]
        old = lp0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        adv = torch.randn(n, generator=g, dtype=torch.float64)
        lw = (torch.rand(n, generator=g) > 0.15).double()
        reflp = lp0 + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
        isw = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
        seq = torch.randint(0, 4, (n,), generator=g)
        emask = (torch.rand(n, generator=g) > 0.5) if with_mask else None
        old, adv, reflp, isw = (a.float().double() for a in (old, adv, reflp, isw))
        if on_policy:  # old_logp=None: the forward's own log-probs, ratio 1
            old = None
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        br = b.clone().requires_grad_() if b is not None else None
        loss, stats, lp, en = ref.fused_linear_policy_loss(
            xr, wr, t, old, adv, lw, ref_logp=reflp, is_weight=isw, seq_index=seq, entropy_mask=emask, config=cfg,
            bias=br, temperature=temperature)
        loss.backward()
        f = (lambda a: a.float() if a is not None else None)
        out = fused_mod.fused_linear_policy_loss_fwd_bwd(
            x.to(dtype), w.to(dtype), t, f(old), f(adv), f(lw), f(reflp), f(isw), seq, emask, *_codes(cfg),
            b.to(dtype) if b is not None else None, temperature, -100, True, True, b is not None)
        l2, s2, lp2, en2, dx, dw, db = out
        what = f"{cfg.loss}/{cfg.aggregation}/top={cfg.top_entropy_fraction}/mask={with_mask}"
        _close(l2, loss.detach(), tol, f"loss {what}")
        _close(s2, torch.stack([s.double() for s in stats]), tol, f"stats {what}")
        _close(lp2, lp.detach(), tol, f"logp {what}")
        _close(en2, en.detach(), tol, f"entropy {what}")
        _close(dx, xr.grad, tol, f"dhidden {what}")
        _close(dw, wr.grad, tol, f"dweight {what}")
        if b is not None:
            _close(db, br.grad, tol, f"dbias {what}")
        else:
            assert db is None
        assert dx.dtype == dtype and dw.dtype == dtype

    @pytest.mark.parametrize("loss", ["ppo_clip", "cispo", "sapo", "gspo"])
    @pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"])
    def test_fused_all_codes(gen, monkeypatch, loss, agg):
        # a workspace of 16 rows: the fused schedule runs several row blocks (dW accumulated over them)
        monkeypatch.setenv("RUBRIC_FAST_WORKSPACE_MB", str(16 * 37 * 4 / 2 ** 20))
        monkeypatch.setenv("RUBRIC_FAST_FUSED_SCHEDULE", "fused")
        cfg = PolicyLossConfig(loss=loss, aggregation=agg, beta=0.05, kl="k3", entropy_coef=0.01,
                               normalizer=50.0 if agg == "constant" else None,
                               dual_clip=3.0 if loss == "ppo_clip" else None)
        _check_fused(gen, cfg, 33, 16, 37)

    @pytest.mark.parametrize("top,with_mask,schedule", [(0.3, False, "auto"), (None, True, "auto"),
                                                         (0.2, True, "auto"), (None, False, "recompute"),
                                                         (None, True, "fused")])
    def test_fused_entropy_selection(gen, monkeypatch, top, with_mask, schedule):
        monkeypatch.setenv("RUBRIC_FAST_FUSED_SCHEDULE", schedule)
        cfg = PolicyLossConfig(loss="ppo_clip", aggregation="token_mean", top_entropy_fraction=top, entropy_coef=0.01)
        _check_fused(gen, cfg, 33, 24, 130, with_mask=with_mask, with_bias=False, temperature=1.0)

    @pytest.mark.parametrize("schedule", ["fused", "recompute"])
    def test_fused_on_policy_old_logp_none(gen, monkeypatch, schedule):
        monkeypatch.setenv("RUBRIC_FAST_FUSED_SCHEDULE", schedule)
        cfg = PolicyLossConfig(loss="ppo_clip", aggregation="token_mean", beta=0.02)
        _check_fused(gen, cfg, 17, 16, 37, on_policy=True)

    def test_fused_single_row_and_fp16_in_place(gen, monkeypatch):
        cfg = PolicyLossConfig(loss="cispo", aggregation="constant", normalizer=4.0)
        _check_fused(gen, cfg, 1, 16, 37)
        # fp16: dlogits are written in place over the fp32 logits workspace (narrower rows, same row stride);
        # several row blocks accumulate dW in fp16 (addmm)
        monkeypatch.setenv("RUBRIC_FAST_WORKSPACE_MB", str(16 * 130 * 4 / 2 ** 20))
        monkeypatch.setenv("RUBRIC_FAST_FUSED_SCHEDULE", "fused")
        cfg = PolicyLossConfig(loss="sapo", aggregation="token_mean")
        _check_fused(gen, cfg, 33, 16, 130, dtype=torch.float16, tol=3e-3)

    @pytest.mark.parametrize("schedule", ["fused", "recompute"])
    def test_fused_fp16_dw_fp32_accumulation(gen, monkeypatch, schedule):
        # several row blocks with dW accumulated in an fp32 buffer by the Triton GEMM (_mm_accumulate_kernel)
        monkeypatch.setenv("RUBRIC_FAST_WORKSPACE_MB", str(16 * 130 * 4 / 2 ** 20))
        monkeypatch.setenv("RUBRIC_FAST_DW_ACCUM", "fp32")
        monkeypatch.setenv("RUBRIC_FAST_FUSED_SCHEDULE", schedule)
        monkeypatch.setattr(lle, "FORCE_TRITON_MM", True)
        from rubric_fast.kernels import plan

        tile = plan.tile_config(torch.float16, None)
        bp = plan.plan_blocks(33, 16, 130, dtype=torch.float16, tile=tile, needs_dweight=True, fixed_bytes=0)
        assert bp.dw_accum == "fp32" and bp.n_blocks == 3
        cfg = PolicyLossConfig(loss="ppo_clip", aggregation="seq_mean_token_mean", beta=0.05, entropy_coef=0.01)
        _check_fused(gen, cfg, 33, 16, 130, dtype=torch.float16, tol=3e-3)

    def test_logp_never_positive_large_logits(gen):
        # logits of size ~1e4 in fp32: rounding alone must not make a log-prob positive or an entropy negative
        n, h, v = 29, 16, 131
        x, w, b, t = _inputs(gen, n, h, v, n_ignored=0)
        x = x * 3e3
        lp, en, ls = lle.linear_logprob_entropy_fwd(x.float(), w.float(), t, b.float(), 1.0, -100)
        assert torch.isfinite(lp).all() and (lp <= 0).all(), lp.max()
        assert (en >= 0).all()
        # a target at the row's maximum: the case rounding pushes above 0
        z = x.float() @ w.float().T + b.float()
        t2 = z.argmax(1)
        lp2, en2, _ = lle.linear_logprob_entropy_fwd(x.float(), w.float(), t2, b.float(), 1.0, -100)
        assert (lp2 <= 0).all() and (en2 >= 0).all()
        rl, _, _ = ref.linear_logprob_entropy(x.double(), w.double(), t2, bias=b.double())
        # fp32 logits of size 1e4 carry ~1e-3 absolute error: compare errors with plain fp32 torch's
        t32 = torch.log_softmax(z, dim=-1).gather(1, t2[:, None]).squeeze(1)
        err, err_t = (lp2.double() - rl).abs().max().item(), (t32.double() - rl).abs().max().item()
        assert err <= 2 * err_t + 1e-6, f"logp at the argmax: err {err:.3e} vs fp32 torch {err_t:.3e} (seed={SEED})"

    def test_launchers_launch_what_the_plan_says(gen, monkeypatch):
        """compile-check compiles kernels/plan.py's launches: the launchers must launch exactly those."""
        from rubric_fast.kernels import plan

        launched = []
        real = lle._launch

        def spy(spec, *args):
            launched.append(spec)
            return real(spec, *args)

        monkeypatch.setattr(lle, "_launch", spy)
        n, h, v = 40, 16, 130
        x, w, b, t = _inputs(gen, n, h, v, n_ignored=0)
        old = torch.randn(n, generator=gen) - 3
        adv = torch.randn(n, generator=gen)
        lw = torch.ones(n)
        for schedule, cfg in (("fused", PolicyLossConfig()), ("recompute", PolicyLossConfig(loss="gspo"))):
            launched.clear()
            fused_mod.fused_linear_policy_loss_fwd_bwd(
                x.float(), w.float(), t, old, adv, lw, None, None, torch.arange(n) // 8, None, *cfg.to_op_args(),
                b.float(), 1.0, -100, True, True, True, schedule=schedule)
            want = plan.plan_fused(n, h, v, dtype=torch.float32, arch=None, schedule=schedule, has_bias=True).launches
            key = (lambda s: (s.kernel, tuple(sorted(s.constexprs.items())), s.num_warps, s.num_stages))
            assert launched and {key(s) for s in launched} <= {key(s) for s in want}, (schedule, launched, want)
