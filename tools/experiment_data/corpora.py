"""The corpora: real text already on the machine, as lists of items.

- ``wordnet`` and ``pydoc``: instruction items ``(key, prompt, response)`` (a word's definition, a
  standard-library function's docstring summary);
- ``catalogs``: translated software messages, ``(English message, {language: translation})``, from
  the gettext catalogs (``.mo`` files) of the installed packages, for the multilingual experiment.
"""
from __future__ import annotations

import contextlib
import gettext
import importlib
import inspect
import io
import json
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path


class CorpusError(RuntimeError):
    pass


WORDNET = Path("/usr/share/wordnet")
_WORD = re.compile(r"[a-z]{3,}")
_POS_NAME = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
_WORD_PROMPTS = ('Define the word "{w}".', 'What does "{w}" mean?', "Give a short definition of {w}.",
                 'What is the meaning of the {pos} "{w}"?')



def wordnet_items(rng: random.Random, root: Path = WORDNET) -> list:
    """(word, prompt, definition) for single lowercase words with a SemCor-attested first sense."""
    if not (root / "index.noun").is_file():
        raise CorpusError(f"WordNet is not installed ({root}/index.noun missing): apt-get install wordnet-base, "
                          f"or use --corpus pydoc")
    seen, items = set(), []
    for pos in ("noun", "verb", "adj", "adv"):  # a word in several parts of speech keeps the first
        data = (root / f"data.{pos}").read_bytes()
        for line in (root / f"index.{pos}").read_text().splitlines():
            if line.startswith(" "):  # the license header
                continue
            f = line.split()
            lemma, p_cnt = f[0], int(f[3])
            tagsense_cnt, offsets = int(f[5 + p_cnt]), f[6 + p_cnt:]
            if lemma in seen or not _WORD.fullmatch(lemma) or tagsense_cnt < 1:
                continue
            start = int(offsets[0])  # senses are ordered by frequency: the first is the common one
            record = data[start:data.index(b"\n", start)].decode()
            gloss = record.split(" | ", 1)[1].split('; "', 1)[0].strip().rstrip(";").strip()
            if not 4 <= len(gloss.split()) <= 20 or '"' in gloss:
                continue
            seen.add(lemma)
            prompt = rng.choice(_WORD_PROMPTS).format(w=lemma, pos=_POS_NAME[pos])
            items.append((lemma, prompt, gloss[0].upper() + gloss[1:] + "."))
    return items


_SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc"}


def stdlib_modules():
    """(name, module) of every public standard-library module that imports here, in name order,
    silenced (some print or open windows at import); the demo data walks them too."""
    warnings.filterwarnings("ignore")
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                mod = importlib.import_module(name)
        except Exception:
            continue
        yield name, mod


_SENTENCE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()\-]+\.")


def pydoc_items(rng: random.Random) -> list:
    """(qualified name, prompt, first docstring sentence) for public standard-library functions.

    Read in a fresh interpreter without site-packages (``-I -S``): third-party packages patch the
    standard library when imported (torch replaces ``inspect.getfile``), so in the caller's process
    the corpus would depend on what was imported before."""
    proc = subprocess.run([sys.executable, "-I", "-S", __file__, "pydoc"], capture_output=True, text=True)
    if proc.returncode:
        raise CorpusError(f"reading the standard library's docstrings failed: {proc.stderr.strip()[-300:]}")
    return [tuple(item) for item in json.loads(proc.stdout)]


def _pydoc_items_here() -> list:
    items, seen = [], set()
    for name, mod in stdlib_modules():
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            first = re.sub(r"\s+", " ", doc.split("\n\n", 1)[0]).strip()
            m = re.match(r"(.+?\.)(\s|$)", first)
            summary = m.group(1) if m else ""
            key = f"{name}.{attr}"
            if key in seen or not _SENTENCE.fullmatch(summary) or not 4 <= len(summary.split()) <= 25:
                continue
            seen.add(key)
            items.append((key, f"What does the Python function {key} do?", summary))
    return items


CORPORA = {"wordnet": wordnet_items, "pydoc": pydoc_items}

LOCALE = Path("/usr/share/locale")
LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "nl": "Dutch",
             "sv": "Swedish", "da": "Danish", "pl": "Polish", "cs": "Czech", "ro": "Romanian", "hu": "Hungarian",
             "fi": "Finnish", "tr": "Turkish", "ru": "Russian", "uk": "Ukrainian"}
# plain sentences only: no format directives (%s, {0}), markup, mnemonics (_File, &File) or line breaks
_MESSAGE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()\-]+\.?")
_MARKUP = re.compile(r"[%{}<>_&\\\n\t|\[\]]")


def catalog_items(languages: list, root: Path = LOCALE) -> list:
    """(English message, {language: translation}) for the messages every language translates.

    Every ``.mo`` file under ``root/LANG/LC_MESSAGES`` counts; a message two packages translate
    keeps the translation of the first catalog by file name, so the result depends only on the
    installed catalogs. Messages of 3 to 10 words, translations of at most 14: with SmolLM2's chat
    template that fits most items in 64 tokens."""
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown:
        raise CorpusError(f"unknown language code(s) {', '.join(unknown)}; known: {', '.join(sorted(LANGUAGES))}")
    per_language = {}
    for lang in languages:
        files = sorted((root / lang / "LC_MESSAGES").glob("*.mo"))
        if not files:
            raise CorpusError(f"no gettext catalogs for {lang!r} ({root / lang / 'LC_MESSAGES'}/*.mo missing): "
                              f"install translated packages (Debian ships them with most packages, "
                              f"unless localepurge removed them) or choose other --languages")
        table = {}
        for path in files:
            try:
                with path.open("rb") as fh:
                    catalog = gettext.GNUTranslations(fh)._catalog
            except (OSError, ValueError):
                continue  # a broken or non-UTF-8 catalog contributes nothing
            for msgid, msgstr in catalog.items():
                if (isinstance(msgid, str) and msgid not in table and _MESSAGE.fullmatch(msgid)
                        and 3 <= len(msgid.split()) <= 10 and isinstance(msgstr, str) and msgstr.strip()
                        and msgstr != msgid and not _MARKUP.search(msgstr) and len(msgstr.split()) <= 14):
                    table[msgid] = re.sub(r"\s+", " ", msgstr).strip()  # French writes "\xa0;"
        per_language[lang] = table
    common = set.intersection(*(set(t) for t in per_language.values()))
    return [(m, {lang: per_language[lang][m] for lang in languages}) for m in sorted(common)]


if __name__ == "__main__" and sys.argv[1:] == ["pydoc"]:  # pydoc_items' fresh interpreter
    json.dump(_pydoc_items_here(), sys.stdout)
