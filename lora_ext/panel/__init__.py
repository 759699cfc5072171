"""The Additional Networks panel: slots (one model for the UI, the API and the infotext), what it does around a
generation (runtime), masks, its gradio controls (ui) and HTTP routes (api)."""
