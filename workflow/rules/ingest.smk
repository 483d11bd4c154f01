# ingest stage (rules added by its issue).
