"""radclip: a minimal reference implementation of

    Li et al., "More performant and scalable: Rethinking contrastive vision-language
    pre-training of radiology in the LLM era", arXiv 2509.13175 (2025).

The paper's claims, in three lines:
  1. An off-the-shelf LLM turns free-text CT reports into diagnostic "silver" labels
     (>96% AUC against reference labels, about $3 for 50k reports).
  2. Supervised pre-training of a plain 3D ResNet-18 on those labels, then vanilla CLIP,
     beats far more complex vision-language systems.
  3. Zero-shot AUC 83.8% on CT-RATE, image-image mAP@50 53.7%, report-image Recall@100 52.2%.

The pipeline:

    reports.csv --label (LLM / rules)--> silver labels --+
                                                         v
    volumes.nii.gz --prep--> cache/*.npy --train --stage supervised--> image/text towers
                                                         |
                                 train --stage clip (InfoNCE) <--+
                                                         |
                          eval: zero-shot AUC, mAP@K, Recall@K (+ bootstrap CIs)

The CLI:
    python radclip.py synth --out data            # a miniature CT-RATE (phantoms + reports)
    python radclip.py prep  --data data           # NIfTI -> HU -> spacing -> window -> .npy
    python radclip.py label --reports R.csv --out L.csv
    python radclip.py train --stage supervised|clip ...
    python radclip.py eval  --ckpt C.pt --data data
    python radclip.py demo                        # all of the above on a laptop CPU

Sections: 1 config and findings, 2 utilities, 3 data (synthetic CT-RATE, NIfTI, prep,
dataset), 4 silver labels, 5 models, 6 training, 7 evaluation, 8 demo and bench, 9 CLI.
"""
import argparse
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------
# ---- 1. Config and findings ----
# The 18 CT-RATE findings, in CT-RATE's column order. This list is the one source of truth:
# the prompts, the label CSVs and the classification heads all take it from here.
# ---------------------------------------------------------------------------------------
FINDINGS = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela",
    "Pleural effusion", "Mosaic attenuation pattern", "Peribronchial thickening",
    "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
]
PROMPTS_PATH = Path(__file__).with_name("prompts.txt")


class RadclipError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits nonzero."""


@dataclass
class Config:
    # Preprocessing. Paper/GreenRFM chest settings: 1.5 x 1.5 x 3 mm, HU window [-1000, 200]
    # mapped to [-1, 1], a 192 x 192 x 96 input. spacing is (x, y, z); shapes are (D, H, W).
    spacing_mm: tuple = (1.5, 1.5, 3.0)
    input_shape: tuple = (96, 192, 192)
    hu_window: tuple = (-1000.0, 200.0)
    # Image tower: torchvision's r3d_18 topology with a 1-channel strided stem.
    width: int = 64                 # channels of layer1; 64 is ResNet-18
    stem_kernel: int = 2            # the authors' stem: 2x2x2 stride 2 ("lite": 4, stride 4)
    stem_stride: int = 2
    # Text tower: word-level tokenizer + a small pre-LN Transformer (paper: CXR-BERT).
    context_len: int = 256
    vocab_min_freq: int = 2
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    # CLIP head
    embed_dim: int = 512
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    learn_temperature: bool = True
    aux_cls: float = 0.0            # GreenRFM-style classifier loss during CLIP; 0 = vanilla
    # Optimisation (GreenRFM: AdamW, supervised lr 1e-4, CLIP lr 1e-5, batch 10, 5 epochs)
    supervised_lr: float = 1e-4
    clip_lr: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    batch_size: int = 10
    accum_steps: int = 1
    epochs: float = 5.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    uncertain: str = "ignore"       # what -1 labels train as: ignore (masked) | zero | one
    pos_weight: bool = False        # weight positives by neg/pos prevalence in BCE
    augment: bool = True
    # Runtime
    amp: str = "auto"               # auto: AMP on CUDA, fp32 on CPU (CPU bf16 is ~35x slower)
    channels_last: str = "auto"     # auto: whatever `bench` measured faster on this device
    workers: int = 4
    seed: int = 0
    eval_every: int = 500
    save_every: int = 500
    log_every: int = 20


PRESETS = {
    "paper": {},
    # Sized for a 2-core CPU: a width-16 ResNet-18 at 32x64x64 trains at ~60 volumes/s.
    "tiny": dict(spacing_mm=(4.5, 4.5, 9.0), input_shape=(32, 64, 64), width=16,
                 context_len=128, text_width=128, text_layers=2, text_heads=4,
                 embed_dim=128, supervised_lr=2e-3, clip_lr=5e-4, min_lr=1e-5,
                 batch_size=32, epochs=12, warmup_steps=20, workers=2,
                 eval_every=100, save_every=100, log_every=10),
}


def make_config(preset="paper", **overrides):
    """The preset's Config, with overrides that are not None (CLI flags map to fields)."""
    if preset not in PRESETS:
        raise RadclipError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(Config)}
    bad = set(overrides) - fields
    if bad:
        raise RadclipError(f"unknown config field(s) {sorted(bad)}")
    values = dict(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ---------------------------------------------------------------------------------------
# ---- 2. Utilities ----
# ---------------------------------------------------------------------------------------
def seed_everything(seed):
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write_bytes(path, data):
    """Write to a temporary file and rename: a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_csv(path, required=()):
    """Rows of a CSV as dicts; a missing file or column is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise RadclipError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise RadclipError(f"{path}: missing column(s) {missing}; found {columns}")
        return list(reader)


def write_csv(path, rows, columns):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# ---- 3b. From NIfTI to model input ----
# Every volume, synthetic or real, takes this one path: stored values -> Hounsfield units ->
# one fixed orientation -> the configured spacing -> the HU window -> a fixed shape. The
# result is cached as float16 .npy so that training reads it with memory mapping.
# ---------------------------------------------------------------------------------------
CTRATE_FILES = {  # CT-RATE names its CSVs inconsistently ("valid" here, "validation" there)
    "train": ("train_reports.csv", "train_predicted_labels.csv", "train_metadata.csv"),
    "valid": ("validation_reports.csv", "valid_predicted_labels.csv", "validation_metadata.csv"),
}


def ctrate_csv(data_dir, split, kind):
    """Path of a split's 'reports', 'labels' or 'metadata' CSV in CT-RATE's layout."""
    folder = {"reports": "radiology_text_reports", "labels": "multi_abnormality_labels",
              "metadata": "metadata"}[kind]
    name = CTRATE_FILES[split][("reports", "labels", "metadata").index(kind)]
    return Path(data_dir) / "dataset" / folder / name


def volume_name(path):
    return Path(path).name.removesuffix(".gz").removesuffix(".nii") + ".nii.gz"


def parse_spacing(text):
    """CT-RATE writes XYSpacing as a string such as "[0.75, 0.75]": parse it, never slice it."""
    return [float(v) for v in str(text).strip("[]() ").replace(",", " ").split()]


def to_hu(stored, slope, intercept, mode, name=""):
    """Hounsfield units from stored values. The original CT-RATE release stores raw values
    (HU = slope * raw + intercept, from the metadata CSV); the corrected release stores HU.
    CT-CLIP applies the CSV scaling to both and so scales the corrected release twice."""
    if mode == "hu":
        return stored
    scaled = stored * np.float32(slope) + np.float32(intercept)
    if mode == "raw":
        return scaled
    # auto: air (outside the body, in the lungs) reads about -1000 HU in the right version.
    sample = (slice(None, None, 3),) * 3
    air = [np.mean((x[sample] > -1100) & (x[sample] < -900)) for x in (stored, scaled)]
    if max(air) < 0.01:
        raise RadclipError(f"{name}: no voxel reads like air (-1000 HU) with or without the "
                           "metadata's Rescale values; pass --hu raw or --hu hu")
    return scaled if air[1] > air[0] else stored


def load_hu(path, meta, hu_mode="auto"):
    """A NIfTI volume as (hu (D, H, W) float32, spacing_mm (z, y, x)).
    Axes are put in the radiological display order: D runs superior->inferior, H anterior->
    posterior, W the patient's right->left. Spacing comes from the metadata CSV, like the
    authors' and CT-CLIP's code, and orientation from the NIfTI affine (CT-CLIP ignores it)."""
    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise RadclipError(f"{volume_name(path)}: has shape {img.shape}; expected one 3-D volume")
    stored = img.get_fdata(dtype=np.float32)  # header scaling is identity in CT-RATE
    xy = parse_spacing(meta["XYSpacing"])
    spacing = np.array([xy[0], xy[-1], float(meta["ZSpacing"])])  # of the stored axes
    hu = to_hu(stored, float(meta["RescaleSlope"]), float(meta["RescaleIntercept"]), hu_mode,
               volume_name(path))
    ornt = nib.orientations.io_orientation(img.affine)  # stored axis -> (RAS axis, flip)
    hu = nib.orientations.apply_orientation(hu, ornt)   # now x: L->R, y: P->A, z: I->S
    spacing = spacing[np.argsort(ornt[:, 0])]
    hu = np.ascontiguousarray(hu.transpose(2, 1, 0)[::-1, ::-1, ::-1])
    return hu, tuple(spacing[::-1])


def preprocess(hu, spacing_zyx, cfg):
    """(D, H, W) HU at any spacing -> float16 at cfg.spacing_mm, windowed to [-1, 1], cropped or
    padded (with air) about the centre to cfg.input_shape."""
    target = cfg.spacing_mm[::-1]  # cfg holds (x, y, z); arrays are (z, y, x)
    size = [max(1, round(n * s / t)) for n, s, t in zip(hu.shape, spacing_zyx, target)]
    x = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0, 0]
    lo, hi = cfg.hu_window
    x = (x.clamp(lo, hi) - lo) / (hi - lo) * 2 - 1  # GreenRFM's (hu + 400) / 600 for [-1000, 200]
    out = torch.full(cfg.input_shape, -1.0)
    src, dst = [], []
    for n, m in zip(x.shape, cfg.input_shape):
        a, b = max(0, (n - m) // 2), max(0, (m - n) // 2)
        k = min(n, m)
        src.append(slice(a, a + k))
        dst.append(slice(b, b + k))
    out[tuple(dst)] = x[tuple(src)]
    return out.numpy().astype(np.float16)


def cache_dir(data_dir, cfg):
    """One cache per preprocessing setting, so presets never read each other's arrays."""
    sx, sy, sz = cfg.spacing_mm
    d, h, w = cfg.input_shape
    lo, hi = cfg.hu_window
    return Path(data_dir) / "cache" / f"{sx:g}x{sy:g}x{sz:g}mm_{d}x{h}x{w}_hu{lo:g}to{hi:g}"


def _prep_one(job):
    path, meta, out, cfg, hu_mode = job
    torch.set_num_threads(1)  # parallelism is across volumes
    try:
        if meta is None:
            raise RadclipError(f"{volume_name(path)}: not in the metadata CSV")
        hu, spacing = load_hu(path, meta, hu_mode)
        buf = io.BytesIO()
        np.save(buf, preprocess(hu, spacing, cfg))
        atomic_write_bytes(out, buf.getvalue())
        return None
    except (RadclipError, nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as e:
        # corrupt: ImageFileError; truncated gzip: EOFError/OSError; bad metadata: ValueError
        return f"{volume_name(path)}: {type(e).__name__}: {e}"


def prep_split(data_dir, split, cfg, hu_mode="auto", workers=2):
    """Preprocess one split into cache_dir; returns (n_cached, n_skipped, failures). A rerun
    skips every finished file: each .npy is written atomically, so it is whole or absent."""
    from multiprocessing import get_context
    from tqdm import tqdm
    root = Path(data_dir) / "dataset" / split
    if not root.is_dir():
        raise RadclipError(f"{root}: not found; --data must hold CT-RATE's dataset/{split}/ folder")
    meta = {r["VolumeName"]: r for r in read_csv(
        ctrate_csv(data_dir, split, "metadata"),
        ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept"))}
    paths = sorted(root.rglob("*.nii.gz"))
    out_dir = cache_dir(data_dir, cfg) / split
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = [out_dir / volume_name(p).replace(".nii.gz", ".npy") for p in paths]
    todo = [(p, meta.get(volume_name(p)), o, cfg, hu_mode) for p, o in zip(paths, outs)
            if not o.exists()]
    failures = []
    with get_context("fork").Pool(max(1, workers)) as pool:
        for err in tqdm(pool.imap_unordered(_prep_one, todo), total=len(todo),
                        desc=f"prep {split}", unit="vol", disable=not todo):
            if err:
                failures.append(err)
    done = [volume_name(p) for p, o in zip(paths, outs) if o.exists()]
    write_csv(out_dir / "index.csv", [{"VolumeName": n} for n in done], ["VolumeName"])
    return len(done), len(paths) - len(todo), failures


# ---------------------------------------------------------------------------------------
# ---- 3c. Reports, labels and the dataset ----
# A training example is (volume, report, labels), matched by CT-RATE's VolumeName. The report
# is Findings + Impressions, as in the paper; the labels are silver (LLM), rules or gold.
# ---------------------------------------------------------------------------------------
def report_text(row, columns=("Findings_EN", "Impressions_EN")):
    """The report as the model reads it; CT-RATE writes empty sections as 'Not given.'."""
    parts = [(row.get(c) or "").strip() for c in columns]
    return " ".join(p for p in parts if p and p != "Not given.")


def read_reports(path, id_col="VolumeName", text_cols=("Findings_EN", "Impressions_EN")):
    rows = read_csv(path, (id_col, *text_cols))
    return {r[id_col]: report_text(r, text_cols) for r in rows}


def read_labels(path, id_col="VolumeName"):
    """{id: (18,) int8 array of -1/0/1} from a CT-RATE-style labels CSV."""
    rows = read_csv(path, (id_col, *FINDINGS))
    try:
        return {r[id_col]: np.array([int(float(r[f])) for f in FINDINGS], np.int8) for r in rows}
    except ValueError as e:
        raise RadclipError(f"{path}: a label is not -1, 0 or 1 ({e})") from None


def match_ids(name, **sources):
    """IDs present in every source, in the first source's order. Mismatches are reported with
    a count and examples, never dropped silently: a wrong labels file must be noticed."""
    keys = [set(v) for v in sources.values()]
    common = set.intersection(*keys)
    for (src, ids) in sources.items():
        lost = [i for i in ids if i not in common]
        if lost:
            print(f"radclip: warning: {name}: {len(lost)} of {len(ids)} IDs in {src} are missing "
                  f"elsewhere and left out (e.g. {', '.join(sorted(lost)[:3])})", file=sys.stderr)
    first = next(iter(sources.values()))
    if not common:
        raise RadclipError(f"{name}: no VolumeName is shared by {', '.join(sources)}")
    return [i for i in first if i in common]


def words(text):
    """Lower-cased words, numbers and punctuation marks: '5 mm' and '5mm' both read 5, mm."""
    return re.findall(r"[a-z]+|\d+(?:\.\d+)?|[^\sa-z\d]", text.lower())


class Tokenizer:
    """A word-level vocabulary built from the training reports and stored in the checkpoint.
    The paper uses CXR-BERT's WordPiece; a from-scratch vocabulary needs no download."""
    specials = ["<pad>", "<unk>"]

    def __init__(self, vocab):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts, min_freq=2):
        from collections import Counter
        counts = Counter(w for t in texts for w in words(t))
        return cls(cls.specials + sorted(w for w, c in counts.items() if c >= min_freq))

    def encode(self, text, context_len):
        """(context_len,) int64 ids, 0-padded. Longer reports are cut at the end, so a long
        Findings section can push the Impression out; CXR-BERT in the paper cuts at 128 too."""
        ids = [self.index.get(w, 1) for w in words(text)][:context_len]
        return torch.tensor(ids + [0] * (context_len - len(ids)), dtype=torch.long)


class CTRateDataset(torch.utils.data.Dataset):
    """(volume (1, D, H, W), token ids (L,), labels (18,)) for one split, from prep's cache."""

    def __init__(self, data_dir, split, cfg, tokenizer=None, labels_csv=None, augment=False):
        self.cfg, self.tokenizer, self.augment = cfg, tokenizer, augment
        self.cache = cache_dir(data_dir, cfg) / split
        if not (self.cache / "index.csv").is_file():
            raise RadclipError(f"{self.cache}: no preprocessed volumes; run "
                               f"`python radclip.py prep --data {data_dir} --split {split}` first")
        cached = [r["VolumeName"] for r in read_csv(self.cache / "index.csv", ("VolumeName",))]
        reports = read_reports(ctrate_csv(data_dir, split, "reports"))
        labels = read_labels(labels_csv or ctrate_csv(data_dir, split, "labels"))
        self.names = match_ids(f"{split} split", volumes=cached, reports=reports, labels=labels)
        self.reports = [reports[n] for n in self.names]
        self.labels = torch.tensor(np.stack([labels[n] for n in self.names]))

    def __len__(self):
        return len(self.names)

    def __getitem__(self, item):
        i, aug_seed = item if isinstance(item, tuple) else (item, None)
        vol = torch.from_numpy(np.load(self.cache / self.names[i].replace(".nii.gz", ".npy"),
                                       mmap_mode="r").astype(np.float32))[None]
        if self.augment and aug_seed is not None:
            vol = augment_volume(vol, torch.Generator().manual_seed(aug_seed))
        ids = self.tokenizer.encode(self.reports[i], self.cfg.context_len) if self.tokenizer \
            else torch.zeros(0, dtype=torch.long)
        return vol, ids, self.labels[i]


def augment_volume(vol, gen, max_shift=0.08):
    """A random shift (a crop of an air-padded volume) of up to 8% per axis. No flips: left and
    right are not symmetric in the chest (heart, aorta), so a mirrored chest is not a chest."""
    shifts = [int(torch.randint(-round(n * max_shift), round(n * max_shift) + 1, (1,), generator=gen))
              for n in vol.shape[1:]]
    out = torch.full_like(vol, -1.0)
    src = [slice(max(0, -s), n - max(0, s)) for s, n in zip(shifts, vol.shape[1:])]
    dst = [slice(max(0, s), n - max(0, -s)) for s, n in zip(shifts, vol.shape[1:])]
    out[(slice(None), *dst)] = vol[(slice(None), *src)]
    return out


# ---------------------------------------------------------------------------------------
# ---- 5. Models ----
# The image tower is torchvision's r3d_18 (the paper's 3D ResNet-18) written out in plain
# PyTorch, with the authors' 1-channel strided stem; parameter names match torchvision's so
# its weights map one to one. The text tower is a small pre-LN Transformer (nanoGPT's block).
# ---------------------------------------------------------------------------------------
class BasicBlock3d(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride, 1, bias=False),
                                   nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv3d(c_out, c_out, 3, 1, 1, bias=False),
                                   nn.BatchNorm3d(c_out))
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm3d(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class ResNet3d18(nn.Module):
    """(B, 1, D, H, W) -> (B, 8 * width). BasicBlocks [2, 2, 2, 2], global average pooling."""

    def __init__(self, width=64, stem_kernel=2, stem_stride=2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, width, stem_kernel, stem_stride, bias=False),
                                  nn.BatchNorm3d(width), nn.ReLU(inplace=True))
        widths = [width, 2 * width, 4 * width, 8 * width]
        c_in, layers = width, []
        for i, c in enumerate(widths):
            layers.append(nn.Sequential(BasicBlock3d(c_in, c, 1 if i == 0 else 2),
                                        BasicBlock3d(c, c, 1)))
            c_in = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_dim = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for layer in layers:  # zero-init the last BN of each block: each block starts as identity
            for block in layer:
                nn.init.zeros_(block.conv2[1].weight)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return x.mean(dim=(2, 3, 4))


class SelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, mask):  # x (B, L, C), mask (B, L) True for real tokens
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    def __init__(self, width, heads, dropout):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width), nn.Dropout(dropout))

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """(B, L) token ids -> (B, width): the mean of the final states over the real tokens."""

    def __init__(self, vocab_size, context_len, width, layers, heads, dropout=0.1):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_len, width) * 0.01)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.out_dim = width

    def forward(self, ids):
        mask = ids != 0
        mask[:, 0] = True  # an empty report still has one position to attend to
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        x, m = self.ln_f(x), mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


class RadCLIP(nn.Module):
    """Both towers, their projections into one latent space, the 18-way heads of the
    supervised stage, and CLIP's learnable temperature."""

    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.visual = ResNet3d18(cfg.width, cfg.stem_kernel, cfg.stem_stride)
        self.text = TextEncoder(vocab_size, cfg.context_len, cfg.text_width, cfg.text_layers,
                                cfg.text_heads)
        self.visual_proj = nn.Linear(self.visual.out_dim, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.out_dim, cfg.embed_dim, bias=False)
        self.visual_cls = nn.Linear(self.visual.out_dim, len(FINDINGS))
        self.text_cls = nn.Linear(self.text.out_dim, len(FINDINGS))
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init),
                                        requires_grad=cfg.learn_temperature)

    def encode_image(self, x):  # (B, 1, D, H, W) -> (B, E)
        return self.visual_proj(self.visual(x))

    def encode_text(self, ids):  # (B, L) -> (B, E)
        return self.text_proj(self.text(ids))


# ---------------------------------------------------------------------------------------
# ---- 6. Training: supervised pre-training, then CLIP ----
# Stage 1 trains a tower to predict the 18 silver labels (BCE). Stage 2 is vanilla CLIP:
# symmetric InfoNCE between L2-normalised volume and report embeddings with a learnable
# temperature. One loop serves both; only the loss differs.
# ---------------------------------------------------------------------------------------
def masked_bce(logits, labels, policy="ignore", pos_weight=None):
    """Mean BCE over the labels that count. labels hold -1 (uncertain), 0, 1; policy maps -1 to
    'ignore' (masked out), 'zero' or 'one'. GreenRFM feeds -1 to BCE as a target, which
    rewards negative probabilities; we never do."""
    labels = labels.float()
    mask = torch.ones_like(labels)
    if policy == "ignore":
        mask = (labels >= 0).float()
    target = labels.clamp(min=0) if policy != "one" else labels.abs()
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none",
                                              pos_weight=pos_weight)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def gather_features(x):
    """Concatenate x over all ranks; the local shard keeps its gradient (open_clip's trick),
    so every rank computes the loss of the global batch."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    xs = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(xs, x.detach().contiguous())
    xs[dist.get_rank()] = x
    return torch.cat(xs)


def clip_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE. With unit vectors u_i, v_j and s = exp(logit_scale):
    L = (CE(s * U V^T, I) + CE(s * V U^T, I)) / 2, where pair i is the positive of row i."""
    u, v = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.exp() * u @ v.T
    target = torch.arange(len(u), device=u.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def stage_loss(model, batch, cfg, stage, modality, pos_weight=None):
    """The loss of one micro-batch for the chosen stage."""
    vol, ids, labels = batch
    if stage == "supervised":
        if modality == "image":
            return masked_bce(model.visual_cls(model.visual(vol)), labels, cfg.uncertain, pos_weight)
        return masked_bce(model.text_cls(model.text(ids)), labels, cfg.uncertain, pos_weight)
    img_feat, txt_feat = model.visual(vol), model.text(ids)
    scale = model.logit_scale.clamp(max=math.log(cfg.logit_scale_max))
    loss = clip_loss(gather_features(model.visual_proj(img_feat)),
                     gather_features(model.text_proj(txt_feat)), scale)
    if cfg.aux_cls:  # the GreenRFM-style ablation; vanilla CLIP (the paper) has aux_cls = 0
        loss = loss + cfg.aux_cls / 2 * (masked_bce(model.visual_cls(img_feat), labels, cfg.uncertain)
                                         + masked_bce(model.text_cls(txt_feat), labels, cfg.uncertain))
    return loss


def trainable(name, stage, modality, cfg):
    """Which parameters a stage trains: a supervised stage one tower and its head; CLIP both
    towers, projections and temperature (and the heads only for --aux-cls)."""
    if stage == "supervised":
        return name.startswith(("visual.", "visual_cls.") if modality == "image" else ("text.", "text_cls."))
    return not name.startswith(("visual_cls.", "text_cls.")) or cfg.aux_cls > 0


class StepSampler(torch.utils.data.Sampler):
    """An endless, resumable, distributed sampler. Sample p of the stream is item
    perm_{p // n}[p % n] of a per-epoch permutation seeded by (seed, epoch); rank r of W takes
    every W-th micro-batch slot. It yields (index, augmentation seed), so a resumed run sees
    exactly the samples and augmentations it would have seen (DistributedSampler restarts
    its epoch instead)."""

    def __init__(self, n, batch_size, seed, start, rank=0, world=1):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world = rank, world

    def __iter__(self):
        epoch, perm = -1, None
        for slot in itertools.count(self.start):
            for j in range(self.batch_size):
                p = (slot * self.world + self.rank) * self.batch_size + j
                if p // self.n != epoch:
                    epoch = p // self.n
                    perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                        self.seed * 100003 + epoch))
                yield int(perm[p % self.n]), self.seed * 1_000_003 + p


def resolve_amp(amp, device):
    """The autocast dtype, or None for fp32. auto: bf16 on GPUs that have it, else fp16 with a
    GradScaler; fp32 on CPU, where bf16 autocast ran ~35x slower than fp32 on an AVX2 machine."""
    if amp == "auto":
        amp = "off" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def resolve_channels_last(choice, cfg, device, amp_dtype):
    """auto: whichever memory format trains faster here, measured once (as `bench` does) and
    remembered per device and model size. On this 2-core CPU it wins at width 16, loses at 64."""
    if choice != "auto":
        return choice == "on"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{os.cpu_count()}"
    key = f"{name}|{cfg.width}|{cfg.stem_kernel}/{cfg.stem_stride}|{cfg.input_shape}|{amp_dtype}"
    path = Path(os.environ.get("RADCLIP_CACHE", Path.home() / ".cache" / "radclip")) / "channels_last.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key not in known:
        speed = {cl: time_train_step(cfg, device, amp_dtype, cl, steps=3)["volumes_per_s"]
                 for cl in (False, True)}
        known[key] = speed[True] > speed[False]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(known, indent=1).encode())
    return known[key]


def time_train_step(cfg, device, amp_dtype, channels_last, steps=5, batch=None):
    """Median forward+backward volumes/s of the image tower and the peak memory, on random input."""
    batch = batch or cfg.batch_size
    model = ResNet3d18(cfg.width, cfg.stem_kernel, cfg.stem_stride).to(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 1, *cfg.input_shape, device=device).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + 2):  # two warm-up steps (cudnn.benchmark, allocator)
        t0 = time.perf_counter()
        with torch.autocast(device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"volumes_per_s": batch / float(np.median(times[2:])), "peak_gib": peak}


def setup_distributed(device_name):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on CUDA, gloo on CPU. -> (rank, world, device)"""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_grads(params, averaged):
    """Combine the gradients of all ranks in one buffer. A gradient in `averaged` is already
    complete on every rank (from a loss of the local shard, or logit_scale, which sees the whole
    gathered batch on every rank); the others are the rank's share of the global CLIP loss,
    through its own embeddings, so they are summed."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad.copy_(chunk.view_as(p.grad) / (dist.get_world_size() if any(p is a for a in averaged) else 1))


def save_checkpoint(path, **state):
    """Atomic: a crash while saving leaves the previous checkpoint intact."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path):
    if not Path(path).is_file():
        raise RadclipError(f"{path}: no such checkpoint")
    try:  # weights_only: a checkpoint from the internet cannot run code on load
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise RadclipError(f"{path}: not a readable radclip checkpoint ({e})") from None


def model_from_checkpoint(path):
    """(model, cfg, tokenizer) rebuilt from a checkpoint alone, without the CLI."""
    ckpt = load_checkpoint(path)
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()})
    tokenizer = Tokenizer(ckpt["vocab"])
    model = RadCLIP(cfg, len(tokenizer.vocab))
    model.load_state_dict(ckpt["model"])
    return model, cfg, tokenizer


def load_tower(model, path, prefixes, tokenizer):
    """Copy one tower (and its head) from a supervised checkpoint into model."""
    ckpt = load_checkpoint(path)
    if "text." in prefixes and ckpt["vocab"] != tokenizer.vocab:
        raise RadclipError(f"{path}: its vocabulary differs from this run's; build both from the "
                           "same training reports")
    state = {k: v for k, v in ckpt["model"].items() if k.startswith(prefixes)}
    if not state:
        raise RadclipError(f"{path}: holds no {'/'.join(prefixes)} weights")
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def embed(model, ds, fn, cfg, device, amp_dtype=None, channels_last=False, batch_size=None):
    """fn(model, vol, ids) for every example of ds, concatenated (in ds order) on the CPU."""
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size or 2 * cfg.batch_size,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator())  # keeps training's RNG as is
    out = []
    for vol, ids, _ in loader:
        vol = vol.to(device, non_blocking=True)
        if channels_last:
            vol = vol.to(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out.append(fn(model, vol, ids.to(device)).float().cpu())
    return torch.cat(out)


def print0(*args):
    if int(os.environ.get("RANK", 0)) == 0:
        from tqdm import tqdm
        tqdm.write(" ".join(str(a) for a in args))


def train(cfg, stage, out, data_dir, modality="image", labels_csv=None, init_image=None,
          init_text=None, resume=False, device="auto", stop_after=None):
    """Train one stage and save to `out`; returns the final validation metrics.
    stop_after ends the run early without changing its schedule (a time box; the resume test)."""
    from tqdm import tqdm
    rank, world, device = setup_distributed(device)
    seed_everything(cfg.seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(out) if resume and out.is_file() else None
    if ckpt and (ckpt["stage"], ckpt["modality"]) != (stage, modality):
        raise RadclipError(f"{out}: holds a {ckpt['stage']}/{ckpt['modality']} run; resume it "
                           "with the same --stage and --modality, or pick another --out")
    if ckpt:
        cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()})
    if ckpt:
        tokenizer = Tokenizer(ckpt["vocab"])
    elif init_text:
        tokenizer = Tokenizer(load_checkpoint(init_text)["vocab"])
    else:  # deterministic, so every run on the same train split builds the same vocabulary
        tokenizer = Tokenizer.build(read_reports(ctrate_csv(data_dir, "train", "reports")).values(),
                                    cfg.vocab_min_freq)
    train_ds = CTRateDataset(data_dir, "train", cfg, tokenizer, labels_csv, augment=cfg.augment)
    valid_ds = CTRateDataset(data_dir, "valid", cfg, tokenizer)  # the split's own (gold) labels

    model = RadCLIP(cfg, len(tokenizer.vocab))
    if init_image and not ckpt:
        load_tower(model, init_image, ("visual.", "visual_cls."), tokenizer)
    if init_text and not ckpt:
        load_tower(model, init_text, ("text.", "text_cls."), tokenizer)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name, stage, modality, cfg) and
                         (name != "logit_scale" or cfg.learn_temperature))
    amp_dtype = resolve_amp(cfg.amp, device)
    channels_last = resolve_channels_last(cfg.channels_last, cfg, device, amp_dtype)
    torch.backends.cudnn.benchmark = True  # fixed input shape: let cuDNN pick its fastest kernels
    model = model.to(device, memory_format=torch.channels_last_3d if channels_last else torch.preserve_format)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2]},  # no decay on
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg.supervised_lr if stage == "supervised" else cfg.clip_lr,
                            weight_decay=cfg.weight_decay)  # biases, norms, temperature
    base_lr = opt.param_groups[0]["lr"]
    batch = cfg.batch_size * cfg.accum_steps * world
    max_steps = max(1, math.ceil(cfg.epochs * len(train_ds) / batch))

    def lr_factor(step):  # linear warmup, then cosine from base_lr down to min_lr
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        return (cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))) / base_lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    pos_weight = None
    if cfg.pos_weight:  # neg/pos per finding, over the labels that are 0 or 1
        y = train_ds.labels
        pos_weight = (((y == 0).sum(0)) / (y == 1).sum(0).clamp(min=1)).float().clamp(1, 20).to(device)
    start = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        start = ckpt["step"]
    sampler = StepSampler(len(train_ds), cfg.batch_size, cfg.seed, start * cfg.accum_steps, rank, world)
    loader = torch.utils.data.DataLoader(
        train_ds, cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed))  # leaves the global RNG alone
    print0(f"radclip train {stage}/{modality}: {sum(p.numel() for p in params):,} trainable "
           f"parameters, {len(train_ds)} train / {len(valid_ds)} valid volumes, global batch "
           f"{batch}, {max_steps} steps, {device}, amp={amp_dtype or 'fp32'} (from --amp "
           f"{cfg.amp}), channels_last={channels_last} (from {cfg.channels_last}), world {world}")
    provenance = {"torch": str(torch.__version__), "device": str(device), "seed": cfg.seed,
                  "radclip_sha256": sha256_file(__file__), "world_size": world}
    log_path = out.with_suffix(".log.jsonl")
    metrics, batches = {}, iter(loader)
    bar = tqdm(range(start, max_steps), initial=start, total=max_steps, desc=f"{stage}/{modality}",
               disable=rank != 0, dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    for step in bar:
        model.train()
        for _ in range(cfg.accum_steps):
            vol, ids, labels = (t.to(device, non_blocking=True) for t in next(batches))
            if channels_last:
                vol = vol.to(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = stage_loss(model, (vol, ids, labels), cfg, stage, modality, pos_weight)
            scaler.scale(loss / cfg.accum_steps).backward()
        if world > 1:
            all_reduce_grads(params, [model.logit_scale] if stage == "clip" else params)
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        seen += batch
        done = step + 1
        if done % cfg.log_every == 0 or done == max_steps:
            row = {"step": done, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                   "grad_norm": grad_norm.item(), "logit_scale": model.logit_scale.exp().item(),
                   "volumes_per_s": seen / (time.perf_counter() - t0)}
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                            vol_s=f"{row['volumes_per_s']:.1f}")
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        last = done == max_steps or done == stop_after
        if rank == 0 and (done % cfg.eval_every == 0 or last):
            metrics = validate(model, valid_ds, cfg, stage, modality, device, amp_dtype, channels_last)
            metrics["step"] = done
            print0(f"step {done}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "step"))
            with open(log_path, "a") as f:
                f.write(json.dumps({"eval": metrics}) + "\n")
        if rank == 0 and (done % cfg.save_every == 0 or last):
            rng = {"torch": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            save_checkpoint(out, model=model.state_dict(), optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), scaler=scaler.state_dict(), step=done,
                            config=dataclasses.asdict(cfg), stage=stage, modality=modality,
                            vocab=tokenizer.vocab, rng=rng, provenance=provenance, metrics=metrics)
        if last:
            break
    bar.close()
    return metrics


def validate(model, ds, cfg, stage, modality, device, amp_dtype, channels_last):
    """Supervised: macro AUC of the trained head on the valid split. CLIP: the InfoNCE loss
    of the whole split as one batch, and Recall@5 of reports retrieving their volume."""
    from sklearn.metrics import roc_auc_score
    if stage == "supervised":
        head = (lambda m, v, t: m.visual_cls(m.visual(v))) if modality == "image" else \
               (lambda m, v, t: m.text_cls(m.text(t)))
        scores, y = embed(model, ds, head, cfg, device, amp_dtype, channels_last).numpy(), ds.labels.numpy()
        aucs = [roc_auc_score(y[:, f] == 1, scores[:, f]) for f in range(len(FINDINGS))
                if 0 < (y[:, f] == 1).sum() < len(y)]
        return {"macro_auc": float(np.mean(aucs))}
    both = embed(model, ds, lambda m, v, t: torch.cat([m.encode_image(v), m.encode_text(t)], 1),
                 cfg, device, amp_dtype, channels_last)
    img, txt = both.split(cfg.embed_dim, dim=1)
    sim = F.normalize(txt, dim=1) @ F.normalize(img, dim=1).T
    hits = (sim.topk(min(5, len(sim)), dim=1).indices == torch.arange(len(sim))[:, None]).any(1)
    loss = clip_loss(img, txt, model.logit_scale.detach().cpu().clamp(max=math.log(cfg.logit_scale_max)))
    return {"val_loss": loss.item(), "recall_at_5": hits.float().mean().item()}


# ---------------------------------------------------------------------------------------
# ---- 9. CLI ----
# ---------------------------------------------------------------------------------------
def add_config_flags(p):
    """Flags that map one to one onto Config fields; None keeps the preset's value."""
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="paper: the paper's settings (GPU); tiny: a 2-core CPU (default)")
    p.add_argument("--spacing-mm", type=float, nargs=3, metavar=("X", "Y", "Z"))
    p.add_argument("--input-shape", type=int, nargs=3, metavar=("D", "H", "W"))
    p.add_argument("--hu-window", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--workers", type=int, help="data-loading processes")
    p.add_argument("--seed", type=int)


def config_from_args(args):
    fields = {f.name for f in dataclasses.fields(Config)}
    return make_config(args.preset, **{k: v for k, v in vars(args).items() if k in fields})


def cmd_prep(args):
    cfg = config_from_args(args)
    failed = 0
    for split in args.split or ["train", "valid"]:
        n_cached, n_skipped, failures = prep_split(args.data, split, cfg, args.hu, cfg.workers)
        for err in failures:
            print(f"radclip: skipped {err}", file=sys.stderr)
        failed += len(failures)
        print(f"prep {split}: {n_cached} volumes in {cache_dir(args.data, cfg) / split} "
              f"({n_skipped} already done, {len(failures)} failed)")
    return 1 if failed else 0


def cmd_train(args):
    cfg = config_from_args(args)
    if args.stage == "supervised" and args.modality == "text" and args.init_image:
        raise RadclipError("--init-image has no use when training the text tower")
    metrics = train(cfg, args.stage, args.out, args.data, args.modality, args.labels,
                    args.init_image, args.init_text, args.resume, args.device)
    print(json.dumps(metrics))


def build_parser():
    parser = argparse.ArgumentParser(prog="radclip", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prep", help="NIfTI -> HU -> spacing -> window -> float16 .npy cache")
    p.add_argument("--data", required=True, help="folder holding CT-RATE's dataset/")
    p.add_argument("--split", choices=["train", "valid"], action="append",
                   help="repeatable; default: both")
    p.add_argument("--hu", choices=["auto", "raw", "hu"], default="auto",
                   help="raw: apply the metadata's Rescale values; hu: stored values are HU "
                        "(corrected release); auto: whichever makes air read -1000 HU")
    add_config_flags(p)
    p.set_defaults(func=cmd_prep)

    p = sub.add_parser("train", help="supervised pre-training or CLIP alignment")
    p.add_argument("--stage", choices=["supervised", "clip"], required=True)
    p.add_argument("--modality", choices=["image", "text"], default="image",
                   help="the tower a supervised stage trains")
    p.add_argument("--data", required=True)
    p.add_argument("--labels", help="training labels CSV (silver); default: the split's own")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.add_argument("--init-image", help="supervised image checkpoint to start the CLIP stage from")
    p.add_argument("--init-text", help="supervised text checkpoint to start the CLIP stage from")
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1")
    add_config_flags(p)
    p.add_argument("--width", type=int, help="channels of ResNet layer1 (64 = ResNet-18)")
    p.add_argument("--stem-kernel", type=int)
    p.add_argument("--stem-stride", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--accum-steps", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--supervised-lr", type=float)
    p.add_argument("--clip-lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--uncertain", choices=["ignore", "zero", "one"],
                   help="how -1 (uncertain) labels train: masked out, as 0 or as 1")
    p.add_argument("--pos-weight", action=argparse.BooleanOptionalAction)
    p.add_argument("--aux-cls", type=float, help="weight of a classifier loss during CLIP (GreenRFM)")
    p.add_argument("--learn-temperature", action=argparse.BooleanOptionalAction)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction)
    p.add_argument("--amp", choices=["auto", "off", "fp16", "bf16"],
                   help="auto: bf16 (or fp16 + GradScaler) on CUDA, fp32 on CPU")
    p.add_argument("--channels-last", choices=["auto", "on", "off"],
                   help="auto: the faster one, measured once on this device")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except RadclipError as e:
        print(f"radclip: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("radclip: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
