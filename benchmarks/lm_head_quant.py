"""Accuracy of a quantized `lm_head` (int8 blocks, NF4) against the bf16 head, on the same final hidden states.

    python benchmarks/lm_head_quant.py [--json] [--tokens N]

Hidden states: the goldens' final-norm states (tiny-a, tiny-b: the reference implementation's own) and
the random `mid` checkpoint's on N random prompt tokens (bf16 model). For each head: top-1 agreement with
the bf16 head's logits and the mean KL(p_bf16 || p_quantized) of the softmax. The CPU engine quantizes
the head by default only where top-1 agreement is >= 99.5% on every set (`Engine.load(lm_head=...)`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimivl_cli.engine.engine import Engine
from kimivl_cli.quant.modules import Int8BlockLinear, NF4Linear
from kimivl_cli.testing.checkpoint import cached_checkpoint

HEAD_KEY = "language_model.lm_head.weight"


@torch.inference_mode()
def compare(hidden: torch.Tensor, weight: torch.Tensor) -> dict[str, dict[str, float]]:
    """hidden [T, D], the head's weight [V, D] -> per quantized mode: top-1 agreement with the bf16 head
    (fp32 sums of bf16 weights and inputs) and mean KL, each position run as a decode step runs it (one row)."""
    w, x = weight.to(torch.bfloat16), hidden.to(torch.bfloat16)
    ref = x.float() @ w.float().t()
    out = {}
    for mode, head in (("int8", Int8BlockLinear(w)), ("nf4", NF4Linear.from_weight(w))):
        got = torch.cat([head(row[None]).float() for row in x])
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
        out[mode] = {
            "top1_agreement": round(float((ref.argmax(-1) == got.argmax(-1)).float().mean()), 5),
            "kl_mean": float(f"{float(kl.sum(-1).mean()):.3g}"),
            "positions": hidden.shape[0],
        }
    return out


def golden_sets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    root = Path(os.environ.get("KIMIVL_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "golden"
    sets = {}
    for name in ("tiny-a", "tiny-b"):
        if not (root / name / "golden.safetensors").is_file():
            continue
        with safe_open(root / name / "golden.safetensors", "pt") as f:
            hidden = f.get_tensor("hidden_states")[-1]  # the final norm's output [T, D]
        with safe_open(root / name / "model.safetensors", "pt") as f:
            weight = f.get_tensor(HEAD_KEY)
        sets[name] = (hidden, weight)
    return sets


@torch.inference_mode()
def random_model_set(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    engine = Engine.load(cached_checkpoint("mid", dtype="bf16"), dtype=torch.bfloat16)
    cfg = engine.config.text
    ids = torch.randint(0, cfg.vocab_size - 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    hidden = engine.lm(engine.lm.embed(ids))[0]  # [T, D]
    return hidden, engine.lm.lm_head.weight.detach()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tokens", type=int, default=1024, help="random-model positions compared")
    args = parser.parse_args()
    sets = golden_sets()
    sets["mid-random"] = random_model_set(args.tokens)
    sets_report = {name: compare(*data) for name, data in sets.items()}
    report: dict = {"sets": sets_report}
    for mode in ("int8", "nf4"):
        report[f"{mode}_min_top1"] = min(r[mode]["top1_agreement"] for r in sets_report.values())
    if args.json:
        print(json.dumps(report))
        return 0
    for name, r in sets_report.items():
        for mode, m in r.items():
            print(f"{name:>11} {mode}: top-1 agreement {m['top1_agreement']:.2%}, mean KL {m['kl_mean']:.2e} "
                  f"({m['positions']} positions)")  # fmt: skip
    print(
        f"min top-1 agreement: int8 {report['int8_min_top1']:.2%}, nf4 {report['nf4_min_top1']:.2%} (default-on: >= 99.5%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
