"""model.map_gate "score": the map output is log sigmoid(map) + log sigmoid(score), in the graph itself, chosen
in the recipe or at export; training and pseudo-masks keep the segmentation logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_recipe_dict
from ssn_edge.config import ModelConfig, Recipe, RecipeError, recipe_from_dict, with_map_gate
from ssn_edge.model.ssn import SSNHeads

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _heads(gate: str) -> SSNHeads:
    torch.manual_seed(0)
    return SSNHeads(64, ModelConfig(backbone="resnet18", pretrained=False, seg_hidden=16, cls_hidden=8,
                                    map_gate=gate)).eval()


def test_gated_map_is_the_log_of_pixel_times_image_probability():
    gated, plain = _heads("score"), _heads("none")
    plain.load_state_dict(gated.state_dict())  # no parameters of its own: the same keys load either way
    torch.manual_seed(1)
    feats = torch.randn(4, 64, 8, 8)
    with torch.no_grad():
        g, s = gated(feats)
        m, s_plain = plain(feats)
        ungated, _ = gated(feats, gated=False)
    assert torch.equal(s, s_plain) and torch.equal(ungated, m)
    expected = torch.log(torch.sigmoid(m) * torch.sigmoid(s)[:, None, None, None])
    assert torch.allclose(g, expected, atol=1e-5)
    assert torch.all(g <= 0)
    # one shift per image: each map ranks its own pixels as before
    for i in range(len(feats)):
        assert torch.allclose(g[i] - F.logsigmoid(m[i]), F.logsigmoid(s[i]).expand_as(g[i]), atol=1e-5)
    # the image the classifier scores lowest sinks furthest below its segmentation logits
    drop = (F.logsigmoid(m) - g).flatten(1).mean(1)
    assert torch.argmax(drop) == torch.argmin(s)


def test_training_and_pseudo_masks_see_the_ungated_logits(tiny_dataset):
    from ssn_edge.data import ArraySet
    from ssn_edge.model.ssn import SuperSimpleNet
    from ssn_edge.train.pseudo import model_maps

    cfg = recipe_from_dict(tiny_recipe_dict(tiny_dataset)).model
    torch.manual_seed(0)
    plain = SuperSimpleNet(cfg).eval()
    gated = SuperSimpleNet(ModelConfig(**{**cfg.__dict__, "map_gate": "score"})).eval()
    gated.load_state_dict(plain.state_dict())
    rng = np.random.default_rng(0)
    n = 3
    arrays = ArraySet(rng.normal(0, 1, (n, 3, 64, 64)).astype(np.float32), np.zeros((n, 64, 64), bool),
                      np.zeros(n, np.int64), np.ones(n, bool), [f"i{i}.png" for i in range(n)])
    idx = np.arange(n)
    np.testing.assert_allclose(model_maps(gated, arrays, idx), model_maps(plain, arrays, idx), atol=1e-5)
    with torch.no_grad():
        x = torch.from_numpy(arrays.images)
        (g, _), (m, _) = gated(x), plain(x)
    assert not torch.allclose(g, m, atol=1e-3)  # the inference graph is gated
    adapted = gated.heads.adaptor(gated.features(x))
    with torch.no_grad():
        m_train, _ = gated.heads.decide(adapted, adapted)
    assert torch.allclose(m_train, m, atol=1e-5)  # what the losses see


def test_map_gate_is_validated_and_an_override_names_the_checkpoint():
    assert recipe_from_dict({"model": {"map_gate": "score"}}).model.map_gate == "score"
    with pytest.raises(RecipeError, match="model.map_gate"):
        recipe_from_dict({"model": {"map_gate": "max"}})
    assert with_map_gate(Recipe(), None, "x.pt").model.map_gate == "none"
    assert with_map_gate(Recipe(), "score", "x.pt").model.map_gate == "score"
    with pytest.raises(RecipeError, match=r"^run/checkpoint.pt: .*model.map_gate"):
        with_map_gate(Recipe(), "mean", "run/checkpoint.pt")


@pytest.mark.slow
def test_export_sets_the_gate_in_the_graph_and_says_so(tiny_checkpoint, tiny_dataset, tmp_path):
    """A checkpoint trained ungated, exported with --map-gate score: the IR computes the gated map, the bundle
    records it, its pixel threshold is a log-probability, and the report's PyTorch reference is gated too."""
    import openvino as ov
    from click.testing import CliRunner

    import cli
    from ssn_edge.evaluation.evaluate import predict_raw
    from ssn_edge.evaluation.job import split_arrays
    from ssn_edge.report.build import build_report
    from ssn_edge.report.variants import torch_variant
    from ssn_edge.runtime.bundle import load_bundle
    from ssn_edge.model.load import model_from_checkpoint

    out = tmp_path / "bundle"
    result = CliRunner().invoke(cli.main, ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                                           "--map-gate", "score"])
    assert result.exit_code == 0, result.output
    b = load_bundle(out)
    assert b.map_gate == b.metadata.outputs.map.gate == "score"
    assert b.metadata.outputs.map.kind == "log_probability"
    assert b.pixel_threshold < 0
    x = split_arrays(tiny_dataset, "test", (64, 64), progress=False).images[:4]
    gated, _, _ = model_from_checkpoint(tiny_checkpoint, map_gate="score")
    plain, _, _ = model_from_checkpoint(tiny_checkpoint)
    ref_maps, ref_scores = predict_raw(gated, x)
    plain_maps, _ = predict_raw(plain, x)
    assert np.abs(ref_maps - plain_maps).max() > 1e-2
    from ssn_edge.runtime.postprocess import anomaly_map, sigmoid

    compiled = ov.Core().compile_model(b.model_path("fp32"), "CPU", F32)
    out_ov = [compiled(x[i : i + 1]) for i in range(len(x))]  # batch 1, post-processing in the graph
    assert np.abs(np.stack([o["anomaly_map"][0, 0] for o in out_ov]) - anomaly_map(ref_maps, (64, 64))).max() < 1e-3
    assert np.abs(np.array([o["pred_score"][0] for o in out_ov]) - sigmoid(ref_scores)).max() < 1e-3
    variant, _ = torch_variant(tiny_checkpoint, x, None, runs=1, throughput_seconds=0, map_gate="score")
    np.testing.assert_allclose(variant.raw_maps, ref_maps, atol=1e-5)
    # the report's PyTorch reference makes its map as the bundle does, and the page says which map it is
    report = build_report(out, checkpoint=tiny_checkpoint, out_dir=tmp_path / "report", runs=1,
                          throughput_seconds=0, examples=1)
    by = {(r["runtime"], r["precision"]): r for r in report.records}
    assert by[("openvino", "fp32")]["pixel_ap"] == pytest.approx(by[("torch", "fp32")]["pixel_ap"], abs=2e-3)
    assert "model.map_gate score" in Path(report.report_html).read_text()

    bad = CliRunner().invoke(cli.main, ["export", "--checkpoint", str(tiny_checkpoint), "--out",
                                        str(tmp_path / "b2"), "--map-gate", "max"])
    assert bad.exit_code != 0 and "--map-gate" in bad.output and not (tmp_path / "b2").exists()


def test_eval_with_the_gate_moves_pixel_metrics_only(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    import cli

    results = {}
    for gate in ("none", "score"):
        out = tmp_path / f"{gate}.json"
        r = CliRunner().invoke(cli.main, ["eval", "--checkpoint", str(tiny_checkpoint), "--map-gate", gate,
                                          "--out", str(out)])
        assert r.exit_code == 0, r.output
        results[gate] = json.loads(out.read_text())
    assert results["none"]["image_auroc"] == results["score"]["image_auroc"]  # the score is not touched
    assert results["none"]["pixel_ap"] != results["score"]["pixel_ap"]  # maps are compared across images
