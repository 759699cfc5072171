// The webui's own progress bar over the LoRA tab's Train form while a run goes, as its txt2img does it: the
// Train button hands the run a task id (first input), and the webui's requestProgress (progressbar.js) polls
// /internal/progress for that task until it completes. Outside the webui (no requestProgress) nothing changes.
function loraExtTrain(...args) {
    if (typeof requestProgress !== "function" || typeof randomId !== "function") return args;
    const id = randomId();
    const box = gradioApp().getElementById("lora_ext_train_progress");
    if (box) requestProgress(id, box, null, function() {});
    args[0] = id;
    return args;
}
