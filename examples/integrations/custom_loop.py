"""A home-grown GRPO loop on rubric_fast's drop-in ops: no logits tensor anywhere.

    python examples/integrations/custom_loop.py --steps 2            # tiny offline model, CPU, seconds
    python examples/integrations/custom_loop.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 50

Per step: sample a group of completions per prompt, grade them with the rubric (rule judge; failed
judgements are None and leave the group baseline), ``group_advantages``, then the model runs only up to
its last hidden states (``hidden_states_and_head``) and ``fused_linear_policy_loss`` goes from hidden states
and LM-head weight to the loss and its gradient.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_model import load_model_and_tokenizer  # noqa: E402

from rubric_fast.integrations import BackgroundScorer  # noqa: E402
from rubric_fast.integrations.hf import hidden_states_and_head  # noqa: E402
from rubric_fast.ops import (  # noqa: E402
    PolicyLossConfig,
    fused_linear_policy_loss,
    group_advantages,
    linear_logprob_entropy,
)
from rubric_fast.rubric import load_rubrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rubrics", default=str(ROOT / "examples" / "default_rubrics.jsonl"))
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(args.model)
    tok.padding_side = "left"
    rubrics = load_rubrics(args.rubrics)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    config = PolicyLossConfig(loss="ppo_clip", eps_low=0.2, eps_high=0.28)   # DAPO clip-higher, token mean
    G = args.group_size

    with BackgroundScorer({"judge": {"type": "rule"}}) as scorer:
        for step in range(args.steps):
            batch = [rubrics[(step * args.prompts + i) % len(rubrics)] for i in range(args.prompts)]
            # 1. rollouts: G samples per prompt (left-padded prompts, completions follow)
            enc = tok([r.prompt_text for r in batch for _ in range(G)], return_tensors="pt", padding=True)
            model.eval()
            with torch.no_grad():
                seqs = model.generate(**enc, do_sample=True, temperature=args.temperature, top_k=0,
                                      max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
            plen = enc.input_ids.shape[1]
            completion = seqs[:, plen:]
            # keep tokens up to and including the first eos
            is_eos = completion == tok.eos_token_id
            after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
            completion_mask = (~after_eos).long()
            texts = tok.batch_decode(completion.masked_fill(after_eos, tok.pad_token_id), skip_special_tokens=True)

            # 2. rewards from the rubric (None = failed judgement, NaN for the ops: excluded from its group)
            scored = scorer.score_many([(f"s{step}-{i}", batch[i // G], t) for i, t in enumerate(texts)])
            rewards = torch.tensor([math.nan if s.reward is None else s.reward for s in scored])
            group_index = torch.arange(len(batch)).repeat_interleave(G)
            adv, valid = group_advantages(rewards, group_index, estimator="grpo")

            # 3. the policy loss straight from hidden states
            model.train()
            input_ids = seqs
            attention_mask = torch.cat([enc.attention_mask, completion_mask], dim=1)
            hidden, weight, bias = hidden_states_and_head(model, input_ids, attention_mask)
            clen = completion.shape[1]
            h = hidden[:, plen - 1:-1].reshape(-1, hidden.shape[-1])      # position t predicts token t + 1
            targets = completion.masked_fill(completion_mask == 0, -100).reshape(-1)
            loss_weight = (completion_mask * valid[:, None]).float().reshape(-1)
            with torch.no_grad():   # on-policy: the sampling policy's log-probs are the current ones
                old_logp, _, _ = linear_logprob_entropy(h.detach(), weight.detach(), targets, bias=bias,
                                                        temperature=args.temperature, return_entropy=False)
            loss, stats, _logp, entropy = fused_linear_policy_loss(
                h, weight, targets, old_logp, adv.repeat_interleave(clen), loss_weight,
                seq_index=torch.arange(len(texts)).repeat_interleave(clen), config=config, bias=bias,
                temperature=args.temperature)
            if step == 0:  # the fused path is the model's own log-softmax, without the [B, T, V] logits
                with torch.no_grad():
                    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, plen - 1:-1]
                    ref = torch.log_softmax(logits.float() / args.temperature, -1).gather(
                        -1, completion.unsqueeze(-1)).squeeze(-1)
                m = completion_mask.bool()
                err = (ref[m] - old_logp.view_as(ref)[m]).abs().max().item()
                print(f"max |logp(fused) - log_softmax(logits)| = {err:.2e}")
                assert err < 1e-4, err
            opt.zero_grad()
            loss.backward()
            opt.step()

            n_ok = int(valid.sum())
            print(f"step {step}: loss {loss.item():+.4f}  reward {torch.nanmean(rewards).item():.3f}  "
                  f"scored {n_ok}/{len(texts)}  entropy {entropy[targets != -100].mean().item():.3f}  "
                  f"ratio {stats.ratio_mean.item():.3f}")
            assert math.isfinite(loss.item())
    print("custom loop: ok")


if __name__ == "__main__":
    main()
