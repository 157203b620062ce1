"""What quantization costs in quality: perplexity and top-1 agreement with full precision on the
fixed text in prompts/quality_text.txt, next to the memory saved and the speed (the app's own
quality check, compare/quality.py, for each quantization in one run).

    python bench/quality_cost.py                       # the embedded model, bf16 / 8bit / 4bit
    python bench/quality_cost.py --model internlm2-chat-1.8b --quants 8bit 4bit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    """Command-line entry point."""
    from compare.quality import quality_check
    from models.catalog import load_catalog
    from models.engine import Engine
    from models.quant import Quant

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="catalog id or folder (default: the embedded model)")
    p.add_argument("--quants", nargs="+", default=["bf16", "8bit", "4bit"])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--out", help="append rows as JSON lines")
    args = p.parse_args()

    engine = Engine(load_catalog())
    rows = []
    for quant in args.quants:
        report = quality_check(engine, args.model, Quant(quant), decode_tokens=args.decode_tokens)
        if report.full is None or report.quantized is None:
            print(report.note)
            continue
        f, q = report.full, report.quantized
        rows.append({
            "model": args.model or engine.catalog.default_id, "device": engine.device, "quant": quant,
            "tokens": f.tokens, "ppl_full": f.perplexity, "ppl_quant": q.perplexity, "agreement": report.agreement,
            "weights_full": f.weights_bytes, "weights_quant": q.weights_bytes,
            "decode_full": f.decode_tokens_per_s, "decode_quant": q.decode_tokens_per_s,
            "prefill_full": f.forward_tokens_per_s, "prefill_quant": q.forward_tokens_per_s,
        })
    if args.out:
        with open(args.out, "a") as out:
            out.writelines(json.dumps(r) + "\n" for r in rows)
    MiB = 2**20
    print("| model | device | quant | tokens | perplexity full → quant | top-1 agreement | weights MiB full → quant "
          "| decode tok/s full → quant | prefill tok/s full → quant |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['quant']} | {r['tokens']} | {r['ppl_full']:.2f} → {r['ppl_quant']:.2f} "
              f"| {r['agreement']:.1%} | {r['weights_full'] / MiB:.0f} → {r['weights_quant'] / MiB:.0f} "
              f"| {r['decode_full'] or 0:.1f} → {r['decode_quant'] or 0:.1f} "
              f"| {r['prefill_full']:.0f} → {r['prefill_quant']:.0f} |")


if __name__ == "__main__":
    main()
