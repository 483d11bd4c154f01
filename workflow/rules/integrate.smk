# integrate stage (rules added by its issue).
