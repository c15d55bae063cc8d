"""CLI: ``cellclf label`` — a lab's first model from zero labels (labelling projects)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _print_round(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if report["round"] == 0:
        console.print(f"{report['n_candidates']} candidates on {len(report['slides'])} slide(s); "
                      f"queued {report['queued']['to_label']} to label + "
                      f"{report['queued']['held_aside']} held aside ({report['method']})")
        return
    lab, est = report["labels"], report["held_aside_estimate"]
    f1 = est["macro_f1"]
    console.print(f"round {report['round']}: trained on {lab['train']} labels "
                  f"({lab['held_aside']} held aside) → {report['bundle']}")
    table = Table(title="estimated on held-aside labels; calibration needs")
    for col in ("class", "held-aside n", "accuracy", "precision", "needed to certify",
                "more labels (est.)"):
        table.add_column(col)
    for c, m in est["per_class"].items():
        need = report["calibration_needs"][c]
        fmt = (lambda v: "—" if v is None else f"{v:.2f}")  # noqa: E731
        more = need["more_labels_est"]
        table.add_row(c, str(m["n"]), fmt(m["accuracy"]), fmt(m["precision"]),
                      str(need["needed"]), "unknown" if more is None else str(more))
    console.print(table)
    console.print(f"macro-F1 {'n/a' if f1 is None else f'{f1:.3f}'}; "
                  + ("target reached: nothing more queued" if report["target_reached"] else
                     f"queued {report['queued']['to_label']} to label + "
                     f"{report['queued']['held_aside']} held aside"))


def register(app: typer.Typer) -> None:
    @app.command("label")
    def label(
        slides: list[str] = typer.Argument(None, help="Slides to start a project on (files, globs, "
                                                      "folders, or a .txt of paths)."),
        out: Path = typer.Option(None, "--out", "-o", help="Start: the project folder to create."),
        next_round: Path = typer.Option(None, "--next",
                                        help="Train on the labels so far, report, queue the next "
                                             "batch (uncertain + diverse) in PROJECT."),
        calibrate: Path = typer.Option(None, "--calibrate",
                                       help="Calibrate PROJECT's last bundle on its held-aside "
                                            "labels."),
        classes: str = typer.Option(None, help="Start: comma-separated class list (default: "
                                               "eosinophil,neutrophil,mast_cell,other)."),
        other: str = typer.Option(None, help="Start: the catch-all class ('not a cell' answers "
                                             "train as it; default: the last class)."),
        batch: int = typer.Option(40, help="Start: cells per round."),
        holdout: float = typer.Option(0.25, help="Start: share of each batch drawn at random and "
                                                 "held aside (estimates and calibration)."),
        config: Path = typer.Option(None, "--config", "-c", help="Start: training YAML for the "
                                                                 "rounds (default: fine-tune for "
                                                                 "~150 steps, no validation split)."),
        init: str = typer.Option(None, "--init",
                                 help="Start: the bundle round 1 fine-tunes (a folder or a shipped "
                                      "model's name; default the shipped default model; 'none' = "
                                      "from scratch). Later rounds fine-tune the previous round."),
        target_f1: float = typer.Option(None, "--target-f1",
                                        help="--next: stop queueing once the held-aside macro-F1 "
                                             "reaches this and calibration has its cells."),
        max_labels: int = typer.Option(None, "--max-labels",
                                       help="--next: stop queueing once this many labels exist."),
        alpha: float = typer.Option(None, help="The gate's error bound per class (start: kept in "
                                               "project.yaml for the calibration counts, default "
                                               "0.01; --calibrate: overrides it)."),
        workers: int = typer.Option(0, help="Reader threads (0 = all cores)."),
    ) -> None:
        """Label cells in the review app to train a lab's own model: `cellclf label SLIDES --out
        PROJECT` detects candidates and queues a first diverse batch; label it (`cellclf review
        serve --db PROJECT/review.sqlite`, keys 1-9, 0 can't tell, X not a cell); `cellclf label
        --next PROJECT` trains, reports and queues the next batch; `--calibrate PROJECT` at the
        end."""
        from cellclf.errors import ConfigError
        from cellclf.labelling.project import ProjectConfig
        from cellclf.labelling.rounds import calibrate_project, start_project
        from cellclf.labelling.rounds import next_round as run_next_round

        chosen = [x is not None for x in (out, next_round, calibrate)]
        if sum(chosen) != 1:
            raise ConfigError("give exactly one of --out PROJECT (start, with SLIDES), --next "
                              "PROJECT or --calibrate PROJECT")
        if next_round is not None:
            _print_round(run_next_round(next_round, target_f1=target_f1, max_labels=max_labels))
            return
        if calibrate is not None:
            s = calibrate_project(calibrate, alpha=alpha, workers=workers)
            typer.echo(f"calibrated {s['bundle']} on {s['n_cells']} held-aside cells: temperature "
                       f"{s['temperature']:.3f}, certified "
                       f"{[c for c, t in s['gate']['thresholds'].items() if t is not None]}")
            return
        if not slides:
            raise ConfigError("cellclf label --out PROJECT needs the slides to label")
        cfg = ProjectConfig(batch_size=batch, holdout_fraction=holdout,
                            train_config=str(config) if config else None)
        if alpha is not None:
            cfg.alpha = alpha
        if init is not None:
            cfg.init = ("" if init.lower() == "none" else
                        str(Path(init).resolve()) if Path(init).exists() else init)
        if classes:
            cfg.classes = [c.strip() for c in classes.split(",") if c.strip()]
            cfg.other_class = other or cfg.classes[-1]
        elif other:
            cfg.other_class = other
        _print_round(start_project(slides, out, cfg, workers=workers))
        typer.echo(f"label them: cellclf review serve --db {out / 'review.sqlite'}; then: "
                   f"cellclf label --next {out}")

