"""kohya's caption options, as its dataset applies them to a caption each time an image is drawn
(train_util.BaseDataset.process_caption, in its order): the prefix and suffix; the whole caption dropped at
a rate; wildcards (`{a|b}`, one line of several) or else the first line; the tags split at a separator,
those before `keep_tokens` (or before `keep_tokens_separator`, and after its second use) kept in place, the
others shuffled and dropped one by one at a rate, joined with ", "; a secondary separator turned into the
separator; kohya's token warm-up: early in the run only the first of the tags that move are kept, more and
more of them until token_warmup_step."""
from __future__ import annotations

import math
import random
import re


def process(caption: str, rng: random.Random, o, epoch: int = 0, step: int = 0, total: int = 0) -> str:
    """`o`: the run's options under kohya's names (a TrainConfig: shuffle_caption, keep_tokens,
    caption_dropout_rate, caption_prefix / _suffix, caption_separator, keep_tokens_separator,
    secondary_separator, caption_tag_dropout_rate, enable_wildcard, caption_dropout_every_n_epochs). `caption`:
    the caption file's lines; `epoch`: the run's epoch (0-based); `step`, `total`: the optimizer steps done and
    the run's (token_warmup_min, token_warmup_step)."""
    if not o.enable_wildcard:
        caption = caption.split("\n")[0]     # kohya reads no other line of the file (read_caption)
    if o.caption_prefix:
        caption = o.caption_prefix + " " + caption
    if o.caption_suffix:
        caption = caption + " " + o.caption_suffix
    if o.caption_dropout_rate and rng.random() < o.caption_dropout_rate:
        return ""
    every = o.caption_dropout_every_n_epochs
    if every and (epoch + 1) % every == 0:      # kohya counts epochs from 1
        return ""
    if o.enable_wildcard:
        caption = _wildcards(caption, rng)
    warmup = _warmup_steps(o.token_warmup_step, total)
    if o.shuffle_caption or o.caption_tag_dropout_rate or warmup:
        fixed, flex, fixed_end = _split(caption, o)
        if warmup and step < warmup:
            flex = flex[:math.floor(step * (len(flex) - o.token_warmup_min) / warmup) + o.token_warmup_min]
        if o.shuffle_caption:
            rng.shuffle(flex)
        if o.caption_tag_dropout_rate:
            flex = [t for t in flex if rng.random() >= o.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_end)
    if o.secondary_separator:
        caption = caption.replace(o.secondary_separator, o.caption_separator)
    return caption


def _warmup_steps(given: float, total: int) -> int:
    """kohya's token_warmup_step: below 1 a share of the run's steps."""
    return math.floor(given * total) if given < 1 else int(given)


def _split(caption: str, o) -> tuple[list, list, list]:
    """(tags kept at the start, tags that move, tags kept at the end)."""
    def tags(text):
        return [t.strip() for t in text.split(o.caption_separator) if t.strip()]

    marker = o.keep_tokens_separator
    if marker and marker in caption:
        head, rest = caption.split(marker, 1)
        rest, _, tail = rest.partition(marker)
        return tags(head), tags(rest), tags(tail)
    every = [t.strip() for t in caption.strip().split(o.caption_separator)]
    return every[:o.keep_tokens], every[o.keep_tokens:], []


def _wildcards(caption: str, rng: random.Random) -> str:
    """One line of several, then each `{a|b|c}` one of its choices (`{{` and `}}` are braces)."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    left, right = "\x00", "\x01"
    caption = caption.replace("{{", left).replace("}}", right)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(left, "{").replace(right, "}")
