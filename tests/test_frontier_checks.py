"""The frontier table's checks (issue 5, items 1 and 2) and its run folders: pure functions over records."""

from benchmarks import frontier_bench as fb


def _rec(variant: str, seed: int, auroc: float, aupro: float, recipe: str | None = None, dataset: str = "magnetic_tile"):
    r = {"dataset": dataset, "variant": variant, "seed": seed, "precision": "fp32", "image_auroc": auroc, "pixel_aupro": aupro}
    if recipe is not None:
        r["recipe"] = recipe
    return r


def test_light_head_check_uses_the_margins_and_common_seeds():
    cur = fb.RECIPES["magnetic_tile"]
    acc = [_rec("adaptive_noise", s, 80.0, 60.0, cur) for s in (0, 1, 2)]
    acc += [_rec("light_head", 0, 79.2, 58.5, cur), _rec("light_head", 1, 79.0, 58.0, cur)]
    (line,) = [c for c in fb.checks(acc) if "light_head" in c]
    assert "seeds [0, 1]" in line and line.endswith(": met")
    acc.append(_rec("light_head", 1, 78.0, 58.0, cur))  # a rerun of seed 1 replaces it: 1.4 points below
    (line,) = [c for c in fb.checks(acc) if "light_head" in c]
    assert line.endswith("NOT met") and "(1.40 below;" in line


def test_an_anchored_light_head_is_checked_against_both_full_heads():
    cur = fb.RECIPES["mvtec_bottle"]
    acc = [_rec("adaptive_noise", 0, 90.0, 60.0, cur, "mvtec_bottle"), _rec("anchored_score", 0, 95.0, 60.0, cur, "mvtec_bottle"),
           _rec("light_head_anchored", 0, 93.5, 61.0, cur, "mvtec_bottle")]
    paper, same = [c for c in fb.checks(acc) if "light_head_anchored" in c]
    # above the paper's full head (met), 1.5 below the full head with the same score (not met)
    assert "vs full head," in paper and "(3.50 above;" in paper and paper.endswith(": met")
    assert "(anchored_score)" in same and "(1.50 below;" in same and same.endswith("NOT met")
    assert "latency not timed" in paper


def test_the_light_head_check_needs_the_latency_half_when_timed():
    cur = fb.RECIPES["mvtec_bottle"]
    acc = [_rec("adaptive_noise", 0, 90.0, 60.0, cur, "mvtec_bottle"), _rec("anchored_score", 0, 90.0, 60.0, cur, "mvtec_bottle"),
           _rec("light_head_anchored", 0, 90.0, 60.0, cur, "mvtec_bottle")]
    fast = {("full_head", "int8"): 20.0, ("full_head_anchored", "int8"): 25.0, ("light_head_anchored", "int8"): 11.0}
    paper, same = [c for c in fb.checks(acc, fast) if "light_head_anchored" in c]
    assert "0.550x" in paper and paper.endswith(": met") and "0.440x" in same and same.endswith(": met")
    slow = {**fast, ("light_head_anchored", "int8"): 13.0}  # 0.65 of the paper's full head, 0.52 of the anchored one
    paper, same = [c for c in fb.checks(acc, slow) if "light_head_anchored" in c]
    assert "0.650x" in paper and paper.endswith("NOT met") and same.endswith(": met")


def test_noise_check_is_per_recipe_and_needs_both_metrics():
    old = [_rec("adaptive_noise", 0, 60.0, 50.0), _rec("fixed_noise", 0, 50.0, 20.0)]  # no recipe: the earlier one
    new = [_rec("adaptive_noise", 0, 70.0, 30.0, fb.RECIPES["magnetic_tile"]),
           _rec("fixed_noise", 0, 65.0, 35.0, fb.RECIPES["magnetic_tile"])]
    lines = fb.checks(old + new)
    # one line per recipe, sorted by name: the earlier recipe's line first (met), the current one's (AUPRO lower) not
    assert [c.endswith(": met") for c in lines] == [True, False]
    assert f"({fb.EARLIER['magnetic_tile']})" in lines[0] and f"({fb.RECIPES['magnetic_tile']})" in lines[1]


def test_a_changed_recipe_gets_its_own_run_folders():
    assert fb.run_dir("mvtec_bottle", "light_head", 1).name == "mvtec_bottle_light_head_s1"
    if fb.RECIPES["magnetic_tile"] != fb.EARLIER["magnetic_tile"]:
        assert fb.run_dir("magnetic_tile", "light_head", 1).name != "magnetic_tile_light_head_s1"


def test_a_record_of_another_recipe_does_not_replace_the_earlier_one(tmp_path):
    import json

    from benchmarks.results import _merge

    path = tmp_path / "r.json"
    base = {"dataset": "magnetic_tile", "variant": "light_head", "seed": 0, "precision": "fp32"}
    _merge(path, [{**base, "image_auroc": 42.0}])  # recorded before records named a recipe
    _merge(path, [{**base, "recipe": "recipes/new.yaml", "image_auroc": 54.0}])
    _merge(path, [{**base, "recipe": "recipes/new.yaml", "image_auroc": 55.0}])  # a rerun replaces its own
    assert sorted(r["image_auroc"] for r in json.loads(path.read_text())) == [42.0, 55.0]


def test_per_defect_records_of_one_run_coexist(tmp_path):
    import json

    from benchmarks.results import _merge

    path = tmp_path / "r.json"
    base = {"dataset": "magnetic_tile", "variant": "supervised", "seed": 0, "precision": "fp32"}
    _merge(path, [{**base, "defect": "uneven", "pixel_ap": 47.0}, {**base, "defect": "fray", "pixel_ap": 77.0}])
    _merge(path, [{**base, "defect": "uneven", "pixel_ap": 48.0}])  # a rerun of one type replaces only its own
    assert sorted((r["defect"], r["pixel_ap"]) for r in json.loads(path.read_text())) == [("fray", 77.0), ("uneven", 48.0)]
