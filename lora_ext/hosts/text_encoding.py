"""Prompt encoding for training and sampling, as the webui does it at generation time: tokens in 75-token
chunks, each chunk wrapped in start/end tokens (padded with end tokens for CLIP, zeros for open_clip),
encoded, and joined. clip_skip n takes the n-th layer from the end (1 = last); for transformers' CLIP the
final layer norm is applied to it, as the webui does. open_clip text models (SD2) stop one block before the
end, as ldm's FrozenOpenCLIPEmbedder ('penultimate') does, and clip_skip goes further back from there.
SDXL takes both encoders' penultimate states whatever clip_skip says, as sgm, kohya and the webui (its
default) do."""
from __future__ import annotations

import torch

START, END = 49406, 49407


class Holder:
    """What encode() takes for a transformers text encoder held apart from its tokenizer (diffusers, Forge):
    `.transformer`, `.tokenizer`; `zero_pad`: rows are zeros after their end token (SDXL's second tokenizer
    pads with "!", id 0, as open_clip does)."""

    def __init__(self, transformer, tokenizer, zero_pad: bool = False):
        self.transformer, self.tokenizer, self.zero_pad = transformer, tokenizer, zero_pad


def tokenize(holder, prompts: list) -> list:
    """Token ids of each prompt without start/end tokens."""
    if hasattr(holder, "tokenizer"):
        return holder.tokenizer(prompts, add_special_tokens=False, truncation=False).input_ids
    from open_clip.tokenizer import _tokenizer
    return [_tokenizer.encode(p) for p in prompts]


def chunked_ids(holder, prompts: list, max_tokens: int) -> torch.Tensor:
    """[batch * chunks, 77] ids: each prompt cut to `max_tokens`, padded with end tokens, split in chunks
    of 75, each wrapped as [start] + chunk + [end]; open_clip rows hold zeros after their first end token."""
    chunks = max_tokens // 75
    zero_after_end = getattr(holder, "zero_pad", not hasattr(holder, "tokenizer"))
    rows = []
    for ids in tokenize(holder, prompts):
        ids = list(ids[:75 * chunks])
        ids += [END] * (75 * chunks - len(ids))
        for c in range(chunks):
            row = [START] + ids[75 * c:75 * (c + 1)] + [END]
            if zero_after_end:
                first = row.index(END)
                row = row[:first + 1] + [0] * (len(row) - first - 1)
            rows.append(row)
    return torch.tensor(rows)


def _hf(holder, ids, clip_skip, final_norm=True, pooled=False):
    """(states, pooled): with `pooled`, the projected end-token output of a CLIPTextModelWithProjection
    (SDXL's second encoder in diffusers) or of a CLIPTextModel carrying a `text_projection` layer (Forge's:
    its CLIP-L has one too, never loaded, so it is used only where asked), else None."""
    t = holder.transformer
    out = t(ids.to(t.device), output_hidden_states=clip_skip > 1)
    if not pooled:
        pooled = None
    elif getattr(out, "text_embeds", None) is not None:
        pooled = out.text_embeds
    else:
        pooled = t.text_projection(out.pooler_output)
    if clip_skip <= 1:
        return out.last_hidden_state, pooled
    h = out.hidden_states[-clip_skip]
    return (t.text_model.final_layer_norm(h) if final_norm else h), pooled


def _openclip(holder, ids, clip_skip, final_norm=True, pooled=False):
    """(states, pooled): the states `clip_skip` blocks before the end; with `pooled`, also the end token's
    final state (after ln_final) through text_projection, as sgm's FrozenOpenCLIPEmbedder2 pools."""
    m = holder.model
    # the webui wraps token_embedding (EmbeddingsWithFixes, no .weight): the device from the positions
    x = m.token_embedding(ids.to(m.positional_embedding.device)) + m.positional_embedding
    x = x.permute(1, 0, 2)
    blocks = list(m.transformer.resblocks)
    states = None
    for i, block in enumerate(blocks):
        if i == len(blocks) - clip_skip:
            states = x
            if not pooled:
                break
        x = block(x, attn_mask=m.attn_mask)
    states = (x if states is None else states).permute(1, 0, 2)
    states = m.ln_final(states) if final_norm else states
    if not pooled:
        return states, None
    last = m.ln_final(x.permute(1, 0, 2))
    end = ids.to(last.device).argmax(dim=-1)      # the first end token: the largest id, zeros after it
    return states, last[torch.arange(len(last)), end] @ m.text_projection


def encode(holders: list, prompts: list, clip_skip: int, max_tokens: int, sdxl: bool = False):
    """conditioning.Text of the prompts. SDXL: CLIP-L's and OpenCLIP bigG's penultimate states side by side
    (clip_skip not used), and bigG's pooled output of each prompt's first chunk (the webui's choice for long
    prompts)."""
    from .conditioning import Text

    outs, pooled = [], None
    chunks = max_tokens // 75
    for i, holder in enumerate(holders):
        ids = chunked_ids(holder, prompts, max_tokens)
        second = sdxl and i == 1
        if hasattr(holder, "transformer"):
            # SDXL's encoders give their penultimate layer without the final norm
            h, p = _hf(holder, ids, 2 if sdxl else clip_skip, final_norm=not sdxl, pooled=second)
        else:
            h, p = _openclip(holder, ids, 1 if sdxl else clip_skip, final_norm=not sdxl, pooled=second)
        if second:
            pooled = p[::chunks]
        outs.append(h.reshape(len(prompts), -1, h.shape[-1]))
    return Text(torch.cat(outs, dim=-1), pooled)
