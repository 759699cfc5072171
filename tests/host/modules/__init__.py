"""Our test double of the webui's `modules` package (AUTOMATIC1111 1.10.x): the names and signatures that
extensions use, with the tiny model as `shared.sd_model`. Keep it faithful to the webui's source."""
