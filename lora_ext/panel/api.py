"""HTTP routes (FastAPI, the webui's server): the LoRAs the panel offers, with their info."""
from __future__ import annotations


def add_routes(app, library, info_line) -> None:
    from fastapi import HTTPException

    @app.get("/lora_ext/v1/loras")
    def list_loras():
        return [{"name": n, "hash": library.short_hash(n), "info": info_line(n)} for n in library.names()]

    @app.get("/lora_ext/v1/loras/{name:path}")
    def describe_lora(name: str):
        from ..tools.describe import describe
        from ..files import LoraFileError
        from ..library import UnsafeName

        try:
            report = describe(library.path(name))
        except (FileNotFoundError, UnsafeName) as e:
            raise HTTPException(status_code=404, detail=str(e)) from None
        except LoraFileError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        report["file"] = name       # no server paths in answers
        return report
