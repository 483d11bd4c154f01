# qc stage (rules added by its issue).
