"""modules.infotext_utils: the text under each image (its generation parameters), parsed back for pasting."""
import json
import re

import gradio as gr

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def create_infotext(p):
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": p.seed,
              "Size": f"{p.width}x{p.height}", **p.extra_generation_params}
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {p.negative_prompt}" if p.negative_prompt else ""
    return f"{p.prompt}{negative}\n{line}".strip()


def parse_generation_parameters(x: str) -> dict:
    res = {}
    lines = x.strip().split("\n")
    last = lines[-1]
    if len(re_param.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative = "", ""
    done_with_prompt = False
    for line in lines[:-1]:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in re_param.findall(last):
        res[k] = unquote(v)
    return res


def paste_values(paste_fields, params):
    """What the paste button sends to each field: {component: value} (fields with nothing to set are left
    out), coerced to the component's value type as the webui does."""
    out = {}
    for output, key in paste_fields:
        v = key(params) if callable(key) else params.get(key, None)
        if v is None:
            continue
        valtype = type(output.value)
        if valtype == bool and v == "False":
            val = False
        elif valtype == int:
            val = float(v)
        else:
            val = valtype(v)
        out[output] = val
    return out


__all__ = ["gr"]
