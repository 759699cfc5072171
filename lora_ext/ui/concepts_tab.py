"""The Concepts sub-tab: a table of concepts (any number), their counts and shares, import/export of the
dreambooth extension's JSON and kohya's dataset TOML, preparing kohya's folder layout, and a caption browser
(edit a caption, or caption the images that have none with the host's interrogators)."""
from __future__ import annotations

import gradio as gr

from .. import concepts as cp

HEADERS = ["folder", "repeats", "name (caption fallback)", "caption extension", "regularization"]


def summary(rows) -> str:
    """Per concept: images, captions found, share of each epoch."""
    import os

    try:
        concepts = cp.from_rows(_rows(rows))
    except cp.ConceptError as e:
        return f"**Check the table:** {e}"
    counted = []
    for c in concepts:
        if not os.path.isdir(c.folder):
            counted.append((c, None, None))
            continue
        items = cp.images_with_captions(c.folder, c.caption_extension)
        counted.append((c, len(items), sum(1 for _, cap in items if cap)))
    total = sum(c.repeats * n for c, n, _ in counted if n and not c.is_reg)
    lines = []
    for c, n, caps in counted:
        if n is None:
            lines.append(f"- **{c.label}**: folder {c.folder} does not exist")
            continue
        share = "regularization" if c.is_reg else (f"{c.repeats * n / total:.0%} of each epoch" if total else "-")
        lines.append(f"- **{c.label}** ({c.repeats} repeats): {n} images, {caps} captions, {share}")
    return "\n".join(lines) or "No concepts yet: add a row with a folder."


def import_text(text: str, kind: str):
    """(table rows or None, message)."""
    try:
        concepts = cp.from_kohya_toml(text) if kind == "kohya" else cp.from_dreambooth_json(text)
    except cp.ConceptError as e:
        return None, f"**Cannot import:** {e}"
    return cp.to_rows(concepts), f"Imported {len(concepts)} concepts."


def export_text(rows, kind: str) -> str:
    try:
        concepts = cp.from_rows(_rows(rows))
    except cp.ConceptError as e:
        return f"# {e}"
    return cp.to_kohya_toml(concepts) if kind == "kohya" else cp.to_dreambooth_json(concepts)


def prepare(rows, dest: str, mode: str):
    """(message, train folder or None, regularization folder or None): the folders go into the Train form."""
    try:
        out = cp.prepare(cp.from_rows(_rows(rows)), dest, mode)
    except (cp.ConceptError, OSError) as e:
        return f"**Cannot prepare:** {e}", None, None
    note = f" ({out['copied_instead_of_linked']} copied: links refused)" if out["copied_instead_of_linked"] else ""
    reg = f", regularization folder `{out['reg']}`" if out["reg"] else ""
    return (f"Prepared {out['files']} files{note}: train folder `{out['train']}`{reg}; the Train form now points "
            "at them.", out["train"], out["reg"])


def remove_row(rows, number):
    """(rows, message): the table without row `number` (counted from 1)."""
    rows = _rows(rows)
    try:
        i = int(number) - 1
    except (TypeError, ValueError):
        i = -1
    if not 0 <= i < len(rows):
        return rows, f"**No row {number}:** the table has {len(rows)} rows."
    kept = rows[:i] + rows[i + 1:]
    return kept or [["", 1, "", ".txt", False]], f"Removed row {i + 1}."


def concept_folders(rows) -> list:
    return [str(r[0]).strip() for r in _rows(rows) if r and str(r[0]).strip()]


def browse(folder: str, ext: str):
    """(gallery items [(image, caption)], image paths, message) for a folder's images."""
    import os

    if not folder or not os.path.isdir(folder):
        return [], [], f"**No such folder:** {folder!r}"
    items = cp.images_with_captions(folder, ext or ".txt")
    shown = [(image, cp.read_caption(cap) or "(no caption)") for image, cap in items]
    missing = sum(1 for _, cap in items if cap is None)
    return shown, [image for image, _ in items], f"{len(items)} images, {missing} without caption."


def pick(paths: list, index: int, ext: str):
    """(image path, its caption) for the gallery's selected index."""
    import os

    if not paths or index is None or not 0 <= index < len(paths):
        return None, ""
    cap = os.path.splitext(paths[index])[0] + (ext or ".txt")
    return paths[index], cp.read_caption(cap if os.path.isfile(cap) else None)


def save_caption(image: str | None, text: str, ext: str) -> str:
    if not image:
        return "Pick an image in the gallery first."
    try:
        path = cp.write_caption(image, text or "", ext or ".txt")
    except OSError as e:
        return f"**Cannot save:** {e}"
    return f"Saved `{path}`."


def caption_missing(folder: str, ext: str, name: str, interrogators: dict) -> str:
    import os

    fn = interrogators.get(name)
    if fn is None:
        return f"**No interrogator** {name!r}: choose one of {', '.join(interrogators) or 'none (the host has none)'}."
    if not folder or not os.path.isdir(folder):
        return f"**No such folder:** {folder!r}"
    try:
        out = cp.caption_missing(folder, ext or ".txt", fn)
    except Exception as e:      # the host's interrogator failing (model download, memory) is a message
        return f"**{name} failed:** {type(e).__name__}: {e}"
    return f"{name}: wrote {len(out['written'])} captions; {out['kept']} images already had one (left as they were)."


def _rows(rows):
    # gradio hands a DataFrame (pandas) or a list of lists
    return rows.values.tolist() if hasattr(rows, "values") and hasattr(rows, "columns") else (rows or [])


def _build_captions(interrogators: dict, table) -> None:
    with gr.Row():
        concept = gr.Dropdown(label="Concept", choices=[], elem_id="lora_ext_captions_concept")
        folder = gr.Textbox(label="Image folder", elem_id="lora_ext_captions_folder")
        ext = gr.Textbox(label="Caption extension", value=".txt", elem_id="lora_ext_captions_ext")
        show_b = gr.Button("Show images", elem_id="lora_ext_captions_show")
    gallery = gr.Gallery(label="Images and captions", columns=6, height="auto", allow_preview=False,
                         elem_id="lora_ext_captions_gallery")
    paths, chosen = gr.State([]), gr.State(None)
    with gr.Row():
        caption = gr.Textbox(label="Caption of the chosen image", lines=2, elem_id="lora_ext_captions_text")
        save_b = gr.Button("Save caption", elem_id="lora_ext_captions_save")
    message = gr.Markdown(elem_id="lora_ext_captions_message")
    show_b.click(browse, inputs=[folder, ext], outputs=[gallery, paths, message])
    table.change(lambda rows: gr.update(choices=concept_folders(rows)), inputs=[table], outputs=[concept])
    concept.select(lambda c: c, inputs=[concept], outputs=[folder]).then(
        browse, inputs=[folder, ext], outputs=[gallery, paths, message])

    def on_select(ps, e, evt: gr.SelectData):
        return pick(ps, evt.index, e)
    gallery.select(on_select, inputs=[paths, ext], outputs=[chosen, caption])
    save_b.click(save_caption, inputs=[chosen, caption, ext], outputs=[message]).then(
        browse, inputs=[folder, ext], outputs=[gallery, paths, gr.Markdown(visible=False)])
    if interrogators:
        with gr.Row():
            which = gr.Radio(list(interrogators), value=next(iter(interrogators)), label="Interrogator",
                             elem_id="lora_ext_captions_interrogator")
            run_b = gr.Button("Caption images without one", elem_id="lora_ext_captions_run")
        run_b.click(lambda f, e, n: caption_missing(f, e, n, interrogators), inputs=[folder, ext, which],
                    outputs=[message])


def build(interrogators: dict | None = None, form_fields: dict | None = None) -> None:
    """`form_fields`: the Train form's components by option name; prepared folders are filled in there."""
    table = gr.Dataframe(headers=HEADERS, datatype=["str", "number", "str", "str", "bool"], row_count=(1, "dynamic"),
                         col_count=(5, "fixed"), value=[["", 1, "", ".txt", False]], elem_id="lora_ext_concepts_table")
    info = gr.Markdown(elem_id="lora_ext_concepts_summary")
    table.change(summary, inputs=[table], outputs=[info])
    with gr.Row():
        kind = gr.Radio(["kohya", "dreambooth"], value="kohya", label="Format", elem_id="lora_ext_concepts_kind")
        import_b = gr.Button("Import", elem_id="lora_ext_concepts_import")
        export_b = gr.Button("Export", elem_id="lora_ext_concepts_export")
    text = gr.Code(label="kohya dataset TOML / dreambooth concepts JSON", elem_id="lora_ext_concepts_text")
    message = gr.Markdown(elem_id="lora_ext_concepts_message")
    import_b.click(lambda t, k: (lambda r, m: (gr.update(value=r) if r else gr.update(), m))(*import_text(t, k)),
                   inputs=[text, kind], outputs=[table, message])
    export_b.click(export_text, inputs=[table, kind], outputs=[text])
    with gr.Row():
        row_n = gr.Number(label="Row to remove", value=1, precision=0, elem_id="lora_ext_concepts_row")
        remove_b = gr.Button("Remove row", elem_id="lora_ext_concepts_remove")
    remove_b.click(remove_row, inputs=[table, row_n], outputs=[table, message])
    with gr.Row():
        dest = gr.Textbox(label="Prepare into (a new folder)", elem_id="lora_ext_concepts_dest")
        mode = gr.Radio(["link", "copy"], value="link", label="How", elem_id="lora_ext_concepts_mode")
        prep_b = gr.Button("Prepare folders", elem_id="lora_ext_concepts_prepare")
    fields = form_fields or {}
    targets = [fields[k] for k in ("train_data_dir", "reg_data_dir") if k in fields]

    def prepared(rows, d, m):
        msg, train, reg = prepare(rows, d, m)
        if train is None:
            return [msg] + [gr.update()] * len(targets)
        return [msg] + [gr.update(value=v or "") for v in (train, reg)][:len(targets)]
    prep_b.click(prepared, inputs=[table, dest, mode], outputs=[message] + targets)
    with gr.Accordion("Captions", open=False, elem_id="lora_ext_captions"):
        _build_captions(interrogators or {}, table)
