"""`els judge-check`: each refusal judge scored against human labels (registered on the app in els.cli.main)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from els.cli.options import console
from els.core.io import check_output_file, write_atomic
from els.judges.model import JUDGES


def judge_check_cmd(
    files: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Labelled CSVs (prompt, completion, final_label); default: the three XSTest files."),
    ] = None,
    judges: Annotated[str, typer.Option(help="Comma-separated judges to score.")] = "prefix,substring,learned,model",
    model_judge_limit: Annotated[
        Optional[int],
        typer.Option(help="Seeded sample of N answers per file for model judges (slow on a CPU); 0 for all."),
    ] = 30,
    markdown: Annotated[Optional[Path], typer.Option(help="Also write the table to this Markdown file.")] = None,
    retrain_learned: Annotated[
        bool, typer.Option(help="First retrain the shipped learned judge on FILES and write it to els/data/resources.")
    ] = False,
    seed: int = 0,
) -> None:
    """Agreement of each judge with human labels: accuracy, Cohen's kappa, refusal precision and recall."""
    from els.eval.agreement import default_labelled_files, judge_check, judge_table
    from els.judges.model import read_labelled, train_learned_judge

    names = [j.strip() for j in judges.split(",") if j.strip()]
    if not names:
        raise typer.BadParameter(f"--judges names no judge (choose from {', '.join(JUDGES)})")
    try:
        paths = list(files) if files else default_labelled_files()
        if markdown is not None:
            check_output_file("--markdown", markdown, paths)
        if retrain_learned:
            judge_dir = Path(__file__).parents[1] / "data" / "resources"
            train_learned_judge([read_labelled(p) for p in paths]).save(judge_dir)
            console.print(f"learned judge retrained on {len(paths)} file(s), written to {judge_dir}")
        results = judge_check(paths, names, model_judge_limit=model_judge_limit or None, seed=seed, log=console.print)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    text = judge_table(results)
    console.print(text, highlight=False)
    if markdown is not None:
        write_atomic(markdown, text + "\n")
