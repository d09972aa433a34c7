"""`rubric-fast bench`: the kernel microbenchmark suite on whatever device is present.

Providers (fwd + bwd of linear -> log-prob / entropy -> GRPO loss, unless the case is forward-only):
  floor           the three bare GEMMs of forward + backward (X W^T, dz W, dz^T X), in the input dtype
                  (forward-only cases: the one GEMM X W^T)
  ours            the fused Triton launcher (rubric_fast.kernels.fused_linear_policy_loss), schedule "auto"
                  (forward-only cases: the Triton forward launcher)
  ours_fused      the same, schedule "fused" (logits computed once per row block: three GEMM-equivalents)
  ours_recompute  the same, schedule "recompute" (forward, coefficients, then the recompute backward)
  ops             the public op rubric_fast.ops.fused_linear_policy_loss with autograd, on this device's backend
                  (CPU: the C++ ops; GPU: the Triton kernels through the op layer)
  cce             Cut Cross-Entropy linear_cross_entropy, log-prob only (when importable)
  liger           Liger-Kernel LigerFusedLinearGRPOLoss (when importable; without torch.compile unless
                  BENCH_LIGER_COMPILED=1)
  torch           materialized PyTorch: fp32 logits, log_softmax, gather, entropy, autograd
  torch_chunk     the row/vocabulary-chunked PyTorch reference (rubric_fast.reference), recompute backward
                  (the test oracle; not in the default GPU set: seconds per step at the GPU shapes)

Inputs are built on the device once per shape (seeded), old log-probs are the model's own plus small noise
(ratios near 1, as in a first GRPO step: no provider gains from clipped tokens). Each (case, provider) runs
``--warmup`` untimed calls, then ``--reps`` timed calls (CUDA events on a GPU). Figures: median ms, spread
(min-max, and p10/p90 in the JSON), effective TFLOP/s (the floor's FLOPs over the time), peak extra memory
(peak allocated during the timed calls minus what was allocated before them: gradients dX and dW included),
ratio to the floor of the same case. The most important rows run first (ours and the floor at every case,
then the other schedules, the op layer and the anchors), so a time limit (``--time-budget``) still leaves
them; results are written after every row. On a CPU the suite runs tiny shapes with the CPU providers.

``--results FILE`` writes a dated section (card, versions, the table, the targets met or not) into a
RESULTS.md-style file; ``--from-json`` re-renders that section from a saved JSON without measuring.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    h: int
    v: int
    grad: bool = True
    top_entropy_fraction: float | None = None

    @property
    def role(self) -> str:
        """Which target applies: ``main`` (fwd + bwd), ``top`` (entropy-selected), ``nograd`` (forward)."""
        if not self.grad:
            return "nograd"
        return "top" if self.top_entropy_fraction else "main"

    def describe(self) -> str:
        what = "forward only" if not self.grad else "fwd+bwd"
        if self.top_entropy_fraction:
            what += f", loss on the top {self.top_entropy_fraction:.0%} entropy tokens"
        return f"`{self.name}` N={self.n} H={self.h} V={self.v} ({what})"


GPU_CASES = [
    Case("qwen-2k", 16384, 2048, 151936),
    Case("llama-4k", 8192, 4096, 128256),
    Case("qwen-2k-top20", 16384, 2048, 151936, top_entropy_fraction=0.2),
    Case("qwen-2k-nograd", 16384, 2048, 151936, grad=False),
]
CPU_CASES = [
    Case("tiny", 256, 64, 1000),
    Case("tiny-top20", 256, 64, 1000, top_entropy_fraction=0.2),
    Case("tiny-nograd", 256, 64, 1000, grad=False),
]
PROVIDERS = ["floor", "ours", "ours_fused", "ours_recompute", "ops", "cce", "liger", "torch", "torch_chunk"]
GPU_PROVIDERS = [p for p in PROVIDERS if p != "torch_chunk"]
CPU_PROVIDERS = ["floor", "ops", "torch", "torch_chunk"]
# run order: tier first (ours vs the floor at every case before anything else), then case order
_TIER = {"floor": 0, "ours": 0, "ours_fused": 1, "ours_recompute": 1, "ops": 2, "cce": 3, "liger": 3, "torch": 4,
         "torch_chunk": 5}

# targets (issue 10), by case role: (metric, limit, aim)
TARGETS = {
    "main": [("x_floor", 1.5, 1.1), ("peak_extra_gb", 1.5, None)],
    "top": [("x_floor", 0.7, None), ("peak_extra_gb", 1.5, None)],
    "nograd": [("x_floor", 1.15, None)],
}
RESULTS_MARKER = "<!-- gpu_check results: newest first -->"
GB = 1e9


class Unavailable(Exception):
    pass


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------------------------------------------
# inputs and providers


def make_inputs(case: Case, dev, dtype, seed=0):
    """Inputs of one shape, generated on ``dev`` (seeded): hidden, weight, targets, old log-probs (the model's
    own plus N(0, 0.05) noise), advantages, loss weights."""
    dev = torch.device(dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(case.n, case.h, generator=g, device=dev, dtype=dtype).mul_(0.5)
    w = torch.randn(case.v, case.h, generator=g, device=dev, dtype=dtype).mul_(1.0 / math.sqrt(case.h))
    t = torch.randint(0, case.v, (case.n,), generator=g, device=dev)
    from rubric_fast.reference import linear_logprob_entropy as ref_lle

    with torch.no_grad():
        logp = ref_lle(x, w, t, return_entropy=False)[0].float()
    old = logp + 0.05 * torch.randn(case.n, generator=g, device=dev)
    adv = torch.randn(case.n, generator=g, device=dev)
    lw = torch.ones(case.n, device=dev)
    return dict(x=x, w=w, t=t, old=old, adv=adv, lw=lw)


def floor_flops(case: Case) -> float:
    return (6.0 if case.grad else 2.0) * case.n * case.h * case.v


def _cfg(case):
    from rubric_fast.reference import PolicyLossConfig

    return PolicyLossConfig(loss="ppo_clip", aggregation="token_mean", top_entropy_fraction=case.top_entropy_fraction)


def _torch_selected_loss(case, logp, ent, inp):
    from rubric_fast import reference as ref

    cfg = _cfg(case)
    mask = None
    if case.top_entropy_fraction:
        mask = ref.entropy_mask(ent.detach().float(), inp["lw"] != 0, case.top_entropy_fraction)
    loss, _ = ref.policy_loss(logp, inp["old"], inp["adv"], inp["lw"], config=cfg.replace(top_entropy_fraction=None),
                              entropy=None, entropy_mask=mask)
    return loss


def provider_fn(name: str, case: Case, inp: dict):
    """A zero-argument callable doing one step of the provider on the case."""
    x, w, t = inp["x"], inp["w"], inp["t"]
    if name == "floor":
        def run():
            z = x @ w.T
            if case.grad:
                z @ w
                z.T @ x
        return run
    if name == "torch":
        def run():
            with torch.set_grad_enabled(case.grad):
                xr = x.detach().requires_grad_(case.grad)
                wr = w.detach().requires_grad_(case.grad)
                z = (xr @ wr.T).float()
                lsm = torch.log_softmax(z, -1)
                logp = lsm.gather(1, t[:, None]).squeeze(1)
                ent = -(lsm.exp() * lsm).sum(-1)
                if case.grad:
                    _torch_selected_loss(case, logp, ent, inp).backward()
        return run
    if name == "torch_chunk":
        from rubric_fast.reference import linear_logprob_entropy

        def run():
            with torch.set_grad_enabled(case.grad):
                xr = x.detach().requires_grad_(case.grad)
                wr = w.detach().requires_grad_(case.grad)
                logp, ent, _ = linear_logprob_entropy(xr, wr, t)
                if case.grad:
                    _torch_selected_loss(case, logp, ent, inp).backward()
        return run
    if name == "ops":
        # the public op with autograd, on the backend chosen for this device (CPU: C++; GPU: Triton)
        from rubric_fast import ops as rf_ops

        cfg = _cfg(case)

        def run():
            with torch.set_grad_enabled(case.grad):
                xr = x.detach().requires_grad_(case.grad)
                wr = w.detach().requires_grad_(case.grad)
                if not case.grad:
                    rf_ops.linear_logprob_entropy(xr, wr, t)
                    return
                loss, _, _, _ = rf_ops.fused_linear_policy_loss(xr, wr, t, inp["old"], inp["adv"], inp["lw"],
                                                                config=cfg)
                loss.backward()
        return run
    if name in ("ours", "ours_fused", "ours_recompute"):
        if x.device.type != "cuda":
            raise Unavailable("Triton kernels need a GPU here")
        if not case.grad:
            if name != "ours":
                raise Unavailable("forward only: see ours")
            from rubric_fast.kernels.linear_logprob_entropy import linear_logprob_entropy_fwd

            return lambda: linear_logprob_entropy_fwd(x, w, t, None, 1.0, -100)
        schedule = {"ours": "auto", "ours_fused": "fused", "ours_recompute": "recompute"}[name]
        if schedule == "fused" and case.top_entropy_fraction:
            raise Unavailable("the selection needs every row's entropy first (auto: recompute)")
        from rubric_fast.kernels.fused_linear_policy_loss import fused_linear_policy_loss_fwd_bwd

        fparams, iparams = _cfg(case).to_op_args()
        return lambda: fused_linear_policy_loss_fwd_bwd(
            x, w, t, inp["old"], inp["adv"], inp["lw"], None, None, None, None, fparams, iparams, None, 1.0, -100,
            True, True, False, schedule=schedule)
    if name == "liger":
        if x.device.type != "cuda":
            raise Unavailable("GPU only")
        if case.top_entropy_fraction:
            raise Unavailable("no entropy-selected mode")
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            raise Unavailable(f"liger-kernel not importable: {exc}") from None

        seq = 1024 if case.n % 1024 == 0 else case.n
        b = case.n // seq
        loss_mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False,
                                            compiled=os.environ.get("BENCH_LIGER_COMPILED", "0") == "1")
        ids = t.view(b, seq)
        am = torch.ones(b, seq, device=x.device, dtype=torch.long)
        adv_b = inp["adv"].view(b, seq)[:, 0].contiguous()
        old = inp["old"].view(b, seq)

        def run():
            with torch.set_grad_enabled(case.grad):
                xr = x.detach().view(b, seq, -1).requires_grad_(case.grad)
                wr = w.detach().requires_grad_(case.grad)
                out = loss_mod(xr, wr, ids, am, adv_b, old_per_token_logps=old)
                loss = out[0] if isinstance(out, tuple) else out
                if case.grad:
                    loss.backward()
        return run
    if name == "cce":
        if x.device.type != "cuda":
            raise Unavailable("GPU only")
        if case.top_entropy_fraction:
            raise Unavailable("no entropy-selected mode")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"cut-cross-entropy not importable: {exc}") from None

        def run():
            with torch.set_grad_enabled(case.grad):
                xr = x.detach().requires_grad_(case.grad)
                wr = w.detach().requires_grad_(case.grad)
                nll = linear_cross_entropy(xr, wr, t, reduction="none")
                if case.grad:
                    (nll * inp["adv"]).mean().backward()
        return run
    raise ValueError(f"unknown provider {name!r}; accepted: {', '.join(PROVIDERS)}")


# ------------------------------------------------------------------------------------------------------
# measuring


def _empty_row(case: Case, provider: str) -> dict:
    return dict(case=case.name, provider=provider, n=case.n, h=case.h, v=case.v, grad=case.grad,
                top_entropy_fraction=case.top_entropy_fraction, reps=0, median_ms=None, min_ms=None, max_ms=None,
                p10_ms=None, p90_ms=None, tflops=None, peak_extra_gb=None, ratio_to_floor=None, note="")


def _time_reps(fn, dev, reps: int) -> list[float]:
    """Milliseconds of each call: CUDA events around each call on a GPU (one synchronization at the end),
    wall clock on a CPU."""
    if dev.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(dev)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _spread(times: list[float]) -> dict:
    s = sorted(times)
    if len(s) >= 2:
        q = statistics.quantiles(s, n=10, method="inclusive")
        p10, p90 = q[0], q[-1]
    else:
        p10 = p90 = s[0]
    return dict(median_ms=statistics.median(s), min_ms=s[0], max_ms=s[-1], p10_ms=p10, p90_ms=p90)


def measure(case: Case, provider: str, inp: dict, dev, reps: int = 10, warmup: int = 2,
            deadline: float | None = None) -> dict:
    """One row: ``warmup`` untimed calls (the first compiles), then ``reps`` timed calls. With a ``deadline``
    (time.monotonic()), the timed calls are skipped when the last warm-up call says they would not fit."""
    row = _empty_row(case, provider)
    dev = torch.device(dev)
    try:
        fn = provider_fn(provider, case, inp)
        last = 0.0
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            last = time.perf_counter() - t0
        if deadline is not None and time.monotonic() + last * reps > deadline:
            row["note"] = f"skipped: {reps} reps need ~{last * reps:.0f} s, time budget left {deadline - time.monotonic():.0f} s"
            return row
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        times = _time_reps(fn, dev, reps)
        if dev.type == "cuda":
            row["peak_extra_gb"] = (torch.cuda.max_memory_allocated(dev) - base) / GB
        row.update(_spread(times), reps=len(times))
        row["tflops"] = floor_flops(case) / (row["median_ms"] * 1e-3) / 1e12
    except Unavailable as exc:
        row["note"] = f"n/a: {exc}"
    except torch.OutOfMemoryError:
        row["note"] = "OOM"
    except Exception as exc:  # noqa: BLE001 - a failing provider must not stop the table
        row["note"] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def job_order(cases: list[Case], providers: list[str]) -> list[tuple[Case, str]]:
    """(case, provider) pairs, most important first: by provider tier, then case order, then provider order."""
    jobs = [(ci, pi, c, p) for ci, c in enumerate(cases) for pi, p in enumerate(providers)]
    jobs.sort(key=lambda j: (_TIER.get(j[3], 9), j[0], j[1]))
    return [(c, p) for _, _, c, p in jobs]


def add_ratios(rows: list[dict]) -> None:
    floors = {r["case"]: r["median_ms"] for r in rows if r["provider"] == "floor" and r["median_ms"]}
    for r in rows:
        f = floors.get(r["case"])
        r["ratio_to_floor"] = r["median_ms"] / f if (f and r["median_ms"]) else None


def run_suite(dev, cases, providers, dtype, reps=10, warmup=2, time_budget=None, log=print,
              on_row=None) -> list[dict]:
    """Measure every (case, provider) in job_order; inputs are built once per shape. Returns the rows in table
    order (case, then provider); ``on_row(rows)`` is called after each row so partial results survive."""
    dev = torch.device(dev)
    deadline = time.monotonic() + time_budget if time_budget else None
    done: dict[tuple[str, str], dict] = {}
    inputs: dict[tuple[int, int, int], dict] = {}

    def table():
        rows = [done[(c.name, p)] for c in cases for p in providers if (c.name, p) in done]
        add_ratios(rows)
        return rows

    for case, p in job_order(cases, providers):
        if deadline is not None and time.monotonic() > deadline:
            row = _empty_row(case, p)
            row["note"] = "skipped: time budget spent"
        else:
            key = (case.n, case.h, case.v)
            if key not in inputs:
                inputs[key] = make_inputs(case, dev, dtype)
            row = measure(case, p, inputs[key], dev, reps=reps, warmup=warmup, deadline=deadline)
        done[(case.name, p)] = row
        rows = table()
        log(format_row(next(r for r in rows if r["case"] == case.name and r["provider"] == p)))
        if on_row is not None:
            on_row(rows)
    inputs.clear()
    return table()


# ------------------------------------------------------------------------------------------------------
# reporting


def _f(v, fmt):
    return format(v, fmt) if v is not None else "-"


def format_row(r: dict) -> str:
    if r["median_ms"] is None:
        return f"  {r['case']:>15} {r['provider']:>14}: {r['note']}"
    mem = f" {r['peak_extra_gb']:.2f} GB" if r["peak_extra_gb"] is not None else ""
    ratio = f" {r['ratio_to_floor']:.2f}x floor" if r["ratio_to_floor"] is not None else ""
    return (f"  {r['case']:>15} {r['provider']:>14}: {r['median_ms']:9.2f} ms [{r['min_ms']:.2f}-{r['max_ms']:.2f}]"
            f" {r['tflops']:6.1f} TF{ratio}{mem}")


def to_markdown(rows: list[dict]) -> str:
    out = ["| case | provider | median ms | spread ms (min-max) | TFLOP/s | peak extra GB | x floor | note |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        spread = f"{r['min_ms']:.2f}-{r['max_ms']:.2f}" if r["min_ms"] is not None else "-"
        out.append(f"| {r['case']} | {r['provider']} | {_f(r['median_ms'], '.2f')} | {spread} | "
                   f"{_f(r['tflops'], '.3g')} | {_f(r['peak_extra_gb'], '.2f')} | {_f(r['ratio_to_floor'], '.2f')} | "
                   f"{r['note'].replace('|', '/')} |")
    return "\n".join(out)


def evaluate_targets(rows: list[dict], cases: list[dict], provider: str) -> list[dict]:
    """The issue's targets for ``provider``'s rows: met True / False, or None when there is no figure."""
    by_case = {r["case"]: r for r in rows if r["provider"] == provider}
    out = []
    for c in cases:
        case = Case(**c)
        for metric, limit, aim in TARGETS[case.role]:
            r = by_case.get(case.name)
            value = None if r is None else (r["ratio_to_floor"] if metric == "x_floor" else r[metric])
            out.append(dict(case=case.name, role=case.role, provider=provider, metric=metric, value=value, limit=limit, aim=aim,
                            met=None if value is None else value <= limit,
                            aim_met=None if (value is None or aim is None) else value <= aim))
    return out


def format_target(t: dict) -> str:
    """e.g. ``met: qwen-2k ours 1.23x the floor (target <= 1.5x; aim 1.1x: not yet)``."""
    head = f"{t['case']} {t['provider']}"
    if t["metric"] == "x_floor":
        what = "one GEMM" if t["role"] == "nograd" else "the floor"
        figure = None if t["value"] is None else f"{t['value']:.2f}x {what}"
        target = f"target <= {t['limit']}x" + (f"; aim {t['aim']}x" if t["aim"] is not None else "")
        if t["aim_met"] is not None:
            target += ": met" if t["aim_met"] else ": not yet"
    else:
        what = "peak extra memory"
        figure = None if t["value"] is None else f"{what} {t['value']:.2f} GB"
        target = f"target <= {t['limit']} GB"
    if figure is None:
        return f"no figure: {head} vs {what} ({target})"
    return f"{'met' if t['met'] else 'NOT met'}: {head} {figure} ({target})"


def results_section(doc: dict) -> str:
    """The dated RESULTS.md section of one run (between run markers, so that a rerun replaces it)."""
    m = doc["meta"]
    rid = m["run_id"]
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "triton", "cuda", "driver") if m.get(k))
    lines = [f"<!-- run {rid} -->",
             f"### {m['date']} · {m['device']}",
             "",
             (f"- {versions}; {m['dtype']}; {m['reps']} timed repetitions after {m['warmup']} warm-up call(s) per "
              f"row ({m['timer']}); commit {m.get('commit') or 'unknown'}; run {rid}")]
    if doc.get("status"):
        lines.append("- checks: " + "; ".join(f"{k}: {v}" for k, v in doc["status"].items()))
    lines.append("- cases: " + "; ".join(Case(**c).describe() for c in m["cases"]))
    lines += ["", to_markdown(doc["rows"]), ""]
    if doc.get("targets"):
        lines.append(f"Targets (issue 10), provider `{doc['targets'][0]['provider']}`:")
        lines += [f"- {format_target(t)}" for t in doc["targets"]]
    lines.append(f"<!-- end run {rid} -->")
    return "\n".join(lines)


def write_results(path: str, doc: dict) -> None:
    """Insert (or replace) this run's section in a RESULTS.md-style file, newest first below RESULTS_MARKER."""
    rid = doc["meta"]["run_id"]
    section = results_section(doc)
    text = ""
    if os.path.exists(path):
        with open(path) as fh:
            text = fh.read()
    begin, end = f"<!-- run {rid} -->", f"<!-- end run {rid} -->"
    if begin in text and end in text:
        a = text.index(begin)
        b = text.index(end) + len(end)
        text = text[:a] + section + text[b:]
    elif RESULTS_MARKER in text:
        a = text.index(RESULTS_MARKER) + len(RESULTS_MARKER)
        rest = text[a:].lstrip("\n")
        text = text[:a] + "\n\n" + section + "\n" + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + RESULTS_MARKER + "\n\n" + section + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    if not out:
        return {}
    parts = [p.strip() for p in out[0].split(",")]
    return dict(smi_name=parts[0], driver=parts[1] if len(parts) > 1 else None)


def _commit() -> str | None:
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def collect_meta(dev, dtype, cases, reps, warmup, run_id=None) -> dict:
    now = _dt.datetime.now(_dt.timezone.utc)
    gpu = dev.type == "cuda"
    meta = dict(run_id=run_id or now.strftime("%Y%m%dT%H%M%SZ"), date=now.strftime("%Y-%m-%d %H:%M UTC"),
                device=torch.cuda.get_device_name(dev) if gpu else "cpu", torch=torch.__version__,
                cuda=torch.version.cuda if gpu else None, dtype=str(dtype).replace("torch.", ""), reps=reps,
                warmup=warmup, timer="CUDA events" if gpu else "wall clock", commit=_commit(),
                cases=[asdict(c) for c in cases])
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if gpu:
        meta.update(_nvidia_smi())
        major, minor = torch.cuda.get_device_capability(dev)
        meta["capability"] = f"sm_{major}{minor}"
    return meta


def parse_status(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--status: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def save_outputs(doc: dict, args) -> None:
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, args.json)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(to_markdown(doc["rows"]) + "\n")
    if args.results:
        write_results(args.results, doc)


# ------------------------------------------------------------------------------------------------------
# command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all for the device)")
    parser.add_argument("--providers", default=None, help=f"comma-separated, from: {', '.join(PROVIDERS)}")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--reps", type=int, default=10, help="timed calls per row, after the warm-up (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per row first (default 2)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no row after this, skip timed calls that would not fit")
    parser.add_argument("--target-provider", default=None,
                        help="whose rows the targets judge (default: ours on a GPU, ops on a CPU)")
    parser.add_argument("--json", default=None, help="write meta, rows, targets and status as JSON to this file")
    parser.add_argument("--markdown", default=None, help="write the table as markdown to this file")
    parser.add_argument("--results", default=None,
                        help="insert this run's dated section into a RESULTS.md-style file (e.g. bench/RESULTS.md)")
    parser.add_argument("--run-id", default=None, help="names the section in --results (a rerun replaces it)")
    parser.add_argument("--status", action="append", metavar="KEY=VALUE",
                        help="a check's outcome for the section's 'checks' line (repeatable)")
    parser.add_argument("--from-json", default=None,
                        help="measure nothing: re-render --results / --markdown / --json from this saved JSON")
    parser.add_argument("--plan", action="append", metavar="N,H,V", default=None,
                        help="measure nothing, no GPU needed: print the schedule, row blocks, GEMM FLOPs as a "
                             "multiple of the three-GEMM floor, workspace, peak extra memory and estimated HBM "
                             "traffic of each case at this shape (repeatable; 'default' = the two benchmark shapes)")
    parser.add_argument("--arch", type=int, default=90, help="with --plan: compute capability (default 90)")


def _select(args, gpu: bool):
    all_cases = GPU_CASES if gpu else CPU_CASES
    cases = all_cases
    if args.cases:
        names = args.cases.split(",")
        unknown = [n for n in names if n not in {c.name for c in all_cases}]
        if unknown:
            raise ValueError(f"--cases: unknown {unknown}; accepted: {', '.join(c.name for c in all_cases)}")
        cases = [c for c in all_cases if c.name in names]
    providers = args.providers.split(",") if args.providers else (GPU_PROVIDERS if gpu else CPU_PROVIDERS)
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        raise ValueError(f"--providers: unknown {bad}; accepted: {', '.join(PROVIDERS)}")
    if "floor" not in providers:
        providers = ["floor", *providers]
    return cases, providers


def _rerender(args) -> int:
    with open(args.from_json) as fh:
        doc = json.load(fh)
    doc.setdefault("status", {}).update(parse_status(args.status))
    if args.json == args.from_json or args.json is None:
        args.json = args.from_json
    save_outputs(doc, args)
    for t in doc.get("targets", []):
        print("  " + format_target(t))
    return 0


def _measure(args) -> int:
    try:
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device: got {args.device!r}; accepted: cuda, cuda:N, cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (torch "
                         f"{torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"--device: got {args.device!r}; accepted: cuda, cuda:N, cpu")
    gpu = dev.type == "cuda"
    cases, providers = _select(args, gpu)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if not gpu:
        dtype = torch.float32  # CPU matmuls in bf16 are not what anyone trains with
    if args.reps < 1 or args.warmup < 0:
        raise ValueError(f"--reps must be >= 1 and --warmup >= 0, got {args.reps} and {args.warmup}")
    meta = collect_meta(dev, dtype, cases, args.reps, args.warmup, args.run_id)
    doc = dict(meta=meta, rows=[], targets=[], status=parse_status(args.status))
    target_provider = args.target_provider or ("ours" if gpu else "ops")
    print(f"rubric-fast bench on {meta['device']} ({meta['dtype']}), torch {meta['torch']}, triton "
          f"{meta['triton']}, CUDA {meta['cuda']}: {len(cases)} cases x {len(providers)} providers, "
          f"{args.reps} reps after {args.warmup} warm-up", flush=True)

    def on_row(rows):
        doc["rows"] = rows
        doc["targets"] = evaluate_targets(rows, meta["cases"], target_provider)
        save_outputs(doc, args)

    def log(line):
        print(line, flush=True)

    rows = run_suite(dev, cases, providers, dtype, reps=args.reps, warmup=args.warmup, time_budget=args.time_budget,
                     log=log, on_row=on_row)
    on_row(rows)
    print(f"targets (provider {target_provider}):")
    for t in doc["targets"]:
        print("  " + format_target(t))
    return 0


def run(args) -> int:
    # one branch per mode; a new mode (e.g. a plan printer) adds its option in add_arguments and a branch here
    try:
        if args.plan:
            return _print_plan(args)
        if args.from_json:
            return _rerender(args)
        return _measure(args)
    except ValueError as exc:
        print(f"rubric-fast bench: {exc}", file=sys.stderr)
        return 2


def _print_plan(args) -> int:
    from .bench_plan import show

    shapes = []
    for text in args.plan:
        if text == "default":
            shapes += [(c.n, c.h, c.v) for c in GPU_CASES if c.grad and c.top_entropy_fraction is None]
            continue
        try:
            n, h, v = (int(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"--plan: expected N,H,V (three integers) or 'default', got {text!r}") from None
        if min(n, h, v) <= 0:
            raise ValueError(f"--plan: N, H and V must be positive, got {text!r}")
        shapes.append((n, h, v))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(show(shapes, dtype=dtype, arch=args.arch))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rubric-fast bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
