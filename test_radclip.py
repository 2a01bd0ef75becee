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
