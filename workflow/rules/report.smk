# report stage (rules added by its issue).
