"""CLI: ``cellclf infer`` (batch slide inference) and ``cellclf export`` (ONNX)."""

from __future__ import annotations

from pathlib import Path

import typer

from cellclf.card import DEFAULT_MODEL, resolve_model
from cellclf.commands._options import (
    BACKENDS,
    check_choice,
    check_device,
    check_mpp,
    check_output_dir,
    check_positive,
)
from cellclf.errors import OptionError


def register(app: typer.Typer) -> None:
    @app.command("infer")
    def infer(
        slides: list[str] = typer.Argument(..., help="Slide files, globs, folders, or a .txt of paths."),
        model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                                  help="Model bundle folder, or the name of a shipped model "
                                       "(models/ of cellclf, whatever the working folder)."),
        out: Path = typer.Option(Path("results"), "--out", "-o", help="Output folder."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
        backend: str = typer.Option("auto", help="auto | torch | onnx"),
        workers: int = typer.Option(0, min=0, help="Reader threads per slide (0 = all cores)."),
        overwrite: bool = typer.Option(False, help="Redo slides already finished in OUT."),
        review_db: str = typer.Option(None, "--review-db",
                                      help="Review store URL (default OUT/review.sqlite; "
                                           "postgresql+psycopg://… for a lab server)."),
        mpp: float = typer.Option(None, help="µm per pixel for slides whose metadata lacks it."),
        hpf_area: float = typer.Option(0.237, "--hpf-area", help="HPF area in mm² for peak counts."),
        batch: int = typer.Option(None, min=1, help="Crops per classification batch."),
        precision: str = typer.Option("fp32", help="fp32, or int8: the bundle's model.int8.onnx "
                                                    "with its own gate (onnxruntime; fastest on "
                                                    "1-2 CPU threads; see cellclf export --int8)."),
        gpu_decode: str = typer.Option("auto", "--gpu-decode",
                                       help="Decode JPEG tiles on the GPU (nvJPEG) with the torch "
                                            "backend on CUDA: auto | on | off. nvJPEG's pixels "
                                            "differ from libjpeg-turbo's by a few grey levels: "
                                            "use off to match calibration decoded on the CPU."),
        ray: str = typer.Option(None, "--ray",
                                help="Shard slides over a Ray cluster: auto (the cluster started "
                                     "here), local (a private one), or host:port / ray://host:port."),
        gpus: int = typer.Option(0, "--gpus", min=0,
                                 help="One worker per GPU on this machine, slides sharded (local "
                                      "Ray instance); 0 = no sharding."),
        audit_rate: float = typer.Option(
            0.02, "--audit-rate", min=0.0, max=1.0,
            help="Share of each slide's auto-accepted cells sent to the review queue, unmarked "
                 "and blind, for the running audit (reproducible per slide); 0 turns it off. "
                 "See `cellclf audit`."),
        blind_share: float = typer.Option(
            0.1, "--blind-share", min=0.0, max=1.0,
            help="Share of the other queued cells also shown blind (model answer hidden until "
                 "the reviewer answers), so blind items do not give the audit away and "
                 "`cellclf audit` can measure automation bias."),
        site: str = typer.Option(None, "--site",
                                 help="Site / scanner tag for the audit (default: the slide's "
                                      "scanner vendor)."),
        clinical_rules: Path = typer.Option(
            None, "--clinical-rules",
            help="YAML of clinical rules for the per-slide call (default "
                 "configs/clinical_rules.yaml)."),
    ) -> None:
        """Find and classify cells on every slide; write per-slide results, a manifest and the
        review queue. Exit code 0: every slide done; 1: at least one slide failed (see
        OUT/manifest.csv); 2: the run could not start (bad model, no slides)."""
        from cellclf.pipeline.batch import run_batch

        check_choice("--backend", backend, BACKENDS)
        check_choice("--precision", precision, ("fp32", "int8"))
        check_choice("--gpu-decode", gpu_decode, ("auto", "on", "off"))
        check_device(device)
        check_mpp(mpp)
        check_positive("--hpf-area", hpf_area, allow_none=False, upper=100.0, unit=" mm²")
        check_slide_args(slides)
        check_output_dir("--out", out)
        bundle = resolve_model(model)
        report = run_batch(slides, bundle, out, backend=backend, device=device, workers=workers,
                           overwrite=overwrite, review_db=review_db, mpp=mpp,
                           hpf_area_mm2=hpf_area, batch=batch, ray_address=ray, gpus=gpus,
                           precision=precision, device_decode=gpu_decode,
                           audit_rate=audit_rate, blind_share=blind_share, site=site,
                           clinical_rules=str(clinical_rules) if clinical_rules else None)
        typer.echo(f"{report.done} done, {report.skipped} skipped (already done), "
                   f"{report.failed} failed — manifest: {out / 'manifest.csv'}")
        raise typer.Exit(report.exit_code)

    @app.command("export")
    def export(
        bundle: Path = typer.Argument(..., help="Model bundle directory."),
        opset: int = typer.Option(18, help="ONNX opset."),
        fp16: bool = typer.Option(False, help="Export fp16 weights (writes model.fp16.onnx)."),
        int8: bool = typer.Option(False, "--int8",
                                  help="Write model.int8.onnx (int8 quantisation of the fp32 "
                                       "export) with its own gate fitted on its own "
                                       "probabilities; engines load it with precision int8. "
                                       "Faster than fp32 on 1-2 CPU threads only."),
        data: Path = typer.Option(None, "--data",
                                  help="--int8: calibration slides with truth for the int8 gate "
                                       "(default: the card's calibration data)."),
        quant_data: Path = typer.Option(None, "--quant-data",
                                        help="--int8: slides for the activation ranges, not the "
                                             "calibration ones (default: the card's training data)."),
        quant_crops: int = typer.Option(1024, "--quant-crops", min=64,
                                        help="--int8: crops for the activation ranges."),
        workers: int = typer.Option(0, min=0, help="--int8: reader threads (0 = all cores)."),
    ) -> None:
        """Export the bundle to ONNX (uint8 crops in; probs and logits out; card in metadata)."""
        from cellclf.card import load_card

        load_card(bundle)  # a missing or invalid bundle is refused before any work
        if int8:
            from cellclf.calibration.int8 import export_int8

            section = export_int8(bundle, data=data, quant_data=quant_data, n_quant=quant_crops,
                                  workers=workers)
            agree = section["agreement"]
            typer.echo(f"wrote {bundle / section['file']}: macro-F1 on {agree['n_cells']} "
                       f"calibration cells {agree['macro_f1_int8']:.4f} (fp32 "
                       f"{agree['macro_f1_fp32']:.4f}), argmax agreement "
                       f"{agree['argmax_agreement']:.4f}; its own gate is in card.json's int8 "
                       "section")
            return
        from cellclf.model.onnx_export import export_onnx

        out = export_onnx(bundle, out=bundle / "model.fp16.onnx" if fp16 else None, opset=opset,
                          fp16=fp16)
        typer.echo(f"wrote {out}")


def check_slide_args(slides: list[str]) -> None:
    """Every SLIDES argument exists (a glob matches at least one path): a mistyped path stops the
    run before it starts (exit 2) rather than becoming a failed row (exit 1)."""
    import glob

    for arg in slides:
        if any(ch in arg for ch in "*?["):
            if not glob.glob(arg, recursive=True):
                raise OptionError(f"no slides: the pattern {arg} matches no file")
        elif not Path(arg).exists():
            raise OptionError(f"no slides: {arg} does not exist; check the path (slides, folders, "
                              "globs or a .txt list of paths)")
