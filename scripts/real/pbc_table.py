"""Print the PBC proof table from the outputs of scripts/real/pbc.sh (``OUT``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:5.1f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=int, nargs="*", default=[])
    args = ap.parse_args()
    card = json.loads((args.out / "bundle" / "card.json").read_text())
    test = json.loads((args.out / "eval-test" / "metrics.json").read_text())
    split = json.loads((args.out / "split" / "split.json").read_text())
    gate, tg = card["gate"], test.get("gate") or {}
    print(f"split (seed {split['seed']}): " + "; ".join(
        f"{k} {sum(v.values())}" for k, v in split["counts"].items()))
    tr = card["training"]
    print(f"training: {tr['optimizer_steps']} steps, {tr['epochs']} epochs, batch "
          f"{tr['schedule']['batch_size']}, field {card.get('field_um')} µm at {card['mpp']} µm/px"
          f", {tr['seconds']} s; init {((tr.get('init') or {}).get('name')) or 'random'}")
    print(f"test split: {test['n_images']} crops; balanced accuracy "
          f"{test['balanced_accuracy']:.4f}; macro-F1 (targets) {test['macro_f1']:.4f}; "
          f"accuracy {test['accuracy']:.4f}")
    print(f"temperature {card['temperature']:.3f}; ECE test {test['ece_before']:.4f} → "
          f"{test['ece_after']:.4f} after temperature")
    print(f"gate α = {gate['alpha']}, δ = {gate['delta']}, β = {gate.get('beta')}: automation "
          f"{pct(tg.get('automation_rate'))}, accepted error {pct(tg.get('accepted_error'))}")
    print(f"{'class':12s} {'F1':>6s} {'threshold':>9s} {'n cal':>6s} {'automation':>10s} "
          f"{'acc. error':>10s}")
    for c in card["classes"]:
        thr = gate["thresholds"].get(c)
        pc = (tg.get("per_class") or {}).get(c, {})
        print(f"{c:12s} {test['per_class'][c]['f1']:6.4f} "
              f"{'—' if thr is None else f'{thr:.4f}':>9s} {gate['n_cal'].get(c)!s:>6s} "
              f"{pct(pc.get('automation_rate')):>10s} {pct(pc.get('accepted_error')):>10s}")
    for k in ("mild", "strong"):
        shifted = json.loads((args.out / f"eval-{k}" / "metrics.json").read_text())
        cls_shift = json.loads((args.out / f"classify-{k}" / "summary.json").read_text())
        sg = shifted.get("gate") or {}
        z = ", ".join(f"{s} {v:+.1f}" for s, v in shifted["ood"].get("scores", {}).items())
        print(f"{k} stain + focus shift of the test crops: balanced accuracy "
              f"{shifted['balanced_accuracy']:.4f}; guard z: {z}; {cls_shift['ood']['message']}")
        print(f"  classify on them: automation {pct(cls_shift['automation_rate'])}, reasons "
              f"{cls_shift['reasons']}; the gate without the guard: automation "
              f"{pct(sg.get('automation_rate'))}, accepted error {pct(sg.get('accepted_error'))}")
    if args.seconds:
        print("wall time: train {} s, calibrate {} s, evaluate+shift {} s".format(*args.seconds))


if __name__ == "__main__":
    main()
