"""The experiments (SPEC §5): each turns a corpus into training sources, a validation set, a test
set and the *claim* its check tests (``experiment.json``, read by :mod:`.checks`).

An experiment is a function ``name(corpus, args, rng) -> (sources, validation, test, claim)``,
registered in ``EXPERIMENTS`` with the one-line check it must pass.
"""
from __future__ import annotations

import random

from .corpora import LANGUAGES, CorpusError

# --------------------------------------------------------------------------- helpers


def split(items: list, sizes: list, rng: random.Random) -> list:
    """Disjoint random subsets of ``items`` (by key) of the given sizes."""
    need = sum(sizes)
    if need > len(items):
        raise CorpusError(f"the corpus has {len(items)} items but the experiment needs {need}; lower --train/--eval")
    order = list(items)
    rng.shuffle(order)
    out, at = [], 0
    for n in sizes:
        out.append(order[at:at + n])
        at += n
    return out


def chat(prompt: str, response: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def shuffle_words(text: str, rng: random.Random) -> str:
    """The same words in another order (the sentence's period stays at the end)."""
    words = text.rstrip(".").split()
    for _ in range(10):
        rng.shuffle(words)
        out = " ".join(words) + "."
        if out != text:
            return out
    return out


def typo(word: str, rng: random.Random) -> str:
    """``word`` with one character-level edit (swap, drop, insert or substitute), never unchanged."""
    for _ in range(10):
        i = rng.randrange(max(1, len(word) - 1))
        op = rng.randrange(4) if len(word) > 2 else 2
        letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
        out = (word[:i] + word[i + 1:i + 2] + word[i:i + 1] + word[i + 2:] if op == 0 else
               word[:i] + word[i + 1:] if op == 1 else
               word[:i] + letter + word[i:] if op == 2 else word[:i] + letter + word[i + 1:])
        if out != word:
            return out
    return word + "x"


def words_of(response: str) -> list:
    """A response's words as the corruptions see them: whitespace-separated, final period dropped."""
    return response.rstrip(".").split()


def replace_words(responses: list, level: float, rng: random.Random) -> tuple:
    """The responses with exactly round(level * N) of their N words replaced, N over all of them.

    The positions are drawn uniformly from all the source's words, so the source's corruption
    level is ``level`` up to 1/N (per response it varies). A replacement is another word of the
    same source drawn from its word counts, so the source's vocabulary stays the same and only
    which word stands where is wrong. Returns (responses, measured fraction of words replaced)."""
    words = [words_of(r) for r in responses]
    positions = [(i, j) for i, ws in enumerate(words) for j in range(len(ws))]
    pool = [w for ws in words for w in ws]
    k = round(level * len(positions))
    for i, j in rng.sample(positions, k):
        original = words[i][j]
        for _ in range(100):
            new = rng.choice(pool)
            if new.lower() != original.lower():
                break
        else:
            new = typo(original, rng)  # a pool of one distinct word: misspell it instead
        words[i][j] = new
    out = [" ".join(ws) + ("." if r.endswith(".") else "") for ws, r in zip(words, responses)]
    return out, (k / len(positions) if positions else 0.0)


def _pairs(items):
    return [chat(p, r) for _, p, r in items]


# --------------------------------------------------------------------------- experiments


def denoising(items: list, args, rng: random.Random):
    """One clean source and two corrupted ones; clean held-out validation and test sets.

    - ``clean``: the right response;
    - ``wrong``: the response of another item of the same source (a definition of another word);
    - ``shuffled``: the right response's words in random order.
    """
    clean, wrong, shuffled, val, test = split(items, [args.train] * 3 + [args.eval] * 2, rng)
    answers = [r for _, _, r in wrong]
    answers = answers[1:] + answers[:1]  # a cyclic shift: every response belongs to another item
    sources = {
        "clean": _pairs(clean),
        "wrong": [chat(p, a) for (_, p, _), a in zip(wrong, answers)],
        "shuffled": [chat(p, shuffle_words(r, rng)) for _, p, r in shuffled],
    }
    claim = {"kind": "total_below", "sources": ["wrong", "shuffled"], "limit": 0.1}
    return sources, _pairs(val), _pairs(test), claim


def instruction_quality(items: list, args, rng: random.Random):
    """One high-quality source and three low-quality ones; high-quality validation and test sets.

    - ``good``: the right response;
    - ``truncated``: the right response cut after half its words (at least one), mid-sentence;
    - ``mismatched``: the response of another item of the same source;
    - ``degraded``: the right response with half its words misspelt (one character-level edit each).
    """
    good, truncated, mismatched, degraded, val, test = split(items, [args.train] * 4 + [args.eval] * 2, rng)
    answers = [r for _, _, r in mismatched]
    answers = answers[1:] + answers[:1]

    def cut(r):
        ws = words_of(r)
        return " ".join(ws[:max(1, len(ws) // 2)])

    def misspell(r):
        ws = words_of(r)
        for j in rng.sample(range(len(ws)), round(len(ws) / 2)):
            ws[j] = typo(ws[j], rng)
        return " ".join(ws) + "."

    sources = {
        "good": _pairs(good),
        "truncated": [chat(p, cut(r)) for _, p, r in truncated],
        "mismatched": [chat(p, a) for (_, p, _), a in zip(mismatched, answers)],
        "degraded": [chat(p, misspell(r)) for _, p, r in degraded],
    }
    return sources, _pairs(val), _pairs(test), {"kind": "top", "source": "good"}


def noise_ladder(items: list, args, rng: random.Random):
    """Sources ``noise00``, ``noise25``, ... with the given percent of their words replaced; clean
    validation and test sets.

    Each source has exactly that fraction of its words (over the whole source) replaced by other
    words of the same source (``--levels``, default 0,25,50,75)."""
    levels = _levels(args.levels)
    parts = split(items, [args.train] * len(levels) + [args.eval] * 2, rng)
    sources, noise = {}, {}
    for level, part in zip(levels, parts):
        name = f"noise{level:02d}"
        responses, measured = replace_words([r for _, _, r in part], level / 100, rng)
        sources[name] = [chat(p, r) for (_, p, _), r in zip(part, responses)]
        noise[name] = measured
    claim = {"kind": "spearman_below", "noise": noise, "limit": -0.8}
    return sources, _pairs(parts[-2]), _pairs(parts[-1]), claim


def _levels(text: str) -> list:
    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        raise CorpusError(f"--levels {text!r}: give whole percents separated by commas, e.g. 0,25,50,75") from None
    if len(levels) < 4 or levels != sorted(set(levels)) or not all(0 <= x < 100 for x in levels):
        raise CorpusError(f"--levels {text!r}: give 4 or more distinct rising percents in [0, 100), e.g. 0,25,50,75")
    return levels


def multilingual(catalog: list, args, rng: random.Random):
    """One source per language (``--languages``, default de,fr,es): "Translate into German: <an
    English software message>" -> its German translation from the installed gettext catalogs;
    validation and test in ``--target`` (default de).

    Every English message appears in one file only, in any language: the sources differ in the
    language of the response, not in what they say."""
    languages = args.languages.split(",")
    if len(languages) < 2 or len(set(languages)) != len(languages):
        raise CorpusError(f"--languages {args.languages!r}: give 2 or more distinct language codes, e.g. de,fr,es")
    if args.target not in languages:
        raise CorpusError(f"--target {args.target!r} is not one of --languages {args.languages}")
    parts = split(catalog, [args.train] * len(languages) + [args.eval] * 2, rng)

    def pairs(part, lang):
        return [chat(f'Translate into {LANGUAGES[lang]}: "{m}"', tr[lang]) for m, tr in part]

    sources = {lang: pairs(part, lang) for lang, part in zip(languages, parts)}
    return (sources, pairs(parts[-2], args.target), pairs(parts[-1], args.target),
            {"kind": "top", "source": args.target,
             "text": f"the validation language's source ({args.target}) has the largest weight"})


# name -> (function, corpus kind, the check as the docs and --help state it)
EXPERIMENTS = {
    "denoising": (denoising, "items", "the corrupted sources (wrong, shuffled) get less than 0.1 in total"),
    "multilingual": (multilingual, "catalogs", "the validation language's source (--target) has the largest weight"),
    "instruction-quality": (instruction_quality, "items", "the high-quality source (good) has the largest weight"),
    "noise-ladder": (noise_ladder, "items", "Spearman(pi, measured noise) < -0.8 over the sources"),
}
