"""Quantize every torchvision model (every task) and 100+ timm models; write the coverage table.

    python -m tools.coverage                     # all models (hours on 2 cores; --export: with ONNX)
    python -m tools.coverage --subset tasks --export --out docs/coverage_tasks
    python -m tools.coverage --subset ci         # the fast CI subset
    python -m tools.coverage --models timm:resnet18 torchvision:googlenet
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from qat_ste.atomic import atomic_write_json, atomic_write_text
from tools.coverage_lib import (
    CI_MODELS,
    CoverageRow,
    all_models,
    check_model,
    preamble,
    rows_to_json,
    rows_to_markdown,
    summary_table,
    torchvision_models,
    torchvision_task_models,
)


def _load_rows(out: str) -> list[CoverageRow]:
    return [CoverageRow(**r) for r in json.loads(Path(f"{out}.json").read_text())]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subset", choices=("all", "ci", "torchvision", "tasks", "timm"), default="all",
                   help="tasks: torchvision's detection, segmentation, video, optical-flow and quantizable models")
    p.add_argument("--models", nargs="*", help="explicit model specs (torchvision:NAME / timm:NAME)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--ste", default="clipped_relu")
    p.add_argument("--export", action="store_true", help="also export each model to ONNX and check it in ORT")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest for many runs)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in OUT.json and run the rest (models named by --models run again)")
    p.add_argument("--out", default="docs/coverage", help="writes OUT.md and OUT.json")
    p.add_argument("--report-only", action="store_true", help="only rewrite OUT.md from OUT.json")
    p.add_argument("--summary", nargs="+", metavar="OUT",
                   help="print the counts per table and task of these sweeps' OUT.json (the README's table)")
    args = p.parse_args()
    if args.summary:
        missing = [out for out in args.summary if not Path(f"{out}.json").exists()]
        if missing:
            p.error(f"{', '.join(missing)}: no such sweep (OUT.json)")
        print(summary_table({Path(out).name.removeprefix("coverage_"): _load_rows(out) for out in args.summary}))
        return 0
    if args.report_only:
        if not Path(f"{args.out}.json").exists():
            p.error(f"{args.out}.json does not exist: run the sweep first (without --report-only)")
        rows = _load_rows(args.out)
        atomic_write_text(f"{args.out}.md", rows_to_markdown(rows, preamble(args.bits, args.ste, True)))
        return 0
    warnings.filterwarnings("ignore")
    models = args.models or {"all": all_models(), "ci": list(CI_MODELS),
                             "torchvision": torchvision_models(), "tasks": torchvision_task_models(),
                             "timm": [m for m in all_models() if m.startswith("timm:")]}[args.subset]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[CoverageRow] = []
    if args.resume and Path(f"{args.out}.json").exists():
        rows = _load_rows(args.out)
        if args.models:  # named models are run again and replace their rows
            rerun = set(models)
            rows = [r for r in rows if r.model not in rerun]
        done = {r.model for r in rows}
        models = [m for m in models if m not in done]
    bar = tqdm(models, unit="model")
    for spec in bar:
        bar.set_description(spec)
        row = check_model(spec, args.bits, args.ste, export=args.export)
        rows.append(row)
        tqdm.write(f"{'pass' if row.passed else 'FAIL'}  {spec:45s} found {row.sites_found:4d}  counted "
                   f"{row.sites_counted:4d}  {row.seconds:6.1f}s  {row.reason}")
        atomic_write_json(f"{args.out}.json", rows_to_json(rows))  # progress survives an interruption
    atomic_write_text(f"{args.out}.md", rows_to_markdown(rows, preamble(args.bits, args.ste, args.export)))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} models pass; table in {args.out}.md")
    for r in failed:
        print(f"  FAIL {r.model}: {r.reason}")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
