"""Read-only tables (sortable by a click on a header)."""
from __future__ import annotations

import gradio as gr


def read_only_table(headers: list, datatype: list, label: str, elem_id: str) -> gr.Dataframe:
    # no starting row: gradio fills an empty table's first row with each type's blank, a stray "0" in
    # number columns
    return gr.Dataframe(value={"headers": list(headers), "data": []}, headers=headers, datatype=datatype,
                        interactive=False, label=label, elem_id=elem_id)
