"""Synthetic slides: the cell types, their truth colours and size/shape ranges (µm).

Shared by ``placement`` (which draws cells), ``cells`` (which draws their pixels) and the truth
GeoJSON writer. The order of :data:`CELL_TYPES` defines the integer type codes used internally.
"""

from __future__ import annotations

from cellclf.annotations.geojson import CLASS_COLORS as GEOJSON_COLORS

CELL_TYPES: tuple[str, ...] = (
    "eosinophil", "neutrophil", "mast_cell",                  # the three target classes
    "lymphocyte", "plasma_cell", "epithelial", "fibroblast", "red_cell", "macrophage",
)
TARGET_TYPES: tuple[str, ...] = ("eosinophil", "neutrophil", "mast_cell")
CODE: dict[str, int] = {name: i for i, name in enumerate(CELL_TYPES)}
EOS, NEU, MAST, LYM, PLA, EPI, FIB, RBC, MAC = range(len(CELL_TYPES))
NO_TYPE = 255

# Display colours are the project's one table (QuPath GeoJSON colours).
CLASS_COLORS: dict[str, tuple[int, int, int]] = {n: GEOJSON_COLORS[n] for n in CELL_TYPES}

# What an ambiguous cell of a type is rendered half-way towards (see MORPHOLOGY.md).
AMBIGUOUS_WITH: dict[int, int] = {EOS: NEU, NEU: EOS, MAST: PLA, PLA: MAST}

# Diameter (long axis) in µm as (low, mode, high) of a triangular distribution.
DIAMETER_UM: dict[int, tuple[float, float, float]] = {
    EOS: (12.0, 14.0, 17.0),
    NEU: (10.0, 11.0, 12.0),
    MAST: (8.0, 12.0, 20.0),
    LYM: (7.0, 8.0, 9.0),
    PLA: (8.0, 11.0, 15.0),
    EPI: (12.0, 14.0, 17.0),
    FIB: (10.0, 13.0, 18.0),
    RBC: (6.8, 7.4, 8.0),
    MAC: (15.0, 19.0, 25.0),
}
# Short/long axis ratio range.
ASPECT: dict[int, tuple[float, float]] = {
    EOS: (0.80, 1.0), NEU: (0.85, 1.0), MAST: (0.55, 1.0), LYM: (0.88, 1.0), PLA: (0.60, 0.85),
    EPI: (0.38, 0.50), FIB: (0.12, 0.20), RBC: (0.85, 1.0), MAC: (0.75, 1.0),
}
# Hard-core placement: two cells i, j keep centres at least f·(r_i + r_j) apart, with r the
# exclusion radius in µm (None: half the diameter times the square root of the aspect ratio).
EXCLUSION_RADIUS_UM: dict[int, float | None] = {
    EOS: None, NEU: None, MAST: None, LYM: None, PLA: None, EPI: 2.6, FIB: 2.6, RBC: 3.6,
    MAC: None,
}
EXCLUSION_FACTOR: dict[int, float] = {
    EOS: 0.85, NEU: 0.85, MAST: 0.85, LYM: 0.8, PLA: 0.85, EPI: 0.8, FIB: 0.8, RBC: 0.55,
    MAC: 0.8,
}
MAX_RADIUS_UM = 13.5   # no cell reaches further than this from its centre
