"""TRL's GRPOTrainer with rubric rewards and rubric_fast's fused policy loss.

    python examples/integrations/trl_grpo.py --max-steps 3                     # tiny offline model, CPU
    python examples/integrations/trl_grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 200 \\
        --judge '{"type": "http", "model": "Qwen/Qwen3-8B", "endpoints": ["http://localhost:8000/v1"]}'

The dataset has a ``prompt`` column and a ``rubric`` column (the rubric_fast record as JSON); the reward
function grades each completion against its row's rubric; ``RubricFastGRPOTrainer`` computes TRL's loss
(here ``loss_type="dapo"``) with ``fused_linear_policy_loss``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import load_model_and_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rubrics", default=str(ROOT / "examples" / "default_rubrics.jsonl"))
    ap.add_argument("--judge", default='{"type": "rule"}', help="judge mapping (JSON), see rubric_fast.scoring")
    ap.add_argument("--loss-type", default="dapo")
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=8)
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args(argv)

    import torch
    from datasets import Dataset
    from trl import GRPOConfig

    from rubric_fast.integrations import rubric_to_record
    from rubric_fast.integrations.trl import RubricFastGRPOTrainer, RubricReward
    from rubric_fast.rubric import load_rubrics

    model, tok = load_model_and_tokenizer(args.model)
    rows = [{"prompt": r.prompt_text, "rubric": json.dumps(rubric_to_record(r))} for r in load_rubrics(args.rubrics)]
    dataset = Dataset.from_list(rows)

    reward = RubricReward({"judge": json.loads(args.judge), "deadline_s": 120})
    config = GRPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="rubric_fast_trl_"),
        loss_type=args.loss_type, epsilon_high=0.28, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, learning_rate=1e-4, logging_steps=1,
        save_strategy="no", report_to="none", bf16=False, use_cpu=not torch.cuda.is_available(), seed=0)
    trainer = RubricFastGRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                                    processing_class=tok)
    try:
        trainer.train()
    finally:
        reward.close()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        print(f"step {h['step']}: loss {h['loss']:+.4f}  reward {h['reward']:.3f}  entropy {h['entropy']:.3f}  "
              f"judge failures {h.get('rubric_reward/failed_frac', 0):.2f}")
    assert len(logs) == args.max_steps and all(math.isfinite(h["loss"]) for h in logs)
    print("trl: ok")


if __name__ == "__main__":
    main()
