"""``cellclf review …``: the pathologist review queue (store set-up, accounts, web app, export,
final counts). Library code lives in :mod:`cellclf.review`; it is imported inside each command."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from cellclf.commands._options import check_output_dir
from cellclf.errors import OptionError

DB_HELP = "Review store: a file path or sqlite:///PATH (SQLite), or postgresql+psycopg://USER@HOST/DB."

review_app = typer.Typer(help="Pathologist review queue: accounts, web app, export, final counts.",
                         no_args_is_help=True)


@review_app.command("init", help="Create (or upgrade) a review store; set classes and double review.")
def init(
    db: str = typer.Option(..., "--db", help=DB_HELP),
    classes: str = typer.Option(
        "", help="Comma-separated class order for a NEW store (keys 1..n in the UI); "
        "default eosinophil,neutrophil,mast_cell,other."),
    reviews: int = typer.Option(0, min=0, help="Labels from different reviewers each cell needs "
                                "(2 = double review); 0 keeps the current setting (default 1)."),
) -> None:
    from cellclf.review.store import open_store

    st = open_store(db, classes=[c.strip() for c in classes.split(",") if c.strip()] or None,
                    required_reviews=reviews or None)
    typer.echo(f"review store ready: classes {', '.join(st.classes)}; "
               f"{st.required_reviews} review(s) per cell; {st.progress()['total']} cells queued")


@review_app.command("add-user", help="Add a reviewer account (password prompted, or read from "
                    "stdin with --password-stdin).")
def add_user(
    name: str = typer.Argument(..., help="Login name (letters, digits, _ . @ -)."),
    db: str = typer.Option(..., "--db", help=DB_HELP),
    admin: bool = typer.Option(False, "--admin", help="May see the admin page (throughput, "
                               "agreement)."),
    password_stdin: bool = typer.Option(False, "--password-stdin",
                                        help="Read the password from the first line of stdin."),
    replace: bool = typer.Option(False, "--replace", help="Reset the password of an existing "
                                 "user (and log them out)."),
) -> None:
    from cellclf.review.auth import add_user as _add

    require_store(db)

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt(f"password for {name}", hide_input=True,
                                confirmation_prompt=True)
    _add(db, name, password, admin=admin, replace=replace)
    typer.echo(f"user {name} {'updated' if replace else 'added'}{' (admin)' if admin else ''}")


@review_app.command("serve", help="Run the review web app (uvicorn) until Ctrl-C.")
def serve(
    db: str = typer.Option(..., "--db", help=DB_HELP),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: all; put a TLS "
                             "proxy in front)."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    secure_cookies: bool | None = typer.Option(
        None, "--secure-cookies/--no-secure-cookies",
        help="Force the Secure cookie flag on/off (default: on when the request came over https)."),
    proxy_headers: bool = typer.Option(False, help="Trust X-Forwarded-Proto from a proxy on "
                                       "127.0.0.1 (TLS terminated there)."),
    lease_s: float = typer.Option(300, help="Seconds a reviewer holds a cell before it returns to "
                                  "the queue."),
    blind_all: bool = typer.Option(False, "--blind-all",
                                   help="Hide the model's answer for every cell until the "
                                        "reviewer has answered (default: audit cells and a random "
                                        "share of the others)."),
    slide_dir: list[str] = typer.Option(
        [], "--slide-dir", help="Folder holding the slides when they are no longer at the path "
        "`cellclf infer` recorded (found by file name; repeatable). Without the slide file the "
        "stored views are shown."),
) -> None:
    from pathlib import Path

    from cellclf.review.app import serve as _serve

    require_store(db)
    if not lease_s > 0:
        raise OptionError(f"--lease-s must be more than 0 seconds, got {lease_s}")
    missing = [d for d in slide_dir if not Path(d).is_dir()]
    if missing:
        raise OptionError(f"--slide-dir {missing[0]}: no such folder (give the folder that holds "
                          "the slide files)")
    _serve(db, host=host, port=port, secure_cookies=secure_cookies, lease_s=lease_s,
           proxy_headers=proxy_headers, blind_all=blind_all,
           slide_dirs=tuple(Path(d) for d in slide_dir))


@review_app.command("export", help="Write reviewed labels as QuPath GeoJSON, one file per slide "
                    "(OUT/<slide_id>.geojson), for training.")
def export(
    db: str = typer.Option(..., "--db", help=DB_HELP),
    out: str = typer.Option(..., "--out", help="Folder for the GeoJSON files."),
    include_uncertain: bool = typer.Option(
        False, help="Also write can't-tell / pending / disputed cells, unclassified, with a "
        "review_status property (for viewing in QuPath; training ignores them)."),
) -> None:
    from cellclf.review.label_export import export_labels

    require_store(db)
    check_output_dir("--out", Path(out))

    tally = export_labels(db, out, include_uncertain=include_uncertain)
    for slide, t in tally.items():
        typer.echo(f"{slide}: {t['labelled']} labelled → {t['file']} (left out: "
                   f"{t['cant_tell']} can't tell, {t['pending']} pending, "
                   f"{t['disputed']} disputed)")
    typer.echo(f"{len(tally)} slide(s) exported to {out}")


@review_app.command("finalize", help="Add final counts (accepted + reviewed) to every "
                    "RESULTS/<slide>/summary.json and rebuild report.html.")
def finalize(
    db: str = typer.Option(..., "--db", help=DB_HELP),
    results: str = typer.Option(..., "--results", help="The --out folder of `cellclf infer`."),
) -> None:
    from cellclf.review.finalize import finalize_results

    require_store(db)

    done = finalize_results(db, results)
    for slide, f in done.items():
        counts = ", ".join(f"{c} {n}" for c, n in f["counts"].items())
        typer.echo(f"{slide}: {counts} · {f['reviewed']} reviewed, {f['pending']} pending, "
                   f"{f['cant_tell']} can't tell")


def require_store(db: str) -> None:
    """Commands other than ``init`` use an existing store: a mistyped SQLite path must not create
    a new, empty one (a pathologist would then see an empty queue)."""
    from cellclf.review.schema import ReviewStoreError, normalise_url

    url = normalise_url(db)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ReviewStoreError(f"review store {db} does not exist: check the path (cellclf "
                                   "infer writes OUT/review.sqlite), or create a store with "
                                   f"`cellclf review init --db {db}`")


def register(app: typer.Typer) -> None:
    app.add_typer(review_app, name="review")
