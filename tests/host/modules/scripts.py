"""modules.scripts: the Script base class and the loader that imports every scripts/*.py of an extension."""
import importlib.util
import inspect
import os
import sys
from collections import namedtuple

from modules import paths, script_callbacks

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []
current_basedir = paths.script_path


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        tabname = ("img2img" if self.is_img2img else "txt2img") + "_"
        title = "".join(c if c.isalnum() else "_" for c in self.title().lower())
        return f"script_{tabname}{title}_{item_id}"


def basedir():
    return current_basedir


def load_scripts_from(extension_dir, folder=None):
    """Imports every .py in <extension>/scripts as the webui does (module named after the file, like
    'xyz_grid.py'): the extension folder on sys.path while loading, Script subclasses registered.
    Returns the ScriptClassData added."""
    global current_basedir
    added = []
    folder = folder or os.path.join(extension_dir, "scripts")
    for filename in sorted(os.listdir(folder)):
        if not filename.endswith(".py"):
            continue
        path = os.path.join(folder, filename)
        saved = sys.path
        sys.path = [extension_dir] + sys.path
        current_basedir = extension_dir
        try:
            spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path = saved
            current_basedir = paths.script_path
        for cls in module.__dict__.values():
            if inspect.isclass(cls) and issubclass(cls, Script) and cls is not Script:
                data = ScriptClassData(cls, path, extension_dir, module)
                scripts_data.append(data)
                added.append(data)
    return added


def create_alwayson_script(data, is_img2img):
    """What ScriptRunner.initialize_scripts + create_script_ui do for one always-on script."""
    script = data.script_class()
    script.filename = data.path
    script.is_txt2img, script.is_img2img = not is_img2img, is_img2img
    if script.show(is_img2img) is not AlwaysVisible:
        return None
    script.alwayson = True
    script.controls = script.ui(is_img2img)
    script.name = script.title().lower()
    return script


__all__ = ["Script", "AlwaysVisible", "basedir", "script_callbacks"]


class ScriptRunner:
    """The always-on part of the webui's ScriptRunner: builds each script's UI, gives it its slice of the
    flat script_args (args_from/args_to), collects infotext fields, and calls the per-generation hooks."""

    def __init__(self):
        self.alwayson_scripts = []
        self.inputs = [None]            # the webui reserves index 0 for the selectable-script dropdown
        self.infotext_fields = []
        self.paste_field_names = []

    def initialize(self, is_img2img):
        for data in scripts_data:
            script = data.script_class()
            script.filename = data.path
            script.is_txt2img, script.is_img2img = not is_img2img, is_img2img
            if script.show(is_img2img) is not AlwaysVisible:
                continue
            script.alwayson = True
            script.args_from = len(self.inputs)
            script.controls = script.ui(is_img2img) or []
            script.name = script.title().lower()
            self.inputs += script.controls
            script.args_to = len(self.inputs)
            self.infotext_fields += script.infotext_fields or []
            self.paste_field_names += script.paste_field_names or []
            self.alwayson_scripts.append(script)
        return self

    def default_args(self):
        return [None] + [getattr(c, "value", None) for c in self.inputs[1:]]

    def args_for_api(self, alwayson: dict):
        """script_args for an API request: defaults, with each named script's `args` placed at its slice."""
        args = self.default_args()
        for script in self.alwayson_scripts:
            given = alwayson.get(script.name, {}).get("args")
            if given:
                args[script.args_from:script.args_from + len(given)] = given
        return args

    def _call(self, name, p, *extra):
        for script in self.alwayson_scripts:
            getattr(script, name)(p, *extra, *p.script_args[script.args_from:script.args_to])

    def before_process(self, p):
        self._call("before_process", p)

    def process(self, p):
        self._call("process", p)

    def postprocess(self, p, processed):
        for script in self.alwayson_scripts:
            script.postprocess(p, processed, *p.script_args[script.args_from:script.args_to])
