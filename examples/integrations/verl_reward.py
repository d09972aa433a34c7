"""verl with rubric rewards: write a verl RL dataset whose rows carry their rubric, and score responses the
way verl's reward manager calls ``compute_score``.

    python examples/integrations/verl_reward.py --out /tmp/rubric_verl.parquet

Then train with verl (its PPO/GRPO entry point), pointing the custom reward hook at rubric_fast::

    python -m verl.trainer.main_ppo algorithm.adv_estimator=grpo \\
        data.train_files=/tmp/rubric_verl.parquet data.val_files=/tmp/rubric_verl.parquet \\
        custom_reward_function.path=$(python -c "import rubric_fast.integrations.verl as m; print(m.__file__)") \\
        custom_reward_function.name=compute_score ...
    # judge: RUBRIC_FAST_VERL_SCORER='{"judge": {"type": "http", ...}}' (default: the rule judge)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rubrics", default=str(ROOT / "examples" / "default_rubrics.jsonl"),
                    help="any rubric file rubric_fast loads (jsonl, HealthBench, RaR, verl parquet, ...)")
    ap.add_argument("--out", default=None, help="verl parquet to write")
    args = ap.parse_args(argv)

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rubric_fast.integrations.verl import compute_score, verl_row
    from rubric_fast.rubric import load_rubrics

    out = Path(args.out or Path(tempfile.mkdtemp(prefix="rubric_fast_verl_")) / "train.parquet")
    rows = [verl_row(r, data_source="rubric_fast") for r in load_rubrics(args.rubrics)]
    pq.write_table(pa.Table.from_pylist(rows), out)
    print(f"wrote {len(rows)} verl rows to {out}")

    # what verl's naive reward manager does per response
    responses = ["a cat sat on a mat.", "NO", "the letter is here."]
    for rec in pq.read_table(out).to_pylist()[:2]:
        for resp in responses:
            score = compute_score(rec["data_source"], resp, rec["reward_model"]["ground_truth"], rec["extra_info"],
                                  return_details=True)
            print(f"{rec['extra_info']['index']:>10}  {resp!r:26} -> {score}")
            assert 0.0 <= score["score"] <= 1.0
    print("verl: ok")


if __name__ == "__main__":
    sys.exit(main())
