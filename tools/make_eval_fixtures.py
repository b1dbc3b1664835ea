#!/usr/bin/env python3
"""Expected metrics for crates/eval/tests/fixtures/cases.json, computed by scikit-learn and
pycocotools on hand-made gold/prediction sets (written out below).

For each set it writes the pairs (gold and predicted violations per image) and what the
reference libraries say:

- binary: accuracy_score and precision_recall_fscore_support(average="binary",
  zero_division=0) on violation (1) vs safe (0) per image, an unparsed prediction counting as
  a violation; confusion_matrix(labels=[0, 1]);
- per_rule: each image's set of rules through MultiLabelBinarizer, then
  precision_recall_fscore_support(average=None, zero_division=0);
- per_category: the same rule labels, average="micro" over the labels of each category;
- per_risk: (rule, risk) labels, average="micro" over the labels of each risk level;
- citation_accuracy: the micro recall over rule labels;
- box precision / recall at IoU >= 0.5 over matched rules (a plain greedy loop here);
- ap50: pycocotools COCOeval(iouType="bbox").stats[1], one category per rule, image ids in
  pair order, annotations and detections in the order listed.

Pinned: scikit-learn 1.9.1, pycocotools 2.0.11, numpy as installed with them.
Usage: python tools/make_eval_fixtures.py   (writes the fixture; commit it with this script)
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pycocotools
import sklearn
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from sklearn.preprocessing import MultiLabelBinarizer

OUT = Path(__file__).resolve().parent.parent / "crates/eval/tests/fixtures/cases.json"

R1, R2, R3 = "《安全作业规程》第3.1条", "《安全作业规程》第3.2条", "《消防管理制度》第5条"
FAKE = "《不存在的规程》第99条"
CAT = {R1: "安全防护", R2: "安全防护", R3: "应急处理"}


def g(rule, risk="高", box=None):
    return {"rule": rule, "category": CAT.get(rule), "risk": risk, "bbox": box}


def p(rule, risk="高", box=None, score=None):
    return {"rule": rule, "category": CAT.get(rule), "risk": risk, "bbox": box, "score": score}


def pair(gold, pred, status=None):
    if status is None:
        status = "violation" if pred else "safe"
    return {"gold": gold, "status": status, "pred": pred}


SETS = {
    "all correct": [
        pair([g(R1)], [p(R1)]),
        pair([], []),
        pair([g(R2, "中"), g(R3, "低")], [p(R2, "中"), p(R3, "低")]),
        pair([], []),
    ],
    "mixed errors": [
        pair([g(R1)], [p(R1)]),                       # right
        pair([g(R1)], [p(R2)]),                       # wrong rule
        pair([], [p(R3, "中")]),                      # false alarm
        pair([g(R3)], []),                            # missed
        pair([g(R1), g(R2, "中")], [p(R1, "低")]),    # one of two, wrong risk
        pair([], [], "unparsed"),                     # unparsed on a safe photo
        pair([g(R2)], [], "unparsed"),                # unparsed on a violation
        pair([g(R1, "中")], [p(R1, "中"), p(R3)]),    # right plus an extra rule
    ],
    "predicts safe everywhere": [
        pair([g(R1)], []),
        pair([g(R2, "低")], []),
        pair([], []),
    ],
    "hallucinated clauses": [
        pair([g(R1)], [{"rule": FAKE, "category": None, "risk": "高", "bbox": None, "score": None}]),
        pair([g(R3, "中")], [p(R3, "中"), {"rule": FAKE, "category": None, "risk": None,
                                           "bbox": None, "score": None}]),
        pair([], [{"rule": FAKE, "category": None, "risk": "低", "bbox": None, "score": None}]),
        pair([], []),
    ],
    "repeated rule in one image": [
        pair([g(R1, box=[0, 0, 10, 10]), g(R1, box=[50, 50, 80, 90])],
             [p(R1, box=[1, 1, 10, 11])]),
        pair([g(R2, "中")], [p(R2, "中"), p(R2, "中")]),
        pair([], []),
    ],
    "boxes with scores": [
        pair([g(R1, box=[10, 10, 110, 210]), g(R2, "中", box=[300, 50, 400, 150])],
             [p(R1, box=[12, 8, 108, 200], score=0.9), p(R2, "中", box=[200, 50, 300, 150], score=0.8),
              p(R1, box=[300, 300, 350, 350], score=0.3)]),
        pair([g(R1, box=[0, 0, 50, 50])],
             [p(R1, box=[0, 0, 50, 50], score=0.6), p(R1, box=[2, 2, 52, 52], score=0.6)]),
        pair([], [p(R2, "中", box=[10, 10, 60, 60], score=0.95)]),
        pair([g(R2, "中", box=[100, 100, 200, 200]), g(R2, "中", box=[150, 100, 250, 200])],
             [p(R2, "中", box=[120, 100, 220, 200], score=0.7), p(R2, "中", box=[150, 100, 250, 200], score=0.4)]),
        pair([g(R3, "低", box=[5, 5, 95, 95])], [p(R3, "低", box=[40, 40, 140, 140], score=0.5)]),
        pair([g(R1, box=[20, 30, 120, 130])], [p(R1, box=[25, 35, 120, 130], score=0.2)]),
    ],
}


def jittered_set(seed: int, n: int) -> list:
    """A larger boxed set from a fixed seed: each gold box detected with jitter (some badly),
    some missed, false alarms, scores in coarse steps so that ties occur."""
    import random
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        gold, pred = [], []
        for _ in range(rnd.randint(0, 3)):
            rule = rnd.choice([R1, R2, R3])
            x, y = rnd.randint(0, 600), rnd.randint(0, 600)
            box = [x, y, x + rnd.randint(20, 300), y + rnd.randint(20, 300)]
            gold.append(g(rule, "高", box))
            if rnd.random() < 0.8:
                j = rnd.choice([2, 5, 15, 60])
                pb = [box[0] + rnd.randint(-j, j), box[1] + rnd.randint(-j, j),
                      box[2] + rnd.randint(-j, j), box[3] + rnd.randint(-j, j)]
                pb = [min(pb[0], pb[2]), min(pb[1], pb[3]), max(pb[0], pb[2]), max(pb[1], pb[3])]
                pred.append(p(rule, "高", pb, rnd.choice([0.2, 0.4, 0.6, 0.8, 0.9])))
        for _ in range(rnd.choice([0, 0, 1])):
            x, y = rnd.randint(0, 600), rnd.randint(0, 600)
            pred.append(p(rnd.choice([R1, R2, R3]), "高", [x, y, x + 80, y + 80],
                          rnd.choice([0.2, 0.4, 0.6, 0.8, 0.9])))
        out.append(pair(gold, pred))
    return out


SETS["boxes, seeded"] = jittered_set(7, 40)


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def greedy(gold, pred):
    cand = sorted(((iou(a, b), i, j) for i, a in enumerate(gold) for j, b in enumerate(pred)
                   if iou(a, b) >= 0.5), key=lambda t: (-t[0], t[1], t[2]))
    gu, pu, n = set(), set(), 0
    for _, i, j in cand:
        if i not in gu and j not in pu:
            gu.add(i); pu.add(j); n += 1
    return n


def prf_dict(p, r, f, s=None):
    return {"precision": float(p), "recall": float(r), "f1": float(f)}


def expected(pairs):
    y_true = [int(bool(x["gold"])) for x in pairs]
    y_pred = [int(x["status"] != "safe") for x in pairs]
    bp, br, bf, _ = precision_recall_fscore_support(y_true, y_pred, average="binary", zero_division=0)
    out = {
        "binary": {"accuracy": float(accuracy_score(y_true, y_pred)), "precision": float(bp),
                   "recall": float(br), "f1": float(bf)},
        "confusion": confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist(),
        "unparsed": sum(x["status"] == "unparsed" for x in pairs),
    }
    gold_sets = [{v["rule"] for v in x["gold"]} for x in pairs]
    pred_sets = [{v["rule"] for v in x["pred"]} for x in pairs]
    labels = sorted(set().union(*gold_sets, *pred_sets))
    mlb = MultiLabelBinarizer(classes=labels)
    yt, yp = mlb.fit_transform(gold_sets), mlb.transform(pred_sets)
    pp, rr, ff, _ = precision_recall_fscore_support(yt, yp, average=None, zero_division=0)
    out["per_rule"] = {lab: prf_dict(pp[i], rr[i], ff[i]) for i, lab in enumerate(labels)}
    cat_of = {}
    for x in pairs:
        for v in x["pred"] + x["gold"]:
            cat_of[v["rule"]] = v["category"] or "unverified"
    out["per_category"] = {}
    for cat in sorted(set(cat_of.values())):
        idx = [i for i, lab in enumerate(labels) if cat_of[lab] == cat]
        pc, rc, fc, _ = precision_recall_fscore_support(yt, yp, labels=idx, average="micro", zero_division=0)
        out["per_category"][cat] = prf_dict(pc, rc, fc)
    _, cr, _, _ = precision_recall_fscore_support(yt, yp, average="micro", zero_division=0)
    out["citation_accuracy"] = float(cr)
    g_risk = [{(v["rule"], v["risk"]) for v in x["gold"]} for x in pairs]
    p_risk = [{(v["rule"], v["risk"] or "unknown") for v in x["pred"]} for x in pairs]
    rlabels = sorted(set().union(*g_risk, *p_risk))
    rmlb = MultiLabelBinarizer(classes=rlabels)
    rt, rp = rmlb.fit_transform(g_risk), rmlb.transform(p_risk)
    out["per_risk"] = {}
    for risk in sorted({lab[1] for lab in rlabels}):
        idx = [i for i, lab in enumerate(rlabels) if lab[1] == risk]
        pk, rk, fk, _ = precision_recall_fscore_support(rt, rp, labels=idx, average="micro", zero_division=0)
        out["per_risk"][risk] = prf_dict(pk, rk, fk)
    tp = ng = npred = 0
    for x in pairs:
        for rule in {v["rule"] for v in x["pred"]} & {v["rule"] for v in x["gold"]}:
            gb = [v["bbox"] for v in x["gold"] if v["rule"] == rule and v["bbox"]]
            pb = [v["bbox"] for v in x["pred"] if v["rule"] == rule and v["bbox"]]
            if gb and pb:
                ng += len(gb); npred += len(pb); tp += greedy(gb, pb)
    out["box"] = {"precision": tp / npred if npred else 0.0, "recall": tp / ng if ng else 0.0,
                  "gold_boxes": ng, "predicted_boxes": npred}
    out["box"]["ap50"] = coco_ap50(pairs)
    return out


def coco_ap50(pairs):
    boxed_preds = [v for x in pairs for v in x["pred"] if v["bbox"]]
    gts = [(k, v) for k, x in enumerate(pairs) for v in x["gold"] if v["bbox"]]
    if not gts or any(v["score"] is None for v in boxed_preds):
        return None
    rules = sorted({v["rule"] for _, v in gts} | {v["rule"] for v in boxed_preds})
    cid = {r: i + 1 for i, r in enumerate(rules)}
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]
    gt = {"images": [{"id": k + 1, "width": 1000, "height": 1000} for k in range(len(pairs))],
          "categories": [{"id": i, "name": r} for r, i in cid.items()],
          "annotations": [{"id": n + 1, "image_id": k + 1, "category_id": cid[v["rule"]],
                           "bbox": xywh(v["bbox"]), "area": xywh(v["bbox"])[2] * xywh(v["bbox"])[3],
                           "iscrowd": 0} for n, (k, v) in enumerate(gts)]}
    dets = [{"image_id": k + 1, "category_id": cid[v["rule"]], "bbox": xywh(v["bbox"]), "score": v["score"]}
            for k, x in enumerate(pairs) for v in x["pred"] if v["bbox"]]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        res = coco.loadRes(dets) if dets else None
        if res is None:
            return 0.0
        ev = COCOeval(coco, res, iouType="bbox")
        ev.evaluate(); ev.accumulate(); ev.summarize()
    return float(ev.stats[1])


def main() -> None:
    cases = [{"name": name, "pairs": pairs, "expected": expected(pairs)} for name, pairs in SETS.items()]
    meta = {"sklearn": sklearn.__version__, "pycocotools": "2.0.11", "numpy": np.__version__,
            "script": "tools/make_eval_fixtures.py"}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "cases": cases}, ensure_ascii=False, indent=1) + "\n")
    for c in cases:
        print(c["name"], json.dumps(c["expected"]["binary"]), "ap50", c["expected"]["box"]["ap50"])


if __name__ == "__main__":
    main()
