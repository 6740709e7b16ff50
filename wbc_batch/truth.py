"""Ground truth for `--truth`: what is known about each image, and the readers that know it.

A truth reader is a plugin (hook `wbc_register_truth_readers`) that turns some on-disk layout into
a mapping from image names to `ImageTruth`. Names are paths relative to the run's input folder
with forward slashes, exactly as `ImageResult.image`; because a truth layout does not always sit
where the images sit, `TruthSet.find()` also matches by path suffix and, when unambiguous, by file
stem.

Class names are normalised with `normalise_class()`, so "NEUTROPHIL", "Neutrophils" and "NE" all
become "neutrophil". A class outside `CLASSES` is kept as written (lower case): it is scored as a
class that the models never predict.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

from . import CLASSES
from .discovery import IMAGE_SUFFIXES, is_skipped_folder
from .errors import WbcBatchError
from .plugins import PLUGIN_FAILURES, reraise_stops

log = logging.getLogger("wbc_batch")

#: file extensions that count as images when a reader looks for the image of an annotation
IMAGE_EXTENSIONS = IMAGE_SUFFIXES

_ALIASES = {
    "ne": "neutrophil", "neu": "neutrophil", "neut": "neutrophil", "seg": "neutrophil",
    "segmented neutrophil": "neutrophil", "band": "neutrophil", "snc": "neutrophil",
    "sne": "neutrophil", "bne": "neutrophil",  # PBC's segmented and band neutrophils (file names)
    "segmented": "neutrophil", "stab": "neutrophil", "pmn": "neutrophil", "neutro": "neutrophil",
    # Spanish, Portuguese and Italian words for segmented and band neutrophils
    "segmentado": "neutrophil", "segmentato": "neutrophil", "segmentati": "neutrophil",
    "cayado": "neutrophil", "bastonete": "neutrophil",
    "ly": "lymphocyte", "lym": "lymphocyte", "lymph": "lymphocyte", "lympho": "lymphocyte",
    "mo": "monocyte", "mon": "monocyte", "mono": "monocyte",
    "eo": "eosinophil", "eos": "eosinophil", "eosino": "eosinophil",
    "ba": "basophil", "bas": "basophil", "baso": "basophil",
    # the adjectives of "Neutrophilic granulocyte", "Neutrophiler Granulozyt" (beside a word of
    # another cell, "Eosinophilic myelocyte", "Basophilic stippling", they name none)
    "neutrophilic": "neutrophil", "eosinophilic": "eosinophil", "basophilic": "basophil",
    "neutrophiler": "neutrophil", "eosinophiler": "eosinophil", "basophiler": "basophil",
}
#: words that may stand beside a class's name in a label of several words without changing
#: what cell it is ("Reactive lymphocyte", "Band cell"); any other word ("myelocyte", "blast",
#: "immature", "not") keeps the label unknown
_PLAIN_WORDS = frozenset({"cell", "cells", "form", "forms", "wbc", "wbcs", "leukocyte", "white",
                          "blood", "reactive", "atypical", "variant", "activated", "large",
                          "small", "granular", "hypersegmented", "mature", "normal", "typical",
                          "granulocyte", "granulocytes", "granulozyt", "granulozyten",
                          "polynucleaire", "polynucléaire", "polynucleaires", "polynucléaires",
                          "granulocito", "granulocitos", "granulociti", "segmentado",
                          "segmentados", "segmentato", "segmentati", "en", "banda", "reactivo",
                          "reactivos", "reattivo", "reattivi", "atipico", "atípico", "atipicos",
                          "atípicos", "atipici", "reativo", "reativos"})

#: labels of what is not a white blood cell, in box truth that annotates every object (lower case)
NOT_WBC = frozenset({"rbc", "rbcs", "red blood cell", "red blood cells", "red cell", "red cells",
                     "erythrocyte", "erythrocytes", "erythrozyt", "erythrozyten", "erythrocyt",
                     "hematie", "hematies", "globule rouge", "globules rouges", "eritrocito",
                     "eritrocitos", "platelet", "platelets", "plt", "plts", "pc", "platelet clump",
                     "platelet clumps", "giant platelet", "giant platelets", "thrombocyte",
                     "thrombocytes", "thrombozyt", "thrombozyten", "plaquette", "plaquettes",
                     "plaqueta", "plaquetas", "eritrocita", "eritrociti", "globulo rosso",
                     "globuli rossi", "globulo rojo", "globulos rojos", "globulo vermelho",
                     "globulos vermelhos", "hemacia", "hemacias", "piastrina", "piastrine",
                     "trombocito", "trombocitos", "trombociti", "eritroblasto", "eritroblastos",
                     "eritroblasti", "normoblasto", "normoblastos", "normoblasti",
                     # nucleated red cells, counted apart from the differential (per 100 WBCs),
                     # as `RED_OR_PLATELET_WORDS` has them for VOC and YOLO truth; and artefacts
                     "nrbc", "nrbcs", "nucleated rbc", "nucleated rbcs", "nucleated red cell",
                     "nucleated red cells", "nucleated red blood cell", "nucleated red blood cells",
                     "normoblast", "normoblasts", "erythroblast", "erythroblasts", "reticulocyte",
                     "reticulocytes", "artifact", "artifacts", "artefact", "artefacts"})


def _unaccented(text: str) -> str:
    """`text` without its accents ("éosinophile": "eosinophile")."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _without_doubt_marks(label) -> str:
    """`label` as text with its doubt marks (`?`, `*`) taken off, stripped."""
    return re.sub(r"[?*]+", " ", str(label or "")).strip()


def is_not_wbc(label) -> bool:
    """Whether `label` names a red cell or a platelet (`NOT_WBC`; any case, accents ignored,
    words joined by `_` or `-` as class lists write them: `red_blood_cell`, `RBC's` too)."""
    text = " ".join(re.sub(r"[_\-]+", " ", str(label or "")).lower().replace("'s", "s").split())
    plain = _unaccented(text)
    return text in NOT_WBC or plain in NOT_WBC


#: words of labels that name a white cell of none of the five classes (blasts, precursors,
#: plasma cells, smudge cells): box truth that annotates every object takes them for WBCs whose
#: class the models do not know, scored as wrong, as CSV truth scores every label it does not know
OTHER_WBC_WORDS = frozenset({
    "blast", "blasts", "myeloblast", "myeloblasts", "lymphoblast", "lymphoblasts", "monoblast",
    "monoblasts", "promyelocyte", "promyelocytes", "myelocyte", "myelocytes", "metamyelocyte",
    "metamyelocytes", "prolymphocyte", "prolymphocytes", "promonocyte", "promonocytes",
    "plasmacyte", "plasmacytes", "plasmocyte", "plasmocytes", "smudge", "basket", "gumprecht",
    "ig", "igs", "immature",
    # Spanish, Portuguese and Italian
    "blasto", "blastos", "blasti", "mieloblasto", "mieloblastos", "mieloblasti", "linfoblasto",
    "linfoblastos", "linfoblasti", "promielocito", "promielocitos", "promielociti",
    "mielocito", "mielocitos", "mielociti", "metamielocito", "metamielocitos", "metamielociti",
    "plasmocito", "plasmocitos", "plasmociti", "plasmacellula", "plasmacellule"})


#: words that make a label name a red cell or a platelet, whatever else it says ("Immature
#: RBC", "Smudge platelet")
RED_OR_PLATELET_WORDS = frozenset({
    "rbc", "rbcs", "erythrocyte", "erythrocytes", "reticulocyte", "reticulocytes", "normoblast",
    "normoblasts", "erythroblast", "erythroblasts", "nrbc", "nrbcs", "platelet", "platelets",
    "plt", "plts", "thrombocyte", "thrombocytes", "red", "megakaryocyte", "megakaryocytes"})


def is_other_wbc(label) -> bool:
    """Whether `label` names a white cell of none of `CLASSES` (`OTHER_WBC_WORDS`, or "plasma
    cell"): a blast, a myelocyte, a smudge cell; any case, accents ignored; never one with a
    word of a red cell or platelet (`RED_OR_PLATELET_WORDS`)."""
    text = unicodedata.normalize("NFC", str(label or ""))  # an accent in NFD splits no word
    text = " ".join(re.sub(r"[\W_]+", " ", text).lower().split())
    plain = _unaccented(text)
    words = set(plain.split())
    if words & RED_OR_PLATELET_WORDS:
        return False
    return bool(words & OTHER_WBC_WORDS) or "plasma cell" in plain


def names_any_wbc(label) -> bool:
    """Whether `label` means "a white blood cell" without saying which (`WBC_NAMES`), doubt
    marks aside ("WBC?": still no subtype to score)."""
    text = " ".join(re.sub(r"[_\-]+", " ", _without_doubt_marks(label)).lower().split())
    return text in WBC_NAMES or _unaccented(text) in WBC_NAMES


def is_doubted_wbc(label) -> bool:
    """Whether `label` names a white cell once its doubt marks (`?`, `*`) are taken off: "Mono?"
    is a WBC whose class is unsure, scored as a class the models do not know (its label as
    written), as CSV truth scores it; box truth must not drop its box."""
    text = str(label or "").strip()
    bare = _without_doubt_marks(text)
    return bare != text and bool(bare) and (
        normalise_class(bare) in CLASSES or is_other_wbc(bare) or bare.lower() in WBC_NAMES)


#: labels that mean "a white blood cell" without saying which (lower case; box and YOLO truth)
WBC_NAMES = frozenset({"wbc", "wbcs", "leukocyte", "leukocytes", "leucocyte", "leucocytes",
                       "white blood cell", "white blood cells", "white_blood_cell",
                       "leukozyt", "leukozyten", "leucocito", "leucocitos", "leucocita",
                       "leucociti", "globulo blanco", "globulos blancos", "globulo branco",
                       "globulos brancos", "globulo bianco", "globuli bianchi"})


class TruthError(WbcBatchError, ValueError):
    """Ground truth could not be found or read; the message says which file and why."""


class TruthNotRecognised(TruthError):
    """No truth reader recognises the `--truth` path (a third party's might)."""


def normalise_class(name) -> Optional[str]:
    """Map a class label as written in some dataset to one of `CLASSES` where possible.

    Full names, their plurals ("Neutrophils"), the short names of `_ALIASES` and their plurals
    ("Lymphs", "Monos") are known, and so are the German and French names, with or without
    accents ("Neutrophile", "éosinophiles", "Lymphozyten", "Monozyt"), and the Spanish,
    Portuguese and Italian ones ("Neutrófilos", "Linfócito", "linfociti", "Monocita",
    "Basofilo"). A label of several words
    that name one class between them, beside words that leave the cell what it is
    (`_PLAIN_WORDS`), is that class ("Band neutrophil", "Neutrophil (band)", "Seg. neutrophil",
    "Reactive lymphocyte", "Neutrophilic granulocyte", and one word with a point, "Mono."); one
    whose words name two ("Lymphocyte/Monocyte") or hold any other word ("Neutrophil
    myelocyte", "Pro-monocyte", "Not neutrophil", "Eosinophilic myelocyte"), or a doubt mark
    ("Mono?"), is not. Returns None for empty labels; unknown labels come back lower-cased and
    stripped.
    """
    if name is None:
        return None
    # NFC: a name in NFD (a Mac's folder names) splits its words at no accent
    text = unicodedata.normalize("NFC", str(name)).strip().lower()
    if not text or text == "nan":
        return None
    cls = _known(text)
    if cls is not None:
        return cls
    words = [w for w in re.split(r"[\W_]+", text) if w]
    named = {_known(w) for w in words if w not in _PLAIN_WORDS}
    if re.search(r"[?*]", text) or (len(words) == 1 and re.search(r"[^\w\s.()\[\]]", text)):
        return text  # "Mono?", "Reactive lymphocyte?", "Eos*": a doubt or mark, not a spelling
    # one word too, written with a point or in brackets: "Mono.", "Lymph.", "(eos)"
    return named.pop() if len(named) == 1 and None not in named else text


def _known(text: str) -> Optional[str]:
    """The class `text` (one label, lower case) is a spelling of, or None."""
    for form in _forms(text):
        if form in CLASSES:
            return form
        if form in _ALIASES:
            return _ALIASES[form]
    return None


#: the stems of the five classes' Spanish, Portuguese and Italian names, without accents, each
#: written with an ending of `_ROMANCE_ENDING` ("neutrófilo", "neutrofili", "linfocita")
_ROMANCE_STEMS = {"neutrofil": "neutrophil", "linfocit": "lymphocyte", "monocit": "monocyte",
                  "eosinofil": "eosinophil", "basofil": "basophil"}
_ROMANCE_ENDING = re.compile(r"(?:o|os|i|a|as|e|es)$")


def _forms(text: str) -> list:
    """`text` (lower case) and the spellings it may stand for: without a plural ending (-s,
    -en), without accents, German -zyt for -cyte, French and German -phile for -phil, and the
    Spanish, Portuguese and Italian names (`_ROMANCE_STEMS`)."""
    plain = _unaccented(text)
    stem = _ROMANCE_ENDING.sub("", plain)
    if stem != plain and stem in _ROMANCE_STEMS:
        return [_ROMANCE_STEMS[stem]]
    forms = []
    for word in dict.fromkeys((text, plain)):
        stems = [word] + [word[:-len(end)] for end in ("s", "en", "n") if word.endswith(end)
                          and (end == "s" or len(word) > 6)]  # "ban" is no plural of "ba"
        for stem in stems:
            forms += [stem, stem.replace("zyt", "cyte") if stem.endswith("zyt") else stem]
            if stem.endswith("phile"):
                forms.append(stem[:-1])
    return list(dict.fromkeys(forms))


def named_with_guess(label: str) -> str:
    """`label` for a message about an unknown class, with the class it is likely a misspelling
    of: "Neutrophills (neutrophil?)"."""
    guess = suggest_class(label)
    return f"{label} ({guess}?)" if guess else str(label)


def suggest_class(name) -> Optional[str]:
    """The class a label that `normalise_class` does not know is most likely a misspelling of
    ("Neutrophills": neutrophil), or None."""
    import difflib

    text = str(name or "").strip().lower()
    # against the full names only, and close: short aliases made "Lymphoma" a lymphocyte
    close = difflib.get_close_matches(text, list(CLASSES), n=1, cutoff=0.8)
    return close[0] if close else None


@dataclass
class ImageTruth:
    """What is known about one image. Every part is optional.

    mask_path: a mask in the WBC Image Dataset convention (0 background, 128 cytoplasm,
        255 nucleus), same size as the image; 0/1/2 label maps are read too, and 0/1 or 0/255
        masks as whole-cell masks without nucleus (`metrics.standard_mask`).
    cls: the class of the one WBC the image is centred on (single-cell images).
    boxes: WBC boxes `(x, y, w, h)`, in original image pixels, or as fractions of the image width
        and height when `box_units == "norm"` (YOLO); `has_boxes` says the boxes are known, so an
        image with `has_boxes` and no boxes truly has no WBC.
    box_classes: one class (or None when unknown) per box.
    box_size: `(width, height)` of the image that pixel boxes were drawn on, where the truth says
        (VOC's `<size>`); boxes drawn at another resolution are scaled to the image analysed, or
        left out of the scoring where its shape differs (`metrics.score_image`).
    """

    mask_path: Optional[Path] = None
    cls: Optional[str] = None
    boxes: list = field(default_factory=list)
    box_classes: list = field(default_factory=list)
    has_boxes: bool = False
    box_units: str = "px"
    box_size: Optional[tuple] = None

    def __post_init__(self):
        if self.boxes and not self.box_classes:
            self.box_classes = [None] * len(self.boxes)
        if len(self.box_classes) != len(self.boxes):
            raise ValueError("box_classes must have one entry per box")
        if self.boxes:
            self.has_boxes = True

    def pixel_boxes(self, width: int, height: int) -> list:
        """The boxes in pixels of an image of the given size."""
        if self.box_units != "norm":
            return [tuple(float(v) for v in b) for b in self.boxes]
        return [(x * width, y * height, w * width, h * height) for x, y, w, h in self.boxes]

    @property
    def kinds(self) -> tuple:
        """Which kinds of truth this holds: some of "mask", "class", "boxes"."""
        out = []
        if self.mask_path is not None:
            out.append("mask")
        if self.cls is not None or any(c is not None for c in self.box_classes):
            out.append("class")
        if self.has_boxes:
            out.append("boxes")
        return tuple(out)


@runtime_checkable
class TruthReader(Protocol):
    """Reads one ground-truth layout.

    name: unique, used by `--truth-format`.
    priority (optional attribute, a number, default 0): when several readers can read a path,
        the highest wins; generic readers use a negative value. Anything else counts as 0, with
        a warning.
    why_not(path) (optional method): when no reader recognises `path`, what this reader found
        wrong with it (e.g. "labels/a.txt line 2: ..."), or None; it goes into the error message.
    """

    name: str

    def can_read(self, path: Path) -> bool:
        """Whether `path` (a file or folder) looks like this reader's layout. Must be cheap."""

    def read(self, path: Path, input_dir: Path) -> dict:
        """Read the truth at `path` for the images under `input_dir`.

        :returns: `{relative image name: ImageTruth}`, names relative to `input_dir` with forward
            slashes where the image lies under it, otherwise the image's path relative to the
            truth layout (matched later by suffix or stem). Classes may be given as written
            ("NE", "Lymphs", "WBC" for no subtype): `load_truth` normalises them
            (`normalise_class`), and takes an image with boxes as one whose boxes are known.
        :raises TruthError: when the layout is recognised but broken.
        """


def image_key(image_path: Path, input_dir: Optional[Path], fallback_root: Optional[Path] = None) -> str:
    """The name by which an image is known in a run: relative to `input_dir` when under it."""
    image_path = Path(os.path.abspath(image_path))
    for root in (input_dir, fallback_root):
        if root is None:
            continue
        try:
            return image_path.relative_to(os.path.abspath(root)).as_posix()
        except ValueError:
            continue
    return image_path.name


def find_image(base: Path) -> Optional[Path]:
    """The existing image file `base.<ext>` for any image extension (any letter case), or None."""
    parent = base.parent
    if not parent.is_dir():
        return None
    for ext in IMAGE_EXTENSIONS:
        for cand in (base.with_name(base.name + ext), base.with_name(base.name + ext.upper())):
            if cand.is_file():
                return cand
    return None


def fold_name(name: str) -> str:
    """A file name as truth and image names are matched: in lower case and Unicode's composed
    form (NFC), so that `café.png` typed in a spreadsheet finds the `café.png` a Mac wrote
    decomposed (`e` and a combining accent), which looks the same and had matched no truth."""
    return unicodedata.normalize("NFC", name).lower()


def _strip_image_ext(name: str) -> str:
    root, ext = os.path.splitext(name)
    return root if ext.lower() in IMAGE_EXTENSIONS else name


def _image_ext(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    return ext if ext in IMAGE_EXTENSIONS else ""


def _same_place(key: str, rel: str) -> bool:
    """Names whose folders may be one: either has none, or one's folders end the other's.

    So a stem match never pairs `A/field_01.jpg` with the truth of `B/field_01.jpg`."""
    a, b = key.split("/")[:-1], rel.split("/")[:-1]
    n = min(len(a), len(b))
    return n == 0 or a[len(a) - n:] == b[len(b) - n:]


def _same_kind(key: str, rel: str) -> bool:
    """Names that may be one file: their image extensions agree, or one has none.

    So `Dataset 1/001.png` (a mask) never takes the truth of `Dataset 1/001.bmp` (its image).
    """
    a, b = _image_ext(key), _image_ext(rel)
    return not a or not b or a == b or {a, b} <= {".jpg", ".jpeg"} or {a, b} <= {".tif", ".tiff"}


#: how many unpaired image names `TruthSet.several_fit_note` looks at
NOTE_NAMES = 200


class TruthSet(Mapping):
    """Truth keyed by image name, with a forgiving `find()` for names that differ in their folders.

    `find(rel)` tries, in order: the exact name; the name without letter case; the name without
    its image extension (truth from a masks folder may not know it); a truth name that is a
    folder-suffix of `rel` or has `rel` as its suffix; then the file stem (without image
    extension) when exactly one truth entry has it and the two names' folders agree as far as both
    go. Every fallback needs a unique candidate, and the extension-free ones never pair two
    different image extensions (an image and its mask). `resolve()` pairs a whole run's names one
    to one.
    """

    def __init__(self, items: Mapping, reader: str = ""):
        self._items = dict(items)
        self.reader = reader
        self._lower = {}
        self._folded = {}  # key -> fold_name(key)
        self._stems = defaultdict(list)
        self._noext = defaultdict(list)
        for key in self._items:
            folded = self._folded[key] = fold_name(key)
            self._lower.setdefault(folded, key)
            self._noext[_strip_image_ext(folded)].append(key)
            stem = _strip_image_ext(folded.rsplit("/", 1)[-1])
            self._stems[stem].append(key)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def key_for(self, rel: str) -> Optional[str]:
        """The truth name that `rel` (an image name of the run) matches, or None."""
        keys = self._candidates(rel)
        return keys[0] if len(keys) == 1 else None

    def several_fit(self, rel: str) -> list:
        """The truth names that all fit `rel` when no single one does (`key_for` is None because
        `sample_A/f.jpg` and `sample_B/f.jpg` both fit `f.jpg`), else []."""
        keys = self._candidates(rel)
        return keys if len(keys) > 1 else []

    def _candidates(self, rel: str) -> list:
        """The truth names of the first of `find`'s steps that any fit: one for a match."""
        rel = rel.replace("\\", "/")
        if rel in self._items:
            return [rel]
        low = fold_name(rel)
        if low in self._lower:
            return [self._lower[low]]
        same = [k for k in self._noext.get(_strip_image_ext(low), []) if _same_kind(k, low)]
        if len(same) == 1:
            return same
        several = same if len(same) > 1 else []
        suffix = [k for k in self._items
                  if low.endswith("/" + self._folded[k]) or self._folded[k].endswith("/" + low)]
        if len(suffix) == 1:
            return suffix
        several = several or (suffix if len(suffix) > 1 else [])
        stem = _strip_image_ext(low.rsplit("/", 1)[-1])
        cands = [k for k in self._stems.get(stem, [])
                 if _same_kind(k, low) and _same_place(self._folded[k], low)]
        if len(cands) == 1:
            return cands
        return several or cands

    def several_fit_note(self, names) -> str:
        """Why `names` found no truth when several truth names fit each, in one clause (or "")."""
        names, fits = list(names), {}
        for n in names[:NOTE_NAMES]:  # a hint: not worth a second pass over 100k names
            keys = self.several_fit(n)
            if keys:
                fits[n] = keys
        if not fits:
            return ""
        name, keys = next(iter(fits.items()))
        listed = ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
        others = (f"{len(fits) - 1} more" if len(names) <= NOTE_NAMES
                  else f"{len(fits) - 1} more of the first {NOTE_NAMES}")
        more = f", and {others} image(s) fit several" if len(fits) > 1 else ""
        return (f"{name} fits {len(keys)} truth names ({listed}){more}; the truth names hold "
                "folders that the image names lack: give the input folder the truth names are "
                "relative to")

    def resolve(self, names) -> tuple:
        """Pair a run's image names with truth names, one to one: -> ({name: key}, {key: names}).

        A truth name that several images reach through `key_for`'s fallbacks (`field_01.jpg`
        against `A/field_01.jpg` and `B/field_01.jpg`) is ambiguous: none of those images gets it,
        and it comes back in the second mapping, so the caller can say so. An exact match always
        keeps its truth."""
        claims = defaultdict(list)
        for name in names:
            key = self.key_for(name)
            if key is not None:
                claims[key].append(name)
        paired, ambiguous = {}, {}
        for key, claimants in claims.items():
            exact = [n for n in claimants if n.replace("\\", "/") == key]
            if len(claimants) == 1 or exact:
                paired[(exact or claimants)[0]] = key
            else:
                ambiguous[key] = claimants
        return paired, ambiguous

    def unmatched(self, paired: dict, ambiguous: dict) -> list:
        """The truth names `resolve` gave no image, other than those several images reach
        (`ambiguous`, named on their own): a typo, the same image spelled twice in a truth CSV,
        or truth of images not in the run."""
        used = set(paired.values())
        return [k for k in self if k not in used and k not in ambiguous]

    def shadowed(self, paired: dict, unused) -> dict:
        """`{truth name: image name}` for each of `unused` (names `unmatched` returns) that an
        image `paired` with another truth name would match were it alone: one image spelled
        twice in a truth CSV (`f2.png` and `F2.PNG`, `f3` and `f3.png`), whose other spelling's
        truth is not scored. Every match `find` makes keeps the file stem, and the folders of
        the shorter name end the longer's, so only such images are tried, found through an
        index of each image's stem with every ending of its folders: as fast as `resolve` on a
        lab's thousand samples that all hold an `images/field_01.jpg`."""
        whole, endings = defaultdict(list), defaultdict(list)
        for name in paired:
            stem, folders = _stem_folders(name)
            whole[(stem, folders)].append(name)
            for k in range(len(folders) + 1):  # every ending of its folders, () too
                endings[(stem, folders[k:])].append(name)
        out = {}
        for key in unused:
            stem, folders = _stem_folders(key)
            # images whose folders end the key's (or that have none), and those whose folders
            # end in the key's (every image of the stem, for a key without folders)
            names = [n for k in range(len(folders) + 1) for n in whole.get((stem, folders[k:]), ())]
            names = list(dict.fromkeys(names + endings.get((stem, folders), [])))
            if names:
                alone = TruthSet({key: self._items[key]})
                hits = [n for n in names if alone.key_for(n) == key]
                if len(hits) == 1:
                    out[key] = hits[0]
        return out

    def find(self, rel: str) -> Optional[ImageTruth]:
        """The truth for the run's image name `rel`, or None."""
        key = self.key_for(rel)
        return None if key is None else self._items[key]


def _stem_folders(name: str) -> tuple:
    """(file stem without image extension, (folders...)), lower case, empty and `.` parts
    dropped: of two names `TruthSet.find` pairs, the stems agree and one's folders end the
    other's."""
    parts = [p for p in fold_name(name.replace("\\", "/")).split("/") if p not in ("", ".")]
    return _strip_image_ext(parts[-1] if parts else ""), tuple(parts[:-1])


def shadowed_text(twice: dict, paired: dict) -> str:
    """The warning for the truth names `TruthSet.shadowed` found (`twice`), with the truth name
    each one's image is scored against (`paired`: `resolve`'s {image: truth name})."""
    key, image = next(iter(twice.items()))
    n = len(twice)
    more = f"; and {n - 1} more" if n > 1 else ""
    return (f"{n} ground-truth {'entry names' if n == 1 else 'entries name'} an image whose "
            f"truth is read under another spelling of its name, and {'is' if n == 1 else 'are'} "
            f"not scored: {key}, image {image}, scored against the truth of {paired[image]}"
            f"{more} (give all the rows of one image the same name)")


def _ordered(readers) -> list:
    """The readers, highest `priority` first, then by name."""
    items = list(readers.values()) if isinstance(readers, Mapping) else list(readers)
    priorities = {id(r): _priority(r) for r in items}
    return sorted(items, key=lambda r: (-priorities[id(r)], r.name))


def _priority(reader) -> float:
    """A reader's optional `priority`; one that is not a number (None, a string, nan) counts as
    0, with a warning naming the reader, so that one plugin's typo cannot stop every --truth run."""
    value = getattr(reader, "priority", 0)
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return value
    log.warning("truth reader %r has priority %r, which is not a number; taken as 0",
                getattr(reader, "name", reader), value)
    return 0


def load_truth(path, readers, fmt: Optional[str] = None, input_dir=None,
               unknown: str = "scored as wrong") -> TruthSet:
    """Read ground truth at `path` with the reader named `fmt`, or the first that can read it.

    :param path: a truth file or folder.
    :param readers: `{name: reader}` (`wbc_batch.plugins.get_truth_readers`) or an iterable.
    :param fmt: a reader name (`--truth-format`); None chooses by `can_read` and `priority`.
    :param input_dir: the run's input folder (names are made relative to it); default: `path`'s
        folder.
    :param unknown: what becomes of a class outside `CLASSES`, for the warning naming them
        (training leaves such cells out).
    :raises TruthError: no such path, unknown format, no reader for it, or a broken layout.
    """
    path = Path(path)
    if not path.exists():
        raise TruthError(f"truth not found: {path}")
    input_dir = Path(input_dir) if input_dir is not None else (path if path.is_dir() else path.parent)
    ordered = _ordered(readers)
    names = ", ".join(sorted(r.name for r in ordered)) or "none installed"
    if fmt:
        chosen = [r for r in ordered if r.name == fmt]
        if not chosen:
            raise TruthError(f"unknown truth format {fmt!r} (installed: {names})")
        reader = chosen[0]
    else:
        reader = next((r for r in ordered if _recognises(r, path)), None)
        if reader is None:
            raise TruthNotRecognised(f"no truth reader recognises {path} (installed: {names}); "
                             "name one with --truth-format" + _why_not(ordered, path))
    try:
        items = reader.read(path, input_dir)
    except TruthError:
        raise
    except PLUGIN_FAILURES as exc:  # a third party's reader, sys.exit() too: name it
        reraise_stops(exc)
        raise TruthError(f"truth reader {reader.name!r} failed on {path}: "
                         f"{type(exc).__name__}: {exc}") from exc
    # the type first: the truth value of an array or DataFrame is an error of its own
    if not isinstance(items, Mapping) or not all(
            isinstance(k, str) and isinstance(v, ImageTruth) for k, v in items.items()):
        raise TruthError(f"truth reader {reader.name!r} returned something other than "
                         f"{{image name: ImageTruth}}: {_what(items)}")
    if not items:
        raise TruthError(f"truth reader {reader.name!r} found no ground truth in {path}")
    _settle(items, reader.name)
    _warn_unknown_classes(items, reader.name, unknown)
    return TruthSet(items, reader=reader.name)


def _what(items) -> str:
    """What a reader returned instead of `{image name: ImageTruth}`, in a few words."""
    if not isinstance(items, Mapping):
        return f"a {type(items).__name__}"
    key, value = next((k, v) for k, v in items.items()
                      if not (isinstance(k, str) and isinstance(v, ImageTruth)))
    if not isinstance(key, str):
        return f"a key {key!r} that is a {type(key).__name__}, not a str"
    return f"{key!r}: a {type(value).__name__}"


def _settle(items: Mapping, reader: str) -> None:
    """What a reader returned, in the form the scoring reads, whichever reader it was: boxes
    added after an `ImageTruth` was made are known (`has_boxes`; they were not scored, without
    a word), and every class is normalised (`normalise_class`: a plugin's "NE" is a neutrophil,
    as the built-in readers' is; "WBC" is a WBC of unknown class).

    A box written twice for one image, with the same class, is one cell: counted twice, it
    would be a WBC that can never be found (an export that wrote an object twice; one TXL-PBC
    label file repeats a box five times). Those are dropped, with one warning naming the images.

    :raises TruthError: an image whose boxes and box classes differ in number, or with a box
        without area (matched by no cell, it would lower recall unsaid)."""
    repeats = {}
    for name, truth in items.items():
        try:
            truth.__post_init__()
        except ValueError as exc:
            raise TruthError(f"truth reader {reader!r}, image {name!r}: {exc}") from None
        truth.cls = _class_of(truth.cls)
        truth.box_classes = [_class_of(c) for c in truth.box_classes]
        for box in truth.boxes:
            if not _has_area(box):
                raise TruthError(f"truth reader {reader!r}, image {name!r}: the box {box!r} has "
                                 "no area (x, y, width, height with width and height above 0)")
        kept = dict.fromkeys(zip(map(tuple, truth.boxes), truth.box_classes))
        if len(kept) < len(truth.boxes):
            repeats[name] = len(truth.boxes) - len(kept)
            truth.boxes = [box for box, _ in kept]
            truth.box_classes = [cls for _, cls in kept]
    if repeats:
        shown = sorted(repeats)
        log.warning("truth (reader %r): %d WBC box(es) repeat an earlier box of the same image "
                    "and class, and are counted once (%s%s)", reader, sum(repeats.values()),
                    ", ".join(f"{n}: {repeats[n]}" for n in shown[:5]),
                    ", ..." if len(shown) > 5 else "")


def _has_area(box) -> bool:
    """Whether a truth box `(x, y, w, h)` is four finite numbers with width and height above 0."""
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        return False
    return all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0


def _class_of(label) -> Optional[str]:
    """A label as the scoring reads it: None for none, or for one that names no subtype ("WBC"),
    else `normalise_class`."""
    if label is not None and names_any_wbc(label):
        return None
    return normalise_class(label)


def _warn_unknown_classes(items: Mapping, reader: str, unknown: str = "scored as wrong") -> None:
    """One warning naming the truth classes outside `CLASSES`: scoring counts them as classes the
    models never predict, and training leaves them out (`unknown` says which), so a typo or a
    lab's own abbreviation would otherwise cost accuracy or cells without a word."""
    counts = defaultdict(int)
    for truth in items.values():
        for cls in [truth.cls, *truth.box_classes]:
            if cls is not None and cls not in CLASSES:
                counts[cls] += 1
    if counts:
        log.warning("truth (reader %r) has classes the models do not know, %s: %s "
                    "(known: %s)", reader, unknown,
                    ", ".join(f"{k!r} ({v}{_guess(k)})" for k, v in sorted(counts.items())),
                    ", ".join(CLASSES))


def _guess(label: str) -> str:
    guess = suggest_class(label)
    return f"; {guess}?" if guess else ""


def _why_not(readers, path: Path) -> str:
    """What the readers that say so (optional `why_not`) found wrong with `path`, as sentences to
    add to the "no truth reader recognises" error; "" when none says anything. A hint only: a
    reader that raises there is passed over."""
    out = ""
    for reader in readers:
        try:
            reason = reader.why_not(path) if hasattr(reader, "why_not") else None
        except PLUGIN_FAILURES as exc:
            reraise_stops(exc)
            continue
        if reason:
            out += f". Reader {reader.name!r} did not accept {reason}"
    return out


def _recognises(reader, path: Path) -> bool:
    """`reader.can_read(path)`; a reader that raises there is passed over with a warning, so
    that one broken plugin does not stop the others from reading the truth."""
    try:
        return bool(reader.can_read(path))
    except PLUGIN_FAILURES as exc:
        reraise_stops(exc)
        log.warning("truth reader %r failed while looking at %s (%s: %s); passed over",
                    reader.name, path, type(exc).__name__, exc)
        return False


def table_encoding(path: Path) -> str:
    """"utf-16" for a file that starts with a UTF-16 byte-order mark (Excel's "Unicode text"),
    else "utf-8-sig" (UTF-8, with or without Excel's mark)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        return "utf-8-sig"
    return "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


def start_table(fh) -> tuple:
    """`(delimiter, lines skipped)` of a table file `fh` open at its start, which is left at its
    header: Excel's `sep=;` first line (written so that Excel splits a CSV at `;`) names the
    delimiter and is skipped (a csv reader's line numbers plus `lines skipped` are then the
    file's); otherwise `table_delimiter` of the first line, and `fh` is back at its start."""
    first = fh.readline()
    # as Excel writes it, or as a spreadsheet saved it back as data: `SEP=;`, `"sep=;"`, `sep=;;`
    excel = re.fullmatch(r'"?sep=([^"\r\n])"?[,;\t]*\s*', first, re.IGNORECASE)
    if excel:
        return excel.group(1), 1
    fh.seek(0)
    return table_delimiter(first), 0


def table_delimiter(first_line: str) -> str:
    """A tab for a header line with tabs and no comma (Excel's "Text (Tab delimited)" and
    "Unicode text"), a semicolon for one with semicolons and neither (Excel's CSV in much of
    Europe: a decimal comma in a box then fails as not a number, naming its line), else a
    comma."""
    if "," in first_line:
        return ","
    if "\t" in first_line:
        return "\t"
    return ";" if ";" in first_line else ","


def select_split(split_file, split: str, input_dir, where: Optional[Mapping] = None) -> list:
    """Images of one split from a split CSV (columns `image`, `split`; `image` relative to input_dir).

    Column names, split values and `where` values are read in any letter case (`Image`, `Val`),
    as the trainer's `--lab-csv` reads them, so one lab CSV serves both.

    :param where: `{column: value}` further conditions on the rows (e.g. `{"dataset": "2"}`).
    :returns: absolute paths, in the file's order, each once (a truth CSV with one row per cell
        is a split file too).
    :raises TruthError: missing columns, an empty split, or listed images that do not exist.
    """
    import csv

    split_file = Path(split_file)
    input_dir = Path(input_dir)
    try:
        with open(split_file, newline="", encoding=table_encoding(split_file)) as fh:
            delimiter, _ = start_table(fh)
            rows = [{(k or "").strip().lower(): v for k, v in r.items()}
                    for r in csv.DictReader(fh, delimiter=delimiter, skipinitialspace=True)]
    except OSError as exc:
        raise TruthError(f"cannot read split file {split_file}: {exc.strerror or exc}") from exc
    except (UnicodeError, csv.Error) as exc:
        raise TruthError(f"cannot read split file {split_file}: {exc}; save it as UTF-8 CSV") from None
    if not rows or "image" not in rows[0] or "split" not in rows[0]:
        raise TruthError(f"split file {split_file} needs columns 'image' and 'split'")
    where = {str(c).strip().lower(): v for c, v in (where or {}).items()}
    unknown = [c for c in where if c not in rows[0]]
    if unknown:
        raise TruthError(f"split file {split_file} has no column {unknown[0]!r} "
                         f"(columns: {', '.join(rows[0])})")
    chosen = list(dict.fromkeys(
        _row_image(r["image"]) for r in rows
        if (r.get("split") or "").strip().lower() == split.strip().lower()
        and all((r.get(c) or "").strip().lower() == str(v).strip().lower()
                for c, v in where.items()) and _row_image(r["image"])))
    if not chosen:
        found = sorted({(r.get("split") or "").strip().lower() for r in rows})
        cond = "".join(f" and {c}={v}" for c, v in where.items())
        raise TruthError(f"split {split!r}{cond} has no rows in {split_file} "
                         f"(splits: {', '.join(found)})")
    paths = [input_dir / name for name in chosen]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise TruthError(f"{len(missing)} image(s) of split {split!r} are not under {input_dir}, "
                         f"e.g. {missing[0]}")
    return paths


def _row_image(cell) -> str:
    """An image name as a CSV row writes it, in the run's form: forward slashes, no `.` part
    and no empty one (`./s1//a.png` is `s1/a.png`), so one image listed under two spellings is
    analysed once."""
    name = (cell or "").strip().replace("\\", "/")
    root = "/" if name.startswith("/") else ""  # an absolute path stays one
    return root + "/".join(part for part in name.split("/") if part not in ("", "."))


def mask_index(masks_dir: Path) -> dict:
    """`{image name (lower case, with and without extension): mask path}` for a masks folder."""
    out = {}
    for mask in iter_files(masks_dir, IMAGE_EXTENSIONS):
        rel = mask.relative_to(masks_dir).as_posix()
        inner = rel[: -len(mask.suffix)]
        names = [inner]
        if Path(inner).suffix.lower() in IMAGE_EXTENSIONS:  # a/b.jpg.png: the run's own layout
            names.append(inner[: -len(Path(inner).suffix)])
        for name in names:
            out.setdefault(fold_name(name), mask)
    return out


def mask_for(index: dict, name: str):
    """The mask of image `name` (relative, forward slashes) in a `mask_index`, or None:
    `masks/<name>.png` or `masks/<name without extension>.<any image extension>`."""
    low = fold_name(name)
    stripped = low[: -len(Path(low).suffix)] if Path(low).suffix in IMAGE_EXTENSIONS else low
    return index.get(low) or index.get(stripped)


def _plain_folders(root: Path) -> set:
    """The real paths of the folders under `root` reached without a link, hidden ones left out,
    as `iter_files` walks them."""
    plain = set()
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_skipped_folder(d)]
        plain.add(os.path.realpath(dirpath))
    return plain


def iter_files(root: Path, suffixes: Iterable[str]) -> list:
    """Files under `root` (recursive, sorted, hidden ones and system folders skipped,
    `discovery.is_skipped_folder`) whose suffix is in `suffixes`.
    Linked folders are followed, as the images' search follows them
    (`discovery.discover_images`), each real folder once: under its own name where it lies under
    `root` (a link to it, `masks/latest -> s1`, is not followed), else under the first link
    that reaches it (a link back up is no loop)."""
    suffixes = {s.lower() for s in suffixes}
    plain = None  # the folders reached without a link: walked once the first link is met
    out, seen = [], {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            real = os.path.realpath(full)
            if is_skipped_folder(d) or real in seen:
                continue
            if os.path.islink(full):
                plain = _plain_folders(root) if plain is None else plain
                if real in plain:  # walked under its own name
                    continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes:
                out.append(Path(dirpath) / name)
    return out
