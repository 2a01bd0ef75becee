"""radclip: a minimal reference implementation of

    Li et al., "More performant and scalable: Rethinking contrastive vision-language
    pre-training of radiology in the LLM era", arXiv 2509.13175 (2025).

The paper's claims, in three lines:
  1. An off-the-shelf LLM turns free-text CT reports into diagnostic "silver" labels
     (>96% AUC against reference labels, about $3 for 50k reports).
  2. Supervised pre-training of a plain 3D ResNet-18 on those labels, then vanilla CLIP,
     beats far more complex vision-language systems.
  3. Zero-shot AUC 83.8% on CT-RATE (77.3% on RAD-ChestCT), image-image mAP@50 53.7%,
     report-image Recall@100 52.2%.

The pipeline:

    reports.csv --label (LLM / rules)--> silver labels --+
                                                         v
    volumes.nii.gz --prep--> cache/*.npy --train --stage supervised--> image/text towers
                                                         |
                                 train --stage clip (InfoNCE) <--+
                                                         |
                          eval: zero-shot AUC, mAP@K, Recall@K (+ bootstrap CIs)

The CLI (`python radclip.py <command> --help` for the flags):
    synth (a miniature CT-RATE) | prep | label | train --stage supervised|clip | eval | prompts | demo | bench

Sections, in the paper's order: 1 findings and Config | 2 silver labels | 3 volumes to model input
and the dataset (CT-RATE, RAD-ChestCT) | 4 the two towers | 5 training (5b: devices, DDP, resumption,
checkpoints) | 6 evaluation | then the machinery: 7 demo and bench | 8 CLI | appendix: the synthetic
CT-RATE that the demo and the tests run on.
"""
import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from statistics import NormalDist
from types import SimpleNamespace

if __name__ == "__main__":  # Ctrl-C while torch loads exits quietly; main() handles it from then on
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
import nibabel as nib
import numpy as np
import requests
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from requests.adapters import HTTPAdapter
from sklearn.metrics import f1_score, precision_score, roc_auc_score, roc_curve
from tqdm import tqdm

# ---------------------------------------------------------------------------------------
# ---- 1. Findings and Config ----
# The 18 CT-RATE findings, in CT-RATE's column order, are the one source of truth: the prompts,
# the label CSVs and the classification heads all take them from here. Config holds the paper's
# settings; each field also says which values it may take and what its --flag does.
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


def knob(default, bounds, help):
    """A Config field: the paper's value, the values it may take ((lo, hi) inclusive for a number or
    each element of a tuple; else the allowed strings) and its --flag's help."""
    return dataclasses.field(default=default, metadata={"bounds": bounds, "help": help})


@dataclass
class Config:
    """The paper's settings; `tiny` (PRESETS) overrides the few a 2-core CPU needs smaller."""
    # Preprocessing, the authors' chest settings (GreenRFM, their follow-up code). Spacing is
    # (x, y, z) mm; every array is (D, H, W): superior->inferior, anterior->posterior, right->left.
    spacing_mm: tuple = knob((1.5, 1.5, 3.0), (0.1, 20.0), "voxel size (x, y, z), mm")
    input_shape: tuple = knob((96, 192, 192), (4, 1024), "model input (D, H, W), voxels")
    hu_window: tuple = knob((-1000.0, 200.0), (-2000.0, 4000.0), "HU range mapped to [-1, 1]")
    # Image tower: torchvision's r3d_18 with the authors' 1-channel strided stem ("lite": 4, stride 4).
    width: int = knob(64, (1, 1024), "channels of ResNet layer1 (64 is ResNet-18)")
    stem_kernel: int = knob(2, (1, 16), "the stem's cube size, voxels")
    stem_stride: int = knob(2, (1, 16), "the stem's stride: 2 the authors' standard stem, 4 their lite one")
    # Text tower: word-level tokenizer + a small pre-LN Transformer (the paper: CXR-BERT).
    context_len: int = knob(256, (1, 8192), "report tokens the text tower reads; the rest is cut")
    vocab_min_freq: int = knob(2, (1, 10**6), "training-report count a word needs to enter the vocabulary")
    text_width: int = knob(256, (1, 4096), "text Transformer width")
    text_layers: int = knob(4, (1, 64), "text Transformer blocks")
    text_heads: int = knob(4, (1, 64), "attention heads (they divide --text-width)")
    # CLIP head
    embed_dim: int = knob(512, (1, 8192), "the shared embedding's size")
    logit_scale_init: float = knob(math.log(1 / 0.07), (0.0, 10.0), "log of CLIP's first inverse temperature")
    logit_scale_max: float = knob(100.0, (1.0, 1e4), "the inverse temperature's cap")
    learn_temperature: bool = knob(True, (0, 1), "learn CLIP's temperature (else fixed at the initial one)")
    aux_cls: float = knob(0.0, (0.0, 1e3), "weight of a classifier loss during CLIP (GreenRFM); 0: vanilla")
    # Optimisation (GreenRFM: AdamW, supervised lr 1e-4, CLIP lr 1e-5, batch 10, 5 epochs)
    supervised_lr: float = knob(1e-4, (1e-9, 1.0), "peak learning rate of the supervised stage")
    clip_lr: float = knob(1e-5, (1e-9, 1.0), "peak learning rate of the CLIP stage")
    supervised_epochs: float = knob(5.0, (1e-3, 1e5), "passes over the training split (they set the steps)")
    clip_epochs: float = knob(5.0, (1e-3, 1e5), "passes over the training split (they set the steps)")
    min_lr: float = knob(1e-6, (0.0, 1.0), "where the cosine schedule ends")
    weight_decay: float = knob(1e-4, (0.0, 10.0), "AdamW's, on weights (not biases, norms, temperature)")
    batch_size: int = knob(10, (1, 65536), "volumes per micro-batch, per process")
    accum_steps: int = knob(1, (1, 4096), "micro-batches per optimizer step")
    warmup_steps: int = knob(100, (0, 10**7), "optimizer steps of linear warmup")
    grad_clip: float = knob(1.0, (1e-6, 1e6), "gradient-norm clip")
    uncertain: str = knob("ignore", ("ignore", "zero", "one"), "what -1 (uncertain) trains as: masked, 0, 1")
    pos_weight: bool = knob(False, (0, 1), "weight positives by negatives/positives in BCE, in [1, 20]")
    augment: bool = knob(True, (0, 1), "random shifts of up to 8% per axis and shuffled report sentences")
    max_train_volumes: int = knob(0, (0, 10**8), "train on the first N volumes only (0: all)")
    # Runtime
    amp: str = knob("auto", ("auto", "off", "fp16", "bf16"), "auto: bf16 (or fp16) on CUDA, fp32 on CPU")
    channels_last: str = knob("auto", ("auto", "on", "off"), "auto: the faster one, measured at start-up")
    workers: int = knob(4, (0, 256), "processes: prep's volumes in parallel, train's data loading")
    seed: int = knob(0, (0, 2**32 - 1), "seeds the model, the sampler and the augmentation")
    eval_every: int = knob(500, (1, 10**8), "validate every N optimizer steps")
    save_every: int = knob(500, (1, 10**8), "checkpoint every N optimizer steps")
    log_every: int = knob(20, (1, 10**8), "log every N optimizer steps")


CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
PRESETS = {
    "paper": {},
    # Sized for a 2-core CPU: a width-16 ResNet-18 with the lite stem at 32 x 64 x 64. The window
    # reaches 1000 HU: in [-1000, 200] calcium, metal and bone all clip to one value, and at 4.5 mm a
    # plaque is a voxel-thick plate beside bone-bright ribs.
    "tiny": dict(spacing_mm=(4.5, 4.5, 9.0), input_shape=(32, 64, 64), hu_window=(-1000.0, 1000.0),
                 width=16, stem_kernel=4, stem_stride=4,
                 context_len=128, text_width=128, text_layers=2, text_heads=4,
                 embed_dim=128, supervised_lr=2e-3, clip_lr=2e-4, min_lr=1e-5,
                 supervised_epochs=28, clip_epochs=10, batch_size=32, warmup_steps=20, workers=2,
                 eval_every=100, save_every=100, log_every=10),
}


def check_value(name, v):
    """One value (or tuple element) of Config field `name`, converted, if its bounds allow it."""
    f = CONFIG_FIELDS[name]
    bounds, kind = f.metadata["bounds"], type(f.default[0] if isinstance(f.default, tuple) else f.default)
    if isinstance(bounds[0], str):
        if v not in bounds:
            raise RadclipError(f"must be one of {', '.join(bounds)}; got {v!r}")
        return v
    # `not lo <= v <= hi` also refuses NaN; an int field refuses 2.5, a bool field 2
    if isinstance(v, str) or (kind is not float and float(v) != int(v)) or not bounds[0] <= v <= bounds[1]:
        raise RadclipError(f"must be {'a whole number ' if kind is not float else ''}"
                           f"in [{bounds[0]:g}, {bounds[1]:g}]; got {v!r}")
    return kind(v)


def make_config(preset="paper", **overrides):
    """The preset's Config with the overrides that are not None (CLI flags, a checkpoint's config),
    every field checked: a bad flag, preset or checkpoint fails the same way, before any work."""
    if preset not in PRESETS:
        raise RadclipError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if set(overrides) - set(CONFIG_FIELDS):
        raise RadclipError(f"unknown config field(s) {sorted(set(overrides) - set(CONFIG_FIELDS))}")
    values, checked = dict(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}), {}
    for name, value in values.items():
        default = CONFIG_FIELDS[name].default
        try:
            if isinstance(default, tuple) and len(value) != len(default):
                raise RadclipError(f"takes {len(default)} values; got {len(value)}")
            checked[name] = tuple(check_value(name, v) for v in value) if isinstance(default, tuple) \
                else check_value(name, value)
        except (RadclipError, TypeError, ValueError, OverflowError) as e:  # a hand-edited checkpoint too
            raise RadclipError(f"--{name.replace('_', '-')} {e}") from None
    cfg = Config(**checked)
    if cfg.hu_window[0] >= cfg.hu_window[1]:
        raise RadclipError(f"--hu-window needs LO < HI; got {cfg.hu_window}")
    if cfg.text_width % cfg.text_heads:
        raise RadclipError(f"--text-width {cfg.text_width} is no multiple of --text-heads {cfg.text_heads}")
    if min(cfg.input_shape) < cfg.stem_kernel:
        raise RadclipError(f"--input-shape {cfg.input_shape} is under the {cfg.stem_kernel}-voxel stem")
    return cfg


# -- Utilities --
# Files are written whole or not at all, and checked for writability before the work that
# would fill them; CSVs are read as CT-RATE and Excel write them.
def seed_everything(seed):
    """Python's, numpy's and torch's random generators, seeded alike."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device, amp_dtype):
    """Mixed precision in amp_dtype (resolve_amp's choice), or plain fp32 where it is None."""
    return torch.autocast(device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None)


def finding_auc(labels, scores):
    """ROC AUC of each column of (N, F) labels (1 or -1 present) and scores, NaN where a column lacks a
    class, never 0.5: the macro AUC is np.nanmean of it, over the findings where AUC is defined."""
    labels, scores = np.asarray(labels) != 0, np.asarray(scores, np.float64)  # -1 counts as present
    return np.array([roc_auc_score(y, s) if 0 < y.sum() < len(y) else math.nan
                     for y, s in zip(labels.T, scores.T)])


def check_writable(folder):
    """Create folder if needed and prove that a file can be written there, before any work is done
    that would then be lost (a step trained, a volume converted, a paid request sent)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise RadclipError(f"{folder}: cannot write there ({e.strerror or e}); pick another") from None
    return folder


def atomic_write_bytes(path, data):
    """Write to a temporary file and rename: a crash, a Ctrl-C or a full disk never leaves a
    half-written file, nor the temporary one; the previous file stays as it was."""
    path = check_writable(Path(path).parent) / Path(path).name
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # on a read-only mount even this fails
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RadclipError(f"{path}: cannot write ({e.strerror or e}); any old file is intact") from None
        raise


def sha256_file(path):
    """The file's sha256, as hex: checkpoints record radclip.py's, caches their inputs'."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_csv(path, rows, columns):
    """rows (dicts) as a CSV with these columns, written atomically."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def read_csv(path, required=(), id_col=None):
    """Rows of a CSV as dicts. UTF-8 with or without a BOM (Excel's "CSV UTF-8"); another encoding,
    a missing file or column, or an id_col value that repeats is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise RadclipError(f"{path}: no such file")
    try:
        reader = csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8-sig"), newline=""))
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise RadclipError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        rows = list(reader)
    except UnicodeDecodeError as e:
        raise RadclipError(f"{path}: not UTF-8 (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                           "save it as UTF-8 (Excel: 'CSV UTF-8')") from None
    except csv.Error as e:
        raise RadclipError(f"{path}: not a readable CSV ({e})") from None
    twice = [i for i, n in Counter(r[id_col] for r in rows).items() if n > 1] if id_col else []
    if twice:
        raise RadclipError(f"{path}: {len(twice)} {id_col} values repeat, e.g. {twice[:3]}; one row each")
    return rows


# ---------------------------------------------------------------------------------------
# ---- 2. Silver labels ----
# The paper's first claim: an off-the-shelf LLM, given a report and the 18 finding names, returns
# labels that agree with experts (>96% AUC) for about $3 per 50k reports. Here: the prompt file, a
# raw-HTTP client for any OpenAI-compatible server with a cache that never pays twice, the offline
# rule labeler the LLM is compared against, and the label-quality table that compares them.
# ---------------------------------------------------------------------------------------
def load_prompts(path=PROMPTS_PATH):
    """prompts.txt as {'system', 'user', 'definitions', 'zero_shot', 'report_language', 'candidates'}.
    A line '### name' starts a section; {findings} becomes one '- Name: definition' line per finding,
    in FINDINGS order. report_language and candidates map each finding to its (positive, negative)
    sentence pairs."""
    path, sections, name = Path(path), {}, None
    if not path.is_file():
        raise RadclipError(f"{path}: no such prompts file")
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("### "):
            name = line[4:].strip()
            sections[name] = []
        elif name:  # the text before the first section is a note for whoever edits the file
            sections[name].append(line)
    missing = sorted({"system", "user", "findings", "zero-shot", "report-language"} - set(sections))
    if missing:
        raise RadclipError(f"{path}: missing section(s) {missing}; each starts with a line '### <name>'")

    def table(section, n=3):
        # {first field: [the other fields of each line]}; the first field names a finding (each one at
        # least once, but in the candidates), except in the zero-shot templates
        rows = {}
        for line in filter(str.strip, sections.get(section, [])):
            row = [c.strip() for c in line.split("|")]
            if len(row) != n or not all(row):
                raise RadclipError(f"{path}: '### {section}' lines are {n} non-empty fields split by '|', "
                                   f"not {row}")
            rows.setdefault(row[0], []).append(tuple(row[1:]))
        lacking = [f for f in FINDINGS if f not in rows and section != "candidates"]
        if section != "zero-shot" and (lacking or set(rows) - set(FINDINGS)):
            raise RadclipError(f"{path}: '### {section}' must name exactly the 18 findings "
                               f"(missing: {lacking}, unknown: {sorted(set(rows) - set(FINDINGS))})")
        return rows if section == "zero-shot" else {f: rows.get(f, []) for f in FINDINGS}

    definitions = {f: lines[-1][0] for f, lines in table("findings", 2).items()}
    finding_lines = "\n".join(f"- {f}: {definitions[f]}" for f in FINDINGS)
    system, user = ("\n".join(sections[s]).strip().replace("{findings}", finding_lines)
                    for s in ("system", "user"))
    zero_shot = {name: pairs[-1] for name, pairs in table("zero-shot").items()}
    if "{report}" not in user or "report" in zero_shot or not all(
            "{finding}" in t for pair in zero_shot.values() for t in pair):
        raise RadclipError(f"{path}: '### user' needs {{report}}; each zero-shot template, {{finding}} and "
                           "a name other than 'report' (the report-language pairs' name)")
    return {"system": system, "user": user, "definitions": definitions, "zero_shot": zero_shot,
            "report_language": table("report-language"), "candidates": table("candidates")}


def zero_shot_prompts(prompts, prompt="report"):
    """[(finding index, positive, negative)]: the report-language pairs (prompt='report', several per
    finding), or one template pair per finding. Template names go in as written, capitals and all, as
    in CT-CLIP ("Lung nodule is present."), so the 'ctclip' pair is exactly CT-CLIP's."""
    if prompt == "report":
        return [(FINDINGS.index(f), pos, neg) for f, pairs in prompts["report_language"].items()
                for pos, neg in pairs]
    if prompt not in prompts["zero_shot"]:
        raise RadclipError(f"no zero-shot prompt {prompt!r}; prompts.txt has report, "
                           f"{', '.join(prompts['zero_shot'])}")
    pos, neg = prompts["zero_shot"][prompt]
    return [(i, pos.replace("{finding}", f), neg.replace("{finding}", f)) for i, f in enumerate(FINDINGS)]


# -- Rules: a lexicon per finding, with NegEx/CheXpert-style negation and uncertainty --
# The offline baseline. A report is cut into sentences, and a sentence into phrases at clause words
# ("but", "however") and after each predicate ("... was not detected"), so that a "no" or a "was not
# observed" reaches only its own phrase. CT-RATE reports are translated Turkish: "LAP" is a lymph
# node, "sequelae" is scarring, "natural" means normal.
def near(a, b, chars=60):
    """a and b, in either order, at most `chars` characters apart within one sentence."""
    return rf"(?:{a})[^.;]{{0,{chars}}}?\b(?:{b})|(?:{b})[^.;]{{0,{chars}}}?\b(?:{a})"


ATHEROMA = r"atheroscler\w*|atherom\w*"
CALCIFIC = r"calcif\w*|(?<!pleural )plaques?|" + ATHEROMA
CORONARY = r"coronar\w*|lad|rca|circumflex|anterior descending"
# Arterial wall calcification is CT-RATE's label for the thoracic aorta and its branches: not the
# coronaries (their own finding), the aortic valve or the abdominal aorta.
ARTERY = (r"(?<!abdominal )aort(?!ic valve|opulmonary)\w*|(?<!coronary )(?<!descending )arter(?:y|ies|ial)"
          r"|(?<!coronary )vascular|(?<!coronary )vessels?|carotid|subclavian|brachiocephalic|truncus")
# A sentence about another organ: its "nodule", "effusion" or "density" is not a lung finding.
ELSEWHERE = (r"thyroid|adrenal|liver|hepat|renal|kidney|breast|spleen|splenic|pancrea|abdom|gall|bone"
             r"|vertebra|\bribs?\b|fracture|soft tissue|subcutaneous|skin|muscle|axilla|perinephric"
             r"|mediastin")
LUNG_NODE = r"(?:intrapulmonary|subpleural|perifissural) lymph"  # a lung nodule, not a lymphadenopathy
THICKENED = r"thicken\w*|thickness"
LEXICON = [  # (finding, a mention, unless its sentence matches this)
    ("Medical material", r"catheter\w*|ports?|stent\w*|pacemaker\w*|prosthe\w*|sternotomy|wires?|clips?"
     r"|sutur\w*|tubes?|cannula\w*|grafts?|coils?|defibrillator|icd|cardiac device|drains?|bypass|cabg"
     r"|valve replacement|osteosynthesis|screws?|(?:fixation|metallic) (?:plates?|material)|expander"
     r"|(?:medical|surgical|foreign) material|foreign body", None),
    ("Arterial wall calcification", near(CALCIFIC, ARTERY, 120), None),
    ("Arterial wall calcification", ATHEROMA, CORONARY),  # no vessel named
    ("Cardiomegaly", r"cardiomegal\w*|"
     + near(r"heart|cardiac|cardiothoracic", r"increas\w*|enlarg\w*|larger", 30), None),
    ("Pericardial effusion", near(r"effusion|fluid", r"pericardi\w*") + r"|hydropericard\w*", None),
    ("Coronary artery wall calcification", near(CALCIFIC, CORONARY, 120), None),
    ("Hiatal hernia", r"hiat\w* hernia\w*|hernia\w*(?: \w+){0,4} hiat\w*|gastric herniat\w*", None),
    # CT-RATE's annotators mark any mediastinal or hilar node a report describes, enlarged or not.
    ("Lymphadenopathy", r"lymph\s?nodes?(?! stations?)|lymphadenopath\w*|laps?|adenopath\w*",
     LUNG_NODE + r"|axilla|abdom|inguinal|mesenter|para-?aortic"),
    ("Emphysema", r"emphysem\w*|bullae?|bullous|blebs?", None),
    ("Atelectasis", r"atelecta\w*", None),
    ("Atelectasis", r"collapse", ELSEWHERE),  # a vertebral collapse is not a lung's
    ("Lung nodule", r"(?:micro)?nodules?|nodular (?:lesion|formation)s?|granulomas?|" + LUNG_NODE
     + r" nodes?", ELSEWHERE + "|schmorl"),
    ("Lung opacity", r"opacit\w*|ground[- ]glass(?![- ](?:density |opacity )?nodul)", None),
    # "Density" is an opacity unless the sentence names what it is: scarring or consolidation.
    ("Lung opacity", r"densities|density increases?|increases? in density|increased density",
     ELSEWHERE + r"|sequel|fibro|pleuroparenchymal|band|consolidat"),
    ("Pulmonary fibrotic sequela", r"sequel\w*|fibro\w*|scar\w*|(?:parenchymal|fibrotic) bands?"
     r"|honeycomb\w*|reticula\w*", ELSEWHERE + "|fibrous dysplasia"),
    ("Pleural effusion", r"pleural(?:[,/ ]+(?:or |and )?\w+)?[\s-]+effusion|hydro-?thora\w*"
     r"|hydropn\w*thora\w*|fluid in the pleural", None),  # "pleural or pericardial effusion" too
    ("Pleural effusion", r"effusions?", "pericardi|" + ELSEWHERE),
    ("Mosaic attenuation pattern", r"mosaic", None),
    ("Peribronchial thickening",
     r"peribronchial cuffing|" + near(r"peribronch\w*|bronchial walls?", THICKENED, 40), None),
    ("Consolidation", r"consolidat\w*", None),  # not "pneumonia": a diagnosis, not a CT finding
    ("Bronchiectasis", r"bronchiecta\w*|" + near(r"bronch\w*", r"dilat\w*|ectasi\w*", 20), None),
    ("Interlobular septal thickening",
     r"interlobular septal|" + near(r"\w*septa\w*|interstiti\w*", THICKENED, 40), None),
]
LEXICON = [(f, re.compile(rf"\b(?:{p})\b"), unless and re.compile(unless)) for f, p, unless in LEXICON]

SENTENCE = re.compile(r'(?<!\d)\.(?!\d)|[;:"•\n\u201c\u201d]|(?<=\?)')  # "2.3 mm" goes on; "?" stays
CLAUSE = re.compile(r"\b(?:but|however|although|though|whereas|while|except|apart from|other than"
                    r"|yet)\b")
PREDICATE = re.compile(r"\b(?:is|are|was|were|be|been|has|have)(?:\s+not)?(?:\s+\w+ly)?\s+"
                       r"(?:\w+ed|seen|shown|present|absent|evident|visible|normal|natural|open|preserved)\b")
# CheXpert's order: phrases that look negated but are hedges, then negation, then other hedges.
PRE_NEGATION_UNCERTAINTY = re.compile(
    r"\b(?:cannot|can not|could not|not) (?:be )?(?:excluded?|ruled? out|distinguished|differentiated)"
    r"|\brule out|\br/o\b|\bunclear\b|\bnot clear|\bindistinguishable")
NEGATION_BEFORE = re.compile(  # "no change in the nodule" still has a nodule
    r"\b(?:no|not|without|absence of|negative for|free of|neither|nor|rather than|resolution of)\b"
    r"(?!\s+(?:significant\s+)?(?:change|progression|difference))")
NEGATION_AFTER = re.compile(  # "not observed in the previous examination" means new, not absent
    r"\bnot\s+(?:been\s+)?(?:\w+ly\s+)?(?:observed|detected|seen|noted|identified|visuali[sz]ed|present"
    r"|evident|found|demonstrated|monitored|encountered|shown|appreciated|visible)\b"
    r"(?!\s+(?:in|on) the (?:previous|prior|old))"
    r"|\b(?:absent|ruled out|excluded|resolved|disappeared|regressed|removed)\b")
UNCERTAINTY_BEFORE = re.compile(
    r"\b(?:possibl\w*|probabl\w*|likely|suspicio\w*|suspect\w*|questionabl\w*|question of|may|might"
    r"|could|cannot|suggest\w*|concern\w* for|doubtful|equivocal|vs|versus|differential|presum\w*"
    r"|favou?r\w*)\b")
# After a mention only "X is suspected" or "X ...?" doubts X: in "consolidation, suspicious for
# pneumonia" or "nodule (granuloma?)" the doubt is about the cause.
UNCERTAINTY_AFTER = re.compile(r"\b(?:is|are|was|were) (?:\w+ly )?(?:suspected|possible|probable|likely"
                               r"|questionable|considered|suggested)\b|^[\w\s-]*\?")


def rule_mentions(text):
    """{finding: 1 | 0 | -1} for the findings one report mentions. Each mention is uncertain (-1),
    negated (0) or positive (1); a finding takes its strongest mention as CheXpert does ({0,-1} -> -1,
    {0,1} and {-1,1} -> 1)."""
    votes = {}
    for s in SENTENCE.split(text.lower()):
        cuts = sorted({0, len(s), *(m.start() for m in CLAUSE.finditer(s)),
                       *(m.end() for m in PREDICATE.finditer(s))})
        for finding, pattern, unless in LEXICON:
            if unless and unless.search(s):
                continue
            for m in pattern.finditer(s):
                lo = max(c for c in cuts if c <= m.start())  # the mention's phrase is s[lo:hi]
                hi = min(c for c in cuts if c >= m.end())
                before, after = s[lo:m.start()], s[m.end():hi]
                if PRE_NEGATION_UNCERTAINTY.search(s, lo, hi):
                    vote = -1
                elif NEGATION_BEFORE.search(before) or NEGATION_AFTER.search(after):
                    vote = 0
                else:
                    vote = -1 if UNCERTAINTY_BEFORE.search(before) or UNCERTAINTY_AFTER.search(after) else 1
                votes.setdefault(finding, set()).add(vote)
    return {f: 1 if 1 in v else -1 if -1 in v else 0 for f, v in votes.items()}


def rules_label(text):
    """{finding: 1 | 0 | -1} for one report: rule_mentions', and 0 for a finding never mentioned."""
    return {**dict.fromkeys(FINDINGS, 0), **rule_mentions(text)}


# -- The LLM over raw HTTP --
LABEL_SCHEMA = {"type": "object", "required": FINDINGS, "additionalProperties": False,
                "properties": {f: {"type": "integer", "enum": [-1, 0, 1]} for f in FINDINGS}}
RESPONSE_FORMATS = {  # what is asked of the server; where it refuses one, the next
    "json_schema": {"type": "json_schema", "json_schema": {"name": "ct_findings", "strict": True,
                                                           "schema": LABEL_SCHEMA}},  # OpenAI's nested form
    "json_object": {"type": "json_object", "schema": LABEL_SCHEMA},  # llama.cpp's servers enforce this schema
    "none": None}


class LabelFailed(Exception):
    """A report without a valid answer after --max-retries; it goes to the *.failed.csv."""


def parse_labels(content):
    """The labels in a model's reply, whatever the server promised: the first JSON object in it (bare,
    fenced or amid prose), the 18 names matched case-insensitively, values -1/0/1. Else ValueError."""
    reply, labels = content or "", None
    for brace in (m.start() for m in re.finditer(r"\{", reply)):
        with contextlib.suppress(ValueError):
            labels = json.JSONDecoder().raw_decode(reply, brace)[0]
        if isinstance(labels, dict):
            break
    by_name = {str(k).strip().lower(): v for k, v in labels.items()} if isinstance(labels, dict) else {}
    valid = all(str(v) in ("-1", "0", "1") for v in by_name.values())  # not true, though true == 1
    if not valid or set(by_name) != {f.lower() for f in FINDINGS}:
        raise ValueError(f"not one JSON object of the 18 findings as -1, 0 or 1: {reply[:200]}")
    return {f: int(by_name[f.lower()]) for f in FINDINGS}


class LLMLabeler:
    """An OpenAI-compatible chat endpoint as a labeler: one pooled session shared by the worker
    threads, the retry policy, the response_format fallback and the usage counters."""
    backoff_s = 0.5  # the first retry waits about this long, doubling up to 8 s; tests shrink it

    def __init__(self, base_url, model, prompts, timeout=60.0, max_retries=5,
                 response_format="json_schema", workers=8, max_tokens=300):
        ok = False
        with contextlib.suppress(ValueError):  # a port outside 0-65535 or a broken IPv6 literal raises it
            url = urllib.parse.urlsplit(base_url or "")
            ok = url.scheme in ("http", "https") and url.hostname and (url.port or 0) >= 0
        if not ok or re.search(r"\s", base_url):  # refused before any request
            raise RadclipError(f"--base-url {base_url!r} is not a URL like http://localhost:8000/v1")
        self.url, self.model, self.prompts = base_url.rstrip("/") + "/chat/completions", model, prompts
        self.timeout, self.max_retries, self.max_tokens = timeout, max_retries, max_tokens
        self.response_format, self.params = response_format, {"temperature": 0, "seed": 0}
        self.key = os.environ.get("OPENAI_API_KEY", "")  # from the environment only; written nowhere
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(pool_maxsize=workers))  # a kept-alive connection per worker
        self.session.mount("https://", HTTPAdapter(pool_maxsize=workers))
        self.session.headers.update({"Authorization": f"Bearer {self.key}"} if self.key else {})
        self.counts, self.retries, self.fallbacks = Counter(), Counter(), []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.unreachable, self.refused = 0, Counter()  # connection failures in a row; HTTP errors by status
        self.reached = time.monotonic()  # the start, then the last reply of any kind

    def messages(self, text):
        """The chat messages for one report: prompts.txt's system prompt, and its user prompt around it."""
        return [{"role": "system", "content": self.prompts["system"]},
                {"role": "user", "content": self.prompts["user"].replace("{report}", text)}]

    def cache_key(self, text):
        """sha256 of what decides the answer: model, prompt and report, sampling parameters. Not the
        response_format, so that a fallback mid-run leaves the cache valid, nor the token limit, which
        only decides whether the answer is cut. Never the key."""
        return hashlib.sha256(json.dumps([self.model, self.messages(text), self.params]).encode()).hexdigest()

    def count(self, counter, name, n=1):
        """counter[name] += n, from any worker thread."""
        with self.lock:
            counter[name] += n

    def label(self, text):
        """The 18 labels of one report. LabelFailed after max_retries retries, or at once for a request
        the server refuses for this report alone (HTTP 400: too long, say); RadclipError for a reply
        that no retry can mend (bad key, unknown model, no credit, no server): it ends the whole run."""
        failures, max_tokens = 0, self.max_tokens
        while not self.stop.is_set():
            labels, cause, retry_after = self.request(text, max_tokens)
            if labels is not None:
                return labels
            if cause == "fallback":  # the server refused our response_format: ask again, more plainly
                continue
            failures += 1
            if failures > self.max_retries:
                raise LabelFailed(f"{cause} on all {failures} attempts")
            self.count(self.retries, cause)
            if cause == "truncated reply":  # at temperature 0 the same limit cuts the same answer
                max_tokens *= 2
            elif retry_after is not None and 0 <= retry_after <= 60:
                self.stop.wait(retry_after)
            else:  # jitter: workers do not retry in step
                self.stop.wait(random.uniform(0.5, 1.0) * min(8.0, self.backoff_s * 2 ** (failures - 1)))
        raise LabelFailed("the run stopped before this report was answered")

    def request(self, text, max_tokens):
        """One POST: (labels, None, None), or (None, cause, seconds the server asks us to wait)."""
        fmt = self.response_format
        payload = {"model": self.model, "messages": self.messages(text), **self.params,
                   "max_tokens": max_tokens}
        if RESPONSE_FORMATS[fmt]:
            payload["response_format"] = RESPONSE_FORMATS[fmt]
        self.count(self.counts, "requests")
        try:
            r = self.session.post(self.url, json=payload, timeout=self.timeout)
        except requests.Timeout:
            return None, "timeout", None
        except requests.RequestException as e:
            with self.lock:  # a restarting server fails every request in flight at once: wait 10 s too
                self.unreachable += 1
                gone = self.unreachable >= 8 and time.monotonic() - self.reached > 10
            if not gone:
                return None, "connection error", None
            self.stop.set()  # no worker sends another request
            raise RadclipError(f"{self.url}: no connection in {self.unreachable} tries in a row, for 10 s "
                               f"({type(e).__name__}); is the server running? Answers so far are cached")
        with self.lock:
            self.unreachable, self.reached = 0, time.monotonic()
        if r.status_code != 200:
            return self.http_error(r, fmt)
        try:  # validated here whatever the server promised: llama.cpp may ignore a schema
            body = r.json()
            for name in ("prompt_tokens", "completion_tokens"):
                self.count(self.counts, name, int((body.get("usage") or {}).get(name) or 0))
            if body["choices"][0].get("finish_reason") == "length":
                return None, "truncated reply", None
            labels = parse_labels(body["choices"][0]["message"]["content"])
        except (ValueError, LookupError, TypeError, AttributeError):
            return None, "invalid reply", None
        self.count(self.counts, "answered")
        return labels, None, None

    def http_error(self, r, fmt):
        """A non-200 reply: fall back from a refused response_format, retry, fail the report, or stop."""
        status, error = r.status_code, {}
        with contextlib.suppress(ValueError, LookupError, TypeError, AttributeError):
            error = dict(r.json()["error"])
        message = " ".join(str(error.get("message", r.text)).split())  # one line,
        message = (message.replace(self.key, "***") if self.key else message)[:200]  # masked before the cut
        with self.lock:
            self.refused[status] += 1
            first, n = self.counts["answered"] == 0, self.refused[status]
        # A server may answer a format it cannot do with a bare 500, every time.
        if fmt != "none" and (status == 500 and first and n >= 3
                              or re.search(r"response_format|json_schema|json_object", message, re.I)):
            with self.lock:  # several workers may see it: the first steps down, once
                if self.response_format == fmt:
                    formats = list(RESPONSE_FORMATS)
                    self.response_format = formats[formats.index(fmt) + 1]
                    self.refused.clear()  # the next format gets its own three 500s
                    self.fallbacks.append(f"{fmt} -> {self.response_format} (HTTP {status}: {message})")
            return None, "fallback", None
        # OpenAI says "no credit" with a 429 too, and that one no retry mends.
        if (status in (408, 409, 429) or status >= 500) and error.get("code") != "insufficient_quota":
            ms, s = r.headers.get("retry-after-ms"), r.headers.get("retry-after")  # an HTTP date: backoff
            with contextlib.suppress(TypeError, ValueError):
                return None, f"HTTP {status}", float(ms) / 1000 if ms else float(s)
            return None, f"HTTP {status}", None
        hint = {401: "set OPENAI_API_KEY to a valid key for this server",
                402: "add credit to the account or use another key",  # and a 429 insufficient_quota
                403: f"check that the key may use model {self.model!r}",
                404: f"check --base-url (it ends in /v1) and --model {self.model!r}",
                }.get(402 if status == 429 else status, f"check --model {self.model!r} and --response-format")
        if status in (400, 413, 422):  # this report alone (too long, say), unless the request itself is wrong
            refused = r"unknown|unrecognized|unsupported|not supported|extra (?:fields|inputs)"
            if re.search(refused, message, re.I) and re.search(r"param|argument|field|input", message, re.I):
                hint = "the server does not take a parameter radclip sends; try --response-format none"
            elif first and n >= 3:
                hint = "the first 3 reports were all refused: check --model, --max-tokens and --base-url"
            else:
                raise LabelFailed(f"HTTP {status}: {message}")
        self.stop.set()  # no retry mends this: no worker sends another request
        raise RadclipError(f"{self.url} answered HTTP {status} ({message}); {hint}")


# -- The cached, parallel runner --
def load_label_cache(path):
    """{key: labels} from the JSONL cache. A line torn by a kill -9 is skipped (its report will be
    asked again) and ended with a newline, so that the next append starts on a line of its own."""
    path, cache = Path(path), {}
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    for line in text.splitlines():
        with contextlib.suppress(ValueError, LookupError, TypeError):
            record = json.loads(line)
            cache[record["key"]] = record["labels"]
    if text and not text.endswith("\n"):
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n")
    return cache


def label_reports(ids, texts, labeler, cache_path, workers=8):
    """Label reports through `labeler`, `workers` requests in flight, one request per distinct uncached
    text (CT-RATE's reconstructions of one scan share a report); an empty text is all 0 without one.
    Returns (labels aligned with texts, None for a report that failed; a summary dict)."""
    start, cache, failed = time.time(), load_label_cache(cache_path), {}
    keys = [labeler.cache_key(t) if t else None for t in texts]
    todo = {k: (i, t) for i, t, k in zip(ids, texts, keys) if k and k not in cache}
    summary = {"empty": keys.count(None), "cached": sum(k in cache for k in keys), "sent": len(todo)}
    labeler.stop.clear()
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {pool.submit(labeler.label, text): (key, i) for key, (i, text) in todo.items()}
    try:
        with open(cache_path, "a", encoding="utf-8") as f:
            for future in tqdm(as_completed(futures), total=len(futures), desc="label", unit="report"):
                key, i = futures[future]
                try:
                    cache[key] = future.result()
                except LabelFailed as e:
                    failed[key] = str(e)
                    continue
                f.write(json.dumps({"key": key, "id": i, "labels": cache[key]}) + "\n")
                f.flush()  # in the file now: a kill -9 loses only the requests in flight
    except OSError as e:  # a full disk: what was flushed before stays
        raise RadclipError(f"{cache_path}: cannot write ({e.strerror or e}); the answers before it are "
                           "cached") from None
    finally:  # after a fatal reply or Ctrl-C: no new requests, no more retries
        labeler.stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
    summary["failed"] = {i: failed[k] for i, k in zip(ids, keys) if k in failed}
    summary["seconds"] = time.time() - start
    return [dict.fromkeys(FINDINGS, 0) if k is None else cache.get(k) for k in keys], summary


# -- Label quality: the paper's label-extraction experiment --
def label_quality(pred, gold):
    """Per-finding AUC, F1, precision, recall and support of predicted against reference labels
    ({id: (18,) labels}, as read_labels gives) over their shared ids, and the macro means. Uncertain
    (-1) counts as present, as in all evaluation; AUC ranks it between absent and present. A finding
    without reference positives (or negatives) has no AUC: NaN, left out of the macro mean, never 0.5."""
    ids = match_ids("label --eval", gold=gold, pred=pred)
    gold, pred = (np.stack([labels[i] for i in ids]).astype(int) for labels in (gold, pred))
    present, hit = gold != 0, pred != 0
    tp, fp, fn = (hit & present).sum(0), (hit & ~present).sum(0), (~hit & present).sum(0)
    with np.errstate(invalid="ignore"):  # 0 / 0 is NaN: no F1 where nothing is predicted or present
        metrics = {"auc": finding_auc(present, np.where(pred == -1, 0.5, pred)),
                   "f1": 2 * tp / (2 * tp + fp + fn), "precision": tp / (tp + fp), "recall": tp / (tp + fn)}
    table = {f: {**{name: float(v[k]) for name, v in metrics.items()}, "support": int(tp[k] + fn[k])}
             for k, f in enumerate(FINDINGS)}
    return {"reports": len(ids), "findings": table,
            "macro": {name: float(np.nanmean(v)) for name, v in metrics.items()}}


# ---------------------------------------------------------------------------------------
# ---- 3. Volumes to model input and the dataset, CT-RATE and RAD-ChestCT ----
# Every volume, synthetic or real, takes one path: stored values -> Hounsfield units -> one fixed
# orientation -> the configured spacing -> the HU window -> a fixed shape, cached as float16 .npy
# that training reads with memory mapping. An example is (volume, report, labels), matched by
# VolumeName; RAD-ChestCT, the external test set, is read into the same cache the same way.
# ---------------------------------------------------------------------------------------
CTRATE_FILES = {  # CT-RATE names its CSVs inconsistently ("valid" here, "validation" there)
    "train": ("train_reports.csv", "train_predicted_labels.csv", "train_metadata.csv"),
    "valid": ("validation_reports.csv", "valid_predicted_labels.csv", "validation_metadata.csv"),
}
METADATA_USED = ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept")  # what prep reads


def ctrate_csv(data_dir, split, kind):
    """Path of a split's 'reports', 'labels' or 'metadata' CSV in CT-RATE's layout."""
    folder = {"reports": "radiology_text_reports", "labels": "multi_abnormality_labels",
              "metadata": "metadata"}
    return Path(data_dir) / "dataset" / folder[kind] / CTRATE_FILES[split][list(folder).index(kind)]


def volume_name(path):
    """A volume's VolumeName (name.nii.gz) from its path."""
    return Path(path).name.removesuffix(".gz").removesuffix(".nii") + ".nii.gz"


def volume_meta(meta, name):
    """(spacing_mm of the stored axes, slope, intercept) from a metadata row, or a RadclipError naming it."""
    with contextlib.suppress(ValueError, TypeError):  # TypeError: no row
        xy = [float(v) for v in str(meta["XYSpacing"]).strip("[]() ").replace(",", " ").split()]  # not sliced
        spacing = [xy[0], xy[-1], float(meta["ZSpacing"])] if len(xy) in (1, 2) else [0]
        slope, intercept = float(meta["RescaleSlope"]), float(meta["RescaleIntercept"])
        if all(0.05 <= s <= 30 for s in spacing) and slope != 0 and math.isfinite(slope + intercept):
            return np.array(spacing), slope, intercept
    found = ", ".join(f"{k}={meta[k]!r}" for k in METADATA_USED[1:]) if meta else "not in the metadata CSV"
    raise RadclipError(f"{name}: {found}: expected 1 or 2 and 1 spacings in [0.05, 30] mm, a nonzero slope "
                       "and a finite intercept")


def to_hu(stored, slope, intercept, mode, name="", out=None):
    """Hounsfield units from stored values. The original CT-RATE release stores raw values (HU =
    slope * raw + intercept, from the metadata CSV), the corrected release HU; CT-CLIP applies the
    CSV scaling to both. out: where int16 HU may be written (load_hu passes the array it has read)."""
    if mode == "auto":  # air (outside the body, in the lungs) reads about -1000 HU in the right version
        sample = stored[::3, ::3, ::3]
        air = [np.mean((x > -1100) & (x < -900)) for x in (sample, sample * slope + intercept)]
        if max(air) < 0.01:
            raise RadclipError(f"{name}: no voxel reads like air (-1000 HU) with or without the "
                               "metadata's Rescale values; pass --hu raw or --hu hu")
        mode = "raw" if air[1] > air[0] else "hu"
    if mode == "hu":
        return stored
    if stored.dtype == np.int16 and slope == 1 and float(intercept).is_integer() and \
            -32768 <= int(stored.min()) + intercept and int(stored.max()) + intercept <= 32767:
        return np.add(stored, np.int16(intercept), out=out)  # CT-RATE's case: exact, no float copy
    return stored * np.float32(slope) + np.float32(intercept)


def load_hu(path, meta, hu_mode="auto"):
    """A NIfTI volume as (hu (D, H, W), spacing_zyx): D runs superior->inferior, H anterior->posterior,
    W the patient's right->left (the radiological view). Spacing comes from the metadata CSV, like
    the authors' and CT-CLIP's code; orientation from the NIfTI affine, which CT-CLIP ignores."""
    name = volume_name(path)
    spacing, slope, intercept = volume_meta(meta, name)
    img = nib.load(str(path))
    if len(img.shape) != 3 or min(img.shape) < 8:
        raise RadclipError(f"{name}: has shape {img.shape}; expected one 3-D volume, 8 voxels a side or more")
    stored = np.asanyarray(img.dataobj)  # int16 as stored: CT-RATE's header scaling is identity
    ornt = nib.orientations.io_orientation(img.affine)  # stored axis -> (RAS axis, flip)
    hu = nib.orientations.apply_orientation(to_hu(stored, slope, intercept, hu_mode, name, stored), ornt)
    hu = hu.transpose(2, 1, 0)[::-1, ::-1, ::-1]  # RAS (x, y, z) -> (D, H, W): a view, not a copy
    return hu, tuple(spacing[np.argsort(ornt[:, 0])][::-1])


def centre_slices(size, target, shift=0):
    """(source, destination) slices that centre an axis of length size in one of length target, moved by
    shift voxels: a crop where it is longer, a pad where it is shorter."""
    offset = int((target - size) / 2) + shift  # toward zero: a crop and a pad drop the same odd voxel
    source = slice(max(0, -offset), min(size, target - offset))
    return source, slice(source.start + offset, source.stop + offset)


def preprocess(hu, spacing_zyx, cfg):
    """(D, H, W) HU at any spacing and dtype (a strided view will do) -> float16 at cfg.spacing_mm, windowed
    to [-1, 1], cropped or air-padded about the centre to cfg.input_shape: F.interpolate(trilinear,
    align_corners=False)'s samples, computed one axis at a time from only the voxels the crop keeps."""
    taps, dst = [], []
    for n, s, t, m in zip(hu.shape, spacing_zyx, cfg.spacing_mm[::-1], cfg.input_shape):
        size = max(1, round(n * s / t))  # the resampled length of this axis
        keep, put = centre_slices(size, m)
        src = np.maximum((np.arange(keep.start, keep.stop) + 0.5) * (n / size) - 0.5, 0)  # PyTorch's
        i0 = np.floor(src).astype(np.intp)
        taps.append((i0, np.minimum(i0 + 1, n - 1), (src - i0).astype(np.float32)))
        dst.append(put)
    x = hu[tuple(slice(i0[0], i1[-1] + 1) for i0, i1, _ in taps)]  # a view of the voxels they read
    for axis, (i0, i1, w) in enumerate(taps):  # linear along each axis in turn: trilinear
        x = np.moveaxis(x, axis, 0)
        w = w.reshape(-1, 1, 1)
        x = np.moveaxis(x[i0 - i0[0]].astype(np.float32) * (1 - w) + x[i1 - i0[0]] * w, 0, axis)
    lo, hi = cfg.hu_window  # at [-1000, 200] the window is GreenRFM's (hu + 400) / 600
    out = np.full(cfg.input_shape, -1.0, np.float32)
    out[tuple(dst)] = (np.clip(x, lo, hi) - lo) / (hi - lo) * 2 - 1
    return out.astype(np.float16)


def cache_dir(data_dir, cfg, root=None):
    """One cache per preprocessing setting, so presets never read each other's arrays. It lives in
    root (--cache-dir) if given, else in data_dir/cache: datasets often sit on read-only mounts."""
    (sx, sy, sz), (d, h, w), (lo, hi) = cfg.spacing_mm, cfg.input_shape, cfg.hu_window
    return Path(root or Path(data_dir) / "cache") / f"{sx:g}x{sy:g}x{sz:g}mm_{d}x{h}x{w}_hu{lo:g}to{hi:g}"


def worker_signals():
    """A pool worker's initializer: Ctrl-C goes to the parent, which ends the pool with SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _prep_one(job):
    path, meta, out, cfg, hu_mode = job  # meta: CT-RATE's metadata row; for a .npz, its spacing in mm
    try:
        hu, spacing = load_radchestct(path, meta) if path.suffix == ".npz" else load_hu(path, meta, hu_mode)
        if hu.dtype.kind == "f" and not np.isfinite(hu).all():  # the window would hide an infinity
            raise RadclipError("holds NaN or infinite voxels")
        x = preprocess(hu, spacing, cfg)
        buf = io.BytesIO()
        np.save(buf, x)
        atomic_write_bytes(out, buf.getvalue())
    except Exception as e:  # a corrupt file, bad metadata, a full disk: this volume's failure only
        message = str(e) if isinstance(e, RadclipError) else f"{type(e).__name__}: {e}"
        return message if message.startswith(path.name) else f"{path.name}: {message}"


def prep_volumes(sources, out_dir, cfg, workers, hu_mode=None):
    """{VolumeName: (path, meta)} into out_dir by a pool of processes, those done listed in index.csv.
    A rerun skips every .npy: each is written atomically, so it is whole or absent."""
    outs = {n: out_dir / (n.removesuffix(".nii.gz") + ".npy") for n in sources}
    todo = [(*sources[n], outs[n], cfg, hu_mode) for n in sources if not outs[n].exists()]
    with multiprocessing.get_context("fork").Pool(max(1, workers), worker_signals) as pool:
        results = tqdm(pool.imap_unordered(_prep_one, todo), f"prep {out_dir.name}", len(todo), unit="vol",
                       disable=not todo)
        failures = [err for err in results if err]
    done = [n for n in sources if outs[n].exists()]
    write_csv(out_dir / "index.csv", [{"VolumeName": n} for n in done], ["VolumeName"])
    return done, len(sources) - len(todo), failures


def prep_split(data_dir, split, cfg, hu_mode="auto", workers=2, cache_root=None):
    """Preprocess one CT-RATE split into cache_dir; returns (n_cached, n_skipped, failures)."""
    root = Path(data_dir) / "dataset" / split
    if not root.is_dir():
        raise RadclipError(f"{root}: not found; --data must hold CT-RATE's dataset/{split}/ folder")
    meta = {r["VolumeName"]: r for r in read_csv(ctrate_csv(data_dir, split, "metadata"), METADATA_USED,
                                                 "VolumeName")}
    sources = {volume_name(p): (p, meta.get(volume_name(p))) for p in sorted(root.rglob("*.nii.gz"))}
    out_dir = check_writable(cache_dir(data_dir, cfg, cache_root) / split)
    done, n_skipped, failures = prep_volumes(sources, out_dir, cfg, workers, hu_mode)
    return len(done), n_skipped, failures


# -- Reports, labels and the dataset --
# The impression comes first: it names what is present in a few words, so when a long report is
# cut at the text tower's context the cut falls in the findings' detail, not the summary. The
# labeler reads the same text as the tower, so its labels say what the tower was shown.
REPORT_TEXT = ("Impressions_EN", "Findings_EN")


def report_text(row, columns=REPORT_TEXT):
    """The report as the towers and the labeler read it; CT-RATE writes empty sections as 'Not given.'."""
    parts = [(row.get(c) or "").strip() for c in columns]
    return " ".join(p for p in parts if p and p != "Not given.")


def read_reports(path, id_col="VolumeName", text_cols=REPORT_TEXT):
    """{id: report_text} from a reports CSV."""
    return {r[id_col]: report_text(r, text_cols) for r in read_csv(path, (id_col, *text_cols), id_col)}


def read_labels(path, id_col="VolumeName", reference=False):
    """{id: (18,) int8 array} from a CT-RATE-style labels CSV: -1 (uncertain), 0 or 1, written as
    integers or as floats ("1.0", as pandas writes them); only 0 and 1 in a reference file."""
    allowed = {"0": 0, "1": 1, "0.0": 0, "1.0": 1} | ({} if reference else {"-1": -1, "-1.0": -1})
    labels = {}
    for line, r in enumerate(read_csv(path, (id_col, *FINDINGS), id_col), start=2):
        if bad := [f for f in FINDINGS if (r[f] or "").strip() not in allowed]:
            raise RadclipError(f"{path}: line {line}, column {bad[0]!r}: {r[bad[0]]!r} is not one of "
                               f"{'0, 1' if reference else '-1, 0, 1'}")
        labels[r[id_col]] = np.array([allowed[r[f].strip()] for f in FINDINGS], np.int8)
    return labels


def match_ids(name, **sources):
    """IDs in every source, in the first one's order; those left out are counted on stderr, never silently."""
    common = set.intersection(*(set(ids) for ids in sources.values()))
    for src, ids in sources.items():
        if lost := sorted(set(ids) - common):
            print(f"radclip: warning: {name}: {len(lost)} of {len(ids)} IDs in {src} are missing "
                  f"elsewhere and left out (e.g. {', '.join(lost[:3])})", file=sys.stderr)
    if not common:
        raise RadclipError(f"{name}: no VolumeName is shared by {', '.join(sources)}")
    return [i for i in next(iter(sources.values())) if i in common]


class CTRateDataset(torch.utils.data.Dataset):
    """(volume (1, D, H, W), token ids (L,), labels (18,)) for one split, from prep's cache; the item
    (index, aug_seed) is augmented by that seed. With reports_csv, a text-only dataset from that CSV
    alone (labels: labels_csv, or the same file's 18 columns) whose volume is a placeholder zero."""

    def __init__(self, data_dir, split, cfg, tokenizer=None, labels_csv=None, augment=False, limit=0,
                 cache_root=None, reports_csv=None, id_col="VolumeName", text_cols=REPORT_TEXT):
        self.cfg, self.tokenizer, self.augment = cfg, tokenizer, augment
        self.volumes = reports_csv is None
        self.has_reports = reports_csv is not None or split in CTRATE_FILES  # RAD-ChestCT has none
        sources = {}
        if self.volumes:
            self.cache = cache_dir(data_dir, cfg, cache_root) / split
            if not (self.cache / "index.csv").is_file():
                flag = f" --cache-dir {cache_root}" if cache_root else ""
                raise RadclipError(f"{self.cache}: no preprocessed volumes; run `python radclip.py prep "
                                   f"--data {data_dir}{flag} --split {split}` first, with the same flags")
            sources["volumes"] = [r["VolumeName"] for r in read_csv(self.cache / "index.csv")]
            labels_csv = labels_csv or (ctrate_csv(data_dir, split, "labels") if self.has_reports
                                        else self.cache / "labels.csv")
            reports_csv = ctrate_csv(data_dir, split, "reports") if self.has_reports else None
        if reports_csv:
            sources["reports"] = read_reports(reports_csv, id_col, text_cols)
        sources["labels"] = read_labels(labels_csv or reports_csv, id_col)
        self.names = match_ids(f"{split} split", **sources)[:limit or None]
        self.reports = [sources["reports"][n] if reports_csv else "" for n in self.names]
        self.labels = torch.tensor(np.stack([sources["labels"][n] for n in self.names]))

    def __len__(self):
        return len(self.names)

    def __getitem__(self, item):
        i, aug_seed = item if isinstance(item, tuple) else (item, None)
        gen = torch.Generator().manual_seed(aug_seed) if self.augment and aug_seed is not None else None
        text = self.reports[i] if gen is None else shuffle_sentences(self.reports[i], gen)
        ids = self.tokenizer.encode(text, self.cfg.context_len) if self.tokenizer \
            else torch.zeros(0, dtype=torch.long)
        if not self.volumes:
            return torch.zeros(1), ids, self.labels[i]
        npy = self.cache / (self.names[i].removesuffix(".nii.gz") + ".npy")
        vol = torch.from_numpy(np.load(npy, mmap_mode="r").astype(np.float32))[None]
        return vol if gen is None else augment_volume(vol, gen), ids, self.labels[i]


def shuffle_sentences(text, gen):
    """The report's sentences in a random order: each states its own findings, so the labels stay true,
    and the text tower learns what is said of a finding, not where it sits (the Impression names it)."""
    sentences = re.split(r"(?<=[a-z)][.?])\s+(?=[A-Z])", text)  # not after "1." or before "5 mm"
    return " ".join(sentences[j] for j in torch.randperm(len(sentences), generator=gen))


def augment_volume(vol, gen, max_shift=0.08):
    """A random shift (a crop of an air-padded volume) of up to 8% per axis. No flips: left and
    right are not symmetric in the chest (heart, aorta), so a mirrored chest is not a chest."""
    out, src, dst = torch.full_like(vol, -1.0), [slice(None)], [slice(None)]
    for n in vol.shape[1:]:
        shift = int(torch.randint(-round(n * max_shift), round(n * max_shift) + 1, (1,), generator=gen))
        keep, put = centre_slices(n, n, shift)
        src, dst = src + [keep], dst + [put]
    out[tuple(dst)] = vol[tuple(src)]
    return out


# -- RAD-ChestCT, the external test set --
# The paper's fourth number, zero-shot AUC 77.3%, is on Duke's RAD-ChestCT (Draelos et al., Zenodo
# record 6406114): scans as <NoteAcc_DEID>.npz and labels as 84 abnormalities x 52 locations, which
# prep collapses over locations and maps to the 18 findings; eval scores the 16-class protocol.
RADCHESTCT_SPACING_MM = 0.8  # the release's isotropic voxel size, which its .npz files do not store
RADCHESTCT_SPLITS = {"trn": "imgtrain", "val": "imgvalid", "tst": "imgtest"}  # ID prefix: labels file
# RadFinder's "standard" mapping (lmb-freiburg/radfinder), also BrgSA's. CT-CLIP, whose protocol the
# published numbers follow, never released its own (users asked in its issues #24 and #29).
RADCHESTCT_MAPPING = {
    "Medical material": ("catheter_or_port", "tracheal_tube", "chest_tube", "breast_implant",
                         "pacemaker_or_defib", "stent", "clip", "staple", "gi_tube", "hardware", "suture"),
    "Arterial wall calcification": ("calcification",), "Cardiomegaly": ("cardiomegaly",),
    "Pericardial effusion": ("pericardial_effusion",),
    "Coronary artery wall calcification": ("calcification",),
    "Hiatal hernia": ("hernia",), "Lymphadenopathy": ("lymphadenopathy",), "Emphysema": ("emphysema",),
    "Atelectasis": ("atelectasis",), "Lung nodule": ("nodule", "nodulegr1cm"), "Lung opacity": ("opacity",),
    "Pulmonary fibrotic sequela": ("scarring",), "Pleural effusion": ("pleural_effusion",),
    "Mosaic attenuation pattern": (),  # no abnormality: 0 in every scan, so its AUC is undefined
    "Peribronchial thickening": ("bronchial_wall_thickening",), "Consolidation": ("consolidation",),
    "Bronchiectasis": ("bronchiectasis",), "Interlobular septal thickening": ("septal_thickening",),
}
# The 16-class protocol behind the published numbers (CT-CLIP's evaluate_external, RadFinder's
# radchestct_standard, BrgSA). HLIP instead maps fibrosis, not scarring, and drops medical material
# and lymphadenopathy: 14 classes, not comparable.
EXTERNAL_DROPPED = ("Coronary artery wall calcification", "Mosaic attenuation pattern")
EXTERNAL_CLASSES = ["Calcification" if f == "Arterial wall calcification" else f
                    for f in FINDINGS if f not in EXTERNAL_DROPPED]
EXTERNAL_PROTOCOL = ("RAD-ChestCT 16-class protocol (CT-CLIP, RadFinder, BrgSA): coronary artery wall "
                     "calcification and mosaic attenuation dropped; Calcification = max(arterial, coronary)")
RADCHESTCT_POSITIVES = dict(zip(EXTERNAL_CLASSES, (  # published counts, all 3,630 scans, this mapping
    1155, 2562, 394, 563, 425, 598, 992, 1082, 2874, 1955, 786, 727, 308, 505, 575, 252)))


def external_16(labels, scores):
    """(N, 18) labels and scores -> (N, 16) each, in EXTERNAL_CLASSES order. Calcification is either
    calcification: the larger of the two scores, and of the two labels (which the mapping makes equal)."""
    arterial, coronary = FINDINGS.index("Arterial wall calcification"), FINDINGS.index(EXTERNAL_DROPPED[0])
    keep, out = [FINDINGS.index(f) for f in FINDINGS if f not in EXTERNAL_DROPPED], []
    for x in (labels, scores):
        x = np.array(x, dtype=np.float64)
        x[:, arterial] = x[:, [arterial, coronary]].max(1)
        out.append(x[:, keep])
    return out


def read_radchestct_labels(path):
    """({NoteAcc_DEID: (18,) int8}, unmapped abnormalities) from one labels CSV of `abnormality*location`
    columns: a finding is present where any location of any of its abnormalities is 1 (names match
    exactly: `nodule` is not `nodulegr1cm`). Read row by row: as dicts, 4,368 columns take gigabytes."""
    mapped = {a for sources in RADCHESTCT_MAPPING.values() for a in sources}
    labels = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is not part of the name
            rows = csv.reader(f)
            header = next(rows, [])
            abnormalities = [column.partition("*")[0] for column in header]
            if missing := [a for a in ("NoteAcc_DEID", *sorted(mapped)) if a not in abnormalities]:
                raise RadclipError(f"{path}: no column for {missing[:3]}; is this a RAD-ChestCT labels file?")
            id_at = abnormalities.index("NoteAcc_DEID")
            del abnormalities[id_at]
            columns_of = np.array([np.isin(abnormalities, RADCHESTCT_MAPPING[f]) for f in FINDINGS])
            for line, row in enumerate(rows, 2):
                cells = np.array(row[:id_at] + row[id_at + 1:])
                if len(row) != len(header) or not np.isin(cells, ("0", "1", "0.0", "1.0")).all():
                    raise RadclipError(f"{path}: line {line}: expected NoteAcc_DEID and {len(abnormalities)} "
                                       "labels, each 0 or 1")
                if row[id_at] in labels:
                    raise RadclipError(f"{path}: NoteAcc_DEID {row[id_at]} has two rows")
                labels[row[id_at]] = (columns_of & np.isin(cells, ("1", "1.0"))).any(1).astype(np.int8)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise RadclipError(f"{path}: not a readable UTF-8 CSV ({getattr(e, 'strerror', None) or e}); --data "
                           "must hold RAD-ChestCT's labels CSVs and .npz files") from None
    return labels, sorted(set(abnormalities) - mapped)


def load_radchestct(path, spacing_mm=RADCHESTCT_SPACING_MM):
    """A RAD-ChestCT volume as (hu (D, H, W) int16, spacing_zyx). The file's (z, y, x) runs
    superior->inferior, anterior->posterior, patient right->left: load_hu's (D, H, W) already, so
    nothing is flipped. The file stores no spacing: RADCHESTCT_SPACING_MM in the release."""
    path = Path(path)
    with np.load(path) as npz:  # allow_pickle=False: a file cannot run code
        if "ct" not in npz.files:  # GreenRFM's loader reads its own re-export instead (arr_0 = HU / 1000)
            raise RadclipError(f"{path.name}: no array 'ct' (found {npz.files}); use the Zenodo release")
        hu = npz["ct"]
    if hu.ndim != 3:
        raise RadclipError(f"{path.name}: 'ct' has shape {hu.shape}; expected one (z, y, x) volume")
    return hu, (float(spacing_mm),) * 3


def prep_radchestct(data_dir, split, cfg, npz_spacing_mm=RADCHESTCT_SPACING_MM, workers=2, cache_root=None):
    """Preprocess a RAD-ChestCT split (trn, val, tst, or all: the 3,630 scans peers score) as prep_split
    does, its labels as the 18 findings in labels.csv; print the positives beside the published ones."""
    data_dir, prefixes = Path(data_dir), list(RADCHESTCT_SPLITS) if split == "all" else [split]
    out_dir = check_writable(cache_dir(data_dir, cfg, cache_root) / split)
    marker = out_dir / "npz_spacing_mm.txt"  # written before any volume: the spacing the cache holds
    if marker.is_file() and (done_at := marker.read_text().strip()) != f"{npz_spacing_mm:g}":
        raise RadclipError(f"{out_dir}: prepped at --npz-spacing-mm {done_at}; pass that or delete it")
    atomic_write_bytes(marker, f"{npz_spacing_mm:g}".encode())
    files = [f"{RADCHESTCT_SPLITS[prefix]}_Abnormality_and_Location_Labels.csv" for prefix in prefixes]
    read = [read_radchestct_labels(next(data_dir.rglob(name), data_dir / name)) for name in files]
    labels = {i: y for file_labels, _ in read for i, y in file_labels.items()}
    unmapped = sorted({a for _, file_unmapped in read for a in file_unmapped})
    volumes = {p.stem: p for p in data_dir.rglob("*.npz") if p.stem.startswith(tuple(prefixes))}
    names = match_ids(f"RAD-ChestCT {split}", labels=labels, volumes=volumes)  # warns of what it drops
    sources = {n: (volumes[n], npz_spacing_mm) for n in names}
    done, n_skipped, failures = prep_volumes(sources, out_dir, cfg, workers)
    write_csv(out_dir / "labels.csv", [{"VolumeName": n, **dict(zip(FINDINGS, labels[n]))} for n in done],
              ["VolumeName", *FINDINGS])
    print(f"prep {split}: {len(unmapped)} abnormalities that no finding maps to are not used: {unmapped[:6]}")
    y = np.array([labels[n] for n in done]).reshape(-1, len(FINDINGS))
    print(f"{'positives in the ' + str(len(done)) + ' scans':<44}{'here':>6}{'published, all 3,630':>22}")
    for name, n in zip(EXTERNAL_CLASSES, external_16(y, y)[0].sum(0)):
        print(f"  {name:<42}{int(n):>6}{RADCHESTCT_POSITIVES[name]:>22,}")
    return len(done), n_skipped, failures


# ---------------------------------------------------------------------------------------
# ---- 4. The two towers ----
# The image tower is torchvision's r3d_18 (the paper's 3D ResNet-18) written out in plain
# PyTorch, with the authors' 1-channel strided stem; parameter names match torchvision's, so all
# its weights but the stem's and fc's map one to one. The text tower is a word-level tokenizer and
# a small pre-LN Transformer (the paper: CXR-BERT and its WordPiece vocabulary).
# ---------------------------------------------------------------------------------------
class BasicBlock3d(nn.Module):
    """torchvision's BasicBlock in 3D: two 3x3x3 convolutions and a shortcut (1x1x1 when it strides)."""

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
        for layer in layers:  # each block starts as identity: its last BN at 0 (torchvision's is at 1)
            for block in layer:
                nn.init.zeros_(block.conv2[1].weight)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return x.mean(dim=(2, 3, 4))


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
        """The vocabulary of the words that occur at least min_freq times in texts, sorted."""
        counts = Counter(w for t in texts for w in words(t))
        return cls(cls.specials + sorted(w for w, c in counts.items() if c >= min_freq))

    def encode(self, text, context_len):
        """(context_len,) int64 ids, 0-padded; a longer report loses its end (see REPORT_TEXT)."""
        ids = [self.index.get(w, 1) for w in words(text)][:context_len]
        return torch.tensor(ids + [0] * (context_len - len(ids)), dtype=torch.long)


class TextEncoder(nn.Module):
    """(B, L) token ids -> (B, width): the mean of the final states over the real tokens."""

    def __init__(self, vocab_size, context_len, width, layers, heads, dropout=0.1):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_len, width) * 0.01)
        self.blocks = nn.ModuleList(  # pre-LN: x + attention(LN(x)), then x + MLP(LN(x))
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, "gelu", batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.out_dim = width

    def forward(self, ids):
        mask = ids != 0
        mask[:, 0] = True  # an empty report still has one position to attend to
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, src_key_padding_mask=~mask)
        x, m = self.ln_f(x), mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


# Each tower and its 18-way head by parameter name: what a supervised stage trains and --init-* copy
TOWER_PREFIXES = {"image": ("visual.", "visual_cls."), "text": ("text.", "text_cls.")}


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
        self.logit_scale_max = math.log(cfg.logit_scale_max)

    def scale(self):  # CLIP's log inverse temperature, capped as CLIP caps it
        return self.logit_scale.clamp(max=self.logit_scale_max)

    def encode_image(self, x):  # (B, 1, D, H, W) -> (B, E)
        return self.visual_proj(self.visual(x))

    def encode_text(self, ids):  # (B, L) -> (B, E)
        return self.text_proj(self.text(ids))

    def classify(self, modality, vol, ids):  # (B, 18) finding logits of one tower's head
        return self.visual_cls(self.visual(vol)) if modality == "image" else self.text_cls(self.text(ids))


# ---------------------------------------------------------------------------------------
# ---- 5. Training: supervised pre-training, then CLIP ----
# Stage 1 trains a tower to predict the 18 silver labels (BCE). Stage 2 is vanilla CLIP:
# symmetric InfoNCE between L2-normalised volume and report embeddings with a learnable
# temperature. One loop serves both; only the loss differs.
# ---------------------------------------------------------------------------------------
def masked_bce(logits, labels, policy="ignore", pos_weight=None):
    """Mean BCE over the labels that count. labels hold -1 (uncertain), 0, 1; policy maps -1 to
    'ignore' (masked out), 'zero' or 'one'. GreenRFM feeds -1 to BCE as a target, which
    rewards negative probabilities; we never do."""
    labels = labels.float()
    mask = (labels >= 0).float() if policy == "ignore" else torch.ones_like(labels)
    target = labels.abs() if policy == "one" else labels.clamp(min=0)
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none", pos_weight=pos_weight)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def clip_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE. With unit vectors u_i, v_j and s = exp(logit_scale):
    L = (CE(s * U V^T, I) + CE(s * V U^T, I)) / 2, where pair i is the positive of row i."""
    u, v = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.exp() * u @ v.T
    target = torch.arange(len(u), device=u.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def stage_loss(model, batch, cfg, stage, modality, pos_weight=None):
    """The loss of one micro-batch: masked BCE (supervised) or InfoNCE over the global batch (CLIP)."""
    vol, ids, labels = batch
    if stage == "supervised":
        return masked_bce(model.classify(modality, vol, ids), labels, cfg.uncertain, pos_weight)
    image_features, text_features = model.visual(vol), model.text(ids)
    loss = clip_loss(gather_features(model.visual_proj(image_features)),
                     gather_features(model.text_proj(text_features)), model.scale())
    if cfg.aux_cls:  # the GreenRFM-style ablation; vanilla CLIP (the paper) has aux_cls = 0
        loss = loss + cfg.aux_cls / 2 * (masked_bce(model.visual_cls(image_features), labels, cfg.uncertain)
                                         + masked_bce(model.text_cls(text_features), labels, cfg.uncertain))
    return loss


def get_lr(step, max_steps, base_lr, cfg):
    """The learning rate of step (from 0): linear warmup, then cosine decay to cfg.min_lr."""
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg, stage, out, data_dir, modality="image", labels_csv=None, init_image=None,
          init_text=None, restart=False, device="auto", stop_after=None, cache_root=None, reports=None):
    """Train one stage into `out` -> the final validation metrics. `out` holding this run resumes it
    (another run is an error unless restart); Ctrl-C or SIGTERM saves the step and raises
    KeyboardInterrupt; stop_after N ends after step N, keeping the schedule. The supervised text
    stage reads no volumes: data_dir's report and label CSVs, or reports = dict(train=CSV, valid=CSV,
    valid_labels=None, id_col=..., text_cols=...) alone (labels: labels_csv, or each CSV's 18 columns)."""
    rank, world, device = setup_distributed(device)
    out = Path(out)
    if out.is_dir():
        raise RadclipError(f"--out {out} is a folder; name the checkpoint file, e.g. {out / 'model.pt'}")
    check_writable(out.parent)
    text_only = (stage, modality) == ("supervised", "text")
    if not text_only and reports:
        raise RadclipError("reports CSVs without volumes train only --stage supervised --modality text")
    if text_only and not reports:
        reports = {split: ctrate_csv(data_dir, split, "reports") for split in ("train", "valid")}
        labels_csv, reports["valid_labels"] = labels_csv or ctrate_csv(data_dir, "train", "labels"), \
            ctrate_csv(data_dir, "valid", "labels")
    reports = reports or {}
    files = dict(labels=labels_csv, init_image=init_image, init_text=init_text, reports=reports.get("train"))
    identity = {"stage": stage, "modality": modality if stage == "supervised" else "both",  # this run's own
                **{k: str(v or "") for k, v in files.items()}}
    ckpt = load_checkpoint(out) if out.is_file() and not restart else None
    if ckpt:  # the config (but workers, which change no number), stage, tower, labels, initialisation
        ours = {**dataclasses.asdict(cfg), **identity}
        theirs = {**dataclasses.asdict(checkpoint_config(ckpt)), **ckpt.get("run", {})}
        if differ := differences(ours, theirs, [k for k in ours if k != "workers"]):
            raise RadclipError(f"{out}: holds another run ({differ}); rerun with its flags to resume it, "
                               "pass --restart to train afresh over it, or choose another --out")
        if ckpt["step"] >= min(ckpt["max_steps"], stop_after or math.inf):
            print0(f"{out}: already trained ({ckpt['step']} of {ckpt['max_steps']} steps); --restart trains "
                   "it again")
            return ckpt["metrics"]
        print0(f"{out}: resuming at step {ckpt['step']} of {ckpt['max_steps']} (same config)")
    run = SimpleNamespace(cfg=cfg, stage=stage, modality=modality, out=out, rank=rank, world=world,
                          device=device, identity=identity, text_only=text_only)
    build_run(run, ckpt, data_dir, labels_csv, reports, cache_root)
    return train_loop(run, stop_after)


def build_run(run, ckpt, data_dir, labels_csv, reports, cache_root):
    """Give run its datasets, tokenizer, model, optimizer and step count, fresh or as ckpt left them."""
    cfg, device = run.cfg, run.device
    inits = {m: tower_weights(run.identity[f"init_{m}"], m, cfg) for m in ("image", "text")
             if run.identity[f"init_{m}"] and not ckpt}  # a wrong file fails now, not after the data
    run.amp_dtype = resolve_amp(cfg.amp, device)
    torch.backends.cudnn.benchmark = True  # fixed input shape: let cuDNN pick its fastest kernels
    run.channels_last = not run.text_only and resolve_channels_last(cfg.channels_last, cfg, device,
                                                                    run.amp_dtype)
    seed_everything(cfg.seed)  # after the channels-last timing, which draws random numbers
    text = {k: reports[k] for k in ("id_col", "text_cols") if k in reports}
    run.train_ds = CTRateDataset(data_dir, "train", cfg, None, labels_csv, cfg.augment, cfg.max_train_volumes,
                                 cache_root, reports.get("train"), **text)
    run.valid_ds = CTRateDataset(data_dir, "valid", cfg, None, reports.get("valid_labels"),  # the gold labels
                                 cache_root=cache_root, reports_csv=reports.get("valid"), **text)
    if ckpt or "text" in inits:  # the vocabulary its weights were trained with
        run.tokenizer = Tokenizer((ckpt or load_checkpoint(run.identity["init_text"]))["vocab"])
    else:  # deterministic: every run on the same training reports builds the same vocabulary
        run.tokenizer = Tokenizer.build(run.train_ds.reports, cfg.vocab_min_freq)
    run.train_ds.tokenizer = run.valid_ds.tokenizer = run.tokenizer
    model = RadCLIP(cfg, len(run.tokenizer.vocab))
    for modality, weights in inits.items():
        load_weights(model, weights, run.identity[f"init_{modality}"], strict=False)
    for name, p in model.named_parameters():  # supervised: a tower and its head; CLIP: all but the heads
        wanted = name.startswith(TOWER_PREFIXES[run.modality]) if run.stage == "supervised" else \
            cfg.aux_cls > 0 or not name.startswith(("visual_cls.", "text_cls."))  # (heads too for --aux-cls)
        p.requires_grad_(p.requires_grad and wanted)  # logit_scale stays fixed without --learn-temperature
    run.model = model.to(device, memory_format=torch.channels_last_3d if run.channels_last else
                         torch.preserve_format)
    run.params = [p for p in model.parameters() if p.requires_grad]
    run.opt = torch.optim.AdamW([{"params": [p for p in run.params if p.ndim >= 2]},  # no decay on biases,
                                 {"params": [p for p in run.params if p.ndim < 2], "weight_decay": 0.0}],
                                weight_decay=cfg.weight_decay)  # norms and the temperature
    run.base_lr = cfg.supervised_lr if run.stage == "supervised" else cfg.clip_lr
    run.batch = cfg.batch_size * cfg.accum_steps * run.world
    epochs = cfg.supervised_epochs if run.stage == "supervised" else cfg.clip_epochs
    run.max_steps = max(1, math.ceil(epochs * len(run.train_ds) / run.batch))
    if ckpt and ckpt["max_steps"] != run.max_steps:  # more volumes, or another world size: another schedule
        raise RadclipError(f"{run.out}: its run has {ckpt['max_steps']} steps, this one {run.max_steps} "
                           f"({len(run.train_ds)} volumes, global batch {run.batch}); pass --restart")
    run.scaler = torch.amp.GradScaler(device.type, enabled=run.amp_dtype == torch.float16)
    run.pos_weight, run.start = None, ckpt["step"] if ckpt else 0
    if cfg.pos_weight:  # neg/pos per finding, over the labels that are 0 or 1
        y = run.train_ds.labels
        run.pos_weight = ((y == 0).sum(0) / (y == 1).sum(0).clamp(min=1)).float().clamp(1, 20).to(device)
    for part, key in ((model, "model"), (run.opt, "optimizer"), (run.scaler, "scaler")) if ckpt else ():
        part.load_state_dict(ckpt[key])


def train_step(run, batches, step):
    """One optimizer step over cfg.accum_steps micro-batches -> (the last one's loss, gradient norm)."""
    cfg, model, opt, device = run.cfg, run.model, run.opt, run.device
    model.train()
    torch.manual_seed((cfg.seed * 1_000_003 + step) * run.world + run.rank)  # dropout: the same when resumed
    for group in opt.param_groups:
        group["lr"] = get_lr(step, run.max_steps, run.base_lr, cfg)
    for _ in range(cfg.accum_steps):
        vol, ids, labels = next(batches)
        with autocast(device, run.amp_dtype):
            loss = stage_loss(model, (volumes_to(vol, device, run.channels_last), ids.to(device),
                                      labels.to(device)), cfg, run.stage, run.modality, run.pos_weight)
        run.scaler.scale(loss / cfg.accum_steps).backward()
    if run.world > 1:
        all_reduce_grads(run.params, [model.logit_scale] if run.stage == "clip" else run.params)
    run.scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
    run.scaler.step(opt)
    run.scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss, grad_norm


def train_loop(run, stop_after=None):
    """Steps from run.start to the end (or stop_after), logged, validated and saved as cfg says."""
    cfg, model, out, metrics, interrupted = run.cfg, run.model, run.out, {}, False
    name = run.stage if run.stage == "clip" else f"{run.stage}/{run.modality}"
    what = "reports" if run.text_only else "volumes"
    print0(f"radclip train {name}: {sum(p.numel() for p in run.params):,} trainable parameters, "
           f"{len(run.train_ds)} train / {len(run.valid_ds)} valid {what},"
           f" global batch {run.batch}, {run.max_steps} steps, {run.device}, amp={run.amp_dtype or 'fp32'} "
           f"(from --amp {cfg.amp}), channels_last={run.channels_last} (from {cfg.channels_last}), "
           f"world {run.world}")
    if run.rank == 0 and not run.start:  # a fresh run starts a fresh log; a resumed one appends
        out.with_suffix(".log.jsonl").unlink(missing_ok=True)
    sampler = StepSampler(len(run.train_ds), cfg.batch_size, cfg.seed, run.start * cfg.accum_steps, run.rank,
                          run.world)
    with stop_requests(out) as stop:  # the loader's worker processes, forked in here, inherit it
        batches = iter(torch.utils.data.DataLoader(
            run.train_ds, cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
            persistent_workers=cfg.workers > 0, pin_memory=run.device.type == "cuda"))
        bar = tqdm(range(run.start, run.max_steps), initial=run.start, total=run.max_steps, desc=name,
                   disable=run.rank != 0, dynamic_ncols=True)
        t0 = time.perf_counter()
        for step in bar:
            loss, grad_norm = train_step(run, batches, step)
            done, interrupted = step + 1, any_rank(stop, run.device)  # every rank stops after one step
            last = done in (run.max_steps, stop_after)
            if not math.isfinite(loss.item()):  # never validate or save a diverged model
                raise RadclipError(f"the loss is {loss.item()} at step {done}: training diverged; lower the "
                                   f"learning rate or try --amp off ({out} keeps its last saved step)")
            if done % cfg.log_every == 0 or last:
                row = {"step": done, "loss": loss.item(), "lr": run.opt.param_groups[0]["lr"],
                       "grad_norm": grad_norm.item(), "logit_scale": model.scale().exp().item(),
                       "volumes_per_s": (done - run.start) * run.batch / (time.perf_counter() - t0)}
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                vol_s=f"{row['volumes_per_s']:.1f}")
                log_row(run, row)
            if run.rank == 0 and (done % cfg.eval_every == 0 and not interrupted or last):  # a last step too
                metrics = dict(validate(model, run.valid_ds, cfg, run.stage, run.modality, run.device,
                                        run.amp_dtype, run.channels_last), step=done)
                print0(f"step {done}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                   if isinstance(v, float)))
                log_row(run, {"eval": metrics})
            if run.rank == 0 and (done % cfg.save_every == 0 or last or interrupted):
                save_run(run, done, metrics)
            if interrupted:
                print0(f"{out}: saved at step {done} of {run.max_steps}; the same command resumes there")
            if last or interrupted:
                break
    bar.close()
    if run.world > 1:  # every rank waits for rank 0's validation and save, and all leave together
        dist.barrier()
    if interrupted:  # on every rank, also one that only heard of the signal from another
        raise KeyboardInterrupt
    return metrics


def validate(model, ds, cfg, stage, modality, device, amp_dtype, channels_last):
    """Supervised: the head's AUC per finding and their macro mean. CLIP: the InfoNCE loss of the whole
    split as one batch, and Recall@5 (of min(5, N)) of reports retrieving their volume."""
    if stage == "supervised":
        scores = embed(model, ds, lambda m, v, t: m.classify(modality, v, t), cfg, device, amp_dtype,
                       channels_last)
        auc = dict(zip(FINDINGS, finding_auc(ds.labels.numpy(), scores.numpy()).tolist()))
        return {"macro_auc": float(np.nanmean(list(auc.values()))), "auc": auc}
    image_emb, text_emb = embed_pairs(model, ds, cfg, device, amp_dtype, channels_last)
    k = min(5, len(ds))
    return {"val_loss": clip_loss(image_emb, text_emb, model.scale().detach().cpu()).item(),
            "recall_at_5": recall_at_k(text_emb, image_emb, ks=(k,))[k]}


# ---------------------------------------------------------------------------------------
# ---- 5b. Training machinery: devices, several GPUs, exact resumption, checkpoints ----
# What the loop needs to run on any device and under torchrun, to resume exactly where it
# stopped, and to load only files that are what they claim to be.
# ---------------------------------------------------------------------------------------
def check_device(name):
    """--device as a torch.device that this machine has: auto (CUDA if present), cpu, cuda, cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpus, match = torch.cuda.device_count(), re.fullmatch(r"cpu|cuda(?::(\d+))?", str(name))
    if not match or name != "cpu" and int(match[1] or 0) >= gpus:
        raise RadclipError(f"--device {name}: not auto, cpu, or a cuda:N of this machine's (or torch build's)"
                           f" {gpus} CUDA GPU(s); use --device cpu")
    return torch.device(name)


def setup_distributed(device_name):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on CUDA, gloo on CPU. -> (rank, world, device)"""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = check_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def resolve_amp(amp, device):
    """The autocast dtype, or None for fp32. auto: bf16 on GPUs that have it, else fp16 with a
    GradScaler; fp32 on CPU, where bf16 autocast is far slower than fp32."""
    if amp == "auto":
        amp = "off" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def resolve_channels_last(choice, cfg, device, amp_dtype):
    """on/off as asked. auto: whichever memory format trains this image tower faster on this
    device, timed now over a few steps and kept nowhere (`bench` prints the flag that skips it)."""
    if choice != "auto":
        return choice == "on"
    speed = [time_train_step(cfg, device, amp_dtype, cl, steps=3)["volumes_per_s"] for cl in (False, True)]
    return any_rank(speed[1] > speed[0], device)  # one choice for every rank


def time_train_step(cfg, device, amp_dtype, channels_last, steps=5, batch=None):
    """Median forward+backward volumes/s of the image tower and the peak memory, on random input."""
    batch, fmt = batch or cfg.batch_size, torch.channels_last_3d if channels_last else torch.contiguous_format
    model = ResNet3d18(cfg.width, cfg.stem_kernel, cfg.stem_stride).to(device, memory_format=fmt)
    x = torch.randn(batch, 1, *cfg.input_shape, device=device).to(memory_format=fmt)
    opt, cuda, times = torch.optim.SGD(model.parameters(), lr=1e-3), device.type == "cuda", []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps + 2):  # two warm-up steps (cudnn.benchmark, allocator)
        t0 = time.perf_counter()
        with autocast(device, amp_dtype):
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return {"volumes_per_s": batch / float(np.median(times[2:])), "peak_gib": peak}


def gather_features(x):
    """Concatenate x over all ranks; the local shard keeps its gradient (open_clip's trick),
    so every rank computes the loss of the global batch."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    xs = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(xs, x.detach().contiguous())
    xs[dist.get_rank()] = x
    return torch.cat(xs)


def all_reduce_grads(params, averaged):
    """Combine the gradients of all ranks in one buffer: averaged over ranks for the params in
    `averaged` (a loss of the local shard; logit_scale, which sees the whole gathered batch on every
    rank), summed for the others (each rank's share of the global CLIP loss, via its embeddings)."""
    params = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(chunk.view_as(p.grad) / (dist.get_world_size() if any(p is a for a in averaged) else 1))


def any_rank(flag, device):
    """flag, or'ed over all ranks, so that every rank takes the same branch."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    flag = torch.tensor(float(bool(flag)), device=device)
    dist.all_reduce(flag)
    return flag.item() > 0


class StepSampler(torch.utils.data.Sampler):
    """An endless, resumable, distributed sampler of (index, augmentation seed). Sample p of the stream
    is perm_{p // n}[p % n], a permutation seeded by (seed, epoch); rank r of W takes every W-th
    micro-batch slot. A resumed run sees exactly the samples and augmentations it would have seen."""

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


def differences(ours, theirs, keys):
    """The flags among keys whose values differ, as one sentence: "--width 8 here, 4 there; ..."."""
    return "; ".join(f"--{k.replace('_', '-')} {ours[k]!r} here, {theirs[k]!r} there" for k in keys
                     if k in theirs and ours[k] != theirs[k])


def save_run(run, step, metrics):
    """A checkpoint of the run at step, with what makes it this run and where it was trained."""
    provenance = {"torch": str(torch.__version__), "device": str(run.device), "seed": run.cfg.seed,
                  "radclip_sha256": sha256_file(__file__), "world_size": run.world}
    save_checkpoint(run.out, model=run.model.state_dict(), optimizer=run.opt.state_dict(),
                    scaler=run.scaler.state_dict(), step=step, max_steps=run.max_steps,
                    config=dataclasses.asdict(run.cfg), stage=run.stage, modality=run.modality,
                    run=run.identity, vocab=run.tokenizer.vocab, provenance=provenance, metrics=metrics)


def log_row(run, row):
    """Append row to the run's log, one JSON object a line, beside its checkpoint (rank 0 only)."""
    if run.rank == 0:
        with open(run.out.with_suffix(".log.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def save_checkpoint(path, **state):
    """Atomic: a crash while saving leaves the previous checkpoint intact."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path, need=None, state_dict_ok=False):
    """A radclip checkpoint, loaded weights-only: a file from the internet cannot run code on load.
    need: "clip" (eval), "image" or "text" (a tower to start from). state_dict_ok: a plain
    state_dict (torchvision's r3d_18) is returned as it is. Anything else is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise RadclipError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch advises weights_only=False here; never, for a file from elsewhere
        why = ("it holds Python objects that a weights-only load refuses to run" if "Weights only" in str(e)
               else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}")
        raise RadclipError(f"{path}: not a radclip checkpoint ({why})") from None
    plain = isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
    if plain and state_dict_ok:
        return ckpt
    if not (isinstance(ckpt, dict) and {"model", "config", "stage", "modality", "vocab"} <= ckpt.keys()):
        raise RadclipError(f"{path}: holds {'a plain state_dict' if plain else 'a ' + type(ckpt).__name__}, "
                           "not a radclip checkpoint (one that `radclip train` saved)")
    try:
        checkpoint_config(ckpt)
    except RadclipError as e:
        raise RadclipError(f"{path}: its config is not this radclip's ({e})") from None
    kind = "clip" if ckpt["stage"] == "clip" else f"supervised {ckpt['modality']}"
    if need and kind not in ("clip", f"supervised {need}"):
        wanted = "a CLIP checkpoint" if need == "clip" else f"the {need} tower (supervised {need} or CLIP)"
        raise RadclipError(f"{path}: is a {kind} checkpoint; this needs {wanted}")
    return ckpt


def checkpoint_config(ckpt):
    """The Config a checkpoint was trained with (it holds every field), checked as make_config checks it."""
    return make_config("paper", **ckpt["config"])


def load_weights(model, state, path, strict=True):
    """model.load_state_dict, with a mismatch as one line that names the file."""
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:  # a checkpoint edited or saved by another program
        detail = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:120]
        raise RadclipError(f"{path}: its weights do not fit this model ({detail})") from None


def model_from_checkpoint(path, need=None):
    """(model, cfg, tokenizer) rebuilt from a checkpoint alone, without the CLI."""
    ckpt = load_checkpoint(path, need)
    cfg, tokenizer = checkpoint_config(ckpt), Tokenizer(ckpt["vocab"])
    model = RadCLIP(cfg, len(tokenizer.vocab))
    load_weights(model, ckpt["model"], path)
    return model, cfg, tokenizer


def tower_weights(path, modality, cfg):
    """One tower and its head, named as in RadCLIP, from a supervised or CLIP checkpoint of this shape;
    or the authors' image initialisation: torchvision's Kinetics-400 r3d_18 (a torch.save'd state_dict)
    less its 3-channel stem and 400-way fc, which the 1-channel strided stem and the 18-way head replace."""
    ckpt = load_checkpoint(path, modality, state_dict_ok=modality == "image")
    if "model" in ckpt:
        shape = ("width", "stem_kernel", "stem_stride") if modality == "image" else \
            ("context_len", "text_width", "text_layers", "text_heads")
        if differ := differences(dataclasses.asdict(cfg), dataclasses.asdict(checkpoint_config(ckpt)), shape):
            raise RadclipError(f"{path}: its {modality} tower has another shape ({differ})")
        return {k: v for k, v in ckpt["model"].items() if k.startswith(TOWER_PREFIXES[modality])}
    visual = ResNet3d18(cfg.width, cfg.stem_kernel, cfg.stem_stride).state_dict()
    own = {k: v.shape for k, v in visual.items() if not k.startswith("stem.")}
    theirs = {k: v.shape for k, v in ckpt.items() if not k.startswith(("stem.", "fc."))}
    if wrong := sorted(k for k in own.keys() | theirs.keys() if own.get(k) != theirs.get(k)):
        raise RadclipError(f"{path}: a plain state_dict, but not torchvision's r3d_18 (for --width 64; this "
                           f"run: {cfg.width}) nor a radclip checkpoint ({len(wrong)} keys differ, e.g. "
                           f"{wrong[0]})")
    skipped = sorted(ckpt.keys() - theirs.keys())
    print0(f"{path}: torchvision r3d_18 weights in the image tower; skipped {', '.join(skipped)} "
           "(the 1-channel stem and the head start from scratch)")
    return {f"visual.{k}": ckpt[k] for k in own}


def volumes_to(vol, device, channels_last):
    """A batch of volumes on device, in the model's memory format."""
    vol = vol.to(device, non_blocking=True)
    return vol.to(memory_format=torch.channels_last_3d) if channels_last and vol.dim() == 5 else vol


@torch.no_grad()
def embed(model, ds, fn, cfg, device, amp_dtype=None, channels_last=False, batch_size=None):
    """fn(model, vol, ids) for every example of ds, concatenated (in ds order) on the CPU."""
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size or 2 * cfg.batch_size, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda")
    out = []
    for vol, ids, _ in loader:
        with autocast(device, amp_dtype):
            out.append(fn(model, volumes_to(vol, device, channels_last), ids.to(device)).float().cpu())
    return torch.cat(out)


def embed_pairs(model, ds, cfg, device, amp_dtype=None, channels_last=False):
    """(image_emb (N, E), text_emb (N, E)): every volume of ds and its report in the CLIP space."""
    both = embed(model, ds, lambda m, v, t: torch.cat([m.encode_image(v), m.encode_text(t)], 1),
                 cfg, device, amp_dtype, channels_last)
    return both[:, :cfg.embed_dim], both[:, cfg.embed_dim:]


def print0(*args):
    """print, on rank 0 only, above any progress bar."""
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(" ".join(str(a) for a in args))


@contextlib.contextmanager
def stop_requests(out):
    """Ctrl-C and SIGTERM (a cluster pre-empting the job) as a request, the list it yields: the
    training step in progress finishes and is saved. A second signal stops at once, unsaved."""
    stop, owner = [], os.getpid()

    def request(signum, frame):
        if os.getpid() != owner or stop and time.monotonic() - stop[0] < 1.0:
            return  # a data-loader worker (the main process decides), or torchrun passing on the same Ctrl-C
        if stop:
            raise KeyboardInterrupt
        stop.append(time.monotonic())
        print0(f"\n{signal.Signals(signum).name}: saving {out} after this step (again: stop now, unsaved)")
    main_thread = threading.current_thread() is threading.main_thread()  # where signals can be caught
    handlers = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        yield stop
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------
# ---- 6. Evaluation ----
# The paper's three numbers on CT-RATE valid: zero-shot diagnosis macro AUC 83.8%,
# image-image mAP@50 53.7% (CT-CLIP's label-overlap "MAP"), report-image Recall@100 52.2%.
# Definitions follow CT-CLIP's scripts, corrected where they are wrong (each place says so),
# with 95% bootstrap CIs.
# ---------------------------------------------------------------------------------------
DIAGNOSIS_METRICS = ("auc", "f1", "f1_weighted", "accuracy", "precision")
CHUNK = 256  # queries per similarity block: memory holds (CHUNK, N) similarities, not (N, N)


def _binary(labels):
    """Labels as bool, a silver "uncertain" (-1) counted as present: the one place that says so."""
    return np.asarray(labels) != 0


def encode_texts(model, tokenizer, texts, cfg, stage="clip"):
    """(N, E): texts in CLIP's space for stage "clip", else a supervised tower's pooled text features."""
    features = model.encode_text if stage == "clip" else model.text
    with torch.no_grad():
        model.eval()
        ids = torch.stack([tokenizer.encode(t, cfg.context_len) for t in texts])
        return torch.cat([features(ids[i:i + 64]) for i in range(0, len(ids), 64)])


def encode_prompts(model, tokenizer, triples, cfg, stage="clip"):
    """(pos_emb (P, E), neg_emb (P, E), pair_finding (P,), unknown: {finding: the share of its prompts'
    words the tokenizer lacks, read as <unk>}) for zero_shot_prompts' triples."""
    pos_emb, neg_emb = (encode_texts(model, tokenizer, [t[k] for t in triples], cfg, stage) for k in (1, 2))
    unknown = {}  # finding -> the share of unknown words in each of its pairs
    for f, pos, neg in triples:
        w = words(f"{pos} {neg}")
        unknown.setdefault(FINDINGS[f], []).append(np.mean([x not in tokenizer.index for x in w] or [0]))
    return pos_emb, neg_emb, [f for f, _, _ in triples], {f: float(np.mean(u)) for f, u in unknown.items()}


def zero_shot_scores(image_emb, pos_emb, neg_emb, logit_scale, pair_finding=None):
    """(N, F) log-odds of each finding, log softmax(pos) / softmax(neg) = exp(logit_scale) * (cos(image, pos)
    - cos(image, neg)), averaged over a finding's pairs (pair_finding (P,)) as RadFinder averages templates.
    CT-CLIP ranks by the softmax, 1.0 at scale 100 once the gap passes ~0.37: its AUC depends on the scale,
    the log-odds' does not."""
    img, pos, neg = (F.normalize(torch.as_tensor(e, dtype=torch.float64), dim=1)
                     for e in (image_emb, pos_emb, neg_emb))
    log_odds = math.exp(float(logit_scale)) * (img @ pos.T - img @ neg.T)
    index = torch.arange(len(pos)) if pair_finding is None else torch.as_tensor(pair_finding)
    total = torch.zeros(len(img), int(index.max()) + 1, dtype=torch.float64).index_add_(1, index, log_odds)
    return (total / torch.bincount(index).clamp(min=1)).numpy()


def diagnosis_metrics(labels, scores, names=FINDINGS):
    """Per finding of (N, F) labels and scores: AUC, and F1, weighted F1, accuracy and precision at the
    highest threshold of maximal Youden's J, chosen like CT-CLIP on the set scored (optimistic); macro means
    over the findings with an AUC. CT-CLIP reports only weighted F1: it rewards calling a rare one absent."""
    labels, scores = _binary(labels), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.shape[1] != len(names):
        raise RadclipError(f"labels {labels.shape} and scores {scores.shape} must be (N, {len(names)})")
    per_finding = {}
    for name, y, s, auc in zip(names, labels.T, scores.T, finding_auc(labels, scores)):
        row = per_finding[name] = dict(n_pos=int(y.sum()), **dict.fromkeys(DIAGNOSIS_METRICS, math.nan))
        if not math.isnan(auc):  # AUC needs both classes; otherwise NaN, never a silent 0.5
            fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
            pred = s >= thresholds[np.argmax(tpr - fpr)]
            row.update(auc=auc, f1=f1_score(y, pred), f1_weighted=f1_score(y, pred, average="weighted"),
                       accuracy=np.mean(pred == y), precision=precision_score(y, pred, zero_division=np.nan))
    defined = [row for row in per_finding.values() if not math.isnan(row["auc"])]
    return dict(per_finding=per_finding, n_defined=len(defined),
                macro={m: np.mean([row[m] for row in defined] or math.nan) for m in DIAGNOSIS_METRICS},
                undefined=[name for name, row in per_finding.items() if math.isnan(row["auc"])])


def _top_k(query_emb, gallery_emb, k, chunk, own_slot=None):
    """(N, k) gallery indices of each query's k most cosine-similar, ties to the lower index, leaving out
    own_slot (N,), each query's place in the gallery (-1: none). On a grid of 2^-24 unit vectors' products are
    integers and sums < 2^53, exact in any BLAS order for any chunk: equal embeddings tie exactly."""
    query, gallery = (torch.round(F.normalize(torch.as_tensor(e, dtype=torch.float64), dim=1) * 2.0**24)
                      for e in (query_emb, gallery_emb))
    out = []
    for a in range(0, len(query), chunk):
        sim = query[a:a + chunk] @ gallery.T  # (C, G)
        if own_slot is not None:
            rows = torch.nonzero(own_slot[a:a + chunk] >= 0).squeeze(1)
            sim[rows, own_slot[a + rows]] = -math.inf
        values, top = sim.topk(k, dim=1)  # in no set order among ties: re-ranked stably below
        top = top.sort(dim=1).values
        top = top.gather(1, sim.gather(1, top).sort(dim=1, descending=True, stable=True).indices)
        cut = values[:, -1:]  # where the k-th value recurs outside the top k, sort the whole row
        straddles = (sim == cut).sum(1) > (values == cut).sum(1)
        top[straddles] = sim[straddles].sort(dim=1, descending=True, stable=True).indices[:, :k]
        out.append(top)
    return torch.cat(out)


def map_per_query(image_emb, labels, ks=(1, 5, 10, 50), chunk=CHUNK, ctclip_quirks=False):
    """(N, len(ks)) CT-CLIP's volume_to_volume "MAP": each volume queries the volumes with a finding by
    cosine and scores the mean Jaccard overlap of the 0/1 label vectors over its top K (not average
    precision, despite the name; a normal query scores 0). ctclip_quirks: CT-CLIP's two mistakes, kept."""
    y = torch.as_tensor(_binary(labels))
    gallery = torch.nonzero(y.any(1)).squeeze(1)
    if max(ks) > len(gallery) - (not ctclip_quirks):
        raise RadclipError(f"mAP@{max(ks)}: only {len(gallery)} volumes with a finding; pass smaller ks")
    own_slot = torch.full((len(y),), -1)  # CT-CLIP leaves the query in its own gallery; we do not
    own_slot[gallery] = torch.arange(len(gallery))
    gallery_emb = torch.as_tensor(image_emb)[gallery]
    top = _top_k(image_emb, gallery_emb, max(ks), chunk, None if ctclip_quirks else own_slot)
    q, hit = y[:, None], y[gallery][top]  # (N, 1, F), (N, K, F)
    relevance = (q & hit).sum(-1).double() / (q | hit).sum(-1)  # union > 0: a hit has a finding
    scores = torch.stack([relevance[:, :k].mean(dim=1) for k in ks], dim=1).numpy()
    if ctclip_quirks:  # CT-CLIP never resets its score list between K: "MAP@K" averages all K' <= K
        scores = np.cumsum(scores, axis=1) / np.arange(1, len(ks) + 1)
    return scores


def map_at_k(image_emb, labels, ks=(1, 5, 10, 50), chunk=CHUNK, ctclip_quirks=False):
    """{K: mAP@K}: map_per_query averaged over all N queries."""
    return dict(zip(ks, map_per_query(image_emb, labels, ks, chunk, ctclip_quirks).mean(axis=0).tolist()))


def recall_per_query(text_emb, image_emb, ks=(5, 10, 50, 100), chunk=CHUNK):
    """(N, len(ks)) 0/1: is volume i among the K of all N nearest to report i (cosine; CT-CLIP's raw
    dot product favours long vectors)? Ties to the lower index. Scan level: one volume per scan."""
    if np.shape(text_emb) != np.shape(image_emb) or max(ks) > len(image_emb):
        raise RadclipError(f"need paired (N, E) text and image embeddings with N >= {max(ks)}; "
                           f"got {tuple(np.shape(text_emb))} and {tuple(np.shape(image_emb))}")
    own = _top_k(text_emb, image_emb, max(ks), chunk) == torch.arange(len(image_emb))[:, None]
    return torch.stack([own[:, :k].any(1) for k in ks], dim=1).double().numpy()


def recall_at_k(text_emb, image_emb, ks=(5, 10, 50, 100), chunk=CHUNK):
    """{K: Recall@K} over all N reports; chance is K / N, so always state N beside it."""
    return dict(zip(ks, recall_per_query(text_emb, image_emb, ks, chunk).mean(axis=0).tolist()))


def resampled_auc(labels, scores, counts):
    """(B, F) AUC of each finding on each resample (counts (B, N): how often it drew each volume), NaN where
    undefined: the weighted Mann-Whitney statistic (ties count 1/2), roc_auc_score on the resample itself."""
    labels, out = _binary(labels), np.full((len(counts), np.shape(labels)[1]), np.nan)
    for f in range(labels.shape[1]):
        order = np.argsort(scores[:, f], kind="stable")
        s, y, w = scores[order, f], labels[order, f], counts[:, order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
        pos, neg = np.add.reduceat(w * y, starts, axis=1), np.add.reduceat(w * ~y, starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # (B, groups) negative weight strictly below each score
        with np.errstate(invalid="ignore"):
            out[:, f] = (pos * (below + neg / 2)).sum(1) / (pos.sum(1) * neg.sum(1))
    return out


def bootstrap_ci(labels, scores, per_query, n_boot=1000, seed=0, findings=()):
    """95% percentile intervals {name: (point, lo, hi)} of "macro_auc", of each finding (findings: the
    columns' names; over the resamples where its AUC is defined) and of each (N,) score in per_query, on
    the same resamples of the N volumes: AUCs recomputed, per-query retrieval scores (the full set's
    rankings) resampled. CT-CLIP's bootstrap_values.py draws indices, then scores the full set anyway."""
    scores, n, rng = np.asarray(scores, dtype=np.float64), len(labels), np.random.default_rng(seed)
    counts = np.stack([np.bincount(draw, minlength=n) for draw in rng.integers(0, n, (n_boot, n))])
    auc = resampled_auc(labels, scores, np.r_[np.ones((1, n)), counts])  # row 0: the full set
    rounds = {"macro_auc": np.nanmean(auc, axis=1), **dict(zip(findings, auc.T)),
              **{name: np.r_[np.mean(v), counts @ v / n] for name, v in per_query.items()}}
    ci = {}
    for name, (point, *values) in rounds.items():
        values = np.array(values)[np.isfinite(values)]  # NaN: a round without both classes
        ci[name] = (float(point), *(np.percentile(values, [2.5, 97.5]) if len(values) else [math.nan] * 2))
    return ci


def evaluate(image_emb, text_emb, scores, labels, map_ks=(1, 5, 10, 50),
             recall_ks=(5, 10, 50, 100), ctclip_quirks=False, n_boot=1000, seed=0):
    """The paper's evaluation for format_results; row i of each input is one volume, its report and labels."""
    maps = map_per_query(image_emb, labels, map_ks, ctclip_quirks=ctclip_quirks)
    hits = recall_per_query(text_emb, image_emb, recall_ks)
    per_query = {f"mAP@{map_ks[-1]}": maps[:, -1], f"Recall@{recall_ks[-1]}": hits[:, -1]}
    return dict(n=len(labels), diagnosis=diagnosis_metrics(labels, scores), n_boot=n_boot, seed=seed,
                map_definition="CT-CLIP's script, quirks included" if ctclip_quirks
                else "query excluded from its gallery, each K on its own",
                n_gallery=int(_binary(labels).any(1).sum()), map=dict(zip(map_ks, maps.mean(0).tolist())),
                recall=dict(zip(recall_ks, hits.mean(0).tolist())),
                ci=bootstrap_ci(labels, scores, per_query, n_boot, seed))


def evaluate_external(scores, labels, n_boot=1000, seed=0, all_findings=False):
    """Zero-shot diagnosis under the RAD-ChestCT 16-class protocol (external_16), with all_findings also
    the 18 as RADCHESTCT_MAPPING defines them; no reports, so no Recall@K, and like peers no mAP@K."""
    y16, s16 = external_16(_binary(labels), scores)
    return dict(n=len(labels), protocol=EXTERNAL_PROTOCOL, n_boot=n_boot, seed=seed,
                retrieval="skipped (no reports; the external protocol is zero-shot diagnosis)",
                diagnosis=diagnosis_metrics(y16, s16, EXTERNAL_CLASSES),
                ci=bootstrap_ci(y16, s16, {}, n_boot, seed),
                all_findings=diagnosis_metrics(labels, scores) if all_findings else None)


def table(header, rows, width=7):
    """Aligned lines: the header, then rows (name, value, ...), floats to 3 places."""
    return [f"{name:<36}" + "".join(f"{v:>{width}.3f}" if isinstance(v, float) else f"{v:>{width}}"
                                    for v in values) for name, *values in [header, *rows]]


def diagnosis_table(d):
    """The lines of a diagnosis_metrics() table."""
    rows = [(name, m["n_pos"], *(m[k] for k in DIAGNOSIS_METRICS)) for name, m in d["per_finding"].items()]
    rows.append((f"macro over {d['n_defined']} defined", "", *(d["macro"][k] for k in DIAGNOSIS_METRICS)))
    lines = table(("finding", "n_pos", "AUC", "F1", "F1(w)", "acc", "prec"), rows)
    if d["undefined"]:
        lines.append("AUC undefined (one class only), not in the macro: " + ", ".join(d["undefined"]))
    return lines


def format_results(r):
    """The results of evaluate() or evaluate_external() as an aligned text table."""
    lines = [f"Zero-shot diagnosis, N = {r['n']} volumes; threshold: Youden's J (max TPR - FPR) per finding, "
             "chosen on this same set", *([r["protocol"]] if "protocol" in r else []),
             *diagnosis_table(r["diagnosis"])]
    if r.get("prompt_unknown_words"):
        unknown = sorted(r["prompt_unknown_words"].items(), key=lambda kv: -kv[1])
        lines.append(f"Prompts '{r['prompt']}': {np.mean([u for _, u in unknown]):.0%} of their words "
                     "unknown to the tokenizer; most: " + ", ".join(f"{f} {u:.0%}" for f, u in unknown[:3]))
    if r.get("all_findings"):
        lines += ["", "The 18 findings as the mapping defines them (both calcifications are its "
                  "calcification; nothing maps to mosaic attenuation):", *diagnosis_table(r["all_findings"])]
    if "map" in r:
        lines += ["", f"Image-image mAP@K ({r['map_definition']}): {r['n']} queries, gallery = the "
                  f"{r['n_gallery']} volumes with a finding",
                  *(f"  mAP@{k:<4}{v:>7.3f}" for k, v in r["map"].items()),
                  "", f"Report-image Recall@K over N = {r['n']} volumes (chance = K/N)",
                  *(f"  R@{k:<6}{v:>7.3f}   chance {k / r['n']:.4f}" for k, v in r["recall"].items())]
    else:
        lines += ["", f"Retrieval: {r['retrieval']}"]
    lines += ["", f"95% bootstrap CIs ({r['n_boot']} resamples of the volumes, seed {r['seed']})",
              *(f"  {name:<12}{p:>7.3f}  [{lo:.3f}, {hi:.3f}]" for name, (p, lo, hi) in r["ci"].items())]
    return "\n".join(lines)


def results_to_json(r):
    """Results as JSON: plain floats (numpy's too), NaN and inf as null."""
    return json.dumps(json.loads(json.dumps(r, default=float), parse_constant=lambda _: None), indent=2)


def embed_split(ckpt_path, data_dir, split, device="auto", labels_csv=None, cache_root=None, emb_cache=None):
    """(model, cfg, dataset, image_emb (N, E), text_emb (N, E)) for a split, cached in emb_cache (default:
    beside the checkpoint) while checkpoint, volume names and reports are unchanged; an unreadable cache is
    recomputed, an unwritable one skipped."""
    model, cfg, tokenizer = model_from_checkpoint(ckpt_path, "clip")
    ds = CTRateDataset(data_dir, split, cfg, tokenizer, labels_csv, cache_root=cache_root)
    _, _, device = setup_distributed(device)
    key = hashlib.sha256("|".join([sha256_file(ckpt_path), *ds.names, *ds.reports]).encode()).hexdigest()
    cache = Path(emb_cache or Path(ckpt_path).with_suffix(f".{split}.emb.pt"))
    try:
        hit = torch.load(cache, weights_only=True) if cache.is_file() else {}
        if hit.get("key") == key:
            return model.eval(), cfg, ds, hit["image"], hit["text"]
    except Exception as e:  # a torn or foreign file: the embeddings are only a cache
        print(f"radclip: warning: {cache}: unreadable ({type(e).__name__}); embedding again", file=sys.stderr)
    image_emb, text_emb = embed_pairs(model.to(device), ds, cfg, device, resolve_amp(cfg.amp, device))
    try:
        save_checkpoint(cache, key=key, image=image_emb, text=text_emb)
    except RadclipError as e:
        print(f"radclip: warning: embeddings not cached: {e}", file=sys.stderr)
    return model.cpu(), cfg, ds, image_emb, text_emb


def run_eval(ckpt_path, data_dir, split="valid", prompt="report", ctclip_quirks=False, scan_level=False,
             n_boot=1000, device="auto", labels_csv=None, map_ks=(1, 5, 10, 50), recall_ks=(5, 10, 50, 100),
             all_findings=False, cache_root=None, emb_cache=None):
    """Embed a split once, then evaluate() it with the chosen zero-shot prompts (a split without
    reports, RAD-ChestCT's: evaluate_external()); the results keep each volume's scores and labels."""
    model, cfg, ds, image_emb, text_emb = embed_split(ckpt_path, data_dir, split, device, labels_csv,
                                                      cache_root, emb_cache)
    triples = zero_shot_prompts(load_prompts(), prompt)
    pos, neg, pair_finding, unknown = encode_prompts(model, ds.tokenizer, triples, cfg)
    scores = zero_shot_scores(image_emb, pos, neg, model.scale().item(), pair_finding)
    labels = ds.labels.numpy()
    keep = list(range(len(ds)))
    if scan_level and ds.has_reports:  # one volume per scan: a sibling reconstruction is not a second answer
        keep = sorted({n.rsplit("_", 1)[0]: i for i, n in reversed(list(enumerate(ds.names)))}.values())
    image_emb, text_emb, scores, labels = image_emb[keep], text_emb[keep], scores[keep], labels[keep]
    about = dict(checkpoint=str(ckpt_path), split=split, prompt=prompt, prompt_unknown_words=unknown,
                 volumes=[ds.names[i] for i in keep], scores=scores.tolist(), labels=labels.tolist())
    if not ds.has_reports:
        return {**evaluate_external(scores, labels, n_boot, all_findings=all_findings), **about}
    results = evaluate(image_emb, text_emb, scores, labels, map_ks, recall_ks, ctclip_quirks, n_boot)
    return {**results, **about, "retrieval_unit": "scan" if scan_level else "volume"}


# -- The prompt check: zero-shot's geometry, measured on reports alone --
def check_prompts(model, tokenizer, cfg, stage, texts, labels, prompt_sets, n_boot=1000, seed=0):
    """Zero-shot works only if a finding's prompts sit where its reports sit, and reports need no volumes:
    {prompt set: {'auc': {each finding, 'macro_auc': (AUC, lo, hi)}, 'unknown_words': {finding: share}}} of
    zero_shot_scores (scale 1) on texts against their (N, 18) labels; prompt_sets: {name: triples}."""
    emb, out = encode_texts(model, tokenizer, texts, cfg, stage), {}
    for name, triples in prompt_sets.items():
        pos, neg, pair_finding, unknown = encode_prompts(model, tokenizer, triples, cfg, stage)
        scores = zero_shot_scores(emb, pos, neg, 0.0, pair_finding)
        out[name] = dict(auc=bootstrap_ci(labels, scores, {}, n_boot, seed, FINDINGS), unknown_words=unknown)
    return out


def prompt_check_table(results):
    """The lines of check_prompts' results: AUC per finding and prompt set, CIs on the macro row."""
    aucs, unknown = [r["auc"] for r in results.values()], [r["unknown_words"] for r in results.values()]
    rows = [(f, *(auc[f][0] for auc in aucs)) for f in [*FINDINGS, "macro_auc"]]
    rows += [("macro 95% CI", *("[%.2f, %.2f]" % auc["macro_auc"][1:] for auc in aucs)),
             ("words unknown to the tokenizer", *(f"{np.mean(list(u.values())):.0%}" for u in unknown))]
    return table(("finding", *(name[:14] for name in results)), rows, width=15)


def prompt_study(reports_csv, out, cfg, labels_csv=None, id_col="VolumeName", text_cols=REPORT_TEXT,
                 seed=0, k=3, n_boot=1000, device="auto"):
    """On labelled reports without volumes: seeded folds A (half), B and C (a quarter each); a text
    tower trained on A; per finding the k candidate pairs of best prompt-check AUC on B; on C, the text
    head and the rules labeler beside the prompt check of every template, prompts.txt's report-language
    pairs and the chosen ones. Returns the results; out gets the folds, the tower and prompt_study.json."""
    labels = read_labels(labels_csv or reports_csv, id_col)
    rows = [r for r in read_csv(reports_csv, (id_col, *text_cols), id_col) if r[id_col] in labels]
    rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    n, out, folds, columns = len(rows), check_writable(out), {}, [id_col, "report", *FINDINGS]
    for name, fold in zip("ABC", (rows[:n // 2], rows[n // 2:n // 2 + n // 4], rows[n // 2 + n // 4:])):
        texts, y = [report_text(r, text_cols) for r in fold], np.stack([labels[r[id_col]] for r in fold])
        folds[name] = texts, y
        write_csv(out / f"fold_{name}.csv", [dict(zip(columns, [r[id_col], t, *v.tolist()]))
                                             for r, t, v in zip(fold, texts, y)], columns)
    train(cfg, "supervised", out / "text_A.pt", None, "text", device=device, reports=dict(
        train=out / "fold_A.csv", valid=out / "fold_B.csv", id_col=id_col, text_cols=("report",)))
    (model, cfg, tokenizer), prompts = model_from_checkpoint(out / "text_A.pt"), load_prompts()
    candidates = zero_shot_prompts({"report_language": prompts["candidates"]})  # chosen on B, each alone
    pos, neg, pair_finding, _ = encode_prompts(model, tokenizer, candidates, cfg, "supervised")
    report_emb = encode_texts(model, tokenizer, folds["B"][0], cfg, "supervised")
    auc = finding_auc(_binary(folds["B"][1])[:, pair_finding], zero_shot_scores(report_emb, pos, neg, 0.0))
    best = np.argsort(-np.nan_to_num(auc, nan=-1.0), kind="stable")  # an undefined AUC last
    chosen = {FINDINGS[f]: [candidates[i][1:] for i in best if pair_finding[i] == f][:k]
              for f in sorted(set(pair_finding))}
    sets = {name: zero_shot_prompts(prompts, name) for name in ["report", *prompts["zero_shot"]]}
    sets[f"chosen top-{k}"] = zero_shot_prompts({"report_language": chosen})
    texts, y = folds["C"]
    head = model.text_cls(encode_texts(model, tokenizer, texts, cfg, "supervised")).detach()
    rules = np.array([list(rules_label(t).values()) for t in texts], dtype=np.float64)
    rules[rules == -1] = 0.5  # uncertain ranks between absent and present
    results = {"n": {name: len(f[0]) for name, f in folds.items()}, "seed": seed, "chosen": chosen,
               "text_head": bootstrap_ci(y, head, {}, n_boot, seed, FINDINGS),
               "rules": bootstrap_ci(y, rules, {}, n_boot, seed, FINDINGS),
               "prompt_check": check_prompts(model, tokenizer, cfg, "supervised", texts, y, sets, n_boot,
                                             seed)}
    atomic_write_bytes(out / "prompt_study.json", results_to_json(results).encode())
    return results


# ---------------------------------------------------------------------------------------
# ---- 7. The demo and benchmarks ----
# The demo: synthetic CT-RATE -> silver labels -> supervised towers -> CLIP from them and from scratch
# (the paper's ablation) -> both evaluated; a rerun reuses each finished stage. bench measures speed.
# ---------------------------------------------------------------------------------------
HISTOGRAM_FINDINGS = ["Medical material", "Arterial wall calcification", "Coronary artery wall calcification",
                      "Cardiomegaly", "Pericardial effusion", "Pleural effusion", "Emphysema"]


def histogram_shortcuts(train_ds, valid_ds, bins=40):
    """{finding: valid AUC, NaN where a split lacks a class} of gradient boosting on volumes' histograms (no
    place, no shape): only HISTOGRAM_FINDINGS (metal, calcium, fluid, lung < -950 HU) move real CT's too."""
    from sklearn.ensemble import HistGradientBoostingClassifier  # here: an import only this needs
    from threadpoolctl import threadpool_limits
    x_train, x_valid = (np.stack([np.histogram(ds[i][0], bins, (-1, 1), density=True)[0]
                                  for i in range(len(ds))]) for ds in (train_ds, valid_ds))
    y_train, y_valid = train_ds.labels.numpy() == 1, valid_ds.labels.numpy() == 1
    auc = dict.fromkeys(FINDINGS, math.nan)
    for k, f in enumerate(FINDINGS):
        if min(len(set(y_train[:, k])), len(set(y_valid[:, k]))) == 2:
            with threadpool_limits(1):  # a fit this small runs fastest on one thread of shared cores
                model = HistGradientBoostingClassifier(random_state=0).fit(x_train, y_train[:, k])
            auc[f] = float(roc_auc_score(y_valid[:, k], model.predict_proba(x_valid)[:, 1]))
    return auc


def demo(out="demo", seed=0, device="auto"):
    """The paper's ablation at toy scale on a CPU: prints the tables and writes demo_results.json."""
    t0, out, times, cfg = time.perf_counter(), check_writable(out), {}, make_config("tiny", seed=seed)
    data, silver = out / "data", out / "silver_train.csv"

    def timed(stage, fn, *args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - t
        return result
    if not (data / "dataset").is_dir() or (data / ".synth-unfinished").exists():
        timed("synth", synthesize_ctrate, data, seed=seed, workers=cfg.workers)
    for split in ("train", "valid"):
        timed("prep", prep_split, data, split, cfg, workers=cfg.workers)
    histogram_auc = timed("histogram check", histogram_shortcuts,
                          *(CTRateDataset(data, split, cfg) for split in ("train", "valid")))
    if not silver.is_file():
        backend = "llm" if os.environ.get("OPENAI_BASE_URL") else "rules"
        print(f"demo: labelling train reports, {backend} backend (an LLM: set OPENAI_BASE_URL, OPENAI_MODEL)")
        if code := timed("label", main, ["label", "--reports", str(ctrate_csv(data, "train", "reports")),
                                         "--out", str(silver), "--backend", backend]):
            raise KeyboardInterrupt if code == 130 else RadclipError("labelling failed: fix the above, rerun")
    quality = label_quality(read_labels(silver), read_labels(ctrate_csv(data, "train", "labels")))
    init = {modality: out / f"supervised_{modality}.pt" for modality in ("image", "text")}
    supervised = {m: timed(f"supervised {m}", train, dataclasses.replace(cfg, supervised_epochs=epochs),
                           "supervised", init[m], data, m, silver, device=device)
                  for m, epochs in (("image", cfg.supervised_epochs), ("text", 20))}  # text: 20 read reports
    results = {}
    for name, towers in (("scratch", {}), ("supervised", {f"init_{m}": init[m] for m in init})):
        ckpt = out / f"clip_{name}.pt"
        timed(f"clip from {name}", train, cfg, "clip", ckpt, data, labels_csv=silver, device=device, **towers)
        for prompt in ("report", "ctclip"):  # the embeddings are cached: the second prompt costs seconds
            results[f"{name}, {prompt}"] = timed("eval", run_eval, ckpt, data, prompt=prompt, device=device)
    minutes, n = (time.perf_counter() - t0) / 60, results["scratch, report"]["n"]
    print(f"\nradclip demo: the paper's ablation on synthetic CT-RATE, {minutes:.1f} min ("
          f"{', '.join(f'{k} {v:.0f} s' for k, v in times.items())})\nsilver labels vs the generator's truth "
          f"(train): macro AUC {quality['macro']['auc']:.3f}; supervised towers on valid: image macro AUC "
          f"{supervised['image']['macro_auc']:.3f}, text {supervised['text']['macro_auc']:.3f}\n")
    print(*table(("CLIP initialised from, prompts", "zero-shot AUC [95% CI]", "mAP@50", "Recall@100"),
                 [(name, "%.3f [%.3f, %.3f]" % r["ci"]["macro_auc"], r["map"][50], r["recall"][100])
                  for name, r in results.items()], 24), sep="\n")
    print(f"{n} valid volumes; Recall@100 chance = {100 / n:.3f}; mAP@50 without the query in its gallery\n\n"
          "valid AUC per finding: histogram alone (*: real CT shows it too; others ~0.5), then zero-shot")
    rows = [(f + "*" * (f in HISTOGRAM_FINDINGS), histogram_auc[f],
             *(r["diagnosis"]["per_finding"][f]["auc"] for r in results.values())) for f in FINDINGS]
    print(*table(("finding", "histogram", *results), rows, 20), sep="\n")
    shortcuts = [f for f, auc in histogram_auc.items() if auc > 0.8 and f not in HISTOGRAM_FINDINGS]
    print(f"histogram shortcuts (> 0.80, no *): {', '.join(shortcuts) or 'none'}")
    summary = dict(minutes=minutes, seconds=times, label_quality=quality, supervised=supervised,
                   histogram_auc=histogram_auc, results=results)
    atomic_write_bytes(out / "demo_results.json", results_to_json(summary).encode())
    return summary


def bench(cfg, device, data_dir=None, steps=5, batch=8, cache_root=None):
    """Train-step volumes/s and peak memory per amp x channels-last; data loading from data_dir's cache."""
    rows = [{"what": "train step", "amp": amp, "channels_last": cl,
             **time_train_step(cfg, device, resolve_amp(amp, device), cl, steps, batch)}
            for amp in (["off", "bf16"] if device.type == "cpu" else ["off", "fp16", "bf16"])
            for cl in (False, True)]
    if data_dir:
        ds = CTRateDataset(data_dir, "train", cfg, augment=cfg.augment, cache_root=cache_root)
        loader = torch.utils.data.DataLoader(ds, cfg.batch_size, shuffle=True, num_workers=cfg.workers)
        t0 = time.perf_counter()
        volumes = sum(len(v) for v, _, _ in loader)
        rows.append({"what": f"data loading ({cfg.workers} workers)", "amp": "", "channels_last": "",
                     "volumes_per_s": volumes / (time.perf_counter() - t0), "peak_gib": math.nan})
    return rows


# -- bench --labeler: the runner against a local server that answers with the rules --
class RulesServer(BaseHTTPRequestHandler):
    """Answers each chat request with the rules' labels of its report, after server.latency_s."""
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do: each worker reuses its connection
    disable_nagle_algorithm = True  # else the body waits for the delayed ACK of the headers

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(self.server.latency_s)
        answer = json.dumps(rules_label(request["messages"][-1]["content"]))
        body = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet: the bench prints its own result
        pass


def bench_labeler(n_reports=1000, latency_s=0.2, workers=16):
    """Reports/s of label_reports against a RulesServer that takes latency_s per request; then the
    seconds and requests of the same run again, which the cache answers."""
    texts = [f"Report {i}: no pleural effusion was detected. A {i % 9 + 2} mm nodule is seen."
             for i in range(n_reports)]
    server, runs = ThreadingHTTPServer(("127.0.0.1", 0), RulesServer), []
    server.latency_s, url = latency_s, f"http://127.0.0.1:{server.server_port}/v1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):  # a fresh labeler each time, as a rerun of the command would have
            labeler = LLMLabeler(url, "rules", load_prompts(), workers=workers)
            summary = label_reports(range(n_reports), texts, labeler, Path(tmp) / "c.jsonl", workers)[1]
            runs.append((labeler.counts["requests"], summary["seconds"]))
    server.shutdown()
    server.server_close()
    (sent, first_s), (sent_again, again_s) = runs
    return {"reports": n_reports, "workers": workers, "latency_s": latency_s, "requests": sent,
            "reports_per_s": n_reports / first_s, "cached_rerun_s": again_s,
            "cached_rerun_requests": sent_again}


# ---------------------------------------------------------------------------------------
# ---- 8. CLI ----
# One subcommand per stage of the pipeline. The flags of Config fields come from Config itself,
# so a flag, a preset and a checkpoint's config are checked alike; every subparser is here.
# ---------------------------------------------------------------------------------------
def number(kind, lo, hi=math.inf):
    """An argparse type: a `kind` number in [lo, hi]. NaN and inf are never in range."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{' whole' * (kind is int)} number") from None
        if not lo <= v <= hi:
            span = f">= {lo:g}" if hi == math.inf else f"in [{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"must be {span}; got {text}")
        return v
    return parse


METAVARS = {"spacing_mm": ("X", "Y", "Z"), "input_shape": ("D", "H", "W"), "hu_window": ("LO", "HI")}


def add_config_flags(p, names=tuple(CONFIG_FIELDS)):
    """--preset and a flag per Config field in names; None keeps the preset's value. The two stages'
    epochs are one flag, --epochs, for the stage that runs."""
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="paper: the paper's settings (GPU); tiny: a 2-core CPU (default)")
    for name in names:
        f = CONFIG_FIELDS[name]
        flag, bounds, text = "--" + name.replace("_", "-"), f.metadata["bounds"], f.metadata["help"]
        text = text.replace("%", "%%")  # argparse formats help with %
        if name == "clip_epochs":
            continue
        if name == "supervised_epochs":
            p.add_argument("--epochs", type=number(float, *bounds), help=f"{text} of the stage that runs")
        elif isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(bounds[0], str):
            p.add_argument(flag, choices=bounds, help=text)
        else:
            kind = type(f.default[0] if isinstance(f.default, tuple) else f.default)
            shape = {"nargs": len(f.default), "metavar": METAVARS[name]} if name in METAVARS else {}
            p.add_argument(flag, type=number(kind, *bounds), help=f"{text} (paper: {f.default})", **shape)


def config_from_args(args):
    """The Config that --preset and the Config flags given describe."""
    overrides = {k: v for k, v in vars(args).items() if k in CONFIG_FIELDS}
    if getattr(args, "epochs", None) is not None:  # bench has no stage: both
        for stage in [args.stage] if hasattr(args, "stage") else ["supervised", "clip"]:
            overrides[f"{stage}_epochs"] = args.epochs
    return make_config(args.preset, **overrides)


def cmd_synth(args):
    """synth: a miniature CT-RATE, or RAD-ChestCT with --layout radchestct (the appendix)."""
    if args.layout == "radchestct":
        synthesize_radchestct(args.out, (args.n_train, args.n_valid, args.n_test), args.seed,
                              args.npz_spacing_mm, args.workers)
    else:
        synthesize_ctrate(args.out, args.n_train, args.n_valid, args.seed, args.store, args.workers)


def tokens_line(counts, args):
    """Prompt and completion tokens, and what they cost at --price-in and --price-out, if given."""
    line = f"tokens: prompt {counts['prompt_tokens']:,}, completion {counts['completion_tokens']:,}"
    if args.price_in is None and args.price_out is None:
        return line
    price_in, price_out = args.price_in or 0, args.price_out or 0
    usd = (counts["prompt_tokens"] * price_in + counts["completion_tokens"] * price_out) / 1e6
    return line + f", ${usd:.4f} at ${price_in}/${price_out} per 1M tokens in/out"


def cmd_label(args):
    """label: silver labels for --reports from an LLM server or the rules; with --eval, their quality."""
    if args.eval:
        return cmd_label_eval(args)
    if not (args.reports and args.out):
        raise RadclipError("label needs --reports CSV and --out CSV (or --eval --pred P.csv --gold G.csv)")
    reports, out = read_reports(args.reports, args.id_col, args.text_cols), Path(args.out)
    ids, texts, columns = list(reports), list(reports.values()), [args.id_col, *FINDINGS]
    check_writable(out.parent)
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    if args.backend == "llm" and not base_url:
        print("label: no endpoint (--base-url, OPENAI_BASE_URL): the rules label", file=sys.stderr)
    if (args.backend == "rules" or not base_url) and args.dry_run:
        return print("label: the rules backend sends no request and costs nothing")
    if args.backend == "rules" or not base_url:
        labels = [rules_label(t) for t in tqdm(texts, "rules", unit="report")]
        write_csv(out, [{args.id_col: i, **y} for i, y in zip(ids, labels)], columns)
        return print(f"label: {len(ids)} reports labelled by rules -> {out}")
    model = args.model or os.environ.get("OPENAI_MODEL")
    if not model:
        raise RadclipError("no model: pass --model or set OPENAI_MODEL")
    labeler = LLMLabeler(base_url, model, load_prompts(), args.timeout, args.max_retries,
                         args.response_format, args.workers, args.max_tokens)
    cache_path = Path(args.cache) if args.cache else out.with_suffix(".cache.jsonl")
    check_writable(cache_path.parent)  # before the first paid request
    if args.dry_run:  # tokens as characters / 4, the rule of thumb for English with GPT-style tokenizers
        cache = load_label_cache(cache_path)
        todo = {k: t for t in texts if t for k in [labeler.cache_key(t)] if k not in cache}
        prompt = sum(len(m["content"]) for t in todo.values() for m in labeler.messages(t))
        answer = len(json.dumps(dict.fromkeys(FINDINGS, 0)))  # about one JSON object of zeros
        estimate = {"prompt_tokens": prompt // 4, "completion_tokens": len(todo) * answer // 4}
        return print(f"label --dry-run: {len(todo)} requests for {len(texts)} reports (the others are cached,"
                     f" empty or duplicates); estimated as characters / 4, {tokens_line(estimate, args)}")
    labels, summary = label_reports(ids, texts, labeler, cache_path, args.workers)
    write_csv(out, [{args.id_col: i, **y} for i, y in zip(ids, labels) if y], columns)
    failed, failed_path, seconds = summary["failed"], out.with_suffix(".failed.csv"), summary["seconds"]
    retries = ", ".join(f"{cause} {n}" for cause, n in sorted(labeler.retries.items())) or "none"
    print(f"label: {len(ids)} reports ({summary['cached']} cached, {summary['sent']} sent, "
          f"{summary['empty']} empty so all 0, {len(failed)} failed) -> {out}\n"
          f"label: {labeler.counts['requests']} requests, retries: {retries}; "
          f"{summary['sent'] / seconds:.1f} reports/s over {seconds:.1f} s\n"
          f"label: {tokens_line(labeler.counts, args)}")
    for fallback in labeler.fallbacks:
        print(f"label: response_format fell back {fallback}")
    failed_path.unlink(missing_ok=True)  # an earlier run's list is stale now
    if failed:
        rows = [{args.id_col: i, "reason": why} for i, why in failed.items()]
        write_csv(failed_path, rows, [args.id_col, "reason"])
        print(f"label: {len(failed)} reports failed, listed in {failed_path} (the same command again retries "
              f"just those): {', '.join(list(failed)[:10])}", file=sys.stderr)
    return 1 if failed else 0


def print_label_quality(quality):
    """label_quality's table: a row per finding, then the macro means."""
    print(f"{'finding':36} {'AUC':>6} {'F1':>6} {'prec':>6} {'recall':>6} {'support':>8}")
    macro = (f"macro ({quality['reports']} reports)", quality["macro"])
    for name, m in [*quality["findings"].items(), macro]:
        print(f"{name:36} {m['auc']:6.3f} {m['f1']:6.3f} {m['precision']:6.3f} {m['recall']:6.3f} "
              f"{m.get('support', ''):>8}")
    if undefined := [f for f, m in quality["findings"].items() if math.isnan(m["auc"])]:
        print(f"AUC undefined (no reference positive or negative), not in the macro: {', '.join(undefined)}")


def cmd_label_eval(args):
    """label --eval: the quality of --pred against --gold, printed, and as JSON in --out."""
    if not (args.pred and args.gold):
        raise RadclipError("label --eval needs --pred P.csv and --gold G.csv")
    if args.out:
        check_writable(Path(args.out).parent)
    quality = label_quality(read_labels(args.pred, args.id_col), read_labels(args.gold, args.id_col, True))
    print_label_quality(quality)
    if args.out:
        atomic_write_bytes(args.out, json.dumps(quality, indent=2).encode())


def cmd_prep(args):
    """prep: each split's volumes into the cache; exit 1 if any volume was skipped."""
    cfg, failed = config_from_args(args), 0
    for split in args.split or ["train", "valid"]:
        if split in CTRATE_FILES:
            done, skipped, failures = prep_split(args.data, split, cfg, args.hu, cfg.workers, args.cache_dir)
        else:
            done, skipped, failures = prep_radchestct(args.data, split, cfg, args.npz_spacing_mm, cfg.workers,
                                                      args.cache_dir)
        for err in failures:
            print(f"radclip: skipped {err}", file=sys.stderr)
        failed += len(failures)
        print(f"prep {split}: {done} volumes in {cache_dir(args.data, cfg, args.cache_dir) / split} "
              f"({skipped} already done, {len(failures)} failed)")
    return 1 if failed else 0


def cmd_train(args):
    """train: one stage, from prep'd volumes (--data) or, for the text tower, from report CSVs alone."""
    cfg = config_from_args(args)
    if args.stage == "supervised" and (args.init_text if args.modality == "image" else args.init_image):
        raise RadclipError(f"a supervised {args.modality} stage trains one tower: pass only "
                           f"--init-{args.modality}")
    reports = None
    if args.reports or args.valid_reports:
        if not (args.reports and args.valid_reports) or args.data:
            raise RadclipError("a text stage from CSVs needs --reports and --valid-reports, and no --data")
        reports = dict(train=args.reports, valid=args.valid_reports, valid_labels=args.valid_labels,
                       id_col=args.id_col, text_cols=tuple(args.text_cols))
    elif not args.data:
        raise RadclipError("train needs --data (or, for --stage supervised --modality text, --reports and "
                           "--valid-reports)")
    metrics = train(cfg, args.stage, args.out, args.data, args.modality, args.labels, args.init_image,
                    args.init_text, args.restart, args.device, args.stop_after, args.cache_dir, reports)
    print(results_to_json(metrics))


def cmd_eval(args):
    """eval: the paper's numbers for a CLIP checkpoint, printed and written as JSON."""
    if not Path(args.ckpt).is_file():
        raise RadclipError(f"{args.ckpt}: no such checkpoint")
    out = Path(args.out or Path(args.ckpt).with_suffix(f".{args.split}.results.json"))
    try:
        check_writable(out.parent)
    except RadclipError as e:
        raise RadclipError(f"{e} with --out") from None
    zero_shot_prompts(load_prompts(), args.prompt)  # an unknown --prompt fails before any embedding
    results = run_eval(args.ckpt, args.data, args.split, args.prompt, args.ctclip_quirks, args.scan_level,
                       args.n_boot, args.device, args.labels, sorted(args.map_k), sorted(args.recall_k),
                       args.all_findings, args.cache_dir, args.emb_cache)
    print(format_results(results))
    atomic_write_bytes(out, results_to_json(results).encode())
    print(f"\nwrote {out}")


def cmd_prompts(args):
    """prompts: the prompt study on labelled reports, or with --ckpt one tower's prompt check."""
    cfg = config_from_args(args)
    if args.ckpt:  # one tower's check of prompts.txt on these reports
        model, cfg, tokenizer = model_from_checkpoint(args.ckpt, "text")
        stage = load_checkpoint(args.ckpt)["stage"]
        reports = read_reports(args.reports, args.id_col, args.text_cols)
        labels = read_labels(args.labels or args.reports, args.id_col)
        ids, prompts = match_ids("prompts", reports=reports, labels=labels), load_prompts()
        sets = {n: zero_shot_prompts(prompts, n) for n in ["report", *prompts["zero_shot"]]}
        results = check_prompts(model, tokenizer, cfg, stage, [reports[i] for i in ids],
                                np.stack([labels[i] for i in ids]), sets, args.n_boot)
        print(f"prompt check of {args.ckpt} ({stage}) on {len(ids)} reports: AUC of cos(report, positive) - "
              "cos(report, negative)\n" + "\n".join(prompt_check_table(results)))
        return
    r = prompt_study(args.reports, args.out, cfg, args.labels, args.id_col, tuple(args.text_cols), cfg.seed,
                     args.choose, args.n_boot, args.device)
    print(f"\nprompt study, seed {r['seed']}: folds A/B/C = {'/'.join(map(str, r['n'].values()))} reports; "
          "the tower trained on A, the prompts chosen on B, everything below on C")
    for name in ("text_head", "rules"):
        print(f"{name:<36}macro AUC {'%.3f [%.3f, %.3f]' % r[name]['macro_auc']}")
    print("\n".join(prompt_check_table(r["prompt_check"])))
    if r["chosen"]:
        print("\nchosen on B (### report-language lines for prompts.txt):")
        print("\n".join(f"{f} | {pos} | {neg}" for f, pairs in r["chosen"].items() for pos, neg in pairs))
    print(f"\nwrote {Path(args.out) / 'prompt_study.json'}")


def cmd_demo(args):
    """demo: the paper's ablation on synthetic CT-RATE; the results go to --out/demo_results.json."""
    demo(args.out, args.seed, args.device)


def cmd_bench(args):
    """bench: train-step volumes/s per amp x channels-last (and data loading), or --labeler."""
    cfg = config_from_args(args)
    _, _, device = setup_distributed(args.device)
    if args.labeler:
        r = bench_labeler(args.labeler_reports, args.latency, args.labeler_workers)
        return print(json.dumps(r, indent=1))
    rows = bench(cfg, device, args.data, args.steps, args.batch, cache_root=args.cache_dir)
    print(f"bench: {device}, preset {args.preset}, width {cfg.width}, stem {cfg.stem_kernel}^3 stride "
          f"{cfg.stem_stride}, input {cfg.input_shape}, batch {args.batch}, median of {args.steps} steps, "
          f"torch {torch.__version__}\n{'what':<28}{'amp':>6}{'channels_last':>15}{'vol/s':>8}{'GiB':>6}")
    for r in rows:
        peak = "n/a" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.2f}"  # peak memory, CUDA only
        print(f"{r['what']:<28}{r['amp']:>6}{r['channels_last']!s:>15}{r['volumes_per_s']:>8.1f}{peak:>6}")
    auto_amp = {None: "off", torch.float16: "fp16", torch.bfloat16: "bf16"}[resolve_amp("auto", device)]
    speed = {r["channels_last"]: r["volumes_per_s"] for r in rows if r["amp"] == auto_amp}
    faster = "on" if speed[True] > speed[False] else "off"
    print(f"faster here at --amp auto ({auto_amp}): --channels-last {faster}")


SPLITS = [*CTRATE_FILES, "all", *RADCHESTCT_SPLITS]
SHARED_FLAGS = {
    "--device": dict(default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1"),
    "--cache-dir": dict(help="prep's cache folder (default DATA/cache), for a read-only --data"),
    "--id-col": dict(default="VolumeName", help="the CSVs' id column (default VolumeName)"),
    "--text-cols": dict(nargs="+", default=list(REPORT_TEXT), help="columns joined into the report, in this "
                        "order, 'Not given.' left out (default: Impressions_EN Findings_EN)"),
    "--n-boot": dict(type=number(int, 1, 10**6), default=1000, help="bootstrap resamples for the CIs"),
}


def build_parser():
    """The CLI: one subcommand per stage, its flags from the three functions below."""
    parser = Parser(prog="radclip", description="radclip: LLM silver labels, supervised pre-training and "
                    "CLIP for 3D chest CT (arXiv 2509.13175)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help, *shared):
        p = sub.add_parser(name, help=help)
        p.set_defaults(func=func)
        for flag in shared:
            p.add_argument(flag, **SHARED_FLAGS[flag])
        return p
    add_data_commands(command)
    add_model_commands(command)
    add_study_commands(command)
    return parser


def add_data_commands(command):
    """synth, label and prep: the volumes, reports and labels the towers learn from."""
    p = command("synth", cmd_synth, "write a miniature synthetic CT-RATE (volumes, reports, labels)")
    p.add_argument("--out", type=Path, required=True, help="output folder; the dataset goes to OUT/dataset")
    p.add_argument("--n-train", type=number(int, 0), default=1000, help="training volumes (default 1000)")
    p.add_argument("--n-valid", type=number(int, 0), default=300, help="validation volumes (default 300)")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="the same seed, the same data")
    p.add_argument("--store", choices=["raw", "hu"], default="raw", help="raw: int16 HU - RescaleIntercept, "
                   "as CT-RATE's first release; hu: HU, as its corrected one (Rescale columns kept)")
    p.add_argument("--workers", type=number(int, 1, 256), default=2, help="processes rendering volumes")
    p.add_argument("--layout", choices=["ctrate", "radchestct"], default="ctrate", help="radchestct: as "
                   "RAD-ChestCT's .npz and labels; --n-train/--n-valid/--n-test scans as trn/val/tst")
    p.add_argument("--n-test", type=number(int, 0), default=100, help="radchestct: tst scans (default 100)")
    p.add_argument("--npz-spacing-mm", type=number(float, 0.1, 20), default=3.0,
                   help="radchestct: isotropic voxel size (the release: 0.8; default 3, laptop-sized)")

    p = command("label", cmd_label, "silver labels from reports (LLM or rules), or --eval them", "--id-col",
                "--text-cols")
    p.add_argument("--reports", help="reports CSV (CT-RATE's layout by default)")
    p.add_argument("--out", help="labels CSV: the id + 18 findings as 1/0/-1 (--eval: the table as JSON)")
    p.add_argument("--backend", choices=["llm", "rules"], default="llm",
                   help="llm: an OpenAI-compatible server; rules: offline, also when no server is set")
    p.add_argument("--base-url", help="URL ending in /v1 (default $OPENAI_BASE_URL); key: $OPENAI_API_KEY")
    p.add_argument("--model", help="model name (default $OPENAI_MODEL)")
    p.add_argument("--workers", type=number(int, 1, 256), default=8, help="requests in flight (default 8)")
    p.add_argument("--timeout", type=number(float, 0.01, 3600), default=60.0, help="seconds per request")
    p.add_argument("--max-retries", type=number(int, 0, 100), default=5, help="retries after a first try")
    p.add_argument("--max-tokens", type=number(int, 16, 2**20), default=300,
                   help="the answer's token limit; a reply cut by it is asked again with twice it")
    p.add_argument("--cache", help="JSONL cache of answers (default: --out with .cache.jsonl)")
    p.add_argument("--response-format", choices=RESPONSE_FORMATS, default="json_schema",
                   help="asked of the server; if refused, radclip falls back to json_object, then none")
    p.add_argument("--price-in", type=number(float, 0), help="USD per 1M prompt tokens, for the cost")
    p.add_argument("--price-out", type=number(float, 0), help="USD per 1M completion tokens, for the cost")
    p.add_argument("--dry-run", action="store_true", help="estimate requests, tokens and cost; send none")
    p.add_argument("--eval", action="store_true", help="score --pred against --gold instead of labelling")
    p.add_argument("--pred", help="with --eval: predicted labels CSV (-1 counts as present)")
    p.add_argument("--gold", help="with --eval: reference labels CSV (other columns are ignored)")

    p = command("prep", cmd_prep, "NIfTI or RAD-ChestCT .npz -> HU -> spacing -> window -> .npy",
                "--cache-dir")
    p.add_argument("--data", required=True, help="folder of CT-RATE's dataset/, or of RAD-ChestCT's files")
    p.add_argument("--split", choices=SPLITS, action="append", help="repeatable; CT-RATE: train, valid "
                   "(default: both); RAD-ChestCT: trn, val, tst (its ID prefixes) or all (the 3,630 scans)")
    p.add_argument("--npz-spacing-mm", type=number(float, 0.1, 20), default=RADCHESTCT_SPACING_MM,
                   help="RAD-ChestCT: the isotropic voxel size, which a .npz does not store (release: 0.8)")
    p.add_argument("--hu", choices=["auto", "raw", "hu"], default="auto", help="raw: apply the metadata's "
                   "Rescale values; hu: stored values are HU; auto: whichever makes air read -1000 HU")
    add_config_flags(p, ("spacing_mm", "input_shape", "hu_window", "workers"))


def add_model_commands(command):
    """train and eval: the towers, and what they score."""
    p = command("train", cmd_train, "supervised pre-training or CLIP alignment", "--device", "--cache-dir",
                "--id-col", "--text-cols")
    p.add_argument("--stage", choices=["supervised", "clip"], required=True)
    p.add_argument("--modality", choices=["image", "text"], default="image", help="the supervised tower")
    p.add_argument("--data", help="the CT-RATE folder (prep'd); a text stage needs only its CSVs")
    p.add_argument("--labels", help="training labels CSV (silver); default: the split's own")
    p.add_argument("--reports", help="a text stage without --data: training reports CSV (labels: --labels "
                   "or its own 18 columns)")
    p.add_argument("--valid-reports", help="with --reports: validation reports CSV")
    p.add_argument("--valid-labels", help="with --valid-reports: its labels (default: its own 18 columns)")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.add_argument("--init-image", help="image tower to start from: a radclip checkpoint's, or torchvision's "
                   "Kinetics-400 r3d_18 state_dict (the authors'; all but its stem and fc; needs --width 64)")
    p.add_argument("--init-text", help="text tower to start from: a radclip checkpoint's")
    p.add_argument("--restart", action="store_true", help="train afresh over a checkpoint of another run in "
                   "--out (without it, the same run resumes there and another run is an error)")
    p.add_argument("--stop-after", type=number(int, 1), help="stop after this many optimizer steps, without "
                   "changing the schedule; the same command without it resumes")
    add_config_flags(p)

    p = command("eval", cmd_eval, "zero-shot AUC, image-image mAP@K, report-image Recall@K, CIs", "--device",
                "--cache-dir", "--n-boot")
    p.add_argument("--ckpt", required=True, help="a CLIP checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--split", choices=SPLITS, default="valid", help="CT-RATE: valid (default), train; "
                   "RAD-ChestCT: all, trn, val, tst (the 16-class external protocol, zero-shot only)")
    p.add_argument("--all-findings", action="store_true", help="RAD-ChestCT: also the 18 findings as mapped")
    p.add_argument("--labels", help="labels CSV to score against; default: the split's own (gold)")
    p.add_argument("--prompt", default="report", help="zero-shot prompts from prompts.txt: report (the "
                   "report-language pairs, ensembled; default) or a template pair (ctclip: CT-CLIP's, ...)")
    p.add_argument("--ctclip-quirks", action="store_true",
                   help="mAP as CT-CLIP's script computes it (query in its own gallery, K mixed)")
    p.add_argument("--scan-level", action="store_true",
                   help="one volume per scan, for retrieval and zero-shot (reconstructions share a report)")
    p.add_argument("--map-k", type=number(int, 1), nargs="+", default=[1, 5, 10, 50], help="Ks of mAP@K")
    p.add_argument("--recall-k", type=number(int, 1), nargs="+", default=[5, 10, 50, 100], help="of Recall@K")
    p.add_argument("--out", help="results JSON (default: beside the checkpoint)")
    p.add_argument("--emb-cache", help="embedding cache file (default: beside the checkpoint)")


def add_study_commands(command):
    """prompts, demo and bench: the prompt check, the whole paper at toy scale, and speed."""
    p = command("prompts", cmd_prompts, "the prompt check on labelled reports, no volumes: the study "
                "(train a text tower, choose prompts, report) or --ckpt one tower's check",
                "--device", "--id-col", "--text-cols", "--n-boot")
    p.add_argument("--reports", required=True, help="reports CSV (labels: --labels, or its own 18 columns)")
    p.add_argument("--labels", help="labels CSV (0/1; -1 counts as present)")
    p.add_argument("--ckpt", help="check prompts.txt with this checkpoint's text tower instead of the study")
    p.add_argument("--out", default="prompt_study", help="the study's folder (folds, tower, JSON)")
    p.add_argument("--choose", type=number(int, 1, 100), default=3, help="candidate pairs kept per finding")
    add_config_flags(p)
    p.set_defaults(stage="supervised")

    p = command("demo", cmd_demo,
                "the whole paper on synthetic data, on a CPU, in minutes", "--device")
    p.add_argument("--out", default="demo", help="working folder; a rerun reuses what is there")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0)

    p = command("bench", cmd_bench, "training volumes/s per amp x channels-last; labeler reports/s",
                "--device", "--cache-dir")
    p.add_argument("--data", help="also time data loading from this folder's prep cache")
    p.add_argument("--steps", type=number(int, 1, 1000), default=5, help="timed steps per variant (median)")
    p.add_argument("--batch", type=number(int, 1, 4096), default=8, help="volumes per timed step")
    p.add_argument("--labeler", action="store_true", help="time the LLM labeler against a local server")
    p.add_argument("--latency", type=number(float, 0, 60), default=0.2, help="the local server's s per reply")
    p.add_argument("--labeler-reports", type=number(int, 1, 10**6), default=1000)
    p.add_argument("--labeler-workers", type=number(int, 1, 256), default=16)
    add_config_flags(p)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and no prefix matching of flags."""

    def __init__(self, *args, **kwargs):  # subparsers too: a typo is never taken as a prefix
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message):  # one line, instead of argparse's usage block
        self.exit(2, f"radclip: error: {message} (see: {self.prog} --help)\n")


AFTER_INTERRUPT = {  # what is true after Ctrl-C, per command
    "synth": "the same command writes the dataset again from the start",
    "prep": "finished volumes are cached; the same command does the rest",
    "label": "every answer received is cached; the same command asks only for the rest",
    "train": "the same command resumes from the last checkpoint saved in --out (if none was, afresh)",
    "eval": "nothing was written; the same command starts again",
    "prompts": "the folds and the tower's last checkpoint are in --out; the same command resumes there",
    "demo": "the same command goes on from the last finished stage, and training from its checkpoints",
}


def main(argv=None):
    """Run one command. Exit code 0; 1 for an error (one line on stderr); 2 for a bad flag; 130: Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # SIGTERM (a cluster pre-empting the job) is handled like Ctrl-C
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "device", None):
            check_device(args.device)
        return args.func(args) or 0
    except RadclipError as e:
        print(f"radclip: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        command = next((a for a in argv if a in AFTER_INTERRUPT), None)
        print(f"radclip: interrupted; {AFTER_INTERRUPT.get(command, 'nothing was written')}", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():  # torchrun: a process leaves its group cleanly
            dist.destroy_process_group()
        if main_thread:
            signal.signal(signal.SIGTERM, sigterm)


# ---------------------------------------------------------------------------------------
# ---- Appendix: a synthetic miniature CT-RATE ----
# radclip needs no download to run end to end: it draws its own CT-RATE in the release's
# layout and formats: chest phantoms in HU with the 18 findings painted as they look on CT, reports
# in CT-RATE's style, labels and metadata, so that everything downstream takes the code path that
# real CT-RATE takes. Phantoms live in patient mm (x to the patient's left, y posterior, z up) on a
# grid of voxel centres, and their arrays are (x, y, z), as NIfTI stores them.
# ---------------------------------------------------------------------------------------
def unit(vector):
    """vector / |vector|."""
    return np.asarray(vector, float) / np.linalg.norm(vector)


def box(grid, lo, hi):
    """Index slices of the voxels whose centres lie in [lo, hi] mm, and their broadcastable x, y, z."""
    s = tuple(slice(np.searchsorted(g, a), np.searchsorted(g, b, "right")) for g, a, b in zip(grid, lo, hi))
    return s, grid[0][s[0], None, None], grid[1][None, s[1], None], grid[2][None, None, s[2]]


def ellipsoid(grid, centre, radii):
    """Slices around an axis-aligned ellipsoid (half-axes radii, mm) and the normalised radius there."""
    radii = np.broadcast_to(radii, 3)
    s, *xyz = box(grid, np.subtract(centre, radii), np.add(centre, radii))
    return s, np.sqrt(sum(((v - c) / r) ** 2 for v, c, r in zip(xyz, centre, radii)))


def blob(hu, grid, centre, radii, value, where=True):
    """Paint an ellipsoid where the mask allows; returns its slices and where it painted."""
    s, radius = ellipsoid(grid, centre, radii)
    painted = (radius < 1) & (where if where is True else where[s])
    hu[s][painted] = value
    return s, painted


def draw_tubes(hu, grid, tubes, lumen_hu, wall_mm=0.0, wall_hu=40.0, where=True):
    """Paint tubes (start, end, radius mm), all walls first so that no branch walls off its parent's lumen."""
    for wall in (wall_mm, 0.0) if wall_mm else (0.0,):
        for start, end, radius in tubes:
            reach = radius + wall
            s, *xyz = box(grid, np.minimum(start, end) - reach, np.maximum(start, end) + reach)
            offset, axis = [v - c for v, c in zip(xyz, start)], end - start
            t = np.clip(sum(o * a for o, a in zip(offset, axis)) / (axis @ axis), 0, 1)
            near = sum((o - t * a) ** 2 for o, a in zip(offset, axis)) < reach ** 2
            hu[s][near & (where if where is True else where[s])] = wall_hu if wall else lumen_hu


def lung_radius(lung, x, y, z):
    """Normalised radius in a lung (< 1 inside): an elliptic cylinder that tapers to the apex and
    stands on a diaphragm dome that is highest under the lung's centre."""
    across = ((x - lung.centre[0]) / lung.radii[0]) ** 2 + ((y - lung.centre[1]) / lung.radii[1]) ** 2
    mid = lung.base + 0.45 * (lung.top - lung.base)
    taper = np.sqrt(1 - np.clip((z - mid) / (lung.top - mid), 0, 0.999) ** 2)
    return np.where(z > lung.base + lung.dome * (1 - across), np.sqrt(across) / taper, np.inf)


def lung_point(rng, chest, radius=(0.0, 0.8), height=(-100.0, 115.0), lateral_mm=0.0):
    """A random point in the lungs at a normalised radius and a height (mm) in the given ranges and
    |x| >= lateral_mm, clear of the heart and inside the 288 mm box that the tiny preset crops.
    Grid-free, so that both reconstructions of a scan place their findings alike."""
    while True:
        lung = chest.lungs[rng.integers(2)]
        p = np.append(lung.centre + lung.radii * rng.uniform(-1, 1, 2), rng.uniform(*height))
        in_heart = (((p - chest.heart_centre) / (chest.heart_radii + 25)) ** 2).sum() < 1
        if radius[0] <= lung_radius(lung, *p) < radius[1] and lateral_mm <= abs(p[0]) < 130 and not in_heart:
            return p


def where_in_lungs(chest, *points):
    """Where findings at points lie, in a report's words: in both lungs, or in the first one's lobe."""
    if len({p[0] < 0 for p in points}) == 2:
        return "in both lungs"
    side, lung = ("right", chest.lungs[0]) if points[0][0] < 0 else ("left", chest.lungs[1])
    if points[0][2] > lung.hilum[2] + 10:
        return f"in the {side} upper lobe"
    if points[0][1] < lung.centre[1] - 0.2 * lung.radii[1]:
        return "in the right middle lobe" if side == "right" else "in the lingula"
    return f"in the {side} lower lobe"


def lung_patch(grid, chest, centre, radii, edge=3.0):
    """The shape that parenchymal findings share: slices around an ellipsoid and a weight that is 1
    in its lung and falls to 0 over the outer 1/edge of its radius."""
    s, radius = ellipsoid(grid, centre, radii)
    return s, np.clip((1 - radius) * edge, 0, 1) * chest.lung[s]


def soft_room(hu, chest):
    """Where the heart or a mass may grow: lung and fat inside the ribs, not vessels, airways or bone."""
    return chest.inside_ribs & (chest.lung | (np.abs(hu - chest.fat_hu) < 1))


def paint_heart(hu, grid, chest, effusion_mm=0.0, effusion_hu=0.0):
    """The heart in 4 mm of epicardial fat, in effusion_mm of pericardial fluid if given (thickest
    dependently, behind), painted in soft_room: the lung there is lung no more."""
    room, centre, radii = soft_room(hu, chest), chest.heart_centre, chest.heart_radii  # before any layer
    layers = [(centre + (0, effusion_mm / 3, 0), radii + 4 + effusion_mm, effusion_hu)] * (effusion_mm > 0)
    for c, r, value in layers + [(centre, radii + 4, chest.fat_hu), (centre, radii, chest.tissue_hu)]:
        s, painted = blob(hu, grid, c, r, value, room)
        chest.lung[s] &= ~painted


def build_chest(rng, grid):
    """A normal chest in HU on the grid and the landmarks that findings are placed by. Sizes,
    positions and densities vary from patient to patient."""
    x, y, z = grid[0][:, None, None], grid[1][None, :, None], grid[2][None, None, :]
    width, depth = rng.uniform(150, 175), rng.uniform(100, 130)                # half-axes of the body
    chest = SimpleNamespace(half_depth=depth, fat_hu=rng.uniform(-110, -90), tissue_hu=rng.uniform(35, 50))
    body = np.hypot(x / width, y / depth)                                      # < 1 inside the body
    chest.inside_ribs, chest.lungs = body < 0.84, []
    for side, dome in ((-1, rng.uniform(55, 75)), (1, rng.uniform(40, 60))):  # the liver lifts the right dome
        radii = rng.uniform((0.36 * width, 0.75 * depth), (0.41 * width, 0.82 * depth))
        base, top = rng.uniform(-115, -95), rng.uniform(110, 135)
        chest.lungs.append(SimpleNamespace(centre=0.84 * np.array([side * width, depth]) - radii * (side, 1),
                                           radii=radii, base=base, dome=dome, top=top))
    diaphragm = np.maximum(*(lung.base + lung.dome * (1 - ((x - lung.centre[0]) / lung.radii[0]) ** 2
                                                      - ((y - lung.centre[1]) / lung.radii[1]) ** 2)
                             for lung in chest.lungs))
    wall = np.where((body > 0.84) & (body < 0.93), rng.uniform(35, 55), chest.fat_hu)  # chest muscle in fat
    abdomen = np.where(x < 0, rng.uniform(50, 65), rng.uniform(30, 45))                 # liver, spleen
    hu = np.where(body < 1, np.where(chest.inside_ribs & (z < diaphragm), abdomen, wall), -1000)
    hu, chest.lung, lung_hu = hu.astype(np.float32), np.zeros(hu.shape, bool), rng.uniform(-880, -820)
    for lung in chest.lungs:
        s, *xyz = box(grid, (*lung.centre - lung.radii, lung.base), (*lung.centre + lung.radii, lung.top))
        inside = lung_radius(lung, *xyz) < 1
        chest.lung[s] |= inside
        behind = (xyz[1] - lung.centre[1]) / lung.radii[1]                    # the dependent lung is denser
        hu[s] = np.where(inside, lung_hu + 30 * behind, hu[s])
    chest.ctr, left = rng.uniform(0.40, 0.48), chest.lungs[1]                          # cardiothoracic ratio
    heart_radii = chest.heart_radii = chest.ctr * 0.84 * width * np.array([1, rng.uniform(0.7, 0.8),
                                                                            rng.uniform(0.75, 0.85)])
    chest.heart_centre = np.array([rng.uniform(0.2, 0.35) * heart_radii[0],           # on the left dome
                                   rng.uniform(0, 8) - 0.82 * depth + heart_radii[1],
                                   left.base + left.dome + rng.uniform(0.4, 0.6) * heart_radii[2]])
    paint_heart(hu, grid, chest)
    draw_mediastinum(rng, hu, grid, chest)
    draw_bronchial_tree(rng, hu, grid, chest)
    draw_skeleton(rng, hu, x, y, z, body, chest)
    chest.lung &= hu < 80                                # nor is the bone that the lungs' outline reaches
    return hu, chest


def draw_mediastinum(rng, hu, grid, chest):
    """The aorta, the pulmonary arteries, the superior vena cava and the esophagus in the mediastinal
    fat, and the lymph node stations, two of them with a normal small node."""
    depth, heart, heart_radii = chest.half_depth, chest.heart_centre, chest.heart_radii
    carina = chest.carina = np.array([0.0, rng.uniform(0, 0.15) * depth, rng.uniform(25, 45)])
    arch, descending = carina[2] + rng.uniform(20, 35), (rng.uniform(28, 36), rng.uniform(0.3, 0.4) * depth)
    chest.aorta_radius, chest.aorta = rng.uniform(12, 16), [  # root, arch, descending left of the spine
        heart + heart_radii * (-0.35, 0.2, 0.6), np.array([-rng.uniform(10, 20), -0.3 * depth, arch - 15]),
        np.array([rng.uniform(10, 18), -0.2 * depth, arch]), np.array([*descending, arch - 15]),
        np.array([*descending, -110])]
    for lung, side in zip(chest.lungs, (-1, 1)):
        lung.hilum = carina + (side * rng.uniform(38, 48), rng.uniform(5, 15), -rng.uniform(15, 25))
    trunk = np.array([rng.uniform(5, 12), carina[1] - 0.15 * depth, carina[2] - 12])
    svc, esophagus = (-rng.uniform(22, 30), -0.2 * depth), (rng.uniform(0, 8), carina[1] + 16)
    aorta = chest.aorta + [np.array([*descending, -400])]
    draw_tubes(hu, grid, [(p, q, chest.aorta_radius) for p, q in zip(aorta, aorta[1:])]
               + [(heart + heart_radii * (0.15, -0.5, 0.75), trunk, 12.0)]          # the pulmonary trunk,
               + [(trunk, lung.hilum, 9.0) for lung in chest.lungs]                   # its arteries,
               + [(np.array([*svc, 200]), np.array([*svc, heart[2] + 0.6 * heart_radii[2]]), 9.0),
                  (np.array([*esophagus, 200]), np.array([5, esophagus[1] + 4, -200]), 7.0)], chest.tissue_hu)
    chest.lung &= hu < -500                           # lung that the vessels displace is no longer lung
    chest.stations = {  # in mediastinal fat or at the hila, clear of the great vessels
        "right paratracheal": carina + (-17, -8, 22), "prevascular": carina + (0, -0.6 * depth, 20),
        "aortopulmonary window": carina + (22, -12, 6), "subcarinal": carina + (0, 0, -28),
        "right hilar": chest.lungs[0].hilum + (0, -14, -6), "left hilar": chest.lungs[1].hilum + (0, -14, -6)}
    for station in rng.choice(list(chest.stations.values()), 2, replace=False):
        blob(hu, grid, station, rng.uniform(2, 3.5), chest.tissue_hu)


def draw_skeleton(rng, hu, x, y, z, body, chest):
    """Vertebrae (cortex 450-700 HU, marrow 150-250) around the spinal canal, ribs that slope down to
    the front (400-600) and the sternum (300-450)."""
    centre, radius, depth = chest.half_depth - rng.uniform(60, 70), rng.uniform(15, 20), chest.half_depth
    from_centre, from_canal = np.hypot(x, y - centre), np.hypot(x, y - centre - radius - 10)
    spinous = (np.abs(x) < 5) & (y > centre + radius + 20) & (y < centre + radius + 40)
    vertebra = (from_centre < radius) | (from_canal > 8) & (from_canal < 13) | spinous
    hu[vertebra[..., 0]] = rng.uniform(450, 700)                                     # cortex
    hu[(from_centre < radius - 3)[..., 0]] = rng.uniform(150, 250)                   # marrow
    hu[(from_canal < 8)[..., 0]] = 20                                                # the spinal canal
    pitch, front = rng.uniform(24, 30), (y < 0) & (np.abs(x) < 30)     # costal cartilages spare the front
    slope, width = (z - rng.uniform(0.3, 0.5) * y + rng.uniform(0, 30)) % pitch, rng.uniform(9, 12)
    hu[(body > 0.86) & (body < 0.91) & ~front & (slope < width)] = rng.uniform(400, 600)
    sternum = (np.abs(x) < 14) & (y > -0.93 * depth) & (y < -0.85 * depth) & (z > -80) & (z < 100)
    hu[sternum] = rng.uniform(300, 450)


# Lobar bronchus directions from the hilum, for the left lung (x is mirrored for the right).
LOBE_DIRECTIONS = {"upper": (0.45, 0.05, 0.9), "lower": (0.3, 0.55, -0.8), "middle": (0.55, -0.7, -0.45)}


def draw_bronchial_tree(rng, hu, grid, chest):
    """Trachea, main, lobar, segmental and subsegmental bronchi (air in a thin wall), each with its
    artery alongside, and smaller vessels beyond them reaching out towards the pleura."""
    chest.bronchi, vessels = [], []                                   # bronchi: (start, end, radius, lobe)
    for lung, side in zip(chest.lungs, ("right", "left")):
        for lobe, direction in LOBE_DIRECTIONS.items():
            name = "lingula" if (side, lobe) == ("left", "middle") else f"{side} {lobe} lobe"
            mirror = (-1 if side == "right" else 1, 1, 1)
            direction = unit(np.multiply(direction, mirror) + rng.normal(0, 0.1, 3))
            lobar = lung.hilum + direction * rng.uniform(20, 30)
            chest.bronchi.append((lung.hilum, lobar, 4.5, name))
            for _ in range(2):
                branch = unit(direction + rng.normal(0, 0.5, 3))
                segmental = lobar + branch * rng.uniform(25, 35)
                subsegmental = segmental + unit(branch + rng.normal(0, 0.4, 3)) * rng.uniform(20, 30)
                chest.bronchi += [(lobar, segmental, 3.0, name), (segmental, subsegmental, 2.0, name)]
    for start, end, radius, _ in chest.bronchi:
        beside = unit(np.cross(end - start, rng.normal(size=3))) * (2 * radius + 2)
        start, end = start + beside, end + beside
        vessels.append((start, end, radius * rng.uniform(0.9, 1.2)))
        vessels += [(end, end + unit(end - start + rng.normal(0, 12, 3)) * rng.uniform(20, 35), 2.0)
                    for _ in range(3 * (radius < 3))]
    draw_tubes(hu, grid, vessels, chest.tissue_hu, where=chest.lung)
    draw_tubes(hu, grid, [tube[:3] for tube in chest.bronchi], -1000, 1.0, chest.tissue_hu, chest.lung)
    draw_tubes(hu, grid, [(np.array([0, chest.carina[1], 200]), chest.carina, rng.uniform(8, 10))]
               + [(chest.carina, lung.hilum, 6.5) for lung in chest.lungs], -1000, 2.0, chest.tissue_hu)


# -- The 18 findings, as they look on CT, at a random size, place and strength --
# Sizes and contrasts survive the tiny preset's 4.5 x 4.5 x 9 mm voxels and [-1000, 1000] HU window.
# Five drawers share the work: masses in soft room, tubes, lung patches, airways and plates. Each
# paints one finding and returns a detail (where, how big) that the report may quote.
def draw_in_soft_room(rng, hu, grid, chest, finding):
    """The heart, its fluid, the stomach or lymph nodes, grown into lung and fat (soft_room)."""
    if finding == "Cardiomegaly":
        ctr = rng.uniform(0.56, 0.68)
        grow = chest.heart_radii * (ctr / chest.ctr - 1)
        chest.heart_centre = chest.heart_centre + grow * (0.4, 1, 1)    # left, back and up, on the diaphragm
        chest.heart_radii, chest.ctr = chest.heart_radii + grow, ctr
        paint_heart(hu, grid, chest)
        return f"(cardiothoracic ratio {ctr:.2f})"
    if finding == "Pericardial effusion":
        thickness = rng.uniform(8, 20)
        paint_heart(hu, grid, chest, thickness, rng.uniform(0, 20))
        return f"reaching {thickness:.0f} mm in thickness"
    if finding == "Hiatal hernia":
        radii, left, room = rng.uniform((28, 20, 25), (45, 30, 40)), chest.lungs[1], soft_room(hu, chest)
        centre = np.array([rng.uniform(5, 30), chest.heart_centre[1] + chest.heart_radii[1] + 0.6 * radii[1],
                           left.base + left.dome + 0.7 * radii[2]])
        blob(hu, grid, centre, radii + 4, chest.tissue_hu, room)
        s, sac = blob(hu, grid, centre, radii, rng.uniform(0, 30), room)
        level = centre[1] + rng.uniform(-0.5, 0.5) * radii[1]          # supine: the gas rises to the front
        hu[s][sac & (grid[1][None, s[1], None] < level)] = -1000
        return f"measuring {2 * radii[0]:.0f} mm"
    names = rng.choice(list(chest.stations), rng.integers(3, 7), replace=False)        # lymphadenopathy
    short_axes = rng.uniform(18, 32, 6)
    for name, short_axis in zip(names, short_axes):
        for _ in range(rng.integers(1, 3)):
            centre = chest.stations[name] + rng.normal(0, 6, 3)
            radii = short_axis / 2 * np.array([1, 1, rng.uniform(1.2, 1.6)])
            blob(hu, grid, centre, radii, rng.uniform(30, 50), soft_room(hu, chest))
    return f"in the {names[0]} region, the largest {short_axes[:len(names)].max():.0f} mm in short axis"


# Courses on the heart's surface: azimuth from, to (degrees from the patient's left towards the
# back) and height from, to (on the heart's normalised vertical axis).
CORONARIES = {"LAD": (-80, -60, 0.5, -0.7), "circumflex": (-50, 60, 0.4, 0.3), "RCA": (-110, -230, 0.4, 0.2)}


def draw_calcium_or_metal(rng, hu, grid, chest, finding):
    """Plaques on the aorta's wall or on the coronary arteries' courses, or metal devices: tubes."""
    if finding == "Arterial wall calcification":
        for _ in range(rng.integers(8, 25)):
            start, end = chest.aorta[rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]):][:2]
            axis, centre = unit(end - start), start + rng.random() * (end - start)
            across = unit(np.cross(axis, rng.normal(size=3)))
            half, radius = axis * rng.uniform(5, 15), rng.uniform(3, 4.5)
            wall = [centre + chest.aorta_radius * (np.cos(t) * across + np.sin(t) * np.cross(axis, across))
                    for t in np.linspace(0, rng.uniform(0, 1.6), 3)]
            draw_tubes(hu, grid, [(w - half, w + half, radius) for w in wall], rng.uniform(400, 1200))
        return "in the aortic arch and descending aorta"
    if finding == "Coronary artery wall calcification":
        names = sorted(rng.choice(list(CORONARIES), rng.integers(1, 4), replace=False))
        for azimuth_from, azimuth_to, height_from, height_to in (CORONARIES[name] for name in names):
            t = rng.uniform(0, 0.5) + np.linspace(0, rng.uniform(0.3, 0.5), 5)      # a curve, in 4 pieces
            azimuth = np.radians(azimuth_from + t * (azimuth_to - azimuth_from))
            height = height_from + t * (height_to - height_from)
            around = np.stack([np.cos(azimuth), np.sin(azimuth), 0 * t], 1) * np.sqrt(1 - height[:, None]**2)
            course = chest.heart_centre + (around + np.outer(height, (0, 0, 1))) * (chest.heart_radii + 3)
            draw_tubes(hu, grid, [(p, q, rng.uniform(3.5, 5)) for p, q in zip(course, course[1:])],
                       rng.uniform(400, 1200))
        return "(" + ", ".join(names) + ")"
    metal, kind, depth = rng.uniform(2500, 3500), rng.integers(3), chest.half_depth       # medical material
    if kind == 0:                # wire loops around the sternum: inside the bone they would not show
        corners = [(-18, -.95 * depth), (18, -.95 * depth), (18, -.82 * depth), (-18, -.82 * depth)]
        for z in np.arange(-60, 90, rng.uniform(22, 32)):
            loop = [np.array([*corner, z]) for corner in corners + corners[:1]]
            draw_tubes(hu, grid, [(p, q, 3.0) for p, q in zip(loop, loop[1:])], metal)
        return "consistent with sternotomy wires"
    device = np.array([rng.choice([-1, 1]) * rng.uniform(60, 80), -0.78 * depth, rng.uniform(60, 90)])
    blob(hu, grid, device, (24, 8, 20) if kind == 1 else (12, 8, 12), metal)
    tip = (-0.3, -0.6, -0.5) if kind == 1 else (-0.7, 0, 0.4)       # the right ventricle; the right atrium
    path = [device, np.array([np.sign(device[0]) * 45, -0.45 * depth, 125]),           # the subclavian vein,
            np.array([-26, -0.2 * depth, chest.carina[2] + 20]), chest.heart_centre + chest.heart_radii * tip]
    draw_tubes(hu, grid, [(p, q, 3.0) for p, q in zip(path, path[1:])], metal)       # the SVC, the heart
    return "belonging to a pacemaker and its lead" if kind == 1 else "belonging to a port catheter"


def fill_lung(rng, hu, grid, chest, points, radii_mm, value_hu, edge=3.0):
    """At each point a lung_patch (half-axes drawn from radii_mm) whose parenchyma (-950 to -600 HU)
    takes value_hu, while vessels and airways only ever become denser (they show through ground
    glass; darker lung spares them). Returns the points."""
    for point in points:
        s, weight = lung_patch(grid, chest, point, rng.uniform(*radii_mm), edge)
        change = rng.uniform(*value_hu) - hu[s]
        hu[s] += weight * np.where((hu[s] > -950) & (hu[s] < -600), change, np.maximum(change, 0))
    return points


def draw_lung_patches(rng, hu, grid, chest, finding):
    """Emphysema, atelectasis, ground glass, nodules and mosaic patches: ellipsoids in the lungs."""
    upper, lower = (chest.carina[2] - 30, 115), (-90, chest.carina[2] - 30)
    if finding == "Emphysema":
        n_bullae = rng.integers(0, 5)
        holes = [lung_point(rng, chest, height=upper) for _ in range(rng.integers(40, 100))]
        fill_lung(rng, hu, grid, chest, holes, (5, 12), (-1000, -980), edge=50)
        bullae = [lung_point(rng, chest, (0.8, 0.97), upper) for _ in range(n_bullae)]
        fill_lung(rng, hu, grid, chest, bullae, (12, 25), (-1000, -980), edge=50)
        return ("with bullae, " if bullae else "") + "more prominent in the upper lobes"
    if finding == "Atelectasis":
        points = [lung_point(rng, chest, (0, 0.7), lower) for _ in range(rng.integers(1, 3))]
        plates = ((20, 3, 8), (40, 6, 15))                                 # half-axes from, to (mm)
        return where_in_lungs(chest, *fill_lung(rng, hu, grid, chest, points, plates, (10, 60), edge=10))
    if finding == "Lung opacity":
        points = [lung_point(rng, chest) for _ in range(rng.integers(2, 6))]
        return where_in_lungs(chest, *fill_lung(rng, hu, grid, chest, points, (15, 45), (-650, -350)))
    if finding == "Lung nodule":
        sizes = np.sort(rng.uniform(15, 30, rng.integers(2, 7)))[::-1]
        points = [lung_point(rng, chest, (0.3, 0.85), lateral_mm=55) for _ in sizes]  # away from the hila
        for size, point in zip(sizes, points):
            blob(hu, grid, point, size / 2 * rng.uniform(0.85, 1.15, 3), rng.uniform(20, 60), chest.lung)
        return f"measuring {sizes[0]:.0f} mm {where_in_lungs(chest, points[0])}, and {len(sizes) - 1} smaller"
    points, darker = [lung_point(rng, chest) for _ in range(rng.integers(4, 9))], np.zeros_like(hu)  # mosaic
    for point in points:
        s, weight = lung_patch(grid, chest, point, rng.uniform(12, 30, 3), edge=10)
        darker[s] = np.maximum(darker[s], weight)                       # overlapping patches: darker once
    hu -= darker * ((hu > -950) & (hu < -600)) * rng.uniform(60, 120)   # parenchyma, not vessels or airways
    return where_in_lungs(chest, *points)


def draw_airways_and_bands(rng, hu, grid, chest, finding):
    """Findings along the bronchi (walls, dilated lumens, air bronchograms) and fibrotic bands."""
    bronchi = [tube[:3] for tube in chest.bronchi]
    if finding == "Peribronchial thickening":
        draw_tubes(hu, grid, bronchi, -1000, rng.uniform(3, 5), rng.uniform(20, 50), chest.lung)
        return "in both lungs"
    if finding == "Bronchiectasis":
        lobes = sorted({tube[3] for tube in chest.bronchi})
        weights = np.array([3.0 if "lower" in lobe else 1.0 for lobe in lobes])
        chosen = rng.choice(lobes, rng.integers(2, 5), replace=False, p=weights / weights.sum())
        tubes = [(start, start + 1.5 * (end - start), rng.uniform(6, 10))     # (sub)segmental, lengthened
                 for start, end, radius, lobe in chest.bronchi if lobe in chosen and radius < 4]
        draw_tubes(hu, grid, tubes, -1000, rng.uniform(3, 4.5), rng.uniform(20, 50), chest.lung)
        return "in the " + " and ".join(chosen)
    if finding == "Consolidation":
        point, radii = lung_point(rng, chest, (0, 0.75)), rng.uniform(25, 55, 3)
        fill_lung(rng, hu, grid, chest, [point], (radii, radii), (-50, 50), edge=6)
        hilum = chest.lungs[int(point[0] >= 0)].hilum
        start = point + unit(hilum - point) * radii.min()
        bronchograms = [(start, start + unit(point - hilum + rng.normal(0, 15, 3)) * 2 * radii.max(),
                         rng.uniform(2, 3.5)) for _ in range(rng.integers(2, 5))]
        draw_tubes(hu, grid, bronchograms, -950, where=chest.lung & (hu > -100))   # in the consolidated lung
        return where_in_lungs(chest, point)
    points = [lung_point(rng, chest, (0.7, 0.95), (chest.carina[2] - 40, 115))       # fibrotic sequela
              for _ in range(rng.integers(4, 9))]
    for point in points:
        half = unit((*rng.normal(size=2), 0.3 * rng.normal())) * rng.uniform(25, 40)
        draw_tubes(hu, grid, [(point - half, point + half, rng.uniform(2.5, 4))], rng.uniform(-50, 40),
                   where=chest.lung)
    return where_in_lungs(chest, points[0])


def draw_plates(rng, hu, grid, chest, finding):
    """Pleural fluid, a plate along the chest wall, or septal lines, families of parallel plates."""
    if finding == "Pleural effusion":
        sides, depth = [[0], [1], [0, 1]][rng.integers(3)], rng.uniform(0.12, 0.35)
        for lung in (chest.lungs[i] for i in sides):
            lo, hi = (*lung.centre - lung.radii, lung.base), (*lung.centre + lung.radii, lung.top)
            s, x, y, z = box(grid, lo, hi)
            height = np.clip((z - lung.base) / (lung.top - lung.base), 0, 1)
            across = (y - lung.centre[1]) / lung.radii[1] + 0.6 * ((x - lung.centre[0]) / lung.radii[0]) ** 2
            hu[s][(across > 1 - 2 * depth * (1.2 - height)) & chest.lung[s]] = rng.uniform(0, 20)
        side = f"in the {('right', 'left')[sides[0]]} hemithorax,"
        where = "in both hemithoraces, up to" if len(sides) == 2 else side
        return f"{where} {2.4 * depth * chest.lungs[sides[0]].radii[1]:.0f} mm thick"
    height = (-100, chest.carina[2] - 20) if rng.random() < 0.7 else (-100, 115)      # septal thickening
    points = [lung_point(rng, chest, (0.75, 0.97), height) for _ in range(rng.integers(2, 5))]
    value, lobule, width = rng.uniform(-250, -50), rng.uniform(12, 20), rng.uniform(3, 5)
    theta = rng.uniform(0, np.pi / 3) + np.arange(3) * np.pi / 3
    planes, phase = np.stack([np.cos(theta), np.sin(theta), np.full(3, 0.35)]) / lobule, rng.random(3)
    for point in points:
        s, weight = lung_patch(grid, chest, point, rng.uniform(20, 35))
        t = np.stack(np.meshgrid(*(g[k] for g, k in zip(grid, s)), indexing="ij"), -1) @ planes + phase
        septa = (np.abs(t - np.round(t)) * lobule < width / 2).any(-1) & (weight > 0.5)
        hu[s][septa & (hu[s] > -950) & (hu[s] < -600)] = value      # in the parenchyma, between the vessels
    return where_in_lungs(chest, *points)


# How each finding looks (HU, size, place) and its drawer, in painting order: the heart first (lung
# findings keep clear of it), the lungs, calcium, metal last.
LOOKS = {
    "Cardiomegaly": (draw_in_soft_room, "heart 35-50 HU, cardiothoracic ratio 0.56-0.68 (normal 0.40-0.48)"),
    "Pericardial effusion": (draw_in_soft_room, "fluid 0-20 HU, 8-20 mm around the heart, thickest behind"),
    "Emphysema": (draw_lung_patches, "-1000 to -980 HU holes, 10-24 mm in the upper lungs; 25-50 mm bullae"),
    "Mosaic attenuation pattern": (draw_lung_patches, "lung 60-120 HU darker in 4-8 sharp 25-60 mm patches"),
    "Lung opacity": (draw_lung_patches, "ground glass -650 to -350 HU, 2-5 soft patches 30-90 mm"),
    "Interlobular septal thickening": (draw_plates, "-250 to -50 HU septa 3-5 mm, basal, subpleural"),
    "Pulmonary fibrotic sequela": (draw_airways_and_bands, "-50 to +40 HU bands 5-8 x 50-80 mm, upper"),
    "Consolidation": (draw_airways_and_bands, "-50 to +50 HU, 50-110 mm, with air bronchograms"),
    "Atelectasis": (draw_lung_patches, "10-60 HU plates 6-12 mm thick, 40-80 mm wide, lower lobes"),
    "Lung nodule": (draw_lung_patches, "2-6 solid nodules 20-60 HU, 15-30 mm, away from the hila"),
    "Bronchiectasis": (draw_airways_and_bands, "lumens of 6-10 mm radius in 3-4.5 mm walls, lower lobes"),
    "Peribronchial thickening": (draw_airways_and_bands, "bronchial walls 3-5 mm (normal 1 mm) of 20-50 HU"),
    "Pleural effusion": (draw_plates, "fluid 0-20 HU behind the lung, deepest at the base, a meniscus"),
    "Coronary artery wall calcification": (draw_calcium_or_metal, "400-1200 HU plaques on 1-3 coronaries"),
    "Arterial wall calcification": (draw_calcium_or_metal, "400-1200 HU plaques on the arch and descending"),
    "Lymphadenopathy": (draw_in_soft_room, "nodes 30-50 HU, 18-32 mm short axis, at 3-6 stations"),
    "Hiatal hernia": (draw_in_soft_room, "stomach behind the heart: a 0-30 HU sac with a gas cap"),
    "Medical material": (draw_calcium_or_metal, "metal 2500-3500 HU: sternotomy wires, a pacemaker, a port"),
}


def metal_streaks(rng, hu, grid):
    """Streaks that metal casts across its axial slices (beam hardening, photon starvation): rays of
    +-100..300 HU around the metal's centre, fading over ~15 cm, as on real CT."""
    rays, amplitude, phase = rng.integers(6, 12), rng.uniform(100, 300), rng.uniform(0, 2 * np.pi)
    for k in np.flatnonzero((hu > 2000).any((0, 1))):
        i, j = np.nonzero(hu[:, :, k] > 2000)
        dx, dy = grid[0][:, None] - grid[0][i].mean(), grid[1][None, :] - grid[1][j].mean()
        streaks = np.cos(rays * np.arctan2(dy, dx) + phase) ** 9 * np.exp(-np.hypot(dx, dy) / 150)
        hu[:, :, k] += amplitude * streaks * (hu[:, :, k] > -950)        # the air around the body stays air


def scanner_blur(hu):
    """The scanner's point-spread function: a [1, 2, 1] / 4 kernel along each axis, in voxels. The
    shapes are painted voxel by voxel at full density; blurred, a one-voxel vessel fades towards
    the lung around it, as on real CT, while a 20 mm nodule keeps its density."""
    for axis in range(3):
        p = np.moveaxis(np.pad(hu, [(1, 1) if k == axis else (0, 0) for k in range(3)], mode="edge"), axis, 0)
        hu = np.moveaxis((p[:-2] + 2 * p[1:-1] + p[2:]) / 4, 0, axis)
    return hu.astype(np.float32)


def render_volume(rng, labels_row, scanner_rng=None):
    """One chest CT: a patient drawn from rng with the findings marked in labels_row, imaged by a
    scanner drawn from scanner_rng (default: rng); a second reconstruction reuses the patient's seed
    with another scanner. Returns hu (x, y, z) float32 in LPS voxel order, spacing_mm (x, y, z),
    the NIfTI affine (voxel -> RAS mm) and {finding: detail for the report}."""
    scanner_rng = rng if scanner_rng is None else scanner_rng
    sxy, sz = round(scanner_rng.uniform(3.4, 4.2), 3), float(scanner_rng.choice(np.arange(6.0, 7.6, 0.25)))
    nxy, nz = round(scanner_rng.uniform(350, 400) / sxy), round(scanner_rng.uniform(280, 330) / sz)
    shape, spacing_mm = (nxy, nxy, int(np.clip(nz, 40, 52))), (sxy, sxy, sz)   # field of view 350-400 mm
    grid = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing_mm)]  # mm from the chest centre
    hu, chest = build_chest(rng, grid)
    present = [f for f in LOOKS if labels_row[FINDINGS.index(f)]]
    details = {f: LOOKS[f][0](rng, hu, grid, chest, f) for f in present}    # in painting order
    metal_streaks(rng, hu, grid)                                         # the scanner's, not the patient's
    hu = scanner_blur(hu)
    hu += scanner_rng.standard_normal(shape, dtype=np.float32) * scanner_rng.uniform(10, 25)
    affine = np.diag([-sxy, -sxy, sz, 1.0])                              # LPS voxel order, RAS world
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2) + scanner_rng.uniform(-100, 100, 3)  # table
    return hu, spacing_mm, affine, details


# -- Labels with CT-RATE's prevalence and co-occurrence --
# Findings share causes (atherosclerosis, smoking, heart failure, infection) and so co-occur. A
# Gaussian copula with latent factors reproduces that: a finding is present when its latent score
# (loadings . factors + its own noise, unit variance) passes the quantile that gives its CT-RATE
# prevalence. The "general" loading sets the share of scans with no finding (CT-RATE: 11%).
PREVALENCE = [.15, .29, .12, .08, .22, .16, .34, .24, .28, .45, .31, .28, .15, .09, .10, .16, .10, .08]
FACTORS = {
    "general": dict.fromkeys(FINDINGS, 0.45),
    "atherosclerosis": {"Arterial wall calcification": .6, "Coronary artery wall calcification": .6,
                        "Cardiomegaly": .25, "Medical material": .25},
    "smoking": {"Emphysema": .5, "Lung nodule": .3, "Peribronchial thickening": .35, "Bronchiectasis": .3,
                "Pulmonary fibrotic sequela": .3},
    "heart failure": {"Pleural effusion": .55, "Atelectasis": .45, "Pericardial effusion": .45,
                      "Cardiomegaly": .4, "Interlobular septal thickening": .4},
    "infection": {"Consolidation": .6, "Lung opacity": .5, "Lymphadenopathy": .3,
                  "Mosaic attenuation pattern": .3, "Atelectasis": .2},
}


def sample_labels(rng, n):
    """(n, 18) 0/1 labels with CT-RATE's prevalence and co-occurrence."""
    loadings = np.array([[FACTORS[k].get(f, 0.0) for k in FACTORS] for f in FINDINGS])   # (18, factors)
    own = np.sqrt(1 - (loadings ** 2).sum(1))
    factors, noise = rng.standard_normal((n, len(FACTORS))), rng.standard_normal((n, len(FINDINGS)))
    score = factors @ loadings.T + noise * own
    return (score > [NormalDist().inv_cdf(1 - p) for p in PREVALENCE]).astype(np.int8)


# -- Reports in CT-RATE's style (radiology English translated from Turkish) --
# Real reports walk the scan in one order (airways, mediastinum, lungs, upper abdomen, bones), mostly
# in stock sentences on normal anatomy and on findings outside the 18 (cysts, adrenals, the spine),
# and name a finding in words of their own, never by its label ("atheroma plaques in the aorta", not
# "arterial wall calcification"). Of the absent findings only some are negated by name: in 800 real
# reports lymph nodes 96% of the time, effusions ~70%, nodules 37%, consolidation 5%, the rest ~never.
# Hedges are mostly a differential in brackets ("(atelectasis?)"), "may be compatible with" or
# "differential diagnosis". Sentences are grammars, so that few repeat word for word, and the stock
# ones bring numbers, decimals and brackets too: counting them tells no label.
def say(rng, grammar, sentence=True, **slots):
    """One choice made for each {a|b|...} (innermost first; the top level is a choice too; "3*a"
    weighs a 3), a number for each <lo-hi> (with lo's decimals), each $slot filled; a sentence is
    tidied and capitalised."""
    def choose(m):
        options = [re.fullmatch(r"(?:(\d+)\*)?(.*)", o, re.S).groups() for o in m[1].split("|")]
        weights = np.array([int(w or 1) for w, _ in options], float)
        return options[rng.choice(len(options), p=weights / weights.sum())][1]
    grammar = "{" + grammar + "}"
    while "{" in grammar:
        grammar = re.sub(r"\{([^{}]*)\}", choose, grammar)
    number = lambda m: f"{rng.uniform(float(m[1]), float(m[2])):.{len(m[1].partition('.')[2])}f}"  # noqa
    text = re.sub(r"\$(\w+)", lambda m: slots[m[1]], re.sub(r"<([\d.]+)-([\d.]+)>", number, grammar))
    if not sentence:
        return text
    text = re.sub(r"^[\s,]+| +(?=[.,?)])", "", re.sub(r"\s+", " ", text))
    return text[:1].upper() + text[1:]


LOBE = ("in {the right lung {upper lobe {apical|posterior}|middle lobe {medial|lateral}|lower lobe "
        "{superior|posterobasal}} segment|the left lung {upper lobe apicoposterior|{superior|inferior} "
        "lingular|lower lobe {superior|posterobasal}} segment|the {right|left} lung {upper|lower} lobe|both "
        "lung {lower lobes|apices}|the {dependent|subpleural} parts of both lungs|both lungs}")
# "Finding: its names; where, when the volume gives no detail; an afterword when present; how often an
# absent one is negated (CT-RATE's rate); how". None uses the finding's CT-RATE name.
TERMS = {f: (names, place, after, float(rate), negation) for f, names, place, after, rate, negation in (
    [part.strip() for part in spec.replace(": ", ";", 1).split(";")] for spec in (
        "Medical material: {metallic {images|structures}|foreign material of medical origin}; {consistent "
        "with sternotomy wires|belonging to a {port|central venous} catheter|consistent with a stent};; 0;",
        "Arterial wall calcification: {calcific |}atheroma{tous|} plaques|{calcific |}atherosclerotic "
        "changes|wall calcifications; in the {thoracic aorta|aortic arch|wall of the {ascending|descending} "
        "aorta};; 0;",
        "Cardiomegaly: cardiomegaly|increased heart size|an increase in the cardiothoracic {ratio|index} in "
        "favor of the heart;;; 0.8; {2*heart contour{ and|,} size {are|is} {normal|natural}|heart dimensions "
        "and compartments appear natural|the cardiothoracic ratio is <0.38-0.49>}.",
        "Pericardial effusion: {minimal |mild |}pericardial effusion|{minimal |}effusion in the pericardial "
        "space; {reaching <4-15> mm in its thickest part|in the form of thin smears|};; 0.75; {pericardial "
        "effusion-thickening|pericardial effusion} {was not|is not} {observed|detected}.",
        "Coronary artery wall calcification: {calcified |}atheroma{tous|} plaques in the coronary "
        "{arteries|vascular structures}|coronary artery calcifications; {|, {most prominent |}in the "
        "{LAD|RCA|circumflex}};; 0;",
        "Hiatal hernia: {a sliding type|a mild|a} hiatal hernia; {at the esophagogastric junction|};; 0.7; "
        "{thoracic esophagus calibration was normal|no pathological esophageal wall thickening was seen}.",
        "Lymphadenopathy: {enlarged |}lymph nodes of pathological size|lymphadenopathies; in the "
        "{prevascular|{right |}paratracheal|subcarinal|{right|left|bilateral} hilar} region{, the largest "
        "<11-24> mm in short axis|};; 0.96; {there {are|were} no lymph nodes of pathological size|no "
        "pathological LAP was detected} in {the mediastinum|the mediastinal and hilar regions}.",
        "Emphysema: {mild |diffuse |}emphysematous changes|{centrilobular|paraseptal} emphysema{ areas|}; in "
        "{both lungs|the upper {lobes|zones} of both lungs};; 0;",
        "Atelectasis: {linear |subsegmental |plate-like |}atelectasis|atelectatic changes; " + LOBE + ";; 0;",
        "Lung nodule: a {nonspecific |solid |}{pulmonary |parenchymal |}nodule|a nodular {lesion|formation}|"
        "{a few |several |}millimetric {nonspecific |}nodules; {2*|of <2-9> mm|of <2.0-8.9> mm in diameter} "
        + LOBE + "; { (intrapulmonary lymph node?)| (granuloma?)|5*}; 0.37; {no {mass or nodule|suspicious "
                 "nodule, mass or infiltration} {was|is} {detected|observed} in {both lungs|the lungs}}.",
        "Lung opacity: ground{ |-}glass {opacities|densities|areas}|{patchy |}ground{ |-}glass density "
        "increases; " + LOBE + "; { (infection?)| (early viral pneumonia?)|6*}; 0;",
        "Pulmonary fibrotic sequela: {pleuroparenchymal |}sequelae {changes|density increases}|{linear |}"
        "fibrotic bands|fibroatelectatic changes; " + LOBE + ";; 0;",
        "Pleural effusion: {minimal |mild |}pleural effusion|{an |}effusion in the pleural space; {in the "
        "{right|left} hemithorax{, reaching <5-40> mm in its thickest part|}|in both hemithoraces};; 0.69; "
        "{{bilateral |}pleural effusion-thickening was not {detected|observed}|no pleural effusion is seen}.",
        "Mosaic attenuation pattern: {a |}mosaic {attenuation|perfusion} pattern|areas of mosaic "
        "attenuation; in {both lungs|both lung lower lobes}; { (small airway disease?)|4*}; 0;",
        "Peribronchial thickening: {minimal |}peribronchial thickening{s|}|{bronchial|peribronchial} wall "
        "thickening{s|}; " + LOBE + ";; 0;",
        "Consolidation: {patchy |focal |}consolidation{ areas|}|{an area|areas} of {pneumonic |}"
        "consolidation; " + LOBE + "; { (pneumonia?)| (infection?)|6*}; 0.05; no pneumonic infiltration or "
        "consolidation area {was detected|is observed} in {the lung parenchyma|both lungs}.",
        "Bronchiectasis: {mild |}{cylindrical |traction |}bronchiectasis|bronchiectatic changes|dilatation "
        "of the segmental bronchi; {in the central parts of both lungs|" + LOBE + "};; 0;",
        "Interlobular septal thickening: {smooth |}interlobular septal thickening{s|}|thickening of the "
        "interlobular septa; in {the {lower lobes|basal segments} of both lungs|both lungs}; { (pulmonary "
        "edema?)|3*}; 0;"))}
PRESENT = "{$s $p|there $be $s $p|$s $be {observed|seen|noted} $p|$s $p $was {observed|detected}}$c."
HEDGED = ("{an appearance|{minimal|nonspecific} changes} $b.|{an appearance that may be compatible with $s "
          "$p is observed|findings that may be compatible with $s $p are observed}.|$s $p cannot be "
          "excluded.|{the |}differential diagnosis includes $s $p.")
# (how often, a sentence), in a real report's order; a slice: where the findings of FINDINGS[slice] go.
STOCK = [
    (1, "{trachea and {both |}main bronchi} {are|were} {open|in the midline and open}{2*| and no {occlusive|"
        "obstructive} pathology {is|was} detected in the lumen}."),
    (.7, "{thoracic aorta diameter is normal|the widths of the mediastinal main vascular structures are "
         "normal|the {ascending aorta|main pulmonary artery} {is|was measured as} {3*<24-39>|<28.0-39.9>} mm "
         "in diameter}."),
    (.3, "{4*the thyroid gland {is|appears} {normal|natural} in size|a {hypodense |}nodule of <5-22> mm "
         "{is|was} observed in the {right|left} lobe of the thyroid gland{ (colloid nodule?)|2*}}."),
    (1, slice(0, 7)),
    (.25, "{{reactive |}lymph nodes smaller than {1 cm|10 mm} in short axis {are|were} observed in the "
          "{bilateral |}axillary {region|regions}|a lipoma of <15-60> mm {is|was} observed in the "
          "subcutaneous fatty tissue of the {right|left} chest wall}."),
    (.6, "{when examined in the lung parenchyma window|in the evaluation of both lung parenchyma};"),
    (1, slice(7, 18)),
    (.3, "{2*{there is no pneumothorax|no pneumothorax was detected}|apical pleural thickening {is|was} "
         "observed {bilaterally|on the {right|left}}}."),
    (.8, "{6*no space-occupying lesion was detected in the liver|2*a decrease in density consistent with "
         "hepatosteatosis {is|was} observed in the liver|a hypodense lesion of {2*<3-24>|<2.0-9.9>} mm "
         "{is|was} observed in segment <2-8> of the liver{ (cyst?)|, consistent with a {simple |}cyst|}}."),
    (.7, "{4*{bilateral|both} adrenal glands {were|are} {normal|natural}|a {nodular |}thickening of <8-24> "
         "mm {is|was} observed in the {right|left} adrenal gland{ (adenoma?)|, compatible with an "
         "adenoma|2*}}."),
    (.5, "{3*both kidneys are {normal|natural} in size and contour|a {cortical |parapelvic |}cyst "
         "{of|measuring} <5-45> mm {is|was} observed in the {upper|lower} pole of the {right|left} kidney{ "
         "(Bosniak {1|2})|3*}}."),
    (.8, "{bone structures in the study area are natural|no lytic-destructive lesions were detected in the "
         "bone structures|{degenerative changes|osteophytes} {are|were} seen in the thoracic vertebrae}."),
    (.7, "{4*{vertebral corpus heights|thoracic vertebral corpus heights, alignments and densities} are "
         "{preserved|natural|normal}|there is a loss of height of {about |}<10-40>% in the {T<4-12>|L1} "
         "vertebral corpus{, compatible with a compression fracture|2*}}."),
]
CLINICAL = "{cough|dyspnea|chest pain|fever|control|shortness of breath|not given}."
TECHNIQUE = ("{non-contrast thorax CT images were obtained in the axial plane|thorax CT without contrast"
             "|not given}.")
NORMAL = "{thoracic CT examination within normal limits|no significant pathology was detected}."


def write_report(rng, labels_row, hedged_mask, details=None):
    """A CT-RATE style report: stock sentences in a real report's order, the present findings (with
    the rendered volume's details, often; hedged where hedged_mask, so that a labeler reads -1), some
    absent ones negated at CT-RATE's rates, and an impression naming the present ones."""
    # some radiologists write more, whatever they see
    findings, impressions, verbosity = [], [], rng.uniform(0.3, 2)
    for how_often, stock in STOCK:
        if isinstance(stock, str):
            findings += [say(rng, stock)] if how_often == 1 or rng.random() < how_often * verbosity else []
            continue
        for i in range(len(FINDINGS))[stock]:
            names, place, afterword, negated_rate, negation = TERMS[FINDINGS[i]]
            if not labels_row[i]:
                findings += [say(rng, negation)] if rng.random() < negated_rate else []
                continue
            s, detail = say(rng, names, False), (details or {}).get(FINDINGS[i])
            p = detail if detail and not hedged_mask[i] and rng.random() < 0.4 else say(rng, place, False)
            plural = re.search(r"(?<!si)s$", s.split(" of ")[0])  # "areas of ..." are, "atelectasis" is
            b = f"({s} {p}?)" if re.fullmatch(r"[\w\s-]*", p) else f"{p} ({s}?)"  # all doubted before "?"
            findings.append(say(rng, HEDGED if hedged_mask[i] else PRESENT, s=s, p=p, b=b,
                                c=say(rng, afterword, False), be="are" if plural else "is",
                                was="were" if plural else "was"))
            impressions.append(say(rng, "$s?" if hedged_mask[i] else "$s{ $p|}.", s=say(rng, names, False),
                                   p=say(rng, place, False) if p == detail else p))
    return {"ClinicalInformation_EN": say(rng, CLINICAL), "Technique_EN": say(rng, TECHNIQUE),
            "Findings_EN": " ".join(findings), "Impressions_EN": " ".join(impressions) or say(rng, NORMAL)}


# -- Writing the dataset in CT-RATE's and RAD-ChestCT's layouts --
REPORT_COLUMNS = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
METADATA_COLUMNS = ["VolumeName", "Manufacturer", "PatientSex", "PatientAge", "Rows", "Columns", "XYSpacing",
                    "ZSpacing", "RescaleIntercept", "RescaleSlope", "RescaleType", "NumberofSlices"]


def store_volume(path, hu, affine, rng, store):
    """Save as the CT-RATE release does: int16 with identity header scaling, holding HU - intercept
    (store="raw"; the metadata CSV gives the intercept) or HU (store="hu", the corrected release),
    in one of the voxel orders DICOM converters write. Returns the intercept."""
    affine = affine.copy()
    for axis in ((), (0, 1), (2,))[rng.choice(3, p=[0.7, 0.15, 0.15])]:   # LPS; RAS; slices reversed
        hu = np.flip(hu, axis)
        affine[:3, 3] += affine[:3, axis] * (hu.shape[axis] - 1)
        affine[:3, axis] *= -1
    intercept = -8192.0 if rng.random() < 0.1 else -1024.0
    stored = np.clip(hu, -1024, 3071) - (intercept if store == "raw" else 0)
    img = nib.Nifti1Image(np.rint(stored).astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return intercept


def synthesize_scan(job):
    """Render, store and report every reconstruction of one scan: a (report, labels, metadata) row each."""
    root, split, patient, n_recons, labels_row, seed, store = job
    key = [seed, ("train", "valid").index(split), patient]   # seeds from (seed, split, patient): order-free
    rng = np.random.default_rng(key + [0])
    sex, age = rng.choice(["M", "F"]), rng.integers(20, 90)
    maker = rng.choice(["SIEMENS", "PHILIPS", "TOSHIBA"])
    rows = []
    for recon in range(1, n_recons + 1):
        scanner = np.random.default_rng(key + [recon])
        patient_rng = np.random.default_rng(key + [99])          # the same patient in every reconstruction
        hu, (sxy, _, sz), affine, details = render_volume(patient_rng, labels_row, scanner)
        name = f"{split}_{patient}_a_{recon}.nii.gz"             # CT-RATE's VolumeName keeps the suffix
        intercept = store_volume(root / split / f"{split}_{patient}" / f"{split}_{patient}_a" / name,
                                 hu, affine, scanner, store)
        rows.append(dict(VolumeName=name, Manufacturer=maker, PatientSex=sex, PatientAge=f"{age:03d}Y",
                         Rows=hu.shape[1], Columns=hu.shape[0], XYSpacing=str([sxy, sxy]), ZSpacing=sz,
                         RescaleIntercept=intercept, RescaleSlope=1.0, RescaleType="HU",
                         NumberofSlices=hu.shape[2]))
    hedged = labels_row.astype(bool) & (rng.random(len(FINDINGS)) < 0.1)
    report = write_report(rng, labels_row, hedged, details)
    labels = dict(zip(FINDINGS, labels_row.tolist()))
    return [(dict(VolumeName=m["VolumeName"], **report), dict(VolumeName=m["VolumeName"], **labels), m)
            for m in rows]


def in_workers(fn, jobs, workers, desc):
    """fn(job) for every job, in order, in `workers` forked processes, under a progress bar."""
    with multiprocessing.get_context("fork").Pool(workers, worker_signals) as pool:
        return list(tqdm(pool.imap(fn, jobs, chunksize=4), total=len(jobs), desc=desc, unit="scan"))


def synthesize_ctrate(out, n_train=1000, n_valid=300, seed=0, store="raw", workers=2):
    """Write a miniature CT-RATE under out/dataset: n_train and n_valid volumes (one scan per patient;
    ~20% of scans have a second reconstruction) with their reports, labels and metadata."""
    root, unfinished = Path(out) / "dataset", Path(out) / ".synth-unfinished"
    if unfinished.exists():  # an interrupted synth: what it wrote is ours, and incomplete
        print(f"synth: {root} is from an interrupted run; writing it again", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
    elif root.exists() and any(root.iterdir()):
        raise RadclipError(f"{root} already exists; choose a new --out or delete it")
    atomic_write_bytes(check_writable(out) / unfinished.name, b"")
    for k, (split, n) in enumerate((("train", n_train), ("valid", n_valid))):
        rng, recons = np.random.default_rng([seed, k]), []
        while sum(recons) < n:                                   # reconstructions per patient, n in all
            recons.append(min(1 + int(rng.random() < 0.2), n - sum(recons)))
        labels = sample_labels(rng, len(recons))
        jobs = [(root, split, i + 1, r, labels[i], seed, store) for i, r in enumerate(recons)]
        rows = [row for scan in in_workers(synthesize_scan, jobs, workers, f"synth {split}") for row in scan]
        columns = (REPORT_COLUMNS, ["VolumeName"] + FINDINGS, METADATA_COLUMNS)
        for i, kind in enumerate(("reports", "labels", "metadata")):
            write_csv(ctrate_csv(out, split, kind), [r[i] for r in rows], columns[i])
    unfinished.unlink()


RADCHESTCT_LOCATIONS = ("right_lung", "left_lung", "heart", "mediastinum", "other")  # a few of its 52
UNMAPPED_ABNORMALITIES = ("cyst", "fibrosis", "granuloma")  # of its 84, some that no finding maps to


def store_radchestct_volume(path, hu, spacing_mm, npz_spacing_mm):
    """Save a phantom ((x, y, z) LPS voxel order, spacing_mm (x, y, z)) as RAD-ChestCT does:
    resampled to npz_spacing_mm isotropic, as (z, y, x) running superior->inferior,
    anterior->posterior and patient right->left, int16 HU clipped to [-1000, 1000], no affine."""
    size = [max(1, round(n * s / npz_spacing_mm)) for n, s in zip(hu.shape, spacing_mm)]
    hu = F.interpolate(torch.from_numpy(np.ascontiguousarray(hu, np.float32))[None, None], size=size,
                       mode="trilinear", align_corners=False)[0, 0].numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    ct = np.ascontiguousarray(hu.transpose(2, 1, 0)[::-1])  # C order, as numpy wrote the release
    np.savez_compressed(path, ct=np.rint(np.clip(ct, -1000, 1000)).astype(np.int16))


def radchestct_row(rng, labels_row):
    """The abnormality*location columns that are 1: one abnormality of each present finding and, in
    a tenth of scans, each unmapped one, at a random location. Mosaic attenuation maps to none:
    as in the real labels, it is painted but never labelled."""
    mapped = [RADCHESTCT_MAPPING[f] for f, y in zip(FINDINGS, labels_row) if y and RADCHESTCT_MAPPING[f]]
    found = [rng.choice(abnormalities) for abnormalities in mapped]
    found += [abnormality for abnormality in UNMAPPED_ABNORMALITIES if rng.random() < 0.1]
    return {f"{abnormality}*{rng.choice(RADCHESTCT_LOCATIONS)}": 1 for abnormality in found}


def synthesize_radchestct_scan(job):
    """Render one scan and store it as RAD-ChestCT does."""
    path, labels_row, seed, npz_spacing_mm = job
    torch.set_num_threads(1)  # parallelism is across volumes (and a forked OpenMP pool would hang)
    hu, spacing_mm, _, _ = render_volume(np.random.default_rng(seed), labels_row)
    store_radchestct_volume(path, hu, spacing_mm, npz_spacing_mm)


def synthesize_radchestct(out, n=(8, 4, 2), seed=0, npz_spacing_mm=3.0, workers=2):
    """Write a miniature RAD-ChestCT in out: n = (trn, val, tst) scans of synthesize_ctrate's
    phantoms as <NoteAcc_DEID>.npz, and the three labels CSVs (rows in no order, as released).
    The release is 0.8 mm isotropic; 3 mm keeps a laptop's files small: prep them with the same
    --npz-spacing-mm, since the file cannot say."""
    out = Path(out)
    if any(out.glob("*_Abnormality_and_Location_Labels.csv")):
        raise RadclipError(f"{out} already holds RAD-ChestCT labels; choose a new --out or delete them")
    abnormalities = sorted({*UNMAPPED_ABNORMALITIES, *itertools.chain(*RADCHESTCT_MAPPING.values())})
    columns = ["NoteAcc_DEID"] + [f"{a}*{loc}" for a in abnormalities for loc in RADCHESTCT_LOCATIONS]
    tables = {}
    for k, (prefix, n_scans) in enumerate(zip(RADCHESTCT_SPLITS, n)):
        rng = np.random.default_rng([seed, 2 + k])                 # 0 and 1 are CT-RATE's splits
        labels = sample_labels(rng, n_scans)
        ids = [f"{prefix}{i:05d}" for i in rng.choice(100000, n_scans, replace=False)]
        jobs = [(out / f"{i}.npz", labels[j], [seed, 2 + k, j], npz_spacing_mm) for j, i in enumerate(ids)]
        in_workers(synthesize_radchestct_scan, jobs, workers, f"synth {prefix}")
        tables[prefix] = [dict(dict.fromkeys(columns, 0), NoteAcc_DEID=i, **radchestct_row(rng, y))
                          for i, y in zip(ids, labels)]
    for prefix, rows in tables.items():  # last: an interrupted run leaves no labels, so a rerun starts over
        write_csv(out / f"{RADCHESTCT_SPLITS[prefix]}_Abnormality_and_Location_Labels.csv", rows, columns)
    print(f"synth: RAD-ChestCT at {npz_spacing_mm:g} mm in {out}; prep it with --npz-spacing-mm "
          f"{npz_spacing_mm:g}")


if __name__ == "__main__":
    sys.exit(main())
