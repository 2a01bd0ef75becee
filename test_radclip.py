"""radclip's specification, in the order of radclip.py's sections. Run: python -m pytest -q"""
import csv
import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import radclip as rc

HERE = Path(__file__).parent


# ---- helpers ----
def write_nifti(path, data, spacing=(1.0, 1.0, 1.0), orientation="LPS"):
    """data is indexed (x, y, z) in the patient's frame; store it as `orientation` on disk."""
    flips = {"RAS": (False, False, False), "LPS": (True, True, False), "LPI": (True, True, True)}
    flip = flips[orientation]
    stored = data[::-1 if flip[0] else 1, ::-1 if flip[1] else 1, ::-1 if flip[2] else 1]
    affine = np.diag([-s if f else s for s, f in zip(spacing, flip)] + [1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stored), affine), str(path))


def write_tiny_ctrate(root, volumes, intercept=-1024.0, spacing=(2.0, 2.0, 4.0)):
    """A CT-RATE layout around the given {VolumeName: (x, y, z) stored array}, with metadata."""
    for name, data in volumes.items():
        patient = "_".join(name.split("_")[:2])
        scan = "_".join(name.split("_")[:3])
        split = name.split("_")[0]
        write_nifti(root / "dataset" / split / patient / scan / name, data, spacing, "RAS")
    for split in ("train", "valid"):
        names = [n for n in volumes if n.startswith(split)]
        meta = [{"VolumeName": n, "XYSpacing": f"[{spacing[0]}, {spacing[1]}]",
                 "ZSpacing": spacing[2], "RescaleSlope": 1, "RescaleIntercept": intercept}
                for n in names]
        rc.write_csv(rc.ctrate_csv(root, split, "metadata"), meta, list(meta[0]) if meta else
                     ["VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept"])


def chest(shape=(40, 40, 20), air=-1000.0, body=40.0):
    """A block of tissue with air around it, in HU."""
    hu = np.full(shape, air, np.float32)
    hu[8:-8, 8:-8, 2:-2] = body
    return hu


# ---- 1. Config ----
def test_presets_override_only_their_fields():
    paper, tiny = rc.make_config("paper"), rc.make_config("tiny")
    assert paper.spacing_mm == (1.5, 1.5, 3.0) and paper.input_shape == (96, 192, 192)
    assert tiny.input_shape == (32, 64, 64) and tiny.hu_window == paper.hu_window
    assert rc.make_config("tiny", width=8).width == 8
    with pytest.raises(rc.RadclipError):
        rc.make_config("huge")


# ---- 3b. NIfTI to model input ----
def test_hu_from_raw_and_from_hu_storage_and_no_double_scaling():
    hu = chest()
    raw = hu + 1024
    assert np.allclose(rc.to_hu(raw, 1, -1024, "raw"), hu)
    assert np.allclose(rc.to_hu(hu, 1, -1024, "hu"), hu)
    assert np.allclose(rc.to_hu(raw, 1, -1024, "auto"), hu)
    # the corrected release stores HU while its CSV still says -1024: auto must not scale twice
    assert np.allclose(rc.to_hu(hu, 1, -1024, "auto"), hu)
    assert np.allclose(rc.to_hu(hu + 8192, 1, -8192, "auto"), hu)
    with pytest.raises(rc.RadclipError, match="--hu raw or --hu hu"):
        rc.to_hu(np.full((9, 9, 9), 500.0, np.float32), 1, -1024, "auto")


def test_resampling_keeps_a_sphere_radius_in_mm(tmp_path):
    spacing, radius_mm = (0.8, 0.8, 2.5), 30.0
    n = (200, 200, 64)
    x, y, z = np.meshgrid(*[(np.arange(k) - k / 2) * s for k, s in zip(n, spacing)], indexing="ij")
    hu = np.where(x**2 + y**2 + z**2 < radius_mm**2, 100.0, -1000.0).astype(np.float32)
    cfg = rc.make_config("tiny", spacing_mm=(2.0, 2.0, 2.0), input_shape=(64, 96, 96))
    vol = rc.preprocess(hu.transpose(2, 1, 0), spacing[::-1], cfg).astype(np.float32)
    inside = vol > (100 + 400) / 600 - 0.5  # halfway between the sphere and air in [-1, 1]
    measured = (3 * inside.sum() * 8.0 / (4 * math.pi)) ** (1 / 3)  # from the volume, 2 mm voxels
    assert abs(measured - radius_mm) < 1.0
    for axis in range(3):  # the diameter along each axis, in mm
        extent = np.any(inside, axis=tuple(a for a in range(3) if a != axis)).sum() * 2.0
        assert extent == pytest.approx(2 * radius_mm, abs=4)


def test_orientation_on_disk_does_not_change_the_result(tmp_path):
    hu = chest()
    hu[10:14, 25:30, 5:8] = 300  # an asymmetric mark: patient's left, anterior, low
    meta = {"XYSpacing": "[2.0, 2.0]", "ZSpacing": 4.0, "RescaleSlope": 1, "RescaleIntercept": 0}
    out = {}
    for o in ("RAS", "LPS", "LPI"):
        write_nifti(tmp_path / f"{o}.nii.gz", hu, (2.0, 2.0, 4.0), o)
        out[o], spacing = rc.load_hu(tmp_path / f"{o}.nii.gz", meta, "hu")
        assert spacing == (4.0, 2.0, 2.0)
    assert np.array_equal(out["RAS"], out["LPS"]) and np.array_equal(out["RAS"], out["LPI"])
    d, h, w = np.argwhere(out["RAS"] == 300).mean(0)
    assert w > hu.shape[0] / 2  # patient's left is on the image's right (radiological view)
    assert h < hu.shape[1] / 2  # anterior is up
    assert d > hu.shape[2] / 2  # inferior slices come last


def test_prep_skips_bad_files_by_name_and_resumes(tmp_path, capsys):
    good = chest() + 1024
    write_tiny_ctrate(tmp_path, {"train_1_a_1.nii.gz": good, "train_2_a_1.nii.gz": good,
                                 "valid_1_a_1.nii.gz": good})
    split = tmp_path / "dataset" / "train"
    bad = {"train_3_a_1.nii.gz": "corrupt", "train_4_a_1.nii.gz": "truncated",
           "train_5_a_1.nii.gz": "2-D", "train_6_a_1.nii.gz": "4-D", "train_7_a_1.nii.gz": "nometa"}

    def folder(name):
        path = split / "_".join(name.split("_")[:2]) / "_".join(name.split("_")[:3]) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    folder("train_3_a_1.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 20))
    write_nifti(folder("train_4_a_1.nii.gz"), good)
    data = folder("train_4_a_1.nii.gz").read_bytes()
    folder("train_4_a_1.nii.gz").write_bytes(data[: len(data) // 2])
    nib.save(nib.Nifti1Image(good[..., 0], np.eye(4)), str(folder("train_5_a_1.nii.gz")))
    nib.save(nib.Nifti1Image(np.stack([good, good], -1), np.eye(4)), str(folder("train_6_a_1.nii.gz")))
    write_nifti(folder("train_7_a_1.nii.gz"), good)
    meta = rc.read_csv(rc.ctrate_csv(tmp_path, "train", "metadata"))
    meta += [dict(meta[0], VolumeName=n) for n in bad if n != "train_7_a_1.nii.gz"]
    rc.write_csv(rc.ctrate_csv(tmp_path, "train", "metadata"), meta, list(meta[0]))

    assert rc.main(["prep", "--data", str(tmp_path), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    for name in bad:
        assert name in err
    assert "not in the metadata" in err and "3-D" in err
    cache = rc.cache_dir(tmp_path, rc.make_config("tiny")) / "train"
    assert sorted(p.name for p in cache.glob("*.npy")) == ["train_1_a_1.npy", "train_2_a_1.npy"]
    assert rc.main(["prep", "--data", str(tmp_path), "--split", "valid"]) == 0
    assert "(1 already done, 0 failed)" in capsys.readouterr().out


def test_prep_without_dataset_folder_is_one_line_error(tmp_path, capsys):
    assert rc.main(["prep", "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset/train" in err


# ---- 3c. Dataset ----
def test_dataset_reports_ids_missing_from_a_file(tmp_path, capsys):
    write_tiny_ctrate(tmp_path, {f"train_{i}_a_1.nii.gz": chest() + 1024 for i in range(3)})
    rc.main(["prep", "--data", str(tmp_path), "--split", "train"])
    reports = [{"VolumeName": f"train_{i}_a_1.nii.gz", "ClinicalInformation_EN": "Not given.",
                "Technique_EN": "Not given.", "Findings_EN": f"Finding {i}.",
                "Impressions_EN": "Not given."} for i in range(2)]
    rc.write_csv(rc.ctrate_csv(tmp_path, "train", "reports"), reports, list(reports[0]))
    labels = [dict({"VolumeName": f"train_{i}_a_1.nii.gz"}, **{f: i % 2 for f in rc.FINDINGS})
              for i in range(3)]
    rc.write_csv(rc.ctrate_csv(tmp_path, "train", "labels"), labels, list(labels[0]))
    ds = rc.CTRateDataset(tmp_path, "train", rc.make_config("tiny"), rc.Tokenizer.build(["finding"], 1))
    assert ds.names == ["train_0_a_1.nii.gz", "train_1_a_1.nii.gz"]
    assert "1 of 3 IDs in volumes" in capsys.readouterr().err
    vol, ids, y = ds[1]
    assert vol.shape == (1, 32, 64, 64) and y.tolist() == [1] * 18
    assert ds.reports[1] == "Finding 1."  # 'Not given.' sections are dropped


# ---- 5. Models ----
def test_resnet18_matches_torchvision_r3d_18_parameter_count_and_shapes():
    # torchvision's r3d_18 less its fc and 3-channel stem, plus a 1-channel 4x4x4 stride-4 stem
    assert sum(p.numel() for p in rc.ResNet3d18(64, 4, 4).parameters()) == 33_142_144
    cfg = rc.make_config("tiny")
    model = rc.RadCLIP(cfg, vocab_size=50)
    assert model.encode_image(torch.randn(2, 1, *cfg.input_shape)).shape == (2, cfg.embed_dim)
    assert model.encode_text(torch.randint(0, 50, (3, cfg.context_len))).shape == (3, cfg.embed_dim)
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)


def test_text_encoder_ignores_padding():
    cfg = rc.make_config("tiny")
    enc = rc.TextEncoder(50, 16, 32, 2, 4).eval()
    ids = torch.tensor([[5, 6, 7] + [0] * 13])
    longer = torch.tensor([[5, 6, 7] + [0] * 5])
    assert torch.allclose(enc(ids), enc(longer), atol=1e-6)


def test_tokenizer_lowercases_splits_punctuation_and_truncates():
    tok = rc.Tokenizer.build(["No nodule, 5 mm.", "no NODULE"], min_freq=1)
    ids = tok.encode("NO nodule; 5mm unseen", context_len=8)
    assert [tok.vocab[i] for i in ids[:6]] == ["no", "nodule", "<unk>", "5", "mm", "<unk>"]
    assert tok.encode("no " * 20, context_len=8).tolist() == [tok.index["no"]] * 8


# ---- 6. Training ----
def test_masked_bce_ignores_uncertain_labels():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([[1, -1, 0]])
    expected = (torch.nn.functional.softplus(-logits[0, 0]) + torch.nn.functional.softplus(logits[0, 2])) / 2
    assert rc.masked_bce(logits, y, "ignore") == pytest.approx(expected.item())
    as_one = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 1, 0]]))
    assert rc.masked_bce(logits, y, "one") == pytest.approx(as_one.item())


def test_clip_loss_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    s = 2.0
    # unit vectors: u1=(1,0) u2=(0,1); v1=(1,1)/sqrt2 v2=(0,1). cos: [[.7071, 0], [.7071, 1]]
    c = 1 / math.sqrt(2)
    row = [math.log(1 + math.exp(s * (0 - c))), math.log(1 + math.exp(s * (c - 1)))]
    col = [math.log(1 + math.exp(s * (c - c))), math.log(1 + math.exp(s * (0 - 1)))]
    expected = (sum(row) / 2 + sum(col) / 2) / 2
    assert rc.clip_loss(img, txt, torch.tensor(math.log(s))).item() == pytest.approx(expected, abs=1e-6)


def tiny_training_data(root, n_train=12, n_valid=6):
    """A prepped CT-RATE layout whose labels are visible: finding 0 is a bright block."""
    rng = np.random.default_rng(0)
    volumes, reports, labels = {}, [], []
    for split, n in (("train", n_train), ("valid", n_valid)):
        for i in range(n):
            name = f"{split}_{i}_a_1.nii.gz"
            y = [int(i % 2 == 0)] + [int(v) for v in rng.integers(0, 2, 17)]
            hu = chest((24, 24, 12)) + rng.normal(0, 20, (24, 24, 12)).astype(np.float32)
            if y[0]:
                hu[10:16, 10:16, 4:8] = 2500
            volumes[name] = hu + 1024
            reports.append((split, {"VolumeName": name, "ClinicalInformation_EN": "Not given.",
                                    "Technique_EN": "Not given.",
                                    "Findings_EN": "Stent present." if y[0] else "No stent.",
                                    "Impressions_EN": "Not given."}))
            labels.append((split, dict({"VolumeName": name}, **dict(zip(rc.FINDINGS, y)))))
    write_tiny_ctrate(root, volumes, spacing=(4.0, 4.0, 8.0))
    for split in ("train", "valid"):
        r = [row for s, row in reports if s == split]
        rc.write_csv(rc.ctrate_csv(root, split, "reports"), r, list(r[0]))
        lab = [row for s, row in labels if s == split]
        rc.write_csv(rc.ctrate_csv(root, split, "labels"), lab, list(lab[0]))
    cfg = tiny_cfg()
    for split in ("train", "valid"):
        rc.prep_split(root, split, cfg, workers=1)
    return cfg


def tiny_cfg(**kw):
    return rc.make_config("tiny", **dict(dict(
        spacing_mm=(8.0, 8.0, 16.0), input_shape=(8, 16, 16), width=4, context_len=8,
        text_width=16, text_layers=1, text_heads=2, embed_dim=8, batch_size=4, workers=0,
        channels_last="off", epochs=4, warmup_steps=2, eval_every=1000, save_every=1000,
        log_every=1000, augment=False), **kw))


def test_supervised_steps_overfit_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = rc.RadCLIP(cfg, 10)
    vol = torch.randn(4, 1, *cfg.input_shape)
    y = torch.randint(0, 2, (4, 18))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = rc.stage_loss(model, (vol, None, y), cfg, "supervised", "image")
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = tiny_training_data(tmp_path)
    rc.train(cfg, "clip", tmp_path / "full.pt", tmp_path)
    rc.train(cfg, "clip", tmp_path / "part.pt", tmp_path, stop_after=5)
    assert rc.load_checkpoint(tmp_path / "part.pt")["step"] == 5
    rc.train(cfg, "clip", tmp_path / "part.pt", tmp_path, resume=True)
    full, part = (rc.load_checkpoint(tmp_path / f)["model"] for f in ("full.pt", "part.pt"))
    for k in full:
        assert torch.allclose(full[k].float(), part[k].float(), atol=1e-6), k


def test_checkpoint_loads_in_another_process_with_weights_only(tmp_path):
    cfg = tiny_training_data(tmp_path)
    metrics = rc.train(cfg, "supervised", tmp_path / "sup.pt", tmp_path)
    assert 0 <= metrics["macro_auc"] <= 1
    code = ("import torch, radclip as rc; c = torch.load(r'%s', weights_only=True); "
            "m, cfg, tok = rc.model_from_checkpoint(r'%s'); print(c['step'], cfg.width, len(tok.vocab))")
    out = subprocess.run([sys.executable, "-c", code % (tmp_path / "sup.pt", tmp_path / "sup.pt")],
                         capture_output=True, text=True, cwd=HERE, check=True).stdout.split()
    assert out[:2] == [str(rc.load_checkpoint(tmp_path / "sup.pt")["step"]), "4"]


DDP_SCRIPT = r"""
import sys, torch, radclip as rc
rank, world, device = rc.setup_distributed("cpu")
out, data = sys.argv[1], sys.argv[2]
cfg = rc.make_config("tiny", width=4, input_shape=(8, 16, 16), context_len=8, text_width=16,
                     text_layers=1, text_heads=2, embed_dim=8)
result = {}
for stage in ("clip", "supervised"):
    torch.manual_seed(0)
    model = rc.RadCLIP(cfg, 20).eval()  # eval: BatchNorm statistics are per rank by design
    g = torch.Generator().manual_seed(1)
    vol, ids = torch.randn(8, 1, 8, 16, 16, generator=g), torch.randint(1, 20, (8, 8), generator=g)
    y = torch.randint(0, 2, (8, 18), generator=g)
    shard = slice(rank * 4, rank * 4 + 4)
    loss = rc.stage_loss(model, (vol[shard], ids[shard], y[shard]), cfg, stage, "image")
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    rc.all_reduce_grads(params, [model.logit_scale] if stage == "clip" else params)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)  # the supervised loss is a mean over the rank's shard
    result[stage] = {"loss": loss.item() if stage == "clip" else total.item() / world,
                     "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
if rank == 0:
    torch.save(result, out)
rc.train(rc.make_config("tiny", **TINY), "clip", out + ".ckpt", data)
"""


def test_torchrun_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    cfg = tiny_training_data(tmp_path)
    tiny = {k: getattr(cfg, k) for k in ("spacing_mm", "input_shape", "width", "context_len",
            "text_width", "text_layers", "text_heads", "embed_dim", "batch_size", "workers",
            "channels_last", "epochs", "augment")}
    script = tmp_path / "ddp.py"
    script.write_text(f"TINY = {tiny!r}\n" + DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "--master_port=29517", str(script), str(tmp_path / "ddp.pt"), str(tmp_path)],
                   check=True, env=env, capture_output=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    cfg = rc.make_config("tiny", width=4, input_shape=(8, 16, 16), context_len=8, text_width=16,
                         text_layers=1, text_heads=2, embed_dim=8)
    for stage in ("clip", "supervised"):
        torch.manual_seed(0)
        model = rc.RadCLIP(cfg, 20).eval()
        g = torch.Generator().manual_seed(1)
        vol, ids = torch.randn(8, 1, 8, 16, 16, generator=g), torch.randint(1, 20, (8, 8), generator=g)
        y = torch.randint(0, 2, (8, 18), generator=g)
        loss = rc.stage_loss(model, (vol, ids, y), cfg, stage, "image")
        loss.backward()
        assert ddp[stage]["loss"] == pytest.approx(loss.item(), abs=1e-5)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == ddp[stage]["grads"].keys()
        for n, grad in grads.items():
            assert torch.allclose(grad, ddp[stage]["grads"][n], atol=1e-5), (stage, n)
    ckpt = rc.load_checkpoint(tmp_path / "ddp.pt.ckpt")
    assert ckpt["provenance"]["world_size"] == 2 and ckpt["step"] == 6  # 4 epochs of 12, batch 2x4
