"""What a label is, for the de-identification (which attaches labels) and the study (which reads them).

Stated once here so that the labels CSV a site attaches and the study a consortium ships agree on
the keys a label may use, the level each applies to, and the shape of a class name.
"""

from __future__ import annotations

import re

#: The label key a CSV may use, and the level a label then applies to (every image below it).
LABEL_KEYS: dict[str, str] = {
    "AccessionNumber": "study",
    "StudyInstanceUID": "study",
    "SeriesInstanceUID": "series",
    "SOPInstanceUID": "image",
}
#: Separator of the findings present in a multilabel label ("effusion|nodule"); "none" means no finding.
MULTILABEL_SEPARATOR = "|"
NO_FINDING = "none"
#: A class (or study) name: 1-64 letters, digits, space, '.', '_' or '-', starting with a letter or digit.
CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")
