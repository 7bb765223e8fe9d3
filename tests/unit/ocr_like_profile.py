"""A small OCR-shaped profile (det -> rec) for controller tests; numbers are round
approximations of docs/ocr.md, not measurements."""


def ocr_like_profile_dict() -> dict:
    def lat(ms_per_item, batches=(1, 2, 4, 8)):
        return {str(b): {"p50_ms": ms_per_item * b, "p95_ms": ms_per_item * b * 1.2} for b in batches}

    det = [("det_v6tiny_320", 0.93, 30.0, 10.9), ("det_v6small_320", 0.95, 50.0, 11.0),
           ("det_v6small_480", 0.988, 85.0, 11.5), ("det_v6small_640", 0.99, 145.0, 11.5)]
    rec = [("rec_v6tiny", 0.99, 5.0), ("rec_v6small", 0.996, 25.0)]
    return {
        "format": "pipeserve-profile/1", "name": "ocr", "slo_ms": 1500, "device": "test",
        "provenance": "hand-made for tests",
        "tasks": [
            {"name": "det", "children": ["rec"],
             "variants": [{"name": n, "accuracy": a, "latency_ms": lat(ms)} for n, a, ms, _ in det],
             "fan_out": {n: {"rec": f} for n, _, _, f in det}},
            {"name": "rec", "children": [],
             "variants": [{"name": n, "accuracy": a, "latency_ms": lat(ms, (1, 2, 4, 8, 16, 32))}
                          for n, a, ms in rec]},
        ],
    }
