"""The webui glue that is more than registration (scripts/ registers; this runs jobs in the webui)."""
