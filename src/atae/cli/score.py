"""`atae score GT.csv SUBMISSION.csv`: score a DCASE 2022 submission like the official script."""

from __future__ import annotations

import json
from pathlib import Path

import click

from atae.cli.output import echo
from atae.io import atomic_write_text
from atae.metrics import jsonable, score_submission_details

_OFFICIAL_NAMES = {"R@1": "R1", "R@5": "R5", "R@10": "R10", "mAP@10": "mAP10"}


@click.command()
@click.argument("gt_csv", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("submission_csv", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the metrics (value = jackknife estimate, 95% CI, std_err) to this JSON file")
def score(gt_csv: Path, submission_csv: Path, json_out: Path | None) -> None:
    """Score SUBMISSION_CSV (caption,file_name_1..10) against GT_CSV (file_name,caption_1..5)."""
    res = score_submission_details(gt_csv, submission_csv)
    for note in res.notes:
        echo(f"warning: {note}", fg="yellow", err=True)
    for name, m in res.table.items():
        official = f"{m['value']:.2f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]"
        echo(f"{_OFFICIAL_NAMES.get(name, name):6s} {official}   "
                   f"(value {m['value']:.6f}, 95% CI [{m['ci_low']:.6f}, {m['ci_high']:.6f}], "
                   f"std_err {m['std_err']:.6f}, n={m['n']})")
    if json_out is not None:
        data = dict(res.table)
        data["_info"] = {"gt": str(gt_csv), "submission": str(submission_csv), "n_queries": len(res.captions),
                         "missing": res.missing, "notes": res.notes}
        atomic_write_text(json_out, json.dumps(jsonable(data), indent=2))
        echo(f"wrote {json_out}")


COMMANDS = [score]
