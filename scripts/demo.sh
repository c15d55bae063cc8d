#!/usr/bin/env bash
# Set up (torch-free: cellclf[deploy,review]) and run the main job on the embedded default:
# render a synthetic 40x demo slide, then `cellclf infer` it with the shipped model in models/.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default demo_out/)
set -euo pipefail
# OUT_DIR given relative to the caller's folder; the default lies in the repository
if [[ $# -ge 1 ]]; then out="$(realpath -m -- "$1")"; else out=""; fi
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 ORT_DISABLE_TELEMETRY=1
out="${out:-$PWD/demo_out}"
bash scripts/setup.sh deploy,review
cellclf="$PWD/.venv/bin/cellclf"
if [[ ! -f "$out/slides/demo.tif" ]]; then
  "$cellclf" synth "$out/slides" --width 12000 --height 9000 --mpp 0.25 --seed 2026 \
    --difficulty 0.3 --name demo
fi
"$cellclf" infer "$out/slides/demo.tif" --model cellclf-he-v2 --out "$out/results"
echo
echo "Report:        $out/results/demo/report.html"
echo "Cells:         $out/results/demo/cells.parquet, cells.geojson (QuPath: File > Import objects)"
echo "Review queue:  $cellclf review serve --db $out/results/review.sqlite"
echo "               (first: $cellclf review add-user YOURNAME --admin --db $out/results/review.sqlite)"
