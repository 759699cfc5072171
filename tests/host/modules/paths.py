import os
import tempfile

script_path = os.environ.get("LORA_EXT_TEST_WEBUI", tempfile.mkdtemp(prefix="webui_"))
data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
