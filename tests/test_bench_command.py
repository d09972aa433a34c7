"""`rubric-fast bench` on the CPU (tiny cases) and the plumbing of bench/gpu_check.sh: outputs written and
well-formed, the RESULTS.md section inserted / replaced, the run order, the targets, the stage budgets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from rubric_fast import bench_command as bc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
RESULTS = ROOT / "bench" / "RESULTS.md"


def _run_bench(tmp_path, *extra, run_id="run-a", status=("GPU tests=12 passed",)):
    results = tmp_path / "RESULTS.md"
    if not results.exists():
        results.write_text(RESULTS.read_text())
    args = ["--device", "cpu", "--cases", "tiny,tiny-nograd", "--providers", "ops,torch,ours", "--reps", "2",
            "--warmup", "1", "--json", str(tmp_path / "bench.json"), "--markdown", str(tmp_path / "bench.md"),
            "--results", str(results), "--run-id", run_id, *extra]
    for s in status:
        args += ["--status", s]
    return bc.main(args), results


def test_bench_cpu_writes_json_markdown_and_results_section(tmp_path):
    rc, results = _run_bench(tmp_path)
    assert rc == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    meta = doc["meta"]
    for key in ("run_id", "date", "device", "torch", "dtype", "reps", "warmup", "timer", "cases"):
        assert key in meta, key
    assert meta["device"] == "cpu" and meta["reps"] == 2 and meta["run_id"] == "run-a"
    assert [c["name"] for c in meta["cases"]] == ["tiny", "tiny-nograd"]
    # table order: case, then provider (floor added first); every pair has a row
    assert [(r["case"], r["provider"]) for r in doc["rows"]] == [
        (c, p) for c in ("tiny", "tiny-nograd") for p in ("floor", "ops", "torch", "ours")]
    for r in doc["rows"]:
        if r["provider"] == "ours":  # Triton kernels: GPU only, reported, never an error
            assert r["median_ms"] is None and r["note"].startswith("n/a:"), r
            continue
        assert r["note"] == "" and r["reps"] == 2, r
        assert 0 < r["min_ms"] <= r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"], r
        case = bc.Case(**next(c for c in meta["cases"] if c["name"] == r["case"]))
        assert r["tflops"] == pytest.approx(bc.floor_flops(case) / (r["median_ms"] * 1e-3) / 1e12)
        if r["provider"] == "floor":
            assert r["ratio_to_floor"] == pytest.approx(1.0)
    assert doc["status"] == {"GPU tests": "12 passed"}
    assert {t["case"] for t in doc["targets"]} == {"tiny", "tiny-nograd"}
    assert all(t["provider"] == "ops" for t in doc["targets"])

    md = (tmp_path / "bench.md").read_text().splitlines()
    assert md[0].startswith("| case | provider | median ms |") and set(md[1]) <= set("|-: ")
    assert len(md) == 2 + len(doc["rows"]) and all(line.count("|") == md[0].count("|") for line in md)

    text = results.read_text()
    header = RESULTS.read_text().split(bc.RESULTS_MARKER)[0]
    assert text.startswith(header), "the header above the marker is kept as it was"
    section = text[text.index("<!-- run run-a -->"):text.index("<!-- end run run-a -->")]
    assert re.search(r"^### \d{4}-\d\d-\d\d \d\d:\d\d UTC · cpu$", section, re.M)
    assert "torch " + torch.__version__ in section
    assert "- checks: GPU tests: 12 passed" in section
    assert "| tiny | ops |" in section and "| tiny-nograd | floor |" in section
    assert "Targets (issue 10), provider `ops`:" in section
    assert re.search(r"^- (met|NOT met|no figure): tiny ops", section, re.M)


def test_rerun_replaces_its_section_and_a_new_run_goes_on_top(tmp_path):
    _run_bench(tmp_path, run_id="run-a")
    _run_bench(tmp_path, run_id="run-a", status=("GPU tests=13 passed",))
    rc, results = _run_bench(tmp_path, run_id="run-b")
    assert rc == 0
    text = results.read_text()
    assert text.count("<!-- run run-a -->") == 1 and text.count("<!-- end run run-a -->") == 1
    assert "GPU tests: 13 passed" in text and "GPU tests: 12 passed" in text.split("<!-- run run-a -->")[0]
    assert text.index("<!-- run run-b -->") < text.index("<!-- run run-a -->"), "newest first"
    assert text.count(bc.RESULTS_MARKER) == 1


def test_from_json_rerenders_with_more_status(tmp_path):
    _run_bench(tmp_path)
    before = json.loads((tmp_path / "bench.json").read_text())
    results = tmp_path / "RESULTS.md"
    rc = bc.main(["--from-json", str(tmp_path / "bench.json"), "--results", str(results), "--status",
                  "train step=skipped"])
    assert rc == 0
    after = json.loads((tmp_path / "bench.json").read_text())
    assert after["rows"] == before["rows"]
    assert after["status"] == {"GPU tests": "12 passed", "train step": "skipped"}
    text = results.read_text()
    assert text.count("<!-- run run-a -->") == 1
    assert "- checks: GPU tests: 12 passed; train step: skipped" in text


def test_bad_arguments_are_named(capsys):
    assert bc.main(["--device", "cpu", "--providers", "nope"]) == 2
    assert "--providers: unknown ['nope']" in capsys.readouterr().err
    assert bc.main(["--device", "cpu", "--cases", "qwen-2k"]) == 2
    assert "accepted: tiny" in capsys.readouterr().err
    assert bc.main(["--device", "cpu", "--status", "no-equals-sign", "--cases", "tiny", "--reps", "1"]) == 2


def test_job_order_puts_ours_and_the_floor_first():
    jobs = [(c.name, p) for c, p in bc.job_order(bc.GPU_CASES, bc.GPU_PROVIDERS)]
    assert jobs[:8] == [(c, p) for c in ("qwen-2k", "llama-4k", "qwen-2k-top20", "qwen-2k-nograd")
                        for p in ("floor", "ours")]
    first = {p: min(i for i, (_, q) in enumerate(jobs) if q == p) for p in bc.GPU_PROVIDERS}
    assert first["ours_fused"] < first["ops"] < first["liger"] < first["torch"]
    assert first["cce"] > first["ops"]
    assert len(jobs) == len(set(jobs)) == len(bc.GPU_CASES) * len(bc.GPU_PROVIDERS)
    assert "torch_chunk" not in bc.GPU_PROVIDERS and "torch_chunk" in bc.PROVIDERS


def test_time_budget_skips_rows_instead_of_running_them():
    rows = bc.run_suite("cpu", bc.CPU_CASES[:1], ["floor", "torch"], torch.float32, reps=2, warmup=1,
                        time_budget=1e-9, log=lambda _: None)
    assert [r["provider"] for r in rows] == ["floor", "torch"]
    assert all(r["median_ms"] is None and r["note"].startswith("skipped") for r in rows)


def test_inputs_are_near_on_policy():
    case = bc.CPU_CASES[0]
    inp = bc.make_inputs(case, "cpu", torch.float32)
    from rubric_fast.reference import linear_logprob_entropy

    lp = linear_logprob_entropy(inp["x"], inp["w"], inp["t"])[0]
    # ratios near 1 (noise 0.05 in log space): no provider gains from clipped tokens
    assert (inp["old"] - lp).abs().max() < 0.3
    again = bc.make_inputs(case, "cpu", torch.float32)
    assert torch.equal(inp["x"], again["x"]) and torch.equal(inp["t"], again["t"]), "seeded"


def test_targets_and_their_text():
    cases = [bc.asdict(c) for c in bc.GPU_CASES]
    rows = [dict(case="qwen-2k", provider="ours", ratio_to_floor=1.2, peak_extra_gb=1.7),
            dict(case="qwen-2k-top20", provider="ours", ratio_to_floor=0.65, peak_extra_gb=0.9),
            dict(case="qwen-2k-nograd", provider="ours", ratio_to_floor=1.3, peak_extra_gb=0.1)]
    got = {(t["case"], t["metric"]): t for t in bc.evaluate_targets(rows, cases, "ours")}
    assert got[("qwen-2k", "x_floor")]["met"] is True and got[("qwen-2k", "x_floor")]["aim_met"] is False
    assert got[("qwen-2k", "peak_extra_gb")]["met"] is False
    assert got[("qwen-2k-top20", "x_floor")]["met"] is True and got[("qwen-2k-top20", "x_floor")]["limit"] == 0.7
    assert got[("qwen-2k-nograd", "x_floor")]["met"] is False and got[("qwen-2k-nograd", "x_floor")]["limit"] == 1.15
    assert got[("llama-4k", "x_floor")]["met"] is None  # no row: no figure, not a pass
    assert bc.format_target(got[("qwen-2k", "x_floor")]) == \
        "met: qwen-2k ours 1.20x the floor (target <= 1.5x; aim 1.1x: not yet)"
    assert bc.format_target(got[("qwen-2k", "peak_extra_gb")]) == \
        "NOT met: qwen-2k ours peak extra memory 1.70 GB (target <= 1.5 GB)"
    assert bc.format_target(got[("qwen-2k-nograd", "x_floor")]).startswith("NOT met: qwen-2k-nograd ours 1.30x one GEMM")
    assert bc.format_target(got[("llama-4k", "x_floor")]).startswith("no figure: llama-4k ours")


# ------------------------------------------------------------------------------------------------------
# bench/gpu_check.sh


def _budgets(text):
    return {k: int(v) for k, v in re.findall(r"^(B_[A-Z_]+)=(\d+)\s*$", text, re.M)}


def test_gpu_check_stage_budgets_fit_five_minutes():
    text = SCRIPT.read_text()
    total = int(re.search(r"^TOTAL_BUDGET=(\d+)\s*$", text, re.M).group(1))
    budgets = _budgets(text)
    assert total <= 300
    assert sum(budgets.values()) <= total, budgets
    # every stage has a budget: each budget_for names one of the B_ variables once, or 'rest' (the train-step
    # stage: what is left before the deadline, less the write-up's budget)
    used = re.findall(r'^\s*budget_for\s+"[^"]*"\s*\\?\s*(?:\n\s*)?("\$(B_[A-Z_]+)"|rest)\s*$', text, re.M)
    names = [b for _, b in used if b]
    assert sorted(names) == sorted(budgets), (names, budgets)
    assert sum(1 for whole, _ in used if whole == "rest") == 1
    # the background build ends within the stages it overlaps
    bg = re.search(r"^B_BUILD_BACKGROUND=\$\(\((.*)\)\)\s*$", text, re.M).group(1)
    assert sorted(re.findall(r"B_[A-Z_]+", bg)) == ["B_BUILD_WAIT", "B_COMPILE_CHECK", "B_TRITON_TESTS"]
    # order: compile-check first among the checks, correctness before timing, the train step last but one
    order = [b or "rest" for _, b in used]
    assert order.index("B_COMPILE_CHECK") < order.index("B_TRITON_TESTS") < order.index("B_BENCH")
    assert order.index("B_NATIVE_TESTS") < order.index("B_BENCH") < order.index("rest") < order.index("B_WRITEUP")
    # at least 10 timed repetitions after a warm-up on the GPU
    reps = re.search(r"bench_args=\(--reps (\d+) --warmup (\d+)\)", text)
    assert int(reps.group(1)) >= 10 and int(reps.group(2)) >= 1


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    before = RESULTS.read_text()
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_SKIP="compile-check train")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert RESULTS.read_text() == before, "a dry run must not touch bench/RESULTS.md"
    files = {p.name for p in out.iterdir()}
    assert {"gpu_check.log", "bench.json", "RESULTS.md", "gpu_tests.txt", "build.log"} <= files
    assert len(files) <= 8
    doc = json.loads((out / "bench.json").read_text())
    assert doc["meta"]["device"] == "cpu" and doc["meta"]["reps"] == 2 and doc["rows"]
    assert doc["status"]["benchmark"] == "passed" and doc["status"]["train step"] == "skipped"
    assert doc["status"]["compile-check sm_90"] == "skipped"
    assert doc["status"]["GPU tests, Triton bf16 + fp32"].startswith("passed (")
    text = (out / "RESULTS.md").read_text()
    assert text.count("<!-- run ") == 1 and "- checks: compile-check sm_90: skipped" in text
    assert "| tiny | floor |" in text
    log = (out / "gpu_check.log").read_text()
    assert re.search(r"== \[\d+s\] done: ", log)
    assert len(proc.stdout) < 12000, "the output must fit the device tool's 12,000-character tail"
