"""Built-in word lists for fake identities (no downloads, ASCII only).

Names are drawn from these lists so that the de-identifier meets PHI that looks
like the real thing: surnames and given names from many backgrounds, street
addresses, physicians and technologists who recur across a site's studies.
Every person and place here is invented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEMALE_FIRST: tuple[str, ...] = (
    "MARY", "PATRICIA", "JENNIFER", "LINDA", "ELIZABETH", "BARBARA", "SUSAN",
    "JESSICA", "SARAH", "KAREN", "NANCY", "MARGARET", "LISA", "BETTY", "SANDRA",
    "ASHLEY", "DOROTHY", "KIMBERLY", "EMILY", "DONNA", "MICHELLE", "CAROL",
    "AMANDA", "MELISSA", "DEBORAH", "STEPHANIE", "REBECCA", "LAURA", "HELEN",
    "SHARON", "AISHA", "FATIMA", "PRIYA", "MEI", "YUKI", "INGRID", "SOFIA",
    "LUCIA", "CHIARA", "AMARA", "NGOZI", "ANIKA", "SIOBHAN", "MAREN", "ELENA",
    "ZOFIA", "LEILA", "HANNA", "CAMILA", "ROSA",
)

MALE_FIRST: tuple[str, ...] = (
    "JAMES", "ROBERT", "JOHN", "MICHAEL", "DAVID", "WILLIAM", "RICHARD",
    "JOSEPH", "THOMAS", "CHARLES", "CHRISTOPHER", "DANIEL", "MATTHEW", "ANTHONY",
    "MARK", "DONALD", "STEVEN", "PAUL", "ANDREW", "JOSHUA", "KENNETH", "KEVIN",
    "BRIAN", "GEORGE", "TIMOTHY", "RONALD", "EDWARD", "JASON", "JEFFREY",
    "RYAN", "OMAR", "HASSAN", "RAJESH", "WEI", "HIROSHI", "LARS", "MATEO",
    "LUCA", "PIOTR", "KWAME", "CHIDI", "ARJUN", "EOIN", "SVEN", "DMITRI",
    "TARIQ", "JONAS", "DIEGO", "ANDRES", "MALIK",
)

LAST: tuple[str, ...] = (
    "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER",
    "DAVIS", "RODRIGUEZ", "MARTINEZ", "HERNANDEZ", "LOPEZ", "GONZALEZ",
    "WILSON", "ANDERSON", "THOMAS", "TAYLOR", "MOORE", "JACKSON", "MARTIN",
    "LEE", "PEREZ", "THOMPSON", "WHITE", "HARRIS", "SANCHEZ", "CLARK",
    "RAMIREZ", "LEWIS", "ROBINSON", "WALKER", "YOUNG", "ALLEN", "KING",
    "WRIGHT", "SCOTT", "TORRES", "NGUYEN", "HILL", "FLORES", "GREEN", "ADAMS",
    "NELSON", "BAKER", "HALL", "RIVERA", "CAMPBELL", "MITCHELL", "CARTER",
    "ROBERTS", "OKAFOR", "MENSAH", "HADDAD", "KHAN", "PATEL", "SHARMA",
    "CHEN", "WANG", "TANAKA", "SATO", "KIM", "PARK", "NOVAK", "KOWALSKI",
    "IVANOV", "PETROV", "MULLER", "SCHMIDT", "FISCHER", "ROSSI", "BIANCHI",
    "FERRARI", "DUBOIS", "LAMBERT", "JANSSEN", "DE JONG", "LINDQVIST",
    "NIELSEN", "HANSEN", "OBRIEN", "MURPHY", "KELLY", "FITZGERALD", "SILVA",
    "SANTOS", "OLIVEIRA", "COSTA", "ABDULLAHI", "MWANGI", "OKONKWO",
    "HOFFMANN", "BECKER", "WAGNER", "NOWAK", "YILMAZ", "DEMIR", "ALVAREZ",
    "CASTILLO", "VARGAS", "MORALES",
)

STREETS: tuple[str, ...] = (
    "MAPLE AVE", "OAK ST", "ELM ST", "CEDAR LN", "PINE RD", "BIRCH DR",
    "WILLOW WAY", "HARBOR RD", "MILL ST", "CHURCH ST", "HIGH ST", "PARK AVE",
    "LAKE VIEW DR", "RIVERSIDE RD", "QUARRY LN", "ORCHARD CT", "STATION RD",
    "MEADOW LN", "HILLCREST AVE", "SUNSET BLVD", "FOUNDRY ST", "CANAL ST",
)

# (city, state, zip prefix) per site region; cycled with the site profile.
REGIONS: tuple[tuple[tuple[str, str, str], ...], ...] = (
    (("RIVERTON", "NS", "120"), ("ASHFORD", "NS", "121"), ("BELLMOUTH", "NS", "123")),
    (("NORTHFIELD", "WK", "340"), ("GLENHAVEN", "WK", "341"), ("STONEBRIDGE", "WK", "343")),
    (("LAKESHORE", "MR", "560"), ("PORT ELLIS", "MR", "561"), ("KESTREL BAY", "MR", "562")),
    (("MOUNT CARROW", "TA", "780"), ("DUNMORE", "TA", "781"), ("FARLEIGH", "TA", "784")),
    (("EASTBROOK", "CV", "910"), ("WESTON HILL", "CV", "911"), ("MARLOW", "CV", "915")),
    (("SALTMARSH", "PE", "450"), ("HOLLOWAY", "PE", "451"), ("CRANFORD", "PE", "452")),
)

PATIENT_NOTES: tuple[str, ...] = (
    "Pt {name} prefers to be called {first}; contact daughter before results.",
    "{name} reports claustrophobia, premedicated per protocol.",
    "Interpreter requested for {name}. Next of kin on file.",
    "{name} arrived by ambulance from home, {address}.",
    "Allergy to iodinated contrast noted for {name} (rash, 2016).",
)

STUDY_NOTES: tuple[str, ...] = (
    "Requested by Dr {ref} for {name}, MRN {mrn}.",
    "Outpatient study for {name}; results to Dr {ref}.",
    "{name} (DOB {dob}) scheduled by Dr {ref}.",
)

IMAGE_NOTES: tuple[str, ...] = (
    "Tech {op}: {name} positioned supine, arms up.",
    "{name} MRN {mrn} - repeat scan after motion.",
    "Scanned by {op} for {name}.",
)

HISTORY_NOTES: tuple[str, ...] = (
    "Abdominal pain, weight loss. Prior imaging at outside hospital.",
    "Follow-up of incidental finding, per Dr {ref}.",
    "Screening per referring physician; history per {name}'s chart.",
    "Elevated liver enzymes; {name} seen in clinic on {dob_like}.",
)


@dataclass(frozen=True)
class Person:
    """A fake person, with the DICOM PN value and a human-readable form."""

    last: str
    first: str
    middle: str
    sex: str  # "F" | "M"

    @property
    def pn(self) -> str:
        """DICOM Person Name: family^given^middle."""
        return f"{self.last}^{self.first}^{self.middle}"

    @property
    def display(self) -> str:
        """How a workstation or a note writes the name."""
        return f"{self.first.title()} {self.middle}. {self.last.title()}"

    @property
    def overlay(self) -> str:
        """How a scanner console burns the name into an image."""
        return f"{self.last}, {self.first} {self.middle}"


def _pick(rng: np.random.Generator, items: tuple[str, ...]) -> str:
    return items[int(rng.integers(len(items)))]


def make_person(rng: np.random.Generator, sex: str | None = None) -> Person:
    """Draw one fake person; ``sex`` is drawn too when not given."""
    if sex is None:
        sex = "F" if rng.random() < 0.5 else "M"
    first = _pick(rng, FEMALE_FIRST if sex == "F" else MALE_FIRST)
    middle = chr(ord("A") + int(rng.integers(26)))
    return Person(last=_pick(rng, LAST), first=first, middle=middle, sex=sex)


def make_address(rng: np.random.Generator, region: int) -> str:
    """A street address in one of the site's towns (fits LO, 64 chars)."""
    city, state, zip_prefix = REGIONS[region % len(REGIONS)][int(rng.integers(3))]
    number = int(rng.integers(1, 9999))
    zip_code = f"{zip_prefix}{int(rng.integers(100)):02d}"
    return f"{number} {_pick(rng, STREETS)}, {city}, {state} {zip_code}"


def make_phone(rng: np.random.Generator) -> str:
    """A telephone number that fits SH (16 chars)."""
    return f"555-{int(rng.integers(100, 1000))}-{int(rng.integers(1000, 10000))}"
