"""Prompt rewriting with a model's lexicon: the words a user writes, in the words its captions used.

Wan2.2 rewrites prompts before encoding them ("prompt extension", with a language model) so they
read like its training captions. A small model trained on a closed caption vocabulary needs the
same more: its text encoder alone does not tell it that "crimson" is red or a "disc" a circle
(docs/training.md, "Language"). A model folder may ship `lexicon.json`: words its captions never
use, each with the attribute it names (colour, shape, motion...), the value, and the caption
words that say the same. `Pipeline` rewrites every prompt with it before encoding, unless
`GenerateSettings.rewrite_prompt` is False; the text actually encoded is recorded as
`ResolvedSettings.encoded_prompt` (the run's JSON).

Rules (`Lexicon.rewrite`): words the captions use are left as they are; the longest phrase the
lexicon knows is replaced (a plural noun by the plural); an attribute is rewritten only where the
prompt has not named it yet (the first mention is what a caption would say: "a red ball rising
into the sky" keeps "sky"); a generic noun right after a rewritten shape is absorbed
("triangular shape" -> "triangle"). Everything else (case, punctuation, unknown words) stays.
The demo's lexicon is built from WordNet and colour-name tables by
`recipes/demo/build_lexicon.py`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

LEXICON_FILE = "lexicon.json"
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@dataclass(frozen=True)
class Lexicon:
    """Words outside a model's captions, mapped onto its caption words."""

    known: frozenset[str]
    """Every word the captions use (lower case): never rewritten."""
    attributes: Mapping[str, tuple[str, str]]
    """Caption words that name an attribute, with its value ('red' -> ('colour', 'red')): a
    prompt that uses one has named that attribute."""
    words: Mapping[str, tuple[str, str, str]]
    """Word or phrase (lower case, words separated by one space) -> (attribute, value,
    replacement text)."""
    absorb: frozenset[str] = frozenset()
    """Generic nouns dropped right after a rewritten shape ('shape', 'figure')."""
    source: str = ""
    """Where it was read from (for messages and records)."""

    @cached_property
    def max_words(self) -> int:
        return max((k.count(" ") + 1 for k in self.words), default=1)

    @classmethod
    def from_dict(cls, d: Mapping, *, source: str = "") -> Lexicon:
        """Validate a decoded `lexicon.json`; a malformed one is refused with what is wrong."""
        where = source or "lexicon"

        def fail(what: str) -> ValueError:
            return ValueError(f"{where}: {what}")

        if not isinstance(d, Mapping):
            raise fail(f"must be a JSON object; got {type(d).__name__}")
        missing = [k for k in ("known", "attributes", "words") if k not in d]
        if missing:
            raise fail(f"missing {', '.join(missing)} (keys: known, attributes, words, absorb)")
        for key in ("known", "absorb"):
            value = d.get(key, [])
            if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
                raise fail(f"'{key}' must be a list of words")
        attributes = d["attributes"]
        if not isinstance(attributes, Mapping) or not all(
            isinstance(k, str) and _pair(v) for k, v in attributes.items()
        ):
            raise fail("'attributes' must map words to [attribute, value]")
        words = d["words"]
        if not isinstance(words, Mapping):
            raise fail("'words' must map words to [attribute, value, replacement]")
        table = {}
        for key, entry in words.items():
            ok = isinstance(entry, list) and len(entry) == 3
            if not ok or not all(isinstance(x, str) and x for x in entry):
                raise fail(f"word {key!r}: expected [attribute, value, replacement]; got {entry!r}")
            table[" ".join(_WORD.findall(key.lower()))] = tuple(entry)
        return cls(
            known=frozenset(w.lower() for w in d["known"]),
            attributes={k.lower(): tuple(v) for k, v in attributes.items()},
            words=table,
            absorb=frozenset(w.lower() for w in d.get("absorb", [])),
            source=source,
        )

    @classmethod
    def load(cls, path: str | Path) -> Lexicon:
        """Read a `lexicon.json`; a missing, unreadable or malformed file is one clear error."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no lexicon at {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable lexicon JSON file ({e})") from None
        return cls.from_dict(d, source=str(path))

    def _lookup(self, key: str) -> tuple[tuple[str, str, str], bool] | None:
        """(entry, plural) for a lower-case word or phrase; a plural noun by its singular."""
        if key in self.words:
            return self.words[key], False
        for suffix in ("es", "s"):
            if key.endswith(suffix) and key[: -len(suffix)] in self.words:
                entry = self.words[key[: -len(suffix)]]
                return (entry, True) if entry[0] == "shape" else None
        return None

    def rewrite(self, prompt: str) -> str:
        """The prompt in the captions' words (see the module's rules)."""
        tokens = list(_WORD.finditer(prompt))
        lower = [t.group().lower() for t in tokens]
        named: set[str] = set()
        out, last, i = [], 0, 0
        while i < len(tokens):
            hit = None
            for n in range(min(self.max_words, len(tokens) - i), 0, -1):
                if n > 1 and not _joined(prompt, tokens[i : i + n]):
                    continue
                words = lower[i : i + n]
                if all(w in self.known for w in words):
                    continue
                found = self._lookup(" ".join(words))
                if found:
                    hit = (n, *found)
                    break
            if hit is None:
                if lower[i] in self.attributes:
                    named.add(self.attributes[lower[i]][0])
                i += 1
                continue
            n, (attribute, _value, replacement), plural = hit
            if attribute in named:
                i += n
                continue
            named.add(attribute)
            before = prompt[last : tokens[i].start()]
            out.append(
                _article(before, replacement) if i and lower[i - 1] in ("a", "an") else before
            )
            out.append(replacement + ("s" if plural else ""))
            last, i = tokens[i + n - 1].end(), i + n
            if attribute == "shape" and i < len(tokens) and lower[i] in self.absorb:
                if _joined(prompt, tokens[i - 1 : i + 1]):
                    last, i = tokens[i].end(), i + 1
        out.append(prompt[last:])
        return "".join(out)

    def read(self, text: str) -> dict[str, str]:
        """The first value of each attribute `text` names in caption words ({'colour': 'red',
        ...}): what a prompt says in the words the model knows (after `rewrite`, or as is)."""
        out: dict[str, str] = {}
        for word in _WORD.findall(text.lower()):
            if word in self.attributes:
                attribute, value = self.attributes[word]
                out.setdefault(attribute, value)
        return out


def _article(before: str, word: str) -> str:
    """`before` (text ending with the article 'a' or 'an' and spaces) with the article that
    `word` takes ("a orange" -> "an orange"); its case is kept."""
    m = re.search(r"\b(an?)(\s+)$", before, flags=re.IGNORECASE)
    if not m:
        return before
    article = "an" if word[:1].lower() in "aeiou" else "a"
    if m.group(1)[0].isupper():
        article = article.capitalize()
    return before[: m.start()] + article + m.group(2)


def _pair(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(x, str) for x in value)


def _joined(text: str, tokens) -> bool:
    """Whether consecutive word matches are separated only by spaces or hyphens."""
    return all(
        re.fullmatch(r"[\s-]+", text[a.end() : b.start()]) for a, b in zip(tokens, tokens[1:])
    )


@lru_cache(maxsize=8)
def _cached(path: str, mtime_ns: int, size: int) -> Lexicon:
    return Lexicon.load(path)


def find_lexicon(folder: str | Path | None) -> Lexicon | None:
    """The lexicon a model folder ships (`lexicon.json`), or None (read once per file version)."""
    if folder is None:
        return None
    path = Path(folder) / LEXICON_FILE
    if not path.is_file():
        return None
    st = path.stat()
    return _cached(str(path), st.st_mtime_ns, st.st_size)
