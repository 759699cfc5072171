// Tooltips for lora_ext's controls, registered the way the webui's own hints are: its hints.js looks labels
// and button texts up in the global `titles` object.
(function () {
    const loraExtTitles = {
        "LoRA file": "A LoRA in the models/Lora folder (subfolders shown as paths).",
        "Refresh": "Read the models folder again.",
    };
    function register() {
        if (typeof titles !== "undefined") {
            for (const [k, v] of Object.entries(loraExtTitles)) {
                if (!(k in titles)) titles[k] = v;
            }
        }
    }
    if (typeof onUiLoaded === "function") onUiLoaded(register); else register();
})();
